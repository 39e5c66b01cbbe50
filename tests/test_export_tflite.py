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
from kerasnuc.runs import write_run  # noqa: E402
from kerasnuc import models  # noqa: E402
from kerasnuc.predict.runtimes import predict_maps  # noqa: E402
from kerasnuc.predict.litert import LiteModel  # noqa: E402

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


# ----------------------------------------------------------------------------- static input (--input-size)


@pytest.fixture(scope="module")
def static_exports(unet_run):
    run, _ = unet_run
    return {
        # 64x64 leaves a margin of 24 < the receptive radius (46): tiles reproduce the dynamic
        # model's tiles exactly, not its whole-image maps
        "64": tflite.export_tflite(run, "float32", input_size=64, repeats=1, max_images=1, **QUIET),
        # 104x112 leaves the full margin of 48 >= 46: tiles reproduce whole-image maps
        "wide": tflite.export_tflite(run, "float32", input_size="104x112", evaluate_model=False, **QUIET),
        "int8": tflite.export_tflite(run, "int8", input_size="64x48", calibration=8, repeats=1, max_images=1,
                                     **QUIET),
    }


def _ops(lite):
    return {op["op_name"] for op in lite.interpreter._get_ops_details()}


def _image(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 255, size=shape, dtype=np.uint8)


def test_static_export_is_fully_static(static_exports, converted):
    path, report = static_exports["64"]
    assert os.path.basename(path) == "unet_float32_64x64.tflite"
    lite = LiteModel(path)
    assert list(lite.interpreter.get_input_details()[0]["shape_signature"]) == [1, 64, 64, 3]
    assert list(lite.interpreter.get_output_details()[0]["shape_signature"]) == [1, 64, 64, 1]
    assert lite.static_shape == (64, 64) and lite.static_batch == 1 and lite.tiles_fixed
    # no shape arithmetic left around the transposed convolutions
    assert "TRANSPOSE_CONV" in _ops(lite) and not {"SHAPE", "PACK"} & _ops(lite)
    meta = json.load(open(os.path.splitext(path)[0] + ".json"))
    assert meta["tflite"]["static_input"] == [1, 64, 64, 3] and report["static_input"] == [1, 64, 64, 3]
    assert report["io"]["input"]["shape"] == [1, 64, 64, 3]
    assert any("input fixed to [1, 64, 64, 3]" in note for note in report["notes"])
    assert any("margin 24 (< receptive radius 46" in note and "at least 104" in note for note in report["notes"])
    # the agreement report ran the whole test image through 64x64 tiles
    agreement = report["agreement"]
    assert agreement["static_tiles"] == {"tile": [64, 64], "margin": 24} and agreement["images"] == 1
    assert agreement["summary"]["latency_ms"] > 0 and agreement["summary"]["max_abs_diff"] < 0.1
    assert "64x64 tiles, margin 24" in open(os.path.splitext(path)[0] + ".report.md").read()
    dynamic = LiteModel(converted["float32"][0])
    assert dynamic.static_shape is None and not dynamic.tiles_fixed
    assert json.load(open(os.path.splitext(converted["float32"][0])[0] + ".json"))["tflite"]["static_input"] is None


