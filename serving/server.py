"""An embedded gRPC server speaking TensorFlow Serving's API, for an ``export.saved_model`` base.

    python -m serving.server --base EXPORT_BASE [--port 8500] [--host 127.0.0.1]
        [--max-inflight 2] [--max-queue 4] [--max-request-mpix 4] [--max-inflight-mpix 16]
        [--chunk-mpix 0.5] [--malloc-mmap-kb 1024] [--onednn]

Serves ``EXPORT_BASE/<model>/<version>/`` SavedModels (``tf.saved_model.load``) with
``tensorflow_serving.apis``: PredictionService ``Predict`` and ``GetModelMetadata``,
ModelService ``GetModelStatus``; the same clients work against it and against the real
``tensorflow_model_server`` (the TF-Serving binary is not on PyPI; ``compose.yaml`` in the
base runs the official image).

* Newest version of each model: the base is polled (``--poll`` seconds) and a newer
  integer version folder is loaded, once its files have not changed for one poll (at
  start: at once), and swapped in while the old one keeps answering; hidden staging
  folders are ignored. A version that fails to load (say, copied in file by file with
  pauses) keeps the old one serving and is retried on later polls: when its files have
  changed and settled again, else with an exponential back-off (up to a minute); each
  failure is logged once per change of the folder.
* Binds 127.0.0.1 by default (``--host 0.0.0.0`` to expose it; there is no
  authentication, put it behind a proxy for that).
* Malformed requests (unknown input names, wrong dtype or rank, undecodable tensors,
  empty dimensions, images with 2 channels, a value count that differs from the declared
  shape: TF would broadcast one value to the whole shape...) get INVALID_ARGUMENT with a
  one-line reason and the server keeps serving; an unknown model or version gets NOT_FOUND.
* Load is bounded, and every bound answers at once instead of queueing for ever:
  ``--max-message-mb`` (gRPC max_receive_message_length; RESOURCE_EXHAUSTED);
  ``--max-request-mpix``: the pixels one model call of a request may cost, images x height x
  width padded to the model's multiple x the passes live at once (Monte-Carlo
  ``uncertainty``: T, at most 10 in parallel): more is INVALID_ARGUMENT (send tiles, as
  serving.client does). A batch of a kerasnuc export runs in calls of at most ``--chunk-mpix``
  (at least one image; images are independent: per-image normalisation, inference
  BatchNorm), other SavedModels in one call. ``--max-inflight-mpix``: the pixels of the
  calls of all admitted requests together; ``--max-inflight`` requests run the model at
  once, ``--max-queue`` more wait for a turn; beyond either budget: RESOURCE_EXHAUSTED
  "server busy" (retry later). A request whose client has gone (cancelled, deadline passed)
  while it waited is dropped without running the model, and a chunked batch stops between
  calls.
* Memory is bounded by what the model needs, not by pixels alone: a request's working memory
  is about pixels x the model's activation width, so an export records its working bytes per
  pixel (3 x its widest layer output, :mod:`kerasnuc.models.memory`; bench/results/server_load.md
  measured 2.2 x for the tiny bench U-Net). ``--max-request-mb`` refuses a request estimated
  above it (INVALID_ARGUMENT: send tiles) and ``--max-inflight-mb`` bounds all admitted ones
  (RESOURCE_EXHAUSTED, retry later), beside the pixel budgets; a foreign SavedModel has no
  estimate and only the pixel budgets hold.
* Memory comes back after load: the budgets above bound how much of it is live. Freed memory is handed back to the OS:
  glibc allocations from ``--malloc-mmap-kb`` (1 MiB) are mmapped, and after requests the
  server collects garbage and calls malloc_trim when idle (at least every 10 s under load).
  oneDNN is off by default (``TF_ENABLE_ONEDNN_OPTS=0`` before TensorFlow loads): its kernels
  keep about 2 MB of cache per distinct input shape and the largest request's buffers, so
  RSS climbs with every new tile size; ``--onednn`` turns it back on (2.5x faster on this
  CPU, RSS not flat). The SavedModel signatures are concrete functions: a new input shape
  is not retraced.
"""

import argparse
import gc
import os
import signal
import sys
import threading
import time
from collections import Counter
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from kerasnuc import allocator  # noqa: E402

