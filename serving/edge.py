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
``classify``. Each line printed says how many nuclei and the time per image.

The .tflite takes the *normalised* model input (float32, or uint8 for int8 models with
the quantisation in the input tensor's parameters); this module normalises exactly as
training did (:mod:`serving.tiling`). Images larger than ``--tile`` are tiled with the
whole image's intensity range. Monte-Carlo dropout models run ``--samples`` passes and
also write ``<stem>_variance.npy``.

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
import json
import os
import sys
import time

import numpy as np

from serving.tiling import TilePlan, intensity_range, normalize_with_range, pad_to_multiple, patches_at

TASK_OF_COMMAND = {"segment": ("segmentation",), "detect": ("detection", "segmentation"),
                   "classify": ("classification",)}


def metadata_path(model_path):
    return os.path.splitext(model_path)[0] + ".json"


def load_metadata(model_path, path=None):
    path = path or metadata_path(model_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: metadata JSON not found (written by python -m export.tflite "
                                "beside the .tflite; or pass --metadata)")
    with open(path) as handle:
        return json.load(handle)


def fitting_margin(tile_shape, margin, multiple):
    """``margin`` rounded up to ``multiple`` (as TilePlan does), lowered to the largest multiple
    that leaves every side of a ``tile_shape`` tile a positive step (``side > 2 * margin``)."""
    m = max(int(multiple), 1)
    margin = -(-max(int(margin), 0) // m) * m
    limit = ((min(tile_shape) - 1) // 2) // m * m
    return int(max(0, min(margin, limit)))


def pad_to_tile(image, multiple, tile_shape):
    """(H, W, C) padded at the bottom/right to multiples of ``multiple`` (the whole-image rule)
    and then, by mirroring, up to at least ``tile_shape``."""
    padded = pad_to_multiple(image, multiple)
    extra = (max(0, tile_shape[0] - padded.shape[0]), max(0, tile_shape[1] - padded.shape[1]))
    if not any(extra):
        return padded
    mode = "reflect" if min(padded.shape[:2]) > 1 else "edge"
    return np.pad(padded, ((0, extra[0]), (0, extra[1])) + ((0, 0),) * (padded.ndim - 2), mode=mode)


class LiteModel:
    """A .tflite model with its metadata: normalised batches in, dequantised float32 out.

    ``xnnpack=False`` runs LiteRT's builtin kernels without the default XNNPACK delegate.
    A model exported with a static input (``export.tflite --input-size``, e.g. [1, H, W, C])
    is never resized: larger batches run in batch-1 calls, and images of another size
    (``run`` of a segmentation / detection model, ``predict_maps``) go through H x W tiles.
    """

    def __init__(self, path, meta=None, num_threads=None, xnnpack=True):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        self.path = path
        self.meta = meta if meta is not None else load_metadata(path)
        resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self.interpreter = Interpreter(model_path=path, num_threads=num_threads,
                                       experimental_op_resolver_type=resolver)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        signature = [int(s) for s in self.input["shape_signature"]]
        # fixed batch (None: any) and fixed (H, W) (None: any) of the input tensor
        self.static_batch = signature[0] if signature[0] > 0 else None
        self.static_shape = tuple(signature[1:3]) if len(signature) == 4 and min(signature[1:3]) > 0 else None
        # Tensors are allocated at the first run, for its shape: a model with dynamic height
        # and width has a placeholder 1x1 input that builtin kernels refuse to prepare.
        self._shape = None

    @property
    def input_dtype(self):
        return self.input["dtype"]

    @property
    def dense(self):
        """True for models that map images to maps (segmentation, detection)."""
        return self.meta.get("task") != "classification"

    @property
    def tiles_fixed(self):
        """True if images must go through tiles of exactly ``static_shape`` (static dense model)."""
        return self.dense and self.static_shape is not None

    def static_margin(self, margin=None):
        """The tile margin used with a static input: ``margin`` (default: the metadata's),
        lowered where needed to leave each tile a positive step."""
        margin = self.meta.get("tile_margin", 32) if margin is None else margin
        return fitting_margin(self.static_shape, margin, self.meta.get("multiple", 16))

    def _resize(self, shape):
        if tuple(shape) != self._shape:
            if tuple(shape) != tuple(self.input["shape"]):
                if self.static_shape is not None and self.static_batch is not None:
                    raise ValueError(f"{self.path}: the input is fixed at {list(self.input['shape'])}, "
                                     f"got {list(shape)}")
                self.interpreter.resize_tensor_input(self.input["index"], list(shape), strict=False)
            self.interpreter.allocate_tensors()
            self.input = self.interpreter.get_input_details()[0]
            self.output = self.interpreter.get_output_details()[0]
            self._shape = tuple(shape)

    def quantize_input(self, batch):
        dtype = self.input["dtype"]
        if dtype == np.float32:
            return batch.astype(np.float32, copy=False)
        scale, zero = self.input["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(batch / scale + zero), info.min, info.max).astype(dtype)

    def dequantize_output(self, out):
        if self.output["dtype"] == np.float32:
            return out.astype(np.float32, copy=False)
        scale, zero = self.output["quantization"]
        return ((out.astype(np.float32) - zero) * scale).astype(np.float32)

    def _invoke(self, batch):
        self._resize(batch.shape)
        self.interpreter.set_tensor(self.input["index"], self.quantize_input(batch))
        self.interpreter.invoke()
        return self.dequantize_output(self.interpreter.get_tensor(self.output["index"]))

    def run(self, batch):
        """(N, H, W, C) float32 normalised input -> float32 model output.

        With a static input: N is split into calls of the fixed batch (the last one padded
        with copies), and a dense model given another H x W runs each image in static tiles
        (``run_tiled``), returning (N, H, W, K).
        """
        batch = np.asarray(batch)
        if self.static_shape is not None and tuple(batch.shape[1:3]) != self.static_shape:
            if not self.dense:
                raise ValueError(f"{self.path}: the input is fixed at {self.static_shape[0]}x"
                                 f"{self.static_shape[1]}, got {batch.shape[1]}x{batch.shape[2]}")
            return np.stack([self.run_tiled(x) for x in batch])
        size = self.static_batch
        if size is None or len(batch) == size:
            return self._invoke(batch)
        outs = []
        for start in range(0, len(batch), size):
            chunk = batch[start:start + size]
            count = len(chunk)
            if count < size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - count, axis=0)])
            outs.append(self._invoke(chunk)[:count])
        if not outs:
            return np.zeros((0, *self.output["shape"][1:]), np.float32)
        return np.concatenate(outs)

    def _tiles(self, height, width, tile, margin):
        """(plan, pad function) for an image of (height, width)."""
        multiple = self.meta.get("multiple", 16)
        if self.tiles_fixed:
            shape = [max(-(-size // multiple) * multiple, side) for size, side in
                     zip((height, width), self.static_shape)]  # pad_to_tile's shape
            plan = TilePlan(shape[0], shape[1], self.static_shape, self.static_margin(margin), multiple)
            return plan, lambda image: pad_to_tile(image, multiple, self.static_shape)
        tile = self.meta.get("serving_tile", 256) if tile is None else tile
        margin = self.meta.get("tile_margin", 32) if margin is None else margin
        if not tile:
            tile, margin = max(height, width) + multiple, 0
        plan = TilePlan(height, width, tile, margin, multiple)
        return plan, plan.pad

    def _stitched(self, plan, padded, height, width):
        outs = [self.run(padded[None, top:top + plan.tile_shape[0], left:left + plan.tile_shape[1]])[0]
                for top, left, _, _ in plan.tiles]
        return plan.stitch(outs)[:height, :width]

    def run_tiled(self, x, tile=None, margin=None):
        """(H, W, C) normalised float32 image -> (H, W, K) map stitched from tiles (static
        models: tiles of exactly the static input, whatever ``tile``)."""
        x = np.asarray(x)
        plan, pad = self._tiles(x.shape[0], x.shape[1], tile, margin)
        return self._stitched(plan, pad(x), x.shape[0], x.shape[1])

    def predict_maps(self, image, tile=None, margin=None, samples=1):
        """(H, W, C) uint8 image -> ((H, W, K) mean map, (H, W, K) variance or None).

        ``tile``: None uses the metadata's serving tile, 0 runs the whole (padded) image at once.
        A static model ignores ``tile``: its tiles are its fixed input (small images padded up
        to it by mirroring), with ``margin`` lowered where needed to fit (``static_margin``).
        """
        channels = self.meta["channels"]
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[..., None]
        value_range = intensity_range(image, channels)
        plan, pad = self._tiles(image.shape[0], image.shape[1], tile, margin)
        padded = normalize_with_range(pad(image), channels, value_range)
        samples = max(1, int(samples))
        total = total_sq = None
        for _ in range(samples):
            maps = self._stitched(plan, padded, image.shape[0], image.shape[1]).astype(np.float64)
            total = maps if total is None else total + maps
            total_sq = maps ** 2 if total_sq is None else total_sq + maps ** 2
        mean = total / samples
        variance = np.maximum(total_sq / samples - mean ** 2, 0.0) if samples > 1 else None
        return mean.astype(np.float32), None if variance is None else variance.astype(np.float32)

    def classify(self, image, points, batch_size=64, samples=1):
        """(K, classes) probabilities for nuclei at (x, y) ``points`` of a uint8 image."""
        meta = self.meta
        channels, size = meta["channels"], meta["patch"]
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if len(points) == 0:
            return np.zeros((0, meta.get("output_channels", len(meta.get("class_names") or [1]))), np.float32)
        value_range = intensity_range(image, channels)
        patches = normalize_with_range(patches_at(image, points, size), channels, value_range)
        outs = []
        for start in range(0, len(patches), batch_size):
            chunk = patches[start:start + batch_size]
            outs.append(np.mean([self.run(chunk) for _ in range(max(1, samples))], axis=0))
        return np.concatenate(outs).astype(np.float32)


# ----------------------------------------------------------------------------- post-processing


def _postprocess_module():
    try:
        import kerasnuc.postprocess as post

        return post
    except ImportError as error:  # SciPy / scikit-image missing on the device
        print(f"serving.edge: {error}; falling back to OpenCV post-processing "
              "(no watershed split, no sub-pixel peaks)", file=sys.stderr)
        return None


def _kwargs(function, params):
    import inspect

    accepted = inspect.signature(function).parameters
    return {k: v for k, v in (params or {}).items() if k in accepted}


def instances(prob, params):
    """Instance labels from a probability map (kerasnuc.postprocess or an OpenCV fallback)."""
    post = _postprocess_module()
    if post is not None:
        return post.instances_from_probability(prob, **_kwargs(post.instances_from_probability, params))
    import cv2

    prob = np.asarray(prob, np.float32)
    foreground = (prob[..., 1] + prob[..., 2]) if prob.ndim == 3 and prob.shape[-1] == 3 else prob.reshape(prob.shape[:2])
    mask = (foreground > params.get("threshold", 0.5)).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    small = stats[:, cv2.CC_STAT_AREA] < params.get("min_area", 10)
    small[0] = False
    labels[small[labels]] = 0
    _, labels = np.unique(labels, return_inverse=True)
    return labels.reshape(mask.shape).astype(np.int32)


def centroids(density, params):
    """(K, 2) (x, y) peaks of a density map (kerasnuc.postprocess or an OpenCV fallback)."""
    post = _postprocess_module()
    if post is not None:
        return post.centroids_from_density(density, **_kwargs(post.centroids_from_density, params))
    import cv2

    density = np.asarray(density, np.float32).reshape(density.shape[:2])
    distance = max(int(params.get("min_distance", 3)), 1)
    kernel = np.ones((2 * distance + 1, 2 * distance + 1), np.uint8)
    peaks = (density == cv2.dilate(density, kernel)) & (density > params.get("threshold", 0.1))
    rows, cols = np.nonzero(peaks)
    return np.stack([cols, rows], axis=1).astype(np.float64)


def instance_centroids(labels):
    """(K, 2) (x, y) centroids of instances 1..K."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return np.zeros((0, 2))
    rows, cols = np.indices(labels.shape)
    flat = labels.ravel()
    count = np.bincount(flat, minlength=ids.max() + 1)
    x = np.bincount(flat, cols.ravel(), minlength=ids.max() + 1)[ids] / count[ids]
    y = np.bincount(flat, rows.ravel(), minlength=ids.max() + 1)[ids] / count[ids]
    return np.stack([x, y], axis=1)


def detect_points(model, image, tile=None, margin=None, samples=1):
    """Nucleus centres from a detection (density peaks) or segmentation (instance centroids) model."""
    meta = model.meta
    maps, _ = model.predict_maps(image, tile, margin, samples)
    if meta["task"] == "segmentation":
        return instance_centroids(instances(maps, meta.get("postprocess")))
    return centroids(maps[..., 0] if maps.shape[-1] == 1 else maps.max(axis=-1), meta.get("postprocess"))


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


def _apply_stain(meta, image):
    stain = meta.get("stain")
    if not stain or image.ndim != 3 or image.shape[2] != 3:
        return image
    from kerasnuc.data.stain import normalizer_from_dict  # NumPy only

    return normalizer_from_dict(stain).transform(image)


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

    try:
        model = LiteModel(args.model, load_metadata(args.model, args.metadata), args.threads)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"serving.edge: {error}")
    meta = model.meta
    if meta["task"] not in TASK_OF_COMMAND[args.command]:
        sys.exit(f"serving.edge: {args.model} is a {meta['task']} model; '{args.command}' needs "
                 f"{' or '.join(TASK_OF_COMMAND[args.command])}")
    detector = None
    if args.command == "classify":
        if not args.points and not args.detector:
            sys.exit("serving.edge: classify needs --points CSV|DIR or --detector MODEL.tflite")
        if args.detector:
            detector = LiteModel(args.detector, load_metadata(args.detector), args.threads)
    tiled = model if model.dense else detector  # the model that --tile / --margin apply to
    if tiled is not None and tiled.tiles_fixed:
        print(tiling_note(tiled, args.tile, args.margin), file=sys.stderr, flush=True)
    samples = args.samples or (meta.get("mc_samples", 10) if meta.get("stochastic") else 1)
    os.makedirs(args.out, exist_ok=True)
    post = meta.get("postprocess") or {}
    times = []
    for path in args.images:
        try:
            image = _apply_stain(meta, read_image(path))
        except (OSError, ValueError) as error:
            sys.exit(f"serving.edge: {error}")
        stem = _stem(path)
        started = time.perf_counter()
        if args.command == "classify":
            points = points_for(args.points, path) if args.points else detect_points(
                detector, _apply_stain(detector.meta, read_image(path)), args.tile, args.margin)
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
        else:
            maps, variance = model.predict_maps(image, args.tile, args.margin, samples)
            if args.command == "segment":
                labels = instances(maps, post)
                elapsed = time.perf_counter() - started
                out = os.path.join(args.out, f"{stem}_labels.png")
                write_labels_png(out, labels)
                summary = f"{int(labels.max())} nuclei"
            else:
                if meta["task"] == "segmentation":
                    points = instance_centroids(instances(maps, post))
                else:
                    points = centroids(maps[..., 0] if maps.shape[-1] == 1 else maps.max(axis=-1), post)
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
