"""NucSeg's ablation (Jung, Lodhi and Kang 2019) from two training runs, beside the paper's rows.

    python3 bench/nucseg_ablation.py RUN_WITH_DCGMM RUN_WITHOUT [--limit N] [--name nucseg_ablation]

RUN_WITH_DCGMM: a ``training.fit`` run trained on colour-normalised images (``"stain":
{"method": "dcgmm", ...}``); RUN_WITHOUT: the same recipe without colour normalisation. Both
should use the organ-wise MoNuSeg split (``"split": "monuseg_organ"``: NucSeg's MOSID, Kumar
et al. 2017); the table says which split each run used. Each run's test images (the original
pixels, :func:`kerasnuc.runs.records_of_split`; the engine stain-normalises them as training
did, from the run's stain.json) go through the prediction engine twice, without and with multiple inference
(:mod:`kerasnuc.postprocess.multiple_inference`), giving the four rows:

| row | colour normalisation | multiple inference |
|---|---|---|
| NucSeg | yes | yes |
| NucSeg-P | yes | no |
| NucSeg-N | no | yes |
| NucSeg-NP | no | no (the segmentation network alone) |

Metrics per row: object precision, recall and F1 with a match at Dice > 0.2, pixel Dice and
AJI, each the mean over the test images (as segmentation_report computes them per image), plus
the pooled object counts, and the same for Kumar's same-organ (8) and different-organ (6) test
sets. Any family that ``predict_instances`` serves works unchanged (Mask R-CNN, the paper's
network, or a map model such as U-Net). Writes bench/results/<name>.md and .json.
"""

import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

METRICS = ("precision_dice02", "recall_dice02", "f1_dice02", "dice", "aji")
LABELS = {"precision_dice02": "precision", "recall_dice02": "recall", "f1_dice02": "F1", "dice": "Dice",
          "aji": "AJI"}
VARIANTS = (("NucSeg", 0, True), ("NucSeg-P", 0, False), ("NucSeg-N", 1, True), ("NucSeg-NP", 1, False))
"""(row, which run: 0 with colour normalisation / 1 without, multiple inference)."""

PUBLISHED = {row: {metric: None for metric in METRICS} for row, _, _ in VARIANTS}
"""The paper's MOSID ablation rows (precision, recall, F1 at Dice > 0.2, Dice, AJI). Not filled
in: the stored copies of the paper that could be read here hold only its abstract, so its
table could not be checked; put the figures here (with the table number in PUBLISHED_SOURCE)
rather than typing them into a results file."""
PUBLISHED_SOURCE = ("Jung, Lodhi & Kang, BMC Biomed. Eng. 1:24 (2019), MOSID ablation table "
                    "(figures not retrieved here)")


def test_images(run_dir, limit=None):
    """The run's test records, original pixels (the engine applies the run's stain normaliser)."""
    from kerasnuc import runs

    records = runs.records_of_split(run_dir, "test", limit=limit)
    if not records:
        raise SystemExit(f"bench/nucseg_ablation.py: {run_dir}: no test images in split.json")
    return records


