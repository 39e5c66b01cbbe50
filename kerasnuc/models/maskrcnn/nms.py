"""Exact greedy non-maximum suppression with static shapes, in keras.ops only.

``tf.image.non_max_suppression`` has no keras.ops, JAX or TFLite-builtin twin, so the
suppression is written as the Cluster-NMS iteration (Zheng et al. 2021): with boxes in
score order and ``S[i, j] = IoU(i, j) > t`` for i < j, repeat
``keep[j] = valid[j] and not any_i(keep[i] and S[i, j])`` from ``keep = valid``. Each pass
fixes at least the next undecided box, so it reaches greedy NMS's answer in at most N passes
and usually in a handful; the loop stops when ``keep`` no longer changes. It is a WHILE of
matrix products, which TFLite runs with builtin ops. The result is padded to a fixed size.
"""

from keras import ops

from kerasnuc.models.maskrcnn.boxes import iou


def _suppression_pass(keep, suppressor, valid):
    """One Cluster-NMS pass: a box survives if no kept, higher-scored box overlaps it."""
    hit = ops.max(keep[:, :, None] * suppressor, axis=1)
    return valid * (1.0 - hit)


def non_max_suppression(boxes, scores, max_output, iou_threshold, valid=None):
    """Greedy NMS of each image of a batch.

    Args:
        boxes: (B, N, 4) float32 (y1, x1, y2, x2).
        scores: (B, N) float32; higher first.
        max_output: static number of indices returned per image.
        iou_threshold: a box is dropped when it overlaps a kept, higher-scored box by more.
        valid: optional (B, N) bool/float; invalid boxes are never kept and suppress nothing.

    Returns:
        indices (B, max_output) int32 into N, kept boxes in descending score order, and
        kept (B, max_output) float32, 1 for a real detection and 0 for padding (whose index
        is then meaningless).
    """
    boxes = ops.stop_gradient(ops.cast(boxes, "float32"))
    scores = ops.stop_gradient(ops.cast(scores, "float32"))
    count = boxes.shape[1]
    if valid is None:
        valid = ops.ones_like(scores)
    _, order = ops.top_k(scores, count)
    sorted_boxes = ops.take_along_axis(boxes, order[..., None], axis=1)
    sorted_valid = ops.cast(ops.take_along_axis(ops.cast(valid, "float32"), order, axis=1), "float32")
    upper = ops.triu(ops.ones((count, count), "float32"), k=1)
    suppressor = ops.cast(iou(sorted_boxes, sorted_boxes) > iou_threshold, "float32") * upper[None]

    def changed(keep, previous):
        return ops.any(ops.not_equal(keep, previous))

    def step(keep, previous):
        return _suppression_pass(keep, suppressor, sorted_valid), keep

    first = _suppression_pass(sorted_valid, suppressor, sorted_valid)
    keep, _ = ops.while_loop(changed, step, (first, sorted_valid), maximum_iterations=count)
    # kept boxes first, in score order: rank key count - position, 0 for dropped boxes
    rank = ops.cast(count - ops.arange(count), "float32")[None]
    key, position = ops.top_k(keep * rank, min(max_output, count))
    kept = ops.cast(key > 0, "float32")
    indices = ops.take_along_axis(order, position, axis=1)
    if max_output > count:  # pad to the static size asked for
        pad = max_output - count
        indices = ops.pad(indices, [[0, 0], [0, pad]])
        kept = ops.pad(kept, [[0, 0], [0, pad]])
    return ops.cast(indices, "int32"), kept
