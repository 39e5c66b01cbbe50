"""Uncertainty accuracy and predictive entropy against per-pixel loops and hand values."""

import glob
import math
import os

import numpy as np
import pytest

from kerasnuc.metrics import predictive_entropy, uncertainty_accuracy

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def naive_ua(truth, prob, unc, thr, uthr):
    counts = {"cc": 0, "cu": 0, "ic": 0, "iu": 0}
    for t, p, u in zip(truth.ravel(), prob.ravel(), unc.ravel()):
        key = ("c" if (p > thr) == (t > 0) else "i") + ("u" if u > uthr else "c")
        counts[key] += 1
    return counts, (counts["cc"] + counts["iu"]) / truth.size


def test_entropy_values():
    h = predictive_entropy(np.array([0.0, 0.5, 1.0, 0.2, 1.3, -0.1]))
    want = [0.0, math.log(2), 0.0, -(0.2 * math.log(0.2) + 0.8 * math.log(0.8)), 0.0, 0.0]
    assert h == pytest.approx(want, abs=1e-12)
    assert predictive_entropy(np.full((2, 3), 0.5)).shape == (2, 3)


def test_hand_case():
    truth = np.array([1, 1, 0, 0])
    prob = np.array([0.9, 0.4, 0.2, 0.6])  # correct, wrong, correct, wrong
    unc = np.array([0.1, 0.9, 0.8, 0.2])  # certain, uncertain, uncertain, certain
    r = uncertainty_accuracy(truth, prob, unc, uncertainty_threshold=0.5)
    assert (r["n_correct_certain"], r["n_correct_uncertain"]) == (1, 1)
    assert (r["n_incorrect_certain"], r["n_incorrect_uncertain"]) == (1, 1)
    assert r["ua"] == 0.5 and r["uncertainty_threshold"] == 0.5 and r["threshold"] == 0.5
    # ideal model: uncertain exactly where wrong
    r = uncertainty_accuracy(truth, prob, np.array([0.0, 1.0, 0.0, 1.0]))
    assert r["ua"] == 1.0 and r["uncertainty_threshold"] == 0.5  # median default


@pytest.mark.parametrize("seed", range(5))
def test_random_maps_match_loop(seed):
    rng = np.random.default_rng(seed)
    truth = rng.random((20, 30)) < 0.4
    samples = np.clip(truth[None] * 0.6 + rng.normal(0.2, 0.3, (8, 20, 30)), 0, 1)  # 8 MC samples
    prob = samples.mean(0)
    for unc, uthr in [(predictive_entropy(prob), None), (samples.var(0), 0.01)]:
        r = uncertainty_accuracy(truth, prob, unc, 0.5, uthr)
        want_thr = np.median(unc) if uthr is None else uthr
        counts, ua = naive_ua(truth, prob, unc, 0.5, want_thr)
        assert r["ua"] == pytest.approx(ua, abs=1e-12)
        assert r["uncertainty_threshold"] == pytest.approx(want_thr)
        assert (r["n_correct_certain"], r["n_correct_uncertain"], r["n_incorrect_certain"],
                r["n_incorrect_uncertain"]) == (counts["cc"], counts["cu"], counts["ic"], counts["iu"])


def test_real_label_mask():
    folder = os.path.join(DATA, "dsb2018", "stage1_test", "labels")
    if not os.path.isdir(folder):
        pytest.skip(f"real data not found at {os.path.abspath(folder)}")
    import cv2
    from scipy import ndimage as ndi

    lab = cv2.imread(sorted(glob.glob(os.path.join(folder, "*.png")))[2], cv2.IMREAD_UNCHANGED)[:64, :64]
    # a blurred mask as the MC mean: wrong pixels sit on the boundaries, where entropy is high
    prob = ndi.gaussian_filter((lab > 0).astype(float), 2.0)
    prob = np.roll(prob, 1, axis=0)
    unc = predictive_entropy(prob)
    r = uncertainty_accuracy(lab, prob, unc)
    counts, ua = naive_ua(lab, prob, unc, 0.5, np.median(unc))
    assert r["ua"] == pytest.approx(ua, abs=1e-12)
    assert r["n_incorrect_uncertain"] >= r["n_incorrect_certain"]


def test_shape_mismatch_and_empty():
    with pytest.raises(ValueError):
        uncertainty_accuracy(np.zeros(3), np.zeros(3), np.zeros(4))
    r = uncertainty_accuracy(np.zeros(0), np.zeros(0), np.zeros(0))
    assert math.isnan(r["ua"])
