"""Training targets on real DSB 2018 labels: boundaries separate touching nuclei, density peaks sit on the points."""

import glob
import os

import numpy as np
import pytest
from scipy import ndimage

from kerasnuc.data.imageio import read_label_image
from kerasnuc.predict.tiling import patches_at as extract_patches
from kerasnuc.data.targets import (density_map, distance_map, foreground,
                                   instance_centroids, reflect_indices, segmentation_target,
                                   three_class)

DSB_TEST_LABELS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "dsb2018",
                               "stage1_test", "labels")


@pytest.fixture(scope="module")
def dsb_labels():
    """Up to 12 real DSB 2018 stage-1 test label images (skip if the data is absent)."""
    files = sorted(glob.glob(os.path.join(DSB_TEST_LABELS, "*.png")))
    if not files:
        pytest.skip(f"DSB 2018 labels not found at {DSB_TEST_LABELS}")
    return [read_label_image(f) for f in files[:12]]


def _touching_pixel_pairs(labels):
    """Number of 4-neighbour pixel pairs that belong to two different instances."""
    h = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
    v = (labels[1:] != labels[:-1]) & (labels[1:] > 0) & (labels[:-1] > 0)
    return int(h.sum() + v.sum())


def test_foreground_shape_and_values():
    labels = np.array([[0, 1], [2, 0]], dtype=np.int32)
    out = foreground(labels)
    assert out.shape == (2, 2, 1) and out.dtype == np.float32
    assert out[..., 0].tolist() == [[0, 1], [1, 0]]


def test_three_class_separates_touching_instances(dsb_labels):
    touching, big = 0, 0
    for labels in dsb_labels:
        target = three_class(labels)
        assert target.shape == labels.shape + (3,) and target.dtype == np.float32
        np.testing.assert_array_equal(target.sum(-1), 1.0)
        np.testing.assert_array_equal(target[..., 0] == 1, labels == 0)
        inside = target[..., 1] > 0
        components, count = ndimage.label(inside, structure=np.ones((3, 3)))
        # No inside component (even 8-connected) spans two instances ...
        for index, box in enumerate(ndimage.find_objects(components)):
            assert len(np.unique(labels[box][components[box] == index + 1])) == 1
        # ... and every instance that is big enough has exactly one.
        ids, areas = np.unique(labels[labels > 0], return_counts=True)
        for instance in ids[areas >= 30]:
            assert len(np.unique(components[(labels == instance) & inside])) == 1
        big += int((areas >= 30).sum())
        touching += _touching_pixel_pairs(labels)
    assert touching > 100, "the test images should contain touching nuclei"
    assert big > 200


def test_three_class_synthetic_touching_pair():
    labels = np.zeros((10, 12), dtype=np.int32)
    labels[2:8, 2:6], labels[2:8, 6:10] = 1, 2
    target = three_class(labels)
    _, count = ndimage.label(target[..., 1] > 0, structure=np.ones((3, 3)))
    assert count == 2
    assert target[4, 5, 2] == 1 and target[4, 6, 2] == 1  # both sides of the contact are boundary


def test_distance_map_per_instance(dsb_labels):
    labels = dsb_labels[0]
    out = distance_map(labels)
    assert out.shape == labels.shape + (1,) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    assert np.all(out[labels == 0] == 0) and np.all(out[labels > 0] > 0)
    maxima = ndimage.maximum(out[..., 0], labels, np.unique(labels[labels > 0]))
    np.testing.assert_allclose(maxima, 1.0, atol=1e-6)
    raw = distance_map(labels, normalize=False)
    assert raw.max() > 2.0
    assert segmentation_target("distance") is distance_map


def test_density_map_peaks_at_points(dsb_labels):
    from skimage.feature import peak_local_max

    isolated_total, recovered = 0, 0
    for labels in dsb_labels:
        points, _ = instance_centroids(labels)
        density = density_map(points, labels.shape, sigma=2.0)
        assert density.shape == labels.shape + (1,) and density.dtype == np.float32
        rows, cols = np.floor(points[:, 1] + 0.5).astype(int), np.floor(points[:, 0] + 0.5).astype(int)
        gaps = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
        np.fill_diagonal(gaps, np.inf)
        isolated = gaps.min(axis=1) > 12  # > 6 sigma: no neighbour adds to the peak
        peaks = set(map(tuple, peak_local_max(density[..., 0], min_distance=1, threshold_abs=0.5,
                                              exclude_border=False)))
        isolated_total += int(isolated.sum())
        recovered += sum((r, c) in peaks for r, c, i in zip(rows, cols, isolated) if i)
        np.testing.assert_allclose(density[rows[isolated], cols[isolated], 0], 1.0, atol=1e-3)
    assert isolated_total > 100
    assert recovered / isolated_total >= 0.98


def test_density_map_border_outside_and_radius():
    points = [[0.0, 0.0], [19.4, 9.0], [-0.6, 5.0], [20.0, 5.0], [5.0, 100.0]]
    density = density_map(points, (10, 20), sigma=1.5)[..., 0]
    assert density[0, 0] == pytest.approx(1.0, abs=1e-4)   # corner point kept, still peaks at 1
    assert density[9, 19] == pytest.approx(1.0, abs=1e-4)
    assert density[5, 0] < 0.5 and density[5, 19] < 0.5    # outside points ignored
    single = density_map([[5, 5]], (11, 11), sigma=0)[..., 0]
    assert single.sum() == 1.0 and single[5, 5] == 1.0
    disc = density_map([[10, 10]], (21, 21), sigma=1.0, radius=3)[..., 0]
    assert disc.max() == pytest.approx(1.0) and np.unravel_index(disc.argmax(), disc.shape) == (10, 10)
    assert disc[10, 12] > 0.5 > disc[10, 16]
    assert density_map(np.zeros((0, 2)), (4, 5)).shape == (4, 5, 1)


def test_extract_patches_centred_and_reflected():
    image = np.arange(6 * 7 * 2, dtype=np.uint8).reshape(6, 7, 2)
    points = np.array([[3.0, 2.0], [0.0, 0.0], [6.4, 5.4]])
    patches = extract_patches(image, points, size=5)
    assert patches.shape == (3, 5, 5, 2) and patches.dtype == np.uint8
    for patch, (x, y) in zip(patches, np.rint(points).astype(int)):
        np.testing.assert_array_equal(patch[2, 2], image[y, x])
    padded = np.pad(image, ((5, 5), (5, 5), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(patches[1], padded[5 - 2:5 + 3, 5 - 2:5 + 3])
    even = extract_patches(image[..., 0], points, size=4)
    assert even.shape == (3, 4, 4, 1) and even[0, 2, 2, 0] == image[2, 3, 0]


def test_reflect_indices_matches_numpy():
    n = 5
    np.testing.assert_array_equal(reflect_indices(np.arange(-13, 18), n),
                                  np.pad(np.arange(n), 13, mode="reflect")[:31])


def test_instance_centroids():
    labels = np.zeros((8, 8), dtype=np.int32)
    labels[1:4, 1:6] = 3
    points, ids = instance_centroids(labels)
    np.testing.assert_allclose(points, [[3.0, 2.0]])
    assert ids.tolist() == [3]
