"""Evaluate a finished run's model on its held-out images or on another dataset.

    python -m training.evaluate runs/unet-20261124-101500                 # the run's test split
    python -m training.evaluate RUN --split val --tta                      # 8 dihedral views averaged
    python -m training.evaluate RUN --multiple-inference                   # NucSeg: 7 views, anchored vote
    python -m training.evaluate RUN --data dsb2018:../shared/data/dsb2018/stage1_test
    python -m training.evaluate RUN --mc-samples 20                        # MC-dropout models
    python -m training.evaluate RUN --data folder:my_data --skip-bad       # list bad files, score the rest

Everything comes from the run folder (config.json, split.json, model.keras, thresholds.json):
the same channels, intensity normalisation, stain normalisation (stain.json) and tuned
post-processing as training used. Results go to ``RUN/eval-<split or dataset>[-tta]/``
(or ``--out``), written to a temporary folder first and renamed when complete:
metrics.json (per image, mean and pooled, with the options used), report.md and figures.
Images are read under the run's input policy (``--max-pixels``, ``--bit-depth``,
``--binary-labels`` override it; :mod:`kerasnuc.data.validation`); a bad input stops the
evaluation with one line naming it, or with ``--skip-bad`` is left out and listed.
"""

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from kerasnuc.data import validation  # noqa: E402
from kerasnuc.runs import model_multiple, postprocess_of  # noqa: E402

SPLITS = ("test", "val")
TTA_MERGES = ("mean", "vote")
VOTE_IOU = 0.2  # multiple inference (NucSeg): a view's nucleus matches an original one at IoU > 0.2
VOTE_FRACTION = 0.5  # and a pixel stays when more than half of the views' masks cover it


class EvaluationError(Exception):
    """A run folder, option or dataset that cannot be evaluated; the message says why."""


# ---------------------------------------------------------------------------- the run folder

def load_run(run_dir):
    """The run folder as :func:`kerasnuc.runs.read_run` reads and checks it (config with
    FitConfig's defaults for keys an older run lacks); its errors as EvaluationError."""
    from kerasnuc import runs
    from training.config import FitConfig

    try:
        run = runs.read_run(run_dir)
    except runs.RunError as error:
        raise EvaluationError(str(error)) from None
    run.config = {**FitConfig().to_dict(), **run.config}
    return run


def dataset_name(spec):
    """Folder-friendly name of a dataset spec: 'dsb2018:/x/stage1_test' -> 'dsb2018-stage1_test'."""
    from kerasnuc.data.spec import parse_spec

    if spec == "sample":
        return "sample"
    try:
        fmt, path = parse_spec(spec)
    except Exception:
        fmt, path = spec.split(":", 1) if ":" in spec else ("data", spec)
    base = os.path.basename(os.path.normpath(path)) or "data"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{fmt}-{base}")


def run_policy(run, **overrides):
    """The input policy training read the run's data with (config.json), with ``overrides`` (None: keep)."""
    from kerasnuc.data.validation import InputPolicy

    config = run.config
    try:
        return InputPolicy.from_options(config.get("max_pixels"), config.get("bit_depth"),
                                        config.get("binary_labels")).override(**overrides)
    except ValueError as error:
        raise EvaluationError(f"{run.path}: input policy: {error}") from None


