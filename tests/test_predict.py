"""kerasnuc.predict: one engine from a trained run (Keras) or a .tflite (LiteRT, no TensorFlow) to
nuclei, block-wise equal to whole-image, the CLI's four formats, QuPath's GeoJSON schema."""

import csv
import glob
import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

keras = pytest.importorskip("keras")
cv2 = pytest.importorskip("cv2")

import kerasnuc  # noqa: E402
from kerasnuc import metrics  # noqa: E402
from kerasnuc.data.imageio import read_image  # noqa: E402
from kerasnuc.predict import Predictor  # noqa: E402
from kerasnuc.predict import __main__ as cli  # noqa: E402
from import_blocker import LEAK_CHECK, PREAMBLE, environment  # noqa: E402
from training import fit  # noqa: E402
from training.config import resolve  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TINY = {"model_config": {"filters": 8, "depth": 3}, "tile": 64, "batch_size": 8,
        "steps_per_epoch": 12, "epochs": 4, "learning_rate": 3e-3, "seed": 1}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "unet"
    return fit.run(resolve(overrides={**TINY, "out": str(out)}), log=lambda m: None)


@pytest.fixture(scope="module")
def dsb_test_images(shared_data):
    paths = sorted(glob.glob(os.path.join(shared_data, "dsb2018", "stage1_test", "images", "*.png")))
    if not paths:
        pytest.skip("DSB 2018 stage1_test not in ../shared/data")
    large = [p for p in paths if min(cv2.imread(p).shape[:2]) >= 500]
    return paths[:3], large[:2]


def test_model_keras_loads_in_safe_mode_with_its_compile_state(trained_run):
    import kerasnuc.models  # noqa: F401  (registers layers and losses)

    model = keras.saving.load_model(os.path.join(trained_run, "model.keras"), safe_mode=True)
    assert model.loss is not None and type(model.loss).__name__ == "BCEDice"


def test_predict_instances_table_matches_labels(trained_run, dsb_test_images):
    predictor = kerasnuc.load(trained_run)
    image = read_image(dsb_test_images[0][0])
    labels, table = predictor.predict_instances(image)
    assert labels.shape == image.shape[:2] and labels.dtype == np.uint32
    count = int(labels.max())
    assert count >= 5, "a trained U-Net finds nuclei on a DSB test image"
    assert sorted(table["id"].tolist()) == list(range(1, count + 1))
    areas = np.bincount(labels.ravel())[table["id"]]
    np.testing.assert_array_equal(table["area"], areas)
    for column in ("centroid_x", "centroid_y", "bbox_x0", "perimeter", "eccentricity", "solidity",
                   "mean_intensity_0"):
        assert len(table[column]) == count
    # centroid of nucleus 1 (pixel centres at +0.5)
    rows, cols = np.nonzero(labels == table["id"][0])
    assert abs(table["centroid_x"][0] - (cols.mean() + 0.5)) < 1e-6
    assert abs(table["centroid_y"][0] - (rows.mean() + 0.5)) < 1e-6


def test_block_wise_equals_whole_image_on_real_images(trained_run, dsb_test_images):
    whole = kerasnuc.load(trained_run, block=4096)
    for path in dsb_test_images[1]:
        image = read_image(path)
        a, table_a = whole.predict_instances(image)
        # a block's context must hold a whole object (the engine's contract): a 4-epoch U-Net
        # merges clusters up to ~300 px, so the context grows with the largest object found
        largest = int(max(np.max(table_a["bbox_x1"] - table_a["bbox_x0"]),
                          np.max(table_a["bbox_y1"] - table_a["bbox_y0"])))
        overlap = max(whole.overlap(), int(whole.meta.get("tile_margin", 32)) + largest)
        blocks = Predictor(whole.runtime, whole.meta, block=128, block_overlap=overlap)
        b, table = blocks.predict_instances(image)
        assert metrics.aggregated_jaccard_index(a, b) >= 0.99, path
        # no nucleus cut at a seam: each block-wise nucleus is one connected piece (8-connected,
        # the connectivity of the post-processing's foreground components)
        from scipy import ndimage as ndi

        for index in table["id"][:200]:
            assert ndi.label(b == index, structure=np.ones((3, 3)))[1] == 1


def test_tta_averages_the_dihedral_views_mapped_back(trained_run, dsb_test_images):
    from kerasnuc.predict.tiling import dihedral_transform, inverse_dihedral

    predictor = kerasnuc.load(trained_run)
    image = read_image(dsb_test_images[1][0])[:200, :300]
    views = [inverse_dihedral(predictor.predict_maps(np.ascontiguousarray(dihedral_transform(image, k)))[0], k)
             for k in range(8)]
    averaged, _ = predictor.predict_maps(image, tta=8)
    np.testing.assert_allclose(averaged, np.mean(views, axis=0), atol=1e-5)
    assert np.abs(views[1] - views[0]).max() > 1e-3  # the views differ: the average is not a no-op
    out = predictor.predict_passes(image, tta=[0, 4], keep_views=True)
    assert len(out["views"]) == 2 and out["views"][0].shape == averaged.shape


