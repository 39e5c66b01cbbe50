"""Nuclei from images on the command line.

    python -m kerasnuc.predict MODEL INPUT... --out DIR [--format labels,geojson,csv,overlay]
    kerasnuc-predict runs/unet-20261125 images/ --out nuclei/ --classifier runs/dcrn-20261126

MODEL is a training run folder, a ``.tflite`` export, a TF-Serving ``host:port`` (with
``--model-name``) or a pretrained model's name (fluo, he, crc-detect, crc-classify:
:mod:`kerasnuc.pretrained`; a file or folder of that name here wins). INPUT is an image file, a whole slide (pyramidal TIFF / OME-TIFF, or SVS,
NDPI, MRXS, SCN... with the ``[wsi]`` extra) or a folder of them. Slides are read at the
level nearest the model's pixel size (``--mpp`` overrides), glass is skipped, and positions
are reported in level-0 pixels. Per image ``<stem>`` it writes
``<stem>_labels.tif`` (uint32 instance labels; ``--labels-ext png`` for 16-bit PNG),
``<stem>.geojson`` (QuPath detections with measurements), ``<stem>_nuclei.csv`` and
``<stem>_overlay.png``; a detection model (e.g. crc-detect) finds centres, not outlines: its
nuclei are Point detections in the GeoJSON, rows of id, centroid, score (and class) in the CSV,
dots on the overlay, and there is no label image. Files are written atomically; outputs that already exist are skipped
unless ``--overwrite``. A bad input (unreadable, truncated, over ``--max-pixels``) stops the
run with one error naming it and exit code 1 (the finished images' files are whole, the
unfinished ones removed); with ``--skip-bad`` it is skipped and listed (file and reason) in
the summary and in ``skipped.json`` in the output folder, and the others go on.
``--dask`` runs one task per block on a local Dask cluster (``--dask-workers N``), or on an
existing one with ``--scheduler ADDRESS``, with the same outputs (:mod:`kerasnuc.predict.distributed`).
"""

import argparse
import functools
import os
import sys
import time

from kerasnuc.predict.sources import SLIDE_EXTENSIONS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp") + SLIDE_EXTENSIONS


