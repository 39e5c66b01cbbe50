"""From refined regions to the model's fixed-size outputs: boxes, scores, class masks.

A region's class is its best foreground class, its box the proposal moved by that class's
deltas; regions under ``score_threshold`` are dropped, overlaps suppressed per class (boxes of
different classes are shifted apart so one NMS serves all classes), and the best
``max_detections`` kept in score order. Padding rows are all zero, so downstream code can
count detections as ``scores > 0``.
"""

import keras
from keras import ops

from kerasnuc.models.maskrcnn.boxes import clip_boxes, decode
from kerasnuc.models.maskrcnn.float32 import Float32Layer
from kerasnuc.models.maskrcnn.nms import non_max_suppression


def best_along_last(x):
    """(max, int32 argmax) over the last axis by ``top_k``: Keras' TensorFlow ``argmax`` emits a
    BitwiseAnd that TFLite's builtin ops lack."""
    value, index = ops.top_k(x, 1)
    return value[..., 0], ops.cast(index[..., 0], "int32")


@keras.saving.register_keras_serializable(package="kerasnuc")
class DetectionLayer(Float32Layer):
    """[rois (B, R, 4), class_logits (B, R, K+1), deltas (B, R, K+1, 4)]
    -> boxes (B, D, 4), scores (B, D), class_ids (B, D) int32 (0 for padding)."""

    def __init__(self, image_size, max_detections=256, score_threshold=0.05, nms_threshold=0.3, **kwargs):
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.max_detections = int(max_detections)
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)

    def call(self, inputs):
        rois, logits, deltas = (ops.cast(t, "float32") for t in inputs)
        probs = ops.softmax(logits, axis=-1)[..., 1:]
        scores, class_ids = best_along_last(probs)
        class_ids = class_ids + 1
        chosen = ops.take_along_axis(deltas, class_ids[..., None, None], axis=2)[:, :, 0]
        boxes = clip_boxes(decode(rois, chosen), self.image_size)
        area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
        roi_area = (rois[..., 2] - rois[..., 0]) * (rois[..., 3] - rois[..., 1])
        valid = ops.logical_and(ops.logical_and(scores >= self.score_threshold, area > 0), roi_area > 0)
        shift = ops.cast(class_ids, "float32")[..., None] * (self.image_size + 1.0)
        keep, kept = non_max_suppression(boxes + shift, scores, self.max_detections, self.nms_threshold, valid)
        boxes = ops.take_along_axis(boxes, keep[..., None], axis=1) * kept[..., None]
        scores = ops.take_along_axis(scores, keep, axis=1) * kept
        class_ids = ops.take_along_axis(class_ids, keep, axis=1) * ops.cast(kept, "int32")
        return boxes, scores, class_ids

    def compute_output_shape(self, input_shapes):
        batch = input_shapes[0][0]
        return ((batch, self.max_detections, 4), (batch, self.max_detections), (batch, self.max_detections))

    def compute_output_spec(self, inputs):
        batch = inputs[0].shape[0]
        d = self.max_detections
        return (keras.KerasTensor((batch, d, 4), "float32"), keras.KerasTensor((batch, d), "float32"),
                keras.KerasTensor((batch, d), "int32"))

    def get_config(self):
        return {**super().get_config(), "image_size": self.image_size, "max_detections": self.max_detections,
                "score_threshold": self.score_threshold, "nms_threshold": self.nms_threshold}


@keras.saving.register_keras_serializable(package="kerasnuc")
class ClassMasks(Float32Layer):
    """[mask_logits (B, D, M, M, K), class_ids (B, D)] -> (B, D, M, M) probabilities of each
    detection's own class; 0 on padding rows (class 0)."""

    def call(self, inputs):
        logits, class_ids = inputs
        logits = ops.cast(logits, "float32")
        class_ids = ops.cast(class_ids, "int32")
        channel = ops.maximum(class_ids - 1, 0)[:, :, None, None, None]
        probs = ops.sigmoid(ops.take_along_axis(logits, channel, axis=-1)[..., 0])
        return probs * ops.cast(class_ids > 0, "float32")[:, :, None, None]

    def compute_output_shape(self, input_shapes):
        return tuple(input_shapes[0][:-1])
