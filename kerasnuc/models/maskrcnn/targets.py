"""Mask R-CNN training targets from one instance-label crop (NumPy/SciPy/scikit-image only).

Runs in the data pipeline, once per training crop, after augmentation:

* ``gt_boxes`` (max_instances, 4) float32 (y1, x1, y2, x2) in pixels, the tight box of each
  nucleus (pixel (r, c) covers [r, r + 1) x [c, c + 1)); ``gt_class_ids`` (max_instances,)
  int32, 1 for a nucleus and 0 for a padding row; ``gt_masks`` (max_instances, m, m) float32,
  each nucleus's mask resized (bilinear) to ``gt_mask_size`` m over its own box ("mini
  masks": the full-crop masks of 256 nuclei would cost 64 MB at 512 x 512). The graph cuts
  each region's 28 x 28 mask target out of these (:mod:`.sampling`).
  More than ``max_instances`` nuclei: the largest are kept (the rest then count as background).
* ``rpn_match`` (A,) int32 per anchor (:mod:`.anchors`): 1 positive, -1 negative, 0 not
  trained. Positive: IoU >= 0.7 with a nucleus, or the best anchor of a nucleus; negative:
  IoU < 0.3; then at most ``rpn_train_anchors`` are sampled, at most half positive (Faster
  R-CNN). ``rpn_deltas`` (A, 4) float32: the BOX_STD-scaled deltas of positive anchors to
  their nucleus, 0 elsewhere.
"""

import functools

import numpy as np
from scipy import ndimage
from skimage.transform import resize

from kerasnuc.models.maskrcnn.anchors import generate_anchors, overlapping_pairs
from kerasnuc.models.maskrcnn.boxes import encode_np, paired_iou_np
from kerasnuc.models.maskrcnn.config import resolve_config

TARGET_KEYS = ("gt_boxes", "gt_class_ids", "gt_masks", "rpn_match", "rpn_deltas")
"""The arrays :func:`training_targets` returns: the trainer's inputs beside "image"."""
RPN_POSITIVE_IOU = 0.7
RPN_NEGATIVE_IOU = 0.3


@functools.lru_cache(maxsize=8)
def _anchors(size, scales, ratios):
    return generate_anchors(size, scales, ratios)


def instance_boxes_and_masks(labels, max_instances, mask_size):
    """(H, W) labels -> boxes (G, 4), box-relative masks (G, m, m), G <= max_instances, largest first."""
    ids = [i for i in np.unique(labels) if i > 0]
    slices = ndimage.find_objects(labels)
    found = []
    for i in ids:
        rows, cols = slices[i - 1]
        mask = labels[rows, cols] == i
        found.append((int(mask.sum()), (rows.start, cols.start, rows.stop, cols.stop), mask))
    found.sort(key=lambda item: -item[0])
    found = found[:max_instances]
    boxes = np.array([box for _, box, _ in found], np.float32).reshape(-1, 4)
    masks = np.array([resize(mask.astype(np.float32), (mask_size, mask_size), order=1, mode="edge",
                             anti_aliasing=False) for _, _, mask in found], np.float32)
    return boxes, masks.reshape(-1, mask_size, mask_size)


def anchor_matches(anchors, boxes, pairs):
    """Best IoU (A,) and box (A,) of every anchor, and the (anchor, box) pairs where an anchor
    is a box's best (ties included), from the sparse ``pairs`` (:func:`.anchors.overlapping_pairs`).

    Equal to the dense computation: ties go to the lowest box index, as ``argmax`` does.
    """
    anchor, box = pairs
    best = np.zeros(len(anchors), np.float32)
    best_box = np.zeros(len(anchors), np.int64)
    if not len(anchor):
        return best, best_box, (anchor, box)
    overlap = paired_iou_np(anchors[anchor], boxes[box])
    order = np.lexsort((box, -overlap, anchor))  # by anchor, best IoU first, lowest box first
    first = order[np.r_[True, anchor[order][1:] != anchor[order][:-1]]]
    best[anchor[first]] = overlap[first]
    best_box[anchor[first]] = box[first]
    best_box[best <= 0] = 0  # touching only: no match (argmax of an all-zero row)
    top = np.zeros(len(boxes), np.float32)
    np.maximum.at(top, box, overlap)
    tie = (overlap == top[box]) & (top[box] > 0)
    order = np.lexsort((box[tie], anchor[tie]))
    return best, best_box, (anchor[tie][order], box[tie][order])


def rpn_targets(anchors, boxes, train_anchors, rng, pairs):
    """Anchor labels (A,) in {1, -1, 0} and deltas (A, 4) (see the module docstring)."""
    match = np.full(len(anchors), -1, np.int32)
    deltas = np.zeros((len(anchors), 4), np.float32)
    best, best_box, (anchor_of, box_of) = anchor_matches(anchors, boxes, pairs)
    match[best >= RPN_NEGATIVE_IOU] = 0
    match[best >= RPN_POSITIVE_IOU] = 1
    # every nucleus gets its best anchors (ties included), however small it is
    match[anchor_of] = 1
    best_box[anchor_of] = box_of
    positives = np.flatnonzero(match == 1)
    if len(positives) > train_anchors // 2:
        match[rng.choice(positives, len(positives) - train_anchors // 2, replace=False)] = 0
        positives = np.flatnonzero(match == 1)
    negatives = np.flatnonzero(match == -1)
    surplus = len(negatives) - (train_anchors - len(positives))
    if surplus > 0:
        match[rng.choice(negatives, surplus, replace=False)] = 0
    if len(positives):
        deltas[positives] = encode_np(anchors[positives], boxes[best_box[positives]])
    return match, deltas


def training_targets(labels, model_config=None, rng=None):
    """One (S, S) instance-label crop (S the model's input side) -> dict of TARGET_KEYS arrays.

    ``model_config``: the :func:`build_maskrcnn` keywords (a run's config.json ``model_config``);
    ``rng``: a ``numpy.random.Generator`` for the anchor sampling (default: a fresh one).
    """
    config = resolve_config(model_config)
    labels = np.asarray(labels)
    size = config["input_shape"][0]
    if labels.shape != (size, size):
        raise ValueError(f"maskrcnn training_targets: labels of shape {labels.shape} do not match the "
                         f"model input {size} x {size}")
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise ValueError(f"maskrcnn training_targets: labels must be non-negative integer instance ids, "
                         f"got dtype {labels.dtype}")
    rng = rng if rng is not None else np.random.default_rng()
    capacity, mask_size = int(config["max_instances"]), int(config["gt_mask_size"])
    boxes, masks = instance_boxes_and_masks(labels, capacity, mask_size)
    anchors = _anchors(size, tuple(config["anchor_scales"]), tuple(config["anchor_ratios"]))
    pairs = overlapping_pairs(boxes, size, tuple(config["anchor_scales"]), tuple(config["anchor_ratios"]))
    match, deltas = rpn_targets(anchors, boxes, int(config["rpn_train_anchors"]), rng, pairs)
    count = len(boxes)
    gt_boxes = np.zeros((capacity, 4), np.float32)
    gt_boxes[:count] = boxes
    gt_masks = np.zeros((capacity, mask_size, mask_size), np.float32)
    gt_masks[:count] = masks
    gt_class_ids = np.zeros(capacity, np.int32)
    gt_class_ids[:count] = 1
    return {"gt_boxes": gt_boxes, "gt_class_ids": gt_class_ids, "gt_masks": gt_masks,
            "rpn_match": match, "rpn_deltas": deltas}
