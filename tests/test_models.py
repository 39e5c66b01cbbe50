"""Every registered model family: shapes, dtypes, save/load, mixed precision, paper sizes, MC dropout."""

import json

import numpy as np
import pytest

import keras

from kerasnuc import models

SEGMENTATION_LIKE = ["bayesnuseg", "ce2p", "fc_densenet", "fcn8", "mc_unet", "pspsegnet", "r2unet", "segnet",
                     "udnet", "unet"]
CLASSIFIERS = ["dcrn", "densenet"]
INSTANCE = ["maskrcnn"]  # static square input, outputs [boxes, scores, masks]
# Small widths keep the shared tests fast; the paper configurations are checked by count.
SMALL = {"unet": {"filters": 4, "depth": 3}, "segnet": {"filters": 4, "depth": 3},
         "r2unet": {"filters": 4, "depth": 3}, "udnet": {"filters": 4, "depth": 3},
         "mc_unet": {"filters": 4, "depth": 3}, "dcrn": {"initial_filters": 8, "layers_per_block": 2},
         "densenet": {"initial_filters": 8, "layers_per_block": 2},
         "fcn8": {"filters": 4, "fc_filters": 16},
         "fc_densenet": {"layers_per_block": 2, "growth_rate": 4, "first_filters": 8},  # 5 poolings, as the paper
         "pspsegnet": {"backbone": "resnet50", "width": 4},  # dilated ResNet-50, output stride 8
         "ce2p": {"backbone": "resnet50", "width": 4},
         "bayesnuseg": {"filters": 4, "depth": 3},
         "maskrcnn": {"backbone": "resnet50", "width": 0.125, "max_detections": 8, "rpn_pre_nms": 64,
                      "rpn_post_nms": 32}}
PAPER_PARAMETERS = {
    "r2unet": 0.98e6, "udnet": 1.04e6, "dcrn": 1.22e6,
    # Jegou et al. 2017: FC-DenseNet103 9.4 M.
    "fc_densenet": 9.4e6,
    # FCN-8s (Long et al.) with one output class: VGG-16 convs 14,714,688 + fc6 102,764,544 + fc7
    # 16,781,312 + score layers 4,867 + deconvolutions 288 = 134,265,699.
    "fcn8": 134.27e6,
    # ResNet-101 (keras.applications, no top) 42,658,176 in both; with one output class PSPSegNet: PSP
    # levels 4 x 1,050,624 + 3x3 bottleneck 4096 -> 512 18,876,416 + SegNet decoder (OS 8: 256/64,
    # 128/128, 64/64 convs and head) 1,661,761 = 67,398,849. CE2P (SCHP's AugmentCE2P without the
    # unused parsing/edge heads): PSP 4,202,496 + bottleneck 18,876,416 + parsing 289,984 + edge
    # 461,824 + fusion 263,425 = 66,752,321.
    "pspsegnet": 67.40e6, "ce2p": 66.75e6,
    # BayesNuSeg at filters 32, depth 5, one class: encoder of five residual SELU blocks (32..512
    # channels) 4,895,328 + two decoders (4 transposed-conv levels, two conv-BN-SELU units each)
    # 2 x 3,921,120 + 1x1 heads (seed 33, offsets 66, sigma 33) 132 = 12,737,700. The paper does not
    # state a count; this is the architecture its text describes.
    "bayesnuseg": 12.74e6,
    # Mask R-CNN (NucSeg: ResNet-101 FPN, 3 anchors per cell, one class): ResNet-101 42,658,176 + FPN
    # (4 laterals, 4 3x3 outputs of 256) 3,344,384 + RPN 593,935 + box head (7x7x256 -> 1024 -> 1024,
    # 2 class logits, 8 deltas) 13,905,930 + mask head (four 3x3 convs of 256, deconv, 1x1) 2,622,977
    # = 63,125,402 (Detectron's R-101-FPN Mask R-CNN: ~63 M).
    "maskrcnn": 63.13e6,
}
# output channels where a family's maps are not one probability: BayesNuSeg's [seed, o_y, o_x, sigma]
OUTPUT_CHANNELS = {"bayesnuseg": 4}


