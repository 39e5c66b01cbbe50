"""Pretrained models by name: the registry, the licence table, the packing tool
(``python -m export.pretrained``) on a tiny run trained here, loading a packed name through the
API, the CLI and LiteRT without Keras, and the four models shipped in the package (these fail
with "not packed yet" until the lead engineer packs the real runs)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from import_blocker import FRAMEWORKS, LEAK_CHECK, PREAMBLE, environment  # noqa: E402

from kerasnuc import pretrained  # noqa: E402
from kerasnuc.pretrained import licences  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("fluo", "he", "crc-detect", "crc-classify")
FLUO_IMAGE = os.path.join(REPO, "kerasnuc", "data", "sample", "images",
                          "0bda515e370294ed94efd36bd53782288acacb040c171df2ed97fd691fc9d8fe.png")
HE_IMAGE = os.path.join(REPO, "kerasnuc", "data", "sample", "he", "472b1c5f_crop.png")
TINY = {"task": "segmentation", "model": "unet", "model_config": {"filters": 8, "depth": 3}, "data": "sample",
        "channels": 3, "epochs": 1, "steps_per_epoch": 3, "batch_size": 8, "tile": 64, "learning_rate": 0.003,
        "seed": 1}


def _python(args, timeout=600, env=None, cwd=REPO):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env or {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def _read_rgb(path):
    from kerasnuc.data.imageio import read_image

    return read_image(path, channels=3)


# ------------------------------------------------------------------ registry and licences


def test_available_lists_the_four_names_with_one_line_each():
    names = pretrained.available()
    assert tuple(names) == NAMES
    assert all(isinstance(text, str) and text and "\n" not in text for text in names.values())


def test_unknown_names_are_one_clear_error_listing_the_known():
    with pytest.raises(pretrained.UnknownModel) as error:
        pretrained.path("hee")
    assert all(name in str(error.value) for name in NAMES)
    with pytest.raises(FileNotFoundError) as error:  # what kerasnuc.load / the CLI see
        pretrained.resolve("hee")
    assert "hee" in str(error.value) and all(name in str(error.value) for name in NAMES)
    with pytest.raises(pretrained.UnknownModel):
        pretrained.card("nope")


def test_paths_and_local_folders_win_over_names(tmp_path, monkeypatch):
    assert pretrained.resolve("runs/some-run") == "runs/some-run"  # not a bare name: left to the runtimes
    assert pretrained.resolve("127.0.0.1:8500") == "127.0.0.1:8500"
    monkeypatch.chdir(tmp_path)
    os.mkdir("he")
    assert pretrained.resolve("he") == "he"  # a folder of that name here is what the user means


def test_importing_the_registry_needs_no_framework():
    script = PREAMBLE + ("import kerasnuc, kerasnuc.pretrained as p\n"
                         "assert kerasnuc.pretrained is p and len(p.available()) == 4\n"
                         "from kerasnuc.pretrained import licences\n"
                         "licences.licences_of({'data': 'monuseg:x'})\n") + LEAK_CHECK
    result = _python(["-c", script], timeout=120, env=environment(FRAMEWORKS))
    assert result.returncode == 0, result.stderr[-2000:]


def test_licence_table_gives_the_models_terms():
    monuseg = licences.licences_of({"data": "monuseg:../shared/data/monuseg2018/train", "test_data": ""})
    assert [item["licence"] for item in monuseg] == ["CC BY-NC-SA 4.0"]
    terms = licences.model_terms(monuseg)
    assert not terms["commercial"] and terms["share_alike"] and not terms["research_only"]
    assert "Non-commercial" in terms["summary"] and "CC BY-NC-SA 4.0" in terms["summary"]
    crc = licences.model_terms(licences.licences_of({"data": "crchisto:/data/crc"}))
    assert crc["research_only"] and "Research use only" in crc["summary"]
    both = licences.licences_of({"data": "monuseg:/a + dsb2018:/b", "test_data": "dsb2018:/c"})
    assert [item["format"] for item in both] == ["monuseg", "dsb2018"]
    he = licences.licences_of({"data": "monuseg:/m", "extra_train_data": [{"data": "dsb2018:/d", "only": "colour"}]})
    assert [item["format"] for item in he] == ["monuseg", "dsb2018"]
    assert not licences.model_terms(he)["commercial"]  # the strictest licence decides
    sample = licences.licences_of({"data": "sample"})
    assert sample[0]["licence"] == "CC0 1.0" and licences.model_terms(sample)["commercial"]
    with pytest.raises(licences.LicenceError, match="no licence known for format folder"):
        licences.licences_of({"data": "folder:/somewhere/else"})


# ------------------------------------------------------------------ the packing tool, on a tiny run


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A tiny run trained from its own config file, packed as ``fluo`` into a tmp destination."""
    folder = tmp_path_factory.mktemp("pretrained")
    config = folder / "tiny.json"
    config.write_text(json.dumps(TINY))
    run = folder / "run"
    result = _python(["-m", "training.fit", "--config", str(config), "--out", str(run)])
    assert result.returncode == 0, result.stderr[-3000:]
    dest = folder / "dest"
    result = _python(["-m", "export.pretrained", str(run), "--name", "fluo", "--config", str(config),
                      "--dest", str(dest), "--calibration", "8", "--max-images", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    return {"run": str(run), "dest": str(dest), "config": str(config), "model": str(dest / "fluo")}


def test_packed_folder_is_a_slim_run_with_int8_and_cards(packed):
    files = set(os.listdir(packed["model"]))
    assert files == {"model.keras", "config.json", "split.json", "thresholds.json", "metrics.json",
                     "model_int8.tflite", "model_int8.json", "card.json", "MODEL_CARD.md"}
    assert os.listdir(packed["dest"]) == ["fluo"]  # no staging folder left behind
    # re-saved without optimizer state: smaller than the run's, same weights
    assert os.path.getsize(os.path.join(packed["model"], "model.keras")) < \
        os.path.getsize(os.path.join(packed["run"], "model.keras"))
    from kerasnuc.runs import read_keras_file

    ours = read_keras_file(os.path.join(packed["model"], "model.keras")).get_weights()
    theirs = read_keras_file(os.path.join(packed["run"], "model.keras")).get_weights()
    assert len(ours) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(ours, theirs))


def test_card_states_licences_and_the_runs_own_scores(packed):
    card = json.load(open(os.path.join(packed["model"], "card.json")))
    metrics = json.load(open(os.path.join(packed["run"], "metrics.json")))
    config = json.load(open(os.path.join(packed["run"], "config.json")))
    split = json.load(open(os.path.join(packed["run"], "split.json")))
    scores = card["held_out"]["scores"]
    assert {"aji", "pq", "f1", "dice"} <= set(scores)
    assert all(scores[key] == metrics["mean"][key] for key in scores)
    assert card["held_out"]["images"] == metrics["images"] == len(split["test"]) == len(card["held_out"]["names"])
    assert card["training"]["seconds"] == metrics["train_seconds"]
    assert card["training"]["machine"] == config["machine"] and card["training"]["backend"] == config["backend"]
    assert card["training"]["retrain"] == f"python -m training.fit --config {packed['config']}"
    assert card["data"]["licences"][0]["licence"] == "CC0 1.0" and card["licence"]["commercial"]
    tuned = json.load(open(os.path.join(packed["run"], "thresholds.json")))
    assert card["postprocess"]["params"] == tuned["postprocess"] and card["postprocess"]["tuned_on"] == "val"
    assert card["model"]["parameters"] > 0 and card["int8"]["agreement_images"] == 2
    text = open(os.path.join(packed["model"], "MODEL_CARD.md")).read()
    for needed in ("CC0 1.0", f"{metrics['mean']['aji']:.4f}", f"{metrics['mean']['pq']:.4f}",
                   card["training"]["retrain"], "Limitations", split["test"][0]):
        assert needed in text, needed


def test_name_loads_through_api_and_cli(packed, monkeypatch, tmp_path):
    import kerasnuc
    from kerasnuc.predict.__main__ import main

    monkeypatch.setattr(pretrained, "ROOT", packed["dest"])
    predictor = kerasnuc.load("fluo")
    assert os.path.samefile(predictor.runtime.path, packed["model"])
    labels, table = predictor.predict_instances(_read_rgb(FLUO_IMAGE))
    assert labels.max() > 0 and len(table["id"]) == len(np.unique(labels)) - 1
    monkeypatch.chdir(tmp_path)  # no file or folder named fluo here
    assert main(["fluo", FLUO_IMAGE, "--out", "nuclei", "--format", "labels,csv"]) == 0
    stem = os.path.splitext(os.path.basename(FLUO_IMAGE))[0]
    assert sorted(os.listdir("nuclei")) == sorted([f"{stem}_labels.tif", f"{stem}_nuclei.csv"])


LITERT_ONLY = r'''
import sys
import numpy as np
import kerasnuc, kerasnuc.pretrained as pretrained
from kerasnuc.data.imageio import read_image
pretrained.ROOT = sys.argv[1]
first = kerasnuc.load("fluo")
again = kerasnuc.load("fluo")
assert type(first.runtime).__name__ == "LiteModel", type(first.runtime)
assert first.runtime.path.endswith("model_int8.tflite")
labels, table = first.predict_instances(read_image(sys.argv[2], channels=3))
assert labels.max() > 0, "no nuclei"
print("nuclei", len(table["id"]))
'''


def test_without_keras_a_name_runs_the_int8_tflite(packed):
    result = _python(["-c", PREAMBLE + LITERT_ONLY + LEAK_CHECK, packed["dest"], FLUO_IMAGE], timeout=300,
                     env=environment(FRAMEWORKS))
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if "Keras is not installed" in line]
    assert len(notes) == 1 and "model_int8.tflite" in notes[0] and "LiteRT" in notes[0], result.stderr[-2000:]


