"""Stain normalisation on real H&E (MoNuSeg 2018, CRCHistoPhenotypes) and on degenerate tiles."""

import json
import os
import warnings

import numpy as np
import pytest

from kerasnuc.data import stain

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
MONUSEG = os.path.join(DATA, "monuseg2018", "train", "images")
CRC = os.path.join(DATA, "crchistophenotypes", "images")
TEMPLATE = "TCGA-A7-A13E-01Z-00-DX1"  # breast
SOURCE = "TCGA-18-5592-01Z-00-DX1"  # lung, the most different stain vectors from the template
CROP = 500  # Vahadane's sparse coding is the slow part; a quarter tile keeps the tests quick

# Measured (500x500 crops): H, E angles to the template before normalisation
# Macenko 16.5/11.2 deg, Vahadane 16.7/12.9 deg; after: Macenko 0.01/0.55, Vahadane 0.98/1.77.
MAX_ANGLE_AFTER_DEG = 5.0
MIN_ANGLE_BEFORE_DEG = 10.0

pytestmark = pytest.mark.skipif(not os.path.isdir(MONUSEG), reason=f"MoNuSeg images not found at {MONUSEG}")


def _read_rgb(path):
    import cv2

    image = cv2.imread(path, cv2.IMREAD_COLOR)
    assert image is not None, path
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def template():
    return _read_rgb(os.path.join(MONUSEG, TEMPLATE + ".png"))[:CROP, :CROP]


@pytest.fixture(scope="module")
def source():
    return _read_rgb(os.path.join(MONUSEG, SOURCE + ".png"))[:CROP, :CROP]


@pytest.fixture(scope="module")
def fitted(template):
    return {method: stain.make_normalizer(method).fit(template)
            for method in ("reinhard", "macenko", "vahadane")}


def _degenerate_tiles(source):
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(240, 3, (256, 256, 3)), 0, 255).astype(np.uint8)
    speck = glass.copy()
    speck[100:116, 100:120] = source[200:216, 200:220]  # 320 tissue-ish pixels: < 0.5 % of the tile
    grey = np.repeat(rng.integers(60, 200, (256, 256, 1)), 3, axis=2).astype(np.uint8)
    return {
        "white": np.full((256, 256, 3), 255, np.uint8),
        "black": np.zeros((256, 256, 3), np.uint8),
        "glass": glass,
        "tiny tissue fraction": speck,
        "grey (one colour direction)": grey,
    }


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_normalised_stain_vectors_match_template(method, fitted, source):
    normalizer = fitted[method]
    matrix = normalizer.stain_matrix_
    assert matrix.shape == (2, 3)
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-9)
    assert matrix[0, 0] > matrix[1, 0], "H row must have the larger red OD component"

    before = stain.stain_angles_deg(stain.estimate_stain_matrix(source, method), matrix)
    out = normalizer.transform(source)
    assert out.dtype == np.uint8 and out.shape == source.shape
    after = stain.stain_angles_deg(stain.estimate_stain_matrix(out, method), matrix)
    print(f"{method}: H, E angle to template before {before.round(2)} after {after.round(2)} deg")
    assert after.max() < MAX_ANGLE_AFTER_DEG
    assert before.max() > MIN_ANGLE_BEFORE_DEG
    assert before.min() > 2 * after.max()


def test_macenko_across_datasets(fitted):
    """A Warwick (CRC) tile normalised to a TCGA template: another lab, scanner, organ."""
    path = os.path.join(CRC, "img1.png")
    if not os.path.isfile(path):
        pytest.skip(f"CRCHistoPhenotypes image not found at {path}")
    crc = _read_rgb(path)
    normalizer = fitted["macenko"]
    before = stain.stain_angles_deg(stain.estimate_stain_matrix(crc, "macenko"), normalizer.stain_matrix_)
    after = stain.stain_angles_deg(
        stain.estimate_stain_matrix(normalizer.transform(crc), "macenko"), normalizer.stain_matrix_)
    print(f"CRC img1 macenko: before {before.round(2)} after {after.round(2)} deg")
    assert after.max() < 2.0 and before.max() > 5.0


def test_vahadane_fast_solver_agrees_with_sklearn_dictionary_learning(template):
    opts = dict(max_fit_pixels=500, max_iter=50)
    fast = stain.estimate_stain_matrix(template, "vahadane", **opts)
    reference = stain.estimate_stain_matrix(template, "vahadane", solver="dictionary_learning", **opts)
    angles = stain.stain_angles_deg(fast, reference)
    print(f"vahadane alternating vs DictionaryLearning: {angles.round(2)} deg")
    assert angles.max() < 2.0
    assert np.all(fast >= 0)


