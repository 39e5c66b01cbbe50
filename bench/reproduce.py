"""Set our runs against the papers' published figures.

    python3 bench/reproduce.py RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a finished ``training.fit`` run (single split or ``--folds K``). The
table (bench/results/reproduce.md and .json) takes every figure from the runs'
metrics.json and config.json; the published figures are the papers' own numbers.
Commands that produce the runs (CPU budget and full schedules) are in
bench/README.md.
"""

import argparse
import json
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# (task, dataset key, model) -> [(metric in our metrics.json, published value, source)]
PUBLISHED = {
    ("segmentation", "dsb2018", "r2unet"): [("dice", 0.919, "Alom et al. 2022, 5-fold"), ("aji", None, "")],
    ("segmentation", "dsb2018", "unet"): [("dice", 0.904, "Alom et al. 2022, 5-fold"), ("aji", None, "")],
    ("detection", "crchisto", "udnet"): [("f1", 0.828, "Alom et al. 2022"), ("precision", 0.822, "Alom et al. 2022"),
                                         ("recall", 0.843, "Alom et al. 2022")],
    ("classification", "crchisto", "dcrn"): [("macro_f1", 0.811, "Alom et al. 2022")],
    ("classification", "crchisto", "densenet"): [("macro_f1", 0.794, "Alom et al. 2022")],
    ("segmentation", "monuseg", "unet"): [("dice", 0.862, "Kumar et al. 2020 (pixel F1)"),
                                          ("aji", 0.676, "Kumar et al. 2020")],
    ("segmentation", "monuseg", "segnet"): [("dice", None, ""), ("aji", None, "")],
    # Kumar et al. 2020 (MoNuSeg comparison), Table III: F1 (pixel) / AJI
    ("segmentation", "monuseg", "fcn8"): [("dice", 0.8467, "Kumar et al. 2020 (pixel F1)"),
                                          ("aji", 0.6418, "Kumar et al. 2020")],
    ("segmentation", "monuseg", "fc_densenet"): [("dice", 0.8587, "Kumar et al. 2020 (pixel F1)"),
                                                 ("aji", 0.6646, "Kumar et al. 2020")],
    ("segmentation", "monuseg", "pspsegnet"): [("dice", 0.8815, "Kumar et al. 2020 (pixel F1)"),
                                               ("aji", 0.7080, "Kumar et al. 2020")],
    ("segmentation", "monuseg", "ce2p"): [("dice", 0.8792, "Kumar et al. 2020 (pixel F1)"),
                                          ("aji", 0.7014, "Kumar et al. 2020")],
    # Gudhe et al. 2023 score pixels on their own data (PanNuke and others), not MoNuSeg
    ("segmentation", "monuseg", "bayesnuseg"): [("dice", 0.893, "Gudhe et al. 2023 (pixel F1, their data)"),
                                                ("iou", 0.868, "Gudhe et al. 2023 (pixel IoU, their data)"),
                                                ("aji", None, ""), ("pq", None, ""), ("ua", None, "")],
}


def _nucseg_published():
    """NucSeg's own row (Jung, Lodhi & Kang 2019; Mask R-CNN + DCGMM colour normalisation +
    multiple inference, MOSID) from bench/nucseg_ablation.py, where the four ablation rows live."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nucseg_ablation", os.path.join(HERE, "nucseg_ablation.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [(metric, module.PUBLISHED["NucSeg"][metric], module.PUBLISHED_SOURCE) for metric in module.METRICS]


PUBLISHED[("instance", "monuseg", "maskrcnn")] = _nucseg_published()
# NucSeg reports no DSB 2018 figures; the instance metrics it uses, ours only
PUBLISHED[("instance", "dsb2018", "maskrcnn")] = [(m, None, "") for m in ("precision_dice02", "recall_dice02",
                                                                         "f1_dice02", "dice", "aji")]


def dataset_key(spec):
    return spec.split(":", 1)[0] if ":" in spec else spec


def summarise(run_dir):
    config = json.load(open(os.path.join(run_dir, "config.json")))
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    # one run: its primary block (pooled for detection and classification); folds: their mean
    mean, std = metrics.get(metrics.get("primary", "mean"), metrics), metrics.get("std", {})
    if "per_fold" in metrics:
        metrics = {**metrics, "per_fold": _fold_metrics(run_dir, metrics)}
    key = (config["task"], dataset_key(config["data"]), config["model"])
    rows = []
    for metric, published, source in PUBLISHED.get(key, [(m, None, "") for m in ("dice", "f1", "macro_f1")
                                                          if m in mean]):
        if metric not in mean:
            continue
        rows.append({
            "task": key[0], "dataset": key[1], "model": key[2], "metric": _metric_label(metric, config),
            "ours": mean[metric], "std": std.get(metric), "folds": metrics.get("folds", 1),
            "published": published, "source": source, "epochs": config["epochs"],
            "epochs_run": _epochs_run(metrics), "time_budget": config.get("time_budget") or None,
            "model_config": config.get("model_config", {}), "backend": config.get("backend", "?"),
            "precision": config.get("precision_used", "float32"),
            "wall_seconds": _wall_seconds(run_dir, metrics), "machine": config.get("machine", {}),
            "run": run_dir, "per_class_f1": _per_class_f1(metrics),
        })
    return rows


def _metric_label(metric, config):
    if config["task"] == "detection" and metric in ("f1", "precision", "recall"):
        return f"{metric} @ {config.get('match_radius', '?'):g} px"
    return metric


def _fold_metrics(run_dir, metrics):
    """Per-fold figures: from metrics.json's per_fold, else from the fold<i>/metrics.json files."""
    folds = metrics.get("per_fold", [])
    files = [os.path.join(run_dir, f"fold{i}", "metrics.json") for i in range(1, len(folds) + 1)]
    return [{**json.load(open(path)), **fold} if os.path.isfile(path) else fold for fold, path in zip(folds, files)]


