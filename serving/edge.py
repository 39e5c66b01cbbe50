"""Run an exported ``.tflite`` on a device: LiteRT, NumPy and OpenCV only, no TensorFlow.

    python -m serving.edge MODEL.tflite segment IMAGE... [--out DIR]
    python -m serving.edge MODEL.tflite detect IMAGE... [--out DIR]
    python -m serving.edge MODEL.tflite classify IMAGE... --points CSV|DIR [--out DIR]
    python -m serving.edge MODEL.tflite classify IMAGE... --detector DET.tflite [--out DIR]

``MODEL.json`` beside the model (written by ``python -m export.tflite``) says the task,
channels, input multiple, tile size, tuned thresholds and class names; ``--metadata``
points elsewhere. Outputs per image: ``<stem>_labels.png`` (16-bit instance labels) for
``segment``, ``<stem>_centroids.csv`` (x, y) for ``detect`` (a segmentation model gives
its instances' centroids), ``<stem>_classes.csv`` (x, y, class, name, probabilities) for
``classify``. Each line printed says how many nuclei and the time per image. Bad input (a
missing or unreadable .tflite, a missing or broken metadata JSON, a .tflite whose tensors do
not fit its metadata's task or channels, unreadable images or points) is one line on stderr
naming the file, exit status 1.

The .tflite takes the *normalised* model input (float32, or uint8 for int8 models with
the quantisation in the input tensor's parameters); this module normalises exactly as
training did (:mod:`kerasnuc.predict.tiling`). Images larger than ``--tile`` are tiled with the
whole image's intensity range. Monte-Carlo dropout models run ``--samples`` passes and
also write ``<stem>_variance.npy``. A run trained on stain-normalised tiles is normalised the
same way by the engine (the metadata's ``stain``): Reinhard, Macenko and Vahadane in NumPy; a
dcgmm normaliser runs its E-step network (``<model>.stain_model.keras`` beside the .tflite),
which needs Keras and a backend on the device.

A static model (``export.tflite --input-size``: edge accelerators need fixed shapes) is
never resized: every image runs in tiles of exactly its H x W, whatever ``--tile`` says
(images smaller than a tile are mirror-padded up to it, margins lowered to fit; one
line on stderr says so), and batches run as batch-1 calls.

Dependencies on the device: ``ai-edge-litert``, NumPy, OpenCV (reading/writing images)
and, for watershed / peak post-processing, SciPy + scikit-image through
``kerasnuc.postprocess``. Without those two it falls back to OpenCV: connected components
(touching nuclei are not split) and local maxima by dilation (no sub-pixel refinement),
and says so. Nothing here imports TensorFlow or Keras (``tests/test_edge.py`` checks it).
"""

import argparse
import csv
import os
import sys
import time

import numpy as np

from kerasnuc.predict import Predictor
from kerasnuc.predict.litert import LiteModel, load_metadata  # noqa: F401  (serving.edge.LiteModel)
from kerasnuc.predict.postprocess import instance_centroids, instances, points_from_maps  # noqa: F401

TASK_OF_COMMAND = {"segment": ("segmentation", "instance"), "detect": ("detection", "segmentation", "instance"),
                   "classify": ("classification",)}


# ----------------------------------------------------------------------------- files


def read_points_csv(path):
    """(K, 2) (x, y) from a CSV with x, y as the first two columns (a header row is skipped)."""
    rows = []
    with open(path, newline="") as handle:
        for row in csv.reader(handle):
            if not row or row[0].strip().startswith("#"):
                continue
            try:
                rows.append((float(row[0]), float(row[1])))
            except (ValueError, IndexError):
                if rows:
                    raise ValueError(f"{path}: bad row {row}") from None
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


def points_for(points_arg, image_path):
    """--points is one CSV for every image, or a folder of <image stem>.csv files."""
    if os.path.isdir(points_arg):
        path = os.path.join(points_arg, _stem(image_path) + ".csv")
    else:
        path = points_arg
    return read_points_csv(path)


