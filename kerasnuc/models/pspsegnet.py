"""PSPSegNet: a dilated ResNet-101 SegNet encoder, PSPNet's pyramid pooling, a SegNet decoder.

The MoNuSeg comparison (seed 004, Table III) describes it in one sentence: a ResNet-101 SegNet
encoder, the pyramid pooling module at four scales between encoder and decoder, encoder maps
concatenated with the upsampled pyramid levels, a SegNet decoder. What it leaves open, and
what is chosen here:

* Encoder: :func:`kerasnuc.models.resnet.resnet_encoder` at output stride 8 (PSPNet's setting:
  conv4 dilation 2, conv5 dilation 4), so the pyramid sees an H/8 map; its stem pool is a 2x2
  pool *with indices* (SegNet) instead of ResNet's 3x3 stride-2 pool (no weights, so ImageNet
  weights still load by name).
* Pyramid: bins 1, 2, 3, 6, each a 1x1 conv + BN + ReLU to conv5's channels / 4 (PSPNet),
  upsampled bilinearly and concatenated with the encoder's conv5 map, then PSPNet's 3x3
  conv + BN + ReLU bottleneck to 8 x ``width`` (512) channels.
* Decoder: one stage per factor 2 of the output stride, each an upsampling and two 3x3
  conv + BN + ReLU. The stride-2 convs of ResNet keep no indices, so those stages upsample
  bilinearly by 2 (aligned corners, :class:`BilinearResizeLike`: ``UpSampling2D`` cannot take
  the run-time sizes in a TensorFlow graph); the stage that undoes the stem pool unpools by its indices
  (:class:`MaxUnpoolingWithIndices`), as SegNet does, and the stage before it ends with the
  stem's channel count so the indices fit. No skip concatenation (SegNet has none).
* Head: 1x1 conv in float32, sigmoid (one channel) or softmax.

Input sides must be multiples of 32 (the stride of the undilated ResNet, the family's input
multiple in :mod:`kerasnuc.models.geometry`), so one tile size serves every output stride.
"""

import keras

from kerasnuc.models._checks import check_input_shape, head_activation
from kerasnuc.models.blocks import conv_bn_act, model_input, output_head
from kerasnuc.models.layers import MaxUnpoolingWithIndices
from kerasnuc.models.psp import BilinearResizeLike, pyramid_pooling
from kerasnuc.models.resnet import (IMAGENET_WIDTH, check_backbone_weights, check_resnet_options,
                                    load_resnet_weights, parse_backbone, resnet_encoder)

ENCODER_DEPTH = 5
"""2x down-samplings of an undilated ResNet (stem conv, stem pool, conv3, conv4, conv5): inputs
are multiples of 2**5 = 32, as kerasnuc.models.geometry says."""
DECODER_WIDTHS = {16: 512, 8: 512, 4: 256, 2: 128, 1: 64}
"""SegNet decoder width (at width 64) of the stage that ends at each stride."""


def decoder_plan(output_stride, width, decoder_filters):
    """Filters of the decoder stages, deepest first: one per factor 2 of ``output_stride``."""
    stages = output_stride.bit_length() - 1
    if decoder_filters is None:
        strides = [output_stride >> (k + 1) for k in range(stages)]
        return [max(1, DECODER_WIDTHS[s] * width // IMAGENET_WIDTH) for s in strides]
    decoder_filters = [int(f) for f in decoder_filters]
    if len(decoder_filters) != stages or min(decoder_filters) < 1:
        raise ValueError(f"pspsegnet: decoder_filters needs {stages} positive widths for output_stride "
                         f"{output_stride} (one per decoder stage), got {decoder_filters}")
    return decoder_filters


def build_pspsegnet(input_shape=(None, None, 3), backbone="resnet101", width=64, output_stride=8,
                    decoder_filters=None, out_channels=1, activation="auto",
                    backbone_weights="", name="pspsegnet"):
    """PSPSegNet (see the module docstring for every choice).

    ``backbone`` resnet101 (paper) or resnet50; ``width`` the ResNet base width (64 published,
    the only one that takes ImageNet weights); ``output_stride`` 8 (PSPNet), 16 or 32;
    ``decoder_filters`` widths of the decoder stages, deepest first (default SegNet's 512, 256,
    128, 64 scaled by ``width`` / 64); input sides must be multiples of 32;
    ``backbone_weights`` a local ``keras.applications`` ResNet weights file ("" = random init).
    """
    resnet_depth = parse_backbone(backbone, "pspsegnet")
    check_resnet_options(resnet_depth, width, output_stride, family="pspsegnet")
    check_input_shape(input_shape, ENCODER_DEPTH, "pspsegnet")
    check_backbone_weights(backbone_weights, backbone, width, "pspsegnet")
    widths = decoder_plan(output_stride, width, decoder_filters)
    inputs = model_input(input_shape)
    features = resnet_encoder(inputs, resnet_depth, width, output_stride, stem_pool="indices")
    x = pyramid_pooling(features["conv5"], features["conv5"].shape[-1] // 4, "psp")
    x = conv_bn_act(x, 8 * width, "psp_bottleneck")
    references = {16: features["conv4"], 8: features["conv3"], 4: features["pool"],
                  2: features["stem"], 1: inputs}
    stride = output_stride
    for stage, filters in enumerate(widths):
        stage_name = f"dec{stride}"
        if stride == 4:  # undo the stem pool by its indices, as SegNet does
            x = MaxUnpoolingWithIndices(name=f"{stage_name}_unpool")([x, features["pool_indices"]])
        else:  # bilinear x2, to the size of the encoder map at the next stride
            x = BilinearResizeLike(name=f"{stage_name}_up")([x, references[stride // 2]])
        stride //= 2
        x = conv_bn_act(x, filters, f"{stage_name}_a")
        # the stage ending at stride 4 feeds the unpooling: it must have the stem's channels
        x = conv_bn_act(x, width if stride == 4 else filters, f"{stage_name}_b")
    outputs = output_head(x, out_channels, head_activation(out_channels, activation))
    return load_resnet_weights(keras.Model(inputs, outputs, name=name), backbone_weights, backbone)
