"""BayesNuSeg: its loss, its sequential clustering, the engine path to instances (blocks,
uncertainty), a short MoNuSeg training scored by the engine, SavedModel / int8 TFLite
exports and serving.edge."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import keras

from kerasnuc import models
from kerasnuc.losses import get_loss
from kerasnuc.losses_embedding import BayesNuSegLoss
from kerasnuc.postprocess.embedding import instances_from_embeddings, split_embedding_maps
from kerasnuc.predict.postprocess import foreground, instances, uncertainty

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCALE = 64.0
PARAMS = {"method": "embedding", "threshold": 0.5, "seed_threshold": 0.5, "score_threshold": 0.5,
          "min_area": 5, "offset_scale": SCALE, "classes": 1}


def blobs(height, width, centres, radius, sigma_px=2.0):
    """(labels, seed, offsets, sigma): discs whose offsets point exactly at their centres."""
    labels = np.zeros((height, width), np.int32)
    offsets = np.zeros((height, width, 2), np.float32)
    for i, (r, c) in enumerate(centres, 1):
        r0, c0 = max(r - radius, 0), max(c - radius, 0)
        rows, cols = np.mgrid[r0:min(r + radius + 1, height), c0:min(c + radius + 1, width)]
        window = np.s_[r0:r0 + rows.shape[0], c0:c0 + rows.shape[1]]
        disc = ((rows - r) ** 2 + (cols - c) ** 2 <= radius ** 2) & (labels[window] == 0)
        labels[window][disc] = i
        offsets[window][disc] = np.stack([(r - rows[disc]) / SCALE, (c - cols[disc]) / SCALE], axis=-1)
    seed = (labels > 0).astype(np.float32)
    return labels, seed, offsets, np.full((height, width), sigma_px / SCALE, np.float32)


def as_maps(seed, offsets, sigma):
    """The model's output layout: [seed, (o_y + 1) / 2, (o_x + 1) / 2, sigma]."""
    return np.concatenate([seed[..., None], (offsets + 1) / 2, sigma[..., None]], axis=-1).astype(np.float32)