def test_registry_lists_the_thirteen_families():
    assert models.available() == ["bayesnuseg", "ce2p", "dcrn", "densenet", "fc_densenet", "fcn8", "maskrcnn",
                                  "mc_unet", "pspsegnet", "r2unet", "segnet", "udnet", "unet"]
    assert sorted(SEGMENTATION_LIKE + CLASSIFIERS + INSTANCE) == models.available()  # all in the shared tests


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'vnet'.*unet"):
        models.build("vnet")


def _sizes(name):
    """Non-square sizes for the family's input multiple: 32x48 and 64x40 where they are multiples
    of it (depth <= 3), else 1x3 and 2x1 multiples (32x96 and 64x32 for a multiple of 32)."""
    from kerasnuc.models.geometry import input_multiple

    multiple = input_multiple(name, SMALL[name])
    sizes = [(32, 48), (64, 40)]
    if any(side % multiple for size in sizes for side in size):
        sizes = [(multiple, 3 * multiple), (2 * multiple, multiple)]
    return sizes


@pytest.mark.parametrize("name", SEGMENTATION_LIKE)
@pytest.mark.parametrize("channels", [1, 3])
def test_dense_models_take_any_size_divisible_by_two_to_the_depth(name, channels):
    model = models.build(name, input_shape=(None, None, channels), **SMALL[name])
    for height, width in _sizes(name):
        out = model.predict(np.random.rand(2, height, width, channels).astype("float32"), verbose=0)
        assert out.shape == (2, height, width, OUTPUT_CHANNELS.get(name, 1))
        assert out.dtype == np.float32
    if name != "udnet":
        assert 0.0 <= out.min() and out.max() <= 1.0


@pytest.mark.parametrize("name", SEGMENTATION_LIKE)
def test_indivisible_input_size_is_rejected(name):
    with pytest.raises(ValueError, match="divisible"):
        models.build(name, input_shape=(30, 32, 3), **SMALL[name])


