"""FCN-8s and FC-DenseNet: VGG-16 weights from a local file, the Tiramisu variants' layer and
parameter counts, a short training of each on real MoNuSeg tiles scored by the engine, export to
SavedModel and int8 TFLite, LiteRT instances from serving.edge, and the JAX backend."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import keras

from kerasnuc import models
from kerasnuc.models.backbones import BackboneWeightsError

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TINY = {"fcn8": {"filters": 4, "fc_filters": 16},
        "fc_densenet": {"layers_per_block": 1, "growth_rate": 4, "first_filters": 8}}
CONVS = (keras.layers.Conv2D, keras.layers.Conv2DTranspose)


# --- FCN-8s: the encoder is VGG-16 by layer name -------------------------------------------

@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    """Random (not ImageNet) VGG16 notop weights, saved as keras.applications saves them."""
    keras.utils.set_random_seed(3)
    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(None, None, 3))
    path = str(tmp_path_factory.mktemp("vgg") / "vgg16_notop.weights.h5")
    vgg.save_weights(path)
    return path, {layer.name: layer.get_weights() for layer in vgg.layers if layer.get_weights()}


def test_fcn8_encoder_takes_vgg16_weights_from_a_file(vgg16_file):
    path, saved = vgg16_file
    assert len(saved) == 13  # VGG-16's 13 convolutions, all named as in our encoder
    random = models.build("fcn8", fc_filters=16)
    loaded = models.build("fcn8", fc_filters=16, backbone_weights=path)
    for name in ("block1_conv1", "block3_conv2", "block5_conv3"):
        kernel, bias = loaded.get_layer(name).get_weights()
        np.testing.assert_array_equal(kernel, saved[name][0])
        np.testing.assert_array_equal(bias, saved[name][1])
        assert not np.array_equal(random.get_layer(name).get_weights()[0], saved[name][0])
    # the head is not VGG-16: FCN-8s' deconvolutions start as bilinear upsampling
    x = np.random.default_rng(0).random((1, 64, 64, 3), dtype=np.float32)
    assert loaded.predict(x, verbose=0).shape == (1, 64, 64, 1)
    up = loaded.get_layer("up5").get_weights()[0][:, :, 0, 0]
    np.testing.assert_allclose(up, np.outer([0.25, 0.75, 0.75, 0.25], [0.25, 0.75, 0.75, 0.25]))


def test_fcn8_backbone_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(BackboneWeightsError, match="missing.h5: backbone weights file not found"):
        models.build("fcn8", fc_filters=16, backbone_weights=str(tmp_path / "missing.h5"))
    garbage = tmp_path / "garbage.weights.h5"
    garbage.write_bytes(b"not an HDF5 file" * 10)
    with pytest.raises(BackboneWeightsError, match="garbage.weights.h5: cannot load vgg16 weights"):
        models.build("fcn8", fc_filters=16, backbone_weights=str(garbage))
    with pytest.raises(ValueError, match="backbone_weights needs filters=64"):
        models.build("fcn8", filters=32, backbone_weights=str(garbage))


def test_fcn8_has_vgg16s_thirteen_convs_and_five_deconvolutions():
    model = models.build("fcn8", **TINY["fcn8"])
    names = [layer.name for layer in model.layers]
    encoder = [n for n in names if n.startswith("block") and "_conv" in n]
    assert encoder == [f"block{b}_conv{c}" for b, convs in enumerate((2, 2, 3, 3, 3), 1)
                       for c in range(1, convs + 1)]
    ups = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2DTranspose)]
    assert [layer.strides for layer in ups] == [(2, 2)] * 5
    # FCN-8s fusion: pool4 after the first 2x step, pool3 after the second
    assert names.index("fuse_pool4") < names.index("up2") < names.index("fuse_pool3") < names.index("up3")
    assert model.get_layer("fc6").kernel_size == (7, 7) and model.get_layer("drop6").rate == 0.5


# --- FC-DenseNet: the paper's variants --------------------------------------------------

@pytest.mark.parametrize("variant,convs,parameters", [(103, 103, 9.4e6), (67, 67, 3.5e6), (56, 56, 1.5e6)])
def test_fc_densenet_variants_have_the_papers_layers_and_size(variant, convs, parameters):
    model = models.build("fc_densenet", variant=variant)
    # as Jegou et al. count: first conv, dense layers, one per transition down / up, the classifier
    assert sum(isinstance(layer, CONVS) for layer in model.layers) == convs
    count = model.count_params()
    assert abs(count - parameters) / parameters <= 0.10, f"FC-DenseNet{variant}: {count:,} parameters"
    if variant == 103:
        # only a block's new maps go up: the bottleneck's 15 x 16 into the first transition up,
        # and 256 maps reach the classifier (the paper's Table 2)
        assert model.get_layer("tu1").kernel.shape == (3, 3, 240, 240)
        assert model.get_layer("output").kernel.shape[2] == 256
        assert model.get_layer("td1_pool").__class__ is keras.layers.MaxPooling2D


def test_fc_densenet_options_are_checked():
    with pytest.raises(ValueError, match="variant must be one of \\[56, 67, 103\\]"):
        models.build("fc_densenet", variant=100)
    with pytest.raises(ValueError, match="layers_per_block must be"):
        models.build("fc_densenet", layers_per_block=[2, 2, 2])
    mirrored = models.build("fc_densenet", layers_per_block=[1, 1, 1, 1, 2, 3], growth_rate=4, first_filters=8)
    assert [len([1 for layer in mirrored.layers if layer.name.startswith(f"{block}_l")
                 and layer.name.endswith("_conv")]) for block in ("up1", "up5", "bottleneck")] == [2, 1, 3]


# --- a short training of each on MoNuSeg, exported and run on the edge ----------------------

@pytest.fixture(scope="module")
def monuseg_subset(shared_data, tmp_path_factory):
    """Five real MoNuSeg 2018 tiles (links, not copies): 3 train, 1 val, 1 test keep it cheap."""
    source = os.path.join(shared_data, "monuseg2018", "train")
    root = tmp_path_factory.mktemp("monuseg")
    stems = sorted(name[:-len(".xml.gz")] for name in os.listdir(os.path.join(source, "annotations")))[:5]
    for folder, suffix in (("images", ".png"), ("annotations", ".xml.gz")):
        os.makedirs(root / folder)
        for stem in stems:
            os.symlink(os.path.join(source, folder, stem + suffix), root / folder / (stem + suffix))
    return str(root)


@pytest.fixture(scope="module", params=sorted(TINY))
def trained(request, monuseg_subset, tmp_path_factory):
    from training import fit

    name = request.param
    out = str(tmp_path_factory.mktemp("runs") / name)
    argv = ["--model", name, "--model-config", json.dumps(TINY[name]), "--data", f"monuseg:{monuseg_subset}",
            "--tile", "64", "--batch-size", "2", "--epochs", "1", "--steps-per-epoch", "2",
            "--learning-rate", "0.01", "--val-fraction", "0.2", "--test-fraction", "0.2", "--out", out]
    fit.main(argv)
    return name, out


def test_short_training_is_scored_with_instances_on_held_out_images(trained):
    name, run = trained
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["model"] == name and config["model_config"] == TINY[name]
    split = json.load(open(os.path.join(run, "split.json")))
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert metrics["split"] == "test" and metrics["images"] == len(split["test"]) == 1
    assert {row["name"] for row in metrics["per_image"]} == set(split["test"])
    assert not set(split["test"]) & set(split["train"])
    for key in ("aji", "dice", "pq"):
        assert 0.0 <= metrics["mean"][key] <= 1.0
    assert len(open(os.path.join(run, "history.csv")).read().splitlines()) == 2  # header + 1 epoch


def test_export_to_saved_model_and_int8_tflite_runs_on_the_edge(trained, monuseg_subset, tmp_path):
    import cv2

    from export import saved_model, tflite
    from import_blocker import FRAMEWORKS, LEAK_CHECK, PREAMBLE, environment

    name, run = trained
    quiet = {"log": lambda message: None}
    path = saved_model.export_saved_model(run, str(tmp_path / "serving"), **quiet)
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    lite, report = tflite.export_tflite(run, "int8", out=str(tmp_path / f"{name}.tflite"), calibration=8,
                                        calibration_outliers=0, repeats=1, max_images=1, **quiet)
    assert report["io"]["input"]["dtype"] == "uint8" and report["agreement"]["images"] == 1
    # a 2-step model's maps sit near the threshold, so int8 agreement is not judged here (on the
    # CPU-budget fcn8 run it is mean |diff| 0.004, Dice vs Keras 0.98); the report must be complete
    summary = report["agreement"]["summary"]
    assert 0 <= summary["dice_tflite"] <= 1 and 0 <= summary["mean_abs_diff"] < 1 and summary["latency_ms"] > 0
    assert json.load(open(lite[:-len(".tflite")] + ".json"))["multiple"] == 32
    # a 200 x 260 crop of a held-out tile: the edge runner pads it to multiples of 32 itself
    test_name = json.load(open(os.path.join(run, "split.json")))["test"][0]
    image = cv2.imread(os.path.join(monuseg_subset, "images", test_name + ".png"))[:200, :260]
    image_path = str(tmp_path / "crop.png")
    cv2.imwrite(image_path, image)
    out = str(tmp_path / "edge")
    runner = PREAMBLE + "\nfrom serving import edge\nedge.main(sys.argv[1:])\n" + LEAK_CHECK
    result = subprocess.run([sys.executable, "-c", runner, lite, "segment", image_path, "--out", out],
                            capture_output=True, text=True, timeout=120, cwd=REPO, env=environment(FRAMEWORKS))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    labels = cv2.imread(os.path.join(out, "crop_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.dtype == np.uint16 and labels.shape == (200, 260)
    ids = np.unique(labels[labels > 0])
    assert len(ids) >= 1 and list(ids) == list(range(1, labels.max() + 1))  # instances numbered 1..n


# --- JAX backend ------------------------------------------------------------------------------

JAX_SCRIPT = textwrap.dedent(r'''
    import json, sys
    import numpy as np
    import keras
    from kerasnuc import models

    result = {"backend": keras.backend.backend()}
    x = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    y = (x[..., :1] > 0.5).astype(np.float32)
    for name, config in json.loads(sys.argv[1]).items():
        model = models.build(name, **config)
        model.compile(optimizer="adam", loss="binary_crossentropy")  # jit-compiled steps, as on a GPU
        loss = model.train_on_batch(x, y)
        out = keras.ops.convert_to_numpy(model.predict_on_batch(x))
        result[name] = {"shape": list(out.shape), "finite": bool(np.isfinite(out).all()), "loss": float(loss)}
    print(json.dumps(result))
''')


def test_forward_and_train_step_on_jax():
    pytest.importorskip("jax")
    # XLA's optimisation passes cost minutes of compiling here and change no result this checks
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    result = subprocess.run([sys.executable, "-c", JAX_SCRIPT, json.dumps(TINY)], capture_output=True,
                            text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backend"] == "jax"
    for name in TINY:
        assert report[name]["shape"] == [2, 64, 64, 1] and report[name]["finite"], report
        assert np.isfinite(report[name]["loss"]) and report[name]["loss"] > 0
