"""Time kerasnuc.metrics on real MoNuSeg 2018 label maps (1000x1000, ~400-1000 nuclei each).

Each true label map is compared with a perturbed copy (nuclei shrunk by 1 px, shifted by
(2, 1) px, ~5 % dropped, ~5 % merged into a touching neighbour, a few false positives),
which gives realistic partial overlaps. Every metric is timed per image as the median of
``--repeats`` runs; the tables give the median and maximum of those over the images.
A HoVer-Net-style per-object AJI (full-size masks per nucleus) is timed on one image for
comparison and checked to agree with the fast AJI. Detection is timed on the
CRCHistoPhenotypes points. Usage::

    python3 bench/bench_metrics.py [--images 30] [--repeats 7]

Writes bench/results/metrics.md and bench/results/metrics.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time

import cv2
import numpy as np
import scipy
from scipy import ndimage as ndi

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from kerasnuc.metrics import (  # noqa: E402
    aggregated_jaccard_index,
    aji_plus,
    detection_classification_scores,
    detection_scores,
    object_scores,
    overlap_table,
    panoptic_quality,
    pixel_dice,
    segmentation_report,
)

DATA = os.path.join(os.path.dirname(HERE), "..", "shared", "data")


def perturb(lab: np.ndarray, seed: int) -> np.ndarray:
    """A plausible prediction from a true label map (see the module docstring)."""
    rng = np.random.default_rng(seed)
    out = np.where(ndi.grey_erosion(lab, size=3) == lab, lab, 0)  # drop 1-px borders
    out = np.roll(out, (2, 1), axis=(0, 1))
    ids = np.unique(out)[1:]
    out[np.isin(out, rng.choice(ids, size=len(ids) // 20, replace=False))] = 0
    boxes = ndi.find_objects(out)
    for i in rng.choice(ids, size=len(ids) // 20, replace=False):
        sl = boxes[i - 1]
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - 4, 0), s.stop + 4) for s in sl)
        win = out[sl]
        near = np.unique(win[ndi.binary_dilation(win == i, iterations=4)])
        near = near[(near > 0) & (near != i)]
        if near.size:
            win[win == near[0]] = i
    yy, xx = np.mgrid[: lab.shape[0], : lab.shape[1]]
    fresh = int(out.max()) + 1
    for k in range(10):  # false positives in the background
        cy, cx = rng.uniform(0, lab.shape[0]), rng.uniform(0, lab.shape[1])
        disk = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 36) & (out == 0)
        out[disk] = fresh + k
    return out


def hovernet_style_aji(true: np.ndarray, pred: np.ndarray) -> float:
    """Per-nucleus full-size mask loops, as HoVer-Net's get_fast_aji does (reference)."""
    inter_sum = union_sum = 0
    used = set()
    pred_ids = [j for j in np.unique(pred) if j > 0]
    for i in [i for i in np.unique(true) if i > 0]:
        t_mask = true == i
        best = (0.0, 0, 0, None)
        for j in np.unique(pred[t_mask]):
            if j == 0:
                continue
            p_mask = pred == j
            inter = int((t_mask & p_mask).sum())
            union = int((t_mask | p_mask).sum())
            if inter / union > best[0]:
                best = (inter / union, inter, union, j)
        if best[3] is None:
            union_sum += int(t_mask.sum())
        else:
            inter_sum += best[1]
            union_sum += best[2]
            used.add(best[3])
    for j in pred_ids:
        if j not in used:
            union_sum += int((pred == j).sum())
    return inter_sum / union_sum if union_sum else 1.0


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


SEG_METRICS = {
    "overlap_table": lambda t, p: overlap_table(t, p),
    "pixel_dice": lambda t, p: pixel_dice(t, p),
    "object_scores (IoU>0.5)": lambda t, p: object_scores(t, p),
    "object_scores (Dice>0.2)": lambda t, p: object_scores(t, p, 0.2, "dice"),
    "aggregated_jaccard_index": lambda t, p: aggregated_jaccard_index(t, p),
    "aji_plus": lambda t, p: aji_plus(t, p),
    "panoptic_quality": lambda t, p: panoptic_quality(t, p),
    "segmentation_report": lambda t, p: segmentation_report(t, p),
}


