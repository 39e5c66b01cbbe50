"""End-to-end prediction speed and peak memory of the engine (kerasnuc.predict), written to files.

    python3 bench/bench_predict.py RUN [--sizes 4096,16384] [--images 65] [--out bench/results]

1. The DSB 2018 stage1_test images: megapixels per second end to end, split into network and
   post-processing, and AJI / PQ / F1 against the solution labels.
2. Mosaics of real MoNuSeg H&E tiles (generated in memory, never stored) of each ``--sizes``
   side: megapixels per second and peak resident memory, each size in its own process, so
   that the memory figures do not mix.

Writes ``predict.md`` and ``predict.json``. A StarDist column (issue 14's side-by-side target)
needs a bench-only venv with ``stardist``; it is not part of this script yet.
"""

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SHARED = os.path.join(ROOT, "..", "shared", "data")
sys.path.insert(0, ROOT)


def timed_predictor(run, block=2048):
    """A Predictor whose runtime and post-processing add their seconds to ``timing``."""
    import kerasnuc
    from kerasnuc.predict import engine

    predictor = kerasnuc.load(run, block=block)
    timing = {"network": 0.0, "postprocess": 0.0}
    run_batch = predictor.runtime.run

    def run_timed(batch):
        started = time.perf_counter()
        out = run_batch(batch)
        timing["network"] += time.perf_counter() - started
        return out

    predictor.runtime.run = run_timed
    instances = engine.instances

    def instances_timed(maps, params):
        started = time.perf_counter()
        out = instances(maps, params)
        timing["postprocess"] += time.perf_counter() - started
        return out

    engine.instances = instances_timed
    return predictor, timing


def dsb_test(run, limit):
    from kerasnuc import metrics
    from kerasnuc.data import load_dataset

    records = list(load_dataset(f"dsb2018:{os.path.join(SHARED, 'dsb2018', 'stage1_test')}"))[:limit]
    predictor, timing = timed_predictor(run)
    predictor.predict_instances(records[0].image[:64, :64])  # warm-up (graph build)
    timing.update(network=0.0, postprocess=0.0)
    scores, pixels, started = [], 0, time.perf_counter()
    for record in records:
        labels, _ = predictor.predict_instances(record.image)
        pixels += labels.size
        scores.append(metrics.segmentation_report(record.labels, labels))
    total = time.perf_counter() - started
    mean = {key: float(np.mean([s[key] for s in scores])) for key in ("aji", "pq", "f1") if key in scores[0]}
    return {"images": len(records), "megapixels": pixels / 1e6, "seconds": total,
            "mp_per_s": pixels / 1e6 / total, **{f"{k}_s": v for k, v in timing.items()}, **mean}


def mosaic(side, seed=0):
    """A side x side RGB mosaic of real MoNuSeg H&E tiles (random crops, flips)."""
    from kerasnuc.data.imageio import read_image

    paths = sorted(glob.glob(os.path.join(SHARED, "monuseg2018", "train", "images", "*")))
    rng = np.random.default_rng(seed)
    tiles = [read_image(p, channels=3) for p in paths[:8]]
    out = np.empty((side, side, 3), np.uint8)
    step = 512
    for top in range(0, side, step):
        for left in range(0, side, step):
            tile = tiles[rng.integers(len(tiles))]
            r, c = rng.integers(0, tile.shape[0] - step), rng.integers(0, tile.shape[1] - step)
            crop = tile[r:r + step, c:c + step]
            if rng.random() < 0.5:
                crop = crop[::-1]
            h, w = min(step, side - top), min(step, side - left)
            out[top:top + h, left:left + w] = crop[:h, :w]
    return out


def one_mosaic(run, side):
    image = mosaic(side)
    predictor, timing = timed_predictor(run)
    predictor.predict_instances(image[:64, :64])
    timing.update(network=0.0, postprocess=0.0)
    started = time.perf_counter()
    labels, table = predictor.predict_instances(image)
    total = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"side": side, "nuclei": int(len(table["id"])), "seconds": total, "mp_per_s": side * side / 1e6 / total,
            "peak_rss_mb": peak_mb, "image_mb": image.nbytes / 2 ** 20, **{f"{k}_s": v for k, v in timing.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--sizes", default="4096")
    parser.add_argument("--images", type=int, default=65)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--mosaic-only", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mosaic_only:
        print(json.dumps(one_mosaic(args.run, args.mosaic_only)))
        return
    result = {"run": os.path.abspath(args.run)}
    if args.images:
        result["dsb2018_stage1_test"] = dsb_test(args.run, args.images)
        print(result["dsb2018_stage1_test"], flush=True)
    result["mosaics"] = []
    for side in [int(s) for s in args.sizes.split(",") if s]:
        out = subprocess.run([sys.executable, __file__, args.run, "--mosaic-only", str(side)],
                             capture_output=True, text=True, check=True)
        result["mosaics"].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(result["mosaics"][-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "predict.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    lines = ["# Prediction engine: speed and memory", "",
             f"Command: `python3 bench/bench_predict.py {args.run} --sizes {args.sizes} --images {args.images}`", ""]
    if "dsb2018_stage1_test" in result:
        d = result["dsb2018_stage1_test"]
        lines += ["| set | images | MP/s end to end | network s | post-processing s | AJI | PQ | F1 |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| DSB stage1_test | {d['images']} | {d['mp_per_s']:.2f} | {d['network_s']:.1f} | "
                  f"{d['postprocess_s']:.1f} | {d.get('aji', float('nan')):.3f} | {d.get('pq', float('nan')):.3f} | "
                  f"{d.get('f1', float('nan')):.3f} |", ""]
    lines += ["| H&E mosaic side | nuclei | MP/s | network s | post-processing s | peak RSS MB |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {m['side']} | {m['nuclei']} | {m['mp_per_s']:.2f} | {m['network_s']:.1f} | "
              f"{m['postprocess_s']:.1f} | {m['peak_rss_mb']:.0f} |" for m in result["mosaics"]]
    with open(os.path.join(args.out, "predict.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(args.out, 'predict.md')} and predict.json")


if __name__ == "__main__":
    main()