def _write_run(path, model, model_config):
    from kerasnuc.runs import write_json_atomic, write_run

    write_run(path, model, model_name="unet", model_config=model_config, data="sample")
    write_json_atomic(os.path.join(path, "metrics.json"), {"split": "test", "images": 0, "mean": {}})
    return path


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    """A run whose model.keras exceeds 8 MB even without optimizer state (3.9 M parameters)."""
    from kerasnuc import models

    model = models.build("unet", input_shape=(None, None, 3), filters=24, depth=4)
    folder = tmp_path_factory.mktemp("big")
    run = _write_run(str(folder / "run"), model, {"filters": 24, "depth": 4})
    config = folder / "big.json"
    config.write_text(json.dumps({"model": "unet", "model_config": {"filters": 24, "depth": 4}, "data": "sample"}))
    return run, str(config)


def test_refuses_a_model_over_8_mb_and_leaves_the_old_model(big_run, packed, tmp_path):
    from export.pretrained import MAX_KERAS_BYTES, PackError, pack

    assert MAX_KERAS_BYTES == 8 * 10 ** 6
    dest = tmp_path / "dest"
    shutil.copytree(packed["model"], dest / "fluo")  # a model packed before
    before = {name: open(dest / "fluo" / name, "rb").read() for name in os.listdir(dest / "fluo")}
    run, config = big_run
    with pytest.raises(PackError, match=r"MB without optimizer state .* over the 8 MB"):
        pack(run, "fluo", config, dest=str(dest), log=lambda message: None)
    assert os.listdir(dest) == ["fluo"]  # no staging folder
    assert {name: open(dest / "fluo" / name, "rb").read() for name in os.listdir(dest / "fluo")} == before
    result = _python(["-m", "export.pretrained", run, "--name", "he", "--config", config, "--dest", str(dest)])
    assert result.returncode == 1 and "over the 8 MB" in result.stderr.splitlines()[-1]
    assert os.listdir(dest) == ["fluo"]


