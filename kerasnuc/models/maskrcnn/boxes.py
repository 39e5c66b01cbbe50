"""Box arithmetic, (y1, x1, y2, x2) in input pixels everywhere in the Mask R-CNN package.

In the graph the IoU and the delta encoding of ``keras.utils.bounding_boxes`` are reused
(``center_yxhw`` deltas divided by ``BOX_STD``, Mask R-CNN's scaling of the regression
targets). The NumPy twins serve :mod:`.targets`, which runs in the data pipeline without a
backend; ``tests/test_maskrcnn_parts.py`` keeps the two equal.
"""

import numpy as np
from keras import ops
from keras.utils import bounding_boxes

BOX_STD = (0.1, 0.1, 0.2, 0.2)
"""Regression targets are divided by these (dy, dx, dh, dw), as in Mask R-CNN."""
MAX_LOG_SCALE = float(np.log(1000.0 / 16.0))
"""Largest |log| height / width change a decoded delta may apply (Detectron's clip): keeps
``exp`` finite for the wild deltas of an untrained network."""


def iou(boxes1, boxes2):
    """Pairwise IoU, (..., N, 4) x (..., M, 4) -> (..., N, M); zero-area boxes give 0."""
    return bounding_boxes.compute_iou(boxes1, boxes2, "yxyx")


def encode(anchors, boxes):
    """Deltas that move ``anchors`` onto ``boxes`` (same leading shape), divided by BOX_STD."""
    return bounding_boxes.encode_box_to_deltas(anchors, boxes, "yxyx", "yxyx", variance=BOX_STD)


def decode(anchors, deltas):
    """Boxes from ``anchors`` moved by ``deltas`` (BOX_STD-scaled), scale changes clipped."""
    deltas = ops.convert_to_tensor(deltas, "float32")
    limit = MAX_LOG_SCALE / np.asarray(BOX_STD[2:], np.float32)
    deltas = ops.concatenate([deltas[..., :2], ops.clip(deltas[..., 2:], -limit, limit)], axis=-1)
    return bounding_boxes.decode_deltas_to_boxes(anchors, deltas, "yxyx", "yxyx", variance=BOX_STD)


def clip_boxes(boxes, size):
    """Clip boxes to the square [0, size] image."""
    return ops.clip(boxes, 0.0, float(size))


def iou_np(boxes1, boxes2):
    """NumPy pairwise IoU (N, 4) x (M, 4) -> (N, M) float32; zero-area boxes give 0."""
    return paired_iou_np(np.asarray(boxes1, np.float32)[:, None, :], np.asarray(boxes2, np.float32)[None, :, :])


def paired_iou_np(a, b):
    """NumPy IoU of boxes ``a`` and ``b`` (..., 4), broadcast against each other; 0 for no union."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    height = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    width = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = height * width
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0).astype(np.float32)


def encode_np(anchors, boxes):
    """NumPy :func:`encode`: (N, 4) anchors and boxes -> (N, 4) BOX_STD-scaled deltas."""
    anchors = np.asarray(anchors, np.float64)
    boxes = np.asarray(boxes, np.float64)
    ah = anchors[:, 2] - anchors[:, 0]
    aw = anchors[:, 3] - anchors[:, 1]
    bh = np.maximum(boxes[:, 2] - boxes[:, 0], 1e-6)
    bw = np.maximum(boxes[:, 3] - boxes[:, 1], 1e-6)
    deltas = np.stack([((boxes[:, 0] + boxes[:, 2]) - (anchors[:, 0] + anchors[:, 2])) / 2 / ah,
                       ((boxes[:, 1] + boxes[:, 3]) - (anchors[:, 1] + anchors[:, 3])) / 2 / aw,
                       np.log(bh / ah), np.log(bw / aw)], axis=-1)
    return (deltas / np.asarray(BOX_STD)).astype(np.float32)
