"""Nuclei from images on the command line.

    python -m kerasnuc.predict MODEL INPUT... --out DIR [--format labels,geojson,csv,overlay]
    kerasnuc-predict runs/unet-20261125 images/ --out nuclei/ --classifier runs/dcrn-20261126

MODEL is a training run folder, a ``.tflite`` export or a TF-Serving ``host:port`` (with
``--model-name``). INPUT is an image file or a folder of them. Per image ``<stem>`` it writes
``<stem>_labels.tif`` (uint32 instance labels; ``--labels-ext png`` for 16-bit PNG),
``<stem>.geojson`` (QuPath detections with measurements), ``<stem>_nuclei.csv`` and
``<stem>_overlay.png``. Files are written atomically; outputs that already exist are skipped
unless ``--overwrite``; an unreadable input is reported by name and the others go on (the
exit code is 1 if any failed).
"""

import argparse
import os
import sys
import time

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def expand_inputs(inputs):
    """Image files of the given files and folders (a folder: its images, sorted)."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, name) for name in os.listdir(item)
                            if name.lower().endswith(IMAGE_EXTENSIONS))
        else:
            paths.append(item)
    return paths


def output_paths(out, path, formats, labels_ext):
    stem = os.path.splitext(os.path.basename(path))[0]
    names = {"labels": f"{stem}_labels.{labels_ext}", "geojson": f"{stem}.geojson",
             "csv": f"{stem}_nuclei.csv", "overlay": f"{stem}_overlay.png"}
    return {fmt: os.path.join(out, names[fmt]) for fmt in formats}


def predict_file(predictor, path, targets, mpp=None):
    """Read, predict, write every target; returns the number of nuclei."""
    from kerasnuc.data.imageio import read_image
    from kerasnuc.predict import writers

    image = read_image(path)
    labels, table = predictor.predict_instances(image)
    if "labels" in targets:
        writers.write_labels(targets["labels"], labels)
    if "geojson" in targets:
        writers.write_geojson(targets["geojson"], labels, table, mpp=mpp)
    if "csv" in targets:
        writers.write_table_csv(targets["csv"], table, mpp=mpp)
    if "overlay" in targets:
        writers.write_overlay(targets["overlay"], image, labels)
    return len(table["id"])


def main(argv=None):
    from kerasnuc.predict.writers import FORMATS

    parser = argparse.ArgumentParser(prog="python -m kerasnuc.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="run folder, .tflite file or host:port of TF-Serving")
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", default=",".join(FORMATS),
                        help=f"comma-separated, any of {', '.join(FORMATS)} (default: all)")
    parser.add_argument("--model-name", help="model name on a TF-Serving target")
    parser.add_argument("--classifier", help="classification model (run folder or .tflite) for every nucleus")
    parser.add_argument("--labels-ext", choices=("tif", "png"), default="tif")
    parser.add_argument("--mpp", type=float, help="pixel size in µm (default: the run's, if recorded)")
    parser.add_argument("--block", type=int, default=2048, help="block side for large images (default 2048)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite outputs that exist")
    args = parser.parse_args(argv)

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        parser.error(f"unknown --format {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    from kerasnuc.predict import load

    try:
        predictor = load(args.model, model_name=args.model_name, classifier=args.classifier, block=args.block)
    except (OSError, ValueError) as error:
        sys.exit(f"kerasnuc.predict: {error}")
    mpp = args.mpp or predictor.meta.get("mpp")
    paths = expand_inputs(args.inputs)
    if not paths:
        sys.exit("kerasnuc.predict: no input images found")
    os.makedirs(args.out, exist_ok=True)
    from rich.progress import Progress

    written, skipped, failed, nuclei = [], [], [], 0
    started = time.perf_counter()
    with Progress(transient=True) as progress:
        task = progress.add_task("images", total=len(paths))
        for path in paths:
            targets = output_paths(args.out, path, formats, args.labels_ext)
            if not args.overwrite and all(os.path.exists(t) for t in targets.values()):
                skipped.append(path)
            else:
                try:
                    count = predict_file(predictor, path, targets, mpp)
                    nuclei += count
                    written.extend(targets.values())
                    progress.console.print(f"{path}: {count} nuclei")
                except (OSError, ValueError) as error:
                    failed.append(path)
                    progress.console.print(f"kerasnuc.predict: {error}", style="red")
            progress.advance(task)
    elapsed = time.perf_counter() - started
    print(f"{len(paths) - len(skipped) - len(failed)} images, {nuclei} nuclei in {elapsed:.1f} s; "
          f"{len(written)} files written to {args.out}"
          + (f"; {len(skipped)} skipped (outputs exist; --overwrite to redo)" if skipped else "")
          + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
