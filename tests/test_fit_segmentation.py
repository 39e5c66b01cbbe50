"""End-to-end: training.fit on the shipped sample writes a complete, self-describing run."""

import csv
import json
import os

import numpy as np
import pytest

import keras

from training import fit
from training.config import load_config_file, resolve

TINY = {"model_config": {"filters": 8, "depth": 3}, "tile": 64, "batch_size": 8,
        "steps_per_epoch": 12, "epochs": 4, "learning_rate": 3e-3, "seed": 1}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "quick"
    path = fit.run(resolve(overrides={**TINY, "out": str(out)}), log=lambda m: None)
    return path


def test_run_folder_describes_itself(quick_run):
    expected = {"config.json", "split.json", "model.keras", "history.csv", "curves.png",
                "thresholds.json", "metrics.json", "overlay.png"}
    assert expected <= set(os.listdir(quick_run))
    assert not os.path.exists(quick_run + ".incomplete")
    config = json.load(open(os.path.join(quick_run, "config.json")))
    assert config["model_config"] == TINY["model_config"] and config["precision_used"] == "float32"
    # The resolved config is itself a config file: the run can be repeated from it.
    again = resolve(load_config_file(os.path.join(quick_run, "config.json")))
    assert again.to_dict()["model_config"] == TINY["model_config"] and again.tile == TINY["tile"]
    with open(os.path.join(quick_run, "history.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == TINY["epochs"] and "val_loss" in rows[0]


def test_split_is_by_image_and_complete(quick_run):
    split = json.load(open(os.path.join(quick_run, "split.json")))
    sides = [set(split[k]) for k in ("train", "val", "test")]
    assert sum(len(s) for s in sides) == 40 == len(set().union(*sides))
    assert all(len(s) for s in sides)


def test_short_training_learns_nuclei(quick_run):
    metrics = json.load(open(os.path.join(quick_run, "metrics.json")))
    assert metrics["images"] == 8 and len(metrics["per_image"]) == 8
    for key in ("dice", "aji", "pq", "f1"):
        assert 0.0 <= metrics["mean"][key] <= 1.0
    # A few dozen batches already beat the trivial all-foreground answer and lower the
    # loss clearly; a broken pipeline (misaligned masks, wrong targets) does neither.
    split = json.load(open(os.path.join(quick_run, "split.json")))
    from kerasnuc.data import load_dataset

    truth = [r.labels > 0 for r in load_dataset("sample") if r.name in split["test"]]
    fraction = np.mean(np.concatenate([t.ravel() for t in truth]))
    all_foreground_dice = 2 * fraction / (1 + fraction)
    assert metrics["mean"]["dice_pooled"] > all_foreground_dice + 0.1, (metrics["mean"], all_foreground_dice)
    with open(os.path.join(quick_run, "history.csv")) as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert losses[-1] < 0.8 * losses[0]
    thresholds = json.load(open(os.path.join(quick_run, "thresholds.json")))
    assert thresholds["tuned_on"] == "val" and 0 < thresholds["postprocess"]["threshold"] < 1
    assert thresholds["task"] == "segmentation" and thresholds["validation"]["metric"] == "aji"
    assert 0 <= thresholds["validation"]["value"] <= 1


def test_model_reloads_in_safe_mode(quick_run):
    model = keras.models.load_model(os.path.join(quick_run, "model.keras"), safe_mode=True)
    out = model.predict(np.zeros((1, 64, 64, 3), np.float32), verbose=0)
    assert out.shape == (1, 64, 64, 1)


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": "segnet", "epochs": 7, "tile": 64}))
    config = resolve(load_config_file(path), {"epochs": 3, "tile": None})
    assert (config.model, config.epochs, config.tile) == ("segnet", 3, 64)


def test_bad_config_and_data_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"epochz": 3}')
    with pytest.raises(ValueError, match="bad.json: unknown config keys \\['epochz'\\]"):
        load_config_file(bad)
    with pytest.raises(ValueError, match="divisible"):
        resolve(overrides={"tile": 100})
    out = tmp_path / "never"
    with pytest.raises(SystemExit, match="does not exist"):
        fit.run(resolve(overrides={"data": "dsb2018:/nonexistent", "out": str(out)}), log=lambda m: None)
    assert not out.exists() and not (tmp_path / "never.incomplete").exists()


def test_existing_run_is_not_overwritten(quick_run):
    with pytest.raises(SystemExit, match="run directory exists; choose another --out or pass --overwrite"):
        fit.run(resolve(overrides={**TINY, "out": quick_run}), log=lambda m: None)
    assert os.path.exists(os.path.join(quick_run, "model.keras"))


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        fit.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--task", "--model", "--data", "--epochs", "--batch-size", "--tile", "--out",
                 "--seed", "--precision", "--config"):
        assert flag in text


def test_kfold_writes_each_fold_and_mean_and_std(tmp_path):
    overrides = {**TINY, "epochs": 1, "steps_per_epoch": 2, "folds": 2, "val_fraction": 0.1,
                 "tune_postprocess": False, "out": str(tmp_path / "cv")}
    path = fit.run(resolve(overrides=overrides), log=lambda m: None)
    split = json.load(open(os.path.join(path, "split.json")))
    tests = [set(fold["test"]) for fold in split["folds"]]
    assert len(tests) == 2 and not tests[0] & tests[1] and len(tests[0] | tests[1]) == 40
    for index in (1, 2):
        fold_metrics = json.load(open(os.path.join(path, f"fold{index}", "metrics.json")))
        assert set(fold_metrics["per_image"][0]["name"] for _ in [0]) <= tests[index - 1]
    metrics = json.load(open(os.path.join(path, "metrics.json")))
    assert metrics["folds"] == 2 and set(metrics["mean"]) == set(metrics["std"])
    dice = [fold["dice"] for fold in metrics["per_fold"]]
    assert metrics["mean"]["dice"] == pytest.approx(np.mean(dice))
    assert metrics["std"]["dice"] == pytest.approx(np.std(dice, ddof=1))
