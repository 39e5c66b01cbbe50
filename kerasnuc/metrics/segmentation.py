"""Instance-segmentation metrics for nuclei: Dice, IoU, object F1, AJI, AJI+, PQ.

All object metrics start from one sparse overlap table (:func:`overlap_table`) built in a
single pass over the foreground pixels, so no metric ever loops over pairs of full-size
masks; a 1000x1000 tile with ~600 nuclei takes a few milliseconds.

Inputs are 2-D (or N-D) instance label images of the same shape, any integer or bool
dtype: 0 (and anything <= 0) is background, every other value is one object. Ids need not
be contiguous. Matching conventions (strict ``>`` thresholds, as in HoVer-Net and PQ):

* IoU > 0.5 pairs are unique, so they are taken directly;
* lower thresholds (or ``criterion="dice"``) use Hungarian matching on the eligible pairs
  that first maximises the number of matches, then the summed IoU (StarDist's rule);
* AJI+ uses Hungarian matching maximising the summed IoU (HoVer-Net ``get_fast_aji_plus``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "OverlapTable",
    "overlap_table",
    "match_one_to_one",
    "pixel_dice",
    "pixel_iou",
    "object_scores",
    "aggregated_jaccard_index",
    "aji_plus",
    "panoptic_quality",
    "segmentation_report",
]

# Above this id (and above 2x the pixel count) ids are compacted with np.unique, not a lookup table.
_MAX_LUT_ID = 1 << 20
# Above this many (true x pred) cells the pair codes are counted with np.unique, not bincount.
_MAX_DENSE_PAIRS = 1 << 25


def _as_label_array(a, name: str) -> np.ndarray:
    """Return ``a`` as a non-negative integer array (bool -> uint8; <= 0 -> 0)."""
    a = np.asarray(a)
    if a.dtype == bool:
        return a.view(np.uint8)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ValueError(f"{name}: float label image must hold whole numbers")
        a = a.astype(np.int64)
    elif a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer or bool label image, got {a.dtype}")
    if a.dtype.kind == "i" and a.size and a.min() < 0:
        a = np.where(a > 0, a, 0)
    return a


def _check_pair(true, pred):
    t = _as_label_array(true, "true")
    p = _as_label_array(pred, "pred")
    if t.shape != p.shape:
        raise ValueError(f"shape mismatch: true {t.shape} vs pred {p.shape}")
    return t.ravel(), p.ravel()


def _compact(flat: np.ndarray):
    """Ids, areas and a pixel->index function for one flattened label image."""
    size = flat.size
    top = int(flat.max()) if size else 0
    if top <= max(_MAX_LUT_ID, 2 * size):
        if flat.dtype == np.uint64:
            flat = flat.astype(np.intp)
        counts = np.bincount(flat, minlength=top + 1) if size else np.zeros(1, np.int64)
        ids = np.flatnonzero(counts[1:]) + 1
        lut = np.zeros(top + 1, dtype=np.intp)
        lut[ids] = np.arange(ids.size)
        return ids, counts[ids].astype(np.int64), lambda v: lut[v]
    ids, counts = np.unique(flat[flat > 0], return_counts=True)
    return ids, counts.astype(np.int64), lambda v: np.searchsorted(ids, v)


@dataclass(frozen=True)
class OverlapTable:
    """Sparse overlap table between true and predicted instances.

    true_ids (T,), pred_ids (P,): the original ids; true_area (T,), pred_area (P,): pixel
    counts (int64). pair_true, pair_pred (K,): indices into the id arrays of every pair
    that shares at least one pixel; inter (K,) int64 shared pixels; union (K,) int64;
    iou (K,) float64. Pairs are sorted by (true index, pred index).
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    true_area: np.ndarray
    pred_area: np.ndarray
    pair_true: np.ndarray
    pair_pred: np.ndarray
    inter: np.ndarray
    union: np.ndarray
    iou: np.ndarray
    fg_true: int
    fg_pred: int
    fg_inter: int

    @property
    def n_true(self) -> int:
        return int(self.true_ids.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_ids.size)

    @property
    def dice(self) -> np.ndarray:
        """Pairwise Dice 2I/(A+B) of the overlapping pairs, shape (K,)."""
        return 2.0 * self.inter / (self.union + self.inter)


