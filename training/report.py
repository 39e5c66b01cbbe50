"""Figures and a readable Markdown report for ``python -m training.evaluate``.

:func:`make_figures` draws the task's figures into a folder and returns ``(file, caption)``
pairs; :func:`write_report` writes ``report.md`` with the run, data, options, metric tables
and links to exactly those figures.
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from training import plots  # noqa: E402

TRUE_COLOUR, PRED_COLOUR = "#00c000", "#e00000"


def _display(image):
    """uint8 RGB for display (grey repeated), contrast-stretched like the overlays."""
    rgb = image if image.shape[-1] == 3 else np.repeat(image, 3, axis=-1)
    low, high = np.percentile(rgb, (0.5, 99.5))
    return np.clip((rgb.astype(np.float32) - low) / max(high - low, 1) * 255, 0, 255).astype(np.uint8)


def _short(name, n=16):
    return name if len(name) <= n else name[:n - 1] + "…"


def _save(fig, out_dir, name):
    fig.savefig(os.path.join(out_dir, name), dpi=100, bbox_inches="tight")
    plt.close(fig)
    return name


# ---------------------------------------------------------------------------- segmentation

def segmentation_figures(out_dir, result, records, artifacts):
    figures = []
    rows, picks = result["per_image"], artifacts["picks"]
    if picks:
        panels = [plots.overlay(records[i].image, records[i].labels, artifacts["instances"][i]) for i in picks]
        titles = [f"{_short(records[i].name, 14)} AJI {rows[i]['aji']:.2f}" for i in picks]
        plots.save_overlays(panels, os.path.join(out_dir, "overlays.png"), titles)
        figures.append(("overlays.png", "Best, median and worst image by AJI: truth outlines green, "
                                        "predicted outlines magenta."))
    keys = [k for k in ("dice", "aji", "aji_plus", "pq", "f1") if k in rows[0]] if rows else []
    if len(rows) > 1 and keys:
        fig, ax = plt.subplots(figsize=(1.3 * len(keys) + 2, 3.5))
        data = [[row[k] for row in rows] for k in keys]
        ax.boxplot(data, showfliers=False)
        rng = np.random.default_rng(0)
        for i, values in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=10, alpha=0.6, color="tab:blue")
        ax.set_xticks(range(1, len(keys) + 1), keys)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"per-image scores ({len(rows)} images)")
        figures.append((_save(fig, out_dir, "per_image.png"), "Per-image Dice, AJI, AJI+, PQ and object F1."))
    if artifacts.get("variances") is not None:
        figures += uncertainty_figures(out_dir, result, records, artifacts)
    return figures


def uncertainty_figures(out_dir, result, records, artifacts):
    """MC-dropout: image, prediction, variance, predictive entropy and errors per picked image;
    error rate against entropy over all pixels."""
    from kerasnuc.metrics import predictive_entropy

    figures = []
    threshold = result["options"]["postprocess"]["threshold"]
    picks = artifacts["picks"]
    fig, axes = plt.subplots(len(picks), 5, figsize=(16, 3.3 * len(picks)), squeeze=False)
    for row_axes, i in zip(axes, picks):
        record, mean = records[i], artifacts["fg_means"][i].astype(np.float32)
        variance = artifacts["variances"][i].astype(np.float32)
        entropy = predictive_entropy(mean)
        error = (mean > threshold) != (record.labels > 0)
        row = result["per_image"][i]
        panels = [(_display(record.image), _short(record.name), None),
                  (mean, f"mean probability (AJI {row['aji']:.2f})", "viridis"),
                  (variance, f"MC variance (mean {row['mean_variance']:.3g})", "magma"),
                  (entropy, f"predictive entropy (UA {row['ua_entropy']:.2f})", "magma"),
                  (error, f"errors at threshold {threshold}", "gray")]
        for ax, (image, title, cmap) in zip(row_axes, panels):
            shown = ax.imshow(image, cmap=cmap, interpolation="nearest")
            if cmap in ("viridis", "magma"):
                fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.suptitle(f"Monte-Carlo dropout, {result['options']['mc_samples']} passes", fontsize=11)
    figures.append((_save(fig, out_dir, "uncertainty.png"),
                    "Uncertainty maps (best, median, worst image by AJI): image, MC mean probability, "
                    "variance, predictive entropy and wrong pixels."))
    hist = result["uncertainty"]["error_by_entropy"]
    pixels = np.array(hist["pixels"], np.float64)
    if pixels.sum():
        edges = np.array(hist["bin_edges"])
        centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        rate = np.array([r if r is not None else np.nan for r in hist["error_rate"]], np.float64)
        fig, ax = plt.subplots(figsize=(6, 3.8))
        ax.bar(centres, pixels / pixels.sum(), width=width * 0.9, color="lightgray", label="share of pixels")
        ax.plot(centres, rate, "o-", color="tab:red", label="error rate")
        ax.set_xlabel("predictive entropy (nats)")
        ax.set_ylim(0, 1)
        ax.set_title("pixel error rate against uncertainty (all images)")
        ax.legend(loc="upper left")
        figures.append((_save(fig, out_dir, "uncertainty_vs_error.png"),
                        "Error rate of pixels binned by predictive entropy; a useful uncertainty rises "
                        "from left to right."))
    return figures


# ---------------------------------------------------------------------------- detection

def detection_figures(out_dir, result, records, artifacts):
    figures = []
    radius = result["options"]["match_radius"]
    picks, rows = artifacts["picks"], result["per_image"]
    if picks:
        fig, axes = plt.subplots(1, len(picks), figsize=(5.5 * len(picks), 5.5), squeeze=False)
        for ax, i in zip(axes[0], picks):
            truth, found = artifacts["true_points"][i], artifacts["pred_points"][i]
            ax.imshow(_display(records[i].image))
            if len(truth):
                ax.scatter(truth[:, 0], truth[:, 1], s=28, facecolors="none", edgecolors=TRUE_COLOUR,
                           linewidths=1.2, label=f"truth ({len(truth)})")
            if len(found):
                ax.scatter(found[:, 0], found[:, 1], s=9, color=PRED_COLOUR, label=f"predicted ({len(found)})")
            ax.set_title(f"{_short(records[i].name)}  P {rows[i]['precision']:.2f} R {rows[i]['recall']:.2f} "
                         f"F1 {rows[i]['f1']:.2f}", fontsize=10)
            ax.legend(loc="upper right", fontsize=8)
            ax.axis("off")
        figures.append((_save(fig, out_dir, "detections.png"),
                        "Best, median and worst image by F1: true centres green, predicted centres red."))
    curve = result.get("threshold_sweep") or []
    if curve:
        threshold = result["options"]["detection"]["threshold"]
        t = [c["threshold"] for c in curve]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for key in ("precision", "recall", "f1"):
            left.plot(t, [c[key] for c in curve], "o-", ms=3, label=key)
        left.axvline(threshold, color="gray", ls="--", label=f"tuned threshold {threshold:g}")
        left.set_xlabel("density peak threshold")
        left.set_ylim(0, 1.02)
        left.legend()
        left.set_title(f"pooled P/R/F1, match radius {radius:g} px")
        right.plot([c["recall"] for c in curve], [c["precision"] for c in curve], "o-", ms=3)
        pooled = result["pooled"]
        right.plot(pooled["recall"], pooled["precision"], "*", ms=14, color="tab:red",
                   label=f"operating point F1 {pooled['f1']:.3f}")
        right.set_xlabel("recall")
        right.set_ylabel("precision")
        right.set_xlim(0, 1.02)
        right.set_ylim(0, 1.02)
        right.legend(loc="lower left")
        right.set_title("precision-recall over thresholds")
        figures.append((_save(fig, out_dir, "detection_pr.png"),
                        f"Pooled precision, recall and F1 against the peak threshold, matching radius "
                        f"{radius:g} px."))
    if len(rows) > 1:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        data = [[row[k] for row in rows] for k in ("precision", "recall", "f1")]
        ax.boxplot(data, showfliers=False)
        for i, values in enumerate(data, start=1):
            ax.scatter(np.full(len(values), i) + np.linspace(-0.1, 0.1, len(values)), values, s=10, alpha=0.6)
        ax.set_xticks([1, 2, 3], ["precision", "recall", "F1"])
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"per-image detection scores (radius {radius:g} px)")
        figures.append((_save(fig, out_dir, "per_image.png"), "Per-image precision, recall and F1."))
    return figures


# ---------------------------------------------------------------------------- classification

def classification_figures(out_dir, result, records, artifacts):
    from sklearn.metrics import precision_recall_curve, roc_curve

    figures = []
    names = result["class_names"]
    y_true, y_score = artifacts["y_true"], artifacts["y_score"]
    cm = np.array(result["confusion_matrix"], np.float64)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    normalised = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    for ax, matrix, title, fmt in ((axes[0], cm, "counts", "{:.0f}"),
                                   (axes[1], normalised, "share of each true class", "{:.2f}")):
        ax.imshow(matrix, cmap="Blues")
        for (r, c), value in np.ndenumerate(matrix):
            ax.text(c, r, fmt.format(value), ha="center", va="center",
                    color="white" if value > matrix.max() / 2 else "black", fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"confusion matrix ({title})")
    fig.tight_layout()
    figures.append((_save(fig, out_dir, "confusion_matrix.png"),
                    "Confusion matrix: rows true class, columns predicted class."))

    fig_roc, ax_roc = plt.subplots(figsize=(5.5, 5))
    fig_pr, ax_pr = plt.subplots(figsize=(5.5, 5))
    for k, name in enumerate(names):
        positive = y_true == k
        entry = result["per_class"][k]
        if positive.any() and not positive.all():
            fpr, tpr, _ = roc_curve(positive, y_score[:, k])
            ax_roc.plot(fpr, tpr, label=f"{name} (AUC {entry.get('roc_auc') or float('nan'):.3f})")
        if positive.any():
            precision, recall, _ = precision_recall_curve(positive, y_score[:, k])
            ax_pr.plot(recall, precision, label=f"{name} (AP {entry.get('average_precision') or float('nan'):.3f})")
    ax_roc.plot([0, 1], [0, 1], ls="--", color="gray", lw=0.8)
    ax_roc.set_xlabel("false positive rate")
    ax_roc.set_ylabel("true positive rate")
    ax_roc.set_title("ROC, one class against the rest")
    ax_roc.legend(loc="lower right", fontsize=8)
    ax_pr.set_xlabel("recall")
    ax_pr.set_ylabel("precision")
    ax_pr.set_xlim(0, 1.02)
    ax_pr.set_ylim(0, 1.02)
    ax_pr.set_title("precision-recall, one class against the rest")
    ax_pr.legend(loc="lower left", fontsize=8)
    figures.append((_save(fig_roc, out_dir, "roc.png"), "ROC curve per class (one against the rest)."))
    figures.append((_save(fig_pr, out_dir, "precision_recall.png"), "Precision-recall curve per class."))

    fig, ax = plt.subplots(figsize=(1.5 * len(names) + 2, 3.8))
    x = np.arange(len(names))
    for offset, key in zip((-0.25, 0, 0.25), ("precision", "recall", "f1")):
        ax.bar(x + offset, [c[key] for c in result["per_class"]], width=0.25, label=key)
    ax.set_xticks(x, [f"{c['name']}\n(n={c['support']})" for c in result["per_class"]])
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title(f"per-class scores, macro F1 {result['pooled']['macro_f1']:.3f}")
    figures.append((_save(fig, out_dir, "per_class_f1.png"), "Precision, recall and F1 per class."))
    return figures


def make_figures(out_dir, result, records, artifacts):
    """Draw the task's figures into ``out_dir``; returns [(file name, caption)]."""
    draw = {"segmentation": segmentation_figures, "instance": segmentation_figures, "detection": detection_figures,
            "classification": classification_figures}[result["task"]]
    return draw(out_dir, result, records, artifacts)