def test_a_failed_export_leaves_no_half_written_folder(packed, tmp_path, monkeypatch):
    import export.tflite
    from export.pretrained import pack

    def broken(run_dir, quantize, out, **options):
        with open(out, "wb") as handle:  # half a model, then the converter dies
            handle.write(b"TFL3")
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(export.tflite, "export_tflite", broken)
    dest = tmp_path / "dest"
    with pytest.raises(RuntimeError, match="converter crashed"):
        pack(packed["run"], "fluo", packed["config"], dest=str(dest), log=lambda message: None)
    assert not dest.exists()  # the destination it made is removed again: nothing half-written


def test_refuses_a_config_the_run_was_not_trained_from(packed, tmp_path):
    from export.pretrained import PackError, pack

    with pytest.raises(PackError, match="not trained from this file.*epochs: 30 in the file, 1 in the run"):
        pack(packed["run"], "fluo", os.path.join(REPO, "configs", "unet_sample.json"), dest=str(tmp_path),
             log=lambda message: None)
    with pytest.raises(PackError, match="not a shipped model name"):
        pack(packed["run"], "fluo-v2", packed["config"], dest=str(tmp_path), log=lambda message: None)
    assert os.listdir(tmp_path) == []


def test_a_run_continuing_another_gets_every_stage_in_its_retraining_command(packed, tmp_path):
    """A run whose init_weights is a run folder is retrained by the config that trained that
    folder (its "out"), then its own; a folder no recipe trains cannot be packed."""
    from export.pretrained import PackError, retrain_command, stage_records

    base = {**TINY, "out": packed["run"]}
    (tmp_path / "base.json").write_text(json.dumps(base))
    second = {**TINY, "init_weights": packed["run"], "learning_rate": 1e-4}
    (tmp_path / "second.json").write_text(json.dumps(second))
    run_config = {**json.load(open(os.path.join(packed["run"], "config.json"))), **second}
    assert retrain_command(str(tmp_path / "second.json"), run_config) == \
        f"python -m training.fit --config {tmp_path / 'base.json'} && " \
        f"python -m training.fit --config {tmp_path / 'second.json'}"
    [stage] = stage_records(str(tmp_path / "second.json"), run_config)
    assert stage["epochs_run"] == 1 and stage["seconds"] > 0
    (tmp_path / "base.json").unlink()
    with pytest.raises(PackError, match="no config file in .* trains"):
        retrain_command(str(tmp_path / "second.json"), run_config)


