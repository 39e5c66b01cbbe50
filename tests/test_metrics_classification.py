"""Classification metrics against loop-based counting, rank-based AUC/AP and real points."""

import os

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from kerasnuc.metrics import classification_report, detection_classification_scores

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
TOL = 1e-6
CRC_CLASSES = ["epithelial", "inflammatory", "fibroblast", "others"]


def naive_counts(yt, yp, k):
    cm = np.zeros((k, k), int)
    for a, b in zip(yt, yp):
        cm[a, b] += 1
    out = []
    for c in range(k):
        tp = cm[c, c]
        fp = cm[:, c].sum() - tp
        fn = cm[c, :].sum() - tp
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        out.append((p, r, f, tp + fn))
    return cm, out


def naive_auc(pos, s):
    """Probability a positive outranks a negative (ties count half)."""
    sp, sn = s[pos], s[~pos]
    total = sum((a > b) + 0.5 * (a == b) for a in sp for b in sn)
    return total / (len(sp) * len(sn))


def naive_ap(pos, s):
    """Sum over descending score thresholds of (recall step) x precision."""
    ap, prev_r = 0.0, 0.0
    for thr in sorted(set(s.tolist()), reverse=True):
        sel = s >= thr
        tp = np.sum(pos & sel)
        r = tp / pos.sum()
        ap += (r - prev_r) * tp / sel.sum()
        prev_r = r
    return ap


@pytest.mark.parametrize("seed", range(8))
def test_random_labels_match_reference(seed):
    rng = np.random.default_rng(seed)
    k, n = 4, int(rng.integers(5, 80))
    yt = rng.integers(0, k - (seed % 2), n)  # odd seeds: the last class never occurs in y_true
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[yt]
    score = np.round(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 2)  # rounding makes ties
    yp = score.argmax(1)
    rep = classification_report(yt, yp, num_classes=k, y_score=score)
    cm, per = naive_counts(yt, yp, k)
    assert rep["confusion_matrix"] == cm.tolist()
    assert rep["accuracy"] == pytest.approx(np.mean(yt == yp))
    for c in range(k):
        pc = rep["per_class"][c]
        assert (pc["precision"], pc["recall"], pc["f1"], pc["support"]) == pytest.approx(per[c], abs=TOL)
        pos = yt == c
        if pos.any():
            assert pc["average_precision"] == pytest.approx(naive_ap(pos, score[:, c]), abs=TOL)
            assert pc["roc_auc"] == pytest.approx(naive_auc(pos, score[:, c]), abs=TOL)
        else:
            assert pc["average_precision"] is None and pc["roc_auc"] is None
    present = [c for c in range(k) if cm[c, :].sum() + cm[:, c].sum() > 0]
    assert rep["macro_f1"] == pytest.approx(np.mean([per[c][2] for c in present]), abs=TOL)
    assert rep["weighted_f1"] == pytest.approx(sum(p[2] * p[3] for p in per) / n, abs=TOL)
    aucs = [rep["per_class"][c]["roc_auc"] for c in range(k) if (yt == c).any()]
    assert rep["macro_roc_auc"] == pytest.approx(np.mean(aucs), abs=TOL)


def test_hand_case_and_names():
    rep = classification_report([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], class_names=["a", "b", "c"])
    a, b, c = rep["per_class"]
    assert (a["name"], a["precision"], a["recall"], a["f1"], a["support"]) == ("a", 0.5, 0.5, 0.5, 2)
    assert (b["precision"], b["recall"], b["f1"]) == (pytest.approx(2 / 3), 1.0, pytest.approx(0.8))
    assert (c["precision"], c["recall"], c["f1"]) == (0.0, 0.0, 0.0)
    assert rep["accuracy"] == pytest.approx(0.6)
    assert rep["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert rep["macro_f1"] == pytest.approx((0.5 + 0.8 + 0) / 3)
    assert rep["weighted_f1"] == pytest.approx((0.5 * 2 + 0.8 * 2) / 5)
    assert "macro_roc_auc" not in rep


def test_single_class_scores_are_none_not_errors():
    score = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]])
    rep = classification_report([0, 0, 0], [0, 0, 0], num_classes=2, y_score=score)
    assert rep["per_class"][0]["roc_auc"] is None  # no negatives
    assert rep["per_class"][0]["average_precision"] == pytest.approx(1.0)
    assert rep["per_class"][1]["roc_auc"] is None and rep["per_class"][1]["average_precision"] is None
    assert rep["macro_roc_auc"] is None
    assert rep["macro_f1"] == 1.0  # class 1 neither true nor predicted: left out of the mean
    empty = classification_report([], [], num_classes=3)
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["confusion_matrix"] == [[0] * 3] * 3
    with pytest.raises(ValueError):
        classification_report([0, 1], [0, 5], num_classes=3)
    with pytest.raises(ValueError):
        classification_report([0, 1], [0, 1], num_classes=2, y_score=np.zeros((2, 3)))


