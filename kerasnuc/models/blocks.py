"""Building blocks shared by the model families (one place, reused, never copied).

Every block is a function ``block(x, ..., name) -> tensor`` over Keras functional
tensors; layers are named so that saved models stay readable.
"""

import keras
from keras import layers

# Moving-average momentum of every BatchNorm (Keras' default is 0.99; PyTorch's 0.1 is 0.9
# here). Why: with 0.99 the inference statistics trail the weights by ~100 steps, so short
# (CPU-budget, fine-tuning) runs validate and predict with stale statistics.
BN_MOMENTUM = 0.9


def norm_layer(name):
    """The BatchNormalization layer every model uses (momentum ``BN_MOMENTUM``)."""
    return layers.BatchNormalization(momentum=BN_MOMENTUM, name=name)


def conv_bn_act(x, filters, name, kernel_size=3, activation="relu", batch_norm=True):
    """Conv -> (BatchNorm) -> activation, the unit of U-Net and SegNet."""
    x = layers.Conv2D(filters, kernel_size, padding="same", use_bias=not batch_norm,
                      kernel_initializer="he_normal", name=f"{name}_conv")(x)
    if batch_norm:
        x = norm_layer(f"{name}_bn")(x)
    return layers.Activation(activation, name=f"{name}_act")(x)


def double_conv(x, filters, name, batch_norm=True, activation="relu"):
    """Two conv_bn_act units: one U-Net stage."""
    x = conv_bn_act(x, filters, f"{name}_a", batch_norm=batch_norm, activation=activation)
    return conv_bn_act(x, filters, f"{name}_b", batch_norm=batch_norm, activation=activation)


def recurrent_conv(x, filters, steps, name):
    """Recurrent convolutional layer of R2U-Net: ``h <- f(x + h)`` for ``steps`` steps.

    The same conv weights are applied at every step (weight sharing is what makes it
    recurrent); each step has its own BatchNorm. Why: ``x`` and ``x + h`` have different
    statistics, and one shared BatchNorm would average them into moving statistics that
    fit no step, so inference would differ from training (recurrent BN, Cooijmans et al.).
    ``x`` must already have ``filters`` channels.
    """
    conv = layers.Conv2D(filters, 3, padding="same", kernel_initializer="he_normal",
                         name=f"{name}_conv")
    h = layers.Activation("relu", name=f"{name}_act")(norm_layer(f"{name}_bn")(conv(x)))
    for step in range(steps):
        s = conv(layers.Add(name=f"{name}_add{step}")([x, h]))
        h = layers.Activation("relu", name=f"{name}_act{step + 1}")(
            norm_layer(f"{name}_bn{step + 1}")(s))
    return h


def recurrent_residual_unit(x, filters, steps, name):
    """RRCU of R2U-Net: 1x1 projection, two recurrent conv layers, residual sum."""
    x = layers.Conv2D(filters, 1, padding="same", name=f"{name}_proj")(x)
    h = recurrent_conv(x, filters, steps, f"{name}_rcl1")
    h = recurrent_conv(h, filters, steps, f"{name}_rcl2")
    return layers.Add(name=f"{name}_residual")([x, h])


def recurrent_dense_layer(x, growth, steps, name):
    """Recurrent conv layer inside a DCRN dense block (Liang and Hu's RCL).

    A feed-forward 3x3 conv brings the concatenated features to ``growth`` channels;
    a separate recurrent 3x3 conv, shared over ``steps``, refines them:
    ``h_t = relu(bn_t(ff(x) + rec(h_{t-1})))``.
    """
    x = norm_layer(f"{name}_pre_bn")(x)
    x = layers.Activation("relu", name=f"{name}_pre_act")(x)
    feed = layers.Conv2D(growth, 3, padding="same", use_bias=False,
                         kernel_initializer="he_normal", name=f"{name}_ff")(x)
    rec = layers.Conv2D(growth, 3, padding="same", use_bias=False,
                        kernel_initializer="he_normal", name=f"{name}_rec")
    h = layers.Activation("relu", name=f"{name}_act0")(
        norm_layer(f"{name}_bn0")(feed))
    for step in range(1, steps + 1):
        s = layers.Add(name=f"{name}_add{step}")([feed, rec(h)])
        h = layers.Activation("relu", name=f"{name}_act{step}")(
            norm_layer(f"{name}_bn{step}")(s))
    return h


def plain_dense_layer(x, growth, name):
    """DenseNet layer: BN -> ReLU -> 3x3 conv to ``growth`` channels."""
    x = norm_layer(f"{name}_bn")(x)
    x = layers.Activation("relu", name=f"{name}_act")(x)
    return layers.Conv2D(growth, 3, padding="same", use_bias=False,
                         kernel_initializer="he_normal", name=f"{name}_conv")(x)


def dense_block(x, num_layers, growth, name, recurrent_steps=0):
    """Dense block: every layer sees the concatenation of all earlier outputs."""
    for i in range(num_layers):
        layer_name = f"{name}_l{i + 1}"
        if recurrent_steps:
            new = recurrent_dense_layer(x, growth, recurrent_steps, layer_name)
        else:
            new = plain_dense_layer(x, growth, layer_name)
        x = layers.Concatenate(name=f"{layer_name}_cat")([x, new])
    return x


def transition_block(x, filters, name, pool=True):
    """DenseNet transition: BN -> ReLU -> 1x1 conv -> 2x2 average pooling."""
    x = norm_layer(f"{name}_bn")(x)
    x = layers.Activation("relu", name=f"{name}_act")(x)
    x = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_conv")(x)
    if pool:
        x = layers.AveragePooling2D(2, name=f"{name}_pool")(x)
    return x


def residual_selu_block(x, filters, name):
    """Residual conv block with BatchNorm and SELU (encoder of the MC-dropout model)."""
    shortcut = x
    if x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, padding="same", name=f"{name}_shortcut")(x)
    h = layers.Conv2D(filters, 3, padding="same", kernel_initializer="lecun_normal",
                      name=f"{name}_conv1")(x)
    h = norm_layer(f"{name}_bn1")(h)
    h = layers.Activation("selu", name=f"{name}_act1")(h)
    h = layers.Conv2D(filters, 3, padding="same", kernel_initializer="lecun_normal",
                      name=f"{name}_conv2")(h)
    h = norm_layer(f"{name}_bn2")(h)
    h = layers.Add(name=f"{name}_add")([shortcut, h])
    return layers.Activation("selu", name=f"{name}_act2")(h)


def output_head(x, channels, activation, name="output"):
    """1x1 conv head computed in float32, so mixed-precision models emit float32."""
    return layers.Conv2D(channels, 1, activation=activation, dtype="float32", name=name)(x)


def model_input(input_shape, name="image"):
    """Named input: the name becomes the SavedModel signature key."""
    return keras.Input(shape=tuple(input_shape), name=name)
