"""NucSeg's multiple inference (anchored pixel vote over 7 views), the organ-wise MoNuSeg split
and object precision / recall / F1 at Dice > 0.2."""

import json
import os

import numpy as np
import pytest

from kerasnuc.postprocess.multiple_inference import (
    MULTIPLE_INFERENCE_VIEWS,
    merge_views_anchored,
    multiple_inference_views,
)
from kerasnuc.predict.tiling import dihedral_transform, inverse_dihedral

MONUSEG = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "monuseg2018", "train")


def _disc(shape, centre, radius):
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2


def _labels(shape, *masks):
    out = np.zeros(shape, np.int32)
    for i, mask in enumerate(masks, 1):
        out[mask] = i
    return out


# ----------------------------------------------------------------------------- the vote


def test_seven_views_original_first():
    assert MULTIPLE_INFERENCE_VIEWS == (0, 1, 2, 3, 4, 5, 6)
    assert multiple_inference_views(True) == list(range(7))
    assert multiple_inference_views(False) is None and multiple_inference_views(None) is None
    assert multiple_inference_views([4, 0, 2]) == [0, 4, 2]
    for bad in ([1, 2], [0], [0, 8], [0, 1, 1], "yes"):
        with pytest.raises(ValueError):
            multiple_inference_views(bad)


def test_nucleus_seen_in_4_of_7_views_keeps_pixels_most_views_cover():
    shape = (40, 40)
    original = _labels(shape, _disc(shape, (20, 20), 8))
    shifted = [_labels(shape, _disc(shape, (20 + dy, 20 + dx), 8)) for dy, dx in ((1, 0), (0, 1), (-1, 0))]
    empty = [np.zeros(shape, np.int32)] * 3
    merged = merge_views_anchored(original, shifted + empty)  # found in 4 of 7 views
    # more than half of 7 masks: all 4 masks of the nucleus must cover a pixel
    votes = (original > 0).astype(int) + sum((view > 0).astype(int) for view in shifted)
    np.testing.assert_array_equal(merged > 0, votes >= 4)
    assert merged.max() == 1 and merged.dtype == np.int32
    # 5 of 7: a pixel needs 4 of the 5 masks, not all of them
    five = merge_views_anchored(original, shifted + [_labels(shape, _disc(shape, (20, 19), 8))] + empty[:2])
    votes5 = votes + _disc(shape, (20, 19), 8)
    np.testing.assert_array_equal(five > 0, votes5 >= 4)
    assert (five > 0).sum() > (merged > 0).sum()


def test_nucleus_seen_in_3_of_7_views_is_dropped_unless_unmatched_views_abstain():
    shape = (40, 40)
    keep = _disc(shape, (10, 10), 5)
    weak = _disc(shape, (28, 28), 6)
    original = _labels(shape, keep, weak)
    views = [_labels(shape, keep, weak)] * 2 + [_labels(shape, keep)] * 4  # weak: 3 of 7 views
    merged = merge_views_anchored(original, views)
    assert merged.max() == 1 and merged[10, 10] == 1 and merged[28, 28] == 0  # unmatched views vote "absent"
    abstain = merge_views_anchored(original, views, unmatched="abstain")  # 3 of its 3 masks
    assert abstain.max() == 2 and abstain[28, 28] == 2
    np.testing.assert_array_equal(abstain == 2, weak)


def test_iou_boundary_is_strict():
    shape = (20, 20)
    square = np.zeros(shape, bool)
    square[0:10, 0:10] = True  # 100 px
    original = _labels(shape, square)
    strip20 = np.zeros(shape, bool)
    strip20[0:2, 0:10] = True  # inside the square: IoU exactly 0.2
    strip21 = strip20.copy()
    strip21[2, 0] = True  # IoU 0.21
    empty = [np.zeros(shape, np.int32)] * 3
    # IoU 0.2 is no match: the three strip views vote "absent" and nothing has 4 of 7 votes
    assert merge_views_anchored(original, [_labels(shape, strip20)] * 3 + empty).max() == 0
    # just above 0.2 they match: the strip has 4 votes (original + 3), the rest of the square 1
    merged = merge_views_anchored(original, [_labels(shape, strip21)] * 3 + empty)
    np.testing.assert_array_equal(merged > 0, strip21)
    assert merge_views_anchored(original, [_labels(shape, strip20)] * 3 + empty, iou=0.19).sum() == 20