def overlap_table(true_labels, pred_labels) -> OverlapTable:
    """Build the sparse true/pred overlap table in one pass over the foreground pixels.

    The object metrics below also accept an ``OverlapTable`` in place of ``true_labels``
    (``pred_labels`` is then ignored), so a report builds the table only once.

    Why: every object metric (F1, AJI, AJI+, PQ) needs only the areas and the pairwise
    intersections of overlapping objects; computing them from combined pair codes with
    ``bincount`` costs O(pixels), instead of O(T * P * pixels) for per-mask loops.
    """
    t, p = _check_pair(true_labels, pred_labels)
    t_ids, t_area, t_idx = _compact(t)
    p_ids, p_area, p_idx = _compact(p)
    both = (t > 0) & (p > 0)
    nt, npr = t_ids.size, p_ids.size
    if nt and npr:
        code = t_idx(t[both]) * npr + p_idx(p[both])
        # a dense count table only pays off while it is not much larger than the pixel list
        if nt * npr <= min(_MAX_DENSE_PAIRS, 2 * code.size):
            counts = np.bincount(code, minlength=nt * npr)
            code = np.flatnonzero(counts)
            inter = counts[code].astype(np.int64)
        else:
            code, inter = np.unique(code, return_counts=True)
            inter = inter.astype(np.int64)
        pt, pp = np.divmod(code, npr)
    else:
        pt = pp = np.zeros(0, np.intp)
        inter = np.zeros(0, np.int64)
    union = t_area[pt] + p_area[pp] - inter
    iou = inter / union if inter.size else np.zeros(0)
    return OverlapTable(
        t_ids, p_ids, t_area, p_area, pt, pp, inter, union, iou,
        int(t_area.sum()), int(p_area.sum()), int(inter.sum()),
    )


def match_one_to_one(rows, cols, weight, maximize_count: bool = True) -> np.ndarray:
    """One-to-one matching on a sparse list of eligible pairs.

    rows, cols (K,) int: pair endpoints; weight (K,) float in [0, 1] (pairs of weight 0
    are never matched when ``maximize_count`` is False). Returns the indices
    (into the K pairs) of the matched pairs. With ``maximize_count`` the matching has the
    largest possible number of pairs and, among those, the largest summed weight; otherwise
    it maximises the summed weight only. Pairs whose row and column occur in no other pair
    are matched directly; only the rest go to ``linear_sum_assignment`` (one dense block).
    """
    rows = np.asarray(rows, np.intp)
    cols = np.asarray(cols, np.intp)
    weight = np.asarray(weight, np.float64)
    if rows.size == 0:
        return np.zeros(0, np.intp)
    rdeg = np.bincount(rows)
    cdeg = np.bincount(cols)
    isolated = (rdeg[rows] == 1) & (cdeg[cols] == 1)
    chosen = [np.flatnonzero(isolated)]
    rest = np.flatnonzero(~isolated)
    if rest.size:
        r_ids, r_inv = np.unique(rows[rest], return_inverse=True)
        c_ids, c_inv = np.unique(cols[rest], return_inverse=True)
        w = weight[rest]
        if maximize_count:
            # 1 per match dominates: the summed bonus is at most n / (2n) = 0.5 < 1.
            w = 1.0 + w / (2.0 * min(r_ids.size, c_ids.size))
        mat = np.zeros((r_ids.size, c_ids.size))
        mat[r_inv, c_inv] = w
        where = np.full((r_ids.size, c_ids.size), -1, dtype=np.intp)
        where[r_inv, c_inv] = rest
        ri, ci = linear_sum_assignment(mat, maximize=True)
        picked = where[ri, ci]
        chosen.append(picked[(picked >= 0) & (mat[ri, ci] > 0)])
    out = np.concatenate(chosen)
    out.sort()
    return out


