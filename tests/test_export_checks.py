"""Exports check what they export: a model that does not fit the task its run claims, a corrupt
model.keras, a missing .tflite or a broken config / metadata JSON is one clear line naming the
file and the problem, the CLIs exit non-zero, and nothing is written. Tiny models, no training."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("ai_edge_litert")

from export import saved_model as sm  # noqa: E402
from export import tflite  # noqa: E402
from kerasnuc import models  # noqa: E402
from kerasnuc.model_checks import ModelMismatch, check_keras_model, shape_problems  # noqa: E402
from kerasnuc.predict.litert import LiteModel  # noqa: E402
from kerasnuc.runs import RunError, load_model, write_run  # noqa: E402
from serving import edge  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
QUIET = {"log": lambda message: None}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs written like training.fit's: a U-Net segmenter and a 3-class DCRN classifier."""
    root = tmp_path_factory.mktemp("checks")
    keras.utils.set_random_seed(0)
    unet = models.build("unet", input_shape=(None, None, 3), filters=4, depth=3)
    dcrn = models.build("dcrn", input_shape=(16, 16, 3), num_classes=3, blocks=2, layers_per_block=2,
                        growth=4, initial_filters=8, steps=1)
    unet_run = write_run(str(root / "unet"), unet, model_config={"filters": 4, "depth": 3},
                         postprocess={"threshold": 0.5, "min_distance": 3, "min_area": 5})
    dcrn_run = write_run(str(root / "dcrn"), dcrn, task="classification", model_name="dcrn", patch=16)
    return {"unet": unet_run, "dcrn": dcrn_run}


@pytest.fixture(scope="module")
def lite(runs, tmp_path_factory):
    """A float32 .tflite of the U-Net run with its metadata JSON."""
    path, _ = tflite.export_tflite(runs["unet"], "float32", out=str(tmp_path_factory.mktemp("lite") / "unet.tflite"),
                                   evaluate_model=False, **QUIET)
    return path


def copy_run(source, tmp_path, name="run", **config_changes):
    """A copy of a fixture run with ``config_changes`` applied to its config.json."""
    run = str(tmp_path / name)
    shutil.copytree(source, run)
    path = os.path.join(run, "config.json")
    config = json.load(open(path))
    config.update(config_changes)
    json.dump(config, open(path, "w"))
    return run


def exit_message(main, argv):
    """The SystemExit message of a CLI main (asserting it exits with a message)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert isinstance(exit_.value.code, str), exit_.value.code
    return exit_.value.code


def one_line_error(result, prog):
    """A CLI run that failed with one line '<prog>: ...' on stderr and no traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{prog}:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def run_cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=180,
                          cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


# ----------------------------------------------------------------------------- model vs config


def test_unet_claiming_classification_is_refused_and_nothing_is_written(runs, tmp_path):
    run = copy_run(runs["unet"], tmp_path, task="classification", model="dcrn")
    base = str(tmp_path / "base")
    result = run_cli("export.saved_model", run, "--base", base)
    line = one_line_error(result, "export.saved_model")
    assert run in line and "task 'classification' needs class probabilities" in line
    assert "per-pixel maps (N, ?, ?, 1)" in line and "config model 'dcrn' but model.keras holds a 'unet'" in line
    assert not os.path.exists(base)
    message = exit_message(tflite.main, [run, "--quantize", "int8", "--no-report"])
    assert message.startswith("export.tflite: ") and "task 'classification' needs class probabilities" in message
    assert sorted(os.listdir(run)) == ["config.json", "model.keras", "split.json", "thresholds.json"]


def test_classifier_claiming_segmentation_is_refused(runs, tmp_path):
    run = copy_run(runs["dcrn"], tmp_path, task="segmentation", model="unet")
    message = exit_message(sm.main, [run, "--base", str(tmp_path / "base")])
    assert "task 'segmentation' needs per-pixel probability maps (N, H, W, K)" in message
    assert "outputs class scores (N, 3)" in message and "holds a 'dcrn'" in message
    assert not os.path.exists(tmp_path / "base")
    # a classifier family in a run whose task is dense is refused even when the names agree
    run = copy_run(runs["dcrn"], tmp_path, name="det", task="detection")
    with pytest.raises(ModelMismatch, match="config model 'dcrn' is a classification model, config task is "
                                            "'detection'"):
        load_model(run)


def test_input_channels_and_class_count_must_match(runs, tmp_path):
    run = copy_run(runs["unet"], tmp_path, channels=1)
    message = exit_message(tflite.main, [run, "--no-report"])
    assert run in message and "config channels 1 but the model takes 3-channel input" in message
    assert not os.path.exists(os.path.join(run, "export"))
    run = copy_run(runs["dcrn"], tmp_path, name="cls")
    json.dump({"class_names": ["a", "b", "c", "d"]}, open(os.path.join(run, "metrics.json"), "w"))
    with pytest.raises(ModelMismatch, match="the run has 4 classes, the model outputs 3 class scores"):
        load_model(run)
    json.dump({"class_names": ["a", "b", "c"]}, open(os.path.join(run, "metrics.json"), "w"))
    assert load_model(run).output_shape == (None, 3)  # the same run with matching names loads