def _epochs_run(metrics):
    if "epochs" in metrics:
        return metrics["epochs"]
    runs = [f.get("epochs") for f in metrics.get("per_fold", []) if f.get("epochs") is not None]
    return "/".join(str(e) for e in runs) or None


def _per_class_f1(metrics):
    classes = metrics.get("per_class") or metrics.get("mean", {}).get("per_class") or []
    return {c["name"]: c["f1"] for c in classes if "name" in c and "f1" in c}


def _wall_seconds(run_dir, metrics):
    if "train_seconds" in metrics:
        return metrics["train_seconds"]
    return sum(f.get("train_seconds", 0) for f in metrics.get("per_fold", [])) or None


def _short(path):
    return os.path.relpath(path, os.path.dirname(HERE)) if os.path.isabs(path) else path


def _kept_rows(path, new_rows):
    """Rows of an earlier table for (task, dataset, model) that ``new_rows`` does not cover."""
    if not os.path.isfile(path):
        return []
    covered = {(r["task"], r["dataset"], r["model"]) for r in new_rows}
    with open(path) as handle:
        return [r for r in json.load(handle) if (r["task"], r["dataset"], r["model"]) not in covered]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--name", default="reproduce", help="file stem in --results (default reproduce)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the rows of the existing <name>.json whose (task, dataset, model) none of "
                             "the given runs covers (runs made earlier, elsewhere); the table says which")
    args = parser.parse_args()
    rows = []
    for run in args.runs:
        if not os.path.isfile(os.path.join(run, "metrics.json")):
            sys.exit(f"bench/reproduce.py: {run}: no metrics.json (not a finished run)")
        rows.extend(summarise(run))
    kept = _kept_rows(os.path.join(args.results, args.name + ".json"), rows) if args.keep else []
    rows = kept + rows
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, args.name + ".json"), "w") as handle:
        json.dump(rows, handle, indent=2)
    lines = ["| task | dataset | model | metric | ours (mean +- std) | folds | published | epochs run (of) "
             "| budget min | train s | setup |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours = f"{r['ours']:.3f}" + (f" +- {r['std']:.3f}" if r["std"] is not None else "")
        published = f"{r['published']:.3f} ({r['source']})" if r["published"] is not None else "-"
        machine = f"{r['machine'].get('cpus', '?')} CPU" if r["machine"] else "?"
        if r["machine"].get("accelerator"):
            machine = f"{r['machine']['accelerator']} GPU, {r['precision']}"
        wall = f"{r['wall_seconds']:.0f}" if r["wall_seconds"] else "?"
        width = ", ".join(f"{k} {v}" for k, v in r["model_config"].items() if v not in ("", None))
        budget = f"{r['time_budget']:g}" if r["time_budget"] else "-"
        lines.append(f"| {r['task']} | {r['dataset']} | {r['model']} | {r['metric']} | {ours} | {r['folds']} | "
                     f"{published} | {r['epochs_run']} ({r['epochs']}) | {budget} | {wall} | "
                     f"{machine}, {r['backend']}; {width} |")
    per_class = {(r["model"], r["dataset"]): r["per_class_f1"] for r in rows if r["per_class_f1"]}
    if per_class:
        lines += ["", "Per-class F1 of the classifiers (test split):", "",
                  "| model | dataset | " + " | ".join(next(iter(per_class.values()))) + " |",
                  "|---|---|" + "---|" * len(next(iter(per_class.values())))]
        for (model, dataset), scores in per_class.items():
            lines.append(f"| {model} | {dataset} | " + " | ".join(f"{v:.3f}" for v in scores.values()) + " |")
    text = ("# Reproduction table\n\nGenerated by `python3 bench/reproduce.py " + " ".join(_short(r) for r in args.runs) +
            (f" --name {args.name}" if args.name != "reproduce" else "") + (" --keep" if args.keep else "") +
            f"` on {platform.node() or 'this machine'}. 'epochs run (of)': the epochs reached (per fold) and the "
            "recipe's count; 'budget min': the training minutes allowed per model or fold (CPU-budget runs, "
            "configs/cpu/); 'setup': machine, Keras backend and model width. Published figures are the papers' own.\n\n"
            + (f"Rows kept from the previous table (`--keep`; runs made earlier by the same command, not on this "
               f"machine now): {', '.join(sorted({_short(r['run']) for r in kept}))}.\n\n" if kept else "")
            + "\n".join(lines) + "\n")
    with open(os.path.join(args.results, args.name + ".md"), "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