def write_points_csv(path, points, extra_columns=(), extra=None):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["x", "y", *extra_columns])
        for i, (x, y) in enumerate(np.asarray(points).reshape(-1, 2)):
            writer.writerow([f"{x:.2f}", f"{y:.2f}", *(extra[i] if extra is not None else ())])
    os.replace(tmp, path)


def write_labels_png(path, labels):
    import cv2

    labels = np.asarray(labels)
    if labels.max() > 65535:
        raise ValueError(f"{labels.max()} instances do not fit a 16-bit PNG")
    tmp = f"{path}.tmp{os.getpid()}.png"
    if not cv2.imwrite(tmp, labels.astype(np.uint16)):
        raise OSError(f"{path}: could not write PNG")
    os.replace(tmp, path)


def read_image(path):
    from kerasnuc.data.imageio import read_image as read  # OpenCV / tifffile, no TensorFlow

    return read(path)


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


# ----------------------------------------------------------------------------- command line


def tiling_note(model, tile=None, margin=None):
    """One line saying how a static model tiles, and which of --tile / --margin it overrides."""
    height, width = model.static_shape
    used = model.static_margin(margin)
    note = (f"serving.edge: {os.path.basename(model.path)} has a static {height}x{width} input: "
            f"images run in {height}x{width} tiles, margin {used}")
    if tile is not None and (tile, tile) != (height, width):
        note += f"; --tile {tile} overridden"
    multiple = max(int(model.meta.get("multiple", 16)), 1)
    if margin is not None and used < -(-margin // multiple) * multiple:
        note += f"; --margin {margin} lowered to {used} to fit the tile"
    radius = model.meta.get("receptive_radius")
    if radius is not None and used < radius:
        note += (f" (below the receptive radius {radius}: tile seams differ slightly from a "
                 "whole-image prediction)")
    return note



def open_model(path, metadata=None, threads=None):
    """The LiteModel of ``path`` (+ its metadata JSON); exits with one line naming the file
    (missing .tflite, missing or broken metadata, a model that does not fit its task)."""
    try:
        return LiteModel(path, load_metadata(path, metadata), threads)
    except (OSError, ValueError) as error:
        sys.exit(f"serving.edge: {error}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m serving.edge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the .tflite file (MODEL.json beside it)")
    parser.add_argument("command", choices=sorted(TASK_OF_COMMAND))
    parser.add_argument("images", nargs="+")
    parser.add_argument("--out", default="edge_out", help="output folder (default edge_out)")
    parser.add_argument("--metadata", help="metadata JSON (default: MODEL.json)")
    parser.add_argument("--points", help="classify: CSV of x,y for every image, or a folder of <stem>.csv")
    parser.add_argument("--detector", help="classify without --points: a detection or segmentation .tflite")
    parser.add_argument("--tile", type=int, help="tile side (default: metadata serving_tile; 0: whole image)")
    parser.add_argument("--margin", type=int, help="margin cropped from tile sides (default: metadata)")
    parser.add_argument("--samples", type=int, help="Monte-Carlo passes (default: metadata mc_samples "
                                                     "for stochastic models, else 1)")
    parser.add_argument("--threads", type=int, help="LiteRT threads (default: the runtime's choice)")
    args = parser.parse_args(argv)

    model = open_model(args.model, args.metadata, args.threads)
    meta = model.meta
    if meta["task"] not in TASK_OF_COMMAND[args.command]:
        sys.exit(f"serving.edge: {args.model} is a {meta['task']} model; '{args.command}' needs "
                 f"{' or '.join(TASK_OF_COMMAND[args.command])}")
    detector = None
    if args.command == "classify":
        if not args.points and not args.detector:
            sys.exit("serving.edge: classify needs --points CSV|DIR or --detector MODEL.tflite")
        if args.points and not os.path.exists(args.points):
            sys.exit(f"serving.edge: {args.points}: --points file or folder not found")
        if args.detector:
            detector = open_model(args.detector, None, args.threads)
            if detector.meta["task"] not in TASK_OF_COMMAND["detect"]:
                sys.exit(f"serving.edge: {args.detector} is a {detector.meta['task']} model; --detector needs "
                         f"{' or '.join(TASK_OF_COMMAND['detect'])}")
    tiled = model if model.dense else detector  # the model that --tile / --margin apply to
    if tiled is not None and tiled.tiles_fixed:
        print(tiling_note(tiled, args.tile, args.margin), file=sys.stderr, flush=True)
    samples = args.samples or (meta.get("mc_samples", 10) if meta.get("stochastic") else 1)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as error:
        sys.exit(f"serving.edge: --out {args.out}: {error}")
    post = meta.get("postprocess") or {}
    times = []
    for path in args.images:
        try:
            image = read_image(path)  # the engine applies the export's stain normaliser (meta["stain"])
        except (OSError, ValueError) as error:
            sys.exit(f"serving.edge: {error}")
        stem = _stem(path)
        started = time.perf_counter()
        if args.command == "classify":
            try:
                points = points_for(args.points, path) if args.points else Predictor(detector).predict_points(
                    read_image(path), args.tile, args.margin, samples=1)
            except (OSError, ValueError) as error:
                sys.exit(f"serving.edge: {error}")
            probabilities = model.classify(image, points, samples=samples)
            names = meta.get("class_names") or [f"class_{i}" for i in range(probabilities.shape[-1])]
            classes = probabilities.argmax(axis=-1) if len(points) else np.zeros(0, int)
            elapsed = time.perf_counter() - started
            extra = [[int(c), names[int(c)], *(f"{p:.4f}" for p in probs)]
                     for c, probs in zip(classes, probabilities)]
            out = os.path.join(args.out, f"{stem}_classes.csv")
            write_points_csv(out, points, ["class", "name", *[f"p_{n}" for n in names]], extra)
            counts = {names[c]: int((classes == c).sum()) for c in range(len(names)) if (classes == c).any()}
            summary = f"{len(points)} nuclei classified {counts}"
        elif meta["task"] == "instance":  # Mask R-CNN: the engine tiles, detections -> nuclei (no maps)
            labels = Predictor(model).predict_instances(image, margin=args.margin)[0]
            elapsed = time.perf_counter() - started
            if args.command == "segment":
                out = os.path.join(args.out, f"{stem}_labels.png")
                write_labels_png(out, labels)
            else:
                out = os.path.join(args.out, f"{stem}_centroids.csv")
                write_points_csv(out, instance_centroids(labels))
            summary = f"{int(labels.max())} nuclei"
        else:
            maps, variance = model.predict_maps(image, args.tile, args.margin, samples)
            if args.command == "segment":
                labels = instances(maps, post)
                elapsed = time.perf_counter() - started
                out = os.path.join(args.out, f"{stem}_labels.png")
                write_labels_png(out, labels)
                summary = f"{int(labels.max())} nuclei"
            else:
                points = points_from_maps(maps, meta["task"], post)
                elapsed = time.perf_counter() - started
                out = os.path.join(args.out, f"{stem}_centroids.csv")
                write_points_csv(out, points)
                summary = f"{len(points)} nuclei"
            if variance is not None:
                np.save(os.path.join(args.out, f"{stem}_variance.npy"), variance)
        times.append(elapsed)
        print(f"{path}: {summary}, {elapsed * 1000:.1f} ms -> {out}", flush=True)
    print(f"{len(times)} images, {1000 * float(np.mean(times)):.1f} ms per image "
          f"(median {1000 * float(np.median(times)):.1f} ms; model + post-processing, {samples} pass(es))")


if __name__ == "__main__":
    main()
