"""ResNet-50/101 encoder built by hand, with dilated last stages (PSPNet, DeepLab, CE2P).

``keras.applications.ResNet101`` has no dilation, so it cannot give the output stride 8 or 16
that PSPNet and CE2P need. This encoder is the application's network layer for layer (v1
bottlenecks, biases in every conv, BatchNorm epsilon 1.001e-5) with the *same layer names*
(``conv1_conv``, ``conv2_block1_1_conv``, ..., ``conv5_block3_out``), so ImageNet weights saved
from the application load by name (:func:`kerasnuc.models.backbones.load_backbone_weights`);
dilation changes no kernel shape. At ``output_stride=32`` with the 3x3 stem pool it computes
exactly what the application computes.

Lower output strides follow PSPNet / DeepLab: the stage that would halve the resolution gets
stride 1 and every 3x3 conv of it and of the later stages a dilation of 2, then 4
(output_stride 8: conv4 dilation 2, conv5 dilation 4; 16: conv5 dilation 2).
"""

import os

from keras import layers

from kerasnuc.models.backbones import BackboneWeightsError, load_backbone_weights
from kerasnuc.models.blocks import BN_MOMENTUM
from kerasnuc.models.layers import MaxPoolingWithIndices

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
"""Bottleneck blocks in the stages conv2..conv5 (He et al. 2016, Table 1)."""
IMAGENET_WIDTH = 64
"""Base width of the published network; only this width can take ImageNet weights."""
OUTPUT_STRIDES = (8, 16, 32)
STEM_POOLS = ("max3", "indices")


def check_resnet_options(depth, width, output_stride, stem_pool="max3", family="resnet"):
    """One-line errors for options the encoder cannot build."""
    if depth not in BLOCKS:
        raise ValueError(f"{family}: ResNet depth must be 50 or 101, got {depth}")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"{family}: width must be a positive integer (64 is the published ResNet), got {width}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"{family}: output_stride must be 8, 16 or 32, got {output_stride}")
    if stem_pool not in STEM_POOLS:
        raise ValueError(f"{family}: stem_pool must be one of {STEM_POOLS}, got {stem_pool!r}")


def parse_backbone(backbone, family):
    """'resnet50' / 'resnet101' -> 50 / 101, with a clear error for anything else."""
    names = {f"resnet{depth}": depth for depth in BLOCKS}
    if backbone not in names:
        raise ValueError(f"{family}: backbone must be one of {sorted(names)}, got {backbone!r}")
    return names[backbone]


def _bn(name):
    return layers.BatchNormalization(epsilon=1.001e-5, momentum=BN_MOMENTUM, name=name)


def bottleneck(x, filters, name, stride=1, dilation=1, conv_shortcut=False):
    """v1 bottleneck (1x1 -> 3x3 -> 1x1 x4), stride on the first 1x1 as in keras.applications."""
    if conv_shortcut:
        shortcut = layers.Conv2D(4 * filters, 1, strides=stride, name=f"{name}_0_conv")(x)
        shortcut = _bn(f"{name}_0_bn")(shortcut)
    else:
        shortcut = x
    x = layers.Conv2D(filters, 1, strides=stride, name=f"{name}_1_conv")(x)
    x = layers.Activation("relu", name=f"{name}_1_relu")(_bn(f"{name}_1_bn")(x))
    x = layers.Conv2D(filters, 3, padding="same", dilation_rate=dilation, name=f"{name}_2_conv")(x)
    x = layers.Activation("relu", name=f"{name}_2_relu")(_bn(f"{name}_2_bn")(x))
    x = layers.Conv2D(4 * filters, 1, name=f"{name}_3_conv")(x)
    x = _bn(f"{name}_3_bn")(x)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


def stage_strides(output_stride):
    """(stride, dilation) of stages conv2..conv5 for an output stride of 8, 16 or 32."""
    plan, stride, dilation = [(1, 1)], 4, 1  # conv2 follows the stem (stride 4 already)
    for _ in range(3):
        if stride < output_stride:
            plan.append((2, dilation))
            stride *= 2
        else:
            dilation *= 2
            plan.append((1, dilation))
    return plan


def resnet_encoder(inputs, depth=101, width=IMAGENET_WIDTH, output_stride=32, stem_pool="max3"):
    """ResNet features of ``inputs`` (N, H, W, C), H and W multiples of ``output_stride``.

    Returns a dict: ``stem`` (conv1, H/2, ``width`` channels), ``pool`` (H/4), ``conv2``
    (H/4, 4 ``width``), ``conv3`` (H/8, 8 ``width``), ``conv4`` (H/min(16, os)), ``conv5``
    (H/os, 32 ``width``), and ``pool_indices`` when ``stem_pool="indices"``.
    ``stem_pool``: "max3" is ResNet's overlapping 3x3 stride-2 pool; "indices" a 2x2 pool
    that remembers its argmax (:class:`MaxPoolingWithIndices`) for SegNet-style unpooling.
    """
    check_resnet_options(depth, width, output_stride, stem_pool)
    x = layers.ZeroPadding2D(3, name="conv1_pad")(inputs)
    x = layers.Conv2D(width, 7, strides=2, name="conv1_conv")(x)
    stem = layers.Activation("relu", name="conv1_relu")(_bn("conv1_bn")(x))
    features = {"stem": stem}
    if stem_pool == "max3":
        x = layers.ZeroPadding2D(1, name="pool1_pad")(stem)
        x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    else:
        x, features["pool_indices"] = MaxPoolingWithIndices(name="pool1_pool")(stem)
    features["pool"] = x
    for index, (blocks, (stride, dilation)) in enumerate(zip(BLOCKS[depth], stage_strides(output_stride))):
        stage = f"conv{index + 2}"
        filters = width * 2 ** index
        x = bottleneck(x, filters, f"{stage}_block1", stride, dilation, conv_shortcut=True)
        for block in range(2, blocks + 1):
            x = bottleneck(x, filters, f"{stage}_block{block}", dilation=dilation)
        features[stage] = x
    return features


def check_backbone_weights(path, backbone, width, family):
    """Before building: ImageNet weights need the published width and an existing file."""
    if not path:
        return
    if width != IMAGENET_WIDTH:
        raise ValueError(f"{family}: backbone_weights {path}: ImageNet weights exist only for width "
                         f"{IMAGENET_WIDTH} (the published {backbone}), got width {width}")
    if not os.path.isfile(path):
        raise BackboneWeightsError(f"{path}: backbone weights file not found")


def load_resnet_weights(model, path, backbone):
    """Copy a local keras.applications ResNet weights file into ``model`` by layer name."""
    if path:
        load_backbone_weights(model, path, backbone)
    return model
