"""PSPNet's pyramid pooling module (Zhao et al. 2017) for inputs whose size is known only at run time.

The models are built with ``(None, None, C)`` inputs, so neither the adaptive pooling nor the
upsampling back to the feature map can be fixed layers. Both are separable linear maps whose
matrices are computed from the run-time shape with ``keras.ops`` (integer bin edges, a hat
function for bilinear weights) and applied with two matmuls. That runs on TensorFlow and JAX,
in SavedModel, and in LiteRT at a fixed tile size (the converter folds the matrices into
constants): no gather, no slicing with run-time sizes. See :func:`_apply_separable` for the
dynamic-size LiteRT limit.
"""

import keras
from keras import layers, ops

from kerasnuc.models.blocks import conv_bn_act

PSP_BINS = (1, 2, 3, 6)


def _apply_separable(x, rows, cols):
    """``rows`` (P, H) and ``cols`` (Q, W) applied to x (N, H, W, C) -> (N, P, Q, C).

    Rank-2 matrices (Keras emits a tensordot). Known limits: LiteRT cannot convert that tensordot
    at a dynamic input size (a reshape with two unknown sizes; export with --input-size), and
    the rank-4 broadcasting BatchMatMulV2 that converts made TF's CPU training segfault (CE2P)."""
    x = ops.transpose(x, (0, 3, 2, 1))            # N, C, W, H
    x = ops.matmul(x, ops.transpose(rows))        # N, C, W, P
    x = ops.transpose(x, (0, 1, 3, 2))            # N, C, P, W
    x = ops.matmul(x, ops.transpose(cols))        # N, C, P, Q
    return ops.transpose(x, (0, 2, 3, 1))         # N, P, Q, C


def adaptive_pool_matrix(size, bins, dtype="float32"):
    """(bins, size) averaging matrix with PyTorch's AdaptiveAvgPool bin edges:
    bin i covers floor(i*size/bins) .. ceil((i+1)*size/bins) - 1 (bins overlap when size < bins)."""
    # ``size`` stays as given (a Python int under JAX tracing, a scalar tensor in a TF graph):
    # cast to an array, JAX could not use it as arange's static length inside jit
    index = ops.arange(bins, dtype="int32")[:, None]
    start = ops.floor_divide(index * size, bins)
    end = ops.floor_divide((index + 1) * size + bins - 1, bins)
    position = ops.arange(size, dtype="int32")[None, :]
    inside = ops.cast(ops.logical_and(position >= start, position < end), dtype)
    return inside / ops.cast(end - start, dtype)


def bilinear_matrix(size_out, size_in, dtype="float32"):
    """(size_out, size_in) bilinear interpolation matrix with aligned corners (PSPNet's Interp,
    SCHP's ``align_corners=True``): output i samples input i*(in-1)/(out-1); weights are the
    hat function max(0, 1 - |source - j|)."""
    scale = ops.cast(size_in - 1, "float32") / ops.cast(ops.maximum(size_out - 1, 1), "float32")
    source = ops.cast(ops.arange(size_out, dtype="int32"), "float32")[:, None] * scale
    position = ops.cast(ops.arange(size_in, dtype="int32"), "float32")[None, :]
    return ops.cast(ops.relu(1.0 - ops.abs(source - position)), dtype)


@keras.saving.register_keras_serializable(package="kerasnuc")
class AdaptiveAveragePooling2D(layers.Layer):
    """Average pooling to ``bins x bins`` whatever the input size (PyTorch's AdaptiveAvgPool2d)."""

    def __init__(self, bins, **kwargs):
        super().__init__(**kwargs)
        self.bins = int(bins)

    def call(self, inputs):
        shape = ops.shape(inputs)
        rows = adaptive_pool_matrix(shape[1], self.bins, inputs.dtype)
        cols = adaptive_pool_matrix(shape[2], self.bins, inputs.dtype)
        return _apply_separable(inputs, rows, cols)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.bins, self.bins, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "bins": self.bins}


@keras.saving.register_keras_serializable(package="kerasnuc")
class BilinearResizeLike(layers.Layer):
    """Bilinear resize (aligned corners) of ``inputs[0]`` to the height and width of ``inputs[1]``.

    For upsampling pyramid levels and decoder features to a map whose size is only known at run
    time (``UpSampling2D`` needs a fixed factor, ``Resizing`` a fixed size)."""

    def call(self, inputs):
        x, reference = inputs
        shape, target = ops.shape(x), ops.shape(reference)
        rows = bilinear_matrix(target[1], shape[1], x.dtype)
        cols = bilinear_matrix(target[2], shape[2], x.dtype)
        return _apply_separable(x, rows, cols)

    def compute_output_shape(self, input_shape):
        x, reference = input_shape
        return (x[0], reference[1], reference[2], x[-1])


def pyramid_pooling(x, filters, name, bins=PSP_BINS):
    """PSP module: per bin size an adaptive average pool, 1x1 conv + BN + ReLU to ``filters``,
    bilinear upsampling back to ``x``'s size; the levels are concatenated with ``x`` itself."""
    levels = [x]
    for size in bins:
        level = AdaptiveAveragePooling2D(size, name=f"{name}_pool{size}")(x)
        level = conv_bn_act(level, filters, f"{name}_level{size}", kernel_size=1)
        levels.append(BilinearResizeLike(name=f"{name}_up{size}")([level, x]))
    return layers.Concatenate(name=f"{name}_concat")(levels)
