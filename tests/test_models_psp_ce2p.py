"""PSPSegNet and CE2P: the hand-built ResNet against keras.applications, ImageNet weights from a
local file, the run-time adaptive pooling and resizing against NumPy, a short MoNuSeg training of
each through training.fit (scored by the engine), SavedModel + int8 TFLite export run by
serving.edge, and one forward pass and train step of each on the JAX backend."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import keras

from kerasnuc import models
from kerasnuc.models.backbones import BackboneWeightsError, load_backbone_weights
from kerasnuc.models.psp import AdaptiveAveragePooling2D, BilinearResizeLike
from kerasnuc.models.resnet import resnet_encoder

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FAMILIES = ("pspsegnet", "ce2p")
TINY = {"backbone": "resnet50", "width": 4}
QUIET = {"log": lambda message: None}


def _encoder_model(depth, output_stride=32, stem_pool="max3"):
    inputs = keras.Input((None, None, 3))
    features = resnet_encoder(inputs, depth, 64, output_stride, stem_pool)
    return keras.Model(inputs, [features[k] for k in ("stem", "pool", "conv2", "conv3", "conv4", "conv5")])


def test_resnet101_matches_keras_applications(tmp_path):
    keras.utils.set_random_seed(0)
    application = keras.applications.ResNet101(include_top=False, weights=None, input_shape=(None, None, 3))
    ours = _encoder_model(101)
    theirs = {layer.name: [w.shape for w in layer.get_weights()] for layer in application.layers}
    mine = {layer.name: [w.shape for w in layer.get_weights()] for layer in ours.layers}
    assert {name for name in theirs if name != application.layers[0].name} \
        == {name for name in mine if name != ours.layers[0].name}
    assert all(mine[name] == shapes for name, shapes in theirs.items() if shapes)
    for layer in application.layers:  # non-trivial BatchNorm statistics, so loading them matters
        if isinstance(layer, keras.layers.BatchNormalization):
            rng = np.random.default_rng(len(layer.name))
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 1.5, var.shape)])
    path = str(tmp_path / "resnet101.weights.h5")
    application.save_weights(path)
    assert load_backbone_weights(ours, path, "resnet101") == sum(1 for s in theirs.values() if s)
    x = np.random.default_rng(1).random((1, 64, 96, 3), dtype=np.float32)
    expected = keras.ops.convert_to_numpy(application(x))  # eager calls: no graph tracing to wait for
    got = [keras.ops.convert_to_numpy(f) for f in ours(x)]
    assert [f.shape[1:3] for f in got] == [(32, 48), (16, 24), (16, 24), (8, 12), (4, 6), (2, 3)]
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got[-1], expected, rtol=1e-5, atol=1e-5 * scale)
    # dilated stages keep every kernel shape: the same file loads at output stride 8
    dilated = _encoder_model(101, output_stride=8)
    load_backbone_weights(dilated, path, "resnet101")
    shapes = [tuple(f.shape[1:3]) for f in dilated(x)]
    assert shapes[3:] == [(8, 12), (8, 12), (8, 12)]
    np.testing.assert_array_equal(dilated.get_layer("conv4_block23_2_conv").get_weights()[0],
                                  application.get_layer("conv4_block23_2_conv").get_weights()[0])
    assert dilated.get_layer("conv5_block1_2_conv").dilation_rate == (4, 4)


def test_backbone_weights_load_into_the_builders_or_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="exist only for width 64"):
        models.build("pspsegnet", **TINY, backbone_weights=str(tmp_path / "any.h5"))
    with pytest.raises(BackboneWeightsError, match="missing.h5: backbone weights file not found"):
        models.build("ce2p", backbone="resnet50", backbone_weights=str(tmp_path / "missing.h5"))
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an HDF5 file" * 64)
    with pytest.raises(BackboneWeightsError, match="garbage.h5: cannot load resnet50 weights"):
        models.build("ce2p", backbone="resnet50", backbone_weights=str(garbage))
    keras.utils.set_random_seed(2)
    application = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(None, None, 3))
    path = str(tmp_path / "resnet50.weights.h5")
    application.save_weights(path)
    model = models.build("ce2p", backbone="resnet50", backbone_weights=path)
    for name in ("conv1_conv", "conv5_block3_3_conv", "conv4_block6_3_bn"):
        for mine, theirs in zip(model.get_layer(name).get_weights(), application.get_layer(name).get_weights()):
            np.testing.assert_array_equal(mine, theirs)
    with pytest.raises(ValueError, match="backbone must be one of"):
        models.build("ce2p", backbone="vgg16")
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
        models.build("pspsegnet", **TINY, output_stride=4)


def _adaptive_pool_reference(x, bins):
    """PyTorch's AdaptiveAvgPool2d: bin i spans floor(i*H/b) .. ceil((i+1)*H/b)."""
    n, h, w, c = x.shape
    out = np.zeros((n, bins, bins, c), np.float64)
    for i in range(bins):
        r0, r1 = (i * h) // bins, -(-((i + 1) * h) // bins)
        for j in range(bins):
            c0, c1 = (j * w) // bins, -(-((j + 1) * w) // bins)
            out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return out


