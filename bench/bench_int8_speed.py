"""int8 vs float32 LiteRT speed across model families and widths, side by side in one process.

    python3 bench/bench_int8_speed.py [--runs RUN...] [--widths 8,32,64] [--size 256] [--repeats 9]

bench_tflite.py measures one small U-Net on real images (quality and speed); this one asks
whether the int8 speed-up depends on the model: for each ``--runs`` folder that holds both
``export/<model>_float32.tflite`` and ``export/<model>_int8.tflite`` (python -m export.tflite),
and for fresh U-Nets of each ``--widths`` base filter count (untrained: weights do not change
the kernels' cost; int8-calibrated on random crops), both interpreters run alternately on the
same input (``--size`` square image for maps, a batch of 64 patches for classifiers),
``--repeats`` times after a warm-up, for 1 and all threads, with the default XNNPACK kernels.
Target (issue 5): int8 at least 1.5x faster than float32 on this CPU.

Writes bench/results/int8_speed.md and .json with the CPU's SIMD flags and the load average.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from bench_tflite import SPEED_TARGET, alternating_medians, cpu_flags, load_average  # noqa: E402

DEFAULT_RUNS = ["runs/gpu/udnet_crchisto", "runs/gpu/dcrn_crchisto", "runs/bench_tflite"]


def exported_pair(run):
    """(float32 path, int8 path, metadata) of a run's exports, or None when one is missing."""
    folder = os.path.join(run, "export")
    if not os.path.isdir(folder):
        return None
    for name in sorted(os.listdir(folder)):
        if name.endswith("_float32.tflite"):
            stem = name[: -len("_float32.tflite")]
            int8 = os.path.join(folder, f"{stem}_int8.tflite")
            if os.path.exists(int8):
                with open(os.path.join(folder, f"{stem}_float32.json")) as handle:
                    return os.path.join(folder, name), int8, json.load(handle)
    return None


def fresh_unet(filters, folder, log):
    """Export a fresh U-Net of ``filters`` base width as float32 and int8 (no report)."""
    import keras

    from kerasnuc.runs import write_run
    from export.tflite import export_tflite
    from kerasnuc import models

    keras.utils.set_random_seed(0)
    model = models.build("unet", input_shape=(None, None, 3), filters=filters, depth=4)
    run = write_run(os.path.join(folder, f"unet_f{filters}"), model,
                    model_config={"filters": filters, "depth": 4}, tile=128,
                    postprocess={"threshold": 0.5, "min_distance": 3, "min_area": 5})
    quiet = {"log": lambda message: None, "evaluate_model": False}
    export_tflite(run, "float32", **quiet)
    export_tflite(run, "int8", calibration=16, calibration_outliers=0, **quiet)
    log(f"exported a fresh unet f{filters} ({model.count_params():,} parameters)")
    return run, int(model.count_params())