def test_config_depth_must_give_sizes_the_model_takes(runs, tmp_path):
    run = copy_run(runs["unet"], tmp_path, model_config={"filters": 4, "depth": 2})  # the model has depth 3
    with pytest.raises(ModelMismatch, match=r"fails on a 20x28x3 input \(sides multiples of 4 = 2\*\*depth"):
        load_model(run)


def _model(output, name, input_shape=(None, None, 3)):
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, output(inputs), name=name)


def test_value_ranges_and_map_size_are_checked():
    config = {"task": "segmentation", "model": "unet", "channels": 3}
    linear = _model(lambda x: keras.layers.Conv2D(1, 1, bias_initializer=keras.initializers.Constant(5.0))(x), "unet")
    with pytest.raises(ModelMismatch, match=r"needs probabilities in \[0, 1\]"):
        check_keras_model(linear, config, "runs/x")
    # a density map may take any value: the same linear head is a valid detector (training.detection
    # may train a segmentation family on density maps)
    check_keras_model(linear, {**config, "task": "detection"}, "runs/x")
    halved = _model(lambda x: keras.layers.Conv2D(1, 3, strides=2, padding="same", activation="sigmoid")(x), "unet")
    with pytest.raises(ModelMismatch, match="maps of the input's size, a 24x40 input gave 12x20 maps"):
        check_keras_model(halved, config, "runs/x", multiple=8)

    def sigmoid_classifier(x):
        return keras.layers.Dense(3, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(x))

    classifier = {"task": "classification", "model": "dcrn", "channels": 3, "patch": 16}
    with pytest.raises(ModelMismatch, match=r"softmax: in \[0, 1\], summing to 1\), the model's rows sum to 1\.[0-9]"):
        check_keras_model(_model(sigmoid_classifier, "dcrn", (16, 16, 3)), classifier, "runs/x")

    def softmax_classifier(x):
        return keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))

    check_keras_model(_model(softmax_classifier, "dcrn", (16, 16, 3)), classifier, "runs/x", class_names=("a", "b", "c"))


def test_shape_rules_for_litert_shapes():
    assert shape_problems("segmentation", 3, [-1, -1, -1, 3], [-1, -1, -1, 1]) == []
    assert shape_problems("classification", 1, [1, 16, 16, 1], [1, 4], num_classes=4) == []
    assert shape_problems("detection", 3, [1, 64, 64, 3], [1, 32, 32, 1]) == [
        "task 'detection' needs maps of the input's size, the model maps (N, 64, 64, 3) to (N, 32, 32, 1)"]
    assert shape_problems("classification", 3, [-1, 16, 16, 3], [-1, 1]) == [
        "task 'classification' needs at least 2 classes, the model outputs 1"]
    assert shape_problems("segmentation", 1, [-1, 16, 16], [-1, 16, 16, 1], claimed_by="metadata") == [
        "the model takes (N, 16, 16) input, not images (N, H, W, C)"]


# ----------------------------------------------------------------------------- broken files


