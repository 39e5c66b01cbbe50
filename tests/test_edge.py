"""serving.edge: LiteRT inference without TensorFlow (import blocked by a sys.meta_path finder):
segment / detect / classify from the command line, tiled maps equal to Keras, classifier export,
OpenCV fallback without SciPy / scikit-image. Tiny models, no training."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("ai_edge_litert")
cv2 = pytest.importorskip("cv2")

from export import tflite  # noqa: E402
from kerasnuc.runs import write_run  # noqa: E402
from kerasnuc import models  # noqa: E402
from kerasnuc.predict.runtimes import predict_maps  # noqa: E402
from kerasnuc.predict.litert import LiteModel  # noqa: E402
from import_blocker import FRAMEWORKS, LEAK_CHECK, PREAMBLE, environment  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
QUIET = {"log": lambda message: None}

RUNNER = PREAMBLE + r'''
import json

from serving import edge

for argv in json.loads(sys.argv[1]):
    edge.main(argv)
''' + LEAK_CHECK + '''
print("NO-BLOCKED-IMPORTS")
'''


def run_edge(commands, blocked=FRAMEWORKS):
    result = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(commands)],
                            capture_output=True, text=True, timeout=120, cwd=REPO, env=environment(blocked))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "NO-BLOCKED-IMPORTS" in result.stdout
    return result


@pytest.fixture(scope="module")
def lite_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("edge")
    keras.utils.set_random_seed(0)
    unet = models.build("unet", input_shape=(None, None, 3), filters=4, depth=3)
    udnet = models.build("udnet", input_shape=(None, None, 1), filters=4, depth=2, steps=1)
    dcrn = models.build("dcrn", input_shape=(16, 16, 3), num_classes=3, blocks=2, layers_per_block=2,
                        growth=4, initial_filters=8, steps=1)
    seg_run = write_run(str(root / "seg"), unet, model_config={"filters": 4, "depth": 3},
                        postprocess={"threshold": 0.5, "min_distance": 3, "min_area": 5})
    det_run = write_run(str(root / "det"), udnet, model_config={"filters": 4, "depth": 2, "steps": 1},
                        postprocess={"threshold": 0.05, "min_distance": 4})
    cls_run = write_run(str(root / "cls"), dcrn, task="classification", model_name="dcrn",
                        model_config={"blocks": 2}, patch=16)
    seg, _ = tflite.export_tflite(seg_run, "float32", out=str(root / "seg.tflite"), evaluate_model=False, **QUIET)
    det, _ = tflite.export_tflite(det_run, "float32", out=str(root / "det.tflite"), evaluate_model=False, **QUIET)
    cls, cls_report = tflite.export_tflite(cls_run, "int8", out=str(root / "cls.tflite"), calibration=16,
                                           repeats=1, max_images=2, **QUIET)
    rng = np.random.default_rng(0)
    images = []
    for name, shape in (("small", (60, 90, 3)), ("large", (300, 410, 3))):
        image = rng.integers(0, 50, size=shape, dtype=np.uint8)
        for _ in range(12):  # bright blobs as nuclei
            y, x = rng.integers(10, shape[0] - 10), rng.integers(10, shape[1] - 10)
            cv2.circle(image, (int(x), int(y)), 6, (200, 190, 210), -1)
        path = str(root / f"{name}.png")
        cv2.imwrite(path, image)
        images.append(path)
    return {"root": root, "seg": seg, "det": det, "cls": cls, "cls_report": cls_report, "images": images,
            "unet": unet, "dcrn": dcrn, "seg_run": seg_run, "cls_run": cls_run}


def test_tiled_edge_maps_equal_keras(lite_models):
    lite = LiteModel(lite_models["seg"])
    meta = lite.meta
    assert meta["tile_margin"] >= meta["receptive_radius"]
    image = cv2.cvtColor(cv2.imread(lite_models["images"][1]), cv2.COLOR_BGR2RGB)
    tiled, variance = lite.predict_maps(image, tile=2 * meta["tile_margin"] + 40)
    assert variance is None and tiled.shape == image.shape[:2] + (1,)
    reference = predict_maps(lite_models["unet"], image, 3, meta["multiple"])
    assert np.abs(tiled - reference).max() < 1e-4


def test_segment_and_detect_without_tensorflow(lite_models):
    out = str(lite_models["root"] / "out_seg")
    images = lite_models["images"]
    result = run_edge([[lite_models["seg"], "segment", *images, "--out", out, "--tile", "160"],
                       [lite_models["det"], "detect", *images, "--out", out],
                       [lite_models["seg"], "detect", images[0], "--out", out + "_segdet"]])
    assert "ms per image" in result.stdout
    for path in images:
        stem = os.path.splitext(os.path.basename(path))[0]
        labels = cv2.imread(os.path.join(out, f"{stem}_labels.png"), cv2.IMREAD_UNCHANGED)
        assert labels.dtype == np.uint16 and labels.shape == cv2.imread(path).shape[:2]
        rows = list(csv.reader(open(os.path.join(out, f"{stem}_centroids.csv"))))
        assert rows[0] == ["x", "y"]
    assert os.path.exists(os.path.join(out + "_segdet", "small_centroids.csv"))
    assert result.stdout.count(" ms -> ") == 5


def test_classify_points_and_detector_without_tensorflow(lite_models, tmp_path):
    points = tmp_path / "points.csv"
    points.write_text("x,y\n10,12\n45.5,30\n0,0\n89,59\n")
    out = str(tmp_path / "cls")
    result = run_edge([[lite_models["cls"], "classify", lite_models["images"][0], "--points", str(points),
                        "--out", out],
                       [lite_models["cls"], "classify", lite_models["images"][0], "--detector",
                        lite_models["seg"], "--out", out + "_det"]])
    rows = list(csv.DictReader(open(os.path.join(out, "small_classes.csv"))))
    assert len(rows) == 4 and {"x", "y", "class", "name"} <= set(rows[0])
    names = json.load(open(os.path.splitext(lite_models["cls"])[0] + ".json"))["class_names"]
    assert all(row["name"] in names for row in rows)
    assert os.path.exists(os.path.join(out + "_det", "small_classes.csv"))
    assert "nuclei classified" in result.stdout


def test_classifier_int8_export_report(lite_models):
    report = lite_models["cls_report"]
    assert report["io"]["input"]["dtype"] == "uint8"
    summary = report["agreement"]["summary"]
    assert summary["nuclei"] > 10 and summary["label_agreement"] > 0.6 and summary["max_abs_diff"] < 0.2
    # the edge runner's patches + whole-image normalisation match the Keras model's input
    lite = LiteModel(lite_models["cls"])
    image = cv2.cvtColor(cv2.imread(lite_models["images"][0]), cv2.COLOR_BGR2RGB)
    points = np.array([[20.0, 20.0], [60.0, 40.0]])
    from kerasnuc.predict.tiling import intensity_range, normalize_with_range, patches_at

    patches = normalize_with_range(patches_at(image, points, 16), 3, intensity_range(image, 3))
    keras_probabilities = lite_models["dcrn"].predict(patches, verbose=0)
    assert np.abs(lite.classify(image, points) - keras_probabilities).max() < 0.2


def test_fallback_without_scipy_and_skimage(lite_models, tmp_path):
    out = str(tmp_path / "fallback")
    result = run_edge([[lite_models["seg"], "segment", lite_models["images"][0], "--out", out],
                       [lite_models["det"], "detect", lite_models["images"][0], "--out", out]],
                      blocked=FRAMEWORKS + ("scipy", "skimage"))
    assert "falling back to OpenCV" in result.stderr
    assert os.path.exists(os.path.join(out, "small_labels.png"))
    assert os.path.exists(os.path.join(out, "small_centroids.csv"))


def test_wrong_command_for_task(lite_models):
    result = subprocess.run([sys.executable, "-m", "serving.edge", lite_models["det"], "segment",
                             lite_models["images"][0]], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode != 0 and "detection model" in result.stderr


# ----------------------------------------------------------------------------- static input (--input-size)


@pytest.fixture(scope="module")
def static_models(lite_models):
    root = lite_models["root"]
    seg, _ = tflite.export_tflite(lite_models["seg_run"], "float32", input_size=64, out=str(root / "seg_64.tflite"),
                                  evaluate_model=False, **QUIET)
    cls, cls_report = tflite.export_tflite(lite_models["cls_run"], "float32", input_size=16,
                                           out=str(root / "cls_16.tflite"), repeats=1, max_images=2, **QUIET)
    return {"seg": seg, "cls": cls, "cls_report": cls_report}


def test_tile_plan_with_rectangular_tiles():
    from kerasnuc.predict.tiling import fitting_margin
    from kerasnuc.predict.tiling import TilePlan

    plan = TilePlan(150, 130, (64, 48), 16, 8)
    assert plan.tile_shape == (64, 48) and plan.padded_shape == (152, 136) and plan.tile == (64, 48)
    for top, left, (r0, r1), (c0, c1) in plan.tiles:
        assert top % 8 == 0 and left % 8 == 0 and top + 64 <= 152 and left + 48 <= 136
        # each tile keeps only what lies at least the margin inside it (or at the image border)
        assert r0 == 0 or r0 - top >= 16
        assert r1 == 152 or top + 64 - r1 >= 16
        assert c0 == 0 or c0 - left >= 16
        assert c1 == 136 or left + 48 - c1 >= 16
    coords = np.stack(np.indices(plan.padded_shape), axis=-1)
    stitched = plan.stitch([coords[top:top + 64, left:left + 48] for top, left, _, _ in plan.tiles])
    assert np.array_equal(stitched, coords[:150, :130])
    assert TilePlan(100, 100, 64, 16, 16).tile == 64  # a side stays an int
    with pytest.raises(ValueError):
        TilePlan(100, 100, (64, 32), 16, 16)  # 32 is not larger than twice the margin
    assert fitting_margin((64, 64), 48, 8) == 24 and fitting_margin((104, 112), 46, 8) == 48
    assert fitting_margin((16, 16), 16, 16) == 0 and fitting_margin((64, 48), 10, 8) == 16


def test_static_segment_command_without_tensorflow(lite_models, static_models):
    out = str(lite_models["root"] / "out_static")
    images = lite_models["images"]
    result = run_edge([[static_models["seg"], "segment", *images, "--out", out, "--tile", "160"],
                       [static_models["seg"], "detect", images[0], "--out", out]])
    assert "static 64x64 input: images run in 64x64 tiles, margin 24; --tile 160 overridden" in result.stderr
    assert result.stdout.count(" ms -> ") == 3
    lite = LiteModel(static_models["seg"])
    for path in images:
        image = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
        labels = cv2.imread(os.path.join(out, f"{os.path.splitext(os.path.basename(path))[0]}_labels.png"),
                            cv2.IMREAD_UNCHANGED)
        assert labels.dtype == np.uint16 and labels.shape == image.shape[:2]
        from kerasnuc.predict.postprocess import instances

        expected = instances(lite.predict_maps(image)[0], lite.meta["postprocess"])
        assert np.array_equal(labels, expected)
    assert os.path.exists(os.path.join(out, "small_centroids.csv"))


def test_static_classifier_runs_batch_one(lite_models, static_models):
    lite = LiteModel(static_models["cls"])
    assert list(lite.interpreter.get_input_details()[0]["shape_signature"]) == [1, 16, 16, 3]
    assert lite.static_batch == 1 and not lite.tiles_fixed
    assert os.path.basename(static_models["cls"]) == "cls_16.tflite"
    image = cv2.cvtColor(cv2.imread(lite_models["images"][0]), cv2.COLOR_BGR2RGB)
    points = np.array([[20.0, 20.0], [60.0, 40.0], [5.0, 50.0], [88.0, 2.0], [45.0, 30.0]])
    from kerasnuc.predict.tiling import intensity_range, normalize_with_range, patches_at

    patches = normalize_with_range(patches_at(image, points, 16), 3, intensity_range(image, 3))
    probabilities = lite.classify(image, points, batch_size=2)  # chunks of 2 -> batch-1 calls
    assert probabilities.shape == (5, 3)
    assert np.abs(probabilities - lite_models["dcrn"].predict(patches, verbose=0)).max() < 1e-4
    summary = static_models["cls_report"]["agreement"]["summary"]
    assert summary["nuclei"] > 10 and summary["label_agreement"] == 1.0 and summary["max_abs_diff"] < 1e-4
    with pytest.raises(ValueError, match="fixed at 16x16"):
        lite.run(np.zeros((1, 24, 24, 3), np.float32))
    with pytest.raises(ValueError, match="--input-size 24: this dcrn classifier takes 16x16 nucleus patches"):
        tflite.export_tflite(lite_models["cls_run"], "float32", input_size=24, evaluate_model=False, **QUIET)
