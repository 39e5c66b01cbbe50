"""Training targets from annotations (plain NumPy/SciPy).

Segmentation models learn maps derived from instance labels; detection models
learn density maps made from points; classifiers learn from patches at points.
"""

import numpy as np
from scipy import ndimage


def foreground(labels):
    """(H, W) instance labels -> (H, W, 1) float32 binary foreground."""
    return (np.asarray(labels) > 0).astype(np.float32)[..., None]
