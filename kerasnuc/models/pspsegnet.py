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

Input sides must be multiples of 2**depth, by default 32 (the stride of the undilated ResNet),
so one tile size serves every output stride; training and the prediction engine read ``depth``
as the input multiple (a smaller depth down to log2(output_stride) also works).
"""

import keras

from kerasnuc.models._checks import check_input_shape, head_activation
from kerasnuc.models.blocks import conv_bn_act, model_input, output_head
from kerasnuc.models.layers import MaxUnpoolingWithIndices
from kerasnuc.models.psp import BilinearResizeLike, pyramid_pooling
from kerasnuc.models.resnet import IMAGENET_WIDTH, check_resnet_options, parse_backbone, resnet_encoder

ENCODER_DEPTH = 5
"""2x down-samplings of an undilated ResNet (stem conv, stem pool, conv3, conv4, conv5)."""
DECODER_WIDTHS = {16: 512, 8: 512, 4: 256, 2: 128, 1: 64}
"""SegNet decoder width (at width 64) of the stage that ends at each stride."""


def check_depth(depth, output_stride, family):
    """``depth`` only sets the input multiple 2**depth; it must cover the output stride."""
    if not isinstance(depth, int) or 2 ** depth < output_stride:
        raise ValueError(f"{family}: depth {depth} gives an input multiple 2**depth below output_stride "
                         f"{output_stride}; use depth >= {output_stride.bit_length() - 1} (default 5)")


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
                    decoder_filters=None, depth=ENCODER_DEPTH, out_channels=1, activation="auto",
                    backbone_weights="", name="pspsegnet"):
    """PSPSegNet (see the module docstring for every choice).

    ``backbone`` resnet101 (paper) or resnet50; ``width`` the ResNet base width (64 published,
    the only one that takes ImageNet weights); ``output_stride`` 8 (PSPNet), 16 or 32;
    ``decoder_filters`` widths of the decoder stages, deepest first (default SegNet's 512, 256,
    128, 64 scaled by ``width`` / 64); ``depth``: input sides must be multiples of 2**depth
    (default 5, ResNet's 32; at least log2(output_stride)), read by training and the engine;
    ``backbone_weights`` a local ``keras.applications`` ResNet weights file ("" = random init).
    """
    resnet_depth = parse_backbone(backbone, "pspsegnet")
    check_resnet_options(resnet_depth, width, output_stride, family="pspsegnet")
    check_depth(depth, output_stride, "pspsegnet")
    check_input_shape(input_shape, depth, "pspsegnet")
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
    model = keras.Model(inputs, outputs, name=name)
    if backbone_weights:
        from kerasnuc.models.backbones import load_backbone_weights
        from kerasnuc.models.resnet import resnet_application

        load_backbone_weights(model, backbone_weights, resnet_application(backbone, width))
    return model
