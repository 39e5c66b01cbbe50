"""Mask R-CNN (task "instance") end to end: detections -> labels, the engine's tiling and
responsibility rule, a short training.fit on DSB 2018 scored through the engine, and the
SavedModel / TFLite exports giving the Keras model's instances."""

import json
import os

import numpy as np
import pytest

from kerasnuc.predict.detections import instances_from_tiles, labels_from_detections

MONUSEG = "monuseg2018/train/labels/TCGA-18-5592-01Z-00-DX1.png"


def square_mask(size=28):
    return np.ones((size, size), np.float32)


def test_labels_from_detections_score_order_threshold_padding_and_fragments():
    masks = np.zeros((5, 28, 28), np.float32)
    masks[0] = masks[1] = 1.0  # two overlapping full boxes
    masks[2, :, :14] = 0.9  # left half only
    masks[3, :2, :2] = 1.0  # a tiny corner: under min_area once resized to 8x8 -> 1 px
    boxes = np.array([[10, 10, 30, 30],  # score 0.6, overlaps the 0.9 box below
                      [20, 20, 40, 40],  # score 0.9: wins the contested 10x10 square
                      [50, 0, 60, 20],  # score 0.8, mask threshold keeps the left half, clipped at x=0
                      [40, 50, 48, 58],  # score 0.7, tiny fragment
                      [0, 0, 0, 0]], np.float32)  # padding row: all zero
    scores = np.array([0.6, 0.9, 0.8, 0.7, 0.0], np.float32)
    labels = labels_from_detections(boxes, scores, masks, (64, 64), score_threshold=0.5, mask_threshold=0.5,
                                    min_area=4)
    assert labels.shape == (64, 64) and labels.dtype == np.int32
    assert labels.max() == 3  # the 0.9, 0.8 and 0.6 detections; padding and the fragment dropped
    assert np.all(labels[20:40, 20:40] == 1)  # highest score first, whole box
    assert np.count_nonzero(labels == 3) == 20 * 20 - 10 * 10  # the 0.6 box lost the contested square
    half = labels == 2
    assert half[50:60, :10].all() and not half[:, 10:].any()  # mask thresholded, box rows 50..59
    assert labels[40:48, 50:58].max() == 0
    # a higher score threshold keeps only the best detection
    assert labels_from_detections(boxes, scores, masks, (64, 64), score_threshold=0.85).max() == 1
    # a box beyond the image is clipped, not an error
    outside = labels_from_detections([[50, 50, 90, 90]], [0.9], masks[:1], (64, 64), min_area=1)
    assert np.count_nonzero(outside) == 14 * 14
    with pytest.raises(ValueError, match="same D"):
        labels_from_detections(boxes, scores[:3], masks, (64, 64))


def test_labels_from_detections_keeps_the_largest_piece():
    mask = np.zeros((28, 28), np.float32)
    mask[:, :10] = mask[:, 18:] = 1.0  # two bars; the right one is wider
    mask[:, 18:] = 1.0
    mask[:, :4] = 0.0
    labels = labels_from_detections([[0, 0, 28, 28]], [0.9], mask[None], (28, 28), min_area=1)
    assert np.count_nonzero(labels) == 28 * 10 and labels[:, 18:].all()


class OracleRuntime:
    """A NumPy 'instance model' whose input is an instance label image scaled to [0, 1]: it
    detects every nucleus of a tile exactly (box = its bounding box in the tile, mask = its
    pixels resized to 28 x 28). Through the engine, the tiled labels must then be the truth:
    each nucleus found once, none split at a tile or block seam."""

    def __init__(self, scale, size=256, detections=256):
        self.scale, self.static_shape, self.detections = scale, (size, size), detections
        self.path = "<oracle>"
        self.meta = {"task": "instance", "channels": 1, "multiple": 64, "tile_margin": 64,
                     "postprocess": {"score_threshold": 0.5, "mask_threshold": 0.5, "min_area": 1}}

    def run(self, batch):
        import cv2

        count, size = len(batch), self.static_shape[0]
        boxes = np.zeros((count, self.detections, 4), np.float32)
        scores = np.zeros((count, self.detections), np.float32)
        masks = np.zeros((count, self.detections, 28, 28), np.float32)
        for n, tile in enumerate(batch):
            from skimage.measure import label

            # a nucleus and its mirror image in the padding are two objects
            ids = label(np.rint(tile[..., 0] * self.scale).astype(np.int64), background=0, connectivity=2)
            found = [i for i in np.unique(ids) if i > 0][: self.detections]
            for k, i in enumerate(found):
                rows, cols = np.nonzero(ids == i)
                y1, x1, y2, x2 = rows.min(), cols.min(), rows.max() + 1, cols.max() + 1
                crop = (ids[y1:y2, x1:x2] == i).astype(np.float32)
                boxes[n, k] = (y1, x1, y2, x2)
                scores[n, k] = 1.0 - k / (2.0 * self.detections)  # sorted descending, all above 0.5
                masks[n, k] = cv2.resize(crop, (28, 28), interpolation=cv2.INTER_LINEAR)
        return boxes, scores, masks


def test_engine_tiles_and_blocks_keep_each_nucleus_once(shared_data):
    from kerasnuc import metrics
    from kerasnuc.data.imageio import read_label_image as read_labels
    from kerasnuc.predict.engine import Predictor

    truth = read_labels(os.path.join(shared_data, MONUSEG))[:700, :600]
    from skimage.segmentation import relabel_sequential

    truth = relabel_sequential(truth)[0].astype(np.int32)
    image = truth.astype(np.uint16)  # the oracle reads ids back from the normalised image
    runtime = OracleRuntime(scale=float(truth.max()))
    predictor = Predictor(runtime, block=384)  # 2 x 2 blocks, each several 256 tiles
    labels, table = predictor.predict_instances(image)
    assert labels.shape == truth.shape and len(table["id"]) == labels.max() == len(np.unique(labels)) - 1
    scores = metrics.object_scores(truth, labels)
    # every nucleus once: no duplicates from overlapping tiles/blocks, none lost at a seam
    assert scores["f1"] > 0.97, scores
    assert metrics.aggregated_jaccard_index(truth, labels) > 0.85
    # the same detections through one tile per image give the same nuclei
    whole = OracleRuntime(scale=float(truth.max()), size=768, detections=1024)
    single = Predictor(whole, block=2048).predict_instances(image)[0]
    assert metrics.object_scores(single, labels)["f1"] > 0.97


def test_instances_from_tiles_changes_thresholds_without_the_network(shared_data):
    from kerasnuc.data.imageio import read_label_image as read_labels
    from kerasnuc.predict.detections import detect
    from kerasnuc.predict.engine import Predictor

    truth = read_labels(os.path.join(shared_data, MONUSEG))[:300, :300].astype(np.int32)
    runtime = OracleRuntime(scale=float(truth.max()))
    found = detect(Predictor(runtime), truth.astype(np.uint16))
    loose = instances_from_tiles(found, runtime.meta["postprocess"])
    strict = instances_from_tiles(found, {**runtime.meta["postprocess"], "score_threshold": 0.999})
    assert loose.max() > 20 and 0 < strict.max() < loose.max()
