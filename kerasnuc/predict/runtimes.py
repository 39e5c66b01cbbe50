"""Where the network runs: one ``run(batch)`` and one metadata record per kind of model.

* :class:`KerasRuntime`: a ``training.fit`` run folder (``model.keras``, loaded without its
  training compile state, so a model trained under JAX with ``jit_compile`` runs plainly).
* :class:`kerasnuc.predict.litert.LiteModel`: a ``.tflite`` export (no TensorFlow, Keras or JAX).
* :class:`GrpcRuntime`: a TF-Serving target (``host:port`` + model name), the official
  ``tensorflow-serving-api`` stub on the ``maps`` output of the normalised-input signature.

The metadata keys are those of :func:`kerasnuc.runs.run_metadata`.
"""

import os

import numpy as np


class KerasRuntime:
    """A run folder's ``model.keras`` (Keras safe mode, uncompiled) with the run's metadata.

    ``meta`` given with ``run_dir``: the metadata another process already derived from the same
    run (a Dask client for its workers), so the receptive field is not probed again."""

    def __init__(self, run_dir=None, measure=True, model=None, meta=None):
        self.static_shape = None
        self.measured = False
        if model is not None:  # a model in memory (training, tests)
            self.path, self.model, self.meta = "<in memory>", model, dict(meta or {})
        else:
            from kerasnuc import runs

            run = runs.read_run(run_dir)  # read once, passed on
            self.path = run.path
            self.model = runs.load_model(run)
            if meta is not None:
                self.meta = dict(meta)
            else:
                self.meta = runs.run_metadata(run, self.model, measure=measure)
                self.measured = bool(measure)
        if self.meta.get("task") == "instance":  # Mask R-CNN: a fixed input size, tiled to
            self.static_shape = tuple(int(side) for side in self.model.input_shape[1:3])

    def run(self, batch):
        """float32 output of a normalised batch; a model with several outputs (an instance
        model's boxes, scores, masks) gives a tuple of them in the model's order."""
        batch = np.asarray(batch, np.float32)
        out = self.model.predict_on_batch(batch)
        if isinstance(out, dict):
            out = [out[name] for name in self.model.output_names]
        if isinstance(out, (list, tuple)):
            return tuple(np.asarray(o, dtype=np.float32) for o in out)
        return np.asarray(out, dtype=np.float32)


def predict_maps(model, image, channels, multiple=16):
    """(H, W, K) float32 map of a whole uint8 image by a Keras model in memory (training's
    held-out evaluation and the export checks): the engine with one untiled pass."""
    from kerasnuc.predict.engine import Predictor

    runtime = KerasRuntime(model=model, meta={"channels": channels, "multiple": multiple})
    return Predictor(runtime).predict_maps(image, tile=0, samples=1)[0]


class GrpcRuntime:
    """A model served by TF-Serving (``serving.server`` or ``tensorflow_model_server``).

    Tiles go out as uint8 with the whole image's (min, max) (the ``with_range`` signature:
    the server's graph normalises); the engine submits every batch of an image at once, up
    to the client's ``in_flight`` requests run together. Monte-Carlo models use the
    ``uncertainty_with_range`` signature (T passes in the graph, mean and variance back).
    """

    takes_raw = True
    mc_in_graph = True
    static_shape = None

    def __init__(self, target=None, model_name=None, timeout=60.0, client=None):
        if client is None:
            from serving.client import ServingClient

            client = ServingClient(target, model_name, timeout=timeout)
        self.client = client
        self.path = f"{client.target}/{client.model}"
        self.meta = client.meta

    def submit(self, tiles, value_range, uncertainty=False):
        """A future of the outputs of one batch: (maps,) or (mean, variance)."""
        ranges = np.repeat(np.asarray(value_range, np.float32)[None], len(tiles), axis=0)
        inputs = {"image": np.ascontiguousarray(tiles), "intensity_range": ranges}
        classification = self.meta.get("task") == "classification"
        if uncertainty:
            signature, keys = "uncertainty_with_range", ("mean", "variance")
        elif self.meta.get("task") == "instance":
            from kerasnuc.predict.detections import OUTPUTS

            signature, keys = "with_range", OUTPUTS
        else:
            signature, keys = "with_range", ("probabilities" if classification else "maps",)
        job = self.client.submit(signature, inputs, keys)
        return _Mapped(job, lambda out: tuple(np.asarray(out[key], np.float32) for key in keys))

    def run_raw(self, tiles, value_range):
        """uint8 tiles + the whole image's (min, max) -> float32 model output (one pass); an
        instance model's (boxes, scores, masks)."""
        outs = self.submit(tiles, value_range).result()
        return outs if self.meta.get("task") == "instance" else outs[0]


class _Mapped:
    """A future whose result is ``convert``ed."""

    def __init__(self, job, convert):
        self.job, self.convert = job, convert

    def result(self):
        return self.convert(self.job.result())


def open_runtime(source, model_name=None, **options):
    """The runtime for a run folder, a ``.tflite`` file, a ``host:port`` target (+ ``model_name``)
    or a pretrained model's name (:func:`kerasnuc.pretrained.resolve`)."""
    from kerasnuc.pretrained import resolve

    source = os.fspath(resolve(source))
    if source.endswith(".tflite"):
        from kerasnuc.predict.litert import LiteModel

        if not os.path.exists(source):
            raise FileNotFoundError(f"{source}: .tflite file not found")
        return LiteModel(source, meta=options.get("meta"), num_threads=options.get("num_threads"))
    if os.path.isdir(source):
        if os.path.exists(os.path.join(source, "model.keras")) or os.path.exists(os.path.join(source, "config.json")):
            return KerasRuntime(source, measure=options.get("measure", True), meta=options.get("meta"))
        raise ValueError(f"{source}: neither a training run folder (model.keras + config.json) nor a .tflite file")
    if ":" in source and model_name:
        return GrpcRuntime(source, model_name)
    if ":" in source:
        raise ValueError(f"{source}: a TF-Serving target needs a model name (model_name=...)")
    raise FileNotFoundError(f"{source}: no such run folder or .tflite file")