def evaluate(predictor, records, multiple_inference, label="", log=print):
    """{"per_image": [...], "images", "mean": {...}, "pooled_dice02": {...}, "groups": {...},
    "seconds"} of ``records`` through the engine (``predictor``, :func:`kerasnuc.predict.load`),
    with or without multiple inference."""
    import numpy as np

    from kerasnuc import metrics
    from kerasnuc.data.splits import monuseg_test_groups

    started = time.perf_counter()
    per_image = []
    for record in records:
        labels, _ = predictor.predict_instances(record.image, multiple_inference=bool(multiple_inference))
        per_image.append({"name": record.name, **metrics.segmentation_report(record.labels, labels)})
        log(f"  {label} {'MI' if multiple_inference else '--'} {record.name}: "
            f"F1@Dice>0.2 {per_image[-1]['f1_dice02']:.3f}, AJI {per_image[-1]['aji']:.3f}", flush=True)
    seconds = time.perf_counter() - started

    def summary(rows):
        if not rows:
            return None
        mean = {m: float(np.mean([row[m] for row in rows])) for m in METRICS}
        tp, fp, fn = (int(sum(row[f"{k}_dice02"] for row in rows)) for k in ("tp", "fp", "fn"))
        pooled = {"tp": tp, "fp": fp, "fn": fn, "precision": tp / (tp + fp) if tp + fp else 0.0,
                  "recall": tp / (tp + fn) if tp + fn else 0.0,
                  "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0}
        return {"images": len(rows), "mean": mean, "pooled_dice02": pooled}

    groups = {name: summary([row for row in per_image if row["name"].split(":")[-1] in set(members)])
              for name, members in monuseg_test_groups().items()}
    return {"per_image": per_image, **summary(per_image), "groups": groups, "seconds": round(seconds, 1)}


def run_info(run_dir):
    """What the table says about a run: model, stain method, split, epochs."""
    from kerasnuc import runs

    run = runs.read_run(run_dir)
    config, split = run.config, run.split
    return {"run": run_dir, "model": config.get("model"), "task": config.get("task"),
            "stain": (config.get("stain") or {}).get("method") or "none",
            "split": split.get("split") or config.get("split") or "seeded fractions",
            "test_images": len(split.get("test", [])), "epochs": config.get("epochs"),
            "epochs_run": _epochs_run(run.path),
            "model_config": config.get("model_config"), "backend": config.get("backend")}


def _epochs_run(path):
    """Epochs the run reached (its metrics.json), or None."""
    from kerasnuc import runs

    metrics = os.path.join(path, "metrics.json")
    return runs.read_json_object(metrics).get("epochs") if os.path.isfile(metrics) else None


def table(rows, runs_info):
    """Markdown: ours and published per row and metric."""
    head = "| row | run | " + " | ".join(LABELS[m] for m in METRICS) + " | published " + \
           " / ".join(LABELS[m] for m in METRICS) + " | images | s |"
    lines = [head, "|---|---|" + "---|" * len(METRICS) + "---|---|---|"]
    for row in rows:
        published = PUBLISHED.get(row["row"], dict.fromkeys(METRICS))
        shown = " / ".join("-" if published[m] is None else f"{published[m]:.3f}" for m in METRICS)
        lines.append(f"| {row['row']} | {os.path.basename(row['run'].rstrip('/'))} | "
                     + " | ".join(f"{row['mean'][m]:.3f}" for m in METRICS)
                     + f" | {shown} | {row['images']} | {row['seconds']:.0f} |")
    lines += ["", "Same-organ (8) and different-organ (6) test images of Kumar et al. (mean over images):", "",
              "| row | set | " + " | ".join(LABELS[m] for m in METRICS) + " |",
              "|---|---|" + "---|" * len(METRICS)]
    for row in rows:
        for name, group in row["groups"].items():
            if group:
                lines.append(f"| {row['row']} | {name} ({group['images']}) | "
                             + " | ".join(f"{group['mean'][m]:.3f}" for m in METRICS) + " |")
    lines += ["", "| run | model | stain | split | test images | epochs run (of) | backend |",
              "|---|---|---|---|---|---|---|"]
    for info in runs_info:
        lines.append(f"| {info['run']} | {info['model']} ({info['task']}) | {info['stain']} | {info['split']} | "
                     f"{info['test_images']} | {info.get('epochs_run', '?')} ({info['epochs']}) | {info['backend']} |")
    return "\n".join(lines)


def predict_rows(runs_given, baselines, info, limit=None):
    """The four NucSeg rows (and one per baseline run) through the engine."""
    from kerasnuc.predict import load

    rows, loaded = [], {}
    variants = list(VARIANTS) + [(f"baseline {run_info(run)['model']}", 2 + i, False)
                                 for i, run in enumerate(baselines)]
    for row, which, multiple in variants:
        run = (runs_given + baselines)[which]
        if run not in loaded:  # each run's model and test images once, for both of its rows
            loaded[run] = (load(run), test_images(run, limit))
        predictor, records = loaded[run]
        print(f"{row}: {run} {'with' if multiple else 'without'} multiple inference", flush=True)
        rows.append({"row": row, "run": run, "multiple_inference": multiple, "stain": info[which]["stain"],
                     **evaluate(predictor, records, multiple, os.path.basename(run.rstrip("/")))})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("with_dcgmm", metavar="RUN_WITH_DCGMM")
    parser.add_argument("without", metavar="RUN_WITHOUT")
    parser.add_argument("--baseline", action="append", default=[], metavar="RUN",
                        help="another run (e.g. U-Net on the same split) scored beside the four rows, "
                             "without multiple inference; repeatable")
    parser.add_argument("--render", metavar="JSON",
                        help="rebuild the .md from an earlier run's .json (its rows and runs) with the current "
                             "PUBLISHED figures and run details, without predicting again")
    parser.add_argument("--limit", type=int, help="only the first N test images of each run (a quick look)")
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--name", default="nucseg_ablation", help="file stem in --results")
    args = parser.parse_args(argv)
    runs_given = [args.with_dcgmm, args.without]
    for run in runs_given + args.baseline:
        if not os.path.isfile(os.path.join(run, "config.json")):
            sys.exit(f"bench/nucseg_ablation.py: {run}: not a finished training.fit run (no config.json)")
    info = [run_info(run) for run in runs_given + args.baseline]
    for item in info:
        if item["split"] != "monuseg_organ":
            print(f"bench/nucseg_ablation.py: note: {item['run']} used split '{item['split']}', not the "
                  "organ-wise monuseg_organ of the paper", file=sys.stderr)
    if args.render:  # the rows of an earlier run, with today's PUBLISHED and run details
        from kerasnuc import runs

        rows = runs.read_json_object(args.render)["rows"]
    else:
        rows = predict_rows(runs_given, args.baseline, info, args.limit)
    os.makedirs(args.results, exist_ok=True)
    result = {"rows": rows, "runs": info, "published": PUBLISHED, "published_source": PUBLISHED_SOURCE,
              "machine": platform.node(), "limit": args.limit}
    from kerasnuc.atomic import write_text_atomic

    write_text_atomic(os.path.join(args.results, args.name + ".json"), json.dumps(result, indent=1))
    command = " ".join(["python3 bench/nucseg_ablation.py"] + runs_given + [f"--baseline {b}" for b in args.baseline]
                       + ([f"--limit {args.limit}"] if args.limit else [])
                       + ([f"--name {args.name}"] if args.name != "nucseg_ablation" else []))
    text = ("# NucSeg ablation (MOSID)\n\nGenerated by `" + command + "`. Rows as in Jung, Lodhi and Kang 2019: "
            "NucSeg (colour normalisation + multiple inference), -P (no multiple inference), -N (no colour "
            "normalisation), -NP (the segmentation network alone); baseline rows: other runs on the same split, "
            "without multiple inference. Object precision / recall / F1 match a nucleus "
            "at Dice > 0.2; Dice is the pixel Dice of the foreground; all are means over the test images. "
            f"Published: {PUBLISHED_SOURCE}.\n\n" + table(rows, info) + "\n")
    write_text_atomic(os.path.join(args.results, args.name + ".md"), text)
    print(text)
    return result


if __name__ == "__main__":
    main()