def test_nuclei_only_in_other_views_are_dropped_and_matching_is_one_to_one():
    shape = (40, 60)
    left, right, extra = _disc(shape, (20, 15), 7), _disc(shape, (20, 31), 7), _disc(shape, (8, 52), 5)
    original = _labels(shape, left, right)
    blob = _labels(shape, left | right)  # one view merges the pair into one nucleus
    views = [_labels(shape, left, right, extra)] * 5 + [blob]  # 'extra': in 5 views, not the original
    merged = merge_views_anchored(original, views)
    assert merged.max() == 2 and merged[20, 15] == 1 and merged[20, 31] == 2
    assert not merged[extra].any()
    np.testing.assert_array_equal(merged > 0, left | right)
    with pytest.raises(ValueError, match="shape"):
        merge_views_anchored(original, [original[:10]])
    with pytest.raises(ValueError, match="negative"):
        merge_views_anchored(original, [-original])
    assert merge_views_anchored(np.zeros(shape, int), views).max() == 0


def test_a_rotated_view_comes_back_aligned():
    shape = (30, 44)  # not square: odd rotations swap the sides
    labels = _labels(shape, _disc(shape, (6, 8), 4), _disc(shape, (20, 30), 6))
    labels[24:28, 2:12] = 3  # an asymmetric bar near a corner
    for k in MULTIPLE_INFERENCE_VIEWS:
        view = dihedral_transform(labels, k)
        assert view.shape == (shape if k % 2 == 0 else shape[::-1])
        if k:  # every other view differs from the original: the test image has no symmetry
            assert view.shape != shape or not np.array_equal(view, labels)
        np.testing.assert_array_equal(inverse_dihedral(view, k), labels)
    views = [np.ascontiguousarray(inverse_dihedral(dihedral_transform(labels, k), k)) for k in range(1, 7)]
    np.testing.assert_array_equal(merge_views_anchored(labels, views), labels)


# ----------------------------------------------------------------------------- the engine


class _ImageAsMap:
    """A runtime whose 'probability' is the normalised image itself; counts the pixels it sees."""

    def __init__(self, meta):
        self.meta, self.pixels, self.static_shape = meta, 0, None

    def run(self, batch):
        self.pixels += int(np.prod(batch.shape[:3]))
        return np.asarray(batch[..., :1], np.float32)


def test_engine_views_are_mapped_back_before_the_vote():
    from kerasnuc.predict import Predictor

    shape = (72, 96)
    image = np.zeros(shape + (3,), np.uint8)
    for centre, radius in (((12, 14), 5), ((40, 70), 8), ((58, 20), 6), ((30, 40), 4)):
        image[_disc(shape, centre, radius)] = 255
    meta = {"channels": 3, "multiple": 8, "tile_margin": 8,
            "postprocess": {"threshold": 0.5, "min_distance": 3, "min_area": 5}}
    runtime = _ImageAsMap(meta)
    predictor = Predictor(runtime, tile=0, block=4096)
    plain, _ = predictor.predict_instances(image)
    once = runtime.pixels
    merged, table = predictor.predict_instances(image, multiple_inference=True)
    assert runtime.pixels == 8 * once  # the original, then the 6 other views: 7x the passes
    assert plain.max() == 4
    np.testing.assert_array_equal(merged, plain)  # misaligned views would match nothing and drop every nucleus
    assert len(table["id"]) == 4 and predictor.multiple_inference is False
    with pytest.raises(ValueError, match="tta=1"):
        Predictor(runtime, tta=8, multiple_inference=True)


TILE = "TCGA-18-5592-01Z-00-DX1"


