"""In-graph sampling of the regions the heads train on, with their class, box and mask targets.

Per image (Mask R-CNN): the ground-truth boxes join the proposals (so positives exist from
the first step), every candidate is matched to the nucleus it overlaps most; IoU >= 0.5 is
positive, below is background. ``train_rois`` regions are drawn at random, at most
``positive_fraction`` of them positive, the rest background; slots left when there are too few
candidates get weight 0. Targets: the class of the matched nucleus (0 for background), the
BOX_STD-scaled deltas to it, and the 28 x 28 mask: the nucleus's box-relative mask
(:mod:`.targets`) sampled bilinearly at the region's RoIAlign grid (zero outside the nucleus's
box) and rounded at 0.5. All of it keras.ops with static shapes (top-k over random keys).
"""

import keras
from keras import ops

from kerasnuc.models.maskrcnn.boxes import encode, iou
from kerasnuc.models.maskrcnn.detections import best_along_last
from kerasnuc.models.maskrcnn.float32 import Float32Layer
from kerasnuc.models.maskrcnn.roi_align import bilinear_gather, bin_points

POSITIVE_IOU = 0.5


def sample_rank(eligible, keys, count):
    """Indices (B, count) of ``eligible`` candidates in random order (by ``keys``), and a
    (B, count) flag saying which of them are real (eligible) picks."""
    ranked, index = ops.top_k(ops.where(eligible, keys, -1.0), count)
    return index, ranked >= 0.0


def crop_masks(masks, mask_boxes, boxes, mask_index, size):
    """Sample ``size`` x ``size`` grids of ``boxes`` (B, R, 4) from box-relative masks.

    ``masks`` (B, G, m, m) cover the boxes ``mask_boxes`` (B, G, 4); ``mask_index`` (B, R) picks
    the mask of each box. A one-pixel zero border makes points outside a mask's box 0.
    """
    batch = ops.shape(masks)[0]
    count, side = masks.shape[1], masks.shape[2]
    padded = ops.pad(masks, [[0, 0], [0, 0], [1, 1], [1, 1]])
    table = ops.reshape(padded, (-1, 1))
    owner = ops.take_along_axis(mask_boxes, mask_index[..., None], axis=1)  # (B, R, 4)
    height = ops.maximum(owner[..., 2] - owner[..., 0], 1e-6)
    width = ops.maximum(owner[..., 3] - owner[..., 1], 1e-6)
    ys = bin_points(boxes[..., 0], boxes[..., 2] - boxes[..., 0], size)
    xs = bin_points(boxes[..., 1], boxes[..., 3] - boxes[..., 1], size)
    # image pixels -> pixel-index units of the padded mask: mask pixel k (centre at k + 0.5 box-relative
    # mask units) is row k + 1 of the padded mask
    ys = (ys - owner[..., 0:1]) / height[..., None] * side - 0.5 + 1.0
    xs = (xs - owner[..., 1:2]) / width[..., None] * side - 0.5 + 1.0
    image = ops.arange(batch, dtype="int32")[:, None]
    offset = (image * count + mask_index) * (side + 2) ** 2
    values = bilinear_gather(table, ys[..., :, None], xs[..., None, :], side + 2, side + 2,
                             offset[..., None, None])
    return values[..., 0]


@keras.saving.register_keras_serializable(package="kerasnuc")
class RegionSampler(Float32Layer):
    """[proposals (B, N, 4), gt_boxes (B, G, 4), gt_class_ids (B, G), gt_masks (B, G, m, m)] ->
    rois (B, R, 4), target_class (B, R) int32, target_deltas (B, R, 4), target_masks
    (B, R, M, M), weights (B, R) (1 for a sampled region, 0 for an empty slot)."""

    def __init__(self, train_rois=128, positive_fraction=0.33, mask_size=28, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.train_rois = int(train_rois)
        self.positive_fraction = float(positive_fraction)
        self.mask_size = int(mask_size)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs):
        proposals, gt_boxes, gt_class_ids, gt_masks = inputs
        proposals = ops.cast(proposals, "float32")
        gt_boxes = ops.cast(gt_boxes, "float32")
        gt_class_ids = ops.cast(gt_class_ids, "int32")
        gt_masks = ops.cast(gt_masks, "float32")
        candidates = ops.concatenate([proposals, gt_boxes], axis=1)
        area = (candidates[..., 2] - candidates[..., 0]) * (candidates[..., 3] - candidates[..., 1])
        real = area > 0
        overlaps = iou(candidates, gt_boxes)
        overlaps = ops.where((gt_class_ids > 0)[:, None, :], overlaps, -1.0)
        best, matched = best_along_last(overlaps)
        positive = ops.logical_and(real, best >= POSITIVE_IOU)
        negative = ops.logical_and(real, best < POSITIVE_IOU)
        keys = keras.random.uniform(ops.shape(best), seed=self.seed_generator)
        rois = self.train_rois
        most_positive = min(int(round(rois * self.positive_fraction)), candidates.shape[1])
        pos_index, pos_real = sample_rank(positive, keys, most_positive)
        neg_index, neg_real = sample_rank(negative, keys, min(rois, candidates.shape[1]))
        pos_count = ops.sum(ops.cast(pos_real, "int32"), axis=1, keepdims=True)
        slot = ops.arange(rois, dtype="int32")[None]
        pos_index = ops.pad(pos_index, [[0, 0], [0, rois - most_positive]])
        neg_slot = ops.clip(slot - pos_count, 0, neg_index.shape[1] - 1)
        from_positive = slot < pos_count
        index = ops.where(from_positive, pos_index, ops.take_along_axis(neg_index, neg_slot, axis=1))
        neg_ok = ops.logical_and(ops.take_along_axis(neg_real, neg_slot, axis=1), slot - pos_count < neg_index.shape[1])
        weights = ops.cast(ops.logical_or(from_positive, neg_ok), "float32")
        boxes = ops.take_along_axis(candidates, index[..., None], axis=1) * weights[..., None]
        owner = ops.take_along_axis(matched, index, axis=1)
        target_class = ops.where(from_positive, ops.take_along_axis(gt_class_ids, owner, axis=1), 0)
        owner_boxes = ops.take_along_axis(gt_boxes, owner[..., None], axis=1)
        is_positive = ops.cast(from_positive, "float32")
        safe_boxes = ops.where(from_positive[..., None], boxes, owner_boxes + ops.convert_to_tensor([0., 0., 1., 1.]))
        deltas = encode(safe_boxes, owner_boxes) * is_positive[..., None]
        masks = crop_masks(gt_masks, gt_boxes, boxes, owner, self.mask_size)
        masks = ops.cast(masks >= 0.5, "float32") * is_positive[..., None, None]
        return (ops.stop_gradient(boxes), target_class, ops.stop_gradient(deltas), ops.stop_gradient(masks),
                weights)

    def compute_output_spec(self, inputs):
        batch = inputs[0].shape[0]
        r, m = self.train_rois, self.mask_size
        return (keras.KerasTensor((batch, r, 4), "float32"), keras.KerasTensor((batch, r), "int32"),
                keras.KerasTensor((batch, r, 4), "float32"), keras.KerasTensor((batch, r, m, m), "float32"),
                keras.KerasTensor((batch, r), "float32"))

    def get_config(self):
        return {**super().get_config(), "train_rois": self.train_rois, "positive_fraction": self.positive_fraction,
                "mask_size": self.mask_size, "seed": self.seed}
