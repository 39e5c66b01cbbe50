"""Fine-tuning: ``init_weights`` starts a run from a trained model's weights (training/warm_start.py)."""

import json
import os

import numpy as np
import pytest

from kerasnuc import models, pretrained
from kerasnuc.runs import load_model
from training import fit
from training.config import resolve
from training.warm_start import load_initial_weights

FLUO = {"filters": 12, "depth": 4, "out_channels": 3}  # configs/pretrained/fluo.json


def test_weights_are_copied_from_a_pretrained_name():
    model = models.build("unet", input_shape=(None, None, 3), **FLUO)
    path = load_initial_weights(model, "fluo", log=lambda m: None)
    assert path == os.path.join(pretrained.path("fluo"), "model.keras")
    source = load_model(pretrained.path("fluo"))
    for mine, theirs in zip(model.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(mine, theirs)


def test_another_architecture_is_refused_naming_the_file_and_weight():
    model = models.build("unet", input_shape=(None, None, 3), filters=8, depth=4, out_channels=3)
    with pytest.raises(ValueError, match=r"fluo/model\.keras: weight 0 .* shape \(3, 3, 3, 12\).*\(3, 3, 3, 8\)"):
        load_initial_weights(model, "fluo", log=lambda m: None)


@pytest.mark.parametrize("spec, message", [("no-such-model", "known: fluo"),
                                           ("kerasnuc/data/sample/he/472b1c5f_crop.png", "needs a Keras model"),
                                           ("missing/run", "no such run folder|not found")])
def test_a_bad_source_fails_before_training(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve(overrides={"init_weights": spec})


def test_fine_tuning_starts_from_the_pretrained_model(tmp_path):
    """With a learning rate too small to move the weights, a run started from 'fluo' segments the
    sample's test images as 'fluo' does, after 2 batches; a random start finds nothing like it."""
    overrides = {"model_config": FLUO, "target": "three_class", "loss": "cce_dice", "tile": 64, "batch_size": 2,
                 "steps_per_epoch": 2, "epochs": 1, "learning_rate": 1e-9, "tune_postprocess": False,
                 "init_weights": "fluo", "out": str(tmp_path / "tuned")}
    lines = []
    run = fit.run(resolve(overrides=overrides), log=lines.append)
    assert any(line.startswith("initial weights from") and "fluo" in line for line in lines)
    metrics = json.load(open(os.path.join(run, "metrics.json")))["mean"]
    assert metrics["aji"] > 0.4, metrics  # a random start scores about 0 here
    assert json.load(open(os.path.join(run, "config.json")))["init_weights"] == "fluo"