class _InstanceOracle:
    """An 'instance model' (boxes, scores, masks, as Mask R-CNN gives them) that detects the
    connected blobs of its input exactly, in the tile's own orientation."""

    def __init__(self):
        self.static_shape, self.path = (128, 128), "<oracle>"
        self.meta = {"task": "instance", "channels": 1, "multiple": 64, "tile_margin": 32,
                     "postprocess": {"score_threshold": 0.5, "mask_threshold": 0.5, "min_area": 1}}

    def run(self, batch, detections=64):
        import cv2
        from skimage.measure import label

        boxes = np.zeros((len(batch), detections, 4), np.float32)
        scores = np.zeros((len(batch), detections), np.float32)
        masks = np.zeros((len(batch), detections, 28, 28), np.float32)
        for n, tile in enumerate(batch):
            ids = label(tile[..., 0] > 0.5, connectivity=2)
            for k, i in enumerate(range(1, min(int(ids.max()), detections) + 1)):
                rows, cols = np.nonzero(ids == i)
                y1, x1, y2, x2 = rows.min(), cols.min(), rows.max() + 1, cols.max() + 1
                boxes[n, k], scores[n, k] = (y1, x1, y2, x2), 1.0 - k / (2.0 * detections)
                masks[n, k] = cv2.resize((ids[y1:y2, x1:x2] == i).astype(np.float32), (28, 28))
        return boxes, scores, masks


def test_engine_multiple_inference_of_an_instance_model():
    from kerasnuc.metrics import aggregated_jaccard_index
    from kerasnuc.predict import Predictor

    shape = (150, 170)
    image = np.zeros(shape, np.uint8)
    centres = ((20, 30, 9), (60, 120, 12), (110, 40, 10), (130, 140, 7), (80, 70, 6))
    for row, col, radius in centres:
        image[_disc(shape, (row, col), radius)] = 255
    image[5:12, 150:165] = 255  # an asymmetric bar
    predictor = Predictor(_InstanceOracle())
    plain, _ = predictor.predict_instances(image)
    merged, _ = predictor.predict_instances(image, multiple_inference=True)
    assert plain.max() == merged.max() == 6  # each view's detections, mapped back, found every nucleus
    assert aggregated_jaccard_index(plain, merged) > 0.95


@pytest.fixture(scope="module")
def monuseg_crop():
    """The top-left 256 x 256 of one MoNuSeg tile (RGB) and its instance labels."""
    import cv2

    image = cv2.imread(os.path.join(MONUSEG, "images", f"{TILE}.png"), cv2.IMREAD_COLOR)[:256, :256, ::-1]
    labels = cv2.imread(os.path.join(MONUSEG, "labels", f"{TILE}.png"), cv2.IMREAD_UNCHANGED)[:256, :256]
    return np.ascontiguousarray(image), labels.astype(np.int32)


