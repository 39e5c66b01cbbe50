"""export.tflite: the four quantisations convert and agree with Keras, int8 is full-integer with uint8
I/O, mixed-precision and Monte-Carlo dropout models convert through a float32 copy, classifiers too.
Tiny models on the shipped sample, no training."""

import json
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("ai_edge_litert")

from export import tflite  # noqa: E402
from export.metadata import write_run  # noqa: E402
from kerasnuc import models  # noqa: E402
from kerasnuc.inference import predict_maps  # noqa: E402
from serving.edge import LiteModel  # noqa: E402

# max |Keras - LiteRT| of sigmoid maps allowed per quantisation (PLATFORM.md measured
# f32 0, f16 1e-4, dynamic 2e-3, int8 4e-3 on a U-Net; tiny untrained models are rougher)
TOLERANCE = {"float32": 1e-5, "float16": 5e-3, "dynamic": 5e-2, "int8": 0.1}
QUIET = {"log": lambda message: None}


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = models.build("unet", input_shape=(None, None, 3), filters=4, depth=3)
    run = write_run(str(tmp_path_factory.mktemp("tflite") / "unet"), model,
                    model_config={"filters": 4, "depth": 3}, tile=64,
                    postprocess={"threshold": 0.5, "min_distance": 3, "min_area": 5})
    return run, model


@pytest.fixture(scope="module")
def converted(unet_run):
    run, _ = unet_run
    reports = {}
    for quantize in tflite.QUANTIZATIONS:
        path, report = tflite.export_tflite(run, quantize, calibration=16, repeats=1, max_images=1, **QUIET)
        reports[quantize] = (path, report)
    return reports


@pytest.mark.parametrize("quantize", tflite.QUANTIZATIONS)
def test_quantizations_convert_and_agree(converted, unet_run, quantize):
    path, report = converted[quantize]
    assert os.path.exists(path) and report["bytes"] == os.path.getsize(path)
    agreement = report["agreement"]
    assert agreement["split"] == "test" and agreement["images"] == 1
    summary = agreement["summary"]
    assert summary["max_abs_diff"] < TOLERANCE[quantize], summary
    # An untrained model's maps sit near the 0.5 threshold, so post-processed agreement is only
    # checked where the maps agree closely; bench/bench_tflite.py measures it on a trained model.
    if quantize == "float32":
        assert summary["dice_vs_keras"] == 1.0 and summary["object_f1_vs_keras"] == 1.0
    elif quantize == "float16":
        assert summary["dice_vs_keras"] > 0.98, summary
    assert 0 <= summary["dice_vs_keras"] <= 1 and 0 <= summary["dice_tflite"] <= 1
    assert summary["latency_ms"] > 0 and "dice_keras" in summary and "dice_tflite" in summary
    base = os.path.splitext(path)[0]
    meta = json.load(open(base + ".json"))
    assert meta["task"] == "segmentation" and meta["multiple"] == 8 and meta["tflite"]["quantize"] == quantize
    stored = json.load(open(base + ".report.json"))
    assert stored["quantize"] == quantize and "machine" in stored
    assert "Agreement with the Keras model" in open(base + ".report.md").read()


def test_sizes_shrink(converted):
    size = {q: converted[q][1]["bytes"] for q in tflite.QUANTIZATIONS}
    assert size["float16"] < 0.7 * size["float32"]
    assert size["int8"] < 0.45 * size["float32"] and size["dynamic"] < 0.45 * size["float32"]


def test_int8_is_full_integer_with_uint8_io(converted, unet_run):
    path, report = converted["int8"]
    io = report["io"]
    assert io["input"]["dtype"] == "uint8" and io["output"]["dtype"] == "uint8"
    scale, zero = io["input"]["quantization"]
    assert abs(scale - 1 / 255) < 1e-4 and zero == 0  # normalised [0, 1] input, calibrated
    lite = LiteModel(path)
    assert lite.input_dtype == np.uint8
    image = np.random.default_rng(0).integers(0, 255, size=(40, 56, 3), dtype=np.uint8)
    maps, _ = lite.predict_maps(image, tile=0)
    assert np.abs(maps - predict_maps(unet_run[1], image, 3, 8)).max() < TOLERANCE["int8"]
    for quantize in ("float32", "float16", "dynamic"):
        assert converted[quantize][1]["io"]["input"]["dtype"] == "float32"


def test_mixed_precision_model_converts_through_float32(tmp_path):
    keras.utils.set_random_seed(1)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = models.build("unet", input_shape=(None, None, 3), filters=4, depth=2)
    finally:
        keras.config.set_dtype_policy("float32")
    assert model.layers[2].dtype_policy.name == "mixed_float16"
    copy, notes = tflite.conversion_model(model)
    assert all(layer.dtype_policy.compute_dtype == "float32" for layer in copy.layers)
    assert any("mixed-precision" in n for n in notes)
    run = write_run(str(tmp_path / "mixed"), model, model_config={"filters": 4, "depth": 2},
                    precision_used="mixed_float16")
    path, report = tflite.export_tflite(run, "float32", repeats=1, max_images=1, **QUIET)
    assert report["agreement"]["summary"]["max_abs_diff"] < 1e-2  # float16 Keras vs float32 LiteRT


def test_mc_dropout_stays_stochastic_in_litert(tmp_path):
    keras.utils.set_random_seed(2)
    model = models.build("mc_unet", input_shape=(None, None, 1), filters=4, depth=2)
    run = write_run(str(tmp_path / "mc"), model, model_config={"filters": 4, "depth": 2}, mc_samples=4)
    copy, notes = tflite.conversion_model(model)
    assert any(isinstance(layer, tflite.LiteStochasticDropout) for layer in copy.layers)
    assert not any(type(layer).__name__ == "MCDropout" for layer in copy.layers)
    path, report = tflite.export_tflite(run, "float32", evaluate_model=False, **QUIET)
    assert report["stochastic_in_litert"] is True
    lite = LiteModel(path)
    x = np.full((1, 16, 16, 1), 0.5, np.float32)
    runs = np.stack([lite.run(x) for _ in range(30)])
    assert runs.std(axis=0).max() > 0
    # the same dropout distribution: LiteRT's mean over passes approaches Keras' MC mean
    keras_runs = np.stack([np.asarray(model(x)) for _ in range(30)])  # MCDropout is on in call()
    assert abs(float(runs.mean()) - float(keras_runs.mean())) < 0.05
    maps, variance = lite.predict_maps(np.full((20, 30, 1), 90, np.uint8) + np.arange(30, dtype=np.uint8)[None, :, None],
                                       tile=0, samples=4)
    assert variance.shape == maps.shape and variance.max() > 0

    # full-integer too: RANDOM_UNIFORM stays a float op inside the int8 graph, still stochastic
    rng = np.random.default_rng(0)
    content = tflite.convert(copy, "int8", [rng.random((1, 32, 32, 1), dtype=np.float32) for _ in range(8)])
    int8_path = str(tmp_path / "mc_int8.tflite")
    open(int8_path, "wb").write(content)
    lite8 = LiteModel(int8_path, {**lite.meta})
    assert lite8.input_dtype == np.uint8
    assert np.stack([lite8.run(x) for _ in range(10)]).std(axis=0).max() > 0


def test_bad_quantize_name():
    with pytest.raises(ValueError):
        tflite.convert(None, "int4")
