"""Augmentation keeps images, label masks, float maps and points aligned; reproducible; backwards compatible."""

import glob
import os

import numpy as np
import pytest

from kerasnuc.data.augment import Augmenter
from kerasnuc.data.imageio import read_label_image
from kerasnuc.data.targets import foreground, instance_centroids

DSB_TEST_LABELS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "dsb2018",
                               "stage1_test", "labels")

TRANSFORMS = {
    "flip": dict(flip=True, rotate90=False),
    "rotate90": dict(flip=False, rotate90=True),
    "rotate": dict(flip=False, rotate90=False, rotate=40),
    "elastic": dict(flip=False, rotate90=False, elastic=6, elastic_spacing=24),
    "crop": dict(flip=False, rotate90=False, crop=(96, 112)),
    "all": dict(rotate=180, elastic=5, crop=(96, 96)),
}


@pytest.fixture(scope="module")
def dsb_cases():
    """(labels, image made from the labels, centroid points, their ids) for 6 real DSB label images."""
    files = sorted(glob.glob(os.path.join(DSB_TEST_LABELS, "*.png")))
    if not files:
        pytest.skip(f"DSB 2018 labels not found at {DSB_TEST_LABELS}")
    cases = []
    for path in files[:6]:
        labels = read_label_image(path)
        points, ids = instance_centroids(labels)
        rows, cols = np.floor(points[:, 1] + 0.5).astype(int), np.floor(points[:, 0] + 0.5).astype(int)
        own = labels[rows, cols] == ids  # keep centroids that lie in their own (non-convex) nucleus
        image = np.repeat(foreground(labels) * 0.8 + 0.1, 3, axis=-1)  # bright nuclei on dark ground
        cases.append((labels, image, points[own], ids[own]))
    return cases


def _old_augmenter(rng, image, masks, flip=True, rotate90=True, brightness=0.1, contrast=0.1):
    """The original implementation, to pin the default behaviour."""
    masks = list(masks)
    if flip and rng.random() < 0.5:
        image, masks = image[:, ::-1], [m[:, ::-1] for m in masks]
    if rotate90:
        k = int(rng.integers(4))
        image, masks = np.rot90(image, k), [np.rot90(m, k) for m in masks]
    if contrast or brightness:
        scale = 1.0 + rng.uniform(-contrast, contrast)
        shift = rng.uniform(-brightness, brightness)
        image = np.clip((image - 0.5) * scale + 0.5 + shift, 0.0, 1.0)
    return np.ascontiguousarray(image), [np.ascontiguousarray(m) for m in masks]


@pytest.mark.parametrize("options", [{}, {"flip": False}, {"rotate90": False, "brightness": 0.3},
                                     {"brightness": 0.0, "contrast": 0.0}])
def test_default_behaviour_unchanged(options):
    image = np.random.default_rng(0).random((20, 30, 3)).astype(np.float32)
    mask = (image[..., :1] > 0.5).astype(np.float32)
    for seed in range(8):
        new = Augmenter(**options)(np.random.default_rng(seed), image, [mask])
        old = _old_augmenter(np.random.default_rng(seed), image, [mask], **options)
        np.testing.assert_array_equal(new[0], old[0])
        np.testing.assert_array_equal(new[1][0], old[1][0])
        assert len(new) == 2


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transform_keeps_image_labels_and_points_aligned(dsb_cases, name):
    augmenter = Augmenter(brightness=0.0, contrast=0.0, **TRANSFORMS[name])
    agreements, inside, total, changed = [], 0, 0, 0
    for seed, (labels, image, points, ids) in enumerate(dsb_cases):
        out_image, (out_labels, out_fg), out_points, out_ids = augmenter(
            np.random.default_rng(seed), image, [labels, foreground(labels)], points, ids)
        assert out_labels.dtype == labels.dtype and out_fg.dtype == np.float32
        assert set(np.unique(out_labels)) <= set(np.unique(labels))  # still instance labels, nearest
        assert out_image.shape[:2] == out_labels.shape == out_fg.shape[:2] and out_image.shape[2] == 3
        if "crop" in TRANSFORMS[name]:
            assert out_labels.shape == TRANSFORMS[name]["crop"]
        agreements.append(np.mean((out_image.mean(axis=-1) > 0.5) == (out_labels > 0)))
        agreements.append(np.mean((out_fg[..., 0] > 0.5) == (out_labels > 0)))
        assert len(out_points) == len(out_ids)
        rows = np.floor(out_points[:, 1] + 0.5).astype(int)
        cols = np.floor(out_points[:, 0] + 0.5).astype(int)
        assert rows.min(initial=0) >= 0 and cols.min(initial=0) >= 0
        inside += int(np.sum(out_labels[rows, cols] == out_ids))
        total += len(out_ids)
        same_shape = out_labels.shape == labels.shape
        changed += (not same_shape) or not np.array_equal(out_labels, labels)
    assert min(agreements) > 0.99, agreements
    assert total >= 20
    assert inside / total >= 0.98, (inside, total)
    assert changed >= 2, "the transform should change the images"


