"""Three-class (background / inside / boundary) segmentation training, and extra training data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kerasnuc.data import load_dataset
from kerasnuc.data.splits import is_colour, select_records
from kerasnuc.data.targets import three_class
from training.config import FitConfig as Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**values):
    base = {"task": "segmentation", "model": "unet", "model_config": {"filters": 4, "depth": 2, "out_channels": 3},
            "target": "three_class", "loss": "cce_dice", "tile": 32}
    return Config.from_dict({**base, **values})


def test_three_class_config_checks_channels_and_loss():
    _config().validate()
    with pytest.raises(ValueError, match="out_channels 3"):
        _config(model_config={"filters": 4, "depth": 2}).validate()
    with pytest.raises(ValueError, match="cce_dice"):
        _config(loss="bce_dice").validate()
    with pytest.raises(ValueError, match="target must be one of"):
        _config(target="contours").validate()
    with pytest.raises(ValueError, match="'only' must be"):
        _config(extra_train_data=[{"data": "sample", "only": "red"}]).validate()


def test_cce_dice_prefers_the_true_softmax():
    from kerasnuc.losses import get_loss

    labels = load_dataset("sample")[0].labels[:64, :64]
    truth = three_class(labels)[None]
    loss = get_loss("cce_dice")
    near = np.clip(truth * 0.9 + 0.05, 0, 1).astype(np.float32)
    flat = np.full_like(truth, 1 / 3)
    assert float(loss(truth, near)) < 0.5 * float(loss(truth, flat))


def test_colour_selection_on_the_sample():
    records = load_dataset("sample")
    colour, grey = select_records(records, "colour"), select_records(records, "grey")
    assert len(colour) + len(grey) == len(records) and colour and grey
    assert all(is_colour(r.image) for r in colour) and not any(is_colour(r.image) for r in grey)
    assert select_records(records, "") == records


def test_tuning_three_class_maps_of_the_truth_recovers_the_nuclei():
    from training.segmentation import tune_postprocess

    records = load_dataset("sample")[:3]
    maps = [three_class(r.labels) for r in records]
    params, score = tune_postprocess(maps, records, {"min_area": 1}, log=lambda message: None)
    assert "boundary_threshold" in params and score > 0.9


def test_fit_three_class_with_extra_training_images(tmp_path):
    """A tiny three-class run on the sample's grey images, the colour ones added as training-only
    data: the split trains on them, never tests on them; thresholds carry the boundary level."""
    config = {"task": "segmentation", "model": "unet", "model_config": {"filters": 4, "depth": 2, "out_channels": 3},
              "target": "three_class", "loss": "cce_dice", "data": "sample", "channels": 3, "epochs": 1,
              "steps_per_epoch": 2, "batch_size": 2, "tile": 32, "val_fraction": 0.2, "test_fraction": 0.2,
              "extra_train_data": [{"data": "sample", "only": "colour"}]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    run = tmp_path / "run"
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    done = subprocess.run([sys.executable, "-m", "training.fit", "--config", str(path), "--out", str(run)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    split = json.loads((run / "split.json").read_text())
    extra = [n for n in split["train"] if n.startswith("extra0:")]
    assert len(extra) == 10 and not any(n.startswith("extra") for n in split["val"] + split["test"])
    assert "boundary_threshold" in json.loads((run / "thresholds.json").read_text())["postprocess"]
    from kerasnuc.runs import records_of_split

    train = records_of_split(str(run), "train")  # what int8 calibration and packing read back
    assert [r.name for r in train] == split["train"]
    import kerasnuc

    image = load_dataset("sample")[0].image
    maps = kerasnuc.load(str(run)).predict_maps(image)[0]
    assert maps.shape == image.shape[:2] + (3,)
    np.testing.assert_allclose(maps.sum(axis=-1), 1.0, atol=1e-3)  # a softmax


RECIPES = sorted(name[:-len(".json")] for name in os.listdir(os.path.join(ROOT, "configs", "pretrained")))


@pytest.mark.parametrize("name", RECIPES)
def test_pretrained_recipes_are_valid_configs(name):
    """The retraining recipes that the model cards quote resolve and validate as written; a recipe
    continuing another stage starts from the run folder another recipe writes ("out")."""
    from training.config import load_config_file, resolve

    path = os.path.join(ROOT, "configs", "pretrained", f"{name}.json")
    values = load_config_file(path)
    source = values.pop("init_weights", "")
    if source:
        outs = [load_config_file(os.path.join(ROOT, "configs", "pretrained", f"{other}.json")).get("out")
                for other in RECIPES if other != name]
        assert source in outs, f"{name}: init_weights {source} is no other recipe's out"
    config = resolve(values)
    assert config.time_budget > 0 and config.data
    if name in ("fluo", "he"):
        assert config.target == "three_class" and config.model_config["out_channels"] == 3
