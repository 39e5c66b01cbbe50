"""FC-DenseNet, "the one hundred layers tiramisu" (Jegou et al., CVPRW 2017).

A first 3x3 convolution, dense blocks of BN-ReLU-3x3 conv-dropout layers, transition down
(BN-ReLU-1x1 conv-dropout-2x2 max pooling), a bottleneck block and transition up (3x3
transposed convolution, stride 2) with skip concatenation. On the way up only the feature
maps a block *adds* are upsampled (not its input), which keeps the widths linear in depth:
that is what lets the network have 103 layers with 9.4 M parameters.
"""

import keras
from keras import layers

from kerasnuc.models._checks import check_input_shape, head_activation
from kerasnuc.models.blocks import model_input, output_head, plain_dense_layer, transition_block

# variant -> (layers of the 5 down blocks, the bottleneck and the 5 up blocks, growth rate)
VARIANTS = {
    103: ((4, 5, 7, 10, 12, 15, 12, 10, 7, 5, 4), 16),
    67: ((5,) * 11, 16),
    56: ((4,) * 11, 12),
}
TRANSITIONS = 5  # transitions down (and up): sizes are multiples of 2**5


def build_fc_densenet(input_shape=(None, None, 3), variant=103, growth_rate=None, first_filters=48,
                      dropout=0.2, out_channels=1, activation="auto", layers_per_block=None,
                      name="fc_densenet"):
    """FC-DenseNet ``variant`` 103 (default; 9.4 M parameters), 67 (3.5 M) or 56 (1.4 M; paper 1.5 M).

    ``growth_rate`` None: the variant's (16, 16, 12). ``layers_per_block`` overrides the
    variant's layers for small budgets: one number for every block, 6 numbers (the five down
    blocks and the bottleneck; the up path mirrors them) or all 11. Five transitions down, as
    in the paper: input sides must be multiples of 32.
    Conv layers, counted as the paper counts them: first conv + dense layers + one per
    transition down and up + the final 1x1 classifier (103, 67, 56).
    """
    if variant not in VARIANTS:
        raise ValueError(f"fc_densenet: variant must be one of {sorted(VARIANTS)}, got {variant}")
    depth = TRANSITIONS
    check_input_shape(input_shape, depth, "fc_densenet")
    counts = _block_layers(layers_per_block if layers_per_block is not None else VARIANTS[variant][0], depth)
    growth = growth_rate or VARIANTS[variant][1]
    inputs = model_input(input_shape)
    x = layers.Conv2D(first_filters, 3, padding="same", kernel_initializer="he_uniform", name="first_conv")(inputs)
    skips = []
    for level in range(depth):
        x, _ = _dense_block(x, counts[level], growth, dropout, f"down{level + 1}")
        skips.append(x)
        x = _transition_down(x, x.shape[-1], dropout, f"td{level + 1}")
    x, new = _dense_block(x, counts[depth], growth, dropout, "bottleneck")
    for level in range(depth):
        skip = skips[depth - 1 - level]
        x = layers.Conv2DTranspose(growth * counts[depth + level], 3, strides=2, padding="same",
                                   kernel_initializer="he_uniform", name=f"tu{level + 1}")(new)
        x = layers.Concatenate(name=f"tu{level + 1}_cat")([x, skip])
        x, new = _dense_block(x, counts[depth + 1 + level], growth, dropout, f"up{level + 1}")
    outputs = output_head(x, out_channels, head_activation(out_channels, activation))
    return keras.Model(inputs, outputs, name=name)


def _block_layers(layers_per_block, depth):
    """The 2 * depth + 1 block sizes (down, bottleneck, up) from an int or a list."""
    if isinstance(layers_per_block, int):
        counts = (layers_per_block,) * (2 * depth + 1)
    else:
        counts = tuple(int(n) for n in layers_per_block)
        if len(counts) == depth + 1:
            counts = counts + counts[-2::-1]
    if len(counts) != 2 * depth + 1 or min(counts) < 1:
        raise ValueError(f"fc_densenet: layers_per_block must be a positive number, or {depth + 1} or "
                         f"{2 * depth + 1} positive numbers, got {layers_per_block}")
    return counts


def _dense_block(x, num_layers, growth, dropout, name):
    """Returns (input + new maps, the new maps alone): the up path upsamples only the latter."""
    new = []
    for i in range(num_layers):
        layer_name = f"{name}_l{i + 1}"
        h = plain_dense_layer(x, growth, layer_name)
        if dropout:
            h = layers.Dropout(dropout, name=f"{layer_name}_drop")(h)
        new.append(h)
        x = layers.Concatenate(name=f"{layer_name}_cat")([x, h])
    added = new[0] if len(new) == 1 else layers.Concatenate(name=f"{name}_new")(new)
    return x, added


def _transition_down(x, filters, dropout, name):
    x = transition_block(x, filters, name, pool=False)
    if dropout:
        x = layers.Dropout(dropout, name=f"{name}_drop")(x)
    return layers.MaxPooling2D(2, name=f"{name}_pool")(x)
