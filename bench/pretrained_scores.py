"""Held-out scores of the shipped pretrained models, regenerated from the shipped files.

    python3 bench/pretrained_scores.py [--names fluo,he] [--tta] [--limit N]

Each model is scored by training.evaluate on the images its run held out and never trained or
tuned thresholds on: the set its config names as ``test_data`` (``fluo``: the 65 DSB 2018
stage1_test images) or the test side of its split.json (``he``: the 14 held-out MoNuSeg images of
the organ split; ``crc-*``: the 20 held-out CRCHistoPhenotypes images). Writes
bench/results/pretrained.json and pretrained.md; evaluation folders go to a temporary directory,
never into the installed package.
"""

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

FIGURES = {"segmentation": ("aji", "aji_plus", "pq", "dice", "f1"),
           "detection": ("f1", "precision", "recall"),
           "classification": ("accuracy", "macro_f1", "weighted_f1")}


def score(name, tta=False, limit=None, workdir=None):
    """training.evaluate's metrics of one shipped model on its held-out images (a dict)."""
    from kerasnuc import pretrained
    from training.evaluate import evaluate_run

    folder = pretrained.path(name)
    with open(os.path.join(folder, "config.json")) as handle:
        config = json.load(handle)
    data = config.get("test_data") or None
    out = os.path.join(workdir or tempfile.mkdtemp(prefix="kerasnuc-pretrained-"), f"{name}{'-tta' if tta else ''}")
    started = time.time()
    result = evaluate_run(folder, data=data, split="test", tta=tta, out=out, limit=limit,
                          log=lambda message: print(f"[{name}] {message}", file=sys.stderr, flush=True))
    task = config["task"]
    pooled = task != "segmentation" and isinstance(result.get("pooled"), dict)
    primary = result.get("primary") or ("pooled" if pooled else "mean")  # detection, classification: pooled
    figures = result.get(primary, {})
    return {"name": name, "task": task, "held_out": data or f"split.json test ({config.get('split') or 'seeded'})",
            "images": result.get("images", len(result.get("per_image", []))), "tta": bool(tta),
            "over": "pooled over all images" if primary == "pooled" else "mean over images",
            "seconds": round(time.time() - started, 1),
            **{key: figures.get(key) for key in FIGURES.get(task, ()) if figures.get(key) is not None}}


def render(rows, command):
    lines = ["# Pretrained models: held-out scores", "", f"Command: `{command}`", "",
             "Scored by `training.evaluate` from the shipped folders (kerasnuc/pretrained/NAME) on images that "
             "the model never saw in training or threshold tuning.", "",
             "| model | task | held-out images | n | TTA | figures | AJI | AJI+ | PQ | Dice | F1 | P | R | accuracy | macro F1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(row, key):
        value = row.get(key)
        return "-" if value is None else f"{value:.3f}"

    for row in rows:
        lines.append(f"| {row['name']} | {row['task']} | {row['held_out']} | {row['images']} | "
                     f"{'yes' if row['tta'] else 'no'} | {row.get('over', '')} | " + " | ".join(
                         cell(row, key) for key in ("aji", "aji_plus", "pq", "dice", "f1", "precision", "recall",
                                                    "accuracy", "macro_f1")) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    from kerasnuc import pretrained
    from kerasnuc.atomic import write_text_atomic

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", default=",".join(pretrained.available()), help="comma-separated model names")
    parser.add_argument("--tta", action="store_true", help="also score with the 8 dihedral views averaged")
    parser.add_argument("--limit", type=int, help="only the first N held-out images (a quick look)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for pretrained.json/.md")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kerasnuc-pretrained-") as workdir:
        for name in [n for n in args.names.split(",") if n]:
            for tta in ((False, True) if args.tta else (False,)):
                row = score(name, tta=tta, limit=args.limit, workdir=workdir)
                print(json.dumps(row), flush=True)
                rows.append(row)
    command = "python3 bench/pretrained_scores.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    os.makedirs(args.out, exist_ok=True)
    write_text_atomic(os.path.join(args.out, "pretrained.json"), json.dumps({"command": command, "rows": rows}, indent=2))
    write_text_atomic(os.path.join(args.out, "pretrained.md"), render(rows, command))
    print(f"wrote {args.out}/pretrained.json, pretrained.md ({len(rows)} rows)")


if __name__ == "__main__":
    main()
