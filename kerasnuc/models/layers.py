"""Custom layers that the model families need, registered for Keras safe-mode loading.

All of them use ``keras.ops`` only, so they run under every Keras backend.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kerasnuc")
class MaxPoolingWithIndices(keras.layers.Layer):
    """2x2 max pooling (stride 2) that also returns where each maximum was.

    SegNet carries these indices to the decoder so that unpooling puts every value
    back at the exact pixel it came from. Returns ``(pooled, indices)``; ``indices``
    is int32 in 0..3, the position inside each 2x2 window (row-major). Inputs must
    have even height and width.
    """

    def call(self, inputs):
        shape = ops.shape(inputs)
        h, w, c = shape[1], shape[2], inputs.shape[-1]
        windows = ops.reshape(inputs, (-1, h // 2, 2, w // 2, 2, c))
        windows = ops.transpose(windows, (0, 1, 3, 5, 2, 4))
        windows = ops.reshape(windows, (-1, h // 2, w // 2, c, 4))
        pooled = ops.max(windows, axis=-1)
        # argmax as "first position equal to the max" (ties: the first, as argmax): Keras'
        # TensorFlow argmax adds a negative-zero check with bitwise ops that LiteRT lacks.
        # Integers throughout, so that an int8 TFLite export keeps exact indices (a float
        # index tensor would be quantised, and its int32 cast would read the raw int8 codes).
        is_max = ops.cast(ops.equal(windows, ops.expand_dims(pooled, -1)), "int32")
        first = ops.max(is_max * ops.convert_to_tensor([4, 3, 2, 1], "int32"), axis=-1)
        indices = 4 - first
        return pooled, indices

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        half = lambda d: None if d is None else d // 2  # noqa: E731
        return (b, half(h), half(w), c), (b, half(h), half(w), c)


@keras.saving.register_keras_serializable(package="kerasnuc")
class MaxUnpoolingWithIndices(keras.layers.Layer):
    """Inverse of :class:`MaxPoolingWithIndices`: scatter values back to their argmax.

    Every other pixel of the 2x upsampled output is zero, as in SegNet.
    """

    def call(self, inputs):
        values, indices = inputs
        shape = ops.shape(values)
        h, w, c = shape[1], shape[2], values.shape[-1]
        # a select, not one_hot(indices) * values: in an int8 TFLite export the one-hot
        # tensor would be quantised and its "1" read as a raw code (outputs 15-70x too large)
        chosen = ops.equal(ops.expand_dims(indices, -1), ops.convert_to_tensor([0, 1, 2, 3], "int32"))
        values = ops.expand_dims(values, -1)
        scattered = ops.where(chosen, values, ops.zeros_like(values))
        scattered = ops.reshape(scattered, (-1, h, w, c, 2, 2))
        scattered = ops.transpose(scattered, (0, 1, 4, 2, 5, 3))
        return ops.reshape(scattered, (-1, h * 2, w * 2, c))

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape[0]
        double = lambda d: None if d is None else d * 2  # noqa: E731
        return (b, double(h), double(w), c)


@keras.saving.register_keras_serializable(package="kerasnuc")
class MCDropout(keras.layers.Dropout):
    """Dropout that stays on at inference, for Monte-Carlo uncertainty.

    ``layers.Dropout(r)(x, training=True)`` is silently switched off by
    ``model.predict`` (see PLATFORM.md); overriding ``call`` keeps it stochastic in
    ``predict``, after reloading, in SavedModel and on every backend, while the rest of
    the model (BatchNorm) still runs in inference mode.
    """

    def call(self, inputs, training=None):
        return super().call(inputs, training=True)
