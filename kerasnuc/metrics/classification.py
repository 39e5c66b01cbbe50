"""Nucleus-classification metrics: per-class and averaged F1, confusion, ROC AUC, AP.

``classification_report`` scores labels of already paired nuclei (patch classifiers);
``detection_classification_scores`` scores classified centre points, where a class's
true positives are its predicted centres matched to true centres of the same class
(Sirinukunwattana et al., IEEE TMI 2016).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from .detection import _as_points, detection_scores

__all__ = ["classification_report", "detection_classification_scores"]


def _names(num_classes: int, class_names):
    if class_names is None:
        return [str(k) for k in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class_names for {num_classes} classes")
    return names


def _mean_or_none(values):
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def classification_report(y_true, y_pred, num_classes=None, class_names=None, y_score=None) -> dict:
    """Per-class and averaged scores of integer class labels.

    y_true, y_pred (N,) int in [0, num_classes) (num_classes defaults to max label + 1);
    y_score optional (N, num_classes) class probabilities. Returns a dict with
    ``per_class`` (one dict per class: name, precision, recall, f1, support; a zero
    denominator gives 0.0), accuracy, macro_f1 (mean over classes that occur in y_true or
    y_pred), weighted_f1 (support-weighted), confusion_matrix (rows true, columns predicted,
    list of lists), n. With y_score, each class also gets one-vs-rest roc_auc and
    average_precision (None when the class has no positives, or for AUC no negatives), and
    macro_roc_auc / macro_average_precision average the defined ones (None if none is).
    Empty input -> accuracy and F1 values are None.
    """
    yt = np.asarray(y_true).astype(np.int64).ravel()
    yp = np.asarray(y_pred).astype(np.int64).ravel()
    if yt.shape != yp.shape:
        raise ValueError(f"y_true has {yt.size} labels, y_pred {yp.size}")
    if num_classes is None:
        num_classes = int(max(yt.max(initial=-1), yp.max(initial=-1))) + 1
    if yt.size and (min(yt.min(), yp.min()) < 0 or max(yt.max(), yp.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    names = _names(num_classes, class_names)
    labels = np.arange(num_classes)
    n = int(yt.size)
    if n:
        prec, rec, f1, sup = precision_recall_fscore_support(
            yt, yp, labels=labels, average=None, zero_division=0)
        cm = confusion_matrix(yt, yp, labels=labels)
    else:
        prec = rec = f1 = np.zeros(num_classes)
        sup = np.zeros(num_classes, np.int64)
        cm = np.zeros((num_classes, num_classes), np.int64)
    per_class = [
        {"name": names[k], "precision": float(prec[k]), "recall": float(rec[k]),
         "f1": float(f1[k]), "support": int(sup[k])}
        for k in range(num_classes)
    ]
    present = (np.bincount(yt, minlength=num_classes) + np.bincount(yp, minlength=num_classes)) > 0
    report = {
        "per_class": per_class,
        "accuracy": float(np.mean(yt == yp)) if n else None,
        "macro_f1": float(np.mean(f1[present])) if n else None,
        "weighted_f1": float(np.sum(f1 * sup) / n) if n else None,
        "confusion_matrix": cm.astype(int).tolist(),
        "n": n,
    }
    if y_score is not None:
        score = np.asarray(y_score, dtype=np.float64)
        if score.shape != (n, num_classes):
            raise ValueError(f"y_score must have shape {(n, num_classes)}, got {score.shape}")
        for k in range(num_classes):
            pos = yt == k
            n_pos = int(pos.sum())
            per_class[k]["average_precision"] = (
                float(average_precision_score(pos, score[:, k])) if n_pos else None)
            per_class[k]["roc_auc"] = (
                float(roc_auc_score(pos, score[:, k])) if 0 < n_pos < n else None)
        report["macro_roc_auc"] = _mean_or_none(c["roc_auc"] for c in per_class)
        report["macro_average_precision"] = _mean_or_none(c["average_precision"] for c in per_class)
    return report


def detection_classification_scores(true_points, true_classes, pred_points, pred_classes,
                                    radius: float, num_classes: int, class_names=None) -> dict:
    """Per-class F1 of classified centres (Sirinukunwattana et al. 2016).

    true_points (T, 2), pred_points (P, 2): (x, y); true_classes (T,), pred_classes (P,)
    int in [0, num_classes). For each class c, the true and predicted centres of class c
    are matched one-to-one within ``radius`` (:func:`detection_scores`). Returns
    ``per_class`` (name plus detection_scores' keys and support = number of true centres),
    macro_f1 (mean over classes with true or predicted centres), weighted_f1 (weighted by
    support; None without true centres) and ``detection`` (class-agnostic scores).
    """
    tpts = _as_points(true_points, "true_points")
    ppts = _as_points(pred_points, "pred_points")
    tcls = np.asarray(true_classes, dtype=np.int64).ravel()
    pcls = np.asarray(pred_classes, dtype=np.int64).ravel()
    if tcls.size != len(tpts) or pcls.size != len(ppts):
        raise ValueError("need one class per point")
    names = _names(num_classes, class_names)
    per_class = []
    for k in range(num_classes):
        s = detection_scores(tpts[tcls == k], ppts[pcls == k], radius)
        per_class.append({"name": names[k], "support": s["tp"] + s["fn"], **s})
    active = [c for c in per_class if c["tp"] + c["fp"] + c["fn"] > 0]
    support = sum(c["support"] for c in per_class)
    return {
        "per_class": per_class,
        "macro_f1": float(np.mean([c["f1"] for c in active])) if active else None,
        "weighted_f1": (float(sum(c["f1"] * c["support"] for c in per_class) / support)
                        if support else None),
        "detection": detection_scores(tpts, ppts, radius),
    }
