"""Post-processing: watershed instances, density peaks, dihedral TTA, vote merging, mask ensembles."""

import glob
import os

import numpy as np
import pytest
from scipy import ndimage as ndi

from kerasnuc.postprocess import (
    DIHEDRAL,
    centroids_from_density,
    dihedral_transform,
    ensemble_masks,
    instances_from_probability,
    inverse_dihedral,
    majority_vote,
    mean_probability,
    merge_views_anchored,
    predict_tta,
)

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
DSB_TEST_LABELS = os.path.join(DATA, "dsb2018", "stage1_test", "labels")


def _read_labels(path):
    import cv2

    labels = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert labels is not None, path
    return labels.astype(np.int32)


@pytest.fixture(scope="module")
def dsb_labels():
    paths = sorted(glob.glob(os.path.join(DSB_TEST_LABELS, "*.png")))
    if not paths:
        pytest.skip(f"DSB 2018 stage-1 test labels not found at {DSB_TEST_LABELS}")
    return [_read_labels(path) for path in paths]


def _disc(shape, centre, radius):
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2


def _blurred_probability(labels, rng, sigma=1.0, noise=0.05):
    foreground = (labels > 0).astype(np.float64)
    return np.clip(ndi.gaussian_filter(foreground, sigma) + rng.normal(0, noise, labels.shape), 0, 1)


# ----------------------------------------------------------------------------- instances


def test_touching_discs_are_separated():
    shape = (64, 80)
    prob = (_disc(shape, (32, 30), 12) | _disc(shape, (32, 52), 12)).astype(np.float32)
    labels = instances_from_probability(prob, threshold=0.5, min_distance=3, min_area=10)
    assert labels.dtype == np.int32 and labels.shape == shape
    assert labels.max() == 2
    assert labels[32, 30] != labels[32, 52] and labels[32, 30] > 0 and labels[32, 52] > 0
    # (H, W, 1) input gives the same
    np.testing.assert_array_equal(instances_from_probability(prob[..., None]), labels)


def test_watershed_counts_on_real_dsb_labels(dsb_labels):
    """Truth blurred and noised into a probability map: counts and object F1 close to truth."""
    from kerasnuc.metrics import object_scores

    rng = np.random.default_rng(0)
    true_total = pred_total = 0
    f1 = []
    for labels in dsb_labels:
        pred = instances_from_probability(_blurred_probability(labels, rng), min_distance=3, min_area=10)
        true_total += len(np.unique(labels)) - 1
        pred_total += int(pred.max())
        f1.append(object_scores(labels, pred)["f1"])
    print(f"DSB stage-1 test ({len(dsb_labels)} images): truth {true_total} nuclei, "
          f"watershed {pred_total}, mean object F1@0.5 {np.mean(f1):.3f}")
    assert abs(pred_total - true_total) < 0.08 * true_total  # measured 4,027 vs 4,152 (-3 %)
    assert np.mean(f1) > 0.85  # measured 0.889


def test_three_class_softmax_separates_touching_truth(dsb_labels):
    """Background/inside/boundary softmax from truth: markers are the cores, one per nucleus."""
    from skimage.segmentation import find_boundaries

    from kerasnuc.metrics import object_scores

    labels = max(dsb_labels, key=lambda lab: lab.max())  # the most crowded image
    edge = find_boundaries(labels, mode="inner") & (labels > 0)
    inside = (labels > 0) & ~edge
    softmax = np.stack([~(labels > 0), inside, edge], axis=-1).astype(np.float32)
    softmax = ndi.gaussian_filter(softmax, sigma=(0.7, 0.7, 0))
    softmax /= softmax.sum(axis=-1, keepdims=True)
    pred = instances_from_probability(softmax, min_area=5)
    scores = object_scores(labels, pred)
    n_true = len(np.unique(labels)) - 1
    print(f"3-class from truth: truth {n_true}, predicted {pred.max()}, F1 {scores['f1']:.3f}")
    assert abs(int(pred.max()) - n_true) <= 0.05 * n_true
    assert scores["f1"] > 0.9
    # a whole-nucleus probability with a separate boundary map: markers = nucleus & ~boundary
    pred2 = instances_from_probability(softmax[..., 1] + softmax[..., 2], boundary=softmax[..., 2],
                                       min_area=5)
    assert object_scores(labels, pred2)["f1"] > 0.9


def test_small_and_empty():
    assert instances_from_probability(np.zeros((20, 20))).max() == 0
    prob = np.zeros((40, 40), np.float32)
    prob[5:8, 5:8] = 1  # 9 px < min_area
    prob[20:30, 20:30] = 1
    labels = instances_from_probability(prob, min_area=10)
    assert labels.max() == 1 and labels[25, 25] == 1 and labels[6, 6] == 0
    with pytest.raises(ValueError, match="shape"):
        instances_from_probability(np.zeros((4, 4, 2)))


