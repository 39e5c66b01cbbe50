"""The prediction engine applies a run's stain normaliser exactly once (kerasnuc issues 14/17):
``kerasnuc.load(run)`` maps equal the model on the normalised image, the nucleus table measures
the original pixels, and a dcgmm run (its E-step network copied into the run) still loads when
the run folder or its export moves; a missing stain model is an error naming the file."""

import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import kerasnuc  # noqa: E402
from kerasnuc import models  # noqa: E402
from kerasnuc.data import stain  # noqa: E402
from kerasnuc.data.imageio import read_image  # noqa: E402
from kerasnuc.intensity import normalize_image  # noqa: E402
from kerasnuc.predict import Predictor  # noqa: E402
from kerasnuc.runs import RunError, stain_of, write_json_atomic, write_run  # noqa: E402
from import_blocker import LEAK_CHECK, PREAMBLE, environment  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MONUSEG = os.path.abspath(os.path.join(REPO, "..", "shared", "data", "monuseg2018", "train", "images"))
TEMPLATE = os.path.join(MONUSEG, "TCGA-A7-A13E-01Z-00-DX1.png")  # breast (as tests/test_stain.py)
SOURCE = os.path.join(MONUSEG, "TCGA-18-5592-01Z-00-DX1.png")  # lung: the most different stains
UNET = {"filters": 4, "depth": 3}


@pytest.fixture(scope="module")
def tiles():
    if not (os.path.isfile(TEMPLATE) and os.path.isfile(SOURCE)):
        pytest.skip(f"MoNuSeg images not found in {MONUSEG}")
    return {"template": read_image(TEMPLATE, channels=3)[:256, :256],
            "source": np.ascontiguousarray(read_image(SOURCE, channels=3)[200:392, 300:492])}


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(3)
    return models.build("unet", input_shape=(None, None, 3), **UNET)


def model_maps(model, image):
    """The network on one whole image, normalised per image like training (no engine)."""
    return np.asarray(model(normalize_image(image, 3)[None], training=False))[0]


def stain_run(path, model, stored, config_stain):
    """A run folder as training.fit leaves one with stain normalisation: config.json says how,
    stain.json holds the fitted normaliser, its files copied in (training.fit's call)."""
    write_run(str(path), model, model_config=UNET, postprocess={"threshold": 0.5, "min_area": 5},
              stain=config_stain)
    write_json_atomic(str(path / "stain.json"), stain.store_files(stored, str(path)))
    return path


@pytest.fixture(scope="module")
def macenko_run(tmp_path_factory, tiles, model):
    normalizer = stain.make_normalizer("macenko").fit(tiles["template"])
    run = stain_run(tmp_path_factory.mktemp("macenko") / "run", model, normalizer.to_dict(),
                    {"method": "macenko", "template": TEMPLATE})
    return run, normalizer


def test_predict_maps_normalises_exactly_once(macenko_run, tiles, model):
    run, normalizer = macenko_run
    image = tiles["source"]
    once = normalizer.transform(image)
    maps = kerasnuc.load(run).predict_maps(image)[0]
    expected = model_maps(model, once)
    np.testing.assert_allclose(maps, expected, atol=2e-5)
    # what would be wrong shows: raw colours, or the normaliser applied twice
    assert np.abs(maps - model_maps(model, image)).max() > 1e-3
    twice = normalizer.transform(once)
    assert np.abs(once.astype(int) - twice).max() > 0
    assert np.abs(maps - model_maps(model, twice)).max() > np.abs(maps - expected).max()


