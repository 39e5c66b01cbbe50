"""Per-image intensity normalisation shared by training, evaluation and export.

DSB 2018 mixes dim fluorescence (maxima around 30 of 255), bright H&E and
brightfield; scaling each image by its own min and max puts them on one footing.
The same arithmetic runs in the exported graphs (export/), so keep it simple.
"""

import numpy as np


def normalize_image(image, channels=None):
    """uint8 (H, W, C) -> float32 (H, W, channels) in [0, 1], min-max per image.

    ``channels``: 1 converts RGB to grey (mean of channels), 3 repeats grey;
    None keeps the image's channels.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    x = image.astype(np.float32)
    if channels == 1 and x.shape[-1] == 3:
        x = x.mean(axis=-1, keepdims=True)
    elif channels == 3 and x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    low, high = float(x.min()), float(x.max())
    return (x - low) / max(high - low, 1e-6)
