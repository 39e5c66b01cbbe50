"""Point-detection metrics for nucleus centres (e.g. CRCHistoPhenotypes).

A predicted centre is a true positive when it is matched one-to-one to a true centre at
most ``radius`` pixels away (Sirinukunwattana et al., IEEE TMI 2016 use 6 px at 20x).
Candidate pairs come from a KD-tree, so the cost is O(K log K), not O(K_true * K_pred).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from .segmentation import _prf, match_one_to_one

__all__ = ["detection_scores", "match_points"]


def _as_points(points, name: str) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.size == 0:
        return np.zeros((0, 2))
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"{name}: expected a (K, 2) array of (x, y), got shape {pts.shape}")
    return pts


def match_points(true_points, pred_points, radius: float):
    """One-to-one matching of centres within ``radius`` (pairs farther apart are forbidden).

    true_points (T, 2), pred_points (P, 2): (x, y) float. Returns (ti, pi, dist): matched
    indices (M,) int and distances (M,) float. The matching has the most pairs possible
    and, among those, the smallest summed distance (Hungarian matching).
    """
    t = _as_points(true_points, "true_points")
    p = _as_points(pred_points, "pred_points")
    if radius < 0:
        raise ValueError("radius must be >= 0")
    if len(t) == 0 or len(p) == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp), np.zeros(0)
    cand = cKDTree(t).sparse_distance_matrix(cKDTree(p), radius, output_type="ndarray")
    ti = cand["i"].astype(np.intp)
    pi = cand["j"].astype(np.intp)
    dist = cand["v"].astype(np.float64)
    closeness = 1.0 - dist / radius if radius > 0 else np.ones_like(dist)
    picked = match_one_to_one(ti, pi, np.clip(closeness, 0.0, 1.0), maximize_count=True)
    return ti[picked], pi[picked], dist[picked]


def detection_scores(true_points, pred_points, radius: float) -> dict:
    """Precision, recall and F1 of detected centres against true centres.

    true_points (T, 2), pred_points (P, 2): (x, y) in pixels (empty arrays allowed).
    Returns tp, fp, fn, precision, recall, f1, radius, mean_distance (of matched pairs;
    NaN with no match). No true and no predicted points -> precision = recall = f1 = 1.0.
    """
    t = _as_points(true_points, "true_points")
    p = _as_points(pred_points, "pred_points")
    _, _, dist = match_points(t, p, radius)
    tp = int(dist.size)
    fp, fn = len(p) - tp, len(t) - tp
    precision, recall, f1 = _prf(tp, fp, fn)
    return {
        "tp": tp, "fp": fp, "fn": fn,
        "precision": precision, "recall": recall, "f1": f1,
        "radius": float(radius),
        "mean_distance": float(dist.mean()) if tp else float("nan"),
    }