DEFAULT_SIGNATURE = "serving_default"
MPIX = 1_000_000
MB = 2 ** 20
MAP_FN_PARALLEL = 10  # tf.map_fn's parallel_iterations inside a graph (export.saved_model's MC passes)
MAX_BACKOFF_SECONDS = 60.0
WAIT_STEP_SECONDS = 0.05  # how often a queued request checks that its client is still there
BUSY_PREFIX = "server busy"  # RESOURCE_EXHAUSTED that asks to retry later (serving.client retries it)
TRIM_EVERY_SECONDS = 10.0  # under constant load, hand freed memory back at least this often


@dataclass
class LoadedModel:
    name: str
    version: int
    path: str
    loaded: object
    signature_defs: dict
    inputs: dict = field(default_factory=dict)  # signature -> {input key: TensorSpec}
    meta: dict = field(default_factory=dict)  # assets.extra/kerasnuc.json, {} for other SavedModels

    def function(self, signature):
        return self.loaded.signatures[signature]

    @property
    def multiple(self):
        """The graph pads height and width to this multiple: the pixels the network really sees."""
        return max(1, int(self.meta.get("multiple") or 1))

    @property
    def bytes_per_pixel(self):
        """Working memory of one pass per input pixel (export metadata: pixels x the model's widest
        activation, :mod:`kerasnuc.models.memory`); None for a foreign SavedModel."""
        value = self.meta.get("working_bytes_per_pixel")
        return float(value) if value else None

    def passes(self, signature):
        """Network passes of ``signature`` that may be live at once: Monte-Carlo ``uncertainty*``
        runs T passes through tf.map_fn, up to MAP_FN_PARALLEL of them in parallel."""
        if signature.startswith("uncertainty") and self.meta.get("stochastic"):
            return max(1, min(MAP_FN_PARALLEL, int(self.meta.get("mc_samples") or 1)))
        return 1


