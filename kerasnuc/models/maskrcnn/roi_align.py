"""RoIAlign over the FPN levels, written with keras.ops (gathers and bilinear weights).

Keras has no RoIAlign, and ``tf.image.crop_and_resize`` is TensorFlow only. Every level
P2..P5 is flattened into one (sum of B*H*W, C) table; each sample point of a box becomes
four row indices into it and four bilinear weights, so one gather serves all levels and the
op is a plain GATHER for TFLite. Conventions (the same as :mod:`.anchors`): feature cell
(i, j) of stride s covers image pixels [i s, (i + 1) s), its centre is at (i + 0.5) s; a box
is split into ``pool_size`` x ``pool_size`` bins, each sampled at ``sampling_ratio`` x
``sampling_ratio`` evenly spaced points that are averaged (Mask R-CNN: 2 x 2); points outside
the map take the nearest border value.

Level of a box (FPN paper, eq. 1): k = floor(4 + log2(sqrt(h w) / 224)), clipped to 2..5.
"""

import keras
from keras import ops

from kerasnuc.models.maskrcnn.float32 import Float32Layer

ROI_STRIDES = (4, 8, 16, 32)
"""Strides of P2..P5, the levels boxes are pooled from (P6 only feeds the RPN)."""
CANONICAL_SIZE = 224.0
CANONICAL_LEVEL = 4


def box_levels(boxes):
    """(..., 4) boxes in pixels -> (...) int32 index 0..3 of the level (P2..P5) they pool from."""
    height = boxes[..., 2] - boxes[..., 0]
    width = boxes[..., 3] - boxes[..., 1]
    size = ops.sqrt(ops.maximum(height * width, 1e-6))
    level = ops.floor(CANONICAL_LEVEL + ops.log2(size / CANONICAL_SIZE))
    level = ops.clip(level, 2, 2 + len(ROI_STRIDES) - 1)
    return ops.cast(level, "int32") - 2


def bilinear_gather(table, y, x, height, width, offset):
    """Bilinear samples of images stored row-major in ``table``.

    Args:
        table: (M, C) rows of all images, image k's pixel (r, c) at ``offset + r * width + c``.
        y, x: float32 sample coordinates in pixel-index units (pixel centres at integers).
        height, width, offset: int32 tensors broadcastable to ``y``: the size and first row
            of the image each point samples.
    Returns (..., C): the values at (y, x), coordinates clamped into the image.
    """
    hf = ops.cast(height, "float32")
    wf = ops.cast(width, "float32")
    y = ops.clip(y, 0.0, hf - 1.0)
    x = ops.clip(x, 0.0, wf - 1.0)
    y0 = ops.floor(y)
    x0 = ops.floor(x)
    wy = (y - y0)[..., None]
    wx = (x - x0)[..., None]
    y0 = ops.cast(y0, "int32")
    x0 = ops.cast(x0, "int32")
    y1 = ops.minimum(y0 + 1, height - 1)
    x1 = ops.minimum(x0 + 1, width - 1)

    def at(yy, xx):
        return ops.take(table, offset + yy * width + xx, axis=0)

    top = at(y0, x0) * (1.0 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1.0 - wx) + at(y1, x1) * wx
    return top * (1.0 - wy) + bottom * wy


def bin_points(starts, lengths, points):
    """Evenly spaced sample positions (..., points): start + (k + 0.5) * length / points."""
    fractions = (ops.cast(ops.arange(points), "float32") + 0.5) / points
    return starts[..., None] + lengths[..., None] * fractions


@keras.saving.register_keras_serializable(package="kerasnuc")
class RoIAlign(Float32Layer):
    """[boxes (B, R, 4), P2, P3, P4, P5] -> (B, R, pool_size, pool_size, C) float32.

    Boxes are in input pixels (y1, x1, y2, x2) and carry no gradient (as in Mask R-CNN);
    all-zero padding boxes pool from P2 like any tiny box and are masked by the caller.
    """

    def __init__(self, pool_size=7, sampling_ratio=2, **kwargs):
        super().__init__(**kwargs)
        self.pool_size = int(pool_size)
        self.sampling_ratio = int(sampling_ratio)

    def call(self, inputs):
        boxes, *levels = inputs
        if len(levels) != len(ROI_STRIDES):
            raise ValueError(f"RoIAlign {self.name}: expected {len(ROI_STRIDES)} feature maps P2..P5, got {len(levels)}")
        boxes = ops.stop_gradient(ops.cast(boxes, "float32"))
        levels = [ops.cast(level, "float32") for level in levels]
        channels = levels[0].shape[-1]
        batch = ops.shape(levels[0])[0]
        sizes = [(level.shape[1], level.shape[2]) for level in levels]
        table = ops.concatenate([ops.reshape(level, (-1, channels)) for level in levels], axis=0)
        starts, total = [], 0
        for h, w in sizes:
            starts.append(total)
            total += h * w
        level = box_levels(boxes)  # (B, R)
        stride = ops.take(ops.convert_to_tensor(ROI_STRIDES, "float32"), level)
        height = ops.take(ops.convert_to_tensor([h for h, _ in sizes], "int32"), level)
        width = ops.take(ops.convert_to_tensor([w for _, w in sizes], "int32"), level)
        # level l of image b starts at batch * starts[l] + b * h_l * w_l
        image = ops.arange(batch, dtype="int32")[:, None]
        offset = (batch * ops.take(ops.convert_to_tensor(starts, "int32"), level)
                  + image * height * width)
        p, s = self.pool_size, self.sampling_ratio
        # all p*s x p*s sample points in one gather, then each bin's s x s points averaged by an
        # average pool (ranks stay <= 5: TFLite's kernels stop at rank 6 or less)
        ys = bin_points(boxes[..., 0], boxes[..., 2] - boxes[..., 0], p * s) / stride[..., None] - 0.5
        xs = bin_points(boxes[..., 1], boxes[..., 3] - boxes[..., 1], p * s) / stride[..., None] - 0.5
        values = bilinear_gather(table, ys[..., :, None], xs[..., None, :], height[..., None, None],
                                 width[..., None, None], offset[..., None, None])  # (B, R, p s, p s, C)
        if s > 1:
            values = ops.reshape(values, (-1, p * s, p * s, channels))
            values = ops.average_pool(values, s, strides=s, padding="valid")
        return ops.reshape(values, (-1, boxes.shape[1], p, p, channels))

    def compute_output_shape(self, input_shapes):
        boxes, first = input_shapes[0], input_shapes[1]
        return (boxes[0], boxes[1], self.pool_size, self.pool_size, first[-1])

    def get_config(self):
        return {**super().get_config(), "pool_size": self.pool_size, "sampling_ratio": self.sampling_ratio}

