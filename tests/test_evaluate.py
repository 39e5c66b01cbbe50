"""python -m training.evaluate: scores a finished run from its folder alone.

One tiny segmentation run is trained per module; an MC-dropout model and detection /
classification run folders are assembled from untrained tiny models (the evaluator only
needs config.json, split.json, model.keras and thresholds.json). Classification and
detection scoring is unit-tested with fake predictions on real CRCHistoPhenotypes records.
"""

import json
import os
import shutil

import numpy as np
import pytest

from kerasnuc import models
from kerasnuc.data import load_dataset
from kerasnuc.data.pipeline import classified_points, record_points
from kerasnuc.data.targets import density_map, foreground
from training import evaluate, fit, report
from training.config import resolve

TINY = {"model_config": {"filters": 4, "depth": 3}, "tile": 64, "epochs": 1, "steps_per_epoch": 2,
        "batch_size": 4, "val_fraction": 0.1, "test_fraction": 0.1, "seed": 3,
        "tune_postprocess": False}  # tuning is training's business; it costs ~10 s here
QUIET = {"log": lambda message: None}


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalruns") / "run"
    return fit.run(resolve(overrides={**TINY, "out": str(out)}), log=lambda m: None)


def _copy_run(run, dest, skip=()):
    os.makedirs(dest)
    for name in ("config.json", "split.json", "model.keras", "thresholds.json"):
        if name not in skip:
            shutil.copy(os.path.join(run, name), os.path.join(dest, name))
    return str(dest)


def _pngs(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".png"))


def _assert_report_lists_figures(out):
    text = open(os.path.join(out, "report.md")).read()
    figures = _pngs(out)
    assert figures, "no figures written"
    for name in figures:
        assert f"]({name})" in text, f"report.md does not show {name}"
    def strict(constant):
        raise AssertionError(f"metrics.json holds {constant}: not strict JSON")

    with open(os.path.join(out, "metrics.json")) as handle:
        metrics = json.loads(handle.read(), parse_constant=strict)
    assert sorted(metrics["figures"]) == figures
    return text


# ---------------------------------------------------------------------------- segmentation

def test_test_split_reproduces_the_runs_own_scores(seg_run, tmp_path):
    out = tmp_path / "eval"
    result = evaluate.evaluate_run(seg_run, out=str(out), **QUIET)
    assert {"metrics.json", "report.md", "overlays.png"} <= set(os.listdir(out))
    written = json.load(open(out / "metrics.json"))
    split = json.load(open(os.path.join(seg_run, "split.json")))
    assert written["split"] == "test" and written["images"] == len(split["test"]) == len(written["per_image"])
    assert [row["name"] for row in written["per_image"]] == split["test"]
    for key in ("dice", "aji", "pq", "f1", "aji_plus"):
        assert 0.0 <= written["mean"][key] <= 1.0
    for key in ("dice", "iou", "precision", "recall", "f1"):
        assert 0.0 <= written["pooled"][key] <= 1.0
    options = written["options"]
    assert options["tta"] is False and options["tta_transforms"] == 1 and options["mc_samples"] == 1
    assert options["postprocess"] == json.load(open(os.path.join(seg_run, "thresholds.json")))["postprocess"]
    # Same model, images, normalisation and thresholds as training.fit's own test scoring.
    trained = json.load(open(os.path.join(seg_run, "metrics.json")))["mean"]
    for key in ("dice", "aji", "pq", "f1"):
        assert result["mean"][key] == pytest.approx(trained[key], abs=1e-6), key
    text = _assert_report_lists_figures(out)
    assert "unet" in text and "| aji |" in text and "split `test`" in text


def test_tta_averages_the_eight_dihedral_views(seg_run, tmp_path, monkeypatch):
    from kerasnuc.predict.runtimes import KerasRuntime

    seen = []
    original = KerasRuntime.run

    def counting(self, batch):  # evaluation runs the model through the prediction engine
        seen.append(batch.shape)
        return original(self, batch)

    monkeypatch.setattr(KerasRuntime, "run", counting)
    result = evaluate.evaluate_run(seg_run, tta=True, limit=2, out=str(tmp_path / "tta"), **QUIET)
    images = result["images"]
    assert sum(shape[0] for shape in seen) == 8 * images  # every image seen in 8 views
    assert result["options"]["tta"] and result["options"]["tta_transforms"] == 8
    assert json.load(open(tmp_path / "tta" / "metrics.json"))["options"]["tta_merge"] == "mean"
    assert 0.0 <= result["mean"]["aji"] <= 1.0
    assert "8 dihedral views" in open(tmp_path / "tta" / "report.md").read()