def select_records(run, data=None, split="test", policy=None, skipped=None):
    """(records, description): the run's ``split`` images, or every image of dataset ``data``.

    ``policy``: the :class:`~kerasnuc.data.validation.InputPolicy` to read them with (default:
    the run's). With a ``skipped`` list, bad inputs are noted there and left out (their split
    names are then not missing) instead of stopping the evaluation.
    """
    from kerasnuc.data import load_dataset
    from kerasnuc.data.imageio import DataError

    policy = policy or run_policy(run)
    read = {"policy": policy, "skipped": skipped}
    try:
        if data:
            records = load_dataset(data, **read)
            if not records:
                raise EvaluationError(f"dataset {data}: no images" + _skipped_note(skipped))
            description = {"data": data, "split": None}
        else:
            if split not in run.split or not isinstance(run.split.get(split), list):
                known = [k for k, v in run.split.items() if isinstance(v, list)]
                raise EvaluationError(f"{run.path}/split.json: no split '{split}' (has: {', '.join(known)})")
            names = run.split[split]
            if not names:
                raise EvaluationError(f"{run.path}/split.json: split '{split}' is empty; evaluate another "
                                      "split or pass --data")
            wanted = set(names)
            pool = []
            if any(not n.startswith("test:") for n in names):
                pool += load_dataset(run.config["data"], **read)
            if any(n.startswith("test:") for n in names):
                if not run.config.get("test_data"):
                    raise EvaluationError(f"{run.path}: split '{split}' names 'test:' images but config.json "
                                          "has no test_data")
                before = len(skipped) if skipped is not None else 0
                for record in load_dataset(run.config["test_data"], **read):
                    record.name = f"test:{record.name}"
                    pool.append(record)
                for entry in (skipped or [])[before:]:
                    entry["name"] = f"test:{entry['name']}"
            if skipped is not None:  # bad inputs of the split are reported as skipped, not missing
                gone = {entry["name"] for entry in skipped}
                skipped[:] = [entry for entry in skipped if entry["name"] in wanted]
                names = [n for n in names if n not in gone]
                if not names:
                    raise EvaluationError(f"split '{split}': no images left" + _skipped_note(skipped))
            by_name = {r.name: r for r in pool if r.name in wanted}
            missing = [n for n in names if n not in by_name]
            if missing:
                raise EvaluationError(f"{len(missing)} image(s) of split '{split}' not found in "
                                      f"{run.config['data']}: {', '.join(missing[:5])}")
            records = [by_name[n] for n in names]
            description = {"data": run.config["data"], "test_data": run.config.get("test_data") or None,
                           "split": split}
    except DataError as error:
        raise EvaluationError(str(error)) from None
    if run.stain:  # the images stay original: the engine normalises them (engine_for's stain)
        description["stain"] = run.stain.get("method")
    return records, description


def _skipped_note(skipped):
    if not skipped:
        return ""
    return f" ({len(skipped)} skipped as bad, e.g. {skipped[0]['error']})"


# ---------------------------------------------------------------------------- predictions

@dataclass
class Settings:
    channels: int = 3
    multiple: int = 16
    tta: bool = False
    tta_merge: str = "mean"
    mc_samples: int = 1

    @property
    def multiple_inference(self):
        """The dihedral views of NucSeg's multiple inference (``tta_merge == "vote"``), or None."""
        from kerasnuc.postprocess.multiple_inference import MULTIPLE_INFERENCE_VIEWS

        return list(MULTIPLE_INFERENCE_VIEWS) if self.tta_merge == "vote" else None

    @property
    def transforms(self):
        """Dihedral views whose maps are averaged: 8 with TTA by mean, else 1 (multiple inference
        votes over its views' instances instead)."""
        return 8 if self.tta and self.multiple_inference is None else 1


def engine_for(model, settings, patch=None, postprocess=None, stain=None):
    """The prediction engine over an in-memory model: evaluation predicts as ``kerasnuc.predict``
    does (one normalisation, TTA and Monte-Carlo loop), untiled on whole images. An instance
    model (boxes, scores, masks: Mask R-CNN) is tiled to its fixed input with the run's
    ``postprocess`` (score and mask thresholds, ``tile_margin``). ``stain``: the run's stored
    stain normaliser (``run.stain``), applied by the engine to the original images; training's
    held-out evaluation passes none, its records are normalised already (training.fit)."""
    from kerasnuc.predict.engine import Predictor
    from kerasnuc.predict.runtimes import KerasRuntime

    if len(model.outputs) == 3:
        from kerasnuc.runs import INSTANCE_MARGIN

        meta = {"task": "instance", "channels": settings.channels, "multiple": settings.multiple,
                "tile_margin": int((postprocess or {}).get("tile_margin", INSTANCE_MARGIN)),
                "postprocess": dict(postprocess or {}), "stain": stain or None}
        return Predictor(KerasRuntime(model=model, meta=meta))
    meta = {"channels": settings.channels, "multiple": settings.multiple, "patch": patch,
            "output_channels": int(model.output_shape[-1]), "stain": stain or None}
    return Predictor(KerasRuntime(model=model, meta=meta), tta=settings.transforms)