def test_normalisation_equals_the_graph_copy():
    tf = pytest.importorskip("tensorflow")
    from export.saved_model import normalize as normalize_tf
    from kerasnuc.intensity import normalize_image

    image = (np.random.default_rng(0).random((17, 23, 3)) * 200 + 20).astype(np.uint8)
    for channels in (1, 3):
        graph = normalize_tf(tf.constant(image[None]), channels).numpy()[0]
        np.testing.assert_allclose(graph, normalize_image(image, channels), atol=1e-6)


def test_cli_writes_every_format_and_qupath_geojson(trained_run, dsb_test_images, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for path in dsb_test_images[0][:2]:
        os.symlink(path, folder / os.path.basename(path))
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    code = cli.main([trained_run, str(folder), "--out", str(out), "--image-mpp", "0.5", "--skip-bad"])
    assert code == 0  # broken.png skipped and listed, the others went on
    assert [e["file"] for e in json.load(open(out / "skipped.json"))["skipped"]] == [str(folder / "broken.png")]
    stem = os.path.splitext(os.path.basename(dsb_test_images[0][0]))[0]
    labels = cv2.imread(str(out / f"{stem}_labels.tif"), cv2.IMREAD_UNCHANGED)
    import tifffile

    labels = tifffile.imread(out / f"{stem}_labels.tif")
    assert labels.dtype == np.uint32 and labels.max() > 0
    collection = json.load(open(out / f"{stem}.geojson"))
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == labels.max()
    for feature in collection["features"]:
        uuid.UUID(feature["id"])
        assert feature["geometry"]["type"] == "Polygon"
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) >= 4
        assert feature["properties"]["objectType"] == "detection"
        assert {"area", "area_um2", "solidity"} <= set(feature["properties"]["measurements"])
    rows = list(csv.DictReader(open(out / f"{stem}_nuclei.csv")))
    assert len(rows) == labels.max() and abs(float(rows[0]["area_um2"]) - float(rows[0]["area"]) * 0.25) < 1e-3
    assert os.path.exists(out / f"{stem}_overlay.png")
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    before = os.path.getmtime(out / f"{stem}.geojson")
    assert cli.main([trained_run, dsb_test_images[0][0], "--out", str(out)]) == 0
    assert os.path.getmtime(out / f"{stem}.geojson") == before  # finished outputs are skipped


RUNNER = PREAMBLE + r'''
import numpy as np

import kerasnuc
from kerasnuc.data.imageio import read_image

labels, table = kerasnuc.load(sys.argv[1]).predict_instances(read_image(sys.argv[2]))
np.save(sys.argv[3], labels)
''' + LEAK_CHECK + '''
print("NO-BLOCKED-IMPORTS", len(table["id"]))
'''


def test_litert_runtime_without_tensorflow_gives_the_keras_instances(trained_run, dsb_test_images, tmp_path):
    pytest.importorskip("ai_edge_litert")
    from export import tflite

    path, _ = tflite.export_tflite(trained_run, "float32", out=str(tmp_path / "unet.tflite"),
                                   evaluate_model=False, log=lambda m: None)
    image_path = dsb_test_images[1][0]
    result = subprocess.run([sys.executable, "-c", RUNNER, path, image_path, str(tmp_path / "lite.npy")],
                            capture_output=True, text=True, timeout=300, cwd=REPO, env=environment())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "NO-BLOCKED-IMPORTS" in result.stdout
    lite = np.load(tmp_path / "lite.npy")
    keras_labels, _ = kerasnuc.load(trained_run).predict_instances(read_image(image_path))
    assert metrics.aggregated_jaccard_index(keras_labels, lite) >= 0.99


def test_objects_wider_than_the_block_context_are_counted_not_silently_lost():
    from kerasnuc.predict.engine import responsible_ids

    labels = np.zeros((100, 100), np.uint32)
    labels[40:60, 40:60] = 1          # inside the core, whole: kept
    labels[0:70, 45:55] = 2           # centroid in the core, runs into the top context border: lost
    labels[90:100, 0:10] = 3          # centroid outside the core: another block's
    kept, lost = responsible_ids(labels, (30, 70, 30, 70), touches=(True, True, True, True))
    assert kept.tolist() == [1] and lost == 1
    # at the image border (no context beyond it) the same object is whole and kept
    kept, lost = responsible_ids(labels, (30, 70, 30, 70), touches=(False, True, True, True))
    assert kept.tolist() == [1, 2] and lost == 0


class _Bright:
    """A runtime whose foreground map is the image itself (no network)."""

    meta = {"task": "segmentation", "channels": 1, "input_multiple": 1, "normalization": "minmax",
            "tile_margin": 0, "output_channels": 1, "postprocess": {"threshold": 0.5, "min_area": 1}}

    def run(self, batch):
        return (np.asarray(batch, np.float32) > 0.5).astype(np.float32)


def test_predict_instances_warns_when_objects_outgrow_the_block_context():
    image = np.zeros((256, 256, 1), np.uint8)
    image[20:236, 120:136] = 255
    narrow = Predictor(_Bright(), _Bright.meta, block=64, block_overlap=16)
    with pytest.warns(UserWarning, match="wider than the block context"):
        labels, _ = narrow.predict_instances(image)
    wide = Predictor(_Bright(), _Bright.meta, block=64, block_overlap=256)
    labels, table = wide.predict_instances(image)
    assert len(table["id"]) == 1 and np.count_nonzero(labels) == 216 * 16