def crc_points(folder: str, n: int):
    from scipy.io import loadmat

    classes = ["epithelial", "inflammatory", "fibroblast", "others"]
    pts = [loadmat(os.path.join(folder, f"img{n}", f"img{n}_{c}.mat"))["detection"].reshape(-1, 2)
           for c in classes]
    return np.concatenate(pts), np.concatenate([np.full(len(x), k) for k, x in enumerate(pts)])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)

    files = sorted(glob.glob(os.path.join(DATA, "monuseg2018", "train", "labels", "*.png")))[: args.images]
    if not files:
        raise SystemExit(f"MoNuSeg labels not found under {os.path.abspath(DATA)}")
    per_metric = {k: [] for k in SEG_METRICS}
    reports, nuclei = [], []
    for n, f in enumerate(files):
        true = cv2.imread(f, cv2.IMREAD_UNCHANGED)
        pred = perturb(true, n)
        nuclei.append(int(len(np.unique(true)) - 1))
        for name, fn in SEG_METRICS.items():
            per_metric[name].append(median_time(lambda: fn(true, pred), args.repeats))
        reports.append(segmentation_report(true, pred))

    # reference: HoVer-Net-style per-object loops on the first image, one run
    true = cv2.imread(files[0], cv2.IMREAD_UNCHANGED)
    pred = perturb(true, 0)
    start = time.perf_counter()
    ref_aji = hovernet_style_aji(true, pred)
    ref_time = time.perf_counter() - start
    fast_aji = aggregated_jaccard_index(true, pred)
    assert abs(ref_aji - fast_aji) < 1e-9, (ref_aji, fast_aji)

    det = {}
    crc = os.path.join(DATA, "crchistophenotypes", "annotations")
    if os.path.isdir(crc):
        rng = np.random.default_rng(0)
        t, tc = crc_points(crc, 3)
        p = t + rng.normal(0, 2.5, t.shape)
        pc = np.where(rng.random(len(t)) < 0.8, tc, rng.integers(0, 4, len(t)))
        det = {
            "points": int(len(t)),
            "detection_scores_s": median_time(lambda: detection_scores(t, p, 6.0), args.repeats),
            "detection_classification_scores_s": median_time(
                lambda: detection_classification_scores(t, tc, p, pc, 6.0, 4), args.repeats),
        }

    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        },
        "data": {
            "dataset": "monuseg2018/train/labels",
            "images": len(files),
            "shape": list(true.shape),
            "nuclei_per_image": {"min": min(nuclei), "median": float(np.median(nuclei)), "max": max(nuclei)},
            "prediction": "1-px erosion, shift (2,1), 5% dropped, 5% merged, 10 false positives",
            "repeats": args.repeats,
        },
        "timing_s": {k: {"median": float(np.median(v)), "max": float(np.max(v))} for k, v in per_metric.items()},
        "reference_hovernet_style_aji": {
            "image": os.path.basename(files[0]), "seconds": ref_time,
            "fast_seconds": per_metric["aggregated_jaccard_index"][0],
            "speedup": ref_time / per_metric["aggregated_jaccard_index"][0], "agrees": True,
        },
        "detection": det,
        "mean_scores": {k: float(np.mean([r[k] for r in reports]))
                        for k in ("dice", "aji", "aji_plus", "pq", "f1", "f1_dice02")},
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "metrics.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    with open(os.path.join(args.out, "metrics.md"), "w") as fh:
        fh.write(to_markdown(result))
    print(to_markdown(result))
    return result


def to_markdown(r: dict) -> str:
    m, d = r["machine"], r["data"]
    lines = [
        "# kerasnuc.metrics timings",
        "",
        "Command: `python3 bench/bench_metrics.py`",
        "",
        f"Machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs; Python {m['python']}, "
        f"NumPy {m['numpy']}, SciPy {m['scipy']}; 1-min load average at the end {m['load_average_1min']} "
        "(a shared machine: timings scale with the load).",
        "",
        f"Data: {d['images']} MoNuSeg 2018 training label maps, {d['shape'][0]}x{d['shape'][1]}, "
        f"{d['nuclei_per_image']['min']}-{d['nuclei_per_image']['max']} nuclei "
        f"(median {d['nuclei_per_image']['median']:.0f}); prediction = {d['prediction']}. "
        f"Per image: median of {d['repeats']} runs; below: median and max over images.",
        "",
        "| metric | median ms | max ms |",
        "|---|---:|---:|",
    ]
    for k, v in r["timing_s"].items():
        lines.append(f"| {k} | {1e3 * v['median']:.1f} | {1e3 * v['max']:.1f} |")
    ref = r["reference_hovernet_style_aji"]
    lines += [
        "",
        f"Reference: HoVer-Net-style per-object AJI on {ref['image']}: {ref['seconds']:.2f} s, "
        f"fast AJI {1e3 * ref['fast_seconds']:.1f} ms ({ref['speedup']:.0f}x), same value.",
    ]
    if r["detection"]:
        det = r["detection"]
        lines += [
            "",
            f"Detection (CRCHistoPhenotypes img3, {det['points']} classified points, radius 6): "
            f"detection_scores {1e3 * det['detection_scores_s']:.2f} ms, "
            f"detection_classification_scores {1e3 * det['detection_classification_scores_s']:.2f} ms.",
        ]
    lines += ["", "Mean scores of the perturbed predictions (sanity check): "
              + ", ".join(f"{k} {v:.3f}" for k, v in r["mean_scores"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