def same_partition(a, b):
    """True if labels ``a`` and ``b`` are equal up to renumbering."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[a > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


# ------------------------------------------------------------------------------------- loss

def test_loss_is_near_zero_for_a_perfect_embedding_and_rises_when_offsets_are_wrong():
    labels, seed, offsets, sigma = blobs(32, 32, [(8, 8), (20, 22), (8, 24)], 4, sigma_px=1.0)
    y = labels[None, ..., None].astype(np.float32)
    loss = BayesNuSegLoss(max_instances=8, offset_scale=SCALE)
    perfect = as_maps(seed, offsets, sigma)[None]
    terms = {k: float(np.asarray(v)[0]) for k, v in loss.terms(y, perfect).items()}
    assert terms["iou"] < 1e-3 and terms["seed"] < 1e-6 and terms["smooth"] < 1e-9, terms
    no_offsets = as_maps(seed, np.zeros_like(offsets), sigma)[None]  # every pixel its own centre
    assert float(loss(y, no_offsets)) > 0.5
    shuffled = offsets.copy()
    shuffled[labels == 2] += 3.0 / SCALE  # one nucleus' pixels aim 3 px off, the others stay right
    assert float(loss(y, perfect)) < float(loss(y, as_maps(seed, shuffled, sigma)[None]))
    uneven = sigma * np.where(np.arange(32) % 2, 1.0, 2.0)[None, :]  # sigma varies inside nuclei
    assert loss.terms(y, as_maps(seed, offsets, uneven)[None])["smooth"][0] > 1e-5
    wrong_seed = as_maps(1.0 - seed, offsets, sigma)[None]
    assert loss.terms(y, wrong_seed)["seed"][0] > 0.5


def test_loss_weights_and_ignored_ids():
    labels, seed, offsets, sigma = blobs(32, 32, [(8, 8), (20, 22)], 4, sigma_px=1.0)
    y = labels[None, ..., None].astype(np.float32)
    maps = as_maps(seed, np.zeros_like(offsets), sigma * 3)[None]
    base = BayesNuSegLoss(max_instances=8)
    terms = {k: float(np.asarray(v)[0]) for k, v in base.terms(y, maps).items()}
    total = float(base(y, maps))
    assert total == pytest.approx(terms["iou"] + terms["seed"] + 10 * terms["smooth"], rel=1e-5)
    # an id above max_instances is neither an instance nor background
    one = BayesNuSegLoss(max_instances=1)
    only_first = np.where(labels == 1, 1, 0)[None, ..., None].astype(np.float32)
    assert float(one.terms(y, maps)["iou"][0]) == pytest.approx(float(one.terms(only_first, maps)["iou"][0]))
    assert float(one.terms(y, maps)["seed"][0]) < float(one.terms(only_first, maps)["seed"][0])
    restored = keras.losses.deserialize(keras.losses.serialize(get_loss("bayesnuseg", lambda_smooth=5.0)))
    assert isinstance(restored, BayesNuSegLoss) and restored.lambda_smooth == 5.0


# ------------------------------------------------------------------------------- clustering

def test_three_blobs_give_exactly_three_instances():
    labels, seed, offsets, sigma = blobs(48, 48, [(10, 10), (24, 30), (38, 12)], 6)
    found = instances_from_embeddings(seed, offsets, sigma, offset_scale=SCALE)
    assert found.max() == 3 and same_partition(found, labels)


def test_touching_nuclei_stay_apart():
    labels, seed, offsets, sigma = blobs(40, 60, [(20, 18), (20, 30), (20, 42)], 6)
    # the discs touch (centres 12 px apart, radius 6): one connected foreground
    from scipy import ndimage

    assert ndimage.label(labels > 0)[1] == 1
    found = instances_from_embeddings(seed, offsets, sigma, offset_scale=SCALE)
    assert found.max() == 3 and same_partition(found, labels)


def test_seeds_below_the_threshold_give_nothing():
    labels, seed, offsets, sigma = blobs(40, 40, [(12, 12), (28, 28)], 6)
    assert instances_from_embeddings(seed * 0.4, offsets, sigma, seed_threshold=0.5,
                                     foreground_threshold=0.3, offset_scale=SCALE).max() == 0
    weak = seed * np.where(labels == 2, 0.4, 1.0)  # only nucleus 1 reaches the seed threshold
    found = instances_from_embeddings(weak, offsets, sigma, seed_threshold=0.5, foreground_threshold=0.3,
                                      offset_scale=SCALE)
    assert found.max() == 1 and np.array_equal(found > 0, labels == 1)


def test_clustering_a_1000_pixel_tile_of_1296_nuclei():
    """Correct on a crowded tile (speed is bench/'s business, not a timed test's)."""
    centres = [(r, c) for r in range(10, 1000, 28) for c in range(10, 1000, 28)]  # 1,296 nuclei
    labels, seed, offsets, sigma = blobs(1000, 1000, centres, 10)
    seed = np.where(labels > 0, 0.6 + 0.4 * np.random.default_rng(0).random(labels.shape), 0).astype(np.float32)
    found = instances_from_embeddings(seed, offsets, sigma, offset_scale=SCALE)
    assert found.max() == len(centres) and same_partition(found, labels)


# ------------------------------------------------------------------------ engine dispatch

class MapsRuntime:
    """A runtime whose 'network' reads the maps from the image: channel 0 the seed, 1-2 the
    stored offsets; sigma is constant. Pixel-wise, so tiles and blocks see the same maps."""

    static_shape = None

    def __init__(self, sigma):
        self.sigma = sigma
        self.meta = {"task": "segmentation", "channels": 3, "multiple": 1, "tile_margin": 8,
                     "postprocess": PARAMS, "stochastic": False}

    def run(self, batch):
        batch = np.asarray(batch, np.float32)
        return np.concatenate([batch, np.full(batch.shape[:3] + (1,), self.sigma, np.float32)], axis=-1)


def test_engine_gives_the_same_instances_whole_and_block_wise():
    from kerasnuc.predict.engine import Predictor

    centres = [(r, c) for r in range(14, 300, 30) for c in range(14, 300, 30)]
    labels, seed, offsets, sigma = blobs(300, 300, centres, 9)
    maps = as_maps(seed, offsets, sigma)
    image = np.clip(np.rint(maps[..., :3] * 255), 0, 255).astype(np.uint8)
    image[0, 0] = (0, 0, 0)
    image[0, 1] = (255, 255, 255)  # min-max normalisation maps 0..255 to 0..1 exactly
    runtime = MapsRuntime(2.0 / SCALE)
    whole, table = Predictor(runtime, block=4096).predict_instances(image)
    blocks, _ = Predictor(runtime, block=96, block_overlap=40).predict_instances(image)
    inside = labels > 0
    assert whole.max() == len(centres) == len(table["id"])
    assert same_partition(np.where(inside, whole, 0), labels)
    assert same_partition(np.where(inside, blocks, 0), np.where(inside, whole, 0))
    # the seed map is the foreground, the predictive variance of the seed the uncertainty
    assert np.array_equal(foreground(maps, PARAMS), seed)
    variance = np.stack([np.full((4, 4), v, np.float32) for v in (0.1, 0.5, 0.7, 0.9)], axis=-1)
    assert np.allclose(uncertainty(variance, PARAMS), 0.1)
    assert np.allclose(uncertainty(variance, {"threshold": 0.5}), 0.55)
    assert same_partition(instances(maps, PARAMS), labels)
    with pytest.raises(ValueError, match="classes \\+ 3"):
        split_embedding_maps(maps[..., :3])


# -------------------------------------------------------------------- model registration

def test_bayesnuseg_is_registered_stochastic_with_one_classes_plus_3_output():
    assert "bayesnuseg" in models.available() and models.task_of("bayesnuseg") == "segmentation"
    model = models.build("bayesnuseg", filters=4, depth=3, classes=2)
    assert models.is_stochastic(model) and len(model.outputs) == 1
    x = np.random.default_rng(0).random((1, 32, 48, 3), dtype=np.float32)
    a, b = model.predict(x, verbose=0), model.predict(x, verbose=0)
    assert a.shape == (1, 32, 48, 5) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert not np.allclose(a, b)  # MC dropout stays on in predict
    with pytest.raises(ValueError, match="divisible"):
        models.build("bayesnuseg", input_shape=(36, 32, 3), filters=4, depth=4)


JAX_SCRIPT = textwrap.dedent(r'''
    import numpy as np, keras
    from kerasnuc import models
    from kerasnuc.data import load_dataset
    from training.embedding import EmbeddingDataset
    from kerasnuc.losses import get_loss
    assert keras.backend.backend() == "jax"
    data = EmbeddingDataset(load_dataset("sample")[:2], tile=32, batch_size=2, steps=1, channels=3)
    x, y = data[0]
    model = models.build("bayesnuseg", filters=4, depth=3)
    model.compile(optimizer="adam", loss=get_loss("bayesnuseg", max_instances=32))
    out = np.asarray(model(x))  # eager: one jit compile (the train step) is enough
    loss = model.train_on_batch(x, y)
    print(out.shape, float(np.asarray(loss).ravel()[0]))
''')


def test_forward_and_train_step_under_jax():
    pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-c", JAX_SCRIPT], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    shape, loss = result.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert shape == "(2, 32, 32, 4)" and np.isfinite(float(loss))


# ----------------------------------------------------- training, engine, exports, edge

@pytest.fixture(scope="module")
def monuseg_run(shared_data, tmp_path_factory):
    from training import fit

    out = str(tmp_path_factory.mktemp("bayesnuseg") / "run")
    fit.main(["--model", "bayesnuseg", "--data", f"monuseg:{shared_data}/monuseg2018/train",
              "--model-config", '{"filters": 4, "depth": 3}', "--tile", "64", "--epochs", "1",
              "--steps-per-epoch", "2", "--batch-size", "2", "--mc-samples", "2",
              "--val-fraction", "0.04", "--test-fraction", "0.04", "--out", out])
    return out


def test_short_monuseg_training_is_scored_by_the_engine_with_instances(monuseg_run):
    with open(os.path.join(monuseg_run, "metrics.json")) as handle:
        metrics = json.load(handle)
    with open(os.path.join(monuseg_run, "thresholds.json")) as handle:
        thresholds = json.load(handle)
    post = thresholds["postprocess"]
    assert post["method"] == "embedding" and post["offset_scale"] == 64.0 and thresholds["tuned_on"] == "val"
    for key in ("dice", "iou", "aji", "pq", "ua", "ua_variance_pooled", "dice_pooled", "iou_pooled"):
        assert 0.0 <= metrics["mean"][key] <= 1.0, key
    assert metrics["mc_samples"] == 2 and metrics["uncertainty"]["ua_variance_pooled"] is not None
    # the run folder predicts through the engine: instances, the seed map and its uncertainty
    from kerasnuc.data import load_dataset
    from kerasnuc.predict import load

    predictor = load(monuseg_run, measure=False)
    image = load_dataset("sample")[0].image
    maps, variance = predictor.predict_maps(image, samples=2)
    assert maps.shape[-1] == 4 and variance is not None
    assert uncertainty(variance, predictor.meta["postprocess"]).shape == image.shape[:2]
    labels, table = predictor.predict_instances(image, samples=2)
    assert labels.shape == image.shape[:2] and "mean_uncertainty" in table
    assert len(table["id"]) == len(np.unique(labels[labels > 0]))


def test_exports_saved_model_with_uncertainty_and_int8_tflite_run_by_edge(monuseg_run, tmp_path):
    import tensorflow as tf

    from export.saved_model import export_saved_model
    from export.tflite import export_tflite
    from serving import edge

    version = export_saved_model(monuseg_run, str(tmp_path / "serving"), log=lambda m: None)
    loaded = tf.saved_model.load(version)
    assert "uncertainty" in loaded.signatures
    image = np.random.default_rng(0).integers(0, 255, (1, 40, 56, 3), dtype=np.uint8)
    out = loaded.signatures["uncertainty"](image=tf.constant(image))
    assert out["mean"].shape == (1, 40, 56, 4) and out["variance"].shape == (1, 40, 56, 4)
    assert float(tf.reduce_max(out["variance"])) > 0

    # the agreement report (1000 x 1000 MoNuSeg images) is left to the CPU recipe's export
    path, report = export_tflite(monuseg_run, "int8", out=str(tmp_path / "bns_int8.tflite"), calibration=8,
                                 repeats=1, evaluate_model=False, log=lambda m: None)
    assert report["stochastic_in_litert"] and report["io"]
    with open(path[:-len(".tflite")] + ".json") as handle:
        meta = json.load(handle)
    assert meta["postprocess"]["method"] == "embedding"
    # everything above 0 is foreground, every seed a start: instances are certain to be found
    meta["postprocess"].update(threshold=0.0, seed_threshold=0.0)
    with open(tmp_path / "meta.json", "w") as handle:
        json.dump(meta, handle)
    import cv2

    cv2.imwrite(str(tmp_path / "tile.png"), image[0][..., ::-1])
    edge.main([path, "segment", str(tmp_path / "tile.png"), "--out", str(tmp_path / "edge"),
               "--metadata", str(tmp_path / "meta.json"), "--samples", "2"])
    labels = cv2.imread(str(tmp_path / "edge" / "tile_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (40, 56) and labels.max() >= 1
    assert os.path.exists(tmp_path / "edge" / "tile_variance.npy")


def test_clustering_runs_where_scipy_skimage_and_the_frameworks_are_missing():
    """On a device without SciPy / scikit-image (serving.edge's fallback) the clustering still runs."""
    sys.path.insert(0, os.path.dirname(__file__))
    from import_blocker import FRAMEWORKS, LEAK_CHECK, PREAMBLE, environment

    blocked = FRAMEWORKS + ("scipy", "skimage")
    script = PREAMBLE + textwrap.dedent('''
        import numpy as np
        from kerasnuc.predict.postprocess import instances
        maps = np.zeros((40, 40, 4), np.float32)
        maps[5:15, 5:15, 0] = maps[25:35, 20:30, 0] = 1.0
        maps[..., 1:3] = 0.5                      # zero offsets: each pixel points at itself
        maps[..., 3] = 20.0 / 64                  # wide enough to claim a whole square
        labels = instances(maps, {"method": "embedding", "offset_scale": 64.0, "min_area": 5})
        print(int(labels.max()), int((labels > 0).sum()))
    ''') + LEAK_CHECK
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                            env={**environment(blocked), "PYTHONPATH": REPO}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["2", "200"]