def test_points_and_classes_dropped_together_by_crop():
    augmenter = Augmenter(flip=False, rotate90=False, brightness=0.0, contrast=0.0, crop=(10, 10))
    image = np.zeros((40, 40, 1), dtype=np.float32)
    points = np.array([[x, y] for y in range(0, 40, 4) for x in range(0, 40, 4)], dtype=np.float64)
    classes = np.arange(len(points))
    _, _, out_points, out_classes = augmenter(np.random.default_rng(3), image, [], points, classes)
    assert 0 < len(out_points) < len(points) and len(out_points) == len(out_classes)
    assert np.all((out_points >= -0.5) & (out_points < 9.5))
    np.testing.assert_allclose(out_points - out_points[0], points[out_classes] - points[out_classes[0]])


def test_rotated_crop_from_context_needs_no_reflection():
    """A ramp stays a plane after rotation+crop iff no mirrored pixels were sampled.

    (OpenCV's bilinear weights are quantised to 1/32 pixel, hence the tolerance.)
    """
    augmenter = Augmenter(flip=False, rotate90=False, brightness=0.0, contrast=0.0, rotate=90, crop=(48, 40))
    height, width = augmenter.context_size(48, 40)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.stack([xx, yy], axis=-1)
    v, u = np.mgrid[0:48, 0:40]
    design = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=1)
    for seed in range(10):
        out, _ = augmenter(np.random.default_rng(seed), image)
        for channel in range(2):
            coef, *_ = np.linalg.lstsq(design, out[..., channel].ravel(), rcond=None)
            assert np.abs(design @ coef - out[..., channel].ravel()).max() < 0.05


def test_reproducible_from_generator():
    augmenter = Augmenter(rotate=30, elastic=4, crop=(32, 32), hed=0.05)
    image = np.random.default_rng(1).random((64, 64, 3)).astype(np.float32)
    labels = np.random.default_rng(2).integers(0, 5, (64, 64)).astype(np.int32)
    points = np.random.default_rng(3).random((30, 2)) * 64
    first = augmenter(np.random.default_rng(7), image, [labels], points, np.arange(30))
    again = augmenter(np.random.default_rng(7), image, [labels], points, np.arange(30))
    other = augmenter(np.random.default_rng(8), image, [labels], points, np.arange(30))
    for a, b in zip(first[:1] + tuple(first[1]) + first[2:], again[:1] + tuple(again[1]) + again[2:]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


def test_hed_jitter_rgb_only_and_in_range():
    augmenter = Augmenter(flip=False, rotate90=False, brightness=0.0, contrast=0.0, hed=0.1)
    rng = np.random.default_rng(0)
    rgb = np.clip(rng.normal([0.6, 0.4, 0.7], 0.1, (32, 32, 3)), 0, 1).astype(np.float32)
    out, _ = augmenter(np.random.default_rng(1), rgb)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert 0 < np.abs(out - rgb).mean() < 0.2
    grey = rgb[..., :1].copy()
    np.testing.assert_array_equal(augmenter(np.random.default_rng(1), grey)[0], grey)
    as_uint8 = (rgb * 255).astype(np.uint8)
    out8, _ = augmenter(np.random.default_rng(1), as_uint8)
    assert out8.dtype == np.uint8 and np.abs(out8.astype(int) - as_uint8).mean() > 0


def test_float_maps_stay_soft_one_hot():
    augmenter = Augmenter(flip=False, rotate90=False, brightness=0.0, contrast=0.0, rotate=30, elastic=3)
    labels = np.zeros((40, 40), dtype=np.int32)
    labels[10:30, 12:28] = 1
    one_hot = np.stack([labels == 0, labels == 1, np.zeros_like(labels, bool)], -1).astype(np.float32)
    _, (out,) = augmenter(np.random.default_rng(0), np.zeros((40, 40, 1), np.float32), [one_hot])
    assert out.shape == one_hot.shape and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)
    assert np.any((out[..., 1] > 0.05) & (out[..., 1] < 0.95))  # bilinear, not nearest