def naive_class_f1(t, tc, p, pc, r, k):
    out = []
    for c in range(k):
        a, b = t[tc == c], p[pc == c]
        tp = 0
        if len(a) and len(b):
            d = np.array([[np.hypot(*(x - y)) for y in b] for x in a])
            rows, cols = linear_sum_assignment(np.where(d <= r, d, 1e9))
            tp = int(sum(d[i, j] <= r for i, j in zip(rows, cols)))
        fp, fn = len(b) - tp, len(a) - tp
        out.append((1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn), len(a), tp + fp + fn > 0))
    return out


def _check_points(t, tc, p, pc, r, k):
    got = detection_classification_scores(t, tc, p, pc, r, k)
    want = naive_class_f1(t, tc, p, pc, r, k)
    for c in range(k):
        assert got["per_class"][c]["f1"] == pytest.approx(want[c][0], abs=TOL)
        assert got["per_class"][c]["support"] == want[c][1]
    act = [w[0] for w in want if w[2]]
    assert got["macro_f1"] == pytest.approx(np.mean(act), abs=TOL)
    assert got["weighted_f1"] == pytest.approx(sum(w[0] * w[1] for w in want) / len(t), abs=TOL)
    return got


@pytest.mark.parametrize("seed", range(5))
def test_random_classified_points(seed):
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 100, (60, 2))
    tc = rng.integers(0, 3, 60)
    keep = rng.random(60) < 0.85
    p = t[keep] + rng.normal(0, 2, (keep.sum(), 2))
    pc = np.where(rng.random(keep.sum()) < 0.8, tc[keep], rng.integers(0, 3, keep.sum()))
    got = _check_points(t, tc, p, pc, 6.0, 3)
    assert got["detection"]["tp"] <= len(p)


def test_class_hand_case():
    t = np.array([[0, 0], [10, 0], [20, 0]])
    p = np.array([[1, 0], [10, 1], [40, 0]])
    got = detection_classification_scores(t, [0, 1, 1], p, [0, 0, 1], 3, 2, ["a", "b"])
    a, b = got["per_class"]
    assert (a["name"], a["tp"], a["fp"], a["fn"], a["f1"]) == ("a", 1, 1, 0, pytest.approx(2 / 3))
    assert (b["tp"], b["fp"], b["fn"], b["f1"]) == (0, 1, 2, 0.0)
    assert got["weighted_f1"] == pytest.approx((2 / 3) / 3)
    assert got["detection"]["tp"] == 2


def test_real_crc_classified_points():
    folder = os.path.join(DATA, "crchistophenotypes", "annotations")
    if not os.path.isdir(folder):
        pytest.skip(f"real data not found at {os.path.abspath(folder)}")
    from scipy.io import loadmat

    rng = np.random.default_rng(1)
    for n in (2, 3):
        pts = [loadmat(os.path.join(folder, f"img{n}", f"img{n}_{c}.mat"))["detection"].reshape(-1, 2)
               for c in CRC_CLASSES]
        t = np.concatenate(pts)
        tc = np.concatenate([np.full(len(x), c) for c, x in enumerate(pts)])
        p = t + rng.normal(0, 2.5, t.shape)
        pc = np.where(rng.random(len(t)) < 0.75, tc, rng.integers(0, 4, len(t)))
        _check_points(t, tc, p, pc, 6.0, 4)
        perfect = detection_classification_scores(t, tc, t, tc, 6.0, 4, CRC_CLASSES)
        assert perfect["weighted_f1"] == pytest.approx(1.0)