def _bilinear_reference(x, height, width):
    """Bilinear resize with aligned corners (PSPNet's Interp, PyTorch align_corners=True)."""
    def weights(size_out, size_in):
        matrix = np.zeros((size_out, size_in))
        for i in range(size_out):
            source = i * (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
            low = int(np.floor(source))
            high = min(low + 1, size_in - 1)
            matrix[i, low] += 1 - (source - low)
            matrix[i, high] += source - low
        return matrix
    return np.einsum("ph,nhwc,qw->npqc", weights(height, x.shape[1]), x, weights(width, x.shape[2]))


@pytest.mark.parametrize("size", [(12, 12), (7, 10), (13, 4), (1, 6)])
@pytest.mark.parametrize("bins", [1, 2, 3, 6])
def test_adaptive_pooling_matches_pytorch_bins(size, bins):
    x = np.random.default_rng(bins).random((2, *size, 3)).astype(np.float32)
    got = keras.ops.convert_to_numpy(AdaptiveAveragePooling2D(bins)(x))
    np.testing.assert_allclose(got, _adaptive_pool_reference(x, bins), rtol=1e-5, atol=1e-6)


def test_bilinear_resize_matches_aligned_corners_and_runs_in_a_graph():
    rng = np.random.default_rng(3)
    for source, target in (((2, 3), (8, 12)), ((6, 6), (13, 5)), ((1, 1), (4, 4)), ((5, 7), (5, 7))):
        x = rng.random((1, *source, 2)).astype(np.float32)
        reference = np.zeros((1, *target, 1), np.float32)
        got = keras.ops.convert_to_numpy(BilinearResizeLike()([x, reference]))
        np.testing.assert_allclose(got, _bilinear_reference(x, *target), rtol=1e-5, atol=1e-6)
    # sizes unknown until run time (None, None) in a compiled predict: two different sizes
    inputs = keras.Input((None, None, 2))
    pooled = AdaptiveAveragePooling2D(3)(inputs)
    model = keras.Model(inputs, BilinearResizeLike()([pooled, inputs]))
    for shape in ((1, 9, 12, 2), (2, 20, 7, 2)):
        x = rng.random(shape).astype(np.float32)
        expected = _bilinear_reference(_adaptive_pool_reference(x, 3), *shape[1:3])
        np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, shared_data):
    """One epoch of 2 steps of each family on MoNuSeg, scored on 2 held-out images."""
    from training import fit
    from training.config import resolve

    root = tmp_path_factory.mktemp("psp_ce2p")
    runs = {}
    for name in FAMILIES:
        overrides = {"model": name, "model_config": dict(TINY), "tile": 64, "batch_size": 2, "epochs": 1,
                     "steps_per_epoch": 2, "val_fraction": 0.04, "test_fraction": 0.07, "seed": 0,
                     "tune_postprocess": False, "data": f"monuseg:{shared_data}/monuseg2018/train",
                     "out": str(root / name)}
        runs[name] = fit.run(resolve(overrides=overrides), log=lambda message: None)
    return root, runs


