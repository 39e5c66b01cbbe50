"""The LiteRT runtime: a ``.tflite`` export with its metadata JSON (``python -m export.tflite``).

Normalised float32 batches in, dequantised float32 out; int8 models get their input
quantised with the input tensor's parameters. A model with a static input (edge
accelerators) is never resized: batches run in calls of its fixed batch, and the engine
tiles images in exactly its H x W. Imports LiteRT and NumPy only.
"""

import os

import numpy as np


def metadata_path(model_path):
    return os.path.splitext(model_path)[0] + ".json"


def load_metadata(model_path, path=None):
    """The metadata dict of a .tflite: ``path`` or ``<model>.json`` beside it. ValueError /
    FileNotFoundError (one line naming the file) for a missing .tflite, a missing or
    unreadable JSON, one without a known task and channels, or one whose stain normaliser's
    file (a dcgmm network, stored relative to the JSON's folder) is missing."""
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"{model_path}: .tflite file not found")
    path = path or metadata_path(model_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: metadata JSON not found (written by python -m export.tflite "
                                "beside the .tflite; or pass --metadata)")
    from kerasnuc.runs import TASKS, check_config, read_json_object

    meta = read_json_object(path)  # RunError (a ValueError) naming the file
    if meta.get("task") not in TASKS:  # required here: a run's config.json may omit it, metadata may not
        raise ValueError(f"{path}: metadata task {meta.get('task')!r} is none of {', '.join(TASKS)} "
                         "(not a python -m export.tflite metadata file?)")
    check_config(meta, path)
    if meta.get("stain"):  # a dcgmm network travels beside the JSON: its path is relative to it
        from kerasnuc.data.stain import resolve_paths

        meta["stain"] = resolve_paths(meta["stain"], os.path.dirname(os.path.abspath(path)), where=path)
    return meta


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
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: .tflite file not found")
        resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            self.interpreter = Interpreter(model_path=path, num_threads=num_threads,
                                           experimental_op_resolver_type=resolver)
        except (ValueError, RuntimeError) as error:
            detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(f"{path}: not a readable .tflite model ({detail})") from None
        outputs = 3 if self.meta.get("task") == "instance" else 1  # boxes, scores, masks
        if len(self.interpreter.get_input_details()) != 1 or len(self.interpreter.get_output_details()) != outputs:
            raise ValueError(f"{path}: a kerasnuc export has one input and {'three outputs' if outputs > 1 else 'one output'}"
                             f", this .tflite has {len(self.interpreter.get_input_details())} and "
                             f"{len(self.interpreter.get_output_details())}")
        self.input = self.interpreter.get_input_details()[0]
        self._read_outputs()
        self._check_task()
        signature = [int(s) for s in self.input["shape_signature"]]
        # fixed batch (None: any) and fixed (H, W) (None: any) of the input tensor
        self.static_batch = signature[0] if signature[0] > 0 else None
        self.static_shape = tuple(signature[1:3]) if len(signature) == 4 and min(signature[1:3]) > 0 else None
        # Tensors are allocated at the first run, for its shape: a model with dynamic height
        # and width has a placeholder 1x1 input that builtin kernels refuse to prepare.
        self._shape = None

    def _check_task(self):
        """The .tflite's tensor shapes must fit its metadata's task (kerasnuc.model_checks);
        metadata given in memory without a task (tests, tools) is not checked."""
        from kerasnuc.model_checks import instance_shape_problems, shape_problems

        if "task" not in self.meta:
            return
        if self.meta["task"] == "instance":
            problems = instance_shape_problems(self.meta.get("channels"), self.input["shape_signature"],
                                               [o["shape_signature"] for o in self.outputs], claimed_by="metadata")
            if problems:
                raise ValueError(f"{self.path}: the model does not match its metadata: " + "; ".join(problems))
            return

        problems = shape_problems(self.meta.get("task"), self.meta.get("channels"),
                                  self.input["shape_signature"], self.output["shape_signature"],
                                  len(self.meta.get("class_names") or ()) or None, claimed_by="metadata")
        if problems:
            raise ValueError(f"{self.path}: the model does not match its metadata: " + "; ".join(problems))

    def _read_outputs(self):
        """The output details; an instance model's three in the order boxes, scores, masks
        (told apart by rank: 3, 2 and 4; LiteRT does not keep the Keras output order)."""
        details = self.interpreter.get_output_details()
        if len(details) == 3:
            details = sorted(details, key=lambda o: {3: 0, 2: 1, 4: 2}.get(len(o["shape_signature"]), 3))
        self.outputs, self.output = details, details[0]

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
        from kerasnuc.predict.tiling import fitting_margin

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
            self._read_outputs()
            self._shape = tuple(shape)

    def quantize_input(self, batch):
        dtype = self.input["dtype"]
        if dtype == np.float32:
            return batch.astype(np.float32, copy=False)
        scale, zero = self.input["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(batch / scale + zero), info.min, info.max).astype(dtype)

    def dequantize_output(self, out, output=None):
        output = output or self.output
        if output["dtype"] == np.float32:
            return out.astype(np.float32, copy=False)
        scale, zero = output["quantization"]
        return ((out.astype(np.float32) - zero) * scale).astype(np.float32)

    def _invoke(self, batch):
        self._resize(batch.shape)
        self.interpreter.set_tensor(self.input["index"], self.quantize_input(batch))
        self.interpreter.invoke()
        if len(self.outputs) > 1:  # an instance model: (boxes, scores, masks)
            return tuple(self.dequantize_output(self.interpreter.get_tensor(o["index"]), o) for o in self.outputs)
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
            from kerasnuc.predict.engine import Predictor

            predictor = Predictor(self)
            return np.stack([predictor.run_tiled(x) for x in batch])
        size = self.static_batch
        if size is None or len(batch) == size:
            return self._invoke(batch)
        if len(self.outputs) > 1:  # an instance model: one call per image, outputs stacked per tensor
            calls = [self._invoke(batch[i:i + 1]) for i in range(len(batch))]
            return tuple(np.concatenate(parts) for parts in zip(*calls))
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

    def run_tiled(self, x, tile=None, margin=None):
        """(H, W, K) map of a normalised image stitched from tiles: :meth:`Predictor.run_tiled`."""
        from kerasnuc.predict.engine import Predictor

        return Predictor(self).run_tiled(x, tile, margin)

    def predict_maps(self, image, tile=None, margin=None, samples=1):
        """(mean, variance or None) maps of a uint8 image: :meth:`Predictor.predict_maps`."""
        from kerasnuc.predict.engine import Predictor

        return Predictor(self).predict_maps(image, tile=tile, margin=margin, samples=samples)

    def classify(self, image, points, batch_size=64, samples=1):
        """(K, classes) probabilities at (x, y) points: :meth:`Predictor.classify`."""
        from kerasnuc.predict.engine import Predictor

        return Predictor(self).classify(image, points, batch_size=batch_size, samples=samples)