def test_cli_default_folder_split_val_and_vote(seg_run, capsys):
    evaluate.main([seg_run, "--split", "val", "--tta-merge", "vote", "--limit", "2", "--progress-every", "1"])
    out = os.path.join(seg_run, "eval-val-tta-vote")
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["split"] == "val" and metrics["images"] == 2
    assert metrics["options"]["tta_merge"] == "vote" and metrics["options"]["vote_iou"] == 0.2
    printed = capsys.readouterr().out
    assert "[1/2 images]" in printed and "[2/2 images]" in printed
    assert f"wrote {out}/" in printed and "summary:" in printed
    # Nothing half-written is left beside it.
    assert not [f for f in os.listdir(seg_run) if f.startswith(".")]
    _assert_report_lists_figures(out)


def test_a_perfect_predictor_scores_dice_one(seg_run, tmp_path, monkeypatch):
    def truth(model, record, settings, engine=None):
        return {"mean": foreground(record.labels), "variance": None, "views": None, "passes": None}

    monkeypatch.setattr(evaluate, "predict_record", truth)
    result = evaluate.evaluate_run(seg_run, out=str(tmp_path / "perfect"), **QUIET)
    assert result["pooled"]["dice"] > 0.999 and result["mean"]["dice"] > 0.99
    assert result["mean"]["aji"] > 0.8 and result["mean"]["f1"] > 0.8
    # The trained tiny model is far from that: the scores depend on the predictions.
    trained = json.load(open(os.path.join(seg_run, "metrics.json")))["mean"]
    assert trained["aji"] < result["mean"]["aji"] - 0.1


def test_mc_dropout_model_gets_uncertainty(seg_run, tmp_path, monkeypatch):
    run = _copy_run(seg_run, tmp_path / "mc", skip=("model.keras",))
    config = json.load(open(os.path.join(run, "config.json")))
    config.update(model="mc_unet", model_config={"filters": 4, "depth": 3})
    json.dump(config, open(os.path.join(run, "config.json"), "w"))
    models.build("mc_unet", input_shape=(None, None, 3), filters=4, depth=3).save(os.path.join(run, "model.keras"))
    from kerasnuc.predict.runtimes import KerasRuntime

    calls = []
    original = KerasRuntime.run
    monkeypatch.setattr(KerasRuntime, "run", lambda self, b: calls.append(len(b)) or original(self, b))
    result = evaluate.evaluate_run(run, mc_samples=3, limit=2, **QUIET)
    assert result["options"]["stochastic"] and result["options"]["mc_samples"] == 3
    assert sum(calls) == 3 * 2
    for row in result["per_image"]:
        assert 0.0 <= row["ua_entropy"] <= 1.0 and 0.0 <= row["ua_variance"] <= 1.0
        assert row["mean_variance"] > 0  # the passes differ
    unc = result["uncertainty"]
    assert 0.0 <= unc["ua_entropy_pooled"] <= 1.0
    assert sum(unc["error_by_entropy"]["pixels"]) == sum(r.labels.size for r in evaluate.select_records(
        evaluate.load_run(run), None, "test")[0][:2])
    out = os.path.join(run, "eval-test")
    assert {"uncertainty.png", "uncertainty_vs_error.png"} <= set(os.listdir(out))
    _assert_report_lists_figures(out)


def test_other_dataset_and_separate_test_data(seg_run, tmp_path):
    result = evaluate.evaluate_run(seg_run, data="sample", limit=2, **QUIET)
    assert result["data"] == "sample" and result["split"] is None
    assert os.path.isfile(os.path.join(seg_run, "eval-sample", "report.md"))
    # A run trained with --test-data names its test images "test:<name>".
    run = _copy_run(seg_run, tmp_path / "td")
    config = json.load(open(os.path.join(run, "config.json")))
    split = json.load(open(os.path.join(run, "split.json")))
    config["test_data"] = "sample"
    split["test"] = ["test:" + name for name in split["train"][:2]]
    json.dump(config, open(os.path.join(run, "config.json"), "w"))
    json.dump(split, open(os.path.join(run, "split.json"), "w"))
    result = evaluate.evaluate_run(run, **QUIET)
    assert [row["name"] for row in result["per_image"]] == split["test"]
    assert result["test_data"] == "sample"


