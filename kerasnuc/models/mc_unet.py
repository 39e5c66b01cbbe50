"""Bayesian encoder-decoder with Monte-Carlo dropout (uncertainty at inference).

Encoder: residual conv blocks with BatchNorm and SELU; decoder: transposed
convolutions. Dropout layers are :class:`~kerasnuc.models.layers.MCDropout`, which
stay stochastic in ``predict``: run T passes and take the mean (prediction) and the
variance (uncertainty). BatchNorm stays in inference mode.
"""

import keras
from keras import layers

from kerasnuc.models._checks import check_input_shape, head_activation
from kerasnuc.models.blocks import conv_bn_act, model_input, output_head, residual_selu_block
from kerasnuc.models.layers import MCDropout


def build_mc_unet(input_shape=(None, None, 3), filters=16, depth=4, dropout=0.5,
                  out_channels=1, activation="auto", name="mc_unet"):
    """Dropout (rate ``dropout``) after every stage from the second encoder level on."""
    check_input_shape(input_shape, depth, "mc_unet")
    if not 0.0 < dropout < 1.0:
        raise ValueError(f"mc_unet: dropout must be in (0, 1) for Monte-Carlo sampling, got {dropout}")
    inputs = model_input(input_shape)
    x, skips = inputs, []
    for level in range(depth):
        x = residual_selu_block(x, filters * 2 ** level, f"enc{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
        if level:
            x = MCDropout(dropout, name=f"enc{level}_mcdropout")(x)
    x = residual_selu_block(x, filters * 2 ** depth, "bottleneck")
    x = MCDropout(dropout, name="bottleneck_mcdropout")(x)
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(filters * 2 ** level, 3, strides=2, padding="same",
                                   name=f"dec{level}_up")(x)
        x = layers.Concatenate(name=f"dec{level}_cat")([x, skips[level]])
        x = conv_bn_act(x, filters * 2 ** level, f"dec{level}_a", activation="selu")
        x = conv_bn_act(x, filters * 2 ** level, f"dec{level}_b", activation="selu")
        if level:
            x = MCDropout(dropout, name=f"dec{level}_mcdropout")(x)
    outputs = output_head(x, out_channels, head_activation(out_channels, activation))
    return keras.Model(inputs, outputs, name=name)
