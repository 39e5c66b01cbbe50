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


def overlapping_pairs(boxes, image_size, scales=(8, 16, 32, 64, 128), ratios=(0.5, 1.0, 2.0)):
    """(anchor index, box index) of every anchor that may intersect each box, without the
    dense (A, G) matrix (65 472 anchors x 256 nuclei at 512 x 512 is 1 s of NumPy per crop).

    Anchors sit on a grid, so the rows and columns of a level whose anchors reach a box form a
    range; the ranges include their border cells, so every intersecting pair is listed (some
    listed pairs touch only: IoU 0).
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    found_anchor, found_box, start = [], [], 0
    for scale, stride in zip(scales, LEVEL_STRIDES):
        side = image_size // stride
        for k, ratio in enumerate(ratios):
            half_h, half_w = scale / np.sqrt(ratio) / 2, scale * np.sqrt(ratio) / 2
            r0 = np.clip(np.floor((boxes[:, 0] - half_h) / stride - 0.5), 0, side - 1).astype(np.int64)
            r1 = np.clip(np.ceil((boxes[:, 2] + half_h) / stride - 0.5), 0, side - 1).astype(np.int64)
            c0 = np.clip(np.floor((boxes[:, 1] - half_w) / stride - 0.5), 0, side - 1).astype(np.int64)
            c1 = np.clip(np.ceil((boxes[:, 3] + half_w) / stride - 0.5), 0, side - 1).astype(np.int64)
            rows, cols = r1 - r0 + 1, c1 - c0 + 1
            counts = rows * cols
            box = np.repeat(np.arange(len(boxes)), counts)
            within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            row = r0[box] + within // cols[box]
            col = c0[box] + within % cols[box]
            found_anchor.append(start + (row * side + col) * len(ratios) + k)
            found_box.append(box)
        start += side * side * len(ratios)
    if not found_anchor:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(found_anchor), np.concatenate(found_box)
