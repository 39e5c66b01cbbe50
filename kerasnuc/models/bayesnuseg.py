"""BayesNuSeg (Gudhe et al., BMC Medical Imaging 2023): one Bayesian encoder, two decoders.

Encoder: ``depth`` residual conv blocks with BatchNorm and SELU
(:func:`~kerasnuc.models.blocks.residual_selu_block`), 2x2 max-pooling between them, and
:class:`~kerasnuc.models.layers.MCDropout` (rate ``dropout``, on at inference) after every
block from the second on, so ``models.is_stochastic`` is True and the prediction engine
averages Monte-Carlo passes (mean map + predictive variance). Two independent decoders
with transposed convolutions and U-Net skips from the shared encoder:

* seed branch: a sigmoid "seediness" map per class (high at the pixels whose embedding
  lands near their nucleus' centre, 0 on background);
* instance branch (Neven et al., CVPR 2019): 2 offset channels and 1 sigma channel.

ONE float32 output of ``classes + 3`` channels ``[seed..., offset_y, offset_x, sigma]``,
all in [0, 1] (so the shared segmentation checks, which want [0, 1] maps, hold, and an
int8 export quantises every channel with one scale):

* offsets are tanh-parametrised and stored as ``(tanh(a) + 1) / 2 = sigmoid(2a)``; the
  loss and the clustering read ``offset = 2 * o - 1`` (in [-1, 1]) in embedding units of
  ``offset_scale`` pixels (:mod:`kerasnuc.losses_embedding`);
* sigma is ``sigmoid`` (bounded, in the same embedding units): the Gaussian bandwidth.

Pixel coordinates are added in the loss and in the clustering
(:mod:`kerasnuc.postprocess.embedding`), not in the graph: the output depends only on the
image content, never on where a tile sits, so tiled and block-wise prediction stitch.
The network down-samples ``depth - 1`` times: inputs must be multiples of ``2**(depth-1)``
(runs record ``2**depth``, which is a multiple of it).
"""

import keras
from keras import layers

from kerasnuc.models._checks import check_input_shape
from kerasnuc.models.blocks import conv_bn_act, model_input, residual_selu_block
from kerasnuc.models.layers import MCDropout


def build_bayesnuseg(input_shape=(None, None, 3), filters=32, depth=5, classes=1, dropout=0.5,
                     name="bayesnuseg"):
    """BayesNuSeg with ``filters * 2**level`` channels at encoder level ``level`` (0..depth-1)."""
    if depth < 2:
        raise ValueError(f"bayesnuseg: depth must be at least 2 (one down-sampling), got {depth}")
    check_input_shape(input_shape, depth - 1, "bayesnuseg")
    if not 0.0 < dropout < 1.0:
        raise ValueError(f"bayesnuseg: dropout must be in (0, 1) for Monte-Carlo sampling, got {dropout}")
    if int(classes) < 1:
        raise ValueError(f"bayesnuseg: classes must be at least 1, got {classes}")
    inputs = model_input(input_shape)
    x, skips = inputs, []
    for level in range(depth):
        if level:
            x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
        x = residual_selu_block(x, filters * 2 ** level, f"enc{level}")
        if level:
            x = MCDropout(dropout, name=f"enc{level}_mcdropout")(x)
        skips.append(x)
    seed = _decoder(x, skips, filters, depth, "seed")
    instance = _decoder(x, skips, filters, depth, "inst")
    seed = layers.Conv2D(int(classes), 1, activation="sigmoid", dtype="float32", name="seed")(seed)
    offsets = layers.Conv2D(2, 1, activation="sigmoid", dtype="float32", name="offsets")(instance)
    sigma = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="sigma")(instance)
    outputs = layers.Concatenate(dtype="float32", name="output")([seed, offsets, sigma])
    return keras.Model(inputs, outputs, name=name)


def _decoder(x, skips, filters, depth, prefix):
    """Transposed-conv up-sampling with the encoder's skips, two SELU conv units per level."""
    for level in reversed(range(depth - 1)):
        x = layers.Conv2DTranspose(filters * 2 ** level, 3, strides=2, padding="same",
                                   name=f"{prefix}{level}_up")(x)
        x = layers.Concatenate(name=f"{prefix}{level}_cat")([x, skips[level]])
        x = conv_bn_act(x, filters * 2 ** level, f"{prefix}{level}_a", activation="selu")
        x = conv_bn_act(x, filters * 2 ** level, f"{prefix}{level}_b", activation="selu")
    return x
