"""The five Mask R-CNN losses (keras.ops), each a mean over the items it is defined on.

* ``rpn_class_loss``: binary cross-entropy of the anchors with ``rpn_match`` != 0.
* ``rpn_box_loss``: smooth L1 (Huber, delta 1) of the positive anchors' deltas, mean over
  their coordinates.
* ``class_loss``: softmax cross-entropy of the sampled regions (weight 1).
* ``box_loss``: smooth L1 of the positive regions' deltas of their own class, mean over
  coordinates.
* ``mask_loss``: per-pixel binary cross-entropy of the positive regions' masks of their own
  class, mean over pixels.
A loss with nothing to be defined on (no positive in the batch) is 0.
"""

import keras
from keras import ops

from kerasnuc.models.maskrcnn.float32 import Float32Layer

LOSS_NAMES = ("rpn_class_loss", "rpn_box_loss", "class_loss", "box_loss", "mask_loss")


def smooth_l1(target, prediction):
    """Elementwise Huber loss with delta 1: 0.5 d^2 where |d| < 1, |d| - 0.5 elsewhere."""
    diff = ops.abs(target - prediction)
    return ops.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5)


def masked_mean(values, weights):
    """sum(values * weights) / sum(weights), 0 when the weights are all 0."""
    weights = ops.cast(weights, "float32")
    return ops.sum(values * weights) / ops.maximum(ops.sum(weights), 1.0)


def rpn_class_loss(rpn_match, rpn_logits):
    """(B, A) match in {1, -1, 0}, (B, A) logits."""
    target = ops.cast(rpn_match > 0, "float32")
    values = ops.binary_crossentropy(target, rpn_logits, from_logits=True)
    return masked_mean(values, ops.not_equal(rpn_match, 0))


def rpn_box_loss(rpn_match, target_deltas, rpn_deltas):
    """(B, A) match, (B, A, 4) target and predicted deltas."""
    positive = ops.cast(rpn_match > 0, "float32")[..., None] * ops.ones_like(rpn_deltas)
    return masked_mean(smooth_l1(target_deltas, rpn_deltas), positive)


def class_loss(target_class, class_logits, weights):
    """(B, R) int targets, (B, R, K+1) logits, (B, R) region weights."""
    values = ops.sparse_categorical_crossentropy(target_class, class_logits, from_logits=True)
    return masked_mean(values, weights)


def box_loss(target_class, target_deltas, deltas):
    """(B, R) targets, (B, R, 4) target deltas, (B, R, K+1, 4) predicted per-class deltas."""
    own = ops.take_along_axis(deltas, target_class[..., None, None], axis=2)[:, :, 0]
    positive = ops.cast(target_class > 0, "float32")[..., None] * ops.ones_like(own)
    return masked_mean(smooth_l1(target_deltas, own), positive)


def mask_loss(target_class, target_masks, mask_logits):
    """(B, R) targets, (B, R, M, M) binary targets, (B, R, M, M, K) logits."""
    channel = ops.maximum(target_class - 1, 0)[:, :, None, None, None]
    own = ops.take_along_axis(mask_logits, channel, axis=-1)[..., 0]
    values = ops.binary_crossentropy(target_masks, own, from_logits=True)
    positive = ops.cast(target_class > 0, "float32")[:, :, None, None] * ops.ones_like(values)
    return masked_mean(values, positive)


@keras.saving.register_keras_serializable(package="kerasnuc")
class MaskRCNNLosses(Float32Layer):
    """All five losses of a batch -> (B, 5) (each row the batch's values, in LOSS_NAMES order),
    the trainer's output (a batch axis keeps Keras' output handling usual)."""

    def call(self, inputs):
        (rpn_match, rpn_target_deltas, rpn_logits, rpn_deltas, target_class, weights, target_deltas,
         deltas, class_logits, target_masks, mask_logits) = inputs
        rpn_match = ops.cast(rpn_match, "int32")
        target_class = ops.cast(target_class, "int32")
        f32 = [ops.cast(t, "float32") for t in (rpn_target_deltas, rpn_logits, rpn_deltas, target_deltas,
                                                  deltas, class_logits, target_masks, mask_logits)]
        rpn_target_deltas, rpn_logits, rpn_deltas, target_deltas, deltas, class_logits, target_masks, mask_logits = f32
        values = ops.stack([rpn_class_loss(rpn_match, rpn_logits),
                            rpn_box_loss(rpn_match, rpn_target_deltas, rpn_deltas),
                            class_loss(target_class, class_logits, weights),
                            box_loss(target_class, target_deltas, deltas),
                            mask_loss(target_class, target_masks, mask_logits)])
        return ops.zeros_like(ops.cast(rpn_match[:, :1], "float32")) + values[None]

    def compute_output_shape(self, input_shapes):
        return (input_shapes[0][0], len(LOSS_NAMES))