def test_table_measures_original_pixels_in_one_block_and_in_many(macenko_run, tiles):
    run, normalizer = macenko_run
    image = tiles["source"]
    once = normalizer.transform(image)
    predictor = kerasnuc.load(run)
    maps = predictor.predict_maps(image)[0]
    # an untrained network: a threshold at its 80th percentile gives blobs to measure
    predictor.meta["postprocess"] = {"threshold": float(np.percentile(maps[..., 0], 80)), "min_area": 5}
    for engine in (predictor, predictor.with_options(block=64)):  # one block; 3 x 3 blocks
        labels, table = engine.predict_instances(image)
        assert len(table["id"]) >= 3
        moved = 0.0
        for row, nucleus in enumerate(table["id"]):
            inside = labels == nucleus
            for channel in range(3):
                measured = table[f"mean_intensity_{channel}"][row]
                np.testing.assert_allclose(measured, image[inside, channel].mean(), rtol=1e-6)
                moved = max(moved, abs(measured - once[inside, channel].mean()))
        assert moved > 5, "the normalised pixels differ from the original ones, and the table has the original"


@pytest.fixture(scope="module")
def dcgmm_run(tmp_path_factory, tiles, model):
    """An untrained E-step network (the builder; training is not what is tested) fitted on the
    template as train-dcgmm does, stored in a run like training.fit stores it."""
    from kerasnuc.data.stain.dcgmm import build_estep
    from kerasnuc.data.stain.dcgmm_train import write_dcgmm

    root = tmp_path_factory.mktemp("dcgmm")
    keras.utils.set_random_seed(0)
    normalizer = write_dcgmm(str(root / "dcgmm"), build_estep(clusters=3, filters=4, depth=1),
                             tiles["template"], TEMPLATE)
    run = stain_run(root / "run", model, normalizer.to_dict(),
                    {"method": "dcgmm", "model": str(root / "dcgmm"), "template": TEMPLATE})
    return root, run, normalizer


def test_dcgmm_run_carries_its_network_and_still_loads_when_moved(dcgmm_run, tiles, model):
    root, run, normalizer = dcgmm_run
    with open(run / "stain.json", encoding="utf-8") as handle:
        stored = json.load(handle)
    assert stored["method"] == "dcgmm" and stored["params"]["model"] == "stain_model.keras"
    assert (run / "stain_model.keras").is_file()
    image = tiles["source"]
    once = normalizer.transform(image)
    assert np.abs(once.astype(int) - image).max() > 10
    expected = model_maps(model, once)
    moved = root / "elsewhere" / "run"
    shutil.copytree(run, moved)
    shutil.rmtree(root / "dcgmm")  # the network train-dcgmm wrote is gone: the run has its own copy
    maps = kerasnuc.load(moved).predict_maps(image)[0]
    np.testing.assert_allclose(maps, expected, atol=2e-5)
    assert stain_of(str(moved))["params"]["model"] == str(moved / "stain_model.keras")

    (moved / "stain_model.keras").unlink()
    with pytest.raises(RunError, match=r"stain\.json.*stain_model\.keras is missing"):
        kerasnuc.load(moved)


def test_exported_tflite_carries_the_dcgmm_network(dcgmm_run, tiles, tmp_path):
    pytest.importorskip("tensorflow")
    from export import tflite
    from kerasnuc.predict.litert import LiteModel, load_metadata

    root, run, normalizer = dcgmm_run
    if not (run / "stain_model.keras").exists():  # the test above moved the run and removed its copy
        run = root / "elsewhere" / "run"
        shutil.copyfile(root / "run" / "stain_model.keras", run / "stain_model.keras")
    out, _ = tflite.export_tflite(str(run), "float32", out=str(tmp_path / "a" / "unet.tflite"),
                                  evaluate_model=False, log=lambda line: None)
    with open(tmp_path / "a" / "unet.json", encoding="utf-8") as handle:
        assert json.load(handle)["stain"]["params"]["model"] == "unet.stain_model.keras"
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))  # the export folder travels
    lite = str(tmp_path / "b" / "unet.tflite")
    maps = LiteModel(lite, load_metadata(lite)).predict_maps(tiles["source"])[0]
    np.testing.assert_allclose(maps, kerasnuc.load(run).predict_maps(tiles["source"])[0], atol=1e-4)
    os.remove(tmp_path / "b" / "unet.stain_model.keras")
    with pytest.raises(FileNotFoundError, match=r"unet\.json.*unet\.stain_model\.keras is missing"):
        load_metadata(lite)


