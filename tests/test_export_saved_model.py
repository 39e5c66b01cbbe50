"""export.saved_model: TF-Serving layout, uint8 signatures, in-graph normalisation, atomic versions,
MC-dropout uncertainty signature, metadata and deployment files. Tiny models, no training."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from export import saved_model as sm  # noqa: E402
from kerasnuc.runs import write_run  # noqa: E402
from kerasnuc import models  # noqa: E402
from kerasnuc.predict.runtimes import predict_maps  # noqa: E402

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    keras.utils.set_random_seed(0)
    unet = models.build("unet", input_shape=(None, None, 3), filters=4, depth=3)
    mc = models.build("mc_unet", input_shape=(None, None, 1), filters=4, depth=3, dropout=0.5)
    unet_run = write_run(str(root / "unet_run"), unet, model_config={"filters": 4, "depth": 3},
                         postprocess={"threshold": 0.5, "min_distance": 3, "min_area": 10})
    mc_run = write_run(str(root / "mc_run"), mc, model_config={"filters": 4, "depth": 3}, mc_samples=6)
    base = str(root / "base")
    logs = []
    unet_path = sm.export_saved_model(unet_run, base, log=logs.append)
    mc_path = sm.export_saved_model(mc_run, base, name="mc", log=logs.append)
    return {"root": root, "base": base, "unet": unet, "mc": mc, "unet_run": unet_run, "mc_run": mc_run,
            "unet_path": unet_path, "mc_path": mc_path, "logs": logs}


def _cli_show(path):
    command = shutil.which("saved_model_cli")
    command = [command] if command else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    result = subprocess.run(command + ["show", "--dir", path, "--all"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _signature_block(text, name):
    start = text.index(f"signature_def['{name}']")
    end = text.find("signature_def['", start + 10)
    return text[start:end if end > 0 else None]


def test_layout_and_signatures_via_saved_model_cli(exported):
    assert exported["unet_path"] == os.path.join(exported["base"], "unet", "1")
    text = _cli_show(exported["unet_path"])
    default = _signature_block(text, "serving_default")
    assert "inputs['image']" in default and "DT_UINT8" in default
    assert "shape: (-1, -1, -1, -1)" in default
    assert "outputs['maps']" in default and "DT_FLOAT" in default
    with_range = _signature_block(text, "with_range")
    assert "inputs['intensity_range']" in with_range and "inputs['image']" in with_range
    assert "outputs['kerasnuc_json']" in _signature_block(text, "metadata")
    assert "signature_def['uncertainty']" not in text  # deterministic model: no MC signature

    from serving.server import _signature_defs  # the same SignatureDefs, read from saved_model.pb

    defs = _signature_defs(exported["mc_path"])
    assert set(defs) == {"serving_default", "with_range", "uncertainty", "uncertainty_with_range", "metadata"}
    uncertainty = defs["uncertainty"]
    assert uncertainty.inputs["image"].dtype == tf.uint8.as_datatype_enum
    assert set(uncertainty.outputs) == {"mean", "variance"}


def test_graph_normalisation_and_padding_match_keras(exported):
    loaded = tf.saved_model.load(exported["unet_path"])
    rng = np.random.default_rng(1)
    # odd size (padded in the graph to 8 and cropped back), dim range, grey into an RGB model
    for shape in [(45, 70, 3), (33, 20, 1), (64, 64, 3)]:
        image = rng.integers(10, 60, size=shape, dtype=np.uint8)
        out = loaded.signatures["serving_default"](image=tf.constant(image[None]))["maps"].numpy()[0]
        reference = predict_maps(exported["unet"], image, 3, 8)
        assert out.shape == reference.shape
        np.testing.assert_allclose(out, reference, atol=1e-5)
    # with_range == serving_default when given the image's own range
    image = rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)
    value_range = np.array([[image.min(), image.max()]], np.float32)
    a = loaded.signatures["serving_default"](image=tf.constant(image[None]))["maps"].numpy()
    b = loaded.signatures["with_range"](image=tf.constant(image[None]),
                                        intensity_range=tf.constant(value_range))["maps"].numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_metadata_asset_and_signature(exported):
    meta = sm.read_export_metadata(exported["unet_path"])
    assert meta["task"] == "segmentation" and meta["channels"] == 3 and meta["multiple"] == 8
    assert meta["version"] == 1 and meta["model_name"] == "unet"
    assert meta["postprocess"]["min_distance"] == 3
    assert meta["kerasnuc_version"] and meta["tile_margin"] % 8 == 0
    assert meta["receptive_radius"] and meta["receptive_radius"] > 8
    loaded = tf.saved_model.load(exported["unet_path"])
    text = loaded.signatures["metadata"]()["kerasnuc_json"].numpy().decode()
    in_graph = json.loads(text)
    assert in_graph["task"] == "segmentation" and in_graph["signatures"] == meta["signatures"]


def test_mc_uncertainty_signature_is_stochastic(exported):
    loaded = tf.saved_model.load(exported["mc_path"])
    image = np.random.default_rng(2).integers(0, 255, size=(1, 32, 48, 3), dtype=np.uint8)  # RGB -> grey
    result = loaded.signatures["uncertainty"](image=tf.constant(image))
    mean, variance = result["mean"].numpy(), result["variance"].numpy()
    assert mean.shape == variance.shape == (1, 32, 48, 1)
    assert variance.max() > 0 and np.all(variance >= 0)
    again = loaded.signatures["uncertainty"](image=tf.constant(image))["mean"].numpy()
    assert np.abs(again - mean).max() > 0
    one = loaded.signatures["serving_default"](image=tf.constant(image))["maps"].numpy()
    two = loaded.signatures["serving_default"](image=tf.constant(image))["maps"].numpy()
    assert np.abs(one - two).max() > 0  # single passes are stochastic too
    assert sm.read_export_metadata(exported["mc_path"])["mc_samples"] == 6


def test_versions_are_atomic_and_increment(exported, monkeypatch, capsys):
    base, run = exported["base"], exported["unet_run"]
    model_dir = os.path.join(base, "unet")
    seen = []
    real_rename = os.rename

    def watching_rename(source, target):
        # at publication time: the SavedModel is complete in a hidden, non-integer folder
        name = os.path.basename(source)
        seen.append(name)
        assert name.startswith(".") and not name.isdigit()
        assert os.path.exists(os.path.join(source, "saved_model.pb"))
        assert os.path.exists(os.path.join(source, "assets.extra", "kerasnuc.json"))
        assert not os.path.exists(target)
        assert sm.versions(model_dir) == [1]  # nothing visible to TF-Serving yet
        return real_rename(source, target)

    monkeypatch.setattr(sm.os, "rename", watching_rename)
    sm.main([run, "--base", base])  # the command line, in-process
    monkeypatch.undo()
    assert capsys.readouterr().out.strip().splitlines()[-1] == os.path.join(model_dir, "2") and seen
    assert sm.versions(model_dir) == [1, 2]
    assert sm.read_export_metadata(os.path.join(model_dir, "2"))["version"] == 2
    assert [e for e in os.listdir(model_dir) if not e.isdigit()] == []  # staging folder gone
    with pytest.raises(SystemExit, match="never overwritten"):
        sm.main([run, "--base", base, "--version", "2"])


def test_failed_export_leaves_nothing(exported, monkeypatch):
    base, run = exported["base"], exported["unet_run"]
    model_dir = os.path.join(base, "unet")
    before = sorted(os.listdir(model_dir))

    def crash_midway(archive, path, **kwargs):  # half a SavedModel, then the disk fills up
        os.makedirs(os.path.join(path, "variables"))
        open(os.path.join(path, "saved_model.pb"), "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(sm, "add_signatures", lambda *args: None)
    monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        sm.export_saved_model(run, base, log=lambda m: None)
    assert sorted(os.listdir(model_dir)) == before


def test_explicit_version_and_deploy_files(exported):
    base = exported["base"]
    path = sm.export_saved_model(exported["unet_run"], base, version=7, log=lambda m: None)
    assert path == os.path.join(base, "unet", "7")
    assert sm.next_version(os.path.join(base, "unet")) == 8

    config = open(os.path.join(base, "models.config")).read()
    assert 'name: "unet"' in config and 'base_path: "/models/unet"' in config and 'name: "mc"' in config
    assert "max_batch_size" in open(os.path.join(base, "batching_parameters.txt")).read()
    compose_text = open(os.path.join(base, "compose.yaml")).read()
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load(compose_text)
    service = compose["services"]["tfserving"]
    assert "tensorflow/serving" in service["image"]
    assert "8500:8500" in service["ports"] and "8501:8501" in service["ports"]
    assert "./:/models:ro" in service["volumes"]
    flags = " ".join(service["command"])
    assert "--model_config_file=/models/models.config" in flags and "--enable_batching=true" in flags
    assert "--batching_parameters_file=/models/batching_parameters.txt" in flags