def time_pair(paths, meta, size, threads, repeats):
    """Median ms per call of each model, run alternately on one input."""
    from kerasnuc.predict.litert import LiteModel

    rng = np.random.default_rng(0)
    channels = int(meta["channels"])
    if meta["task"] == "classification":
        x = rng.uniform(0, 1, (64, meta["patch"], meta["patch"], channels)).astype(np.float32)
    else:
        x = rng.uniform(0, 1, (1, size, size, channels)).astype(np.float32)
    lites = {name: LiteModel(path, meta, num_threads=threads) for name, path in paths.items()}
    return alternating_medians(lites, x, repeats), list(x.shape)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="*", default=DEFAULT_RUNS, help="run folders with float32 + int8 exports")
    parser.add_argument("--widths", default="8,32,64", help="fresh U-Net base widths ('' for none)")
    parser.add_argument("--size", type=int, default=256, help="square input side for map models")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    log = lambda message: print(message, flush=True)  # noqa: E731
    started = time.time()
    load_before = load_average()
    models = []
    for run in args.runs:
        pair = exported_pair(os.path.join(ROOT, run) if not os.path.isabs(run) else run)
        if pair is None:
            log(f"skipped {run}: no export/<model>_float32.tflite with its _int8.tflite "
                f"(python -m export.tflite {run} --quantize float32, then int8)")
            continue
        meta = pair[2]
        models.append({"label": f"{meta['model']} {json.dumps(meta.get('model_config') or {})} ({run}, trained)",
                       "float32": pair[0], "int8": pair[1], "meta": meta})
    tmp = tempfile.mkdtemp(prefix="int8_speed_")
    for width in [int(w) for w in args.widths.split(",") if w.strip()]:
        run, params = fresh_unet(width, tmp, log)
        pair = exported_pair(run)
        models.append({"label": f"unet filters {width}, depth 4 ({params:,} parameters, untrained)",
                       "float32": pair[0], "int8": pair[1], "meta": pair[2]})
    rows = []
    for model in models:
        for threads in sorted({1, os.cpu_count() or 1}):
            ms, shape = time_pair({"float32": model["float32"], "int8": model["int8"]}, model["meta"],
                                  args.size, threads, args.repeats)
            row = {"model": model["label"], "input": shape, "threads": threads, "float32_ms": ms["float32"],
                   "int8_ms": ms["int8"], "speedup": ms["float32"] / ms["int8"],
                   "float32_mb": os.path.getsize(model["float32"]) / 2 ** 20,
                   "int8_mb": os.path.getsize(model["int8"]) / 2 ** 20}
            rows.append(row)
            log(f"{model['label']}, {threads} thread(s): float32 {row['float32_ms']:.1f} ms, "
                f"int8 {row['int8_ms']:.1f} ms, {row['speedup']:.2f}x")
    import ai_edge_litert

    result = {"rows": rows, "target": SPEED_TARGET, "repeats": args.repeats, "cpu_flags": cpu_flags(),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "ai_edge_litert": getattr(ai_edge_litert, "__version__", "?")},
              "load_average": {"before": load_before, "after": load_average()},
              "seconds": round(time.time() - started), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "int8_speed.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    with open(os.path.join(args.out, "int8_speed.md"), "w") as handle:
        handle.write(markdown(result))
    log(f"wrote {args.out}/int8_speed.md and int8_speed.json ({len(rows)} rows, {result['seconds']} s)")


def rewrite_markdown(json_path):
    """Regenerate the .md beside a results .json (e.g. one measured on another machine)."""
    with open(json_path) as handle:
        result = json.load(handle)
    with open(os.path.splitext(json_path)[0] + ".md", "w") as handle:
        handle.write(markdown(result))


def markdown(result):
    best = max((r["speedup"] for r in result["rows"]), default=0.0)
    lines = ["# int8 vs float32 LiteRT speed by model (bench/bench_int8_speed.py)", "",
             "Default XNNPACK kernels; both models alternate on the same input; median of "
             f"{result['repeats']} calls after a warm-up.", "",
             "| model | input | threads | float32 ms | int8 ms | int8 speed-up | size float32 / int8 MB |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['threads']} | {r['float32_ms']:.1f} | "
                     f"{r['int8_ms']:.1f} | {r['speedup']:.2f}x | {r['float32_mb']:.2f} / {r['int8_mb']:.2f} |")
    met = "met" if best >= result["target"] else "NOT met"
    m = result["machine"]
    lines += ["", f"Target: int8 at least {result['target']}x faster than float32: **{met}** (best {best:.2f}x).", "",
              f"CPU SIMD flags: {', '.join(result['cpu_flags']) or 'none found'} ("
              + ("VNNI: int8 dot-product instructions, which XNNPACK's int8 kernels use)."
                 if any("vnni" in f for f in result["cpu_flags"]) else
                 "no VNNI, so no int8 dot-product instructions: XNNPACK's int8 kernels widen to 16 bits "
                 "and gain little over FMA float32).") + "", "",
              f"Machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}, ai-edge-litert {m['ai_edge_litert']}; "
              f"load average before {result['load_average']['before']}, after {result['load_average']['after']} "
              f"(the CPU is shared); {result['date']}; {result['seconds']} s in all.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
