"""Whole slides: a pyramidal, tiled, JPEG TIFF built here from real MoNuSeg H&E tiles opens in
tifffile and OpenSlide alike, is read at the model's pixel size, skips glass, and comes back
as nuclei in level-0 coordinates in all four formats, block-wise as whole."""

import glob
import json
import os

import numpy as np
import pytest

pytest.importorskip("zarr")
pytest.importorskip("imagecodecs")
cv2 = pytest.importorskip("cv2")
tifffile = pytest.importorskip("tifffile")

from kerasnuc import metrics  # noqa: E402
from kerasnuc.predict import sources, writers  # noqa: E402

MPP = 0.25
GLASS = 600  # white margin right and below the tissue


@pytest.fixture(scope="module")
def trained_he_run(shared_data, tmp_path_factory):
    """A tiny U-Net trained briefly on the MoNuSeg tiles (its run records their 0.25 µm/px)."""
    pytest.importorskip("keras")
    from training import fit
    from training.config import resolve

    data = os.path.join(shared_data, "monuseg2018", "train")
    if not os.path.isdir(data):
        pytest.skip("MoNuSeg not found")
    overrides = {"data": f"monuseg:{data}", "model_config": {"filters": 8, "depth": 3}, "tile": 64,
                 "batch_size": 8, "steps_per_epoch": 12, "epochs": 4, "learning_rate": 3e-3, "seed": 1,
                 "out": str(tmp_path_factory.mktemp("he") / "unet")}
    return fit.run(resolve(overrides=overrides), log=lambda m: None)


@pytest.fixture(scope="module")
def trained_he_predictor(trained_he_run):
    import kerasnuc

    predictor = kerasnuc.load(trained_he_run)
    assert predictor.meta["mpp"] == pytest.approx(MPP)  # the reader's pixel size, recorded in the run
    return predictor


