"""CE2P (Ruan et al., AAAI 2019) as Self-Correction (Li et al., SCHP, TPAMI 2020) builds it.

Modules, after SCHP's ``networks/AugmentCE2P.py`` (channel counts at ``width`` 64):

* Backbone: :func:`kerasnuc.models.resnet.resnet_encoder`, ResNet-101 at output stride 16
  (conv5 stride 1, dilation 2).
* Context: PSP module on conv5 (bins 1, 2, 3, 6, 512 channels each), then a 3x3 conv + BN
  bottleneck to 512.
* High-resolution (parsing) module: context 1x1 -> 256, upsampled to conv2 (H/4); conv2 1x1 -> 48;
  concatenated (304) and two 1x1 conv + BN -> 256 (the parsing features).
* Edge module: conv2, conv3, conv4 each 1x1 -> 256 + BN, upsampled to H/4 and concatenated (768).
* Fusion: parsing and edge features concatenated (1024), 1x1 -> 256 + BN, spatial dropout 0.1,
  1x1 -> ``out_channels`` in float32, bilinearly upsampled (aligned corners) to the input size,
  then sigmoid / softmax.

Deviations, all deliberate:

* ONE output, the fused map, so training, the prediction engine and export treat CE2P like every
  segmentation family. CE2P also supervises the parsing map and a 2-class edge map (its edge
  head's 3x3 and 1x1 convs); those heads feed nothing else, so they are not built, and **the edge
  branch is not separately supervised**: its features reach the loss only through the fusion.
  With ``out_channels=3`` (training's three-class target: background, interior, boundary) the
  fused map's boundary channel is a supervised edge map of a kind.
* The Keras ResNet-101 stem (one 7x7 conv) instead of SCHP's deep stem (three 3x3 convs), so
  ``keras.applications`` ImageNet weights load by name.
* ReLU after every BN (SCHP's InPlaceABN uses leaky ReLU, slope 0.01).
* The final upsampling to the input size is part of the model (SCHP upsamples in the loss).

Input sides must be multiples of 32 (ResNet's five stride-2 steps; the family's input multiple in
:mod:`kerasnuc.models.geometry`).
"""

import keras
from keras import layers

from kerasnuc.models._checks import check_input_shape, head_activation
from kerasnuc.models.blocks import conv_bn_act, model_input
from kerasnuc.models.psp import BilinearResizeLike, pyramid_pooling
from kerasnuc.models.pspsegnet import ENCODER_DEPTH
from kerasnuc.models.resnet import (check_backbone_weights, check_resnet_options, load_resnet_weights,
                                    parse_backbone, resnet_encoder)

OUTPUT_STRIDE = 16


def build_ce2p(input_shape=(None, None, 3), backbone="resnet101", width=64, dropout=0.1, out_channels=1,
               activation="auto", backbone_weights="", name="ce2p"):
    """CE2P / SCHP's network with one (fused) output; see the module docstring.

    ``backbone`` resnet101 (SCHP) or resnet50; ``width`` the ResNet base width (64 published, the
    only one that takes ImageNet weights; the heads scale with it); input sides multiples of 32;
    ``dropout`` the fusion's spatial dropout; ``backbone_weights`` a local ``keras.applications``
    ResNet weights file ("" = random initialisation).
    """
    resnet_depth = parse_backbone(backbone, "ce2p")
    check_resnet_options(resnet_depth, width, OUTPUT_STRIDE, family="ce2p")
    check_input_shape(input_shape, ENCODER_DEPTH, "ce2p")
    check_backbone_weights(backbone_weights, backbone, width, "ce2p")
    scale = lambda channels: max(1, channels * width // 64)  # noqa: E731
    inputs = model_input(input_shape)
    features = resnet_encoder(inputs, resnet_depth, width, OUTPUT_STRIDE)
    conv2 = features["conv2"]

    context = pyramid_pooling(features["conv5"], scale(512), "context")
    context = conv_bn_act(context, scale(512), "context_bottleneck")

    high = conv_bn_act(context, scale(256), "parsing_context", kernel_size=1)
    high = BilinearResizeLike(name="parsing_up")([high, conv2])
    low = conv_bn_act(conv2, scale(48), "parsing_low", kernel_size=1)
    parsing = layers.Concatenate(name="parsing_concat")([high, low])
    parsing = conv_bn_act(parsing, scale(256), "parsing_fuse1", kernel_size=1)
    parsing = conv_bn_act(parsing, scale(256), "parsing_fuse2", kernel_size=1)

    edges = []
    for stage in ("conv2", "conv3", "conv4"):
        edge = conv_bn_act(features[stage], scale(256), f"edge_{stage}", kernel_size=1)
        if stage != "conv2":
            edge = BilinearResizeLike(name=f"edge_{stage}_up")([edge, conv2])
        edges.append(edge)
    edge = layers.Concatenate(name="edge_concat")(edges)

    fused = layers.Concatenate(name="fusion_concat")([parsing, edge])
    fused = conv_bn_act(fused, scale(256), "fusion", kernel_size=1)
    if dropout:
        fused = layers.SpatialDropout2D(dropout, name="fusion_dropout")(fused)
    logits = layers.Conv2D(out_channels, 1, dtype="float32", name="fusion_logits")(fused)
    logits = BilinearResizeLike(dtype="float32", name="fusion_up")([logits, inputs])
    outputs = layers.Activation(head_activation(out_channels, activation), dtype="float32",
                                name="output")(logits)
    return load_resnet_weights(keras.Model(inputs, outputs, name=name), backbone_weights, backbone)