def test_relative_stain_file_without_its_folder_is_refused():
    stored = {"method": "dcgmm", "params": {"model": "stain_model.keras"}, "fitted": None}
    with pytest.raises(ValueError, match="stain_model.keras' is relative"):
        stain.normalizer_from_dict(stored)


RUNNER = PREAMBLE + r'''
import json
import numpy as np
from kerasnuc.data.imageio import read_image
from kerasnuc.predict.engine import Predictor
from types import SimpleNamespace

args = json.loads(sys.argv[1])
engine = Predictor(SimpleNamespace(meta={"stain": args["stain"], "channels": 3}))
image = read_image(args["image"], channels=3)[:128, :128]
out = engine.model_pixels(image)
assert out.shape == image.shape and np.abs(out.astype(int) - image).max() > 0
print("NO-BLOCKED-IMPORTS")
''' + LEAK_CHECK


def test_engine_normalises_macenko_without_tensorflow_keras_or_jax(macenko_run):
    _, normalizer = macenko_run
    result = subprocess.run([sys.executable, "-c", RUNNER,
                             json.dumps({"stain": normalizer.to_dict(), "image": SOURCE})],
                            capture_output=True, text=True, timeout=120, cwd=REPO, env=environment())
    assert result.returncode == 0 and "NO-BLOCKED-IMPORTS" in result.stdout, result.stderr[-3000:]


def test_grey_images_pass_unchanged(macenko_run):
    _, normalizer = macenko_run
    grey = np.random.default_rng(0).integers(0, 255, (32, 32, 1), dtype=np.uint8)
    engine = Predictor(types.SimpleNamespace(meta={"stain": normalizer.to_dict(), "channels": 1}))
    np.testing.assert_array_equal(engine.model_pixels(grey), grey)


def test_evaluation_and_split_records_leave_normalising_to_the_engine(tmp_path, tiles, model):
    """training.evaluate reads the original images and its engine normalises them once:
    its Dice is the Dice of the model on the normalised image; records_of_split gives the
    original pixels unless asked (stain=True: int8 calibration, which bypasses the engine)."""
    import cv2

    from kerasnuc import metrics
    from kerasnuc.predict.postprocess import instances
    from kerasnuc.runs import records_of_split
    from training import evaluate

    labels_dir = os.path.join(os.path.dirname(MONUSEG), "labels")
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "labels").mkdir()
    image = tiles["source"]
    truth = cv2.imread(os.path.join(labels_dir, os.path.basename(SOURCE)), cv2.IMREAD_UNCHANGED)[200:392, 300:492]
    cv2.imwrite(str(tmp_path / "data" / "images" / "a.png"), image[..., ::-1])
    cv2.imwrite(str(tmp_path / "data" / "labels" / "a.png"), truth)
    normalizer = stain.make_normalizer("macenko").fit(tiles["template"])
    run = tmp_path / "run"
    stain_run(run, model, normalizer.to_dict(), {"method": "macenko", "template": TEMPLATE})
    post = {"threshold": float(np.percentile(model_maps(model, normalizer.transform(image))[..., 0], 70)),
            "min_area": 5}
    write_run(str(run), model, model_config=UNET, postprocess=post, data=f"folder:{tmp_path / 'data'}",
              split={"train": [], "val": [], "test": ["a"]}, stain={"method": "macenko", "template": TEMPLATE})

    np.testing.assert_array_equal(records_of_split(str(run), "test")[0].image, image)
    np.testing.assert_array_equal(records_of_split(str(run), "test", stain=True)[0].image,
                                  normalizer.transform(image))
    result = evaluate.evaluate_run(str(run), log=lambda line: None)
    dice = {name: float(metrics.pixel_dice(truth > 0, instances(model_maps(model, pixels), post) > 0))
            for name, pixels in (("once", normalizer.transform(image)), ("raw", image))}
    assert abs(dice["once"] - dice["raw"]) > 1e-3
    assert result["mean"]["dice"] == pytest.approx(dice["once"], abs=1e-6), (result["mean"], dice)
