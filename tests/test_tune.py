"""training.tune: tiny Keras Tuner searches on the shipped sample, their outputs, the round trip
into training.fit, and the clear error when every trial fails (the tensorboard trap)."""

import csv
import json
import os
import sys

import pytest

pytest.importorskip("keras_tuner")

from training import fit, tune
from training.config import load_config_file, resolve

TINY = {"model": "unet", "model_config": {"filters": 4, "depth": 2}, "data": "sample", "tile": 64,
        "batch_size": 8, "steps_per_epoch": 2, "epochs": 1, "seed": 3}
SPACE = {"filters": [4], "depth": [2, 3]}


def _search(out, tuner, **kwargs):
    lines = []
    path = tune.run(resolve(overrides=TINY), str(out), tuner=tuner, max_trials=2, max_epochs=1,
                    space=SPACE, log=lines.append, **kwargs)
    return path, lines


def _check_outputs(out, lines):
    trials = json.load(open(out / "trials.json"))
    completed = [t for t in trials["trials"] if t["status"] == "COMPLETED"]
    assert len(trials["trials"]) == 2 and len(completed) == 2, trials["trials"]
    for t in completed:
        assert t["score"] is not None and t["hyperparameters"]["filters"] == 4
        assert t["hyperparameters"]["depth"] in (2, 3) and 1e-4 <= t["hyperparameters"]["learning_rate"] <= 1e-2
        assert t["hyperparameters"]["loss"] in ("bce_dice", "bce", "dice")
        assert "val_loss" in t["metrics"] and "val_iou" in t["metrics"]
    # The loss is searched, so the loss-independent val_iou is the objective.
    assert trials["objective"] == {"name": "val_iou", "direction": "max"}
    # Same split as training.fit (by image, seeded); the test images are not in it.
    assert set(trials["split"]["train"]).isdisjoint(trials["split"]["val"])
    with open(out / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and {"learning_rate", "filters", "depth", "dropout", "loss", "best_val_loss"} <= set(rows[0])
    # Progress: one line per trial with its hyperparameters and score.
    trial_lines = [line for line in lines if line.startswith("trial ")]
    assert len(trial_lines) == 2 and all("learning_rate" in l and "-> val_iou" in l for l in trial_lines)
    assert any(line.startswith("best: trial") for line in lines)
    assert os.path.exists(out / "summary.txt")
    assert not [name for name in os.listdir(out) if ".tmp" in name]

    # best_config.json is a complete FitConfig holding the best trial's values.
    best = max(completed, key=lambda t: t["score"])
    config = resolve(load_config_file(out / "best_config.json"))
    assert config.model_config["depth"] == best["hyperparameters"]["depth"]
    assert config.model_config["filters"] == 4
    assert config.model_config["dropout"] == pytest.approx(best["hyperparameters"]["dropout"])
    assert config.learning_rate == pytest.approx(best["hyperparameters"]["learning_rate"])
    assert config.loss == best["hyperparameters"]["loss"]
    # The Dice weight is searched as a number and reaches fit's loss_options (bce_dice only).
    assert 0.25 <= best["hyperparameters"]["dice_weight"] <= 2.0
    if config.loss == "bce_dice":
        assert config.loss_options["dice_weight"] == pytest.approx(best["hyperparameters"]["dice_weight"])
    else:
        assert "dice_weight" not in config.loss_options
    assert (config.tile, config.data, config.seed, config.out) == (64, "sample", 3, "")
    return config


def test_random_search_and_round_trip_into_fit(tmp_path):
    out = tmp_path / "random"
    path, lines = _search(out, "random")
    assert path == str(out / "best_config.json")
    _check_outputs(out, lines)
    # The best trial retrains with training.fit from the file alone.
    # (Kept short: 1 epoch, no post-processing grid, one test image.)
    config = resolve(load_config_file(path), {"epochs": 1, "steps_per_epoch": 2, "tune_postprocess": False,
                                              "test_fraction": 0.03, "out": str(tmp_path / "retrain")})
    run = fit.run(config, log=lambda m: None)
    assert os.path.exists(os.path.join(run, "model.keras"))
    saved = json.load(open(os.path.join(run, "config.json")))
    assert saved["model_config"] == config.model_config and saved["loss"] == config.loss


def test_hyperband_search(tmp_path):
    out = tmp_path / "hyperband"
    _, lines = _search(out, "hyperband")
    _check_outputs(out, lines)
    # An existing search folder is not silently reused.
    with pytest.raises(tune.TuneError, match="exists"):
        _search(out, "hyperband")


def test_all_trials_failing_is_an_error_not_silence(tmp_path, monkeypatch):
    # The PLATFORM trap: without tensorboard every trial fails inside fit, and Keras Tuner
    # (< 3 consecutive failures) returns from search() as if all were well.
    real = tune.make_hypermodel

    def broken(*args, **kwargs):
        hypermodel = real(*args, **kwargs)

        def fit(hp, model, *a, **k):
            raise ImportError("No module named 'tensorboard'")

        hypermodel.fit = fit
        return hypermodel

    monkeypatch.setattr(tune, "make_hypermodel", broken)
    out = tmp_path / "broken"
    with pytest.raises(tune.TuneError, match="no trial completed") as caught:
        _search(out, "random")
    assert "tensorboard" in str(caught.value) and "pip install" in str(caught.value)
    trials = json.load(open(out / "trials.json"))["trials"]
    assert len(trials) == 2 and all(t["status"] != "COMPLETED" and "tensorboard" in t["error"] for t in trials)
    assert not os.path.exists(out / "best_config.json")


def test_missing_tensorboard_is_reported_before_searching(tmp_path, monkeypatch):
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the tensorboard trap is specific to the TensorFlow backend")
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(tune.TuneError, match="tensorboard is not installed"):
        tune.run(resolve(overrides=TINY), str(tmp_path / "x"), max_trials=1)


def test_search_space_follows_the_model_and_tile():
    space = {s["name"]: s for s in tune.search_space(resolve(overrides={
        "model": "unet", "tile": 128, "model_config": {"filters": 16, "depth": 4}}))}
    assert space["filters"]["values"] == [8, 16, 32] and space["depth"]["values"] == [3, 4, 5]
    assert space["learning_rate"]["range"] == pytest.approx([1e-4, 1e-2]) and "dropout" in space
    tile40 = resolve(overrides={"model": "unet", "tile": 40, "model_config": {"depth": 3}})
    assert {s["name"]: s for s in tune.search_space(tile40)}["depth"]["values"] == [2, 3]  # 40 % 16 != 0
    # SegNet's builder has no dropout: it is not searched, and asking for it is an error.
    segnet = resolve(overrides={"model": "segnet", "tile": 64, "model_config": {"depth": 3}})
    assert "dropout" not in {s["name"] for s in tune.search_space(segnet)}
    with pytest.raises(tune.TuneError, match="no dropout"):
        tune.search_space(segnet, dropout_range=(0.1, 0.3))
    # A fixed loss keeps val_loss as the objective; a searched one switches to val_iou.
    fixed = tune.search_space(segnet, losses=["bce"])
    assert tune.choose_objective("auto", fixed, segnet) == ("val_loss", "min")
    assert tune.choose_objective("auto", tune.search_space(segnet), segnet) == ("val_iou", "max")
    with pytest.raises(ValueError, match="unknown loss"):
        tune.search_space(segnet, losses=["nope"])


def test_unavailable_task_and_flags():
    with pytest.raises(tune.TuneError, match="not available"):
        tune.task_module("no_such_task")
    args = tune.build_parser().parse_args(
        ["--model", "unet", "--tile", "64", "--tuner", "hyperband", "--max-trials", "4", "--max-epochs", "3",
         "--lr-range", "1e-4,1e-2", "--filters", "8,16", "--losses", "bce,bce_dice", "--out", "d"])
    assert (args.tuner, args.max_trials, args.max_epochs, args.filters) == ("hyperband", 4, 3, [8, 16])
    assert args.lr_range == (1e-4, 1e-2) and args.losses == ["bce", "bce_dice"] and args.tile == 64


def test_dice_weight_is_searched_as_a_number():
    unet = resolve(overrides={"model": "unet", "tile": 64, "loss": "bce_dice", "model_config": {"depth": 3}})
    space = {s["name"]: s for s in tune.search_space(unet, losses=["bce_dice"])}
    assert space["dice_weight"]["range"] == [0.25, 2.0] and space["dice_weight"]["target"] == "loss_options"
    # Only the weight varies, yet losses of different weights are not comparable: val_iou decides.
    assert tune.choose_objective("auto", list(space.values()), unet) == ("val_iou", "max")
    weighted = tune.apply_values(unet, list(space.values()), {"dice_weight": 0.4, "loss": "bce_dice"})
    assert weighted.loss == "bce_dice" and weighted.loss_options == {"dice_weight": 0.4}
    # A trial that picks another loss gets no Dice weight.
    both = tune.search_space(unet)
    assert tune.apply_values(unet, both, {"dice_weight": 0.4, "loss": "bce"}).loss_options == {}
    # Fixed (1,1) keeps val_loss; a range without bce_dice is an error.
    fixed = tune.search_space(unet, losses=["bce_dice"], dice_weight_range=(1.0, 1.0))
    assert tune.choose_objective("auto", fixed, unet) == ("val_loss", "min")
    with pytest.raises(tune.TuneError, match="needs the bce_dice loss"):
        tune.search_space(unet, losses=["bce"], dice_weight_range=(0.5, 1.5))
    assert tune.build_parser().parse_args(["--dice-weight-range", "0.5,1.5"]).dice_weight_range == (0.5, 1.5)


def test_distributed_role_comes_from_keras_tuners_variables(monkeypatch, tmp_path):
    for name in tune.DISTRIBUTED_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert tune.distributed_role() is None
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "tuner3")
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    with pytest.raises(tune.TuneError, match="missing KERASTUNER_ORACLE_PORT"):
        tune.distributed_role()
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", "8000")
    assert tune.distributed_role() == ("worker", "tuner3")
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "chief")
    assert tune.distributed_role() == ("chief", "chief")
    # A worker that started first leaves only its trial files: the chief may still start there.
    (tmp_path / "tuner" / tune.PROJECT / "trial_0").mkdir(parents=True)
    (tmp_path / "tuner" / tune.PROJECT / "tuner1.json").write_text("{}")
    assert not tune._holds_a_search(str(tmp_path))
    (tmp_path / "tuner" / tune.PROJECT / "oracle.json").write_text("{}")
    assert tune._holds_a_search(str(tmp_path))