def test_clear_errors(seg_run, tmp_path):
    with pytest.raises(evaluate.EvaluationError, match="thresholds.json missing"):
        evaluate.evaluate_run(_copy_run(seg_run, tmp_path / "a", skip=("thresholds.json",)), **QUIET)
    with pytest.raises(evaluate.EvaluationError, match="model.keras missing"):
        evaluate.evaluate_run(_copy_run(seg_run, tmp_path / "b", skip=("model.keras",)), **QUIET)
    incomplete = _copy_run(seg_run, tmp_path / "c.incomplete")
    with pytest.raises(evaluate.EvaluationError, match="did not finish"):
        evaluate.evaluate_run(incomplete, **QUIET)
    with pytest.raises(evaluate.EvaluationError, match="run is incomplete"):
        evaluate.evaluate_run(str(tmp_path / "c"), **QUIET)
    no_val = _copy_run(seg_run, tmp_path / "d")
    split = json.load(open(os.path.join(no_val, "split.json")))
    del split["val"]
    json.dump(split, open(os.path.join(no_val, "split.json"), "w"))
    with pytest.raises(evaluate.EvaluationError, match="split.json: no split 'val' \\(has: test, train\\)"):
        evaluate.evaluate_run(no_val, split="val", **QUIET)
    # Cross-validation: the top folder names its folds; a fold reads the parent's config.json.
    cv = tmp_path / "cv"
    _copy_run(seg_run, cv / "fold1", skip=("config.json",))
    shutil.copy(os.path.join(seg_run, "config.json"), cv / "config.json")
    json.dump({"folds": [split, split]}, open(cv / "split.json", "w"))
    with pytest.raises(evaluate.EvaluationError, match="cross-validation run; evaluate or export one fold: .*fold1, .*fold2"):
        evaluate.load_run(cv)
    assert evaluate.load_run(cv / "fold1").config["model"] == "unet"
    with pytest.raises(SystemExit, match="training.evaluate: .*run directory not found"):
        evaluate.main([str(tmp_path / "nowhere")])
    assert not os.path.exists(os.path.join(no_val, "eval-val"))


# ---------------------------------------------------------------------------- classification / detection

CRC = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "crchistophenotypes")


@pytest.fixture(scope="module")
def crc_small(tmp_path_factory):
    """A CRCHistoPhenotypes-layout folder linking the first 4 images (reading all 100 takes seconds)."""
    if not os.path.isdir(CRC):
        pytest.skip(f"CRCHistoPhenotypes not found at {CRC}")
    root = tmp_path_factory.mktemp("crc")
    os.makedirs(root / "images")
    os.makedirs(root / "annotations")
    for name in ("img1", "img2", "img3", "img4"):
        os.symlink(os.path.abspath(os.path.join(CRC, "images", f"{name}.png")), root / "images" / f"{name}.png")
        os.symlink(os.path.abspath(os.path.join(CRC, "annotations", name)), root / "annotations" / name)
    return str(root)


@pytest.fixture(scope="module")
def crc_records(crc_small):
    return load_dataset(f"crchisto:{crc_small}")[:3]


def test_classification_scores_fake_predictions(crc_records, tmp_path):
    truth = np.concatenate([classified_points(r)[1] for r in crc_records])
    order = []

    def oracle(image, points):  # one-hot of the true classes, in the order the evaluator asks
        assert image.dtype == np.uint8 and points.shape[1] == 2
        start = sum(order)
        order.append(len(points))
        return np.eye(4)[truth[start:start + len(points)]] * 0.9 + 0.025

    result, artifacts = evaluate.evaluate_classification(crc_records, oracle,
                                                         class_names=crc_records[0].class_names, log=lambda m: None)
    assert result["pooled"]["accuracy"] == 1.0 and result["pooled"]["macro_f1"] == 1.0
    assert result["pooled"]["n"] == len(truth) and result["class_names"][0] == "epithelial"
    assert np.trace(np.array(result["confusion_matrix"])) == len(truth)

    rng = np.random.default_rng(0)
    guess, _ = evaluate.evaluate_classification(crc_records, lambda image, p: rng.dirichlet(np.ones(4), len(p)),
                                                class_names=crc_records[0].class_names, log=lambda m: None)
    assert guess["pooled"]["accuracy"] < 0.5 and 0.3 < guess["pooled"]["macro_roc_auc"] < 0.7
    assert np.sum(guess["confusion_matrix"]) == len(truth)

    result.update(task="classification", options={"patch": 32, "channels": 3})
    figures = report.make_figures(str(tmp_path), result, crc_records, artifacts)
    names = [name for name, _ in figures]
    assert set(names) == {"confusion_matrix.png", "roc.png", "precision_recall.png", "per_class_f1.png"}
    assert set(names) == set(_pngs(tmp_path))