def _signature_defs(path):
    """{signature name: SignatureDef proto} of the 'serve' meta graph of a SavedModel."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as handle:
        proto.ParseFromString(handle.read())
    for meta_graph in proto.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            return {k: v for k, v in meta_graph.signature_def.items() if not k.startswith("__")}
    raise ValueError(f"{path}: no 'serve' meta graph")


def _export_meta(path):
    """kerasnuc.json of an export (multiple, channels, MC passes), {} for a foreign SavedModel."""
    from export.saved_model import METADATA_FILE, read_export_metadata

    if not os.path.isfile(os.path.join(path, "assets.extra", METADATA_FILE)):
        return {}
    return read_export_metadata(path)


def load_version(name, version, path):
    import tensorflow as tf

    meta = _export_meta(path)  # first: a half-copied JSON fails the load, it does not mislead it
    loaded = tf.saved_model.load(path)
    defs = _signature_defs(path)
    inputs = {}
    for key in defs:
        function = loaded.signatures[key]
        inputs[key] = dict(function.structured_input_signature[1])
    return LoadedModel(name, version, path, loaded, defs, inputs, meta)


def folder_state(path):
    """(relative path, size, mtime_ns) of every file under ``path``: changes while it is copied in."""
    state = []
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            try:
                info = os.stat(full)
            except OSError:  # removed meanwhile: the folder is changing
                continue
            state.append((os.path.relpath(full, path), info.st_size, info.st_mtime_ns))
    return tuple(sorted(state))


@dataclass
class _Failure:
    """A version folder that failed to load: when to try again, and what was logged."""
    state: tuple  # folder_state at the failed attempt
    failures: int = 1
    next_try: float = 0.0


class ModelRegistry:
    """The newest loadable version of every model under ``base``, refreshed by polling."""

    def __init__(self, base, poll_seconds=2.0, log=None, clock=time.monotonic):
        self.base = os.path.abspath(base)
        self.poll_seconds = poll_seconds
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.clock = clock
        self._models = {}
        self._failed = {}  # (name, version) -> _Failure
        self._seen = {}  # (name, version) -> folder_state at the latest poll, until it loads
        self._polls = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def scan(self):
        """{model name: [(version, path), ...] newest first} of complete version folders."""
        found = {}
        if not os.path.isdir(self.base):
            return found
        for name in sorted(os.listdir(self.base)):
            folder = os.path.join(self.base, name)
            if name.startswith(".") or not os.path.isdir(folder):
                continue
            versions = [(int(v), os.path.join(folder, v)) for v in os.listdir(folder)
                        if v.isdigit() and os.path.isfile(os.path.join(folder, v, "saved_model.pb"))]
            if versions:
                found[name] = sorted(versions, reverse=True)
        return found

    def _should_try(self, key, path):
        """Load a new version once its files stopped changing for one poll (at start: at once);
        retry a failed one once it changed and settled again, or when its back-off is over."""
        state = folder_state(path)
        previous, self._seen[key] = self._seen.get(key), state
        failure = self._failed.get(key)
        if failure is None:
            return self._polls == 0 or previous == state
        if previous != state:  # still being written
            return False
        return state != failure.state or self.clock() >= failure.next_try

    def _record_failure(self, key, path, error):
        state = folder_state(path)
        failure = self._failed.get(key)
        if failure is None or failure.state != state:  # log once per change of the folder
            self.log(f"serving.server: cannot load {key[0]} version {key[1]} ({path}): "
                     f"{_one_line(error)}; retrying when its files change or in "
                     f"{self.poll_seconds:.3g}s, backing off")
            failure = _Failure(state)
        else:
            failure.failures += 1
        delay = min(MAX_BACKOFF_SECONDS, self.poll_seconds * 2 ** (failure.failures - 1))
        failure.next_try = self.clock() + delay
        self._failed[key] = failure

    def poll(self):
        """Load newer versions; returns the names of models (re)loaded."""
        changed = []
        present = set()
        for name, versions in self.scan().items():
            present.update((name, version) for version, _ in versions)
            current = self._models.get(name)
            for version, path in versions:
                if current is not None and version <= current.version:
                    break
                key = (name, version)
                if not self._should_try(key, path):
                    continue
                try:
                    model = load_version(name, version, path)
                except Exception as error:  # a broken or half-copied export must not take the server down
                    self._record_failure(key, path, error)
                    continue
                self._seen.pop(key, None)
                if self._failed.pop(key, None) is not None:
                    self.log(f"serving.server: {name} version {version} loads now")
                with self._lock:
                    self._models[name] = model
                self.log(f"serving.server: serving {name} version {version} from {path}")
                changed.append(name)
                break
        for key in (set(self._failed) | set(self._seen)) - present:  # folder gone: forget it
            self._failed.pop(key, None)
            self._seen.pop(key, None)
        self._polls += 1
        return changed

    def get(self, name, version=None):
        with self._lock:
            model = self._models.get(name)
        if model is None:
            raise KeyError(f"Servable not found for request: model '{name}' is not loaded")
        if version is not None and version != model.version:
            raise KeyError(f"Servable not found for request: {name} version {version} "
                           f"(serving version {model.version})")
        return model

    def models(self):
        with self._lock:
            return dict(self._models)

    def start(self):
        self.poll()
        self._thread = threading.Thread(target=self._loop, name="model-poller", daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception as error:  # keep polling whatever happens to one scan
                self.log(f"serving.server: polling {self.base} failed: {_one_line(error)}")

    def stop(self):
        self._stop.set()


class _Abort(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


def _one_line(error):
    """The reason in a TF error (or any exception) on one line, without graph stack noise."""
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    lines = [line.strip() for line in text.splitlines()]
    noise = ("Graph execution error", "Detected at node", "<stack traces unavailable>", "[[{{", "[[", "")
    kept = [line for line in lines if not line.startswith(noise)]
    return " ".join(kept or lines)[:500]


class Gate:
    """Admission control. At most ``max_inflight`` requests run the model and ``max_queue``
    more wait; the pixels of all admitted requests stay within ``max_pixels``. A request
    beyond either is refused at once (RESOURCE_EXHAUSTED), so load never piles up."""

    def __init__(self, max_inflight, max_queue, max_pixels, max_bytes=None):
        if max_inflight < 1 or max_queue < 0 or max_pixels <= 0 or (max_bytes is not None and max_bytes <= 0):
            raise ValueError("max_inflight must be >= 1, max_queue >= 0, the in-flight pixel and memory budgets > 0")
        self.max_inflight, self.max_queue, self.max_pixels = max_inflight, max_queue, max_pixels
        self.max_bytes = max_bytes
        self.running = self.waiting = self.pixels = self.bytes = 0
        self.dirty = False  # requests came since memory was last handed back
        self._cond = threading.Condition()

    @property
    def idle(self):
        return self.running == self.waiting == 0

    def _admit(self, cost, memory=0):
        with self._cond:
            if self.running + self.waiting >= self.max_inflight + self.max_queue:
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"{BUSY_PREFIX}: {self.running} requests running, {self.waiting} queued "
                             f"(--max-inflight {self.max_inflight}, --max-queue {self.max_queue}); retry later")
            if self.pixels + cost > self.max_pixels:
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"{BUSY_PREFIX}: {self.pixels / MPIX:.2f} Mpix in flight, this request needs "
                             f"{cost / MPIX:.2f} more (--max-inflight-mpix {self.max_pixels / MPIX:g}); retry later")
            if self.max_bytes is not None and self.bytes + memory > self.max_bytes:
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"{BUSY_PREFIX}: about {self.bytes / MB:.0f} MB of working memory in flight, this "
                             f"request needs {memory / MB:.0f} MB more (--max-inflight-mb {self.max_bytes / MB:g}); "
                             "retry later")
            self.waiting += 1
            self.pixels += cost
            self.bytes += memory

    def _wait_turn(self, active):
        """Wait for a running slot; False (and no slot) if ``active()`` turns False meanwhile."""
        with self._cond:
            while self.running >= self.max_inflight:
                if not active():
                    self.waiting -= 1
                    return False
                self._cond.wait(WAIT_STEP_SECONDS)
            self.waiting -= 1
            self.running += 1
            return True

    def _release(self, cost, ran, memory=0):
        with self._cond:
            self.pixels -= cost
            self.bytes -= memory
            self.dirty = True
            if ran:
                self.running -= 1
            self._cond.notify_all()

    @contextmanager
    def slot(self, cost, active=lambda: True, memory=0):
        """Admit a request of ``cost`` pixels and ``memory`` bytes of estimated working memory and
        wait for its turn; yields whether it got one."""
        self._admit(cost, memory)
        ran = False
        try:
            ran = self._wait_turn(active)
            yield ran
        finally:
            self._release(cost, ran, memory)


def tune_malloc(mmap_threshold_kb):
    """Allocations of at least ``mmap_threshold_kb`` get their own mmap (:mod:`kerasnuc.allocator`):
    request buffers go back to the OS when freed. Returns whether it was applied."""
    return allocator.mmap_large_allocations(int(mmap_threshold_kb * 1024))


def _trim_memory_loop(gate, stop, check_seconds=1.0):
    """After requests came: collect garbage (an aborted request's message stays referenced from
    its exception's traceback until the cycle collector runs) and hand freed heap pages back to
    the OS (malloc_trim), when the server is idle and at least every TRIM_EVERY_SECONDS."""
    last = time.monotonic()
    while not stop.wait(check_seconds):
        if gate.dirty and (gate.idle or time.monotonic() - last >= TRIM_EVERY_SECONDS):
            gate.dirty = False
            gc.collect()
            allocator.trim()
            last = time.monotonic()


def _version_of(model_spec):
    if model_spec.HasField("version"):
        return int(model_spec.version.value)
    if model_spec.version_label:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     "version_label is not supported by this server; use version or neither")
    return None


def _find(registry, model_spec):
    if not model_spec.name:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "model_spec.name is empty")
    try:
        return registry.get(model_spec.name, _version_of(model_spec))
    except KeyError as error:
        raise _Abort(grpc.StatusCode.NOT_FOUND, str(error.args[0])) from None


def _value_field(dtype):
    """The TensorProto field holding ``dtype``'s typed values (see tensorflow/core/framework/tensor.proto)."""
    import tensorflow as tf

    fields = {tf.float32: "float_val", tf.float64: "double_val", tf.int64: "int64_val", tf.string: "string_val",
              tf.bool: "bool_val", tf.float16: "half_val", tf.bfloat16: "half_val", tf.uint32: "uint32_val",
              tf.uint64: "uint64_val"}
    for small in (tf.int32, tf.int16, tf.int8, tf.uint8, tf.uint16):
        fields[small] = "int_val"
    return fields.get(dtype)


def _checked_dims(key, proto, spec, max_elements):
    """The declared dims of an input, refused when unknown, empty, negative or too large."""
    if proto.tensor_shape.unknown_rank:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"input '{key}': tensor_shape has unknown rank")
    dims = [int(d.size) for d in proto.tensor_shape.dim]
    if spec.shape.rank is not None and len(dims) != spec.shape.rank:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     f"input '{key}': expects shape {spec.shape.as_list()} (None = any), got {dims}")
    if any(d < 0 for d in dims):
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"input '{key}': negative dimension in shape {dims}")
    if any(d == 0 for d in dims):
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     f"input '{key}': empty shape {dims}; every dimension must be at least 1")
    if int(np.prod(dims, dtype=np.int64)) > max_elements:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"input '{key}': too large shape {dims}")
    if not spec.shape.is_compatible_with(dims):
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     f"input '{key}': expects shape {spec.shape.as_list()} (None = any), got {dims}")
    return dims