# ----------------------------------------------------------------------------- peaks


def test_centroids_recovered_from_gaussian_density():
    rng = np.random.default_rng(0)
    height, width, sigma = 120, 170, 2.0
    points = []
    while len(points) < 40:
        p = rng.uniform([3, 3], [width - 4, height - 4])
        if all(np.hypot(*(p - q)) > 10 for q in points):
            points.append(p)
    points = np.array(points)  # (x, y)
    rows, cols = np.mgrid[:height, :width]
    density = np.zeros((height, width))
    for x, y in points:
        density = np.maximum(density, np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma ** 2)))
    found = centroids_from_density(density, threshold=0.1, min_distance=3)
    assert found.shape == (40, 2) and found.dtype == np.float64
    errors = np.sqrt(((found[:, None, :] - points[None, :, :]) ** 2).sum(-1)).min(axis=1)
    coarse = centroids_from_density(density, threshold=0.1, min_distance=3, refine=False)
    coarse_errors = np.sqrt(((coarse[:, None, :] - points[None, :, :]) ** 2).sum(-1)).min(axis=1)
    print(f"centroid error: refined max {errors.max():.3f} mean {errors.mean():.3f} px; "
          f"integer peaks max {coarse_errors.max():.3f} px")
    assert errors.max() < 1.0
    assert errors.max() < 0.25 and errors.mean() < coarse_errors.mean()
    assert centroids_from_density(np.zeros((10, 10))).shape == (0, 2)
    np.testing.assert_allclose(centroids_from_density(density[..., None]), found)


# ----------------------------------------------------------------------------- TTA


def test_dihedral_round_trip_non_square():
    image = np.arange(5 * 7 * 2).reshape(5, 7, 2)
    views = set()
    for k in range(len(DIHEDRAL)):
        view = dihedral_transform(image, k)
        assert view.shape == ((5, 7, 2) if k % 2 == 0 else (7, 5, 2))
        np.testing.assert_array_equal(inverse_dihedral(view, k), image)
        views.add(view.tobytes() + bytes(view.shape))
    assert len(views) == 8  # all distinct
    with pytest.raises(ValueError):
        dihedral_transform(image, 8)


@pytest.mark.parametrize("shape", [(16, 16, 3), (12, 20, 3)])
def test_predict_tta_equivariant_predictor_is_unchanged(shape):
    rng = np.random.default_rng(1)
    image = rng.random(shape).astype(np.float32)
    batches = []

    def pointwise(batch):
        batches.append(batch.shape)
        return np.stack([np.tanh(batch.sum(-1)), batch[..., 0] ** 2], axis=-1)

    plain = pointwise(image[None])[0]
    batches.clear()
    tta = predict_tta(pointwise, image)
    assert tta.shape == shape[:2] + (2,) and tta.dtype == np.float32
    np.testing.assert_allclose(tta, plain, rtol=1e-6, atol=1e-6)
    assert batches == ([(8,) + shape] if shape[0] == shape[1] else
                       [(4,) + shape, (4, shape[1], shape[0], shape[2])])


def test_predict_tta_non_equivariant_predictor_averages():
    rng = np.random.default_rng(2)
    image = rng.random((10, 14, 1)).astype(np.float32)

    def position_dependent(batch):  # weights pixels by their column: not rotation-equivariant
        ramp = np.arange(batch.shape[2], dtype=np.float32)[None, None, :, None]
        return batch * ramp

    expected = np.mean([inverse_dihedral(position_dependent(dihedral_transform(image, k)[None])[0], k)
                        for k in range(8)], axis=0)
    np.testing.assert_allclose(predict_tta(position_dependent, image), expected, rtol=1e-6)
    assert not np.allclose(expected, position_dependent(image[None])[0])
    two = predict_tta(position_dependent, image, transforms=[0, 4])  # identity + mirror
    mirrored_ramp = np.arange(14, dtype=np.float32)[::-1][None, :, None]
    np.testing.assert_allclose(two, (position_dependent(image[None])[0] + image * mirrored_ramp) / 2, rtol=1e-6)


# ----------------------------------------------------------------------------- vote merging


