"""Input pipelines: shapes and dtypes, reproducibility from (seed, epoch, index), aligned detection maps,
patch classification, parallel workers, and no TensorFlow anywhere in kerasnuc.data."""

import ast
import glob
import os

import numpy as np
import pytest

from kerasnuc.data import load_dataset
from kerasnuc.data.augment import Augmenter
from kerasnuc.intensity import normalize_image
from kerasnuc.data.pipeline import (ClassificationDataset, DetectionDataset, SegmentationDataset,
                                    classified_points, record_points)
from kerasnuc.data.targets import instance_centroids
from kerasnuc.predict.tiling import patches_at as extract_patches
from kerasnuc.data.types import NucleiImage

DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "kerasnuc", "data")


@pytest.fixture(scope="module")
def sample():
    return load_dataset("sample")[:8]


@pytest.fixture(scope="module")
def classified(sample):
    """Sample records with centroid points and three made-up classes (by nucleus size)."""
    records = []
    for record in sample:
        points, ids = instance_centroids(record.labels)
        areas = np.bincount(record.labels.ravel())[ids]
        classes = np.digitize(areas, [60, 200])
        records.append(NucleiImage(name=record.name, image=record.image, labels=record.labels,
                                   points=points, classes=classes, class_names=("small", "mid", "big")))
    return records


def _assert_batches_equal(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("target, channels", [("foreground", 1), ("three_class", 3), ("distance", 1)])
def test_segmentation_targets(sample, target, channels):
    data = SegmentationDataset(sample, tile=64, batch_size=3, steps=2, channels=3, target=target,
                               augmenter=Augmenter(), seed=0)
    x, y = data[0]
    assert x.shape == (3, 64, 64, 3) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert y.shape == (3, 64, 64, channels) and y.dtype == np.float32
    assert len(data) == 2
    if target == "three_class":
        np.testing.assert_allclose(y.sum(-1), 1.0)


def test_segmentation_default_and_callable_target(sample):
    from kerasnuc.data.targets import foreground

    by_name = SegmentationDataset(sample, tile=32, batch_size=2, channels=1, target="foreground", seed=4)
    by_function = SegmentationDataset(sample, tile=32, batch_size=2, channels=1, target=foreground, seed=4)
    default = SegmentationDataset(sample, tile=32, batch_size=2, channels=1, seed=4)
    _assert_batches_equal(by_name[1], by_function[1])
    _assert_batches_equal(by_name[1], default[1])
    assert by_name[1][0].shape == (2, 32, 32, 1)
    with pytest.raises(ValueError, match="unknown segmentation target"):
        SegmentationDataset(sample, target="watershed")


def test_segmentation_rotation_uses_context(sample):
    data = SegmentationDataset(sample, tile=48, batch_size=2, steps=1, target="three_class",
                               augmenter=Augmenter(rotate=45, elastic=3), seed=1)
    x, y = data[0]
    assert x.shape == (2, 48, 48, 3) and y.shape == (2, 48, 48, 3)
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)


def test_reproducible_and_seed_dependent(sample, classified):
    def make(cls, seed, **kwargs):
        if cls is ClassificationDataset:
            return cls(classified, patch=24, batch_size=8, seed=seed, **kwargs)
        return cls(sample, tile=48, batch_size=2, augmenter=Augmenter(rotate=20, elastic=2), seed=seed, **kwargs)

    for cls in (SegmentationDataset, DetectionDataset, ClassificationDataset):
        first, again, other = make(cls, 5), make(cls, 5, workers=3), make(cls, 6)
        _assert_batches_equal(first[2], again[2])
        assert not np.array_equal(first[2][0], other[2][0])
        before = first[0][0]
        first.on_epoch_end()
        assert not np.array_equal(before, first[0][0]), f"{cls.__name__}: epochs should differ"


def test_detection_density_follows_augmented_points():
    """Images made from the labels: density peaks (nucleus centres) must land on bright nuclei."""
    files = sorted(glob.glob(os.path.join(DATA_DIR, "sample", "labels", "*.png")))[:6]
    from kerasnuc.data.imageio import read_label_image

    records = []
    for path in files:
        labels = read_label_image(path)
        image = np.where(labels > 0, 220, 30).astype(np.uint8)[..., None]
        records.append(NucleiImage(name=os.path.basename(path), image=image, labels=labels))
    data = DetectionDataset(records, tile=64, batch_size=8, sigma=1.5, steps=6, channels=1,
                            augmenter=Augmenter(rotate=180, elastic=4), seed=2)
    from skimage.feature import peak_local_max

    on_nucleus, peaks_total = 0, 0
    for index in range(len(data)):
        x, y = data[index]
        assert x.shape == (8, 64, 64, 1) and y.shape == (8, 64, 64, 1) and y.dtype == np.float32
        for image, density in zip(x[..., 0], y[..., 0]):
            peaks = peak_local_max(density, min_distance=2, threshold_abs=0.6, exclude_border=False)
            on_nucleus += int(np.sum(image[peaks[:, 0], peaks[:, 1]] > 0.5))
            peaks_total += len(peaks)
    assert peaks_total > 50
    assert on_nucleus / peaks_total >= 0.97, (on_nucleus, peaks_total)