# ---------------------------------------------------------------------------- report.md

METRIC_NOTES = {
    "dice": "pixel Dice of the foreground", "iou": "pixel IoU of the foreground",
    "aji": "aggregated Jaccard index", "aji_plus": "AJI+ (one-to-one matching)",
    "pq": "panoptic quality", "dq": "detection quality (F1 at IoU > 0.5)", "sq": "segmentation quality",
    "precision": "object precision", "recall": "object recall", "f1": "object F1",
    "mean_matched_iou": "mean IoU of matched nuclei", "f1_dice02": "object F1 at Dice > 0.2",
    "precision_dice02": "object precision at Dice > 0.2", "recall_dice02": "object recall at Dice > 0.2",
    "tp_dice02": "true positives at Dice > 0.2", "fp_dice02": "false positives at Dice > 0.2",
    "fn_dice02": "false negatives at Dice > 0.2",
    "tp": "true positives", "fp": "false positives", "fn": "false negatives",
    "n_true": "true nuclei", "n_pred": "predicted nuclei", "mean_distance": "mean matched distance (px)",
    "ua_entropy": "uncertainty accuracy (entropy)", "ua_variance": "uncertainty accuracy (variance)",
    "mean_entropy": "mean predictive entropy (nats)", "mean_variance": "mean MC variance",
    "accuracy": "accuracy", "macro_f1": "macro F1", "weighted_f1": "support-weighted F1",
    "macro_roc_auc": "macro ROC AUC (one vs rest)", "macro_average_precision": "macro average precision",
    "n": "classified nuclei",
}


