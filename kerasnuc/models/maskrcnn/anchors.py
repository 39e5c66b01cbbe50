"""RPN anchors of the nucleus Mask R-CNN: one box scale per FPN level, three aspect ratios.

NucSeg (Jung, Lodhi and Kang 2019) uses box areas 8^2 ... 128^2, one scale per level P2..P6
(strides 4 ... 64), and ratios 1:1, 1:2, 2:1. Anchors are centred on the pixel blocks of
their level, ((i + 0.5) * stride), the same convention as :mod:`.roi_align`, so an anchor and
the feature cell that predicts it look at the same place. The order (level, row, column,
ratio) is the order in which :mod:`.heads` flattens the RPN outputs: both must agree.
"""

import numpy as np

LEVEL_STRIDES = (4, 8, 16, 32, 64)
"""Strides of the FPN levels P2..P6 that carry anchors."""


def check_anchor_options(image_size, scales, ratios):
    """One-line errors for an anchor plan that cannot be built."""
    if len(scales) != len(LEVEL_STRIDES):
        raise ValueError(f"maskrcnn: anchor_scales needs one scale per FPN level P2..P6 "
                         f"({len(LEVEL_STRIDES)}), got {tuple(scales)}")
    if min(scales) <= 0 or not ratios or min(ratios) <= 0:
        raise ValueError(f"maskrcnn: anchor scales and ratios must be positive, got {tuple(scales)}, {tuple(ratios)}")
    if image_size % LEVEL_STRIDES[-1]:
        raise ValueError(f"maskrcnn: input side {image_size} must be a multiple of {LEVEL_STRIDES[-1]} (P6 stride)")


def level_anchors(image_size, scale, ratios, stride):
    """(H/stride * W/stride * len(ratios), 4) anchors (y1, x1, y2, x2) of one level.

    A ratio r is width / height: height = scale / sqrt(r), width = scale * sqrt(r), so every
    anchor of the level has the area scale**2.
    """
    ratios = np.asarray(ratios, np.float64)
    heights = scale / np.sqrt(ratios)
    widths = scale * np.sqrt(ratios)
    centres = (np.arange(image_size // stride) + 0.5) * stride
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    cy = cy[..., None]
    cx = cx[..., None]
    boxes = np.stack([cy - heights / 2, cx - widths / 2, cy + heights / 2, cx + widths / 2], axis=-1)
    return boxes.reshape(-1, 4).astype(np.float32)


def generate_anchors(image_size, scales=(8, 16, 32, 64, 128), ratios=(0.5, 1.0, 2.0)):
    """All anchors of a square ``image_size`` input, levels P2..P6 concatenated: (A, 4) float32."""
    check_anchor_options(image_size, scales, ratios)
    return np.concatenate([level_anchors(image_size, scale, ratios, stride)
                           for scale, stride in zip(scales, LEVEL_STRIDES)])


def anchor_count(image_size, ratios=(0.5, 1.0, 2.0)):
    """Number of anchors of a square input: sum over levels of (side / stride)**2 * ratios."""
    return sum((image_size // stride) ** 2 for stride in LEVEL_STRIDES) * len(ratios)
