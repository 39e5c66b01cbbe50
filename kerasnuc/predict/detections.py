"""Detections -> nuclei: the engine's path for instance models (Mask R-CNN, task "instance").

An instance model takes a fixed (H, W) input and returns, per image, ``boxes`` (D, 4)
(y1, x1, y2, x2) in input pixels, ``scores`` (D,) sorted descending (0 for padding rows) and
``masks`` (D, m, m) box-relative probabilities. An image of any size goes through tiles of
exactly that input size (:class:`kerasnuc.predict.tiling.TilePlan`, overlapping by twice the
metadata's ``tile_margin``); each tile's detections become labels by the one function
:func:`labels_from_detections`, and each nucleus is kept by the one tile responsible for it:
centroid inside the part of the tile the plan gives it (the middle of each overlap), not
touching a tile border inside the image (:func:`kerasnuc.predict.engine.responsible_ids`, the
rule blocks use too). The network runs once per tile (:func:`detect`); thresholds can then be
changed without running it again (:func:`instances_from_tiles`, used by validation tuning).

NumPy and OpenCV only: nothing here imports TensorFlow, Keras or JAX.
"""

from dataclasses import dataclass

import numpy as np

OUTPUTS = ("boxes", "scores", "masks")
DEFAULTS = {"score_threshold": 0.5, "mask_threshold": 0.5, "min_area": 10}


def instance_params(params):
    """The three post-processing values of an instance model: ``params`` (thresholds.json's
    postprocess) over :data:`DEFAULTS`."""
    params = params or {}
    return {key: type(value)(params.get(key, value)) for key, value in DEFAULTS.items()}


def labels_from_detections(boxes, scores, masks, shape, score_threshold=0.5, mask_threshold=0.5, min_area=10):
    """(H, W) int32 instance labels 1..n from one image's detections.

    Detections with a score of at least ``score_threshold`` (and above 0: padding rows are
    all zero) are pasted in descending score order, so a pixel two masks claim goes to the
    higher score. Each mask is resized (OpenCV, bilinear) to its box rounded to whole pixels
    and thresholded at ``mask_threshold``; of what is left after higher-scoring nuclei took
    their pixels only the largest 8-connected piece is kept, and a nucleus of fewer than
    ``min_area`` pixels is dropped. Boxes reaching outside ``shape`` are clipped to it.
    """
    import cv2

    height, width = int(shape[0]), int(shape[1])
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    masks = np.asarray(masks, np.float32)
    if masks.ndim != 3 or not len(boxes) == len(scores) == len(masks):
        raise ValueError(f"labels_from_detections: boxes {boxes.shape}, scores {scores.shape} and masks "
                         f"{masks.shape} must be (D, 4), (D,) and (D, m, m) for the same D")
    labels = np.zeros((height, width), np.int32)
    order = np.argsort(-scores, kind="stable")
    order = order[(scores[order] >= score_threshold) & (scores[order] > 0)]
    next_id = 1
    for index in order:
        y1, x1, y2, x2 = np.round(boxes[index]).astype(np.int64)
        if y2 <= y1 or x2 <= x1:
            continue
        r0, r1, c0, c1 = max(y1, 0), min(y2, height), max(x1, 0), min(x2, width)
        if r1 <= r0 or c1 <= c0:
            continue
        resized = cv2.resize(masks[index], (int(x2 - x1), int(y2 - y1)), interpolation=cv2.INTER_LINEAR)
        if resized.ndim == 1:  # a 1-pixel-high box comes back 1-D
            resized = resized.reshape(int(y2 - y1), int(x2 - x1))
        inside = resized[r0 - y1:r1 - y1, c0 - x1:c1 - x1] >= mask_threshold
        region = labels[r0:r1, c0:c1]
        free = inside & (region == 0)
        if np.count_nonzero(free) < max(int(min_area), 1):
            continue
        count, pieces, stats, _ = cv2.connectedComponentsWithStats(free.astype(np.uint8), connectivity=8)
        largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])) if count > 2 else 1
        if stats[largest, cv2.CC_STAT_AREA] < max(int(min_area), 1):
            continue
        region[pieces == largest] = next_id
        next_id += 1
    return labels


@dataclass
class TileDetections:
    """The network's detections on every tile of one image (what :func:`detect` returns):
    ``plan`` (the TilePlan over the padded image), ``height``/``width`` of the image itself,
    and per tile (in plan order) the non-padding rows of boxes, scores and masks."""

    plan: object
    height: int
    width: int
    boxes: list
    scores: list
    masks: list