@pytest.mark.parametrize("name", FAMILIES)
def test_short_monuseg_training_is_scored_with_instances(trained_runs, name):
    run = trained_runs[1][name]
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["model"] == name and config["model_config"]["backbone"] == "resnet50"
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert metrics["images"] == 2 and len(metrics["per_image"]) == 2
    for key in ("dice", "aji", "pq", "f1"):
        assert 0.0 <= metrics["mean"][key] <= 1.0
    assert metrics["mean"]["n_pred"] > 0  # the engine found instances
    model = keras.models.load_model(os.path.join(run, "model.keras"), safe_mode=True)
    assert model.predict(np.zeros((1, 96, 64, 3), np.float32), verbose=0).shape == (1, 96, 64, 1)


INVOKE = textwrap.dedent(r'''
    import sys
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(sys.argv[1])
    detail = interpreter.get_input_details()[0]
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], np.random.default_rng(0).integers(0, 255, (1, 128, 128, 3), np.uint8))
    interpreter.invoke()
    print("OUTPUT", interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).shape)
''')


@pytest.mark.parametrize("name", FAMILIES)
def test_export_saved_model_and_tflite_run_in_serving_edge(trained_runs, name, tmp_path, shared_data):
    pytest.importorskip("ai_edge_litert")
    import cv2

    from export import saved_model, tflite
    from kerasnuc.predict.litert import LiteModel

    root, runs = trained_runs
    version = saved_model.export_saved_model(runs[name], str(tmp_path / "serving"), **QUIET)
    assert os.path.exists(os.path.join(version, "saved_model.pb"))
    # a fixed tile size: LiteRT cannot convert the pooling's tensordot at a dynamic size (psp.py)
    path, _ = tflite.export_tflite(runs[name], "float32", out=str(tmp_path / f"{name}.tflite"),
                                   evaluate_model=False, input_size=128, **QUIET)
    split = json.load(open(os.path.join(runs[name], "split.json")))
    crop = cv2.imread(os.path.join(shared_data, "monuseg2018", "train", "images", split["test"][0] + ".png"))
    crop = crop[:200, :260]
    crop_path = str(tmp_path / "crop.png")
    cv2.imwrite(crop_path, crop)
    assert LiteModel(path).meta["multiple"] == 32
    out = str(tmp_path / "edge")
    result = subprocess.run([sys.executable, "-m", "serving.edge", path, "segment", crop_path, "--out", out],
                            capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    labels = cv2.imread(os.path.join(out, "crop_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == crop.shape[:2] and labels.max() >= 1  # instances
    # int8 converts (uint8 I/O); running it is checked in a subprocess because LiteRT aborts
    # ("double free") on the trained PSPSegNet's int8 model (known, unresolved: see the report)
    int8, report = tflite.export_tflite(runs[name], "int8", out=str(tmp_path / f"{name}_int8.tflite"),
                                        calibration=8, evaluate_model=False, input_size=128, **QUIET)
    assert report["io"]["input"]["dtype"] == "uint8" and report["io"]["output"]["dtype"] == "uint8"
    invoked = subprocess.run([sys.executable, "-c", INVOKE, int8], capture_output=True, text=True, timeout=300)
    if invoked.returncode != 0:
        pytest.xfail(f"LiteRT cannot run the int8 {name} model: {invoked.stderr.strip()[-200:]}")
    assert "OUTPUT (1, 128, 128, 1)" in invoked.stdout


JAX_SCRIPT = textwrap.dedent(r'''
    import json, sys
    import numpy as np
    import keras
    from kerasnuc import models

    assert keras.backend.backend() == "jax"
    x = np.random.default_rng(0).random((2, 64, 32, 3), dtype=np.float32)
    y = (x[..., :1] > 0.5).astype(np.float32)
    result = {}
    for name in ("pspsegnet", "ce2p"):
        model = models.build(name, backbone="resnet50", width=4)
        out = np.asarray(model.predict(x, verbose=0))
        model.compile(optimizer="sgd", loss="binary_crossentropy")
        loss = float(model.train_on_batch(x, y))
        result[name] = [list(out.shape), str(out.dtype), loss]
    print("RESULT" + json.dumps(result))
''')


def test_forward_and_train_step_on_jax():
    pytest.importorskip("jax")
    result = subprocess.run([sys.executable, "-c", JAX_SCRIPT], capture_output=True, text=True, timeout=600,
                            cwd=REPO, env={**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    for name, (shape, dtype, loss) in json.loads(line[len("RESULT"):]).items():
        assert shape == [2, 64, 32, 1] and dtype == "float32", name
        assert np.isfinite(loss) and loss > 0, name
