"""Input pipelines as ``keras.utils.PyDataset``: NumPy in, NumPy out, so they run under
every Keras backend (also JAX in a process without TensorFlow) and in parallel workers.

* :class:`SegmentationDataset`: random tiles and a segmentation target map.
* :class:`DetectionDataset`: random tiles and a density map of the nucleus centres.
* :class:`ClassificationDataset`: patches centred on classified nuclei and class indices.

Reproducibility: batch ``i`` of epoch ``e`` draws from ``np.random.default_rng([seed, e, i])``
only, so a seed gives the same batches whatever ``workers``/``use_multiprocessing`` are
(extra keyword arguments go to ``PyDataset``: ``workers``, ``use_multiprocessing``,
``max_queue_size``). The epoch counter advances in ``on_epoch_end``, i.e. once per
pass that Keras makes (``fit`` on Keras 3.15 makes one extra short pass before the
first epoch); batches stay a pure function of the seed and the call sequence.
"""

import os

import keras
import numpy as np

from kerasnuc.data.augment import Augmenter
from kerasnuc.intensity import normalize_image
from kerasnuc.data.targets import (density_map, foreground, instance_centroids, point_pixels,
                                   reflect_indices, segmentation_target)

__all__ = ["SegmentationDataset", "DetectionDataset", "ClassificationDataset", "record_points",
           "classified_points", "resolve_workers"]