def test_detection_without_augmenter_and_points(sample):
    record = sample[0]
    points = record_points(record)
    assert points.shape[1] == 2 and len(points) > 0
    data = DetectionDataset([record], tile=40, batch_size=2, sigma=2.0, seed=0)
    x, y = data[0]
    assert x.shape == (2, 40, 40, 3) and y.shape == (2, 40, 40, 1)
    assert 0.9 < y.max() < 2.5


def test_classification_training_batches(classified):
    data = ClassificationDataset(classified, patch=32, batch_size=16, seed=0)
    x, y = data[0]
    assert x.shape == (16, 32, 32, 3) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert y.shape == (16,) and y.dtype == np.int32 and data.num_classes == 3
    balanced = ClassificationDataset(classified, patch=16, batch_size=300, steps=1, balanced=True, seed=0)
    counts = np.bincount(balanced[0][1], minlength=3)
    overall = np.bincount(balanced.classes, minlength=3)
    assert counts.min() > 60, counts  # about 100 each, whatever the class frequencies
    assert overall.max() / overall.min() > 1.5, overall  # ... which are unequal
    rotating = ClassificationDataset(classified, patch=24, batch_size=4, augmenter=Augmenter(rotate=30), seed=0)
    assert rotating[0][0].shape == (4, 24, 24, 3)


def test_classification_evaluation_every_point_once_in_order(classified):
    data = ClassificationDataset(classified, patch=20, batch_size=50, evaluation=True, seed=0)
    xs, ys = zip(*[data[i] for i in range(len(data))])
    x, y = np.concatenate(xs), np.concatenate(ys)
    expected_x, expected_y = [], []
    for record in classified:
        points, classes = classified_points(record)
        expected_x.append(extract_patches(normalize_image(record.image, 3), points, size=20))
        expected_y.append(classes)
    np.testing.assert_array_equal(y, np.concatenate(expected_y))
    np.testing.assert_allclose(x, np.concatenate(expected_x), atol=1e-6)
    assert len(data) == int(np.ceil(len(y) / 50)) and len(data[len(data) - 1][1]) <= 50
    _assert_batches_equal(data[1], ClassificationDataset(classified, patch=20, batch_size=50, evaluation=True,
                                                         seed=9)[1])


def test_classification_reads_class_points_extra(sample):
    record = sample[0]
    class_points = np.array([[10.0, 12.0], [30.0, 40.0]])
    crc_like = NucleiImage(name="crc", image=record.image, points=np.zeros((5, 2)),
                           classes=np.array([1, 3]), class_names=("a", "b", "c", "d"),
                           extra={"class_points": class_points})
    data = ClassificationDataset([crc_like], patch=8, batch_size=2, evaluation=True)
    np.testing.assert_array_equal(data.sources[:, 1:], class_points)
    assert data[0][1].tolist() == [1, 3] and data.num_classes == 4
    with pytest.raises(ValueError, match="no classified points"):
        ClassificationDataset([record])


def test_parallel_workers_give_the_same_batches(sample):
    """Through Keras' own enqueuer: threads and processes yield what a single worker yields."""
    import keras

    identity = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Identity()])

    def predictions(**kwargs):
        data = SegmentationDataset(sample, tile=32, batch_size=2, steps=4, augmenter=Augmenter(), seed=3, **kwargs)
        return identity.predict(data, verbose=0)

    single = predictions()
    np.testing.assert_array_equal(single, predictions(workers=2))
    np.testing.assert_array_equal(single, predictions(workers=2, use_multiprocessing=True))


def test_no_tensorflow_import_in_data_package():
    """The GPU machine has no TensorFlow: nothing under kerasnuc/data may import it."""
    offenders = []
    for path in glob.glob(os.path.join(DATA_DIR, "**", "*.py"), recursive=True):
        tree = ast.parse(open(path).read(), path)
        for node in ast.walk(tree):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path}: {m}" for m in modules if m.split(".")[0] == "tensorflow"]
    assert not offenders, offenders
