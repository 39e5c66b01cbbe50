"""First real result: U-Net trained on DSB 2018 stage-1 train, scored on stage-1 test.

    python3 bench/first_results.py [--config configs/unet_dsb2018_cpu.json] [--epochs N]

Trains with ``training.fit`` (thresholds tuned on its validation split, instances by
watershed), then writes bench/results/first_results.md and .json from the run's
metrics.json. Every figure in the table comes from that run.
"""

import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(os.path.dirname(HERE), "configs", "unet_dsb2018_cpu.json"))
    parser.add_argument("--epochs", type=int, help="override the config's epochs")
    parser.add_argument("--out", default="runs/first_results", help="run directory (replaced)")
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    args = parser.parse_args()

    from training import fit
    from training.config import load_config_file, resolve

    config = resolve(load_config_file(args.config), {"epochs": args.epochs, "out": args.out})
    started = time.time()
    run = fit.run(config, overwrite=True)
    wall = time.time() - started
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    thresholds = json.load(open(os.path.join(run, "thresholds.json")))
    mean = metrics["mean"]
    result = {
        "command": " ".join(["python3", "bench/first_results.py"] + sys.argv[1:]),
        "config": os.path.relpath(args.config, os.path.dirname(HERE)),
        "model": config.model, "model_config": config.model_config, "train_data": config.data,
        "test_data": config.test_data, "test_images": metrics["images"],
        "epochs": metrics["epochs"], "steps_per_epoch": config.steps_per_epoch,
        "batch_size": config.batch_size, "tile": config.tile,
        "train_seconds": metrics["train_seconds"], "wall_seconds": round(wall, 1),
        "postprocess": thresholds["postprocess"], "validation_aji": (thresholds.get("validation") or {}).get("value", thresholds.get("validation_aji")),
        "metrics": {k: mean[k] for k in ("dice", "dice_pooled", "iou", "aji", "aji_plus", "pq", "dq", "sq",
                                         "precision", "recall", "f1", "f1_dice02") if k in mean},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor(),
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "date": time.strftime("%Y-%m-%d"),
    }
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "first_results.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in result["metrics"].items())
    text = f"""# First real result: U-Net, DSB 2018 stage-1 train -> stage-1 test

Command: `{result['command']}` (config `{result['config']}`), run folder `{args.out}`.

- Model: `{result['model']}` {json.dumps(result['model_config'])}; {result['epochs']} epochs x {result['steps_per_epoch']} steps
  of {result['batch_size']} crops of {result['tile']}x{result['tile']} (a CPU budget, not the paper schedule).
- Training data: `{result['train_data']}` (10% of its images held out for validation and threshold tuning).
- Test data: `{result['test_data']}`, {result['test_images']} images, never seen in training or tuning.
- Post-processing tuned on validation (mean AJI {result['validation_aji']:.3f}): {json.dumps(result['postprocess'])}; instances by
  marker-controlled watershed.
- Training time {result['train_seconds']:.0f} s, whole run {result['wall_seconds']:.0f} s on {result['machine']['cpus']} CPU cores
  ({result['machine']['platform']}), {result['date']}; load average at the end
  {result['machine']['load_average_at_end']} (above 2 means the cores were shared and times are inflated).

Mean over the test images (pixel Dice/IoU on foreground; AJI, AJI+, PQ and object P/R/F1 at IoU 0.5 on instances;
`dice_pooled` is the Dice of all test pixels together; `f1_dice02` counts a match at Dice > 0.2):

| metric | value |
|---|---|
{rows}
"""
    with open(os.path.join(args.results, "first_results.md"), "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