def predict_record(model, record, settings, engine=None):
    """Model maps of one image: {"mean": (H, W, K), "variance": (H, W, K) or None,
    "views": list or None, "passes": (S, H, W, K)}.

    ``settings.tta``: the 8 dihedral views, mapped back and averaged; with ``tta_merge ==
    "vote"`` (multiple inference) "mean" is the original view's and "view_outputs" the other
    views' [(k, maps in view k's orientation)] from the engine. ``settings.mc_samples`` > 1: that
    many stochastic passes (each with all its TTA views); "mean" is their mean, "variance" their
    variance.
    """
    engine = engine or engine_for(model, settings)
    if engine.task == "instance":  # detections -> labels in the engine; the foreground is the labels'
        labels = engine.predict_instances(record.image, multiple_inference=settings.multiple_inference or False)[0]
        mean = (labels > 0)[..., None].astype(np.float32)
        return {"mean": mean, "variance": None, "views": None, "passes": mean[None], "labels": labels}
    samples = max(1, settings.mc_samples)
    out = engine.predict_passes(record.image, tile=0, samples=samples)
    views = settings.multiple_inference
    if views is not None:
        out["view_outputs"] = engine.view_outputs(record.image, views[1:], tile=0, samples=samples)
    if out["passes"] is None:
        out["passes"] = out["mean"][None]
    return out


class Progress:
    """One line every ``every`` images (and at the last) with elapsed and remaining time."""

    def __init__(self, total, log, every=10, what="images"):
        self.total, self.log, self.every, self.what = total, log, max(1, int(every)), what
        self.started, self.done = time.time(), 0

    def step(self, name=""):
        self.done += 1
        if self.done % self.every == 0 or self.done == self.total:
            elapsed = time.time() - self.started
            left = elapsed / self.done * (self.total - self.done)
            self.log(f"  [{self.done}/{self.total} {self.what}] {elapsed:.0f}s elapsed, ~{left:.0f}s left"
                     + (f" (last: {name[:32]})" if name else ""))


def _mean_rows(rows, skip=("name",)):
    keys = [k for k, v in rows[0].items() if k not in skip and isinstance(v, (int, float))
            and not isinstance(v, bool)] if rows else []
    out = {}
    for k in keys:
        values = np.array([row[k] for row in rows if isinstance(row.get(k), (int, float))], np.float64)
        values = values[np.isfinite(values)]
        out[k] = float(values.mean()) if values.size else None
    return out


def _prf(tp, fp, fn):
    precision = tp / (tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0)
    recall = tp / (tp + fn) if tp + fn else (1.0 if fp == 0 else 0.0)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return float(precision), float(recall), float(f1)