def _as_table(true_labels, pred_labels) -> OverlapTable:
    if isinstance(true_labels, OverlapTable):
        return true_labels
    return overlap_table(true_labels, pred_labels)


def _fg_counts(true, pred):
    t, p = _check_pair(true, pred)
    ft, fp = t > 0, p > 0
    return int(np.count_nonzero(ft)), int(np.count_nonzero(fp)), int(np.count_nonzero(ft & fp))


def pixel_dice(true, pred) -> float:
    """Foreground Dice 2|A.B| / (|A|+|B|) of two label images or masks (> 0 is foreground).

    Both empty -> 1.0 (nothing to find, nothing found).
    """
    a, b, i = _fg_counts(true, pred)
    return 1.0 if a + b == 0 else 2.0 * i / (a + b)


def pixel_iou(true, pred) -> float:
    """Foreground IoU |A.B| / |A+B| of two label images or masks; both empty -> 1.0."""
    a, b, i = _fg_counts(true, pred)
    return 1.0 if a + b == 0 else i / (a + b - i)


def _prf(tp: int, fp: int, fn: int):
    """Precision, recall, F1; all 1.0 when there is nothing to find and nothing found,
    otherwise a zero denominator gives 0.0."""
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2.0 * tp / (2 * tp + fp + fn)
    return precision, recall, f1


def _matched(table: OverlapTable, iou_threshold: float, criterion: str) -> np.ndarray:
    if criterion == "iou":
        score = table.iou
    elif criterion == "dice":
        score = table.dice
    else:
        raise ValueError(f"criterion must be 'iou' or 'dice', got {criterion!r}")
    ok = np.flatnonzero(score > iou_threshold)
    picked = match_one_to_one(table.pair_true[ok], table.pair_pred[ok], table.iou[ok], True)
    return ok[picked]


def object_scores(true_labels, pred_labels, iou_threshold: float = 0.5, criterion: str = "iou") -> dict:
    """Object-level detection scores of instance label images.

    A true and a predicted nucleus match when their IoU (or Dice, ``criterion="dice"``)
    is strictly above ``iou_threshold``, one-to-one (IoU > 0.5 pairs are unique; below
    that, Hungarian matching with the most matches, then the largest summed IoU).
    ``criterion="dice", iou_threshold=0.2`` is the "Dice > 0.2" rule of the literature.
    Returns tp, fp, fn (int), precision, recall, f1, mean_matched_iou (0.0 with no match).
    Both images empty -> precision = recall = f1 = 1.0.
    """
    table = _as_table(true_labels, pred_labels)
    m = _matched(table, iou_threshold, criterion)
    tp = int(m.size)
    fp, fn = table.n_pred - tp, table.n_true - tp
    precision, recall, f1 = _prf(tp, fp, fn)
    return {
        "tp": tp, "fp": fp, "fn": fn,
        "precision": precision, "recall": recall, "f1": f1,
        "mean_matched_iou": float(table.iou[m].mean()) if tp else 0.0,
    }


def _aji_from(table: OverlapTable, picked: np.ndarray) -> float:
    """AJI-style ratio given the chosen pair indices (one per paired true nucleus)."""
    num = int(table.inter[picked].sum())
    den = int(table.union[picked].sum())
    used_t = np.zeros(table.n_true, bool)
    used_t[table.pair_true[picked]] = True
    used_p = np.zeros(table.n_pred, bool)
    used_p[table.pair_pred[picked]] = True
    den += int(table.true_area[~used_t].sum()) + int(table.pred_area[~used_p].sum())
    return 1.0 if den == 0 else num / den


