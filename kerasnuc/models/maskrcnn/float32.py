"""Base of the Mask R-CNN layers that must compute in float32 under any dtype policy.

Under ``mixed_float16`` Keras casts a layer's float inputs to float16, whose 11-bit mantissa
puts box coordinates of a 512-pixel tile on a 0.25-pixel grid and makes IoU, NMS, delta
decoding and the losses inexact. These layers therefore default to the float32 policy; the
convolutions and dense layers around them keep the run's policy.
"""

import keras


class Float32Layer(keras.layers.Layer):
    """A Layer whose dtype policy is float32 unless one is given explicitly."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
