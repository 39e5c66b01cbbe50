"""bench/reproduce.py: the table comes from the run folders only, beside the papers' figures."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "reproduce.py")
MACHINE = {"cpus": 2, "platform": "test"}


def _run_folder(path, config, metrics):
    os.makedirs(path)
    json.dump({"epochs": 150, "model_config": {}, "backend": "jax", "machine": MACHINE, **config},
              open(os.path.join(path, "config.json"), "w"))
    json.dump(metrics, open(os.path.join(path, "metrics.json"), "w"))
    return str(path)


def test_table_from_fold_detection_and_classifier_runs(tmp_path):
    folds = _run_folder(tmp_path / "r2", {"task": "segmentation", "model": "r2unet", "time_budget": 3.0,
                                          "data": "dsb2018:../shared/data/dsb2018/stage1_train",
                                          "model_config": {"filters": 12}},
                        {"folds": 2, "mean": {"dice": 0.8, "aji": 0.6}, "std": {"dice": 0.05, "aji": 0.01},
                         "per_fold": [{"epochs": 7, "train_seconds": 170}, {"epochs": 8, "train_seconds": 175}]})
    detection = _run_folder(tmp_path / "ud", {"task": "detection", "model": "udnet", "match_radius": 6.0,
                                              "data": "crchisto:../shared/data/crchistophenotypes"},
                            {"f1": 0.7, "precision": 0.65, "recall": 0.76, "epochs": 12, "train_seconds": 700})
    classifier = _run_folder(tmp_path / "dc", {"task": "classification", "model": "dcrn",
                                               "data": "crchisto:../shared/data/crchistophenotypes"},
                             {"macro_f1": 0.6, "accuracy": 0.7, "epochs": 9, "train_seconds": 500,
                              "per_class": [{"name": "epithelial", "f1": 0.8}, {"name": "others", "f1": 0.3}]})
    out = tmp_path / "results"
    subprocess.run([sys.executable, SCRIPT, folds, detection, classifier, "--results", str(out)],
                   check=True, capture_output=True, text=True)
    rows = json.load(open(out / "reproduce.json"))
    by = {(r["model"], r["metric"]): r for r in rows}
    dice = by[("r2unet", "dice")]
    assert (dice["ours"], dice["std"], dice["folds"], dice["published"]) == (0.8, 0.05, 2, 0.919)
    assert dice["epochs_run"] == "7/8" and dice["wall_seconds"] == 345 and dice["time_budget"] == 3.0
    assert by[("r2unet", "aji")]["published"] is None
    # Detection figures carry the matching radius; the classifier's per-class F1 is kept.
    assert by[("udnet", "f1 @ 6 px")]["published"] == 0.828 and ("udnet", "precision @ 6 px") in by
    assert by[("dcrn", "macro_f1")]["per_class_f1"] == {"epithelial": 0.8, "others": 0.3}
    text = open(out / "reproduce.md").read()
    assert "| 0.800 +- 0.050 | 2 | 0.919 (Alom et al. 2022, 5-fold) | 7/8 (150) | 3 | 345 |" in text
    assert "| dcrn | crchisto | 0.800 | 0.300 |" in text and "filters 12" in text


def test_keep_carries_earlier_rows_that_no_new_run_replaces(tmp_path):
    data = "monuseg:../shared/data/monuseg2018/train"
    old = _run_folder(tmp_path / "old", {"task": "segmentation", "model": "unet", "data": data},
                      {"dice": 0.7, "aji": 0.4, "epochs": 9})
    replaced = _run_folder(tmp_path / "fcn_old", {"task": "segmentation", "model": "fcn8", "data": data},
                           {"dice": 0.5, "aji": 0.2, "epochs": 3})
    new = _run_folder(tmp_path / "fcn_new", {"task": "segmentation", "model": "fcn8", "data": data},
                      {"dice": 0.6, "aji": 0.3, "epochs": 4})
    out = tmp_path / "results"
    run = lambda *runs: subprocess.run([sys.executable, SCRIPT, *runs, "--results", str(out), "--keep"],  # noqa: E731
                                       check=True, capture_output=True, text=True)
    run(old, replaced)
    run(new)
    rows = json.load(open(out / "reproduce.json"))
    assert sorted((r["model"], r["metric"], r["ours"]) for r in rows) == [
        ("fcn8", "aji", 0.3), ("fcn8", "dice", 0.6), ("unet", "aji", 0.4), ("unet", "dice", 0.7)]
    text = open(out / "reproduce.md").read()
    assert "Rows kept from the previous table" in text and "0.8467 (Kumar" not in text  # 3 decimals
    assert "| fcn8 | dice | 0.600 |" in text and "0.847 (Kumar et al. 2020 (pixel F1))" in text


def test_a_folder_without_metrics_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    result = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "half"), "--results", str(tmp_path / "r")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "no metrics.json" in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", sorted(os.path.splitext(name)[0]
                                         for name in os.listdir(os.path.join(ROOT, "configs", "cpu"))))
def test_cpu_budget_configs_are_valid_and_capped(name):
    from training.config import load_config_file, resolve

    path = os.path.join(ROOT, "configs", "cpu", name + ".json")
    config = resolve(load_config_file(path))
    assert 0 < config.time_budget <= 30  # the CPU budget: at most ~30 minutes per model
    assert "Deviations" in json.load(open(path))["_comment"]
