"""DCRN (densely connected recurrent network) and DenseNet patch classifiers.

Both classify 32x32 patches centred on nuclei into 4 classes (epithelial,
inflammatory, fibroblast, others, as in CRCHistoPhenotypes). DCRN has 4 dense
blocks of 7 recurrent conv layers (growth 12) joined by transition blocks
(BN, 1x1 conv, 2x2 average pooling); ``densenet`` is the same network with plain
conv layers, the paper's baseline. The paper gives DCRN about 1.22 M parameters
but not its stem width; a 128-filter 3x3 stem reproduces that count.
"""

import keras
from keras import layers

from kerasnuc.models.blocks import dense_block, model_input, norm_layer, transition_block


def _check_patch_shape(input_shape, family):
    if len(input_shape) != 3 or input_shape[-1] not in (1, 3):
        raise ValueError(f"{family}: input_shape must be (height, width, 1 or 3), got {input_shape}")
    return tuple(input_shape)


def _dense_classifier(input_shape, num_classes, blocks, layers_per_block, growth,
                      initial_filters, recurrent_steps, dropout, name):
    _check_patch_shape(input_shape, name)
    inputs = model_input(input_shape)
    x = layers.Conv2D(initial_filters, 3, padding="same", use_bias=False,
                      kernel_initializer="he_normal", name="stem_conv")(inputs)
    for b in range(blocks):
        x = dense_block(x, layers_per_block, growth, f"block{b + 1}", recurrent_steps)
        if b < blocks - 1:
            x = transition_block(x, x.shape[-1], f"transition{b + 1}")
    x = norm_layer("final_bn")(x)
    x = layers.Activation("relu", name="final_act")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="output")(x)
    return keras.Model(inputs, outputs, name=name)


def build_dcrn(input_shape=(32, 32, 3), num_classes=4, blocks=4, layers_per_block=7,
               growth=12, initial_filters=128, steps=2, dropout=0.0, name="dcrn"):
    """DCRN: dense blocks whose layers are recurrent conv layers (``steps`` recurrences)."""
    return _dense_classifier(input_shape, num_classes, blocks, layers_per_block, growth,
                             initial_filters, steps, dropout, name)


def build_densenet(input_shape=(32, 32, 3), num_classes=4, blocks=4, layers_per_block=7,
                   growth=12, initial_filters=128, dropout=0.0, name="densenet"):
    """The DCRN layout with plain conv layers (the DenseNet baseline)."""
    return _dense_classifier(input_shape, num_classes, blocks, layers_per_block, growth,
                             initial_filters, 0, dropout, name)