def _picks(values):
    """Indices of the best, median and worst value (distinct, at most 3)."""
    order = list(np.argsort(np.asarray(values, dtype=np.float64), kind="stable"))
    picks = [order[-1], order[len(order) // 2], order[0]] if order else []
    seen, out = set(), []
    for p in picks:
        if p not in seen:
            seen.add(p)
            out.append(int(p))
    return out


# ---------------------------------------------------------------------------- segmentation

ENTROPY_BINS = 10


def evaluate_segmentation(records, predict, params, settings, log, progress_every=10):
    """Score instances against the truth. ``predict(record)`` -> :func:`predict_record`'s dict.

    Returns (metrics, artifacts): metrics has per_image, mean, pooled (and uncertainty for
    MC models); artifacts keep what the figures need.
    """
    from kerasnuc import metrics
    from kerasnuc.predict.postprocess import foreground
    from kerasnuc.predict.postprocess import instances as instances_of  # watershed or embedding clustering
    from kerasnuc.predict.postprocess import multiple_inference_instances

    missing = [r.name for r in records if r.labels is None]
    if missing:
        raise EvaluationError(f"{len(missing)} image(s) have no instance labels to score a segmentation "
                              f"against (e.g. {missing[0]})")
    stochastic = settings.mc_samples > 1
    per_image, instances, fg_means, variances = [], [], [], []
    pooled = {"true": 0, "pred": 0, "inter": 0, "tp": 0, "fp": 0, "fn": 0,
              "tp_dice02": 0, "fp_dice02": 0, "fn_dice02": 0}
    ua_counts = {"entropy": np.zeros(4, np.int64), "variance": np.zeros(4, np.int64)}
    bins = np.linspace(0.0, np.log(2.0), ENTROPY_BINS + 1)
    hist_pixels, hist_errors = np.zeros(ENTROPY_BINS, np.int64), np.zeros(ENTROPY_BINS, np.int64)
    progress = Progress(len(records), log, progress_every)
    for record in records:
        maps = predict(record)
        mean = maps["mean"]
        if maps.get("labels") is not None:  # an instance model's engine gave the nuclei
            predicted = maps["labels"]
        elif maps.get("view_outputs") is not None:  # NucSeg's multiple inference, as the engine's blocks do it
            predicted = multiple_inference_instances(mean, maps["view_outputs"],
                                                     lambda output: instances_of(output, params), iou=VOTE_IOU,
                                                     vote=VOTE_FRACTION)
        else:
            predicted = instances_of(mean, params)
        row = {"name": record.name, **metrics.segmentation_report(record.labels, predicted)}
        truth, pred_fg = record.labels > 0, predicted > 0
        pooled["true"] += int(truth.sum())
        pooled["pred"] += int(pred_fg.sum())
        pooled["inter"] += int((truth & pred_fg).sum())
        for k in ("tp", "fp", "fn", "tp_dice02", "fp_dice02", "fn_dice02"):
            pooled[k] += int(row[k])
        fg_mean = foreground(mean, params)
        if stochastic:
            fg_passes = np.stack([foreground(p, params) for p in maps["passes"]])
            variance = fg_passes.var(axis=0)
            entropy = metrics.predictive_entropy(fg_mean)
            for name, unc in (("entropy", entropy), ("variance", variance)):
                ua = metrics.uncertainty_accuracy(truth, fg_mean, unc, threshold=params["threshold"])
                row[f"ua_{name}"] = ua["ua"]
                ua_counts[name] += [ua["n_correct_certain"], ua["n_correct_uncertain"],
                                    ua["n_incorrect_certain"], ua["n_incorrect_uncertain"]]
            row["mean_entropy"] = float(entropy.mean())
            row["mean_variance"] = float(variance.mean())
            error = (fg_mean > params["threshold"]) != truth
            which = np.clip(np.digitize(entropy.ravel(), bins) - 1, 0, ENTROPY_BINS - 1)
            hist_pixels += np.bincount(which, minlength=ENTROPY_BINS)
            hist_errors += np.bincount(which, weights=error.ravel(), minlength=ENTROPY_BINS).astype(np.int64)
            variances.append(variance.astype(np.float16))
        per_image.append(row)
        instances.append(predicted)
        fg_means.append(fg_mean.astype(np.float16))
        progress.step(record.name)

    precision, recall, f1 = _prf(pooled["tp"], pooled["fp"], pooled["fn"])
    precision02, recall02, f1_02 = _prf(pooled["tp_dice02"], pooled["fp_dice02"], pooled["fn_dice02"])
    union = pooled["true"] + pooled["pred"] - pooled["inter"]
    both = pooled["true"] + pooled["pred"]
    pooled_metrics = {
        "dice": 1.0 if both == 0 else 2 * pooled["inter"] / both,
        "iou": 1.0 if union == 0 else pooled["inter"] / union,
        "tp": pooled["tp"], "fp": pooled["fp"], "fn": pooled["fn"],
        "precision": precision, "recall": recall, "f1": f1,
        "tp_dice02": pooled["tp_dice02"], "fp_dice02": pooled["fp_dice02"], "fn_dice02": pooled["fn_dice02"],
        "precision_dice02": precision02, "recall_dice02": recall02, "f1_dice02": f1_02,
    }
    result = {"per_image": per_image, "mean": _mean_rows(per_image), "pooled": pooled_metrics}
    if stochastic:
        uncertainty = {}
        for name, (cc, cu, ic, iu) in ua_counts.items():
            total = cc + cu + ic + iu
            uncertainty[f"ua_{name}_pooled"] = float((cc + iu) / total) if total else None
            uncertainty[f"{name}_counts"] = {"correct_certain": int(cc), "correct_uncertain": int(cu),
                                            "incorrect_certain": int(ic), "incorrect_uncertain": int(iu)}
        uncertainty["error_by_entropy"] = {
            "bin_edges": bins.tolist(), "pixels": hist_pixels.tolist(), "errors": hist_errors.tolist(),
            "error_rate": [float(e / p) if p else None for e, p in zip(hist_errors, hist_pixels)]}
        result["uncertainty"] = uncertainty
    artifacts = {"instances": instances, "fg_means": fg_means, "variances": variances or None,
                 "picks": _picks([row["aji"] for row in per_image])}
    return result, artifacts


# ---------------------------------------------------------------------------- detection

DETECTION_SWEEP = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def evaluate_detection(records, predict, params, radius, log, progress_every=10, sweep=DETECTION_SWEEP):
    """Centres from density maps (``predict(record)`` -> dict with "mean" (H, W, 1)) against the
    records' points (or label centroids), matched within ``radius`` pixels.

    ``params``: threshold, min_distance (and any other keyword) of :func:`centroids_from_density`,
    as thresholds.json stores them. Also sweeps the
    threshold (pooled P/R/F1 per value) for the precision-recall figure.
    """
    from kerasnuc.data.pipeline import record_points
    from kerasnuc.metrics import detection_scores
    from kerasnuc.postprocess import centroids_from_density

    peak_keys = ("threshold", "min_distance", "exclude_border", "refine", "refine_radius")
    params = {k: v for k, v in params.items() if k in peak_keys}
    sweep = sorted(set(float(t) for t in sweep) | {float(params["threshold"])})
    sweep_counts = np.zeros((len(sweep), 3), np.int64)
    per_image, true_points, pred_points = [], [], []
    progress = Progress(len(records), log, progress_every)
    for record in records:
        try:
            truth = record_points(record)
        except ValueError as error:
            raise EvaluationError(str(error)) from None
        density = np.asarray(predict(record)["mean"], np.float32)
        density = density[..., 0] if density.ndim == 3 else density
        found = centroids_from_density(density, **params)
        scores = detection_scores(truth, found, radius)
        per_image.append({"name": record.name, "n_true": len(truth), "n_pred": len(found), **scores})
        for i, threshold in enumerate(sweep):
            points = found if threshold == float(params["threshold"]) else centroids_from_density(
                density, **{**params, "threshold": threshold})
            s = detection_scores(truth, points, radius)
            sweep_counts[i] += [s["tp"], s["fp"], s["fn"]]
        true_points.append(truth)
        pred_points.append(found)
        progress.step(record.name)
    tp, fp, fn = (int(sum(row[k] for row in per_image)) for k in ("tp", "fp", "fn"))
    precision, recall, f1 = _prf(tp, fp, fn)
    distances = [row["mean_distance"] * row["tp"] for row in per_image if row["tp"]]
    pooled = {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1,
              "radius": float(radius),
              "mean_distance": float(sum(distances) / tp) if tp else None}
    curve = []
    for threshold, (t, f, n) in zip(sweep, sweep_counts):
        p, r, f1_t = _prf(int(t), int(f), int(n))
        curve.append({"threshold": threshold, "precision": p, "recall": r, "f1": f1_t})
    result = {"per_image": per_image, "mean": _mean_rows(per_image, skip=("name", "radius")),
              "pooled": pooled, "threshold_sweep": curve}
    artifacts = {"true_points": true_points, "pred_points": pred_points,
                 "picks": _picks([row["f1"] for row in per_image])}
    return result, artifacts


# ---------------------------------------------------------------------------- classification

def evaluate_classification(records, classify, class_names=None,
                            num_classes=None, log=print, progress_every=10):
    """Classify patches centred on the records' classified nuclei and score them.

    ``classify(image, points)`` -> (N, K) probabilities: the engine's
    :meth:`kerasnuc.predict.Predictor.classify` (patches normalised with the whole image's
    range, as in training). Images
    without classified nuclei are skipped (counted in ``skipped_images``).
    """
    from kerasnuc.data.pipeline import classified_points
    from kerasnuc.metrics import classification_report

    y_true, y_score, owner, per_image, skipped = [], [], [], [], []
    progress = Progress(len(records), log, progress_every)
    for index, record in enumerate(records):
        points, classes = classified_points(record)
        if len(points) == 0:
            skipped.append(record.name)
            progress.step(record.name)
            continue
        scores = np.asarray(classify(record.image, points), np.float64)
        if scores.shape[0] != len(points) or scores.ndim != 2:
            raise EvaluationError(f"{record.name}: classifier returned {scores.shape} for {len(points)} patches")
        predicted = scores.argmax(axis=1)
        per_image.append({"name": record.name, "n": int(len(points)),
                          "accuracy": float(np.mean(predicted == classes))})
        y_true.append(classes)
        y_score.append(scores)
        owner.append(np.full(len(points), index))
        progress.step(record.name)
    if not y_true:
        raise EvaluationError("no classified nuclei in these images (need record.classes and "
                              "extra['class_points'] or points)")
    y_true, y_score = np.concatenate(y_true), np.concatenate(y_score)
    num_classes = int(num_classes or y_score.shape[1])
    if y_score.shape[1] != num_classes:
        raise EvaluationError(f"model gives {y_score.shape[1]} class scores, data has {num_classes} classes")
    if class_names is not None and len(class_names) != num_classes:
        class_names = None
    if y_true.max() >= num_classes:
        raise EvaluationError(f"data has class index {int(y_true.max())} but the model only {num_classes} classes")
    report = classification_report(y_true, y_score.argmax(axis=1), num_classes=num_classes,
                                   class_names=class_names, y_score=y_score)
    for row, start in zip(per_image, np.cumsum([0] + [r["n"] for r in per_image])):
        yt = y_true[start:start + row["n"]]
        yp = y_score[start:start + row["n"]].argmax(axis=1)
        row["macro_f1"] = classification_report(yt, yp, num_classes=num_classes)["macro_f1"]
    pooled = {k: report[k] for k in ("accuracy", "macro_f1", "weighted_f1", "macro_roc_auc",
                                     "macro_average_precision", "n")}
    result = {"per_image": per_image, "mean": _mean_rows(per_image), "pooled": pooled,
              "per_class": report["per_class"], "confusion_matrix": report["confusion_matrix"],
              "class_names": [c["name"] for c in report["per_class"]], "skipped_images": skipped}
    artifacts = {"y_true": y_true, "y_score": y_score}
    return result, artifacts


# ---------------------------------------------------------------------------- putting it together

def default_out(run, data=None, split="test", tta=False, tta_merge="mean"):
    name = dataset_name(data) if data else split
    suffix = ("-tta-vote" if tta_merge == "vote" else "-tta") if tta else ""
    return os.path.join(run.path, f"eval-{name}{suffix}")


def evaluate_run(run_dir, data=None, split="test", tta=False, mc_samples=None, out=None,
                 tta_merge="mean", progress_every=10, limit=None, log=None, policy=None, skip_bad=False,
                 multiple_inference=False):
    """Evaluate ``run_dir``'s model; returns the metrics dict that is also written to
    ``out/metrics.json`` (with ``out``/``report`` keys giving where everything went).

    ``data``: a dataset spec to evaluate on instead of the run's ``split`` ("test" or "val").
    ``tta``: average the 8 dihedral views; ``tta_merge="vote"`` or ``multiple_inference``
    (segmentation) is NucSeg's multiple inference instead: 7 views, each view's instances mapped
    back, the original's nuclei kept by a pixel majority of their matches at IoU > 0.2
    (:mod:`kerasnuc.postprocess.multiple_inference`). ``mc_samples``: stochastic
    passes for MC-dropout models (default: config.json's mc_samples; ignored otherwise).
    ``out``: default ``RUN/eval-<split or dataset>[-tta|-tta-vote]/``. ``limit``: only the
    first ``limit`` images (a quick look; recorded in the options). ``policy``: the
    :class:`~kerasnuc.data.validation.InputPolicy` for reading the images (default: the run's,
    as training read them). ``skip_bad``: leave out unreadable or invalid inputs and list them
    (file and reason) in metrics.json's ``skipped_inputs`` and report.md; otherwise the first
    one stops the evaluation with an error naming the file, before anything is written.
    """
    log = log or (lambda message: print(message, flush=True))
    started = time.time()
    if split not in SPLITS and not data:
        raise EvaluationError(f"split must be one of {SPLITS}, got '{split}'")
    if tta_merge not in TTA_MERGES:
        raise EvaluationError(f"tta_merge must be one of {TTA_MERGES}, got '{tta_merge}'")
    if multiple_inference:
        tta_merge = "vote"
    if tta_merge == "vote":
        tta = True
    if mc_samples is not None and int(mc_samples) < 1:
        raise EvaluationError(f"mc_samples must be at least 1, got {mc_samples}")
    run = load_run(run_dir)
    task = run.task
    if tta_merge == "vote" and task not in ("segmentation", "instance"):
        raise EvaluationError(f"--tta-merge vote merges instances: segmentation runs only (this run: {task})")
    skipped = [] if skip_bad else None
    policy = policy or run_policy(run)
    records, description = select_records(run, data, split, policy, skipped)
    if skipped:
        log(f"skipped {len(skipped)} bad input{'s' if len(skipped) > 1 else ''}: "
            + "; ".join(entry["error"] for entry in skipped[:5]) + ("; ..." if len(skipped) > 5 else ""))
    if limit:
        records = records[:int(limit)]
    out = os.path.abspath(out or default_out(run, data, split, tta, tta_merge))

    from kerasnuc import __version__, models
    from kerasnuc.runs import RunError, read_keras_file

    try:  # the one .keras reader: a damaged file is called corrupt, not "not found"
        model = read_keras_file(os.path.join(run.path, "model.keras"))
    except RunError as error:
        raise EvaluationError(str(error)) from None
    stochastic = models.is_stochastic(model)
    requested = int(mc_samples) if mc_samples is not None else int(run.config.get("mc_samples") or 1)
    passes = requested if stochastic else 1
    if mc_samples and int(mc_samples) > 1 and not stochastic:
        log(f"note: {run.config['model']} has no Monte-Carlo dropout; --mc-samples {mc_samples} ignored (1 pass)")
    channels = int(run.config.get("channels") or 3)
    settings = Settings(channels=channels, multiple=model_multiple(run.config), tta=bool(tta),
                        tta_merge=tta_merge, mc_samples=passes)
    what = f"split '{split}'" if not data else f"dataset {data}"
    log(f"evaluating {run.path} ({task}, {run.config['model']}) on {what}: {len(records)} images, "
        f"{('multiple inference (7 views, anchored vote)' if tta_merge == 'vote' else 'TTA 8 views') if tta else 'no TTA'}, "
        f"{passes} pass{'es' if passes > 1 else ''}{' (MC dropout)' if stochastic else ''}")

    engine = engine_for(model, settings, postprocess=postprocess_of(run.thresholds) if task == "instance" else None,
                        stain=run.stain)

    def predict(record):
        return predict_record(model, record, settings, engine)

    options = {"tta": bool(tta), "tta_transforms": settings.multiple_inference or settings.transforms,
               "tta_merge": tta_merge if tta else None, "mc_samples": passes, "stochastic": stochastic,
               "channels": channels, "input_multiple": settings.multiple, "limit": int(limit) if limit else None,
               "input_policy": policy.to_dict(), "skip_bad": bool(skip_bad)}
    if task in ("segmentation", "instance"):
        params = postprocess_of(run.thresholds)
        if not params:
            raise EvaluationError(f"{run.path}/thresholds.json: no 'postprocess' entry")
        if tta_merge == "vote":
            options.update({"multiple_inference": settings.multiple_inference, "vote_iou": VOTE_IOU,
                            "vote_fraction": VOTE_FRACTION})
        options["postprocess"] = params
        metrics, artifacts = evaluate_segmentation(records, predict, params, settings, log, progress_every)
    elif task == "detection":
        params = postprocess_of(run.thresholds)
        if "threshold" not in params or "min_distance" not in params:
            raise EvaluationError(f"{run.path}/thresholds.json: no 'postprocess' entry with threshold and "
                                  "min_distance")
        radius = float(run.thresholds.get("match_radius") or run.config.get("match_radius") or 6.0)
        options.update({"detection": params, "match_radius": radius})
        metrics, artifacts = evaluate_detection(records, predict, params, radius, log, progress_every)
    elif task == "classification":
        patch = int(run.config.get("patch") or 32)
        fixed = tuple(model.input_shape[1:3])
        if all(fixed) and fixed != (patch, patch):
            log(f"note: model input is {fixed}, config patch {patch}; using the model's")
            patch = int(fixed[0])
        names = next((tuple(r.class_names) for r in records if r.class_names), None)
        options["patch"] = patch
        engine = engine_for(model, settings, patch, stain=run.stain)
        metrics, artifacts = evaluate_classification(
            records, lambda image, points: engine.classify(image, points, batch_size=128, samples=passes),
            class_names=names, num_classes=int(model.output_shape[-1]), log=log,
            progress_every=progress_every)
    else:
        raise EvaluationError(f"{run.path}/config.json: unknown task '{task}'")

    result = _finite({
        "run": run.path, "task": task, "model": run.config["model"], "model_config": run.config.get("model_config"),
        "parameters": int(model.count_params()), **description, "images": len(records), "options": options,
        **metrics, "skipped_inputs": skipped or [],
        "seconds": round(time.time() - started, 1), "kerasnuc_version": __version__,
        "evaluated_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    })
    _write_outputs(out, result, records, artifacts, log)
    result["seconds"] = round(time.time() - started, 1)
    return result


def _finite(value):
    """NaN/inf -> None throughout (metrics.json stays strict JSON); NumPy scalars -> Python."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _write_outputs(out, result, records, artifacts, log):
    """Figures, metrics.json and report.md into a temporary folder, then renamed to ``out``."""
    from training import report
    from training.rundir import write_json_atomic

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        figures = report.make_figures(tmp, result, records, artifacts)
        result["figures"] = [name for name, _ in figures]
        result["out"] = out
        write_json_atomic(os.path.join(tmp, "metrics.json"), result)
        report.write_report(os.path.join(tmp, "report.md"), result, figures)
        _append_skipped(os.path.join(tmp, "report.md"), result.get("skipped_inputs"))
        old = None
        if os.path.exists(out):
            old = os.path.join(parent, f".{os.path.basename(out)}.old{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result["report"] = os.path.join(out, "report.md")
    log(f"wrote {out}/: metrics.json, report.md" + (", " + ", ".join(result["figures"]) if result["figures"] else ""))
    log("summary: " + summary_line(result))


def _append_skipped(report_path, skipped):
    """A 'Skipped inputs' section (file and reason of each) at the end of report.md."""
    if not skipped:
        return
    lines = ["", "## Skipped inputs", "", f"{len(skipped)} input{'s were' if len(skipped) > 1 else ' was'} "
             "left out as unreadable or invalid (--skip-bad):", "", "| file | reason |", "|---|---|"]
    for entry in skipped:
        reason = entry["error"]
        reason = reason[len(entry["file"]) + 2:] if reason.startswith(entry["file"] + ": ") else reason
        lines.append(f"| {entry['file']} | {reason.replace('|', '/')} |")
    with open(report_path, "a") as handle:
        handle.write("\n".join(lines) + "\n")


def summary_line(result):
    """'aji 0.512 (mean), dice 0.801 (mean), f1 0.63 (pooled)...' for the task's headline metrics."""
    keys = {"segmentation": (("mean", "dice"), ("mean", "aji"), ("mean", "pq"), ("mean", "f1"),
                             ("pooled", "dice")),
            "detection": (("pooled", "precision"), ("pooled", "recall"), ("pooled", "f1"), ("mean", "f1")),
            "classification": (("pooled", "accuracy"), ("pooled", "macro_f1"), ("pooled", "weighted_f1"),
                               ("pooled", "macro_roc_auc"))}
    keys["instance"] = keys["segmentation"]
    keys = keys[result["task"]]
    parts = [f"{key} {result[where][key]:.4f} ({where})" for where, key in keys
             if isinstance(result.get(where, {}).get(key), (int, float))]
    for key in ("ua_entropy_pooled", "ua_variance_pooled"):
        value = result.get("uncertainty", {}).get(key)
        if isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
    return ", ".join(parts)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished training.fit run folder")
    parser.add_argument("--split", choices=SPLITS, default=None,
                        help="which of the run's held-out splits to score (default: test)")
    parser.add_argument("--data", metavar="SPEC",
                        help="evaluate on every image of this dataset instead, e.g. "
                             "dsb2018:../shared/data/dsb2018/stage1_test")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average the 8 dihedral views (8x the passes)")
    parser.add_argument("--tta-merge", choices=TTA_MERGES, default="mean", dest="tta_merge",
                        help="segmentation: 'mean' thresholds the averaged probabilities; 'vote' is "
                             "--multiple-inference; implies --tta")
    parser.add_argument("--multiple-inference", action="store_true", dest="multiple_inference",
                        help="NucSeg's multiple inference: 7 rotated/flipped views, each view's nuclei mapped back, "
                             "the original's nuclei kept by a pixel majority of their matches (IoU > 0.2)")
    parser.add_argument("--mc-samples", type=int, dest="mc_samples", metavar="T",
                        help="stochastic passes for Monte-Carlo dropout models (default: the run's config)")
    parser.add_argument("--out", help="output folder (default RUN_DIR/eval-<split or dataset>[-tta])")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N images (a quick look)")
    parser.add_argument("--progress-every", type=int, default=10, dest="progress_every", metavar="N",
                        help="print a progress line every N images (default 10)")
    validation.add_arguments(parser, labels=True, skip_bad=True, default_note=", or the run's")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.data and args.split:
        sys.exit("training.evaluate: give --split or --data, not both")
    try:
        run = load_run(args.run_dir)
        evaluate_run(args.run_dir, data=args.data, split=args.split or "test", tta=args.tta,
                     mc_samples=args.mc_samples, out=args.out, tta_merge=args.tta_merge,
                     multiple_inference=args.multiple_inference,
                     progress_every=args.progress_every, limit=args.limit,
                     policy=run_policy(run, **validation.policy_overrides(args)), skip_bad=args.skip_bad)
    except EvaluationError as error:
        sys.exit(f"training.evaluate: {error}")
    return 0


if __name__ == "__main__":
    main()
