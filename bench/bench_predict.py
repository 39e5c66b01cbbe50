"""End-to-end prediction speed and peak memory of the engine (kerasnuc.predict), written to files.

    python3 bench/bench_predict.py RUN [--sizes 4096,16384 | --sizes 4096 8192] [--images 65] [--out bench/results]
                                       [--stardist runs/stardist_dsb]

1. The DSB 2018 stage1_test images: the network alone (``predict_maps`` on every image), then
   end to end through the engine's stream (network a thread ahead of post-processing), with
   the seconds inside the network and inside post-processing, and AJI / PQ / F1 against the
   solution labels.
2. Mosaics of real MoNuSeg H&E tiles of each ``--sizes`` side, written on the fly as a
   pyramidal JPEG TIFF in a temporary folder (deleted afterwards, never stored), run through
   the command line (``python -m kerasnuc.predict``, all four formats, labels as a pyramidal
   OME-TIFF) in a process of its own: megapixels per second and that process's peak resident
   memory (the CLI's model only: the timers are patched in without loading another), and the
   growth of the peak from the smallest side to the largest against issue 14's target (a 32k
   slide under 2 GB, less than 25 % more than at 4k).

With ``--stardist MODEL`` (a StarDist 2D model folder trained by ``bench/stardist/bench_stardist.py
train``), StarDist runs side by side in the same run, in its bench-only venv
(``bench/stardist/setup.sh``): ``predict_instances`` on the same test images (its labels scored
by the same scorer) and ``predict_instances_big`` on the same mosaic files.

Writes ``predict.md`` and ``predict.json``.
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

    predictor = kerasnuc.load(run, block=block)
    timing = timed_engine()
    predictor.runtime.run = timed(predictor.runtime.run, timing, "network")
    return predictor, timing


def timed_engine():
    """The engine's post-processing (and its whole post stage) adding their seconds to the
    returned ``timing``; no model is loaded (the mosaic process holds only the CLI's)."""
    from kerasnuc.predict import engine

    timing = {"network": 0.0, "postprocess": 0.0, "post_stage": 0.0}
    engine.instances = timed(engine.instances, timing, "postprocess")
    engine.Predictor._post_stage = timed(engine.Predictor._post_stage, timing, "post_stage")
    return timing


def timed(function, timing, key):
    """``function`` adding its seconds to ``timing[key]``."""
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            timing[key] += time.perf_counter() - started
    return wrapper


def dsb_test(run, limit):
    from kerasnuc import metrics
    from kerasnuc.data import load_dataset
    from kerasnuc.predict.engine import paste_labels

    records = list(load_dataset(f"dsb2018:{os.path.join(SHARED, 'dsb2018', 'stage1_test')}"))[:limit]
    predictor, timing = timed_predictor(run)
    for record in records:  # warm-up: every image shape traced once, untimed
        predictor.predict_maps(record.image)
    started = time.perf_counter()
    for record in records:
        predictor.predict_maps(record.image)
    network_alone = time.perf_counter() - started
    timing.update(network=0.0, postprocess=0.0, post_stage=0.0)
    labels = [np.zeros(r.image.shape[:2], np.uint32) for r in records]
    started = time.perf_counter()
    for result in predictor.stream([r.image for r in records]):
        paste_labels(labels[result.index], result)
    total = time.perf_counter() - started
    pixels = sum(r.image.shape[0] * r.image.shape[1] for r in records)
    scores = [metrics.segmentation_report(r.labels, l) for r, l in zip(records, labels)]
    mean = {key: float(np.mean([s[key] for s in scores])) for key in ("aji", "pq", "f1") if key in scores[0]}
    return {"images": len(records), "megapixels": pixels / 1e6, "seconds": total,
            "mp_per_s": pixels / 1e6 / total, "network_alone_s": network_alone,
            "end_to_end_over_network": total / network_alone,
            **{f"{k}_s": v for k, v in timing.items()}, **mean}


def mosaic_region(tiles, top, left, height, width, cell=512, seed=0):
    """Pixels [top:top+height, left:left+width] of an endless mosaic of real H&E crops: cell
    (i, j) is a random crop (and flip) of a random tile, chosen by a generator seeded by the cell."""
    out = np.empty((height, width, 3), np.uint8)
    for i in range(top // cell, -(-(top + height) // cell)):
        for j in range(left // cell, -(-(left + width) // cell)):
            rng = np.random.default_rng((seed, i, j))
            tile = tiles[rng.integers(len(tiles))]
            r, c = rng.integers(0, tile.shape[0] - cell), rng.integers(0, tile.shape[1] - cell)
            crop = tile[r:r + cell, c:c + cell]
            crop = crop[::-1] if rng.random() < 0.5 else crop
            r0, r1 = max(top, i * cell), min(top + height, (i + 1) * cell)
            c0, c1 = max(left, j * cell), min(left + width, (j + 1) * cell)
            out[r0 - top:r1 - top, c0 - left:c1 - left] = crop[r0 - i * cell:r1 - i * cell, c0 - j * cell:c1 - j * cell]
    return out


def write_mosaic_slide(path, side, mpp=0.25, tile=256):
    """A side x side pyramidal, tiled, JPEG TIFF of the mosaic, written tile by tile."""
    import cv2
    import tifffile

    from kerasnuc.data.imageio import read_image

    paths = sorted(glob.glob(os.path.join(SHARED, "monuseg2018", "train", "images", "*")))
    tiles = [read_image(p, channels=3) for p in paths[:8]]
    factors = [1]
    while side // (factors[-1] * 2) >= 1024:
        factors.append(factors[-1] * 2)

    def level_tiles(factor):
        size = -(-side // factor)
        for top in range(0, size, tile):
            for left in range(0, size, tile):
                h, w = min(tile, size - top), min(tile, size - left)
                pixels = mosaic_region(tiles, top * factor, left * factor, min(h * factor, side - top * factor),
                                       min(w * factor, side - left * factor))
                if factor > 1:
                    pixels = cv2.resize(pixels, (w, h), interpolation=cv2.INTER_AREA)
                yield pixels

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for k, factor in enumerate(factors):
            size = -(-side // factor)
            tif.write(level_tiles(factor), shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile),
                      compression="jpeg", photometric="rgb", resolution=(1e4 / (mpp * factor),) * 2,
                      resolutionunit="CENTIMETER", subfiletype=0 if k == 0 else 1)


def one_mosaic(run, side, slide):
    """Predict a mosaic slide through the CLI in this process; seconds, MP/s, peak RSS."""
    import tempfile

    from kerasnuc.predict import __main__ as cli
    from kerasnuc.predict import engine

    with tempfile.TemporaryDirectory(prefix="bench-mosaic-") as folder:
        written = 0.0
        baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        timing = timed_engine()
        load = engine.load

        def load_timed(*args, **kwargs):  # the CLI's predictor, with the network timer
            begun = time.perf_counter()
            predictor = load(*args, **kwargs)
            timing["load"] = time.perf_counter() - begun
            predictor.runtime.run = timed(predictor.runtime.run, timing, "network")
            return predictor

        cli.load = load_timed
        import kerasnuc.predict

        kerasnuc.predict.load = load_timed
        timing.update(network=0.0, postprocess=0.0, post_stage=0.0)
        out = os.path.join(folder, "out")
        started = time.perf_counter()
        cli.main([run, slide, "--out", out, "--no-tissue-mask"])
        total = time.perf_counter() - started
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        import csv

        with open(os.path.join(out, f"mosaic{side}_nuclei.csv")) as handle:
            nuclei = sum(1 for _ in csv.reader(handle)) - 1
        sizes = {name: os.path.getsize(os.path.join(out, name)) / 2 ** 20 for name in os.listdir(out)}
    total -= timing.pop("load", 0.0)  # loading the run (and measuring its receptive radius) is not per pixel
    return {"side": side, "nuclei": nuclei, "seconds": total, "mp_per_s": side * side / 1e6 / total,
            "peak_rss_mb": peak_mb, "rss_before_predict_mb": baseline_mb, "slide_written_s": written,
            "outputs_mb": sizes, **{f"{k}_s": v for k, v in timing.items()}}


STARDIST_PYTHON = os.path.join(ROOT, "bench", ".venv-stardist", "bin", "python")
STARDIST_SCRIPT = os.path.join(ROOT, "bench", "stardist", "bench_stardist.py")


def _stardist(*arguments):
    if not os.path.exists(STARDIST_PYTHON):
        sys.exit(f"bench_predict: {STARDIST_PYTHON} missing; run bench/stardist/setup.sh first")
    done = subprocess.run([STARDIST_PYTHON, STARDIST_SCRIPT, *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench_predict: StarDist failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def stardist_dsb_test(model, limit):
    """StarDist's predict_instances on the same test images, scored by the same scorer."""
    import tempfile

    from kerasnuc import metrics
    from kerasnuc.data import load_dataset
    from kerasnuc.data.imageio import read_label_image

    records = list(load_dataset(f"dsb2018:{os.path.join(SHARED, 'dsb2018', 'stage1_test')}"))[:limit]
    with tempfile.TemporaryDirectory(prefix="bench-stardist-") as folder:
        report = os.path.join(folder, "predict.json")
        _stardist("predict", "--model", model, "--images", os.path.join(SHARED, "dsb2018", "stage1_test", "images"),
                  "--limit", str(limit), "--out", report, "--labels-out", os.path.join(folder, "labels"))
        with open(report) as handle:
            out = json.load(handle)
        scores = []
        for record in records:
            path = next(p for p in glob.glob(os.path.join(folder, "labels", record.name + ".*")))
            scores.append(metrics.segmentation_report(record.labels, read_label_image(path)))
    totals = out["totals"]
    mean = {key: float(np.mean([s[key] for s in scores])) for key in ("aji", "pq", "f1")}
    return {"images": len(records), "megapixels": totals["megapixels"], "seconds": totals["seconds"],
            "mp_per_s": totals["mp_per_s"], "network_s": totals["network_s"],
            "postprocess_s": totals["postprocess_s"], "peak_rss_mb": out["peak_rss_mb"],
            "thresholds": out["thresholds"], "versions": out.get("versions"), **mean}


def stardist_big(model, slide, side):
    """StarDist's predict_instances_big on the same mosaic file."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-stardist-") as folder:
        report = os.path.join(folder, "big.json")
        _stardist("big", "--model", model, "--image", slide, "--out", report)
        with open(report) as handle:
            out = json.load(handle)
    return {"side": side, "nuclei": out["n_nuclei"], "seconds": out["seconds"], "mp_per_s": out["mp_per_s"],
            "peak_rss_mb": out["peak_rss_mb"], "read_s": out.get("read_s"), "block": out.get("block_effective")}


MEMORY_LIMIT_MB = 2000  # issue 14: a 32k x 32k slide under 2 GB
MEMORY_GROWTH = 0.25  # ... growing less than 25 % from 4k to 32k


def memory_verdict(mosaics):
    """Peak memory against issue 14's target: the largest side under 2 GB, and the growth of the
    peak from the smallest side to the largest under 25 %."""
    first = min(mosaics, key=lambda m: m["side"])
    last = max(mosaics, key=lambda m: m["side"])
    growth = last["peak_rss_mb"] / first["peak_rss_mb"] - 1
    return {"smallest_side": first["side"], "largest_side": last["side"], "growth": growth,
            "largest_peak_mb": last["peak_rss_mb"], "under_limit": last["peak_rss_mb"] < MEMORY_LIMIT_MB,
            "growth_ok": growth < MEMORY_GROWTH, "limit_mb": MEMORY_LIMIT_MB, "growth_limit": MEMORY_GROWTH}


def memory_line(verdict):
    v = verdict
    growth = (f"{v['growth'] * 100:+.1f} % ({'under' if v['growth_ok'] else 'not under'} "
              f"{v['growth_limit'] * 100:.0f} %)" if v["largest_side"] != v["smallest_side"] else "one size only")
    return (f"Peak memory {v['smallest_side']} -> {v['largest_side']}: {growth}; at {v['largest_side']}: "
            f"{v['largest_peak_mb']:.0f} MB ({'under' if v['under_limit'] else 'not under'} "
            f"{v['limit_mb']} MB). Target (issue 14): a 32768 side under {v['limit_mb']} MB, growing less "
            f"than {v['growth_limit'] * 100:.0f} % from 4096.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--sizes", nargs="+", default=["4096"],
                        help="mosaic sides, comma- or space-separated (default 4096)")
    parser.add_argument("--images", type=int, default=65)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--stardist", help="StarDist 2D model folder to run side by side (bench-only venv)")
    parser.add_argument("--mosaic-only", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--slide", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = ",".join(s for item in args.sizes for s in item.split(",") if s)
    if args.mosaic_only:
        print(json.dumps(one_mosaic(args.run, args.mosaic_only, args.slide)))
        return
    result = {"run": os.path.abspath(args.run)}
    if args.images:
        result["dsb2018_stage1_test"] = dsb_test(args.run, args.images)
        print(result["dsb2018_stage1_test"], flush=True)
        if args.stardist:
            result["stardist_dsb2018_stage1_test"] = stardist_dsb_test(args.stardist, args.images)
            print(result["stardist_dsb2018_stage1_test"], flush=True)
    result["mosaics"], result["stardist_mosaics"] = [], []
    import tempfile

    for side in [int(s) for s in args.sizes.split(",") if s]:
        with tempfile.TemporaryDirectory(prefix="bench-slide-") as folder:
            slide = os.path.join(folder, f"mosaic{side}.tif")
            started = time.perf_counter()
            write_mosaic_slide(slide, side)
            written = time.perf_counter() - started
            out = subprocess.run([sys.executable, __file__, args.run, "--mosaic-only", str(side), "--slide", slide],
                                 capture_output=True, text=True, check=True)
            result["mosaics"].append({**json.loads(out.stdout.strip().splitlines()[-1]), "slide_written_s": written})
            print(result["mosaics"][-1], flush=True)
            if args.stardist:
                result["stardist_mosaics"].append(stardist_big(args.stardist, slide, side))
                print(result["stardist_mosaics"][-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "predict.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    lines = ["# Prediction engine: speed and memory", "",
             f"Command: `python3 bench/bench_predict.py {args.run} --sizes {args.sizes} --images {args.images}"
             + (f" --stardist {args.stardist}" if args.stardist else "")
             + (f" --out {os.path.relpath(args.out, ROOT)}" if os.path.abspath(args.out) != os.path.join(ROOT, "bench", "results") else "")
             + "`", ""]
    if "dsb2018_stage1_test" in result:
        d = result["dsb2018_stage1_test"]
        lines += ["| set | images | MP/s end to end | network alone s | end to end s | in network s | "
                  "in post-processing s | end to end / network | AJI | PQ | F1 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|",
                  f"| DSB stage1_test | {d['images']} | {d['mp_per_s']:.2f} | {d['network_alone_s']:.1f} | "
                  f"{d['seconds']:.1f} | {d['network_s']:.1f} | {d['postprocess_s']:.1f} | "
                  f"{d['end_to_end_over_network']:.2f} | {d.get('aji', float('nan')):.3f} | "
                  f"{d.get('pq', float('nan')):.3f} | {d.get('f1', float('nan')):.3f} |"]
        if "stardist_dsb2018_stage1_test" in result:
            sd = result["stardist_dsb2018_stage1_test"]
            lines += [f"| StarDist 2D, same images | {sd['images']} | {sd['mp_per_s']:.2f} | - | {sd['seconds']:.1f} | "
                      f"{sd['network_s']:.1f} | {sd['postprocess_s']:.1f} | - | {sd['aji']:.3f} | {sd['pq']:.3f} | "
                      f"{sd['f1']:.3f} |", "",
                      f"kerasnuc / StarDist megapixels per second on stage1_test: "
                      f"**{d['mp_per_s'] / sd['mp_per_s']:.2f}x**, AJI {d['aji']:.3f} against {sd['aji']:.3f}."]
        lines += [""]
    lines += ["H&E mosaics: pyramidal JPEG TIFF slides through `python -m kerasnuc.predict` (all four formats).", "",
              "| side | nuclei | MP/s end to end | end to end s | in network s | in post-processing s | "
              "end to end / in network | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {m['side']} | {m['nuclei']} | {m['mp_per_s']:.2f} | {m['seconds']:.1f} | {m['network_s']:.1f} | "
              f"{m['postprocess_s']:.1f} | {m['seconds'] / max(m['network_s'], 1e-9):.2f} | {m['peak_rss_mb']:.0f} |"
              for m in result["mosaics"]]
    if result.get("stardist_mosaics"):
        lines += ["", "StarDist 2D `predict_instances_big` on the same files (image read whole into memory first, "
                  "as its examples do; block 4096, tiles of 1024):", "",
                  "| side | nuclei | MP/s | seconds | peak RSS MB | kerasnuc / StarDist MP/s |", "|---|---|---|---|---|---|"]
        for m, sd in zip(result["mosaics"], result["stardist_mosaics"]):
            lines.append(f"| {sd['side']} | {sd['nuclei']} | {sd['mp_per_s']:.2f} | {sd['seconds']:.1f} | "
                         f"{sd['peak_rss_mb']:.0f} | {m['mp_per_s'] / sd['mp_per_s']:.2f}x |")
    if result["mosaics"]:
        result["memory"] = memory_verdict(result["mosaics"])
        lines += ["", memory_line(result["memory"])]
    with open(os.path.join(args.out, "predict.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(args.out, 'predict.md')} and predict.json")


if __name__ == "__main__":
    main()