def test_reinhard_matches_template_lab_statistics(fitted, template, source):
    from skimage.color import rgb2lab

    def stats(rgb):
        lab = rgb2lab(rgb).reshape(-1, 3)
        return lab.mean(axis=0), lab.std(axis=0)

    out = fitted["reinhard"].transform(source)
    (mean_t, std_t), (mean_s, _), (mean_o, std_o) = stats(template), stats(source), stats(out)
    print(f"reinhard LAB mean template {mean_t.round(2)} source {mean_s.round(2)} out {mean_o.round(2)}; "
          f"std template {std_t.round(2)} out {std_o.round(2)}")
    assert np.abs(mean_o - mean_t).max() < 1.0  # clipping to [0, 255] costs a little
    assert np.abs(mean_s - mean_t).max() > 10.0
    np.testing.assert_allclose(std_o, std_t, rtol=0.1)


@pytest.mark.parametrize("method", ["reinhard", "macenko", "vahadane"])
def test_degenerate_tiles_pass_through_unchanged_with_warning(method, fitted, source):
    normalizer = fitted[method]
    for name, tile in _degenerate_tiles(source).items():
        if method == "reinhard" and name.startswith("grey"):
            continue  # a grey tissue tile is a valid colour transfer for Reinhard
        with pytest.warns(stain.StainNormalizationWarning):
            out = normalizer.transform(tile)
        assert np.array_equal(out, tile), f"{method} changed the {name} tile"
        assert out.dtype == np.uint8


@pytest.mark.parametrize("method", ["reinhard", "macenko", "vahadane"])
def test_real_glass_tile_passes_through(method, fitted):
    path = os.path.join(CRC, "img76.png")  # a real tile that is ~99.9 % glass
    if not os.path.isfile(path):
        pytest.skip(f"CRCHistoPhenotypes image not found at {path}")
    tile = _read_rgb(path)
    with pytest.warns(stain.StainNormalizationWarning, match="too little tissue"):
        out = fitted[method].transform(tile)
    assert np.array_equal(out, tile)


@pytest.mark.parametrize("method", ["reinhard", "macenko", "vahadane"])
def test_fit_on_bad_template_raises(method, source):
    for name, tile in _degenerate_tiles(source).items():
        if method == "reinhard" and name.startswith("grey"):
            continue
        with pytest.raises(ValueError, match="cannot fit"):
            stain.make_normalizer(method).fit(tile)


def test_single_stain_tile_is_refused(fitted):
    """Eosin only (no haematoxylin): Macenko/Vahadane would invent a second stain."""
    rng = np.random.default_rng(1)
    density = rng.uniform(0.2, 1.5, 256 * 256)[:, None] * np.array([0.07, 0.99, 0.11])
    eosin = np.clip(255 * np.exp(-density) + rng.normal(0, 3, density.shape), 0, 255)
    eosin = eosin.astype(np.uint8).reshape(256, 256, 3)
    for method in ("macenko", "vahadane"):
        with pytest.warns(stain.StainNormalizationWarning):
            out = fitted[method].transform(eosin)
        assert np.array_equal(out, eosin)


@pytest.mark.parametrize("method", ["reinhard", "macenko", "vahadane"])
def test_json_round_trip_gives_identical_output(method, fitted, source):
    normalizer = fitted[method]
    stored = json.loads(json.dumps(normalizer.to_dict()))
    assert stored["method"] == method and stored["params"] == normalizer.get_params()
    restored = stain.normalizer_from_dict(stored)
    assert type(restored) is type(normalizer)
    tile = source[:256, :256]
    np.testing.assert_array_equal(restored.transform(tile), normalizer.transform(tile))
    if method != "reinhard":
        np.testing.assert_array_equal(restored.stain_matrix_, normalizer.stain_matrix_)
    assert type(stain.StainNormalizer.from_dict(stored)) is type(normalizer)


def test_interface_errors(source):
    with pytest.raises(ValueError, match="unknown stain normalisation method"):
        stain.make_normalizer("nope")
    with pytest.raises(RuntimeError, match="not fitted"):
        stain.make_normalizer("macenko").transform(source)
    with pytest.raises(ValueError, match="uint8"):
        stain.make_normalizer("macenko").fit(source.astype(np.float32))
    with pytest.raises(ValueError, match="does not estimate a stain matrix"):
        stain.estimate_stain_matrix(source, "reinhard")
    with pytest.raises(ValueError):
        stain.estimate_stain_matrix(np.full((64, 64, 3), 255, np.uint8), "macenko")


def test_hed_jitter(source):
    tile = source[:128, :128]
    assert np.array_equal(stain.hed_jitter(tile, np.random.default_rng(0), sigma=0.0, bias=0.0), tile)
    a = stain.hed_jitter(tile, np.random.default_rng(3))
    b = stain.hed_jitter(tile, np.random.default_rng(3))
    c = stain.hed_jitter(tile, np.random.default_rng(4))
    assert a.dtype == np.uint8 and a.shape == tile.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    mild = stain.hed_jitter(tile, np.random.default_rng(5), sigma=0.05, bias=0.0)
    assert 0 < np.abs(mild.astype(int) - tile).mean() < 5
