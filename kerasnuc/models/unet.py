"""U-Net (Ronneberger et al. 2015) for nucleus segmentation, configurable width and depth."""

import keras
from keras import layers

from kerasnuc.models._checks import check_input_shape, head_activation
from kerasnuc.models.blocks import double_conv, model_input, output_head


def build_unet(input_shape=(None, None, 3), filters=16, depth=4, out_channels=1,
               activation="auto", batch_norm=True, dropout=0.0, name="unet"):
    """Encoder of ``depth`` max-pooled stages, doubling ``filters`` each time; the
    decoder upsamples with transposed convs and concatenates the skip connections.

    Output: (B, H, W, out_channels) float32, sigmoid (1 channel) or softmax.
    """
    check_input_shape(input_shape, depth, "unet")
    inputs = model_input(input_shape)
    x, skips = inputs, []
    for level in range(depth):
        x = double_conv(x, filters * 2 ** level, f"enc{level}", batch_norm=batch_norm)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    x = double_conv(x, filters * 2 ** depth, "bottleneck", batch_norm=batch_norm)
    if dropout:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(filters * 2 ** level, 2, strides=2, padding="same",
                                   name=f"dec{level}_up")(x)
        x = layers.Concatenate(name=f"dec{level}_cat")([x, skips[level]])
        x = double_conv(x, filters * 2 ** level, f"dec{level}", batch_norm=batch_norm)
    outputs = output_head(x, out_channels, head_activation(out_channels, activation))
    return keras.Model(inputs, outputs, name=name)