def aggregated_jaccard_index(true_labels, pred_labels) -> float:
    """Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017).

    Each true nucleus takes the predicted nucleus of highest IoU (ties: lowest pred id;
    a prediction may serve several true nuclei); the intersections form the numerator,
    the unions plus the areas of true nuclei without overlap and of unused predictions the
    denominator. Both empty -> 1.0; exactly one empty -> 0.0.
    """
    table = _as_table(true_labels, pred_labels)
    if table.inter.size:
        # pairs are sorted by true index; within a true index take the highest IoU
        order = np.lexsort((table.pair_pred, -table.iou, table.pair_true))
        pt = table.pair_true[order]
        first = np.ones(order.size, bool)
        first[1:] = pt[1:] != pt[:-1]
        picked = order[first]
    else:
        picked = np.zeros(0, np.intp)
    return _aji_from(table, picked)


def aji_plus(true_labels, pred_labels) -> float:
    """AJI+ (Graham et al., HoVer-Net 2019): AJI with a one-to-one pairing.

    Pairs come from Hungarian matching maximising the summed IoU over overlapping pairs
    (as ``get_fast_aji_plus``), so no prediction is counted twice. Both empty -> 1.0;
    exactly one empty -> 0.0.
    """
    table = _as_table(true_labels, pred_labels)
    picked = match_one_to_one(table.pair_true, table.pair_pred, table.iou, maximize_count=False)
    return _aji_from(table, picked)


def panoptic_quality(true_labels, pred_labels, iou_threshold: float = 0.5) -> dict:
    """Panoptic quality (Kirillov et al. 2019) for one class of instances.

    Matches have IoU > ``iou_threshold`` (unique at 0.5; lower thresholds use the same
    Hungarian rule as :func:`object_scores`). dq = tp / (tp + fp/2 + fn/2), sq = mean IoU
    of matches (0.0 with none), pq = dq * sq. Both empty -> pq = dq = sq = 1.0.
    """
    table = _as_table(true_labels, pred_labels)
    m = _matched(table, iou_threshold, "iou")
    tp = int(m.size)
    fp, fn = table.n_pred - tp, table.n_true - tp
    if tp + fp + fn == 0:
        dq = sq = 1.0
    else:
        dq = tp / (tp + 0.5 * fp + 0.5 * fn)
        sq = float(table.iou[m].sum() / tp) if tp else 0.0
    return {"pq": dq * sq, "dq": dq, "sq": sq, "tp": tp, "fp": fp, "fn": fn}


def segmentation_report(true_labels, pred_labels) -> dict:
    """All segmentation metrics of one image pair, from one overlap table.

    Keys: dice, iou (foreground pixels), aji, aji_plus, pq, dq, sq, tp, fp, fn, precision,
    recall, f1 (objects at IoU > 0.5), mean_matched_iou, tp_dice02, fp_dice02, fn_dice02,
    precision_dice02, recall_dice02, f1_dice02 (objects at Dice > 0.2, the rule of Kumar et al.
    2017 and NucSeg), n_true, n_pred.
    """
    table = overlap_table(true_labels, pred_labels)
    a, b, i = table.fg_true, table.fg_pred, table.fg_inter
    obj = object_scores(table, None)
    obj02 = object_scores(table, None, 0.2, "dice")
    pq = panoptic_quality(table, None)
    return {
        "dice": 1.0 if a + b == 0 else 2.0 * i / (a + b),
        "iou": 1.0 if a + b == 0 else i / (a + b - i),
        "aji": aggregated_jaccard_index(table, None),
        "aji_plus": aji_plus(table, None),
        "pq": pq["pq"], "dq": pq["dq"], "sq": pq["sq"],
        "tp": obj["tp"], "fp": obj["fp"], "fn": obj["fn"],
        "precision": obj["precision"], "recall": obj["recall"], "f1": obj["f1"],
        "mean_matched_iou": obj["mean_matched_iou"],
        "tp_dice02": obj02["tp"], "fp_dice02": obj02["fp"], "fn_dice02": obj02["fn"],
        "precision_dice02": obj02["precision"], "recall_dice02": obj02["recall"], "f1_dice02": obj02["f1"],
        "n_true": table.n_true, "n_pred": table.n_pred,
    }
