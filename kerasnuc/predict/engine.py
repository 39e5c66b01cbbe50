"""The one path from a model to nuclei: normalise, pad, tile, average passes, post-process, measure.

A :class:`Predictor` wraps any runtime (:mod:`kerasnuc.predict.runtimes`) and its metadata.
NumPy, SciPy and scikit-image only: with the LiteRT runtime nothing here imports
TensorFlow, Keras or JAX.

Large images go through :meth:`Predictor.predict_instances` in blocks: each block is
predicted with a context of ``block_overlap`` pixels around it (tiles inside it keep a
margin of at least the receptive radius, and normalise with the whole image's intensity
range), and a nucleus is kept by exactly one block: the one whose core holds its centroid,
provided it does not touch the block's context border (where it may be cut). Ids are
global and the full-size float map never exists.
"""

import numpy as np

from kerasnuc.intensity import intensity_range, normalize_with_range
from kerasnuc.predict.postprocess import instances, points_from_maps
from kerasnuc.predict.tiling import TilePlan, fitting_margin, pad_to_tile, patches_at


class Predictor:
    """A model and its metadata, ready to turn images into maps, points and nuclei."""

    def __init__(self, runtime, meta=None, batch_size=4, block=2048, block_overlap=None):
        self.runtime = runtime
        self.meta = meta if meta is not None else runtime.meta
        self.batch_size = int(batch_size)
        self.block = int(block)
        self.block_overlap = block_overlap
        self.classifier = None

    # -- facts

    @property
    def task(self):
        return self.meta.get("task", "segmentation")

    @property
    def channels(self):
        return int(self.meta["channels"])

    @property
    def multiple(self):
        return max(int(self.meta.get("multiple", 1) or 1), 1)

    @property
    def stochastic(self):
        return bool(self.meta.get("stochastic"))

    def default_samples(self):
        return int(self.meta.get("mc_samples", 10)) if self.stochastic else 1

    def attach_classifier(self, predictor):
        """Classify every detected nucleus with ``predictor`` (a classification model)."""
        if predictor.task != "classification":
            raise ValueError(f"{getattr(predictor.runtime, 'path', 'classifier')}: a {predictor.task} model "
                             "cannot classify nuclei")
        self.classifier = predictor
        return self

    # -- maps

    def plan_for(self, height, width, tile=None, margin=None):
        """(TilePlan, pad function) for an image of (height, width); a static runtime tiles in
        exactly its input shape."""
        multiple = self.multiple
        static = getattr(self.runtime, "static_shape", None)
        if static is not None:
            margin = fitting_margin(static, self.meta.get("tile_margin", 32) if margin is None else margin, multiple)
            shape = [max(-(-size // multiple) * multiple, side) for size, side in zip((height, width), static)]
            plan = TilePlan(shape[0], shape[1], static, margin, multiple)
            return plan, lambda image: pad_to_tile(image, multiple, static)
        tile = self.meta.get("serving_tile", 256) if tile is None else tile
        margin = self.meta.get("tile_margin", 32) if margin is None else margin
        if not tile:
            tile, margin = max(height, width) + multiple, 0
        plan = TilePlan(height, width, tile, margin, multiple)
        return plan, plan.pad

    def _run_tiles(self, plan, padded, value_range=None):
        """Stitched (plan height, plan width, K) map of one pass over the plan's tiles."""
        outs = []
        for indices in plan.batches(self.batch_size):
            tiles = plan.extract(padded, indices)
            if value_range is not None:  # the runtime normalises (TF-Serving graph)
                outs.extend(self.runtime.run_raw(tiles, value_range))
            else:
                outs.extend(self.runtime.run(tiles))
        return plan.stitch(outs)

    def run_tiled(self, x, tile=None, margin=None):
        """(H, W, C) normalised float32 image -> (H, W, K) map stitched from tiles."""
        x = np.asarray(x)
        plan, pad = self.plan_for(x.shape[0], x.shape[1], tile, margin)
        return self._run_tiles(plan, pad(x))[:x.shape[0], :x.shape[1]]

    def predict_maps(self, image, tile=None, margin=None, samples=None, value_range=None):
        """(H, W, C) uint8 image -> ((H, W, K) mean map, (H, W, K) variance or None).

        ``value_range``: the (min, max) that defines the normalisation (default: this image's;
        a block of a larger image passes the whole image's). ``samples``: Monte-Carlo passes
        (default: the metadata's ``mc_samples`` for stochastic models, else 1).
        """
        image = _as_hwc(image)
        height, width = image.shape[:2]
        value_range = intensity_range(image, self.channels) if value_range is None else tuple(value_range)
        plan, pad = self.plan_for(height, width, tile, margin)
        raw = getattr(self.runtime, "takes_raw", False)
        padded = pad(image) if raw else normalize_with_range(pad(image), self.channels, value_range)
        samples = self.default_samples() if samples is None else max(1, int(samples))
        total = total_sq = None
        for _ in range(samples):
            maps = self._run_tiles(plan, padded, value_range if raw else None)[:height, :width].astype(np.float64)
            total = maps if total is None else total + maps
            total_sq = maps ** 2 if total_sq is None else total_sq + maps ** 2
        mean = total / samples
        variance = np.maximum(total_sq / samples - mean ** 2, 0.0) if samples > 1 else None
        return mean.astype(np.float32), None if variance is None else variance.astype(np.float32)

    # -- nuclei

    def classify(self, image, points, batch_size=64, samples=None, value_range=None):
        """(K, classes) probabilities for nuclei at (x, y) ``points`` of a uint8 image."""
        image = _as_hwc(image)
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if len(points) == 0:
            return np.zeros((0, self.meta.get("output_channels", len(self.meta.get("class_names") or [1]))),
                            np.float32)
        value_range = intensity_range(image, self.channels) if value_range is None else tuple(value_range)
        patches = patches_at(image, points, int(self.meta["patch"]))
        raw = getattr(self.runtime, "takes_raw", False)
        if not raw:
            patches = normalize_with_range(patches, self.channels, value_range)
        samples = self.default_samples() if samples is None else max(1, int(samples))
        outs = []
        for start in range(0, len(patches), batch_size):
            chunk = patches[start:start + batch_size]
            runs = [self.runtime.run_raw(chunk, value_range) if raw else self.runtime.run(chunk)
                    for _ in range(samples)]
            outs.append(np.mean(runs, axis=0))
        return np.concatenate(outs).astype(np.float32)

    def predict_points(self, image, tile=None, margin=None, samples=None):
        """(K, 2) (x, y) nucleus centres: density peaks (detection) or instance centroids."""
        if self.task == "classification":
            raise ValueError("a classification model classifies given points; it does not find them")
        maps, _ = self.predict_maps(image, tile, margin, samples)
        return points_from_maps(maps, self.task, self.meta.get("postprocess") or {})

    def predict_instances(self, image, tile=None, margin=None, samples=None, labels_out=None, progress=None):
        """(instance labels (H, W) uint32, nucleus table) of a uint8 image of any size.

        The table is a dict of equal-length columns (:func:`kerasnuc.predict.measure.measure`):
        id, centroid, bounding box, area, perimeter, eccentricity, solidity, mean intensity per
        channel, and class / class probability with an attached classifier, mean uncertainty
        for Monte-Carlo models. ``labels_out``: an (H, W) array to write into (a memmap or a
        zarr array for slides); ``progress(done, total)`` is called after each block.
        """
        from kerasnuc.predict.measure import measure

        if self.task != "segmentation":
            raise ValueError(f"predict_instances needs a segmentation model; this is a {self.task} model "
                             "(use predict_points)")
        image = _as_hwc(image)
        height, width = image.shape[:2]
        value_range = intensity_range(image, self.channels)
        labels = labels_out if labels_out is not None else np.zeros((height, width), np.uint32)
        params = self.meta.get("postprocess") or {}
        blocks = list(block_grid(height, width, self.block, self.multiple))
        overlap = self.overlap()
        tables, next_id = [], 1
        for done, (r0, r1, c0, c1) in enumerate(blocks, 1):
            top, left = _floor_to(max(r0 - overlap, 0), self.multiple), _floor_to(max(c0 - overlap, 0), self.multiple)
            bottom, right = min(r1 + overlap, height), min(c1 + overlap, width)
            crop = image[top:bottom, left:right]
            maps, variance = self.predict_maps(crop, tile, margin, samples, value_range)
            local = instances(maps, params)
            keep = responsible_ids(local, (r0 - top, r1 - top, c0 - left, c1 - left),
                                   touches=(top > 0, bottom < height, left > 0, right < width))
            if len(keep):
                local = np.where(np.isin(local, keep), local, 0)
                table = measure(local, crop, variance=variance, offset=(top, left))
                remap = np.zeros(int(local.max()) + 1, np.uint32)
                remap[table["label"]] = np.arange(next_id, next_id + len(table["label"]), dtype=np.uint32)
                table["id"] = remap[table["label"]]
                if self.classifier is not None:
                    _add_classes(table, self.classifier, crop, value_range, (top, left))
                target = labels[top:bottom, left:right]
                mask = (local > 0) & (np.asarray(target) == 0)
                target = np.asarray(target).copy()
                target[mask] = remap[local[mask]]
                labels[top:bottom, left:right] = target
                next_id += len(table["label"])
                del table["label"]
                tables.append(table)
            if progress is not None:
                progress(done, len(blocks))
        from kerasnuc.predict.measure import concat_tables, empty_table

        table = concat_tables(tables) if tables else empty_table(image.shape[2], self.classifier is not None,
                                                                 self.stochastic)
        return labels, table

    def overlap(self):
        """Context around a block: the tile margin (receptive radius) plus room for a whole nucleus."""
        if self.block_overlap is not None:
            return int(self.block_overlap)
        return int(self.meta.get("tile_margin", 32)) + 64


def _add_classes(table, classifier, crop, value_range, offset):
    points = np.stack([table["centroid_x"] - offset[1], table["centroid_y"] - offset[0]], axis=1)
    probabilities = classifier.classify(crop, points, value_range=None)
    names = classifier.meta.get("class_names") or [f"class_{i}" for i in range(probabilities.shape[-1])]
    index = probabilities.argmax(axis=-1)
    table["class"] = np.asarray([names[i] for i in index], dtype=object)
    table["class_probability"] = probabilities.max(axis=-1)


def block_grid(height, width, block, multiple=1):
    """(r0, r1, c0, c1) cores of blocks of about ``block`` pixels, starting at multiples."""
    block = max(_floor_to(block, multiple), multiple)
    for r0 in range(0, height, block):
        for c0 in range(0, width, block):
            yield r0, min(r0 + block, height), c0, min(c0 + block, width)


def responsible_ids(labels, core, touches):
    """Ids of ``labels`` (a block with context) that this block decides: centroid inside the
    core, and not touching a context border that is inside the image (it may be cut there)."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return ids
    rows, cols = np.nonzero(labels)
    values = labels[rows, cols]
    count = np.bincount(values, minlength=ids.max() + 1)
    cy = np.bincount(values, rows, minlength=ids.max() + 1)[ids] / count[ids]
    cx = np.bincount(values, cols, minlength=ids.max() + 1)[ids] / count[ids]
    r0, r1, c0, c1 = core
    inside = (cy >= r0) & (cy < r1) & (cx >= c0) & (cx < c1)
    cut = np.zeros(ids.max() + 1, bool)
    for side, touching in zip((labels[0], labels[-1], labels[:, 0], labels[:, -1]), touches):
        if touching:
            cut[side[side > 0]] = True
    return ids[inside & ~cut[ids]]


def _floor_to(value, multiple):
    return int(value) // int(multiple) * int(multiple)


def _as_hwc(image):
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {image.shape}")
    return image


def load(source, model_name=None, classifier=None, **options):
    """A :class:`Predictor` for a run folder, a ``.tflite`` export or a TF-Serving ``host:port``
    (with ``model_name``); ``classifier`` (any of those) classifies every nucleus found."""
    from kerasnuc.predict.runtimes import open_runtime

    predictor = Predictor(open_runtime(source, model_name, **options),
                          **{k: v for k, v in options.items() if k in ("batch_size", "block", "block_overlap")})
    if classifier is not None:
        predictor.attach_classifier(classifier if isinstance(classifier, Predictor) else load(classifier))
    return predictor
