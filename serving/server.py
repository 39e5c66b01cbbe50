"""An embedded gRPC server speaking TensorFlow Serving's API, for an ``export.saved_model`` base.

    python -m serving.server --base EXPORT_BASE [--port 8500] [--host 127.0.0.1]

Serves ``EXPORT_BASE/<model>/<version>/`` SavedModels (``tf.saved_model.load``) with
``tensorflow_serving.apis``: PredictionService ``Predict`` and ``GetModelMetadata``,
ModelService ``GetModelStatus``; the same clients work against it and against the real
``tensorflow_model_server`` (the TF-Serving binary is not on PyPI; ``compose.yaml`` in the
base runs the official image).

* Newest version of each model: the base is polled (``--poll`` seconds) and a newer
  integer version folder is loaded and swapped in while the old one keeps answering;
  hidden staging folders are ignored, a version that fails to load is logged and skipped.
* Binds 127.0.0.1 by default (``--host 0.0.0.0`` to expose it; there is no
  authentication, put it behind a proxy for that).
* Malformed requests (unknown input names, wrong dtype or rank, undecodable tensors,
  images with 2 channels...) get INVALID_ARGUMENT and the server keeps serving; an
  unknown model or version gets NOT_FOUND.
* Requests are bounded by ``--max-message-mb`` (gRPC max_receive_message_length) and
  run concurrently on a thread pool of ``--threads`` workers.
"""

import argparse
import os
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass, field

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
import numpy as np  # noqa: E402

DEFAULT_SIGNATURE = "serving_default"


@dataclass
class LoadedModel:
    name: str
    version: int
    path: str
    loaded: object
    signature_defs: dict
    inputs: dict = field(default_factory=dict)  # signature -> {input key: TensorSpec}

    def function(self, signature):
        return self.loaded.signatures[signature]


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


def load_version(name, version, path):
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    defs = _signature_defs(path)
    inputs = {}
    for key in defs:
        function = loaded.signatures[key]
        inputs[key] = dict(function.structured_input_signature[1])
    return LoadedModel(name, version, path, loaded, defs, inputs)


class ModelRegistry:
    """The newest loadable version of every model under ``base``, refreshed by polling."""

    def __init__(self, base, poll_seconds=2.0, log=None):
        self.base = os.path.abspath(base)
        self.poll_seconds = poll_seconds
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self._models = {}
        self._failed = set()
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

    def poll(self):
        """Load newer versions; returns the names of models (re)loaded."""
        changed = []
        for name, versions in self.scan().items():
            current = self._models.get(name)
            for version, path in versions:
                if current is not None and version <= current.version:
                    break
                if (name, version) in self._failed:
                    continue
                try:
                    model = load_version(name, version, path)
                except Exception as error:  # a broken export must not take the server down
                    self._failed.add((name, version))
                    self.log(f"serving.server: cannot load {name} version {version} ({path}): {error}")
                    continue
                with self._lock:
                    self._models[name] = model
                self.log(f"serving.server: serving {name} version {version} from {path}")
                changed.append(name)
                break
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
                self.log(f"serving.server: polling {self.base} failed: {error}")

    def stop(self):
        self._stop.set()


class _Abort(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


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


def _decode_inputs(request, model, signature, max_elements):
    """{key: tf.Tensor} from the request, checked against the signature (else INVALID_ARGUMENT)."""
    import tensorflow as tf

    specs = model.inputs[signature]
    given, expected = set(request.inputs), set(specs)
    if given != expected:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     f"signature '{signature}' takes inputs {sorted(expected)}, request has {sorted(given)}")
    tensors = {}
    for key, spec in specs.items():
        proto = request.inputs[key]
        dims = [d.size for d in proto.tensor_shape.dim]
        if any(d < 0 for d in dims) or int(np.prod(dims, dtype=np.int64)) > max_elements:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"input '{key}': bad or too large shape {dims}")
        try:
            array = tf.make_ndarray(proto)
        except Exception as error:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"input '{key}': cannot decode tensor ({error})") from None
        if array.dtype != spec.dtype.as_numpy_dtype:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"input '{key}': expects {spec.dtype.name}, got {array.dtype.name}")
        if not spec.shape.is_compatible_with(array.shape):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"input '{key}': expects shape {spec.shape.as_list()} (None = any), got {list(array.shape)}")
        tensors[key] = tf.convert_to_tensor(array)
    return tensors


def _tf_error_code(error):
    import tensorflow as tf

    if isinstance(error, (tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, tf.errors.ResourceExhaustedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


class PredictionService:
    """PredictionService: Predict and GetModelMetadata (Classify/Regress/MultiInference: UNIMPLEMENTED)."""

    def __init__(self, registry, max_elements):
        self.registry, self.max_elements = registry, max_elements

    def Predict(self, request, context):
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

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
            inputs = _decode_inputs(request, model, signature, self.max_elements)
            try:
                result = model.function(signature)(**inputs)
            except tf.errors.OpError as error:
                raise _Abort(_tf_error_code(error), f"{type(error).__name__}: {error.message}") from None
            response = predict_pb2.PredictResponse()
            response.model_spec.name = model.name
            response.model_spec.version.value = model.version
            response.model_spec.signature_name = signature
            for key in wanted:
                response.outputs[key].CopyFrom(tf.make_tensor_proto(result[key].numpy()))
            return response
        except _Abort as abort:
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


def create_server(base, host="127.0.0.1", port=8500, threads=8, max_message_mb=64, poll_seconds=2.0,
                  log=None):
    """Start serving ``base``; returns (grpc server, bound port, registry). ``port`` 0 picks a free one."""
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    registry = ModelRegistry(base, poll_seconds, log).start()
    limit = int(max_message_mb * 2 ** 20)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="predict"),
                         options=[("grpc.max_receive_message_length", limit),
                                  ("grpc.max_send_message_length", max(limit, 256 * 2 ** 20))],
                         maximum_concurrent_rpcs=threads * 8)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(registry, max_elements=limit), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(registry), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        registry.stop()
        raise OSError(f"cannot bind {host}:{port}")
    server.start()
    return server, bound, registry


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="export base (folders <model>/<version>/)")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1 only)")
    parser.add_argument("--threads", type=int, default=8, help="concurrent requests (thread pool size)")
    parser.add_argument("--max-message-mb", type=float, default=64, dest="max_message_mb",
                        help="largest request accepted, MiB (default 64)")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between scans for new versions")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.base):
        sys.exit(f"serving.server: {args.base}: export base not found")
    server, port, registry = create_server(args.base, args.host, args.port, args.threads,
                                           args.max_message_mb, args.poll)
    models = registry.models()
    print(f"serving.server: listening on {args.host}:{port}; models: "
          + (", ".join(f"{m.name} v{m.version}" for m in models.values()) or "none yet (polling)"), flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    registry.stop()
    server.stop(grace=5).wait()


if __name__ == "__main__":
    main()
