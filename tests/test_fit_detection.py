"""End-to-end: training.fit --task detection (UD-Net density regression) on a few
CRCHistoPhenotypes images, and the detection evaluation on perfect density maps."""

import csv
import json
import os

import numpy as np
import pytest

from training import detection, fit
from training.config import resolve

CRC_IMAGES = ("img3", "img4", "img5", "img13", "img19", "img24", "img25", "img31")
TINY = {"task": "detection", "model": "udnet", "model_config": {"filters": 4, "depth": 3, "steps": 1},
        "tile": 96, "batch_size": 6, "steps_per_epoch": 3, "epochs": 2, "learning_rate": 1e-3,
        "val_fraction": 0.25, "test_fraction": 0.25, "seed": 3}


def small_crc(shared_data, folder, names=CRC_IMAGES):
    """A CRCHistoPhenotypes folder (images/ + annotations/) with a few images, by symlinks."""
    source = os.path.join(shared_data, "crchistophenotypes")
    if not os.path.isdir(source):
        pytest.skip(f"CRCHistoPhenotypes not found at {source}")
    os.makedirs(folder / "images")
    os.makedirs(folder / "annotations")
    for name in names:
        os.symlink(os.path.join(source, "images", f"{name}.png"), folder / "images" / f"{name}.png")
        os.symlink(os.path.join(source, "annotations", name), folder / "annotations" / name)
    return f"crchisto:{folder}"


@pytest.fixture(scope="module")
def crc_spec(shared_data, tmp_path_factory):
    return small_crc(shared_data, tmp_path_factory.mktemp("data") / "crc")


@pytest.fixture(scope="module")
def detection_run(crc_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "udnet"
    messages = []
    config = resolve({"task": "detection", "model": "udnet"}, {**TINY, "data": crc_spec, "out": str(out)})
    assert config.model_config == TINY["model_config"]
    path = fit.run(config, log=messages.append)
    return path, messages


def test_run_folder_has_the_detection_files(detection_run):
    path, messages = detection_run
    expected = {"config.json", "split.json", "model.keras", "history.csv", "curves.png",
                "thresholds.json", "metrics.json", "detections.png"}
    assert expected <= set(os.listdir(path))
    assert not os.path.exists(path + ".incomplete")
    with open(os.path.join(path, "history.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == TINY["epochs"] and "val_loss" in rows[0]
    # The segmentation default loss is replaced by MSE, and the log says so.
    assert any("using 'mse'" in m for m in messages)


def test_metrics_are_pooled_and_per_image(detection_run, crc_spec):
    path, _ = detection_run
    metrics = json.load(open(os.path.join(path, "metrics.json")))
    split = json.load(open(os.path.join(path, "split.json")))
    assert metrics["images"] == len(split["test"]) == 2
    assert metrics["match_radius"] == 6.0 and metrics["loss"] == "mse"
    assert metrics["primary"] == "pooled" and metrics["pooled"]["radius"] == 6.0
    for key in ("precision", "recall", "f1"):
        assert 0.0 <= metrics["pooled"][key] <= 1.0
        assert 0.0 <= metrics["mean"][key] <= 1.0
    assert [row["name"] for row in metrics["per_image"]] == split["test"]
    # Pooled counts are the per-image counts summed; TP + FN = every true test point.
    for key in ("tp", "fp", "fn"):
        assert metrics["pooled"][key] == sum(row[key] for row in metrics["per_image"])
    from kerasnuc.data import load_dataset

    truth = {r.name: len(r.points) for r in load_dataset(crc_spec)}
    assert metrics["pooled"]["tp"] + metrics["pooled"]["fn"] == sum(truth[n] for n in split["test"])
    thresholds = json.load(open(os.path.join(path, "thresholds.json")))
    assert thresholds["task"] == "detection" and thresholds["tuned_on"] == "val"
    assert set(thresholds["postprocess"]) >= {"threshold", "min_distance"}
    assert thresholds["postprocess"]["threshold"] in detection.THRESHOLDS
    assert thresholds["postprocess"]["min_distance"] in detection.MIN_DISTANCES
    assert thresholds["validation"]["metric"] == "pooled_f1" and 0.0 <= thresholds["validation"]["value"] <= 1.0
    assert thresholds["match_radius"] == 6.0


def _truth_densities(records, shift=(0.0, 0.0), sigma=2.0):
    from kerasnuc.data.pipeline import record_points
    from kerasnuc.data.targets import density_map

    return [density_map(record_points(r) + np.asarray(shift), r.shape, sigma)[..., 0] for r in records]


def test_evaluation_of_the_true_density_map_is_near_perfect(crc_spec):
    from kerasnuc.data import load_dataset
    from training.evaluate import evaluate_detection

    records = load_dataset(crc_spec)

    def score(densities):
        by_record = {id(r): d for r, d in zip(records, densities)}
        result, _ = evaluate_detection(records, lambda r: {"mean": by_record[id(r)]},
                                       {"threshold": 0.5, "min_distance": 3}, 6.0, log=lambda m: None)
        return result["pooled"], result["per_image"]

    summary, per_image = score(_truth_densities(records))
    assert summary["f1"] > 0.95 and summary["precision"] > 0.95 and summary["recall"] > 0.95, summary
    assert len(per_image) == len(records) and all(row["f1"] > 0.9 for row in per_image)
    assert summary["tp"] + summary["fn"] == sum(len(r.points) for r in records)
    assert summary["mean_distance"] < 1.0
    # Tuning on the truth keeps it near perfect; a map shifted by twice the radius scores low.
    params, value = detection.tune_postprocess(_truth_densities(records[:3]), records[:3],
                                               {"threshold": 0.5, "min_distance": 3}, 6.0, lambda m: None)
    assert value > 0.95 and params["threshold"] in detection.THRESHOLDS
    shifted, _ = score(_truth_densities(records, shift=(12.0, 0.0)))
    assert shifted["f1"] < 0.3, shifted


def test_threshold_grid_equals_peak_finding_per_threshold():
    from scipy import ndimage

    from kerasnuc.postprocess import centroids_from_density

    rng = np.random.default_rng(0)
    for smooth in (1.0, 2.5):
        density = ndimage.gaussian_filter(rng.random((120, 120)), smooth)
        density = (density - density.min()) / (density.max() - density.min())
        for min_distance in (2, 5):
            grid = detection.detections_for_thresholds(density, detection.THRESHOLDS, min_distance)
            for threshold in detection.THRESHOLDS:
                direct = centroids_from_density(density, threshold=threshold, min_distance=min_distance)
                got = grid[threshold]
                assert got.shape == direct.shape
                np.testing.assert_allclose(got[np.lexsort(got.T)], direct[np.lexsort(direct.T)])


def test_detections_figure_marks_truth_and_prediction():
    image = np.full((40, 40, 3), 128, np.uint8)
    image[0, 0] = 0
    panel = detection.dots_panel(image, np.array([[10.0, 10.0]]), np.array([[30.0, 30.0]]))
    assert tuple(panel[10, 10]) == (0, 255, 0) and tuple(panel[30, 30]) == (255, 0, 0)
