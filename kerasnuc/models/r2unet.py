"""R2U-Net (Alom et al. 2018) and UD-Net, its density-regression variant for detection.

Each U-Net stage is a recurrent residual conv unit (RRCU) with ``steps`` recurrent
steps. The defaults are the nuclei configuration of the papers as far as they state it:
about 1.0 M parameters (R2U-Net t=2 for segmentation; UD-Net t=3 with a linear
1-channel head that regresses Gaussian density maps whose peaks are nucleus
centres). The papers do not give the widths; 22 base filters over depth 3 is the
width that reproduces their parameter counts with this RRCU.
"""

import keras
from keras import layers

from kerasnuc.models._checks import check_input_shape, head_activation
from kerasnuc.models.blocks import model_input, output_head, recurrent_residual_unit


def build_r2unet(input_shape=(None, None, 3), filters=22, depth=3, steps=2, out_channels=1,
                 activation="auto", name="r2unet"):
    """Recurrent residual U-Net; output (B, H, W, out_channels) float32."""
    check_input_shape(input_shape, depth, name)
    inputs = model_input(input_shape)
    x, skips = inputs, []
    for level in range(depth):
        x = recurrent_residual_unit(x, filters * 2 ** level, steps, f"enc{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    x = recurrent_residual_unit(x, filters * 2 ** depth, steps, "bottleneck")
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(filters * 2 ** level, 2, strides=2, padding="same",
                                   name=f"dec{level}_up")(x)
        x = layers.Concatenate(name=f"dec{level}_cat")([x, skips[level]])
        x = recurrent_residual_unit(x, filters * 2 ** level, steps, f"dec{level}")
    outputs = output_head(x, out_channels, head_activation(out_channels, activation))
    return keras.Model(inputs, outputs, name=name)


def build_udnet(input_shape=(None, None, 3), filters=22, depth=3, steps=3, name="udnet"):
    """UD-Net: R2U-Net regressing a 1-channel Gaussian density map (linear output)."""
    return build_r2unet(input_shape, filters=filters, depth=depth, steps=steps,
                        out_channels=1, activation="linear", name=name)
