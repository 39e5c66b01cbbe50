"""Mask R-CNN inference model (He et al. 2017) with NucSeg's nucleus settings.

NucSeg (Jung, Lodhi and Kang 2019): ResNet-101 + FPN, anchors of ratios 1:1, 1:2, 2:1 and box
areas 8^2 ... 128^2 (one per level P2..P6), 1000 proposals, SGD lr 0.001 momentum 0.9.
Choices it leaves open follow Mask R-CNN / the Matterport nucleus configuration: RPN NMS 0.7,
RoIAlign 7x7 (box head, two FC layers of 1024) and 14x14 (mask head, four 3x3 convs of 256,
x2 transposed conv, 28x28 masks), detection NMS 0.3, box deltas scaled by (0.1, 0.1, 0.2, 0.2).

``width`` multiplies every channel count (ResNet base 64, FPN, heads) for CPU budgets; only
``width=1`` takes ImageNet weights. The input is static and square, a multiple of 64 (P6's
stride): the prediction engine tiles images to it. Input "image": float32 in [0, 1]
(kerasnuc's min-max normalisation, applied outside the model as for every family).
Outputs ``boxes`` (B, D, 4) (y1, x1, y2, x2) in input pixels, ``scores`` (B, D) sorted
descending, ``masks`` (B, D, 28, 28) box-relative probabilities; D = ``max_detections``,
padding rows zero. The training-only keywords (``max_instances`` ... ``train_rois``) are
accepted here so that a run's config.json, the dict of this builder's keywords, serves
:func:`.targets.training_targets` and :func:`.trainer.build_trainer` too.
"""

import keras
from keras import layers

from kerasnuc.models.blocks import model_input
from kerasnuc.models.maskrcnn.anchors import LEVEL_STRIDES, check_anchor_options
from kerasnuc.models.maskrcnn.detections import ClassMasks, DetectionLayer
from kerasnuc.models.maskrcnn.fpn import feature_pyramid
from kerasnuc.models.maskrcnn.heads import (box_head, box_head_layers, mask_head, mask_head_layers,
                                            rpn_head)
from kerasnuc.models.maskrcnn.proposals import ProposalLayer
from kerasnuc.models.maskrcnn.roi_align import RoIAlign
from kerasnuc.models.resnet import (IMAGENET_WIDTH, check_backbone_weights, load_resnet_weights,
                                    parse_backbone, resnet_encoder)

INPUT_MULTIPLE = LEVEL_STRIDES[-1]
BOX_POOL = 7
MASK_POOL = 14
FC_UNITS = 1024
MASK_FILTERS = 256


def scaled(channels, width):
    """``channels`` x ``width``, at least 1."""
    return max(1, int(round(channels * width)))


def check_maskrcnn_options(input_shape, width, num_classes, mask_size, max_detections):
    """One-line errors for a configuration the model cannot be built with."""
    if len(input_shape) != 3 or input_shape[0] != input_shape[1] or input_shape[0] is None:
        raise ValueError(f"maskrcnn: input_shape must be a static square (size, size, channels), got {input_shape}")
    if input_shape[0] % INPUT_MULTIPLE:
        raise ValueError(f"maskrcnn: input side {input_shape[0]} must be a multiple of {INPUT_MULTIPLE}")
    if input_shape[2] not in (1, 3):
        raise ValueError(f"maskrcnn: channels must be 1 (grey) or 3 (RGB), got {input_shape[2]}")
    if not width > 0:
        raise ValueError(f"maskrcnn: width must be a positive channel multiplier, got {width}")
    if num_classes < 1 or max_detections < 1:
        raise ValueError(f"maskrcnn: num_classes and max_detections must be >= 1, got {num_classes}, {max_detections}")
    if mask_size != 2 * MASK_POOL:
        raise ValueError(f"maskrcnn: mask_size must be {2 * MASK_POOL} (14x14 RoIAlign, one x2 upsampling), got {mask_size}")


def build_maskrcnn(input_shape=(512, 512, 3), backbone="resnet101", fpn_filters=256,
                   anchor_scales=(8, 16, 32, 64, 128), anchor_ratios=(0.5, 1.0, 2.0),
                   rpn_pre_nms=1000, rpn_post_nms=1000, rpn_nms=0.7, max_detections=256,
                   detection_score=0.05, detection_nms=0.3, mask_size=28, num_classes=1, width=1.0,
                   max_instances=256, gt_mask_size=56, rpn_train_anchors=256, train_rois=128,
                   roi_positive_fraction=0.33, backbone_weights="", name="maskrcnn"):
    """The inference Mask R-CNN (see the module docstring); keywords as a run's config.json stores them.

    ``backbone`` resnet101 (paper) or resnet50; ``rpn_pre_nms`` / ``rpn_post_nms`` anchors
    scored / proposals kept; ``rpn_nms`` / ``detection_nms`` IoU thresholds;
    ``detection_score`` lowest class probability kept; training only: ``max_instances`` nuclei
    per crop, ``gt_mask_size`` side of the box-relative ground-truth masks, ``rpn_train_anchors``
    anchors sampled per image, ``train_rois`` regions sampled per image with
    ``roi_positive_fraction`` positives at most; ``backbone_weights`` a local
    ``keras.applications`` ResNet weights file ("" = random initialisation).
    """
    input_shape = tuple(input_shape)
    check_maskrcnn_options(input_shape, width, num_classes, mask_size, max_detections)
    check_anchor_options(input_shape[0], anchor_scales, anchor_ratios)
    depth = parse_backbone(backbone, "maskrcnn")
    base = scaled(IMAGENET_WIDTH, width)
    check_backbone_weights(backbone_weights, backbone, base, "maskrcnn")
    size = input_shape[0]
    inputs = model_input(input_shape)
    features = resnet_encoder(inputs, depth, base, output_stride=32)
    pyramid = feature_pyramid(features, scaled(fpn_filters, width))
    rpn_logits, rpn_deltas = rpn_head(pyramid, scaled(fpn_filters, width), len(anchor_ratios))
    proposals = ProposalLayer(size, anchor_scales, anchor_ratios, rpn_pre_nms, rpn_post_nms, rpn_nms,
                              name="proposals")([rpn_logits, rpn_deltas])
    pooled = RoIAlign(BOX_POOL, name="roi_align_box")([proposals, *pyramid[:4]])
    class_logits, deltas = box_head(pooled, box_head_layers(scaled(FC_UNITS, width), num_classes), num_classes)
    boxes, scores, class_ids = DetectionLayer(size, max_detections, detection_score, detection_nms,
                                              name="detections")([proposals, class_logits, deltas])
    pooled_masks = RoIAlign(MASK_POOL, name="roi_align_mask")([boxes, *pyramid[:4]])
    mask_logits = mask_head(pooled_masks, mask_head_layers(scaled(MASK_FILTERS, width), num_classes))
    masks = ClassMasks(name="class_masks")([mask_logits, class_ids])
    outputs = [layers.Identity(name=key, dtype="float32")(value)
               for key, value in (("boxes", boxes), ("scores", scores), ("masks", masks))]
    model = keras.Model(inputs, outputs, name=name)
    return load_resnet_weights(model, backbone_weights, backbone)