def detect(predictor, image, value_range=None, margin=None):
    """:class:`TileDetections` of a uint8 (H, W, C) image, through ``predictor``'s runtime.

    Tiles are the model's static input size (``runtime.static_shape`` or the metadata's
    ``input_size``), cut from the image padded as every family's (reflect to the multiple,
    then to the tile), normalised with the whole image's range (``value_range``)."""
    from kerasnuc.intensity import intensity_range, normalize_with_range
    from kerasnuc.predict.engine import _as_hwc

    if predictor.static_shape is None:
        raise ValueError(f"{getattr(predictor.runtime, 'path', 'model')}: an instance model needs its fixed input "
                         "size (the runtime's static shape or the metadata's input_size) to be tiled to")
    image = _as_hwc(image)
    height, width = image.shape[:2]
    value_range = intensity_range(image, predictor.channels) if value_range is None else tuple(value_range)
    raw = getattr(predictor.runtime, "takes_raw", False)
    x = image if raw else normalize_with_range(image, predictor.channels, value_range)
    plan, pad = predictor.plan_for(height, width, margin=margin)
    padded = pad(x)
    found = TileDetections(plan, height, width, [], [], [])
    for indices in plan.batches(predictor.batch_size):
        tiles = plan.extract(padded, indices)
        outs = predictor.runtime.run_raw(tiles, value_range) if raw else predictor.runtime.run(tiles)
        boxes, scores, masks = split_outputs(outs, getattr(predictor.runtime, "path", "model"))
        for position in range(len(indices)):
            keep = scores[position] > 0
            found.boxes.append(boxes[position][keep])
            found.scores.append(scores[position][keep])
            found.masks.append(masks[position][keep])
    return found


def split_outputs(outs, where="model"):
    """(boxes, scores, masks) float32 of a runtime's outputs: a (boxes, scores, masks)
    sequence or a dict with those keys; ValueError naming ``where`` otherwise."""
    if isinstance(outs, dict):
        missing = [key for key in OUTPUTS if key not in outs]
        if missing:
            raise ValueError(f"{where}: an instance model outputs {', '.join(OUTPUTS)}; missing {missing}")
        outs = [outs[key] for key in OUTPUTS]
    if not isinstance(outs, (list, tuple)) or len(outs) != 3:
        raise ValueError(f"{where}: an instance model outputs three tensors ({', '.join(OUTPUTS)}), "
                         f"got {type(outs).__name__}")
    boxes, scores, masks = (np.asarray(o, np.float32) for o in outs)
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:2] \
            or masks.ndim != 4 or masks.shape[:2] != boxes.shape[:2]:
        raise ValueError(f"{where}: instance outputs must be boxes (N, D, 4), scores (N, D), masks (N, D, m, m); "
                         f"got {boxes.shape}, {scores.shape}, {masks.shape}")
    return boxes, scores, masks


def instances_from_tiles(found, params=None):
    """(height, width) int32 labels 1..n of an image from its :class:`TileDetections`.

    Each tile's labels (:func:`labels_from_detections` with ``params``' thresholds) keep the
    nuclei that tile is responsible for (:func:`kerasnuc.predict.engine.responsible_ids`
    on the tile's share of the plan, cut to the image, and the tile borders inside the image),
    pasted where no earlier tile put a nucleus."""
    from kerasnuc.predict.engine import responsible_ids

    options = instance_params(params)
    plan, height, width = found.plan, found.height, found.width
    th, tw = plan.tile_shape
    labels = np.zeros((height, width), np.int32)
    next_id = 1
    for (top, left, (r0, r1), (c0, c1)), boxes, scores, masks in zip(plan.tiles, found.boxes, found.scores,
                                                                      found.masks):
        r1, c1 = min(r1, height), min(c1, width)
        if r1 <= r0 or c1 <= c0 or not len(scores):
            continue
        local = labels_from_detections(boxes, scores, masks, (th, tw), **options)
        keep, _ = responsible_ids(local, (r0 - top, r1 - top, c0 - left, c1 - left),
                                  touches=(top > 0, top + th < height, left > 0, left + tw < width))
        if not len(keep):
            continue
        remap = np.zeros(int(local.max()) + 1, np.int32)
        remap[keep] = np.arange(next_id, next_id + len(keep), dtype=np.int32)
        next_id += len(keep)
        rows, cols = slice(top, min(top + th, height)), slice(left, min(left + tw, width))
        piece = remap[local[:rows.stop - top, :cols.stop - left]]
        target = labels[rows, cols]
        empty = (piece > 0) & (target == 0)
        target[empty] = piece[empty]
    return _sequential(labels)


def _sequential(labels):
    """Labels renumbered 1..n (a nucleus whose pixels all went to earlier tiles leaves a gap)."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    remap = np.zeros(int(labels.max(initial=0)) + 1, np.int32)
    remap[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return remap[labels]
