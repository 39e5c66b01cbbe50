"""Point-detection metrics against a dense all-pairs reference, hand cases and real points."""

import os

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from kerasnuc.metrics import detection_scores, match_points

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
TOL = 1e-6


def naive_detection(t, p, r):
    """All-pairs distance loops; Hungarian with pairs beyond r given a huge cost."""
    t = np.asarray(t, float).reshape(-1, 2)
    p = np.asarray(p, float).reshape(-1, 2)
    d = np.zeros((len(t), len(p)))
    for i in range(len(t)):
        for j in range(len(p)):
            d[i, j] = np.hypot(t[i, 0] - p[j, 0], t[i, 1] - p[j, 1])
    m = []
    if d.size:
        rows, cols = linear_sum_assignment(np.where(d <= r, d, 1e9))
        m = [d[i, j] for i, j in zip(rows, cols) if d[i, j] <= r]
    tp = len(m)
    fp, fn = len(p) - tp, len(t) - tp
    if tp + fp + fn == 0:
        prec = rec = f1 = 1.0
    else:
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn)
    return dict(tp=tp, fp=fp, fn=fn, precision=prec, recall=rec, f1=f1,
                mean_distance=float(np.mean(m)) if m else float("nan"))


def assert_same(got, want):
    for k, v in want.items():
        if isinstance(v, float) and np.isnan(v):
            assert np.isnan(got[k]), k
        else:
            assert got[k] == pytest.approx(v, abs=TOL), (k, got[k], v)


@pytest.mark.parametrize("seed", range(15))
def test_random_points_match_reference(seed):
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 60, size=(rng.integers(0, 40), 2))
    keep = t[rng.random(len(t)) < 0.8]
    p = np.concatenate([keep + rng.normal(0, 2.5, keep.shape), rng.uniform(0, 60, (rng.integers(0, 10), 2))])
    p = p[rng.permutation(len(p))]
    for r in (1.0, 3.0, 6.0, 12.0):
        assert_same(detection_scores(t, p, r), naive_detection(t, p, r))


def test_hand_cases():
    t = np.array([[10, 10], [20, 10], [50, 50]])
    p = np.array([[11, 10], [20, 13], [80, 80], [10.5, 10]])
    s = detection_scores(t, p, radius=3)
    # (10,10) takes (10.5,10) at 0.5, (20,10)-(20,13) at 3 (within radius), (11,10) is left over
    assert (s["tp"], s["fp"], s["fn"]) == (2, 2, 1)
    assert s["mean_distance"] == pytest.approx(1.75)
    assert s["precision"] == pytest.approx(0.5) and s["recall"] == pytest.approx(2 / 3)
    assert s["radius"] == 3.0
    # one prediction between two true points: counted once
    s = detection_scores([[0, 0], [4, 0]], [[2, 0]], radius=2)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 1)


def test_prefers_more_matches_over_shorter_distance():
    # greedy nearest would pair t0-p0 (distance 0) and leave t1 unmatched
    t = np.array([[0.0, 0.0], [-3.0, 0.0]])
    p = np.array([[0.0, 0.0], [3.0, 0.0]])
    ti, pi, d = match_points(t, p, radius=3.0)
    assert sorted(zip(ti.tolist(), pi.tolist())) == [(0, 1), (1, 0)]
    assert d.tolist() == [3.0, 3.0]


def test_empty_inputs():
    e = np.zeros((0, 2))
    s = detection_scores(e, e, 5)
    assert (s["tp"], s["fp"], s["fn"], s["f1"]) == (0, 0, 0, 1.0) and np.isnan(s["mean_distance"])
    s = detection_scores([[1, 2]], [], 5)
    assert (s["fn"], s["precision"], s["recall"], s["f1"]) == (1, 0.0, 0.0, 0.0)
    s = detection_scores([], [[1, 2], [3, 4]], 5)
    assert (s["fp"], s["precision"], s["recall"], s["f1"]) == (2, 0.0, 0.0, 0.0)
    s = detection_scores([[1, 1]], [[1, 1]], 0)  # radius 0: only exact hits
    assert s["tp"] == 1 and s["mean_distance"] == 0.0
    with pytest.raises(ValueError):
        detection_scores(np.zeros((3, 3)), e, 5)


def test_real_crc_points_match_reference():
    folder = os.path.join(DATA, "crchistophenotypes", "annotations")
    if not os.path.isdir(folder):
        pytest.skip(f"real data not found at {os.path.abspath(folder)}")
    from scipy.io import loadmat

    rng = np.random.default_rng(0)
    for n in (1, 3, 4):
        t = loadmat(os.path.join(folder, f"img{n}", f"img{n}_detection.mat"))["detection"]
        keep = t[rng.random(len(t)) < 0.9]
        p = np.concatenate([keep + rng.normal(0, 3, keep.shape), rng.uniform(0, 500, (15, 2))])
        for r in (3.0, 6.0):
            assert_same(detection_scores(t, p, r), naive_detection(t, p, r))
        assert detection_scores(t, t, 6)["f1"] == 1.0