def _check_values(key, proto, dtype, dims):
    """The value count must equal the declared shape: TF's make_ndarray would broadcast one
    value (or pad a short list) to the whole shape, letting a 100-byte request cost gigabytes."""
    import tensorflow as tf

    count = int(np.prod(dims, dtype=np.int64))
    if proto.tensor_content:
        if dtype == tf.string:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"input '{key}': strings must come as string_val")
        expected = count * np.dtype(dtype.as_numpy_dtype).itemsize
        if len(proto.tensor_content) != expected:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"input '{key}': tensor_content has {len(proto.tensor_content)} bytes, "
                         f"shape {dims} of {dtype.name} needs {expected}")
        return
    name = _value_field(dtype)
    if name is None:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"input '{key}': {dtype.name} must come as tensor_content")
    given = len(getattr(proto, name))
    if given != count:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     f"input '{key}': {given} values in {name} for shape {dims} ({count} values); "
                     f"broadcasting or padding values is not accepted")


def _check_kerasnuc_inputs(model, shapes):
    """kerasnuc exports: images of 1 or 3 channels, one intensity range per image."""
    if not model.meta:
        return
    image = shapes.get("image")
    if image is not None and len(image) == 4 and image[-1] not in (1, 3):
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     f"input 'image': {image[-1]} channels in shape {image}; this model takes 1 (grey) or 3 (RGB)")
    batches = {key: dims[0] for key, dims in shapes.items() if dims}
    if len(set(batches.values())) > 1:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     f"inputs disagree on the batch size (first dimension): {batches}")


