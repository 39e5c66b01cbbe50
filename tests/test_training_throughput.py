"""What keeps the training input pipeline ahead of the model (issue 18): worker counts from the
cores, patch batches cut at once that equal the patch-by-patch ones, and one compiled train
step for all epochs (whatever the backend)."""

import keras
import numpy as np
import pytest

from kerasnuc.data import load_dataset
from kerasnuc.data.augment import Augmenter
from kerasnuc.data.pipeline import ClassificationDataset, resolve_workers
from kerasnuc.data.targets import instance_centroids
from kerasnuc.data.types import NucleiImage


@pytest.fixture(scope="module")
def classified():
    records = []
    for record in load_dataset("sample")[:3]:
        points, ids = instance_centroids(record.labels)
        classes = np.digitize(np.bincount(record.labels.ravel())[ids], [60, 200])
        records.append(NucleiImage(name=record.name, image=record.image, points=points, classes=classes,
                                   class_names=("small", "mid", "big")))
    return records


def test_workers_scale_with_cores():
    assert [resolve_workers("auto", cores=c) for c in (1, 2, 4, 16, 64)] == [1, 1, 3, 8, 8]
    assert resolve_workers(-1, cores=4) == 3 and resolve_workers(None) == 1 and resolve_workers(5) == 5
    assert resolve_workers("auto") >= 1
    with pytest.raises(ValueError, match="workers"):
        resolve_workers("many")


def _patch_by_patch(data, index):
    """A training batch as the pipeline made it before issue 18: one patch and one augmenter
    call at a time, drawing from the batch's Generator in the same order."""
    rng = data.batch_rng(index)
    chosen = data._choose(rng)
    xs = []
    for i in chosen:
        x = data.patch_at(i, data.context)
        if data.augmenter is not None:
            x, _ = data.augmenter(rng, x, [], crop=(data.patch, data.patch), crop_center=True)
        xs.append(x)
    return np.stack(xs), data.classes[chosen]


@pytest.mark.parametrize("augmenter", ["default", None,
                                       Augmenter(brightness=0.1, contrast=0.2, hed=0.05),
                                       Augmenter(rotate=30, hed=0.05)])
def test_patch_batches_equal_patch_by_patch(classified, augmenter):
    data = ClassificationDataset(classified, patch=16, batch_size=24, balanced=True, augmenter=augmenter, seed=4)
    for index in (0, 3):
        x, y = data[index]
        expected_x, expected_y = _patch_by_patch(data, index)
        np.testing.assert_array_equal(y, expected_y)
        assert x.shape == expected_x.shape == (24, 16, 16, 3) and x.dtype == np.float32
        np.testing.assert_allclose(x, expected_x, atol=1e-6)
    assert not np.allclose(data[0][0], data[1][0])  # batches differ


def test_evaluation_patches_equal_patch_at(classified):
    data = ClassificationDataset(classified, patch=20, batch_size=50, evaluation=True)
    x, _ = data[1]
    np.testing.assert_array_equal(x, np.stack([data.patch_at(i) for i in range(50, 50 + len(x))]))


def test_augment_batch_equals_one_call_per_image():
    rng = np.random.default_rng(0)
    images = rng.random((6, 12, 14, 3)).astype(np.float32)
    augmenter = Augmenter(brightness=0.1, contrast=0.1, hed=0.05)
    batch = augmenter.augment_batch(np.random.default_rng(7), images, crop=(8, 8))
    rng = np.random.default_rng(7)
    single = np.stack([augmenter(rng, x, crop=(8, 8))[0] for x in images])
    assert batch.shape == (6, 8, 8, 3)
    np.testing.assert_allclose(batch, single, atol=1e-6)
    as_uint8 = (images[:, :12, :12] * 255).astype(np.uint8)  # square: rot90 keeps the shape
    batch = augmenter.augment_batch(np.random.default_rng(1), as_uint8)
    rng = np.random.default_rng(1)
    assert batch.dtype == np.uint8
    assert np.abs(batch.astype(int) - np.stack([augmenter(rng, x)[0] for x in as_uint8])).max() <= 1


def test_train_step_is_traced_once_for_all_epochs(classified, tmp_path):
    from training.callbacks import fit_into_run

    class Run:
        path = str(tmp_path)

        def file(self, name):
            return str(tmp_path / name)

    train = ClassificationDataset(classified, patch=16, batch_size=8, steps=3, seed=0)
    val = ClassificationDataset(classified, patch=16, batch_size=64, evaluation=True)  # short last batch
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    traces, per_epoch = [], []
    step = model.train_step
    model.train_step = lambda *args: traces.append(1) or step(*args)  # runs only while tracing
    counter = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: per_epoch.append(len(traces)))
    history = fit_into_run(model, Run(), train, val, epochs=4, log=lambda message: None, extra_callbacks=[counter])
    assert len(history["loss"]) == 4 and len(per_epoch) == 4
    # TensorFlow traces twice while building its function, JAX once; no epoch after the first adds one
    assert 1 <= per_epoch[0] <= 2 and per_epoch == per_epoch[:1] * 4, per_epoch


def test_training_defaults_to_workers_from_the_cores():
    """training.fit's default is 'auto' (cores - 1, at most 8); a bad value is a clear error."""
    from kerasnuc.data.pipeline import resolve_workers
    from training.config import resolve

    assert resolve({}).workers == "auto"
    assert resolve_workers("auto", cores=2) == 1 and resolve_workers("auto", cores=16) == 8
    with pytest.raises(ValueError, match="workers must be a count or 'auto'"):
        resolve({"workers": "many"})