def write_slide(path, image, mpp=MPP, levels=3):
    """Successive reduced-resolution pages (the layout OpenSlide's generic TIFF reader knows)."""
    with tifffile.TiffWriter(path) as tif:
        level = image
        for k in range(levels):
            pixel = mpp * 2 ** k
            tif.write(level, tile=(256, 256), compression="jpeg", photometric="rgb",
                      resolution=(1e4 / pixel, 1e4 / pixel), resolutionunit="CENTIMETER",
                      subfiletype=0 if k == 0 else 1)
            level = cv2.resize(level, (level.shape[1] // 2, level.shape[0] // 2), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def slide(shared_data, tmp_path_factory):
    paths = sorted(glob.glob(os.path.join(shared_data, "monuseg2018", "train", "images", "*.png")))[:4]
    if len(paths) < 4:
        pytest.skip("MoNuSeg images not found")
    tiles = [cv2.imread(p)[..., ::-1] for p in paths]
    tissue = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
    canvas = np.full((tissue.shape[0] + GLASS, tissue.shape[1] + GLASS, 3), 245, np.uint8)
    canvas[:tissue.shape[0], :tissue.shape[1]] = tissue
    path = str(tmp_path_factory.mktemp("slide") / "mosaic.tif")
    write_slide(path, canvas)
    return path, canvas


def test_tifffile_and_openslide_read_the_same_slide(slide):
    path, canvas = slide
    lazy = sources.open_slide(path)
    assert lazy.levels == [(2600, 2600), (1300, 1300), (650, 650)] and lazy.mpp == pytest.approx(MPP)
    region = lazy.read(0, 100, 300, 200, 500)
    assert np.abs(region.astype(int) - canvas[100:300, 200:500]).mean() < 4  # JPEG
    openslide = pytest.importorskip("openslide")
    vendor = sources._openslide_slide(path)
    assert vendor.levels == lazy.levels and vendor.mpp == pytest.approx(MPP)
    assert np.abs(vendor.read(1, 50, 150, 70, 170).astype(int) - lazy.read(1, 50, 150, 70, 170)).mean() < 1
    assert openslide.OpenSlide(path).properties["openslide.vendor"] == "generic-tiff"


def test_view_reads_the_level_nearest_the_pixel_size(slide):
    path, canvas = slide
    big = sources.open_slide(path)
    half = big.view(mpp=0.5)
    assert (half.level, half.scale, half.shape) == (1, 1.0, (1300, 1300, 3))
    third = big.view(mpp=0.75)  # between levels: the finer one, resampled
    assert third.level == 1 and third.shape[:2] == (867, 867)
    expected = cv2.resize(canvas, (867, 867), interpolation=cv2.INTER_AREA)
    assert np.abs(third.read(0, 867, 0, 867).astype(int) - expected).mean() < 4
    with pytest.raises(ValueError, match="pixel size"):
        sources.Slide.from_array(canvas, "x.png").view(mpp=0.5)


def test_tissue_mask_finds_the_tissue_and_not_the_glass(slide):
    path, _ = slide
    mask, step = sources.open_slide(path).view(mpp=0.5).tissue()
    tissue_side = int(2000 / 2 / step)
    assert mask[:tissue_side - 10, :tissue_side - 10].mean() > 0.6  # H&E has lumens and fat inside
    blocks = mask[:tissue_side].reshape(4, tissue_side // 4, -1)[:, :, :tissue_side // 4 * 4]
    assert blocks.reshape(4, tissue_side // 4, 4, -1).any(axis=(1, 3)).all()  # every tissue block is kept
    assert not mask[tissue_side + 10:, :].any() and not mask[:, tissue_side + 10:].any()


def test_slide_blocks_equal_one_block_and_cover_the_tissue(trained_he_predictor, slide):
    path, _ = slide
    view = sources.open_slide(path).view(mpp=0.5)
    trained_he_predictor.block = 4096
    whole, whole_table = trained_he_predictor.predict_instances(view)
    trained_he_predictor.block = 384
    blocks, table = trained_he_predictor.predict_instances(view)
    assert whole.max() > 100
    assert metrics.aggregated_jaccard_index(whole, blocks) >= 0.99
    assert len(table["id"]) == len(np.unique(blocks)) - 1 == blocks.max()
    # level-0 coordinates: twice the view's
    rows, cols = np.nonzero(blocks == 1)
    assert table["centroid_x"][0] == pytest.approx(2 * (cols.mean() + 0.5), abs=0.01)
    assert table["area"][0] == pytest.approx(4 * len(rows))
    assert blocks[1000 + 20:, :].max() == 0 and blocks[:, 1000 + 20:].max() == 0  # glass


def test_cli_on_a_slide_writes_level0_geojson_and_a_pyramidal_ome_tiff(trained_he_run, slide, tmp_path,
                                                                      monkeypatch):
    from kerasnuc.predict import __main__ as cli

    path, _ = slide
    monkeypatch.setattr(writers.LabelsWriter, "LARGE", 1024 * 1024)  # this small slide takes the slide path
    out = tmp_path / "out"
    # no --mpp: the run's 0.25 µm/px, so level 0
    assert cli.main([trained_he_run, path, "--out", str(out), "--block", "1024"]) == 0
    with tifffile.TiffFile(out / "mosaic_labels.tif") as tif:
        assert tif.is_ome and len(tif.series[0].levels) == 2
        labels = tif.series[0].levels[0].asarray()
        assert 'PhysicalSizeX="0.25"' in tif.ome_metadata
    assert labels.shape == (2600, 2600) and labels.dtype == np.uint32 and labels.max() > 100
    assert labels[2000 + 20:].max() == 0 and labels[:, 2000 + 20:].max() == 0  # glass skipped
    collection = json.load(open(out / "mosaic.geojson"))
    assert len(collection["features"]) == labels.max()
    xs = np.concatenate([np.asarray(f["geometry"]["coordinates"][0])[:, 0] for f in collection["features"]])
    assert xs.max() > 1500 and xs.max() <= 2000 + 40
    assert collection["features"][0]["properties"]["measurements"]["area_um2"] > 0
    assert os.path.getsize(out / "mosaic_overlay.png") > 0
    assert not [n for n in os.listdir(out) if n.startswith(".") or ".tmp" in n]