def call_plan(model, signature, shapes, chunk_pixels):
    """(images per model call, or None for the whole request in one call; pixels of the largest
    call: images x height x width padded to the model's multiple x live passes).

    kerasnuc exports treat every image of a batch on its own (per-image normalisation,
    inference-mode BatchNorm), so their batches run in calls of at most ``chunk_pixels`` (at
    least one image each) and a cancelled request stops between calls; other SavedModels run
    whole."""
    per_image, batch, batched = 0, 1, True
    for dims in shapes.values():
        if len(dims) >= 3:
            batched = batched and len(dims) == 4
            m = model.multiple
            pixels = (-(-dims[-3] // m) * m) * (-(-dims[-2] // m) * m)
            if pixels > per_image:
                per_image, batch = pixels, int(np.prod(dims[:-3], dtype=np.int64))
    per_image *= model.passes(signature)
    leading = {dims[0] for dims in shapes.values() if dims}
    if model.meta and batched and per_image and len(leading) == 1:
        size = max(1, int(chunk_pixels // per_image))
        return size, min(size, batch) * per_image
    return None, batch * per_image


def _decode_inputs(request, model, signature, max_elements, max_pixels=None, chunk_pixels=MPIX // 2,
                   max_bytes=None):
    """(decode, pixel cost, images per call, working memory in bytes): the request checked against
    the signature, the pixel budget of one model call and its memory budget (pixels x the
    model's working bytes per pixel; else INVALID_ARGUMENT) before any value is decoded;
    ``decode()`` gives {key: ndarray} later, once the request has its turn."""
    import tensorflow as tf

    specs = model.inputs[signature]
    given, expected = set(request.inputs), set(specs)
    if given != expected:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     f"signature '{signature}' takes inputs {sorted(expected)}, request has {sorted(given)}")
    shapes = {}
    for key, spec in specs.items():
        proto = request.inputs[key]
        if proto.dtype != spec.dtype.as_datatype_enum:
            try:
                got = tf.dtypes.as_dtype(proto.dtype).name
            except TypeError:
                got = f"dtype enum {proto.dtype}"
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"input '{key}': expects {spec.dtype.name}, got {got}")
        shapes[key] = _checked_dims(key, proto, spec, max_elements)
        _check_values(key, proto, spec.dtype, shapes[key])
    _check_kerasnuc_inputs(model, shapes)
    size, cost = call_plan(model, signature, shapes, chunk_pixels)
    if max_pixels is not None and cost > max_pixels:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     f"request needs {cost / MPIX:.2f} Mpix in one model call (images x padded height x width "
                     f"x passes), over the {max_pixels / MPIX:g} Mpix per request (--max-request-mpix); "
                     f"send smaller images or tiles")
    memory = int(cost * model.bytes_per_pixel) if model.bytes_per_pixel else 0
    if max_bytes is not None and memory > max_bytes:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     f"request needs about {memory / MB:.0f} MB of working memory in one model call "
                     f"({cost / MPIX:.2f} Mpix x {model.bytes_per_pixel:.0f} bytes per pixel for this model), "
                     f"over the {max_bytes / MB:g} MB per request (--max-request-mb); send smaller images or tiles")

    def decode():
        arrays = {}
        for key, spec in specs.items():
            try:
                array = tf.make_ndarray(request.inputs[key])
            except Exception as error:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"input '{key}': cannot decode tensor ({_one_line(error)})") from None
            if array.dtype != spec.dtype.as_numpy_dtype or list(array.shape) != shapes[key]:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"input '{key}': decodes to {array.dtype.name} {list(array.shape)}, "
                             f"declared {spec.dtype.name} {shapes[key]}")
            arrays[key] = array
        return arrays

    return decode, cost, size, memory