# ------------------------------------------------------------------ the models shipped in the package


def shipped(name):
    """The shipped folder of ``name``; the test fails (not skips) while it is not packed."""
    try:
        return pretrained.path(name)
    except pretrained.NotPacked as error:
        pytest.fail(f"{name}: not packed yet: {error}")


@pytest.mark.parametrize("name", NAMES)
def test_shipped_model_finds_nuclei(name):
    import kerasnuc

    shipped(name)
    if name in ("fluo", "he"):
        labels, table = kerasnuc.load(name).predict_instances(_read_rgb(FLUO_IMAGE if name == "fluo" else HE_IMAGE))
        assert labels.max() > 0 and len(table["id"]) >= 5
        return
    shipped("crc-detect")
    predictor = kerasnuc.load("crc-detect", classifier="crc-classify" if name == "crc-classify" else None)
    image = _read_rgb(HE_IMAGE)
    points = predictor.predict_points(image)
    assert len(points) >= 5
    if name == "crc-classify":
        shipped("crc-classify")
        scores = predictor.classifier.classify(image, points)
        assert scores.shape == (len(points), 4) and np.allclose(scores.sum(axis=1), 1, atol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_shipped_card_states_licence_retraining_and_scores(name):
    folder = shipped(name)
    card = pretrained.card_data(name)
    text = pretrained.card(name)
    config = json.load(open(os.path.join(folder, "config.json")))
    metrics = json.load(open(os.path.join(folder, "metrics.json")))
    assert [item["licence"] for item in card["data"]["licences"]] == \
        [item["licence"] for item in licences.licences_of(config)]
    assert all(item["licence"] in text for item in card["data"]["licences"])
    commands = card["training"]["retrain"].split(" && ")
    assert commands[-1] == f"python -m training.fit --config configs/pretrained/{name}.json"
    for command in commands:  # every stage's recipe is in the repository
        assert command.startswith("python -m training.fit --config configs/pretrained/")
        assert os.path.isfile(os.path.join(REPO, command.split("--config ")[1]))
    assert len(card["training"].get("earlier_stages") or []) == len(commands) - 1
    block = metrics[card["held_out"]["block"]]
    assert card["held_out"]["scores"] and all(block[k] == v for k, v in card["held_out"]["scores"].items())
    assert os.path.getsize(os.path.join(folder, "model.keras")) <= 8 * 10 ** 6


@pytest.mark.parametrize("command", [("fluo", FLUO_IMAGE), ("he", HE_IMAGE),
                                     ("he", HE_IMAGE, "--classifier", "crc-classify")],
                         ids=["fluo", "he", "he+crc-classify"])
def test_cli_by_name_writes_its_outputs(command, tmp_path):
    for name in command:
        if name in NAMES:
            shipped(name)
    result = _python(["-m", "kerasnuc.predict", *command, "--out", str(tmp_path / "out")], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    stem = os.path.splitext(os.path.basename(command[1]))[0]
    written = set(os.listdir(tmp_path / "out"))
    assert {f"{stem}_labels.tif", f"{stem}.geojson", f"{stem}_nuclei.csv", f"{stem}_overlay.png"} <= written
    if "--classifier" in command:
        geojson = json.load(open(tmp_path / "out" / f"{stem}.geojson"))
        assert geojson["features"] and all("classification" in f["properties"] for f in geojson["features"])


def test_cli_refuses_a_label_image_from_a_detector_in_one_line(tmp_path):
    from kerasnuc import models
    from kerasnuc.predict.__main__ import main
    from kerasnuc.runs import write_run

    config = {"filters": 4, "depth": 2, "steps": 1}
    run = write_run(str(tmp_path / "det"), models.build("udnet", input_shape=(None, None, 3), **config),
                    task="detection", model_name="udnet", model_config=config)
    with pytest.raises(SystemExit) as stop:
        main([run, FLUO_IMAGE, "--out", str(tmp_path / "out"), "--format", "labels,csv"])
    assert "is a detection model: it finds nucleus centres, not outlines" in str(stop.value.code)
    assert not os.path.exists(tmp_path / "out")


def test_cli_writes_a_detectors_classified_centres(tmp_path):
    """crc-detect + crc-classify from the command line: Point detections with classes in the
    GeoJSON, the same centres in the CSV, dots on the overlay, no label image."""
    import csv

    import kerasnuc
    from kerasnuc.predict.__main__ import main

    shipped("crc-detect"), shipped("crc-classify")
    out = tmp_path / "out"
    assert main(["crc-detect", HE_IMAGE, "--out", str(out), "--classifier", "crc-classify"]) == 0
    assert sorted(os.listdir(out)) == ["472b1c5f_crop.geojson", "472b1c5f_crop_nuclei.csv",
                                       "472b1c5f_crop_overlay.png"]
    features = json.load(open(out / "472b1c5f_crop.geojson"))["features"]
    rows = list(csv.DictReader(open(out / "472b1c5f_crop_nuclei.csv")))
    assert len(features) == len(rows) >= 5
    assert {f["geometry"]["type"] for f in features} == {"Point"}
    names = set(kerasnuc.load("crc-classify").meta["class_names"])
    assert {f["properties"]["classification"]["name"] for f in features} <= names
    assert {row["class"] for row in rows} <= names and list(rows[0])[:4] == ["id", "centroid_x", "centroid_y", "score"]
    points = kerasnuc.load("crc-detect").predict_points(_read_rgb(HE_IMAGE))
    np.testing.assert_allclose(sorted(float(r["centroid_x"]) - 0.5 for r in rows), sorted(points[:, 0]), atol=1e-3)


def test_detector_blocks_find_each_centre_once():
    """A detection model run in 128 px blocks finds the centres one block finds: none lost or
    doubled at the seams."""
    import kerasnuc

    shipped("crc-detect")
    image = _read_rgb(HE_IMAGE)
    whole = kerasnuc.load("crc-detect").predict_points(image)
    blocked = kerasnuc.load("crc-detect", block=128).predict_points(image)
    assert len(whole) >= 5 and abs(len(blocked) - len(whole)) <= 1
    from scipy.spatial import cKDTree

    distance, _ = cKDTree(whole).query(blocked)
    assert np.mean(distance < 1.0) >= 0.97