def test_udnet_has_a_linear_head():
    model = models.build("udnet", **SMALL["udnet"])
    assert model.get_layer("output").get_config()["activation"] == "linear"


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("channels", [1, 3])
def test_classifiers_output_class_probabilities(name, channels):
    model = models.build(name, input_shape=(32, 32, channels), **SMALL[name])
    out = model.predict(np.random.rand(3, 32, 32, channels).astype("float32"), verbose=0)
    assert out.shape == (3, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", models.available())
def test_save_load_round_trip_in_safe_mode(name, tmp_path):
    shape = (64, 64, 3) if name in INSTANCE else (32, 32, 3)
    model = models.build(name, input_shape=shape if name in CLASSIFIERS + INSTANCE else (None, None, 3),
                         **SMALL[name])
    x = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    as_json = lambda m: json.dumps(m.get_config(), sort_keys=True, default=str)  # noqa: E731
    assert json.loads(as_json(loaded)) == json.loads(as_json(model))
    if models.is_stochastic(model):
        # Same weights: with dropout rate forced to 0 both must agree exactly.
        for layer in (model, loaded):
            for sub in layer.layers:
                if isinstance(sub, models.MCDropout):
                    sub.rate = 0.0
    for ours, theirs in zip(_outputs(loaded.predict(x, verbose=0)), _outputs(model.predict(x, verbose=0))):
        np.testing.assert_allclose(ours, theirs, atol=1e-6)


def _outputs(value):
    """A model's output(s) as a list (instance models have several)."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


@pytest.mark.parametrize("name", models.available())
def test_mixed_precision_build_emits_float32(name):
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        shape = (32, 32, 3) if name in CLASSIFIERS else (64, 64, 3) if name in INSTANCE else (None, None, 3)
        model = models.build(name, input_shape=shape, **SMALL[name])
        assert model.layers[1].compute_dtype == "float16" or any(
            layer.compute_dtype == "float16" for layer in model.layers)
        side = 64 if name in INSTANCE else 32
        out = model.predict(np.random.rand(1, side, side, 3).astype("float32"), verbose=0)
        assert all(o.dtype == np.float32 for o in _outputs(out))
        assert all(t.dtype == "float32" for t in _outputs(model.output))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.parametrize("name,expected", sorted(PAPER_PARAMETERS.items()))
def test_paper_configurations_have_the_published_size(name, expected):
    count = models.build(name).count_params()
    assert abs(count - expected) / expected <= 0.10, f"{name}: {count:,} parameters vs {expected:,.0f}"


def test_mc_model_samples_while_deterministic_models_repeat():
    x = np.random.default_rng(1).random((1, 32, 32, 3), dtype=np.float32)
    mc = models.build("mc_unet", **SMALL["mc_unet"])
    assert models.is_stochastic(mc)
    assert not np.allclose(mc.predict(x, verbose=0), mc.predict(x, verbose=0))
    unet = models.build("unet", **SMALL["unet"])
    assert not models.is_stochastic(unet)
    np.testing.assert_array_equal(unet.predict(x, verbose=0), unet.predict(x, verbose=0))


def test_mc_dropout_leaves_batchnorm_statistics_alone():
    mc = models.build("mc_unet", **SMALL["mc_unet"])
    bn = next(layer for layer in mc.layers if isinstance(layer, keras.layers.BatchNormalization))
    before = keras.ops.convert_to_numpy(bn.moving_mean).copy()
    mc.predict(np.random.rand(4, 32, 32, 3).astype("float32") * 10, verbose=0)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn.moving_mean), before)


def test_segnet_unpools_by_the_pooling_indices():
    x = np.zeros((1, 4, 4, 1), np.float32)
    x[0, 1, 0, 0], x[0, 0, 3, 0], x[0, 3, 3, 0], x[0, 2, 1, 0] = 5, 7, 9, 3
    pooled, indices = models.MaxPoolingWithIndices()(x)
    restored = keras.ops.convert_to_numpy(models.MaxUnpoolingWithIndices()([pooled, indices]))
    np.testing.assert_array_equal(restored, x)
    segnet = models.build("segnet", **SMALL["segnet"])
    assert any(isinstance(layer, models.MaxUnpoolingWithIndices) for layer in segnet.layers)
    assert not any(isinstance(layer, keras.layers.UpSampling2D) for layer in segnet.layers)


def test_pooling_indices_are_the_first_argmax_of_each_window():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, (2, 6, 8, 3)).astype(np.float32)  # many ties inside windows
    _, indices = models.MaxPoolingWithIndices()(x)
    windows = x.reshape(2, 3, 2, 4, 2, 3).transpose(0, 1, 3, 5, 2, 4).reshape(2, 3, 4, 3, 4)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(indices), windows.argmax(-1))


@pytest.mark.parametrize("name", ["r2unet", "udnet", "dcrn"])
def test_recurrent_steps_do_not_share_batchnorm(name):
    """Recurrent convs share conv weights across steps but never a BatchNorm: a shared one
    averages the statistics of different steps, and inference then differs from training."""
    shape = (32, 32, 3) if name == "dcrn" else (None, None, 3)
    model = models.build(name, input_shape=shape)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(layer.momentum == 0.9 for layer in norms)  # statistics keep up in short runs
    assert all(len(layer._inbound_nodes) == 1 for layer in norms), \
        [layer.name for layer in norms if len(layer._inbound_nodes) > 1]
    shared_convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)
                    and len(layer._inbound_nodes) > 1]
    assert shared_convs  # the recurrence itself is still there
