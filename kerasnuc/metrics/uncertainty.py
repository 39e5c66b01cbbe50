"""Scores for Monte-Carlo-dropout predictions of binary (nucleus / background) maps.

Uncertainty accuracy rewards a model whose uncertainty is high exactly where it is wrong
(Mobiny et al., "DropConnect is effective in modeling uncertainty of Bayesian deep
networks", Sci. Rep. 2021; PAvPU of Mukhoti & Gal, 2018).
"""

from __future__ import annotations

import numpy as np
from scipy.special import xlogy

__all__ = ["predictive_entropy", "uncertainty_accuracy"]


def predictive_entropy(mean_prob) -> np.ndarray:
    """Binary predictive entropy -p ln p - (1-p) ln(1-p) in nats, same shape as input.

    mean_prob: foreground probability averaged over MC samples, any shape, values clipped
    to [0, 1]. Returns float64, 0 at p in {0, 1}, ln 2 at p = 0.5.
    """
    p = np.clip(np.asarray(mean_prob, dtype=np.float64), 0.0, 1.0)
    return -(xlogy(p, p) + xlogy(1.0 - p, 1.0 - p))


def uncertainty_accuracy(true_mask, mean_prob, uncertainty, threshold: float = 0.5,
                         uncertainty_threshold=None) -> dict:
    """Uncertainty accuracy UA = (n_correct_certain + n_incorrect_uncertain) / N.

    true_mask: ground truth, > 0 is foreground; mean_prob: MC-mean foreground probability;
    uncertainty: per-pixel uncertainty (e.g. :func:`predictive_entropy` or MC variance);
    all the same shape. A pixel is predicted foreground when mean_prob > threshold and is
    uncertain when uncertainty > uncertainty_threshold (default: the median uncertainty).
    Returns ua, n_correct_certain, n_correct_uncertain, n_incorrect_certain,
    n_incorrect_uncertain, threshold, uncertainty_threshold. No pixels -> ua is NaN.
    """
    truth = np.asarray(true_mask) > 0
    prob = np.asarray(mean_prob, dtype=np.float64)
    unc = np.asarray(uncertainty, dtype=np.float64)
    if not (truth.shape == prob.shape == unc.shape):
        raise ValueError(f"shape mismatch: {truth.shape}, {prob.shape}, {unc.shape}")
    if uncertainty_threshold is None:
        uncertainty_threshold = float(np.median(unc)) if unc.size else 0.0
    correct = (prob > threshold) == truth
    uncertain = unc > uncertainty_threshold
    n_cu = int(np.count_nonzero(correct & uncertain))
    n_c = int(np.count_nonzero(correct))
    n_u = int(np.count_nonzero(uncertain))
    n_cc = n_c - n_cu
    n_iu = n_u - n_cu
    n_ic = unc.size - n_c - n_iu
    return {
        "ua": (n_cc + n_iu) / unc.size if unc.size else float("nan"),
        "n_correct_certain": n_cc,
        "n_correct_uncertain": n_cu,
        "n_incorrect_certain": n_ic,
        "n_incorrect_uncertain": n_iu,
        "threshold": float(threshold),
        "uncertainty_threshold": float(uncertainty_threshold),
    }