def _pad_to(array, height, width):
    """Reflect-pad (H, W, C) up to at least (height, width)."""
    pad_h, pad_w = max(0, height - array.shape[0]), max(0, width - array.shape[1])
    if pad_h or pad_w:
        array = np.pad(array, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
    return array


def _window_size(augmenter, tile):
    """Input window for one ``tile``: larger when the augmenter rotates or deforms."""
    if augmenter is not None and getattr(augmenter, "needs_context", False):
        return augmenter.context_size(tile, tile)
    return tile, tile


def available_cores():
    """CPU cores this process may run on (its affinity mask, else os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_workers(workers, cores=None):
    """``workers`` for Keras' loader: a count as given; ``"auto"`` or a negative number: one
    thread per core left over from the training step (cores - 1, at most 8; Keras' loader
    starts threads only from 2 on, so a 2-core CPU keeps building batches inline, where
    they cost about 1% of a step: bench/results/training.md)."""
    if workers is None:
        return 1
    if workers == "auto" or (isinstance(workers, (int, np.integer)) and workers < 0):
        cores = available_cores() if cores is None else int(cores)
        return int(max(1, min(cores - 1, 8)))
    if not isinstance(workers, (int, np.integer)):
        raise ValueError(f"workers must be a count or 'auto', got {workers!r}")
    return int(workers)


class _SeededBatches(keras.utils.PyDataset):
    """Epoch counter and the per-batch Generator shared by the datasets below.
    ``workers="auto"`` (or -1) picks a thread count from the cores (:func:`resolve_workers`)."""

    def __init__(self, seed, **kwargs):
        if "workers" in kwargs:
            kwargs["workers"] = resolve_workers(kwargs["workers"])
        super().__init__(**kwargs)
        self.seed, self.epoch = int(seed), 0

    def batch_rng(self, index):
        """The Generator of batch ``index`` in the current epoch: a pure function of (seed, epoch, index)."""
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def on_epoch_end(self):
        self.epoch += 1

    def set_epoch(self, epoch):
        """Start epoch ``epoch`` (training.resume sets it each epoch, so a resumed run
        draws the batches an uninterrupted one would)."""
        self.epoch = int(epoch)


class _ImageSampler:
    """Normalised images kept as uint8 (4x less memory than float), windows normalised on demand.

    ``window(k, top, left, h, w)`` equals ``normalize_image(image_k, channels)[rows, cols]``
    with out-of-image rows/columns mirror-reflected.
    """

    def __init__(self, images, channels):
        self.images, self.channels, self.ranges = [], channels, []
        for image in images:
            image = np.asarray(image)
            image = image[..., None] if image.ndim == 2 else image
            self.images.append(image)
            converted = self._convert(image.astype(np.float32))
            self.ranges.append((float(converted.min()), float(converted.max())))
        areas = np.array([im.shape[0] * im.shape[1] for im in self.images], dtype=np.float64)
        self.weights = areas / areas.sum()

    def _convert(self, x):
        if self.channels == 1 and x.shape[-1] == 3:
            return x.mean(axis=-1, keepdims=True)
        if self.channels == 3 and x.shape[-1] == 1:
            return np.repeat(x, 3, axis=-1)
        return x

    def normalize(self, k, pixels):
        """uint8 pixels of image ``k`` -> float32 as :func:`normalize_image` would give them."""
        low, high = self.ranges[k]
        return (self._convert(pixels.astype(np.float32)) - low) / max(high - low, 1e-6)

    def window(self, k, top, left, height, width):
        image = self.images[k]
        if 0 <= top and top + height <= image.shape[0] and 0 <= left and left + width <= image.shape[1]:
            return self.normalize(k, image[top:top + height, left:left + width])  # no reflection: a view
        rows = reflect_indices(np.arange(top, top + height), image.shape[0])
        cols = reflect_indices(np.arange(left, left + width), image.shape[1])
        return self.normalize(k, image[rows][:, cols])

    def random_corner(self, rng, k, height, width):
        """(top, left) of a random window; 0 where the image is smaller than the window."""
        shape = self.images[k].shape
        top = int(rng.integers(shape[0] - height + 1)) if shape[0] >= height else 0
        left = int(rng.integers(shape[1] - width + 1)) if shape[1] >= width else 0
        return top, left


class SegmentationDataset(_SeededBatches):
    """Random ``tile`` x ``tile`` crops of images and their targets, augmented.

    ``target``: "foreground" (default, K=1), "three_class" (K=3 one-hot background/inside/
    boundary), "distance" (K=1, per-instance normalised distance) or a function
    labels -> (H, W, K). Targets are computed on the whole image, then cropped with it.
    Each epoch draws ``steps`` batches (default: about one pass over the pixels).
    Yields x (B, tile, tile, C) float32 in [0, 1] and y (B, tile, tile, K) float32.
    With a rotating/deforming augmenter a larger window is cut and the augmenter crops
    ``tile`` from it, so no reflected corners appear.
    """

    def __init__(self, records, tile=128, batch_size=8, steps=None, channels=3,
                 target=foreground, augmenter=None, seed=0, **kwargs):
        super().__init__(seed, **kwargs)
        if not records:
            raise ValueError("SegmentationDataset needs at least one image")
        target = segmentation_target(target)
        self.tile, self.batch_size = tile, batch_size
        self.augmenter = augmenter
        self.images = [normalize_image(r.image, channels) for r in records]
        self.targets = [target(r.labels) for r in records]
        # Sample images in proportion to their area so big images are not under-used.
        areas = np.array([im.shape[0] * im.shape[1] for im in self.images], dtype=np.float64)
        self.weights = areas / areas.sum()
        self.steps = steps or max(1, int(np.ceil(areas.sum() / (tile * tile * batch_size))))

    def __len__(self):
        return self.steps

    def replace_targets(self, targets):
        """Train on ``targets`` from now on: one (H, W, K) map per image, the shapes of the
        current ones, soft values allowed (Self-Correction's refined labels, training.self_correction).
        The images, the sampling and the records' labels stay as they are."""
        if len(targets) != len(self.targets):
            raise ValueError(f"replace_targets: {len(targets)} targets for {len(self.targets)} images")
        new = []
        for index, (old, target) in enumerate(zip(self.targets, targets)):
            target = np.asarray(target, dtype=np.float32)
            if target.shape != old.shape:
                raise ValueError(f"replace_targets: target {index} has shape {target.shape}, "
                                 f"the image's target has {old.shape}")
            new.append(target)
        self.targets = new

    def __getitem__(self, index):
        rng = self.batch_rng(index)
        window_h, window_w = _window_size(self.augmenter, self.tile)
        crop = None if (window_h, window_w) == (self.tile, self.tile) else (self.tile, self.tile)
        xs, ys = [], []
        for _ in range(self.batch_size):
            k = rng.choice(len(self.images), p=self.weights)
            image = _pad_to(self.images[k], window_h, window_w)
            target = _pad_to(self.targets[k], window_h, window_w)
            top = int(rng.integers(image.shape[0] - window_h + 1))
            left = int(rng.integers(image.shape[1] - window_w + 1))
            window = np.s_[top:top + window_h, left:left + window_w]
            x, y = image[window], target[window]
            if self.augmenter is not None:
                if crop is None:
                    x, (y,) = self.augmenter(rng, x, [y])
                else:
                    x, (y,) = self.augmenter(rng, x, [y], crop=crop)
            xs.append(x)
            ys.append(y)
        return np.stack(xs), np.stack(ys)


def record_points(record):
    """(K, 2) float64 (x, y) nucleus centres of a record: its points, else its label centroids."""
    if record.points is not None:
        return np.asarray(record.points, dtype=np.float64).reshape(-1, 2)
    if record.labels is not None:
        return instance_centroids(record.labels)[0]
    raise ValueError(f"{record.name}: has neither points nor labels to detect")


class DetectionDataset(_SeededBatches):
    """Random ``tile`` crops with a density map of the nucleus centres (UD-Net style).

    Points come from ``record.points`` (or the centroids of ``record.labels``). The
    density map is made AFTER the points are augmented, so maps and points stay aligned
    under any geometric transform; points just outside the crop still add their tails.
    Yields x (B, tile, tile, C) float32 in [0, 1] and y (B, tile, tile, 1) float32 whose
    isolated peaks are 1 (see :func:`kerasnuc.data.targets.density_map`).
    """

    def __init__(self, records, tile=128, batch_size=8, sigma=2.0, radius=0, steps=None, channels=3,
                 augmenter=None, seed=0, **kwargs):
        super().__init__(seed, **kwargs)
        if not records:
            raise ValueError("DetectionDataset needs at least one image")
        self.tile, self.batch_size, self.sigma, self.radius = tile, batch_size, float(sigma), int(radius or 0)
        self.augmenter = augmenter
        self.sampler = _ImageSampler([r.image for r in records], channels)
        self.points = [record_points(r) for r in records]
        # Points further out than this add nothing visible (< exp(-8)) to the crop.
        self.margin = int(np.ceil(4.0 * self.sigma)) + self.radius + 1
        areas = np.array([im.shape[0] * im.shape[1] for im in self.sampler.images], dtype=np.float64)
        self.steps = steps or max(1, int(np.ceil(areas.sum() / (tile * tile * batch_size))))

    def __len__(self):
        return self.steps

    def sample(self, rng):
        """One (x (tile, tile, C), points (N, 2) in crop coordinates, within ``margin`` of it)."""
        window_h, window_w = _window_size(self.augmenter, self.tile)
        k = int(rng.choice(len(self.sampler.images), p=self.sampler.weights))
        top, left = self.sampler.random_corner(rng, k, window_h, window_w)
        x = self.sampler.window(k, top, left, window_h, window_w)
        points = self.points[k] - [left, top]
        if self.augmenter is not None:
            x, _, points, _ = self.augmenter(rng, x, [], points, None, crop=(self.tile, self.tile),
                                             point_margin=self.margin)
        else:
            x = x[:self.tile, :self.tile]
        m = self.margin
        keep = np.all((points >= -0.5 - m) & (points < self.tile - 0.5 + m), axis=1)
        return x, points[keep]

    def density(self, points):
        """Density map (tile, tile, 1) of crop points, including those within ``margin`` outside."""
        m, size = self.margin, self.tile + 2 * self.margin
        canvas = density_map(points + m, (size, size), self.sigma, self.radius)
        return canvas[m:m + self.tile, m:m + self.tile]

    def __getitem__(self, index):
        rng = self.batch_rng(index)
        xs, ys = [], []
        for _ in range(self.batch_size):
            x, points = self.sample(rng)
            xs.append(x)
            ys.append(self.density(points))
        return np.stack(xs), np.stack(ys)


def classified_points(record):
    """((K, 2) (x, y), (K,) int64 classes) of a record's classified nuclei; empty if none.

    ``record.extra["class_points"]`` with ``record.classes`` (CRCHistoPhenotypes keeps its
    detection-only points apart), else ``record.points`` with ``record.classes``.
    """
    points = record.extra.get("class_points") if record.extra else None
    if points is None:
        points = record.points
    if points is None or record.classes is None:
        return np.zeros((0, 2)), np.zeros((0,), dtype=np.int64)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    classes = np.asarray(record.classes, dtype=np.int64).reshape(-1)
    if len(points) != len(classes):
        raise ValueError(f"{record.name}: {len(points)} classified points but {len(classes)} classes")
    return points, classes


def default_patch_augmenter(hed=0.05):
    """Dihedral transforms and HED stain jitter (RGB only); no brightness/contrast."""
    return Augmenter(flip=True, rotate90=True, brightness=0.0, contrast=0.0, hed=hed)


class ClassificationDataset(_SeededBatches):
    """Patches centred on classified nuclei, with their class indices.

    Training (default): each batch draws ``batch_size`` nuclei at random, uniformly
    (``balanced=False``) or class first, then a nucleus of that class (``balanced=True``),
    and augments each patch (``augmenter="default"``: dihedral + HED jitter; None: none;
    or any :class:`Augmenter`: patches are cut with enough context for it and it keeps the
    nucleus centred). ``steps`` defaults to one pass over the nuclei.
    ``evaluation=True``: no augmentation, every nucleus exactly once in record/point order,
    the last batch may be smaller; ``self.classes`` / ``self.sources`` (record index, x, y)
    then line up with the concatenated predictions.
    Yields x (B, patch, patch, C) float32 in [0, 1] and y (B,) int32.
    """

    def __init__(self, records, patch=32, batch_size=32, steps=None, channels=3, augmenter="default",
                 balanced=False, evaluation=False, seed=0, **kwargs):
        super().__init__(seed, **kwargs)
        self.patch, self.batch_size = int(patch), int(batch_size)
        self.balanced, self.evaluation = bool(balanced), bool(evaluation)
        if augmenter == "default":
            augmenter = default_patch_augmenter()
        self.augmenter = None if evaluation else augmenter
        sources, classes = [], []
        for index, record in enumerate(records):
            points, labels = classified_points(record)
            sources += [(index, x, y) for x, y in points]
            classes.append(labels)
        if not sources:
            raise ValueError("ClassificationDataset: no classified points in the records "
                             "(need record.classes with extra['class_points'] or points)")
        self.sources = np.array(sources, dtype=np.float64)  # (N, 3): record index, x, y
        self.classes = np.concatenate(classes).astype(np.int32)
        self.class_ids = np.unique(self.classes)
        self.members = [np.flatnonzero(self.classes == c) for c in self.class_ids]
        self.num_classes = max([int(self.classes.max()) + 1] + [len(r.class_names) for r in records])
        self.sampler = _ImageSampler([r.image for r in records], channels)
        if evaluation:
            self.steps = int(np.ceil(len(self.classes) / self.batch_size))
        else:
            self.steps = steps or max(1, int(np.ceil(len(self.classes) / self.batch_size)))
        self.context = self._context_size()
        self._cut_patches()

    def _context_size(self):
        """Side of the window cut around each nucleus: the patch, or more for a rotating augmenter
        (even margin, so the nucleus stays at the centre when the augmenter crops back)."""
        context = _window_size(self.augmenter, self.patch)[0] if self.augmenter is not None else self.patch
        return context + (context - self.patch) % 2

    def _cut_patches(self):
        """Every nucleus' ``context`` window cut once, raw pixels, per image (N_k, S, S, C_k):
        batches then index arrays instead of cutting patch by patch (issue 18: on a GPU the
        per-patch Python work, not the model, set DCRN's pace). ``_patches(indices)`` equals
        ``np.stack([patch_at(i, context) for i in indices])`` exactly."""
        size = self.context
        self._image_of = self.sources[:, 0].astype(np.int64)
        self._position = np.zeros(len(self._image_of), dtype=np.int64)
        self._cut = []
        offsets = np.arange(size) - size // 2
        for k, image in enumerate(self.sampler.images):
            members = np.flatnonzero(self._image_of == k)
            self._position[members] = np.arange(len(members))
            height, width = image.shape[:2]
            rows, cols, _ = point_pixels(self.sources[members, 1:3], (height, width))
            rows, cols = np.clip(rows, 0, height - 1), np.clip(cols, 0, width - 1)
            r = reflect_indices(rows[:, None] + offsets, height)
            c = reflect_indices(cols[:, None] + offsets, width)
            self._cut.append(image[r[:, :, None], c[:, None, :]])

    def _patches(self, indices):
        """Normalised float32 (B, context, context, C) windows of nuclei ``indices``."""
        indices = np.asarray(indices, dtype=np.int64)
        images = self._image_of[indices]
        out = None
        for k in np.unique(images):  # one normalisation per image, as patch_at's
            where = np.flatnonzero(images == k)
            part = self.sampler.normalize(int(k), self._cut[k][self._position[indices[where]]])
            if out is None:
                out = np.empty((len(indices),) + part.shape[1:], dtype=part.dtype)
            out[where] = part
        return out

    def __len__(self):
        return self.steps

    def _choose(self, rng):
        if not self.balanced:
            return rng.integers(len(self.classes), size=self.batch_size)
        chosen_classes = rng.integers(len(self.class_ids), size=self.batch_size)
        return np.array([self.members[c][rng.integers(len(self.members[c]))] for c in chosen_classes])

    def patch_at(self, i, size=None):
        """Normalised (size, size, C) float32 patch centred on nucleus ``i`` (mirror-reflected at borders)."""
        size = self.patch if size is None else size
        k, x, y = int(self.sources[i, 0]), self.sources[i, 1], self.sources[i, 2]
        height, width = self.sampler.images[k].shape[:2]
        rows, cols, _ = point_pixels([[x, y]], (height, width))
        row, col = int(np.clip(rows[0], 0, height - 1)), int(np.clip(cols[0], 0, width - 1))
        return self.sampler.window(k, row - size // 2, col - size // 2, size, size)

    def __getitem__(self, index):
        if self.evaluation:
            chosen = np.arange(index * self.batch_size, min((index + 1) * self.batch_size, len(self.classes)))
            return self._patches(chosen), self.classes[chosen]
        rng = self.batch_rng(index)
        chosen = np.asarray(self._choose(rng))
        x = self._patches(chosen)
        if self.augmenter is not None:
            x = self.augmenter.augment_batch(rng, x, crop=(self.patch, self.patch), crop_center=True)
        return x, self.classes[chosen]
