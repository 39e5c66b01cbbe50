"""Whole-image prediction for images that fit in memory (pad to the model's multiple, crop back)."""

import numpy as np

from kerasnuc.data.intensity import normalize_image


def pad_to_multiple(image, multiple):
    """Reflect-pad (H, W, C) so H and W are multiples of ``multiple``; returns (padded, (H, W))."""
    height, width = image.shape[:2]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    mode = "reflect" if min(height, width) > max(pad_h, pad_w) else "edge"
    padded = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode) if pad_h or pad_w else image
    return padded, (height, width)


def predict_maps(model, image, channels, multiple=16):
    """uint8 (H, W, C) image -> (H, W, K) float32 model output."""
    x = normalize_image(image, channels)
    padded, (height, width) = pad_to_multiple(x, multiple)
    out = model.predict(padded[None], verbose=0)[0]
    return np.asarray(out[:height, :width], dtype=np.float32)