def test_static_maps_equal_dynamic_export(static_exports, converted):
    static, dynamic = LiteModel(static_exports["64"][0]), LiteModel(converted["float32"][0])
    image = _image((90, 70, 3))  # not a multiple of 8 nor of the tile
    margin = static.static_margin()
    assert margin == 24  # the metadata's 48 lowered to leave 64x64 tiles a positive step
    maps, _ = static.predict_maps(image, tile=256)  # --tile is ignored by a static model
    assert maps.shape == (90, 70, 1)
    # exactly the dynamic model's tiling with the same tiles (what tiling guarantees here:
    # the margin is below the receptive radius, so not the whole-image maps)
    same_tiles, _ = dynamic.predict_maps(image, tile=64, margin=margin)
    assert np.abs(maps - same_tiles).max() < 1e-5

    # a margin at least the receptive radius: the whole-image maps of the dynamic export
    wide = LiteModel(static_exports["wide"][0])
    assert wide.static_shape == (104, 112) and wide.static_margin() == 48 >= wide.meta["receptive_radius"]
    image = _image((150, 130, 3), seed=1)
    maps, _ = wide.predict_maps(image)
    whole, _ = dynamic.predict_maps(image, tile=0)
    assert maps.shape == (150, 130, 1) and np.abs(maps - whole).max() < 1e-4

    # an image smaller than the tile is mirror-padded up to it and cropped back
    from kerasnuc.predict.tiling import pad_to_tile
    from kerasnuc.predict.tiling import normalize_image

    small = _image((20, 30, 3), seed=2)
    maps, _ = static.predict_maps(small)
    padded = pad_to_tile(normalize_image(small, 3), 8, (64, 64))
    assert padded.shape == (64, 64, 3) and maps.shape == (20, 30, 1)
    assert np.abs(maps - dynamic.run(padded[None])[0, :20, :30]).max() < 1e-5


def test_static_run_batches_and_whole_images(static_exports, converted):
    static, dynamic = LiteModel(static_exports["64"][0]), LiteModel(converted["float32"][0])
    batch = np.random.default_rng(3).random((3, 64, 64, 3)).astype(np.float32)
    out = static.run(batch)  # three batch-1 calls
    assert out.shape == (3, 64, 64, 1) and np.abs(out - dynamic.run(batch)).max() < 1e-5
    x = tflite.normalize_padded(_image((90, 70, 3)), static.meta)  # what evaluate() times
    assert x.shape == (1, 96, 72, 3)
    out = static.run(x)
    assert out.shape == (1, 96, 72, 1) and np.array_equal(out[0], static.run_tiled(x[0]))


def test_static_int8_converts_and_runs(static_exports, converted):
    path, report = static_exports["int8"]
    assert os.path.basename(path) == "unet_int8_64x48.tflite"
    assert report["io"]["input"]["dtype"] == "uint8" and report["io"]["input"]["shape"] == [1, 64, 48, 3]
    assert any("64x48 crops" in note for note in report["notes"])
    lite = LiteModel(path)
    assert lite.input_dtype == np.uint8 and lite.static_shape == (64, 48) and lite.static_margin() == 16
    assert not {"SHAPE", "PACK"} & _ops(lite)
    image = _image((90, 70, 3))
    maps, _ = lite.predict_maps(image)
    reference, _ = LiteModel(converted["float32"][0]).predict_maps(image, tile=(64, 48), margin=16)
    assert maps.shape == (90, 70, 1) and np.abs(maps - reference).max() < TOLERANCE["int8"]
    assert report["agreement"]["summary"]["max_abs_diff"] < TOLERANCE["int8"]


def test_bad_input_size_fails_clearly_and_writes_nothing(unet_run):
    run, _ = unet_run
    export_dir = os.path.join(run, "export")
    before = sorted(os.listdir(export_dir)) if os.path.isdir(export_dir) else []
    with pytest.raises(ValueError, match="--input-size 100: must be a multiple of 8 for this unet") as error:
        tflite.export_tflite(run, "float32", input_size=100, evaluate_model=False, **QUIET)
    assert run in str(error.value)
    with pytest.raises(SystemExit) as exit_:
        tflite.main([run, "--input-size", "64x60", "--no-report"])
    assert "--input-size 64x60: must be a multiple of 8 for this unet" in str(exit_.value.code)
    with pytest.raises(SystemExit) as exit_:
        tflite.main([run, "--input-size", "big", "--no-report"])
    assert "expected N or HxW" in str(exit_.value.code)
    with pytest.raises(ValueError, match="positive"):
        tflite.export_tflite(run, "float32", input_size="0x64", evaluate_model=False, **QUIET)
    after = sorted(os.listdir(export_dir)) if os.path.isdir(export_dir) else []
    assert after == before