def _fmt(value):
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not np.isfinite(value):
            return "–"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(path, result, figures, max_rows=60):
    """report.md: what was evaluated, how, the scores and the figures (relative links)."""
    options = result["options"]
    lines = [f"# Evaluation of `{os.path.basename(result['run'])}`", ""]
    lines.append(f"- **Run:** `{result['run']}`")
    config = result.get("model_config") or {}
    lines.append(f"- **Task / model:** {result['task']}, `{result['model']}`"
                 + (f" {config}" if config else " (default configuration)")
                 + f", {result['parameters']:,} parameters")
    if result.get("split"):
        data = f"split `{result['split']}` of `{result['data']}`"
        if result.get("test_data"):
            data += f" (test images from `{result['test_data']}`)"
    else:
        data = f"every image of `{result['data']}`"
    lines.append(f"- **Data:** {data}: {result['images']} images"
                 + (f", stain-normalised ({result['stain']})" if result.get("stain") else ""))
    tta = "no" if not options["tta"] else f"yes, {options['tta_transforms']} dihedral views"
    if options.get("tta_merge") == "vote":
        tta = (f"multiple inference (NucSeg): dihedral views {options.get('multiple_inference')}, each view's "
               f"nuclei mapped back and matched to the original's at IoU > {options.get('vote_iou', 0.2)}, "
               f"pixels kept by more than {options.get('vote_fraction', 0.5):.0%} of the views")
    elif options["tta"]:
        tta += ", probabilities averaged"
    lines.append(f"- **Test-time augmentation:** {tta}")
    mc = (f"{options['mc_samples']} stochastic passes (MC dropout), mean and variance" if options["stochastic"]
          else "deterministic model, 1 pass")
    lines.append(f"- **Sampling:** {mc}")
    lines.append(f"- **Input:** {options['channels']} channel(s), min-max normalised per image, padded to a "
                 f"multiple of {options['input_multiple']}" if result["task"] != "classification" else
                 f"- **Input:** {options.get('patch')} px patches centred on each classified nucleus, "
                 f"{options['channels']} channel(s)")
    if "postprocess" in options:
        lines.append(f"- **Post-processing (tuned):** {options['postprocess']}")
    if "detection" in options:
        lines.append(f"- **Peak finding (tuned):** {options['detection']}; matching radius "
                     f"{options['match_radius']:g} px")
    lines.append(f"- **Evaluated:** {result['evaluated_at']}, {result['seconds']:.0f} s, kerasnuc "
                 f"{result['kerasnuc_version']}")
    lines.append("")

    lines += ["## Metrics", ""]
    mean, pooled = result.get("mean", {}), result.get("pooled", {})
    keys = list(dict.fromkeys([k for k in mean] + [k for k in pooled if k not in ("radius",)]))
    rows = [[f"{k}", METRIC_NOTES.get(k, ""), mean.get(k), pooled.get(k)] for k in keys]
    lines.append(_table(["metric", "what", "mean over images", "pooled"], rows))
    lines.append("")
    lines.append("*Mean over images* averages each image's score; *pooled* counts pixels or objects "
                 "over all images together.")
    lines.append("")
    if "uncertainty" in result:
        unc = result["uncertainty"]
        lines += ["### Uncertainty (Monte-Carlo dropout)", ""]
        lines.append(_table(["measure", "pooled uncertainty accuracy"],
                            [["predictive entropy", unc.get("ua_entropy_pooled")],
                             ["MC variance", unc.get("ua_variance_pooled")]]))
        lines.append("")
        lines.append("Uncertainty accuracy = (correct and certain + wrong and uncertain) / pixels; a pixel is "
                     "uncertain above its image's median uncertainty.")
        lines.append("")
    if "per_class" in result:
        lines += ["### Per class", ""]
        rows = [[c["name"], c["support"], c["precision"], c["recall"], c["f1"], c.get("roc_auc"),
                 c.get("average_precision")] for c in result["per_class"]]
        lines.append(_table(["class", "support", "precision", "recall", "F1", "ROC AUC", "AP"], rows))
        lines.append("")
        if result.get("skipped_images"):
            lines.append(f"{len(result['skipped_images'])} image(s) without classified nuclei were skipped.")
            lines.append("")
    if "threshold_sweep" in result:
        lines += ["### Peak threshold sweep (pooled)", ""]
        lines.append(_table(["threshold", "precision", "recall", "F1"],
                            [[c["threshold"], c["precision"], c["recall"], c["f1"]]
                             for c in result["threshold_sweep"]]))
        lines.append("")

    per_image = result.get("per_image", [])
    if per_image:
        columns = {"segmentation": ("dice", "aji", "pq", "f1", "n_true", "n_pred", "ua_entropy"),
                   "instance": ("dice", "aji", "pq", "f1", "n_true", "n_pred"),
                   "detection": ("precision", "recall", "f1", "n_true", "n_pred"),
                   "classification": ("n", "accuracy", "macro_f1")}[result["task"]]
        columns = [c for c in columns if c in per_image[0]]
        lines += [f"## Per image ({len(per_image)})", ""]
        shown = per_image[:max_rows]
        lines.append(_table(["image"] + list(columns),
                            [[f"`{_short(row['name'], 24)}`"] + [row.get(c) for c in columns] for row in shown]))
        if len(per_image) > max_rows:
            lines.append(f"\n… {len(per_image) - max_rows} more in metrics.json.")
        lines.append("")

    if figures:
        lines += ["## Figures", ""]
        for name, caption in figures:
            lines += [f"### {os.path.splitext(name)[0].replace('_', ' ')}", "", caption, "",
                      f"![{caption}]({name})", ""]
    lines += ["## Files", "", "- `metrics.json`: every number above, per image, with the options used"]
    lines += [f"- `{name}`" for name, _ in figures]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
