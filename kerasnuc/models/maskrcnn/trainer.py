"""The training graph of a Mask R-CNN inference model: same layers, sampled targets, five losses.

``build_trainer(model, **config)`` reuses the inference model's backbone, FPN and RPN through
a sub-model of its own tensors (``fpn_p2`` ... ``fpn_p5``, ``rpn_logits``, ``rpn_deltas``) and
its head layers by name, so training it trains the model that is saved and exported. Inputs:
"image" and :data:`.targets.TARGET_KEYS`; output: the (B, 5) losses. ``compile`` it with an
optimizer only: the loss is the sum of the five, and each is reported under its name.
"""

import keras
from keras import ops

from kerasnuc.models.maskrcnn.config import resolve_config
from kerasnuc.models.maskrcnn.heads import BOX_HEAD, MASK_HEAD, box_head, mask_head, shared_layers
from kerasnuc.models.maskrcnn.losses import LOSS_NAMES, MaskRCNNLosses
from kerasnuc.models.maskrcnn.model import BOX_POOL, MASK_POOL
from kerasnuc.models.maskrcnn.proposals import ProposalLayer
from kerasnuc.models.maskrcnn.roi_align import RoIAlign
from kerasnuc.models.maskrcnn.sampling import RegionSampler

FEATURES = ("fpn_p2", "fpn_p3", "fpn_p4", "fpn_p5", "rpn_logits", "rpn_deltas")


class MaskRCNNTrainer(keras.Model):
    """Functional model whose output is the losses; loss = their sum, metrics = each of them."""

    def __init__(self, inputs, outputs, **kwargs):
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.loss_trackers = [keras.metrics.Mean(name=name) for name in LOSS_NAMES]

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return ops.sum(ops.mean(ops.cast(y_pred, "float32"), axis=0))

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        values = ops.mean(ops.cast(y_pred, "float32"), axis=0)
        for k, tracker in enumerate(self.loss_trackers):
            tracker.update_state(values[k])
        return self.get_metrics_result()


def target_inputs(config):
    """keras.Input of "image" and of each training target, shaped as training_targets makes them."""
    from kerasnuc.models.maskrcnn.anchors import anchor_count

    size, _, channels = config["input_shape"]
    g, m = config["max_instances"], config["gt_mask_size"]
    anchors = anchor_count(size, config["anchor_ratios"])
    shapes = {"image": ((size, size, channels), "float32"), "gt_boxes": ((g, 4), "float32"),
              "gt_class_ids": ((g,), "int32"), "gt_masks": ((g, m, m), "float32"),
              "rpn_match": ((anchors,), "int32"), "rpn_deltas": ((anchors, 4), "float32")}
    return {key: keras.Input(shape=shape, dtype=dtype, name=key) for key, (shape, dtype) in shapes.items()}


def build_trainer(model, seed=None, **config):
    """Training model of the inference ``model`` built by ``build_maskrcnn(**config)``.

    ``config`` is the builder's keyword dict (a run's ``model_config``; missing keys take the
    builder's defaults and must match how ``model`` was built); ``seed`` seeds region sampling.
    """
    config = resolve_config(config)
    if tuple(model.input.shape[1:]) != config["input_shape"]:
        raise ValueError(f"maskrcnn build_trainer: the model's input {tuple(model.input.shape[1:])} differs from "
                         f"the config's input_shape {config['input_shape']}")
    inputs = target_inputs(config)
    try:
        features = keras.Model(model.input, [model.get_layer(n).output for n in FEATURES], name="maskrcnn_features")
    except ValueError as error:
        raise ValueError(f"maskrcnn build_trainer: {model.name} is not a build_maskrcnn model ({error})") from None
    p2, p3, p4, p5, rpn_logits, rpn_deltas = features(inputs["image"])
    pyramid = [p2, p3, p4, p5]
    proposals = ProposalLayer(config["input_shape"][0], config["anchor_scales"], config["anchor_ratios"],
                              config["rpn_pre_nms"], config["rpn_post_nms"], config["rpn_nms"],
                              name="train_proposals")([rpn_logits, rpn_deltas])
    rois, target_class, target_deltas, target_masks, weights = RegionSampler(
        config["train_rois"], config["roi_positive_fraction"], config["mask_size"], seed=seed,
        name="region_sampler")([proposals, inputs["gt_boxes"], inputs["gt_class_ids"], inputs["gt_masks"]])
    num_classes = config["num_classes"]
    pooled = RoIAlign(BOX_POOL, name="train_roi_align_box")([rois, *pyramid])
    class_logits, deltas = box_head(pooled, shared_layers(model, BOX_HEAD), num_classes, tag="_train")
    pooled_masks = RoIAlign(MASK_POOL, name="train_roi_align_mask")([rois, *pyramid])
    mask_logits = mask_head(pooled_masks, shared_layers(model, MASK_HEAD), tag="_train")
    losses = MaskRCNNLosses(name="losses")([
        inputs["rpn_match"], inputs["rpn_deltas"], rpn_logits, rpn_deltas, target_class, weights,
        target_deltas, deltas, class_logits, target_masks, mask_logits])
    return MaskRCNNTrainer(inputs, losses, name=f"{model.name}_trainer")
