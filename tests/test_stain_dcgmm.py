"""DCGMM stain normalisation: HSD, the M-step and likelihood, brief training on MoNuSeg, the normaliser."""

import json
import os
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest

from kerasnuc.data import stain
from kerasnuc.data.stain import dcgmm

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
MONUSEG = os.path.abspath(os.path.join(DATA, "monuseg2018", "train", "images"))
TEMPLATE = os.path.join(MONUSEG, "TCGA-A7-A13E-01Z-00-DX1.png")  # breast (as tests/test_stain.py)
SOURCE = os.path.join(MONUSEG, "TCGA-18-5592-01Z-00-DX1.png")  # lung, the most different stain vectors
CROP = 500

# Measured on the 500 x 500 crops with the 120-step network below: Macenko H, E angles to the
# template 16.5 / 11.2 deg before, 2.0 / 6.2 deg after.
needs_monuseg = pytest.mark.skipif(not os.path.isdir(MONUSEG), reason=f"MoNuSeg images not found at {MONUSEG}")


def _read(path):
    from kerasnuc.data.imageio import read_image

    return read_image(path, channels=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny E-step network trained briefly through the command line, fitted on the template."""
    if not os.path.isdir(MONUSEG):
        pytest.skip(f"MoNuSeg images not found at {MONUSEG}")
    from kerasnuc.data.stain.__main__ import main

    out = tmp_path_factory.mktemp("dcgmm")
    assert main(["train-dcgmm", "--data", MONUSEG, "--template", TEMPLATE, "--out", str(out),
                 "--steps", "120", "--tile", "128", "--batch", "4", "--filters", "4", "--depth", "2",
                 "--lr", "1e-3", "--log-every", "40"]) == 0
    with open(out / "dcgmm.json", encoding="utf-8") as handle:
        record = json.load(handle)
    return out, record


@pytest.fixture(scope="module")
def normalizer(trained):
    out, _ = trained
    return stain.make_normalizer("dcgmm", model=str(out)).fit(_read(TEMPLATE)[:CROP, :CROP])


@pytest.fixture(scope="module")
def source():
    if not os.path.isfile(SOURCE):
        pytest.skip(f"MoNuSeg image not found at {SOURCE}")
    return _read(SOURCE)[:CROP, :CROP]


# ----------------------------------------------------------------------------- HSD, M-step, NLL


def test_hsd_round_trip_and_known_values():
    values = np.arange(1, 256, dtype=np.uint8)
    rgb = np.stack(np.meshgrid(values, values[::5], values[::3], indexing="ij"), axis=-1)
    hsd = stain.rgb_to_hsd(rgb)
    np.testing.assert_array_equal(stain.hsd_to_rgb(hsd), rgb)
    assert hsd[..., 1].min() >= -1 - 1e-9 and hsd[..., 1].max() <= 2 + 1e-9
    assert np.abs(hsd[..., 2]).max() <= np.sqrt(3) + 1e-9
    # density is the mean OD; neutral grey has no chroma; pure red OD is the triangle's corner
    np.testing.assert_allclose(stain.od_to_hsd(np.array([0.3, 0.6, 0.9])), [0.6, -0.5, -0.3 / (np.sqrt(3) * 0.6)])
    np.testing.assert_allclose(stain.od_to_hsd(np.array([0.7, 0.7, 0.7])), [0.7, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(stain.od_to_hsd(np.array([1.5, 0.0, 0.0])), [0.5, 2.0, 0.0], atol=1e-12)
    white = stain.rgb_to_hsd(np.full((2, 2, 3), 255, np.uint8))
    np.testing.assert_array_equal(white, 0.0)  # glass: zero density, the grey point
    np.testing.assert_array_equal(stain.hsd_to_rgb(white), 255)
    assert stain.hsd_to_rgb(stain.rgb_to_hsd(np.zeros((1, 1, 3), np.uint8))).tolist() == [[[1, 1, 1]]]


def _numpy_m_step(hsd, gamma):
    mass = gamma.sum(axis=(1, 2))  # (B, K)
    mean = np.einsum("bhwk,bhwc->bkc", gamma, hsd) / mass[..., None]
    diff = hsd[:, :, :, None, :] - mean[:, None, None]
    variance = np.einsum("bhwk,bhwkc->bkc", gamma, diff ** 2) / mass[..., None]
    return mean, variance + dcgmm.MIN_VARIANCE


def test_m_step_closed_form_matches_numpy():
    from keras import ops

    rng = np.random.default_rng(0)
    hsd = rng.normal(size=(2, 12, 10, 3)) * [0.4, 0.3, 0.2] + [0.8, 0.1, -0.2]
    gamma = np.zeros((2, 12, 10, 3))
    gamma[:, :4, :, 0], gamma[:, 4:8, :, 1], gamma[:, 8:, :, 2] = 1.0, 0.7, 1.0  # hand-made regions
    gamma[:, 4:8, :, 0] = 0.3
    mean, variance = (ops.convert_to_numpy(v) for v in dcgmm.m_step(hsd, gamma))
    expected_mean, expected_variance = _numpy_m_step(hsd, gamma)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variance, expected_variance, rtol=1e-5, atol=1e-6)
    # the region of class 2 alone: its plain mean and (population) variance
    np.testing.assert_allclose(mean[1, 2], hsd[1, 8:].reshape(-1, 3).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(variance[1, 2], hsd[1, 8:].reshape(-1, 3).var(axis=0) + 1e-4, rtol=1e-5)
    # sums of row bands add up to the whole image's (how large images are done)
    halves = [dcgmm.cluster_sums(hsd[:, rows], gamma[:, rows]) for rows in (slice(0, 5), slice(5, None))]
    whole = dcgmm.cluster_sums(hsd, gamma)
    for a, b, total in zip(*halves, whole):
        np.testing.assert_allclose(ops.convert_to_numpy(a) + ops.convert_to_numpy(b),
                                   ops.convert_to_numpy(total), rtol=1e-10)


def _three_class_image(rng):
    means = np.array([[1.2, 0.1, 0.3], [0.5, -0.2, 0.25], [0.05, 0.0, 0.0]])
    stds = np.array([[0.2, 0.05, 0.04], [0.1, 0.08, 0.05], [0.02, 0.1, 0.1]])
    labels = np.repeat(np.arange(3), 400).reshape(1, 30, 40)
    hsd = means[labels] + stds[labels] * rng.normal(size=labels.shape + (3,))
    return hsd, np.eye(3)[labels], means, stds


def test_nll_is_finite_and_lowest_for_the_true_parameters():
    from keras import ops
    from scipy.stats import norm

    hsd, gamma, means, stds = _three_class_image(np.random.default_rng(1))
    true = float(ops.convert_to_numpy(dcgmm.mixture_nll(hsd, gamma, means[None], stds[None] ** 2))[0])
    reference = -norm.logpdf(hsd, means[gamma.argmax(-1)], stds[gamma.argmax(-1)]).sum(-1).mean()
    assert np.isfinite(true)
    np.testing.assert_allclose(true, reference, rtol=1e-5)
    wrong = {"shifted means": (means + 0.1, stds), "too wide": (means, stds * 2.0),
             "too narrow": (means, stds / 2.0), "classes swapped": (means[[1, 0, 2]], stds[[1, 0, 2]])}
    for name, (mean, std) in wrong.items():
        value = float(ops.convert_to_numpy(dcgmm.mixture_nll(hsd, gamma, mean[None], std[None] ** 2))[0])
        assert np.isfinite(value) and value > true + 0.1, f"{name}: NLL {value:.3f} vs true {true:.3f}"
    # the training loss (M-step Gaussians): the true memberships beat uniform or wrong ones
    loss = {name: float(ops.convert_to_numpy(dcgmm.dcgmm_loss(hsd, g))[0]) for name, g in (
        ("true", gamma), ("uniform", np.full_like(gamma, 1 / 3)), ("shifted by 5 rows", np.roll(gamma, 5, axis=1)))}
    assert all(np.isfinite(list(loss.values())))
    assert loss["true"] < loss["uniform"] - 0.5 and loss["true"] < loss["shifted by 5 rows"] - 0.5, loss
    # one colour (pure glass) stays finite: the variance floor bounds the density
    glass = np.zeros((1, 8, 8, 3))
    assert np.isfinite(ops.convert_to_numpy(dcgmm.dcgmm_loss(glass, np.full((1, 8, 8, 3), 1 / 3)))).all()


# ----------------------------------------------------------------------------- training and the normaliser


@needs_monuseg
def test_brief_training_lowers_the_nll_and_writes_a_safe_model(trained):
    import keras

    import kerasnuc.models  # noqa: F401

    out, record = trained
    summary = record["training"]
    print(f"validation NLL {summary['validation_nll_before']:.4f} -> {summary['validation_nll_after']:.4f} "
          f"in {summary['seconds']} s; curve {summary['nll_curve']}")
    assert summary["validation_nll_after"] < summary["validation_nll_before"] - 0.2
    assert summary["nll_curve"][-1][1] < summary["nll_curve"][0][1]
    assert record["method"] == "dcgmm" and record["params"]["model"] == str(out / "model.keras")
    assert record["template"] == TEMPLATE and len(record["fitted"]["weights_"]) == 3
    network = keras.saving.load_model(out / "model.keras", safe_mode=True)
    assert network.input_shape == (None, None, None, 1) and network.output_shape == (None, None, None, 3)


@needs_monuseg
def test_normalising_moves_stain_vectors_toward_the_template(normalizer, source):
    template_matrix = stain.estimate_stain_matrix(_read(TEMPLATE)[:CROP, :CROP])
    before = stain.stain_angles_deg(stain.estimate_stain_matrix(source), template_matrix)
    with warnings.catch_warnings():
        warnings.simplefilter("error", stain.StainNormalizationWarning)
        out = normalizer.transform(source)
    assert out.dtype == np.uint8 and out.shape == source.shape
    after = stain.stain_angles_deg(stain.estimate_stain_matrix(out), template_matrix)
    print(f"dcgmm: H, E angle to template before {before.round(2)} after {after.round(2)} deg")
    assert before.min() > 10.0
    assert np.all(after < before) and after.mean() < 0.5 * before.mean()


@needs_monuseg
def test_blank_tiles_pass_through_unchanged_with_warning(normalizer, source):
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(240, 3, (128, 128, 3)), 0, 255).astype(np.uint8)
    speck = glass.copy()
    speck[50:60, 50:60] = source[200:210, 200:210]
    for name, tile in {"white": np.full((128, 128, 3), 255, np.uint8), "black": np.zeros((128, 128, 3), np.uint8),
                       "glass": glass, "tiny tissue fraction": speck}.items():
        with pytest.warns(stain.StainNormalizationWarning, match="too little tissue"):
            out = normalizer.transform(tile)
        assert np.array_equal(out, tile), f"dcgmm changed the {name} tile"
    with pytest.raises(ValueError, match="cannot fit"):
        stain.make_normalizer("dcgmm", model=normalizer.model).fit(np.full((128, 128, 3), 255, np.uint8))


@needs_monuseg
def test_no_nan_with_saturated_pixels_odd_sizes_and_an_absent_class(normalizer, source):
    tile = source[:203, :141].copy()  # not a multiple of the network's 4
    tile[:60, :60] = 0  # pen-black corner
    tile[-40:, -50:] = 255  # glass corner
    hsd, gamma, fractions, mean, std = normalizer.statistics(tile)
    assert gamma.shape == tile.shape[:2] + (3,)
    np.testing.assert_allclose(gamma.sum(-1), 1.0, atol=1e-5)
    assert np.isfinite(mean).all() and np.isfinite(std).all() and (std >= 0.01 - 1e-9).all()
    out = normalizer.transform(tile)
    assert out.shape == tile.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - tile).mean() > 1.0  # it did normalise
    # a class absent from the image (zero mass) is left alone, and nothing becomes NaN
    absent = np.zeros_like(gamma)
    absent[..., 0] = 1.0
    moved = dcgmm.map_to_template(hsd, absent, mean, std, normalizer.means_, normalizer.stds_,
                                  np.array([True, False, False]))
    assert np.isfinite(moved).all()


@needs_monuseg
def test_large_images_are_tiled_exactly(normalizer, source):
    density = stain.rgb_to_hsd(source[:300, :221])[..., 0]
    whole = dcgmm.memberships(normalizer.network, density, tile=512)
    tiled = dcgmm.memberships(normalizer.network, density, tile=96)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


@needs_monuseg
def test_json_round_trip_gives_identical_output(normalizer, trained, source):
    stored = json.loads(json.dumps(normalizer.to_dict()))
    assert stored["method"] == "dcgmm" and stored["params"] == normalizer.get_params()
    restored = stain.normalizer_from_dict(stored)
    assert type(restored) is stain.DCGMMNormalizer
    tile = source[:256, :200]
    np.testing.assert_array_equal(restored.transform(tile), normalizer.transform(tile))
    # what the prediction engine does with a run's or an export's metadata (serving.edge uses it)
    from kerasnuc.predict.engine import Predictor

    engine = Predictor(types.SimpleNamespace(meta={"stain": stored, "channels": 3}))
    np.testing.assert_array_equal(engine.model_pixels(tile), normalizer.transform(tile))
    # the folder's dcgmm.json is a fitted normaliser too (fitted on the whole template)
    out, record = trained
    from_folder = stain.normalizer_from_dict(record)
    assert from_folder.is_fitted and from_folder.model == str(out / "model.keras")
    assert not np.array_equal(from_folder.transform(tile), tile)


@needs_monuseg
def test_normalize_command_applies_a_stored_normaliser(trained, source, tmp_path):
    from kerasnuc.data.imageio import read_image, write_png_atomic
    from kerasnuc.data.stain.__main__ import main

    out, record = trained
    write_png_atomic(str(tmp_path / "tile.png"), source[:160, :192])
    assert main(["normalize", "--stain", str(out / "dcgmm.json"), "--out-dir", str(tmp_path / "out"),
                 str(tmp_path / "tile.png")]) == 0
    expected = stain.normalizer_from_dict(record).transform(source[:160, :192])
    np.testing.assert_array_equal(read_image(str(tmp_path / "out" / "tile.png"), channels=3), expected)
    assert main(["normalize", "--stain", str(tmp_path / "missing.json"), "--out-dir", str(tmp_path),
                 str(tmp_path / "tile.png")]) == 1


@needs_monuseg
def test_training_config_stain_option_uses_dcgmm(trained, source):
    """training.fit's stain step with {"method": "dcgmm", "model": DIR, "template": IMAGE}."""
    from training.fit import _normalise_stains

    out, _ = trained
    record = types.SimpleNamespace(name="a", channels=3, image=source[:128, :128].copy())
    config = types.SimpleNamespace(stain={"method": "dcgmm", "model": str(out), "template": TEMPLATE})
    records, _, stored = _normalise_stains(config, [record], [], log=lambda line: None)
    assert stored["method"] == "dcgmm" and stored["template"] == TEMPLATE
    assert not np.array_equal(records[0].image, source[:128, :128])
    np.testing.assert_array_equal(stain.normalizer_from_dict(stored).transform(source[:128, :128]), records[0].image)


def test_bad_model_path_names_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "model.keras"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        stain.make_normalizer("dcgmm", model=str(missing))
    with pytest.raises(FileNotFoundError, match="model.keras"):
        stain.make_normalizer("dcgmm", model=str(tmp_path))  # a folder without the network
    with pytest.raises(ValueError, match="needs model=PATH"):
        stain.make_normalizer("dcgmm")
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a zip")
    normalizer = stain.make_normalizer("dcgmm", model=str(junk))
    tissue = np.random.default_rng(0).integers(0, 200, (64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=f"{junk}.*not a readable Keras model"):
        normalizer.fit(tissue)
    from kerasnuc.models.unet import build_unet

    rgb_model = tmp_path / "segmentation.keras"
    build_unet(filters=2, depth=1, out_channels=3).save(rgb_model)  # a Keras model, but RGB in
    with pytest.raises(ValueError, match=f"{rgb_model} is not a DCGMM E-step network"):
        stain.make_normalizer("dcgmm", model=str(rgb_model)).fit(tissue)


def test_train_command_checks_its_inputs_before_training(tmp_path, capsys):
    from kerasnuc.data.imageio import write_png_atomic
    from kerasnuc.data.stain.__main__ import main

    blank = str(tmp_path / "blank.png")
    write_png_atomic(blank, np.full((64, 64, 3), 255, np.uint8))
    assert main(["train-dcgmm", "--data", str(tmp_path), "--template", blank, "--out", str(tmp_path / "o")]) == 1
    assert f"template {blank}: too little tissue" in capsys.readouterr().err
    tissue = str(tmp_path / "tissue.png")
    write_png_atomic(tissue, np.random.default_rng(0).integers(40, 200, (64, 64, 3), dtype=np.uint8))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train-dcgmm", "--data", str(empty), "--template", tissue, "--out", str(tmp_path / "o")]) == 1
    assert f"{empty}: no images" in capsys.readouterr().err
    assert main(["train-dcgmm", "--data", str(tmp_path), "--template", tissue, "--out", str(tmp_path / "o"),
                 "--tile", "128"]) == 1
    assert "no RGB images of at least 128 x 128 pixels" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_stain_package_imports_without_keras():
    """The engine and the edge use the other normalisers without TensorFlow/Keras."""
    from import_blocker import LEAK_CHECK, PREAMBLE, environment

    code = PREAMBLE + (
        "import numpy as np\n"
        "from kerasnuc.data import stain\n"
        "rgb = np.random.default_rng(0).integers(30, 220, (64, 64, 3)).astype(np.uint8)\n"
        "out = stain.normalizer_from_dict(stain.make_normalizer('reinhard').fit(rgb).to_dict()).transform(rgb)\n"
        "assert out.shape == rgb.shape and 'dcgmm' in stain.NORMALIZERS\n") + LEAK_CHECK
    result = subprocess.run([sys.executable, "-c", code], env=environment(), capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
