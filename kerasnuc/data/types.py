"""The one record every reader produces."""

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class NucleiImage:
    """One annotated image.

    Attributes:
        name: identifier, unique within its dataset (file stem for most formats).
        image: (H, W, C) uint8, C = 1 or 3 (alpha dropped, channel order RGB).
        labels: (H, W) int32 instance labels, 0 background, ids need not be contiguous;
            None when the dataset has points only.
        points: (K, 2) float64 nucleus centres as (x, y) in 0-based pixel coordinates
            (pixel centres at integers); None when the dataset has masks only.
        classes: (K,) int64 class index of each point (or of each instance id in
            ``instance_classes``); None if unclassified.
        class_names: names of the class indices, e.g. ("epithelial", ...).
        source: path of the file the image came from, for error messages.
    """

    name: str
    image: np.ndarray
    labels: Optional[np.ndarray] = None
    points: Optional[np.ndarray] = None
    classes: Optional[np.ndarray] = None
    class_names: tuple = ()
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def shape(self):
        return self.image.shape[:2]

    @property
    def channels(self):
        return self.image.shape[2]