def expand_inputs(inputs):
    """Image and slide files of the given files and folders (a folder: its images, sorted)."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, name) for name in os.listdir(item)
                            if name.lower().endswith(IMAGE_EXTENSIONS) and ".tmp" not in name)
        else:
            paths.append(item)
    return paths


def output_paths(out, path, formats, labels_ext):
    name = os.path.basename(path)
    stem = name[:-len(".ome.tiff")] if name.lower().endswith(".ome.tiff") else os.path.splitext(name)[0]
    stem = stem[:-len(".ome")] if stem.lower().endswith(".ome") else stem
    names = {"labels": f"{stem}_labels.{labels_ext}", "geojson": f"{stem}.geojson",
             "csv": f"{stem}_nuclei.csv", "overlay": f"{stem}_overlay.png"}
    return {fmt: os.path.join(out, names[fmt]) for fmt in formats}


class Outputs:
    """The writers of one input, fed block by block; all renamed into place at ``close``."""

    def __init__(self, targets, view, predictor, mpp):
        from kerasnuc.predict import writers
        from kerasnuc.predict.measure import empty_table

        self.writers = {}
        level0_mpp = getattr(getattr(view, "slide", None), "mpp", None) or getattr(view, "mpp", None) or mpp
        self.downsample = view.downsample
        try:
            if "labels" in targets:
                self.writers["labels"] = writers.LabelsWriter(targets["labels"], view.shape, view.mpp or mpp)
            if "geojson" in targets:
                names = (predictor.classifier.meta.get("class_names") if predictor.classifier else None)
                self.writers["geojson"] = writers.GeoJSONWriter(targets["geojson"], level0_mpp, names)
            if "csv" in targets and predictor.task == "detection":
                from kerasnuc.predict.engine import empty_point_table

                columns = list(empty_point_table(predictor.classifier is not None))
                self.writers["csv"] = writers.CSVWriter(targets["csv"], columns, level0_mpp)
            elif "csv" in targets:
                columns = list(empty_table(view.shape[2], predictor.classifier is not None, predictor.stochastic))
                self.writers["csv"] = writers.CSVWriter(targets["csv"], columns, level0_mpp)
            if "overlay" in targets:
                self.writers["overlay"] = writers.OverlayWriter(targets["overlay"], view)
        except BaseException:
            self.abort()
            raise
        self.nuclei = 0

    def add(self, result):
        for fmt, writer in self.writers.items():
            if fmt == "geojson":
                writer.add(result.labels, result.table, offset=result.box[::2], downsample=self.downsample,
                           rings=result.rings)
            elif fmt == "csv":
                writer.add(result.table)
            else:
                writer.add(result)
        self.nuclei += len(result.table["id"])

    def close(self):
        return [writer.close() for writer in self.writers.values()]

    def abort(self):
        for writer in self.writers.values():
            writer.abort()


def main(argv=None):
    from kerasnuc.predict.writers import FORMATS, POINT_FORMATS

    parser = argparse.ArgumentParser(prog="python -m kerasnuc.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="run folder, .tflite file, host:port of TF-Serving or pretrained name")
    parser.add_argument("inputs", nargs="+", help="image or slide files, or folders of them")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format",
                        help=f"comma-separated, any of {', '.join(FORMATS)} (default: all; a detection model, "
                             f"which finds centres, not outlines: {', '.join(POINT_FORMATS)})")
    parser.add_argument("--model-name", help="model name on a TF-Serving target")
    parser.add_argument("--classifier", help="classification model (run folder, .tflite or pretrained name, e.g. crc-classify) "
                             "for every nucleus")
    parser.add_argument("--labels-ext", choices=("tif", "png"), default="tif")
    parser.add_argument("--mpp", type=float,
                        help="pixel size (µm) to predict at (default: the model's, as recorded in its run)")
    parser.add_argument("--image-mpp", type=float,
                        help="pixel size (µm) of the inputs when their files do not record it")
    parser.add_argument("--no-tissue-mask", action="store_true",
                        help="predict every block of a slide (default: skip glass found on the thumbnail)")
    parser.add_argument("--block", type=int, default=2048, help="block side for large images (default 2048)")
    parser.add_argument("--block-overlap", type=int, dest="block_overlap", metavar="PX",
                        help="context around each block (default: the model's receptive radius + 64 px); "
                             "must exceed the largest nucleus, which is otherwise dropped at seams (counted)")
    parser.add_argument("--tta", type=int, default=1, choices=range(1, 9), metavar="1..8",
                        help="test-time augmentation: average this many dihedral views (default 1: none)")
    parser.add_argument("--multiple-inference", action="store_true", dest="multiple_inference",
                        help="NucSeg's multiple inference: 7 rotated/flipped views, each view's nuclei mapped "
                             "back, the original's nuclei kept by a pixel majority of their matches (IoU > 0.2); "
                             "7x the passes; not with --tta")
    parser.add_argument("--overwrite", action="store_true", help="rewrite outputs that exist")
    parser.add_argument("--dask", action="store_true",
                        help="one Dask task per block, on a local cluster (or the --scheduler's)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="join this Dask scheduler, e.g. tcp://10.0.0.5:8786 (implies --dask)")
    parser.add_argument("--dask-workers", type=int, metavar="N",
                        help="worker processes of the local Dask cluster (default: one per two cores)")
    from kerasnuc.data import validation

    validation.add_arguments(parser, labels=False, skip_bad=True)
    args = parser.parse_args(argv)

    formats = [f.strip() for f in (args.format or ",".join(FORMATS)).split(",") if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        parser.error(f"unknown --format {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    from kerasnuc.allocator import mmap_large_allocations

    mmap_large_allocations()  # a finished block's arrays go back to the OS (8k slide: 1776 -> 1602 MB peak)
    from kerasnuc.predict import load
    if args.dask or args.scheduler or args.dask_workers is not None:
        from kerasnuc.predict.distributed import dask_loader

        load = dask_loader(args.scheduler, args.dask_workers)
    from kerasnuc.predict.sources import open_view

    try:
        predictor = load(args.model, model_name=args.model_name, classifier=args.classifier, block=args.block,
                         block_overlap=args.block_overlap, tta=args.tta,
                         multiple_inference=args.multiple_inference)
        predictor.require_nuclei()  # a classifier alone finds none
    except (OSError, ValueError) as error:
        sys.exit(f"kerasnuc.predict: {error}")
    if predictor.task == "detection":  # centres (e.g. crc-detect): points in GeoJSON, CSV and overlay
        if args.format is None:
            formats = list(POINT_FORMATS)
        elif "labels" in formats:
            sys.exit(f"kerasnuc.predict: {args.model} is a detection model: it finds nucleus centres, not "
                     f"outlines, so it writes no label image; use --format {','.join(POINT_FORMATS)}")
    model_mpp = predictor.meta.get("mpp")
    paths = expand_inputs(args.inputs)
    if not paths:
        sys.exit("kerasnuc.predict: no input images found")
    os.makedirs(args.out, exist_ok=True)
    todo, skipped = [], []
    for path in paths:
        targets = output_paths(args.out, path, formats, args.labels_ext)
        if not args.overwrite and all(os.path.exists(t) for t in targets.values()):
            skipped.append(path)
        else:
            todo.append((path, targets))
    policy = validation.policy_from_args(args)
    views = [functools.partial(open_view, path, args.mpp, model_mpp, args.image_mpp, policy) for path, _ in todo]
    from rich.progress import Progress

    written, failed, nuclei, oversized = [], [], 0, 0
    outputs, broken = {}, set()
    started = time.perf_counter()

    def fail(index, error):
        failed.append({"file": todo[index][0], "error": str(error)})
        broken.add(index)
        if index in outputs:
            outputs.pop(index).abort()
        if args.skip_bad:
            progress.console.print(f"kerasnuc.predict: skipped {error}", style="red")

    with Progress(transient=True) as progress:
        files = progress.add_task("images", total=len(todo))
        blocks = progress.add_task("blocks", total=None)
        for result in predictor.stream(views, skip_glass=not args.no_tissue_mask, outlines="geojson" in formats):
            index = result.index
            if index in broken:
                continue
            path, targets = todo[index]
            if result.error is not None:
                error = result.error
                fail(index, error if isinstance(error, (OSError, ValueError)) else f"{path}: {error!r}")
                progress.advance(files)
                if not args.skip_bad:
                    break  # the first bad input stops the run (reported below)
                continue
            try:
                if index not in outputs:
                    outputs[index] = Outputs(targets, result.view, predictor, args.image_mpp or model_mpp)
                    progress.reset(blocks, total=result.total, description=os.path.basename(path))
                if not result.skipped:
                    outputs[index].add(result)
                    oversized += result.oversized
                progress.update(blocks, completed=result.done)
                if result.done == result.total:
                    done = outputs.pop(index)
                    written += done.close()
                    nuclei += done.nuclei
                    shape = result.view.shape
                    progress.console.print(f"{path}: {done.nuclei} nuclei ({shape[1]} x {shape[0]} px"
                                           + (f", {result.total} blocks" if result.total > 1 else "") + ")")
                    progress.advance(files)
            except (OSError, ValueError) as error:
                fail(index, error)
                progress.advance(files)
                if not args.skip_bad:
                    break
    for leftover in outputs.values():
        leftover.abort()
    if failed and not args.skip_bad:
        getattr(predictor, "close", lambda: None)()
        sys.exit(f"kerasnuc.predict: {failed[0]['error']} (stopped; --skip-bad skips bad inputs)")
    elapsed = time.perf_counter() - started
    print(f"{len(todo) - len(failed)} images, {nuclei} nuclei in {elapsed:.1f} s; "
          f"{len(written)} files written to {args.out}"
          + (f"; {len(skipped)} skipped (outputs exist; --overwrite to redo)" if skipped else "")
          + (f"; {len(failed)} skipped as bad: {', '.join(f['file'] for f in failed)} (see skipped.json)"
             if failed else ""))
    if oversized:
        from kerasnuc.predict.engine import oversized_message

        print(f"kerasnuc.predict: warning: {oversized_message(oversized, predictor.overlap())}", file=sys.stderr)
    getattr(predictor, "close", lambda: None)()  # a Dask client and its local cluster
    if args.skip_bad:
        from kerasnuc.runs import write_json_atomic

        write_json_atomic(os.path.join(args.out, "skipped.json"), {"skipped": failed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
