"""End-to-end: training.fit --task classification (DCRN on 32x32 nucleus patches) on a few
CRCHistoPhenotypes images; the split stays by image and the test scores every test nucleus."""

import csv
import json
import os

import numpy as np
import pytest

from training import classification, fit
from training.config import resolve

CRC_IMAGES = ("img3", "img4", "img5", "img13", "img19", "img24", "img25", "img31")
TINY = {"task": "classification", "model": "dcrn",
        "model_config": {"initial_filters": 8, "layers_per_block": 2, "growth": 4, "blocks": 3},
        "patch": 32, "batch_size": 16, "steps_per_epoch": 4, "epochs": 2, "optimizer": "sgd",
        "learning_rate": 1e-3, "weight_decay": 1e-4, "val_fraction": 0.25, "test_fraction": 0.25, "seed": 3}


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


def tiny_config(**overrides):
    # The model comes as a config file would give it: the defaults' U-Net model_config is
    # then dropped rather than merged into the classifier's.
    return resolve({"task": "classification", "model": TINY["model"]}, {**TINY, **overrides})


@pytest.fixture(scope="module")
def classification_run(crc_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dcrn"
    messages = []
    config = tiny_config(data=crc_spec, out=str(out))
    assert config.model_config == TINY["model_config"]
    path = fit.run(config, log=messages.append)
    return path, messages


def test_run_folder_has_the_classification_files(classification_run):
    path, messages = classification_run
    expected = {"config.json", "split.json", "model.keras", "history.csv", "curves.png",
                "metrics.json", "confusion.png"}
    assert expected <= set(os.listdir(path))
    assert not os.path.exists(path + ".incomplete")
    with open(os.path.join(path, "history.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == TINY["epochs"] and {"val_loss", "val_accuracy"} <= set(rows[0])
    assert any("using 'categorical'" in m for m in messages)


def test_metrics_cover_every_test_nucleus_and_nothing_else(classification_run, crc_spec):
    from kerasnuc.data import load_dataset

    path, _ = classification_run
    metrics = json.load(open(os.path.join(path, "metrics.json")))
    split = json.load(open(os.path.join(path, "split.json")))
    records = {r.name: r for r in load_dataset(crc_spec)}
    names = list(records["img3"].class_names)
    assert metrics["class_names"] == names and len(names) == 4
    # Split by image: the test patches are exactly the classified nuclei of the test images.
    assert [row["name"] for row in metrics["per_image"]] == split["test"]
    truth = np.concatenate([records[n].classes for n in split["test"]])
    assert metrics["pooled"]["n"] == len(truth) and metrics["primary"] == "pooled"
    assert [c["support"] for c in metrics["per_class"]] == np.bincount(truth, minlength=4).tolist()
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.shape == (4, 4) and matrix.sum() == len(truth)
    assert matrix.sum(axis=1).tolist() == np.bincount(truth, minlength=4).tolist()
    assert metrics["pooled"]["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    for key in ("accuracy", "macro_f1", "weighted_f1", "macro_roc_auc", "macro_average_precision"):
        assert 0.0 <= metrics["pooled"][key] <= 1.0, key
    for row in metrics["per_class"]:
        assert {"name", "precision", "recall", "f1", "support", "roc_auc", "average_precision"} <= set(row)
        for key in ("precision", "recall", "f1"):
            assert 0.0 <= row[key] <= 1.0
    assert metrics["loss"] == "categorical"


def test_evaluation_scores_a_perfect_and_a_wrong_classifier():
    y_true = np.array([0, 1, 2, 3, 3, 2, 1, 0, 0])
    names = ["epithelial", "inflammatory", "fibroblast", "others"]
    from kerasnuc.metrics import classification_report

    def report(scores):
        return classification_report(y_true, scores.argmax(axis=1), num_classes=4, class_names=names, y_score=scores)

    perfect = report(np.eye(4)[y_true])
    assert perfect["accuracy"] == 1.0 and perfect["macro_f1"] == 1.0 and perfect["macro_roc_auc"] == 1.0
    wrong = report(np.eye(4)[(y_true + 1) % 4])
    assert wrong["accuracy"] == 0.0 and wrong["macro_f1"] == 0.0 and wrong["macro_roc_auc"] < 0.5


def test_a_segmentation_model_is_refused(crc_spec, tmp_path):
    with pytest.raises(ValueError, match="patch classifier"):
        fit.run(resolve({"model": "unet"}, {**TINY, "model": "unet", "model_config": {}, "data": crc_spec,
                                            "out": str(tmp_path / "x")}), log=lambda m: None)