def _tf_error_code(error):
    import tensorflow as tf

    if isinstance(error, (tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, tf.errors.ResourceExhaustedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


class PredictionService:
    """PredictionService: Predict and GetModelMetadata (Classify/Regress/MultiInference: UNIMPLEMENTED).

    ``stats`` counts what happened to requests: ``runs`` (requests that started the model),
    ``chunks`` (model calls), ``cancelled`` (client gone before its turn or between chunks),
    and one entry per refusal code."""

    def __init__(self, registry, max_elements, gate=None, max_request_pixels=None, chunk_pixels=MPIX // 2,
                 max_request_bytes=None):
        self.registry, self.max_elements = registry, max_elements
        self.gate = gate or Gate(8, 16, 64 * MPIX)
        self.max_request_pixels, self.chunk_pixels = max_request_pixels, chunk_pixels
        self.max_request_bytes = max_request_bytes
        self.stats = Counter()
        self._stats_lock = threading.Lock()

    def _count(self, key):
        with self._stats_lock:
            self.stats[key] += 1

    def _run(self, model, signature, decode, cost, size, context, memory=0):
        """Run the model in the gate's turn; None when the client went away first (before the
        model ran or between chunks of a batch)."""
        import tensorflow as tf

        with self.gate.slot(cost, context.is_active, memory) as turn:
            if not turn or not context.is_active():
                self._count("cancelled")
                return None
            arrays = decode()
            batch = len(next(iter(arrays.values()))) if size else 1
            parts = []
            self._count("runs")
            for start in range(0, batch, size or 1):
                if not context.is_active():  # decoding and earlier chunks take a while
                    self._count("cancelled")
                    return None
                chunk = {key: tf.convert_to_tensor(value[start:start + size] if size else value)
                         for key, value in arrays.items()}
                self._count("chunks")
                try:
                    parts.append({key: value.numpy() for key, value in model.function(signature)(**chunk).items()})
                except tf.errors.OpError as error:
                    raise _Abort(_tf_error_code(error), f"model rejected the input: {_one_line(error)}") from None
            if len(parts) == 1:
                return parts[0]
            return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def Predict(self, request, context):
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        self.gate.dirty = True
        try:
            model = _find(self.registry, request.model_spec)
            signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
            if signature not in model.signature_defs:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"serving signature '{signature}' not found; {model.name} has "
                             f"{sorted(model.signature_defs)}")
            outputs = set(model.signature_defs[signature].outputs)
            wanted = list(request.output_filter) or sorted(outputs)
            unknown = sorted(set(wanted) - outputs)
            if unknown:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"output_filter names {unknown} not among the outputs {sorted(outputs)}")
            decode, cost, size, memory = _decode_inputs(request, model, signature, self.max_elements,
                                                        self.max_request_pixels, self.chunk_pixels,
                                                        self.max_request_bytes)
            result = self._run(model, signature, decode, cost, size, context, memory)
            if result is None:
                context.abort(grpc.StatusCode.CANCELLED, "client went away before its turn; the model did not run")
            response = predict_pb2.PredictResponse()
            response.model_spec.name = model.name
            response.model_spec.version.value = model.version
            response.model_spec.signature_name = signature
            for key in wanted:
                response.outputs[key].CopyFrom(tf.make_tensor_proto(result[key]))
            return response
        except _Abort as abort:
            self._count(abort.code.name)
            context.abort(abort.code, abort.message)

    def GetModelMetadata(self, request, context):
        from tensorflow_serving.apis import get_model_metadata_pb2

        try:
            model = _find(self.registry, request.model_spec)
            fields = list(request.metadata_field)
            if fields != ["signature_def"]:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"metadata_field must be ['signature_def'], got {fields}")
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = model.name
            response.model_spec.version.value = model.version
            signature_map = get_model_metadata_pb2.SignatureDefMap()
            for key, value in model.signature_defs.items():
                signature_map.signature_def[key].CopyFrom(value)
            response.metadata["signature_def"].Pack(signature_map)
            return response
        except _Abort as abort:
            context.abort(abort.code, abort.message)

    def Classify(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Classify is not served; use Predict")

    Regress = MultiInference = Classify


class ModelService:
    """ModelService: GetModelStatus (HandleReloadConfigRequest: UNIMPLEMENTED, the base is polled)."""

    def __init__(self, registry):
        self.registry = registry

    def GetModelStatus(self, request, context):
        from tensorflow_serving.apis import get_model_status_pb2

        try:
            model = _find(self.registry, request.model_spec)
        except _Abort as abort:
            context.abort(abort.code, abort.message)
        response = get_model_status_pb2.GetModelStatusResponse()
        status = response.model_version_status.add()
        status.version = model.version
        status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        status.status.error_code = 0  # OK
        return response

    def HandleReloadConfigRequest(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "reloading a config is not supported; the base is polled")


SPARE_THREADS = 4  # handler threads beyond the admitted requests: metadata, status, quick refusals


def create_server(base, host="127.0.0.1", port=8500, threads=8, max_message_mb=64, poll_seconds=2.0,
                  log=None, max_inflight=None, max_queue=None, max_request_mpix=4.0, max_inflight_mpix=16.0,
                  chunk_mpix=0.5, max_request_mb=2048.0, max_inflight_mb=8192.0):
    """Start serving ``base``; returns (grpc server, bound port, registry). ``port`` 0 picks a free one.

    ``threads`` is the default of ``max_inflight`` (requests running the model at once);
    ``max_queue`` (default 2 x max_inflight) more may wait. ``max_request_mb`` and
    ``max_inflight_mb`` bound the estimated working memory (pixels x the export's working bytes
    per pixel) of one request and of all admitted ones. The PredictionService is
    ``server.predictions`` (its ``gate`` and ``stats``)."""
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    max_inflight = int(max_inflight or threads)
    max_queue = 2 * max_inflight if max_queue is None else int(max_queue)
    if max_inflight_mpix < max_request_mpix:
        raise ValueError(f"max_inflight_mpix ({max_inflight_mpix:g}) must be at least max_request_mpix "
                         f"({max_request_mpix:g})")
    if max_inflight_mb < max_request_mb:
        raise ValueError(f"max_inflight_mb ({max_inflight_mb:g}) must be at least max_request_mb ({max_request_mb:g})")
    gate = Gate(max_inflight, max_queue, int(max_inflight_mpix * MPIX), int(max_inflight_mb * MB))
    registry = ModelRegistry(base, poll_seconds, log)  # started once the port is bound
    limit = int(max_message_mb * 2 ** 20)
    handlers = max_inflight + max_queue + SPARE_THREADS
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=handlers, thread_name_prefix="predict"),
                         options=[("grpc.max_receive_message_length", limit),
                                  ("grpc.max_send_message_length", max(limit, 256 * 2 ** 20))],
                         maximum_concurrent_rpcs=handlers)  # beyond: RESOURCE_EXHAUSTED from gRPC itself
    service = PredictionService(registry, max_elements=limit, gate=gate,
                                max_request_pixels=int(max_request_mpix * MPIX), chunk_pixels=int(chunk_mpix * MPIX),
                                max_request_bytes=int(max_request_mb * MB))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(service, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(registry), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # newer grpcio raises instead of returning 0
        bound = 0
    if not bound:
        raise OSError(f"cannot bind {host}:{port}")
    server.predictions = service
    registry.start()
    server.start()
    threading.Thread(target=_trim_memory_loop, args=(gate, registry._stop), name="memory-trim", daemon=True).start()
    return server, bound, registry


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="export base (folders <model>/<version>/)")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1 only)")
    parser.add_argument("--threads", type=_positive(int), default=2,
                        help="default of --max-inflight (kept for older command lines)")
    parser.add_argument("--max-inflight", type=_positive(int), dest="max_inflight",
                        help="requests running the model at once (default --threads, 2)")
    parser.add_argument("--max-queue", type=int, dest="max_queue",
                        help="requests waiting for a turn beyond those (default 2 x --max-inflight)")
    parser.add_argument("--max-request-mpix", type=_positive(float), default=4.0, dest="max_request_mpix",
                        help="largest request: batch x padded height x width x passes, Mpix (default 4)")
    parser.add_argument("--max-inflight-mpix", type=_positive(float), default=16.0, dest="max_inflight_mpix",
                        help="pixels of all admitted requests together, Mpix (default 16)")
    parser.add_argument("--max-request-mb", type=_positive(float), default=2048.0, dest="max_request_mb",
                        help="largest estimated working memory of one request: its pixels x the model's working "
                             "bytes per pixel (export metadata: 3 x its widest activation), MiB (default 2048)")
    parser.add_argument("--max-inflight-mb", type=_positive(float), default=8192.0, dest="max_inflight_mb",
                        help="estimated working memory of all admitted requests together, MiB (default 8192)")
    parser.add_argument("--chunk-mpix", type=_positive(float), default=0.5, dest="chunk_mpix",
                        help="kerasnuc batches run in model calls of at most this many Mpix (default 0.5)")
    parser.add_argument("--max-message-mb", type=_positive(float), default=64, dest="max_message_mb",
                        help="largest request message accepted, MiB (default 64)")
    parser.add_argument("--poll", type=_positive(float), default=2.0, help="seconds between scans for new versions")
    parser.add_argument("--malloc-mmap-kb", type=float, default=1024, dest="malloc_mmap_kb",
                        help="glibc: allocations from this size (KiB) are mmapped and returned to the OS when "
                             "freed (default 1024; 0 keeps glibc's rising threshold)")
    parser.add_argument("--onednn", action="store_true",
                        help="keep TensorFlow's oneDNN kernels (faster on CPU, RSS grows per input shape)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.base):
        sys.exit(f"serving.server: {args.base}: export base not found")
    if args.max_queue is not None and args.max_queue < 0:
        sys.exit(f"serving.server: --max-queue must be 0 or more, got {args.max_queue}")
    if args.max_inflight_mb < args.max_request_mb:
        sys.exit(f"serving.server: --max-inflight-mb {args.max_inflight_mb:g} is below --max-request-mb "
                 f"{args.max_request_mb:g}; no request of the largest size could run")
    if args.max_inflight_mpix < args.max_request_mpix:
        sys.exit(f"serving.server: --max-inflight-mpix {args.max_inflight_mpix:g} is below "
                 f"--max-request-mpix {args.max_request_mpix:g}; no request of the largest size could run")
    tune_malloc(args.malloc_mmap_kb)
    if "tensorflow" not in sys.modules:  # must be set before TensorFlow loads
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1" if args.onednn else "0")
    try:
        server, port, registry = create_server(args.base, args.host, args.port, args.threads,
                                               args.max_message_mb, args.poll, max_inflight=args.max_inflight,
                                               max_queue=args.max_queue, max_request_mpix=args.max_request_mpix,
                                               max_inflight_mpix=args.max_inflight_mpix, chunk_mpix=args.chunk_mpix,
                                               max_request_mb=args.max_request_mb,
                                               max_inflight_mb=args.max_inflight_mb)
    except OSError as error:
        sys.exit(f"serving.server: {error}")
    models = registry.models()
    gate = server.predictions.gate
    print(f"serving.server: listening on {args.host}:{port}; models: "
          + (", ".join(f"{m.name} v{m.version}" + (f" ({m.bytes_per_pixel:.0f} B/px)" if m.bytes_per_pixel else "")
                       for m in models.values()) or "none yet (polling)")
          + f"; {gate.max_inflight} running + {gate.max_queue} queued, {args.max_request_mpix:g} Mpix per "
            f"request, {args.max_inflight_mpix:g} Mpix in flight, {args.max_request_mb:g} MB per request, "
            f"{args.max_inflight_mb:g} MB in flight; oneDNN "
          + ("on" if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0" else "off"), flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    registry.stop()
    server.stop(grace=5).wait()
    stats = dict(sorted(server.predictions.stats.items()))
    print(f"serving.server: stopped; Predict outcomes: {stats}", flush=True)


if __name__ == "__main__":
    main()