def test_engine_option_on_a_monuseg_crop_with_a_tiny_model(monuseg_crop):
    import keras

    from kerasnuc import models
    from kerasnuc.predict import Predictor
    from kerasnuc.predict.postprocess import instances, multiple_inference_instances
    from kerasnuc.predict.runtimes import KerasRuntime

    image = monuseg_crop[0][:128, :128]
    keras.utils.set_random_seed(0)
    model = models.build("unet", input_shape=(None, None, 3), filters=4, depth=2)
    meta = {"channels": 3, "multiple": 4, "tile_margin": 8}
    maps, _ = Predictor(KerasRuntime(model=model, meta=meta), tile=0).predict_maps(image)
    # an untrained net: threshold where 40 % of the pixels are nuclei, so there are blobs all the same
    meta["postprocess"] = {"threshold": float(np.quantile(maps, 0.6)), "min_distance": 3, "min_area": 10}
    predictor = Predictor(KerasRuntime(model=model, meta=meta), tile=0, block=4096)
    plain, _ = predictor.predict_instances(image)
    merged, table = predictor.predict_instances(image, multiple_inference=True)
    assert plain.max() > 3
    outputs = predictor.view_outputs(image, range(1, 7))
    expected = multiple_inference_instances(maps, outputs, lambda m: instances(m, meta["postprocess"]))
    np.testing.assert_array_equal(merged > 0, expected > 0)  # the block path is the same composition
    assert merged.max() == len(table["id"]) <= plain.max()
    # every nucleus kept is one of the original view's: it overlaps that nucleus mostly
    for nucleus in range(1, int(merged.max()) + 1):
        under = plain[merged == nucleus]
        assert np.bincount(under).argmax() > 0
    # blocks: multiple inference per block, then the responsibility rule; ids stay 1..n
    blocks, _ = Predictor(KerasRuntime(model=model, meta=meta), tile=0, block=64,
                          multiple_inference=True).predict_instances(image)
    ids = np.unique(blocks)[1:]
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    assert abs(len(ids) - merged.max()) <= max(3, merged.max() // 4)


def test_evaluate_multiple_inference_reports_dice02_scores(tmp_path, monuseg_crop):
    import keras

    from kerasnuc import models
    from kerasnuc.runs import write_run
    from training import evaluate

    import cv2

    folder = tmp_path / "crop"  # the crop as a one-image folder dataset (outside the repository)
    for kind, array in zip(("images", "labels"), (monuseg_crop[0][..., ::-1], monuseg_crop[1].astype(np.uint16))):
        os.makedirs(folder / kind)
        cv2.imwrite(str(folder / kind / f"{TILE}.png"), np.ascontiguousarray(array))
    keras.utils.set_random_seed(0)
    model = models.build("unet", input_shape=(None, None, 3), filters=4, depth=2)
    run = write_run(str(tmp_path / "run"), model, task="segmentation", model_name="unet",
                    model_config={"filters": 4, "depth": 2}, data=f"folder:{folder}",
                    split={"train": [], "val": [], "test": [TILE]},
                    postprocess={"threshold": 0.5, "min_distance": 3, "min_area": 10})
    result = evaluate.evaluate_run(run, multiple_inference=True, log=lambda message: None)
    assert result["images"] == 1
    options = result["options"]
    assert options["tta_merge"] == "vote" and options["multiple_inference"] == list(range(7))
    assert options["vote_iou"] == 0.2 and options["vote_fraction"] == 0.5
    for key in ("precision_dice02", "recall_dice02", "f1_dice02"):
        assert 0.0 <= result["pooled"][key] <= 1.0 and key in result["per_image"][0]
    report = open(os.path.join(result["out"], "report.md")).read()
    assert "multiple inference (NucSeg)" in report


# ----------------------------------------------------------------------------- the organ split


def test_monuseg_organ_split_is_kumars_and_organs_are_disjoint():
    from kerasnuc.data.splits import monuseg_organ, monuseg_organ_split, monuseg_test_groups

    names = sorted(name[:-4] for name in os.listdir(os.path.join(MONUSEG, "images")))
    split = monuseg_organ_split(names)
    sides = [set(split[side]) for side in ("train", "val", "test")]
    assert [len(s) for s in sides] == [12, 4, 14]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert set().union(*sides) == set(names)
    training_organs = {monuseg_organ(name) for name in sides[0] | sides[1]}
    assert training_organs == {"breast", "kidney", "liver", "prostate"}
    for organ in training_organs:  # Kumar et al.: 4 training images per training organ
        assert sum(monuseg_organ(name) == organ for name in sides[0] | sides[1]) == 4
    groups = monuseg_test_groups()
    assert set(groups["same_organ"]) | set(groups["different_organ"]) == sides[2]
    assert {monuseg_organ(n) for n in groups["same_organ"]} == training_organs
    other = {monuseg_organ(n) for n in groups["different_organ"]}
    assert other == {"bladder", "colon", "stomach"} and not other & training_organs
    with pytest.raises(ValueError, match="not a MoNuSeg"):
        monuseg_organ("some-image")
    with pytest.raises(ValueError, match="30"):
        monuseg_organ_split(names[:20])


def test_split_from_a_config(tmp_path):
    from kerasnuc.data.splits import save_split, split_from_spec
    from training.config import resolve

    names = sorted(name[:-4] for name in os.listdir(os.path.join(MONUSEG, "images")))
    assert split_from_spec("monuseg_organ", names)["val"] == ["TCGA-50-5931-01Z-00-DX1", "TCGA-AR-A1AS-01Z-00-DX1",
                                                              "TCGA-G9-6363-01Z-00-DX1", "TCGA-HE-7130-01Z-00-DX1"]
    path = tmp_path / "split.json"
    save_split(path, {"train": names[:3], "val": names[3:4], "test": names[4:6]})
    assert split_from_spec(str(path), names) == {"train": names[:3], "val": names[3:4], "test": names[4:6]}
    with pytest.raises(ValueError, match="not in the data"):
        split_from_spec(str(path), names[1:])
    with pytest.raises(ValueError, match="neither a named split"):
        split_from_spec("organs", names)
    assert resolve({"split": "monuseg_organ"}).split == "monuseg_organ"
    with pytest.raises(ValueError, match="excludes folds"):
        resolve({"split": "monuseg_organ", "folds": 3})
    json.dumps(split_from_spec("monuseg_organ", names))  # what split.json stores


# ----------------------------------------------------------------------------- object scores


def test_object_scores_at_dice_02():
    from kerasnuc.metrics import segmentation_report

    shape = (30, 60)
    truth = np.zeros(shape, np.int32)
    truth[0:10, 0:10] = 1
    truth[0:10, 20:30] = 2
    pred = np.zeros(shape, np.int32)
    pred[0:1, 0:10] = 1
    pred[1, 0:2] = 1  # 12 px inside nucleus 1: Dice 24 / 112 = 0.214, a match
    pred[0:1, 20:30] = 2
    pred[1, 20] = 2  # 11 px inside nucleus 2: Dice 22 / 111 = 0.198, none
    pred[20:25, 40:44] = 3  # a false positive
    report = segmentation_report(truth, pred)
    assert (report["tp_dice02"], report["fp_dice02"], report["fn_dice02"]) == (1, 2, 1)
    assert report["precision_dice02"] == pytest.approx(1 / 3)
    assert report["recall_dice02"] == pytest.approx(1 / 2)
    assert report["f1_dice02"] == pytest.approx(2 / 5)
    assert report["f1"] == 0.0  # nothing reaches IoU > 0.5


# ----------------------------------------------------------------------------- the ablation harness


def test_nucseg_ablation_harness_writes_four_rows_beside_the_published(tmp_path, monuseg_crop):
    import importlib.util

    import cv2
    import keras

    from kerasnuc import models
    from kerasnuc.runs import write_run

    folder = tmp_path / "crop"
    for kind, array in zip(("images", "labels"), (monuseg_crop[0][..., ::-1], monuseg_crop[1].astype(np.uint16))):
        os.makedirs(folder / kind)
        cv2.imwrite(str(folder / kind / f"{TILE}.png"), np.ascontiguousarray(array))
    keras.utils.set_random_seed(0)
    model = models.build("unet", input_shape=(None, None, 3), filters=4, depth=2)
    run = write_run(str(tmp_path / "run"), model, task="segmentation", model_name="unet",
                    model_config={"filters": 4, "depth": 2}, data=f"folder:{folder}",
                    split={"train": [], "val": [], "test": [TILE]},
                    postprocess={"threshold": 0.5, "min_distance": 3, "min_area": 10})
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "nucseg_ablation.py")
    spec = importlib.util.spec_from_file_location("nucseg_ablation", path)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    result = harness.main([run, run, "--results", str(tmp_path / "results"), "--name", "ablation"])
    rows = {row["row"]: row for row in result["rows"]}
    assert list(rows) == ["NucSeg", "NucSeg-P", "NucSeg-N", "NucSeg-NP"]
    assert rows["NucSeg"]["multiple_inference"] and not rows["NucSeg-P"]["multiple_inference"]
    assert rows["NucSeg"]["mean"] == rows["NucSeg-N"]["mean"]  # the same run twice: same figures
    # TCGA-18-5592 is one of Kumar's training tiles: in neither test set
    assert rows["NucSeg-P"]["groups"] == {"same_organ": None, "different_organ": None}
    assert rows["NucSeg-P"]["images"] == 1 and 0.0 <= rows["NucSeg-P"]["mean"]["f1_dice02"] <= 1.0
    text = open(tmp_path / "results" / "ablation.md").read()
    assert "| NucSeg-NP |" in text and "published precision / recall / F1 / Dice / AJI" in text
    assert set(json.load(open(tmp_path / "results" / "ablation.json"))["published"]) == set(rows)
