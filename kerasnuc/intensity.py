"""Pixels -> model input: the one normalisation of training, evaluation, export and inference.

NumPy only, so it runs wherever LiteRT runs. DSB 2018 mixes dim fluorescence (maxima
around 30 of 255), bright H&E and brightfield; scaling each image by its own min and max
puts them on one footing. Tiles and patches of a larger image use the *whole* image's
(min, max) (``intensity_range``), so the result does not change with the tiling. The
exported SavedModel graph has its own TensorFlow copy (``export.saved_model``);
``tests/test_predict.py`` keeps the two equal.
"""

import numpy as np

__all__ = ["convert_channels", "intensity_range", "normalize_with_range", "normalize_image"]


def convert_channels(image, channels=None):
    """(H, W[, C]) (or a (N, H, W, C) stack) -> float32 with ``channels`` channels: grey = mean
    of RGB, RGB = repeated grey; a 4th (alpha) channel is dropped; None keeps the channels."""
    x = np.asarray(image)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim < 3 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected (H, W) or (..., H, W, 1|3|4) pixels, got shape {x.shape}")
    x = x.astype(np.float32)
    if x.shape[-1] == 4:
        x = x[..., :3]
    if channels == 1 and x.shape[-1] == 3:
        x = x.mean(axis=-1, keepdims=True)
    elif channels == 3 and x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def intensity_range(image, channels=None):
    """(min, max) of the image after channel conversion, as ``normalize_image`` uses them."""
    x = convert_channels(image, channels)
    return float(x.min()), float(x.max())


def normalize_with_range(image, channels, value_range):
    """Float32 model input of (a part of) an image, normalised with the given (min, max)."""
    low, high = value_range
    return (convert_channels(image, channels) - low) / max(high - low, 1e-6)


def normalize_image(image, channels=None):
    """uint8 (H, W, C) -> float32 (H, W, channels) in [0, 1], min-max per image."""
    return normalize_with_range(image, channels, intensity_range(image, channels))