def _density_predictor(shift=0.0):
    def predict(record):
        points = record_points(record) + shift
        return {"mean": density_map(points, record.shape, sigma=2.0)}
    return predict


def test_detection_scores_fake_density_maps(crc_records, tmp_path):
    params = {"threshold": 0.5, "min_distance": 3}
    quiet = dict(log=lambda m: None)
    exact, artifacts = evaluate.evaluate_detection(crc_records, _density_predictor(), params, 6.0, **quiet)
    near, _ = evaluate.evaluate_detection(crc_records, _density_predictor(3.0 / np.sqrt(2)), params, 6.0,
                                          sweep=(), **quiet)
    far, _ = evaluate.evaluate_detection(crc_records, _density_predictor(9.0), params, 6.0, sweep=(), **quiet)
    assert exact["pooled"]["f1"] > 0.9 and near["pooled"]["f1"] > 0.9
    assert near["pooled"]["mean_distance"] == pytest.approx(3.0, abs=0.5)
    assert far["pooled"]["f1"] < 0.3  # 12.7 px away: outside the 6 px matching radius
    assert exact["pooled"]["tp"] + exact["pooled"]["fn"] == sum(len(record_points(r)) for r in crc_records)
    thresholds = [c["threshold"] for c in exact["threshold_sweep"]]
    assert thresholds == sorted(thresholds) and params["threshold"] in thresholds

    exact.update(task="detection", options={"match_radius": 6.0, "detection": params})
    figures = report.make_figures(str(tmp_path), exact, crc_records, artifacts)
    assert {"detections.png", "detection_pr.png"} <= {name for name, _ in figures}


def _assembled_run(folder, task, model, model_config, thresholds, crc_path):
    os.makedirs(folder)
    config = {"task": task, "model": model, "model_config": model_config, "data": f"crchisto:{crc_path}",
              "channels": 3, "patch": 16, "match_radius": 6.0}
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    json.dump({"train": ["img1"], "val": ["img2"], "test": ["img3", "img4"]},
              open(os.path.join(folder, "split.json"), "w"))
    json.dump(thresholds, open(os.path.join(folder, "thresholds.json"), "w"))
    input_shape = (16, 16, 3) if task == "classification" else (None, None, 3)
    models.build(model, input_shape=input_shape, **model_config).save(os.path.join(folder, "model.keras"))
    return str(folder)


def test_detection_and_classification_runs_end_to_end(crc_small, tmp_path):
    crc = crc_small
    run = _assembled_run(tmp_path / "det", "detection", "udnet", {"filters": 4, "depth": 2, "steps": 1},
                         {"detection": {"threshold": 0.01, "min_distance": 4}, "match_radius": 5.0}, crc)
    result = evaluate.evaluate_run(run, limit=1, **QUIET)
    assert result["options"]["match_radius"] == 5.0 and result["pooled"]["radius"] == 5.0
    assert 0.0 <= result["pooled"]["f1"] <= 1.0 and result["per_image"][0]["name"] == "img3"
    _assert_report_lists_figures(os.path.join(run, "eval-test"))

    run = _assembled_run(tmp_path / "cls", "classification", "dcrn",
                         {"blocks": 2, "layers_per_block": 1, "growth": 4, "initial_filters": 8, "steps": 1},
                         {}, crc)
    result = evaluate.evaluate_run(run, tta=True, limit=1, **QUIET)
    assert result["options"]["patch"] == 16 and result["options"]["tta_transforms"] == 8
    assert result["pooled"]["n"] == len(classified_points(load_dataset(f"crchisto:{crc}")[2])[0])
    out = os.path.join(run, "eval-test-tta")
    assert {"confusion_matrix.png", "roc.png", "precision_recall.png", "per_class_f1.png"} <= set(os.listdir(out))
    _assert_report_lists_figures(out)
    with pytest.raises(evaluate.EvaluationError, match="segmentation runs only"):
        evaluate.evaluate_run(run, tta_merge="vote", **QUIET)