def _shift(labels, dy, dx):
    out = np.zeros_like(labels)
    h, w = labels.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        labels[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def test_vote_merge_keeps_consensus(dsb_labels):
    from kerasnuc.metrics import object_scores

    truth = max(dsb_labels, key=lambda lab: lab.max())  # crowded: touching nuclei too
    a, b, c = truth.copy(), _shift(truth, 1, 0), _shift(truth, 0, 1)
    ids = np.unique(truth)[1:]
    c[np.isin(c, ids[:3])] = 0  # c misses three nuclei: still 2 of 3 votes
    empty = ndi.binary_erosion(ndi.binary_dilation(truth > 0, iterations=3) == 0, np.ones((9, 9)))
    row, col = np.argwhere(empty)[0]  # centre of a 9x9 box of background, away from nuclei
    b[row - 4:row + 5, col - 4:col + 5] = truth.max() + 1  # a nucleus only b sees: dropped
    merged = merge_views_anchored(a, [b, c])  # anchored on a; b's extra nucleus has no anchor
    assert merged.dtype == np.int32
    assert merged[row - 4:row + 5, col - 4:col + 5].max() == 0
    scores = object_scores(truth, merged)
    print(f"vote merge of 3 shifted copies: {merged.max()} nuclei vs truth {len(ids)}, F1 {scores['f1']:.3f}")
    assert merged.max() == len(ids)
    assert scores["f1"] == 1.0
    # each merged nucleus is the pixels that at least 2 of the 3 copies cover
    for nucleus in ids[3:]:
        votes = ((a == nucleus).astype(int) + (_shift(truth, 1, 0) == nucleus)
                 + (_shift(truth, 0, 1) == nucleus))
        expected = votes >= 2
        got = merged == np.bincount(merged[expected]).argmax()
        np.testing.assert_array_equal(got, expected)


def test_vote_merge_never_groups_two_nuclei_of_one_prediction():
    shape = (40, 60)
    left, right = _disc(shape, (20, 18), 8), _disc(shape, (20, 36), 8)
    split = np.zeros(shape, np.int32)
    split[left], split[right] = 1, 2
    merged_blob = (left | right).astype(np.int32)  # one prediction merges the pair
    out = merge_views_anchored(split, [split.copy(), merged_blob])
    assert out.max() == 2  # the majority split wins; the merged blob joins one of them only
    assert out[20, 18] != out[20, 36]
    assert merge_views_anchored(np.zeros(shape, int), [np.zeros(shape, int)] * 2).max() == 0
    with pytest.raises(ValueError):
        merge_views_anchored(split, [split[:10]])


# ----------------------------------------------------------------------------- ensembles


def test_ensemble_expression():
    rng = np.random.default_rng(3)
    a, b, c = (rng.random((30, 30)) > 0.5 for _ in range(3))
    masks = {"a": a, "b": b, "c": c}
    np.testing.assert_array_equal(ensemble_masks("a | (b & c)", masks), a | (b & c))
    np.testing.assert_array_equal(ensemble_masks("~a & (b | ~c)", masks), ~a & (b | ~c))
    np.testing.assert_array_equal(ensemble_masks("a|b&c", masks), a | (b & c))  # & binds tighter
    np.testing.assert_array_equal(ensemble_masks("(a | b) & c", masks), (a | b) & c)
    np.testing.assert_array_equal(ensemble_masks("a", {"a": a.astype(np.uint8)}), a)


@pytest.mark.parametrize("expression", [
    "__import__('os')", "a.__class__", "a + b", "a and b", "a if b else c", "[a]", "1", "a | 1",
    "lambda: a", "a; b", "", "a |", "(a", "a == b", "not a", "a ^ b"])
def test_ensemble_rejects_bad_expressions(expression):
    masks = {"a": np.ones((2, 2), bool), "b": np.zeros((2, 2), bool), "c": np.ones((2, 2), bool)}
    with pytest.raises(ValueError):
        ensemble_masks(expression, masks)


def test_ensemble_errors_are_clear():
    masks = {"a": np.ones((2, 2), bool), "b": np.zeros((3, 3), bool)}
    with pytest.raises(ValueError, match="not allowed"):
        ensemble_masks("__import__('os')", masks)
    with pytest.raises(ValueError, match=r"\['zz'\]"):
        ensemble_masks("a | zz", masks)
    with pytest.raises(ValueError, match="shape"):
        ensemble_masks("a | b", masks)


def test_majority_vote_and_mean_probability():
    m = [np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool), np.array([1, 1, 1, 0], bool)]
    np.testing.assert_array_equal(majority_vote(m), [True, True, True, False])
    np.testing.assert_array_equal(majority_vote(m, min_votes=3), [True, False, False, False])
    np.testing.assert_array_equal(majority_vote({"x": m[0], "y": m[1]}), [True, False, False, False])
    p = {"x": np.array([0.2, 0.8]), "y": np.array([0.4, 0.0])}
    np.testing.assert_allclose(mean_probability(p), [0.3, 0.4])
    np.testing.assert_allclose(mean_probability(list(p.values()), weights=[3, 1]), [0.25, 0.6])
    assert mean_probability(p).dtype == np.float32
    with pytest.raises(ValueError):
        mean_probability([np.zeros(2), np.zeros(3)])
