"""FCN-8s (Long, Shelhamer and Darrell, CVPR 2015) on a VGG-16 encoder.

The MoNuSeg comparison (seed 004, Table III) trains it as "VGG-16 encoder, 13 conv layers,
5 deconvolutions". The encoder's layers carry ``keras.applications.VGG16``'s names
(``block1_conv1`` ... ``block5_conv3``, ``block1_pool`` ... ``block5_pool``), so ImageNet
weights load from a local file by name (:mod:`kerasnuc.models.backbones`).
"""

import keras
import numpy as np
from keras import layers

from kerasnuc.models._checks import check_input_shape, head_activation
from kerasnuc.models.backbones import load_backbone_weights
from kerasnuc.models.blocks import model_input

VGG16_CONVS = (2, 2, 3, 3, 3)  # 13 convolutions in five blocks
VGG16_WIDTHS = (1, 2, 4, 8, 8)  # x filters


def build_fcn8(input_shape=(None, None, 3), filters=64, fc_filters=4096, out_channels=1,
               activation="auto", backbone_weights="", name="fcn8"):
    """FCN-8s: VGG-16 (``filters`` x (1, 2, 4, 8, 8) wide; 64 is VGG-16), fc6 / fc7 as 7x7
    and 1x1 convolutions of ``fc_filters`` with dropout 0.5, score layers and the FCN-8s
    fusion of the pool4 and pool3 skips.

    The five stride-2 ``Conv2DTranspose`` steps (4x4, bilinear initialisation, learned, no
    bias; ``out_channels`` wide, in logit space as in FCN) map onto FCN-8s like this:
    up1 is FCN's ``upscore2`` (1/32 -> 1/16, then + score_pool4), up2 is ``upscore_pool4``
    (1/16 -> 1/8, then + score_pool3), and up3-up5 replace FCN's single 16x16 stride-8
    ``upscore8`` (1/8 -> 1). The sigmoid / softmax is applied after up5 in float32.

    Deviations from the Caffe model, stated: "same" padding instead of the 100-pixel input
    padding and crop layers, so sides must be multiples of 32 (VGG-16's five poolings; the
    family's input multiple in :mod:`kerasnuc.models.geometry`).

    ``backbone_weights``: path of a local ``keras.applications`` VGG16 weights file (the notop
    ``.h5`` or a ``.weights.h5``), loaded by layer name into the 13 encoder convolutions; needs
    ``filters=64`` and 3 input channels. Empty (default): random initialisation (He normal:
    13 ReLU convolutions without BatchNorm barely move from Keras' Glorot default in a short run).
    """
    check_input_shape(input_shape, len(VGG16_CONVS), "fcn8")
    if backbone_weights and filters != 64:
        raise ValueError(f"fcn8: backbone_weights needs filters=64 (VGG-16's widths), got filters={filters}")
    inputs = model_input(input_shape)
    x, pools = inputs, []
    for block, (convs, width) in enumerate(zip(VGG16_CONVS, VGG16_WIDTHS), start=1):
        for conv in range(1, convs + 1):
            x = layers.Conv2D(filters * width, 3, padding="same", activation="relu",
                              kernel_initializer="he_normal", name=f"block{block}_conv{conv}")(x)
        x = layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)
        pools.append(x)
    x = layers.Conv2D(fc_filters, 7, padding="same", activation="relu", kernel_initializer="he_normal",
                      name="fc6")(x)
    x = layers.Dropout(0.5, name="drop6")(x)
    x = layers.Conv2D(fc_filters, 1, activation="relu", kernel_initializer="he_normal", name="fc7")(x)
    x = layers.Dropout(0.5, name="drop7")(x)
    x = layers.Conv2D(out_channels, 1, name="score_fr")(x)
    for step, pool in enumerate((pools[3], pools[2]), start=1):  # pool4 (1/16), pool3 (1/8)
        x = _upsample(x, out_channels, f"up{step}")
        skip = layers.Conv2D(out_channels, 1, kernel_initializer="zeros",  # FCN zero-initialises these
                             name=f"score_pool{5 - step}")(pool)
        x = layers.Add(name=f"fuse_pool{5 - step}")([x, skip])
    for step in (3, 4, 5):
        x = _upsample(x, out_channels, f"up{step}")
    outputs = layers.Activation(head_activation(out_channels, activation), dtype="float32", name="output")(x)
    model = keras.Model(inputs, outputs, name=name)
    for step in range(1, 6):
        layer = model.get_layer(f"up{step}")
        layer.set_weights([bilinear_kernel(4, out_channels)])
    if backbone_weights:
        load_backbone_weights(model, backbone_weights, "vgg16")
    return model


def _upsample(x, channels, name):
    return layers.Conv2DTranspose(channels, 4, strides=2, padding="same", use_bias=False, name=name)(x)


def bilinear_kernel(size, channels):
    """(size, size, channels, channels) kernel of bilinear 2x upsampling, channel-wise (FCN's
    initialisation of its deconvolutions)."""
    factor = (size + 1) // 2
    centre = factor - 1 if size % 2 else factor - 0.5
    grid = np.arange(size)
    weights_1d = 1 - np.abs(grid - centre) / factor
    kernel = np.zeros((size, size, channels, channels), np.float32)
    for channel in range(channels):
        kernel[:, :, channel, channel] = np.outer(weights_1d, weights_1d)
    return kernel
