"""SegNet (Badrinarayanan et al. 2017) with true max-pooling indices.

The encoder remembers where each 2x2 maximum came from; the decoder unpools by
those indices (sparse upsampling) and densifies with convolutions. No plain
upsampling is used anywhere.
"""

import keras

from kerasnuc.models._checks import check_input_shape, head_activation
from kerasnuc.models.blocks import conv_bn_act, model_input, output_head
from kerasnuc.models.layers import MaxPoolingWithIndices, MaxUnpoolingWithIndices


def build_segnet(input_shape=(None, None, 3), filters=32, depth=4, convs_per_stage=2,
                 out_channels=1, activation="auto", name="segnet"):
    """``depth`` encoder stages (filters doubling, capped at 8x) mirrored by the decoder."""
    check_input_shape(input_shape, depth, "segnet")
    inputs = model_input(input_shape)
    widths = [filters * 2 ** min(level, 3) for level in range(depth)]
    x, indices = inputs, []
    for level, width in enumerate(widths):
        for i in range(convs_per_stage):
            x = conv_bn_act(x, width, f"enc{level}_{i}")
        x, idx = MaxPoolingWithIndices(name=f"enc{level}_pool")(x)
        indices.append(idx)
    for level in reversed(range(depth)):
        x = MaxUnpoolingWithIndices(name=f"dec{level}_unpool")([x, indices[level]])
        out_width = widths[level - 1] if level else widths[0]
        for i in range(convs_per_stage):
            width = widths[level] if i < convs_per_stage - 1 else out_width
            x = conv_bn_act(x, width, f"dec{level}_{i}")
    outputs = output_head(x, out_channels, head_activation(out_channels, activation))
    return keras.Model(inputs, outputs, name=name)