def test_corrupt_model_keras_says_corrupt(runs, tmp_path):
    model_path = os.path.join(runs["unet"], "model.keras")
    content = open(model_path, "rb").read()
    truncated = copy_run(runs["unet"], tmp_path, "truncated")
    open(os.path.join(truncated, "model.keras"), "wb").write(content[: len(content) // 2])
    rel = os.path.relpath(truncated)
    message = exit_message(sm.main, [rel, "--base", str(tmp_path / "base")])
    assert message == (f"export.saved_model: {rel}/model.keras: not a readable Keras model "
                       "(corrupt or truncated zip: File is not a zip file)")
    random = copy_run(runs["unet"], tmp_path, "random")
    open(os.path.join(random, "model.keras"), "wb").write(np.random.default_rng(0).bytes(5000))
    with pytest.raises(RunError, match="not a readable Keras model \\(corrupt or truncated zip"):
        load_model(random)
    # a zip whose central directory is intact but whose weights were damaged
    damaged = copy_run(runs["unet"], tmp_path, "damaged")
    with zipfile.ZipFile(model_path) as archive:
        info = archive.getinfo("model.weights.h5")
    blob = bytearray(content)
    local = info.header_offset  # local header: 30 bytes, then the name and extra field (lengths at 26, 28)
    data = local + 30 + int.from_bytes(blob[local + 26:local + 28], "little") + int.from_bytes(
        blob[local + 28:local + 30], "little")
    middle = data + info.compress_size // 2
    blob[middle] ^= 0xFF
    open(os.path.join(damaged, "model.keras"), "wb").write(bytes(blob))
    with pytest.raises(RunError, match="model.keras: not a readable Keras model \\(corrupt"):
        load_model(damaged)
    assert not os.path.exists(tmp_path / "base")


def test_run_folder_without_model_or_with_broken_config(runs, tmp_path):
    run = copy_run(runs["unet"], tmp_path, "nomodel")
    os.remove(os.path.join(run, "model.keras"))
    assert "model.keras missing" in exit_message(sm.main, [run, "--base", str(tmp_path / "base")])
    assert "model.keras missing" in exit_message(tflite.main, [run, "--no-report"])
    run = copy_run(runs["unet"], tmp_path, "notjson")
    open(os.path.join(run, "config.json"), "w").write('{"task": "segmentation",')
    message = exit_message(tflite.main, [run, "--no-report"])
    assert message.startswith(f"export.tflite: {run}/config.json: not valid JSON (")
    open(os.path.join(run, "config.json"), "w").write("[1, 2]")
    assert f"{run}/config.json: expected a JSON object, found list" in exit_message(
        sm.main, [run, "--base", str(tmp_path / "base")])
    run = copy_run(runs["unet"], tmp_path, "channels", channels="three")
    assert "config.json: channels must be 1 or 3, got 'three'" in exit_message(tflite.main, [run, "--no-report"])
    run = copy_run(runs["unet"], tmp_path, "model_config", model_config=["filters", 4])
    assert "config.json: model_config must be a JSON object, got ['filters', 4]" in exit_message(
        sm.main, [run, "--base", str(tmp_path / "base")])
    assert not os.path.exists(tmp_path / "base")


def test_failed_exports_leave_no_folders(runs, tmp_path, monkeypatch):
    out = tmp_path / "new" / "folder" / "unet.tflite"

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tflite, "convert", disk_full)
    assert exit_message(tflite.main, [runs["unet"], "--out", str(out), "--no-report"]) == "export.tflite: disk full"
    assert not os.path.exists(tmp_path / "new")
    monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", disk_full)
    monkeypatch.setattr(sm, "add_signatures", lambda *args: None)
    assert exit_message(sm.main, [runs["unet"], "--base", str(tmp_path / "base")]) == "export.saved_model: disk full"
    assert not os.path.exists(tmp_path / "base")


# ----------------------------------------------------------------------------- .tflite files


def test_missing_tflite_is_named_not_its_metadata(lite, tmp_path):
    image = str(tmp_path / "image.png")
    import cv2

    cv2.imwrite(image, np.zeros((32, 32, 3), np.uint8))
    missing = str(tmp_path / "gone.tflite")
    shutil.copy(os.path.splitext(lite)[0] + ".json", str(tmp_path / "gone.json"))
    message = exit_message(edge.main, [missing, "segment", image, "--out", str(tmp_path / "out")])
    assert message == f"serving.edge: {missing}: .tflite file not found"
    os.remove(tmp_path / "gone.json")  # neither file: still the .tflite is what is reported
    result = run_cli("serving.edge", missing, "segment", image, "--out", str(tmp_path / "out"))
    assert one_line_error(result, "serving.edge") == f"serving.edge: {missing}: .tflite file not found"
    with pytest.raises(FileNotFoundError, match="gone.tflite: .tflite file not found"):
        LiteModel(missing)
    assert not os.path.exists(tmp_path / "out")


def test_broken_tflite_and_metadata(lite, tmp_path):
    image = str(tmp_path / "image.png")
    import cv2

    cv2.imwrite(image, np.zeros((32, 32, 3), np.uint8))
    meta = json.load(open(os.path.splitext(lite)[0] + ".json"))

    def variant(name, content=None, metadata=None):
        path = str(tmp_path / f"{name}.tflite")
        open(path, "wb").write(content if content is not None else open(lite, "rb").read())
        with open(str(tmp_path / f"{name}.json"), "w") as handle:
            handle.write(metadata if isinstance(metadata, str) else json.dumps(metadata or meta))
        return exit_message(edge.main, [path, "segment", image, "--out", str(tmp_path / "out")]), path

    message, path = variant("random", content=np.random.default_rng(0).bytes(3000))
    assert message == f"serving.edge: {path}: not a readable .tflite model (The model is not a valid Flatbuffer buffer)"
    message, path = variant("notjson", metadata='{"task": ')
    assert message.startswith(f"serving.edge: {path[:-7]}.json: not valid JSON (")
    message, path = variant("notask", metadata={k: v for k, v in meta.items() if k != "task"})
    assert message == (f"serving.edge: {path[:-7]}.json: metadata task None is none of segmentation, detection, "
                       "classification, instance (not a python -m export.tflite metadata file?)")
    message, path = variant("claims_classes", metadata={**meta, "task": "classification"})
    assert message == (f"serving.edge: {path}: the model does not match its metadata: task 'classification' needs "
                       "class probabilities (N, classes), the model outputs per-pixel maps (N, ?, ?, 1)")
    message, path = variant("grey", metadata={**meta, "channels": 1})
    assert "metadata channels 1 but the model takes 3-channel input" in message
    assert not os.path.exists(tmp_path / "out")
