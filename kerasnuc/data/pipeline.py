"""Input pipeline as ``keras.utils.PyDataset``: NumPy in, NumPy out, so it runs under
every Keras backend (also JAX in a process without TensorFlow) and in parallel workers.
"""

import keras
import numpy as np

from kerasnuc.data.intensity import normalize_image
from kerasnuc.data.targets import foreground


def _pad_to(array, height, width):
    """Reflect-pad (H, W, C) up to at least (height, width)."""
    pad_h, pad_w = max(0, height - array.shape[0]), max(0, width - array.shape[1])
    if pad_h or pad_w:
        array = np.pad(array, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
    return array


class SegmentationDataset(keras.utils.PyDataset):
    """Random ``tile`` x ``tile`` crops of images and their targets, augmented.

    Each epoch draws ``steps`` batches; batch ``i`` of epoch ``e`` is a pure function of
    (seed, e, i), so runs are reproducible whatever the number of workers.
    Yields x (B, tile, tile, C) float32 in [0, 1] and y (B, tile, tile, K) float32.
    """

    def __init__(self, records, tile=128, batch_size=8, steps=None, channels=3,
                 target=foreground, augmenter=None, seed=0, **kwargs):
        super().__init__(**kwargs)
        if not records:
            raise ValueError("SegmentationDataset needs at least one image")
        self.tile, self.batch_size, self.seed = tile, batch_size, seed
        self.augmenter = augmenter
        self.images = [normalize_image(r.image, channels) for r in records]
        self.targets = [target(r.labels) for r in records]
        # Sample images in proportion to their area so big images are not under-used.
        areas = np.array([im.shape[0] * im.shape[1] for im in self.images], dtype=np.float64)
        self.weights = areas / areas.sum()
        self.steps = steps or max(1, int(np.ceil(areas.sum() / (tile * tile * batch_size))))
        self.epoch = 0

    def __len__(self):
        return self.steps

    def on_epoch_end(self):
        self.epoch += 1

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        xs, ys = [], []
        for _ in range(self.batch_size):
            k = rng.choice(len(self.images), p=self.weights)
            image = _pad_to(self.images[k], self.tile, self.tile)
            target = _pad_to(self.targets[k], self.tile, self.tile)
            top = int(rng.integers(image.shape[0] - self.tile + 1))
            left = int(rng.integers(image.shape[1] - self.tile + 1))
            window = np.s_[top:top + self.tile, left:left + self.tile]
            x, y = image[window], target[window]
            if self.augmenter is not None:
                x, (y,) = self.augmenter(rng, x, [y])
            xs.append(x)
            ys.append(y)
        return np.stack(xs), np.stack(ys)