def test_parse_input_size():
    assert tflite.parse_input_size(64) == (64, 64) and tflite.parse_input_size("96x128") == (96, 128)
    assert tflite.parse_input_size((32, 48)) == (32, 48) and tflite.parse_input_size(" 80 ") == (80, 80)
    for bad in ("", "1x2x3", "axb", "64x"):
        with pytest.raises(ValueError):
            tflite.parse_input_size(bad)


def _skip_model():
    """conv -> (Add with the input) -> Concatenate: the layer kinds whose int8 ranges are shared."""
    inputs = keras.Input((8, 8, 1))
    conv = keras.layers.Conv2D(1, 3, padding="same", kernel_initializer="ones", name="conv")(inputs)
    added = keras.layers.Add(name="add")([conv, inputs])
    return keras.Model(inputs, keras.layers.Concatenate(name="cat")([added, inputs]))


def test_calibration_drops_a_crop_with_extreme_activations():
    rng = np.random.default_rng(0)
    samples = [rng.uniform(0, 1, (1, 8, 8, 1)).astype("float32") for _ in range(16)]
    samples[5] = samples[5] * 40  # one atypical crop: 40x the activations everywhere
    kept, note = tflite.drop_outlier_samples(_skip_model(), samples, factor=4)
    assert len(kept) == 15 and not any(k is samples[5] for k in kept)
    assert note and "1 of 16 samples reach" in note
    kept_all, note_all = tflite.drop_outlier_samples(_skip_model(), samples, factor=0)
    assert len(kept_all) == 16 and note_all is None


def test_calibration_keeps_all_when_outliers_are_not_rare():
    rng = np.random.default_rng(1)
    samples = [rng.uniform(0, 1, (1, 8, 8, 1)).astype("float32") * (40 if i % 3 == 0 else 1) for i in range(16)]  # 6 of 16
    kept, note = tflite.drop_outlier_samples(_skip_model(), samples, factor=4)
    assert len(kept) == 16 and "too many to drop" in note


def test_segnet_pooling_indices_convert(tmp_path):
    """SegNet's argmax pooling converts to LiteRT builtins (Keras' TF argmax emits BitwiseAnd,
    which LiteRT lacks) and gives the Keras maps."""
    keras.utils.set_random_seed(0)
    model = models.build("segnet", input_shape=(None, None, 3), filters=4, depth=3)
    run = write_run(str(tmp_path / "segnet"), model, model_config={"filters": 4, "depth": 3}, tile=64,
                    postprocess={"threshold": 0.5, "min_distance": 3, "min_area": 5})
    _, report = tflite.export_tflite(run, "float32", repeats=1, max_images=1, **QUIET)
    assert report["agreement"]["summary"]["max_abs_diff"] < 1e-5
    # int8: indices stay integers and unpooling is a select, so only rounding differs
    # (a quantised one-hot * values gave mean |diff| 0.05 here, and Dice 0.75 -> 0.61 on MoNuSeg)
    _, report = tflite.export_tflite(run, "int8", calibration=16, repeats=1, max_images=1, **QUIET)
    assert report["agreement"]["summary"]["mean_abs_diff"] < 0.01


def test_int8_error_prefers_the_calibration_without_an_extreme_crop():
    """What export_tflite uses to choose between calibrating with and without outlier crops."""
    model = _skip_model()
    rng = np.random.default_rng(2)
    typical = [rng.uniform(0, 1, (1, 8, 8, 1)).astype("float32") for _ in range(12)]
    extreme = typical[:11] + [typical[11] * 200]  # one crop widens every int8 range 200x
    meta = {"task": "segmentation", "multiple": 1, "channels": 1}
    check = [rng.uniform(0, 1, (1, 8, 8, 1)).astype("float32") for _ in range(4)]
    clean = tflite.int8_error(tflite.convert(model, "int8", typical), model, meta, check)
    widened = tflite.int8_error(tflite.convert(model, "int8", extreme), model, meta, check)
    assert clean < 0.05 < widened
