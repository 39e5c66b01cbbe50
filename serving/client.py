"""Find nuclei in images through TensorFlow Serving (or ``serving.server``) over gRPC.

    python -m serving.client --target localhost:8500 --model unet IMAGE... [--out DIR]
    python -m serving.client --target localhost:8500 --model dcrn IMAGE... --points CSV|DIR

Large images are cut into tiles (``--tile``, overlapping by ``2 * --margin``; defaults
from the model's metadata), each tile normalised with the whole image's intensity range
(the ``with_range`` signatures), several requests in flight at once (``--in-flight``),
each with a deadline (``--timeout``); UNAVAILABLE, and RESOURCE_EXHAUSTED from a busy
``serving.server``, are retried with exponential backoff (``--retries``). The maps are
reassembled by keeping each tile's centre and post-processed with the export's tuned thresholds:

* segmentation: ``<stem>_labels.png`` (16-bit instance labels);
* detection: ``<stem>_centroids.csv`` (x, y);
* classification: ``<stem>_classes.csv`` for nuclei at ``--points`` (x, y CSV, or a folder
  of ``<stem>.csv``);
* Monte-Carlo dropout models: the ``uncertainty`` signature (mean + variance of T passes);
  the mean is post-processed, the variance saved as ``<stem>_variance.npy``.

``--save-maps`` also writes the model maps as ``<stem>_maps.npy``. The model's metadata
(task, channels, tile, thresholds, classes) comes from its ``metadata`` signature, or
from ``--metadata kerasnuc.json`` (``assets.extra/kerasnuc.json`` of the export). Images are
stain-normalised here, as training did, when the metadata has a ``stain`` (the engine does it
before tiling); a dcgmm normaliser needs its network, ``assets.extra/stain_model.keras``, so
give ``--metadata`` (the path in the metadata signature is relative to that folder).
"""

import argparse
import json
import os
import random
import sys
import threading
import time
from concurrent import futures

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
import numpy as np  # noqa: E402


from serving.server import BUSY_PREFIX  # noqa: E402

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


def retryable(code, details):
    """UNAVAILABLE, and RESOURCE_EXHAUSTED that says the server is busy (not: message too large)."""
    return code in RETRYABLE or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(BUSY_PREFIX))


class ServingError(RuntimeError):
    """A request failed for good (after retries, or with a non-retryable status)."""

    def __init__(self, code, message):
        super().__init__(f"{code.name if code else 'ERROR'}: {message}")
        self.code = code


def to_tensor_proto(array):
    import tensorflow as tf

    return tf.make_tensor_proto(np.ascontiguousarray(array))


def from_tensor_proto(proto):
    import tensorflow as tf

    return tf.make_ndarray(proto)


class ServingClient:
    """One model on one TF-Serving endpoint: metadata, retried Predict calls, and the prediction
    engine over them (:meth:`engine`)."""

    def __init__(self, target, model, version=None, timeout=60.0, retries=4, backoff=0.25,
                 max_backoff=8.0, in_flight=4, max_message_mb=64, metadata=None, log=None):
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.target, self.model, self.version = target, model, version
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        limit = int(max_message_mb * 2 ** 20)
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", limit),
                                                              ("grpc.max_receive_message_length", 4 * limit)])
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.pool = futures.ThreadPoolExecutor(max_workers=max(1, in_flight), thread_name_prefix="request")
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.requests = 0
        self.retried = 0
        self._count_lock = threading.Lock()
        self._meta = metadata

    def close(self):
        self.pool.shutdown(wait=True)
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- requests

    def _request(self, signature, inputs, output_filter=()):
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model
        request.model_spec.signature_name = signature
        if self.version is not None:
            request.model_spec.version.value = int(self.version)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(to_tensor_proto(value))
        request.output_filter.extend(output_filter)
        return request

    def predict(self, signature, inputs, output_filter=()):
        """{output: ndarray} of one Predict call; UNAVAILABLE retried with exponential backoff."""
        request = self._request(signature, inputs, output_filter)
        attempt = 0
        while True:
            with self._count_lock:
                self.requests += 1
            try:
                response = self.stub.Predict(request, timeout=self.timeout)
                return {key: from_tensor_proto(value) for key, value in response.outputs.items()}
            except grpc.RpcError as error:
                code = error.code() if hasattr(error, "code") else None
                details = (error.details() if hasattr(error, "details") else str(error)) or ""
                if not retryable(code, details) or attempt >= self.retries:
                    raise ServingError(code, details) from None
                delay = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)
                attempt += 1
                with self._count_lock:
                    self.retried += 1
                self.log(f"serving.client: {code.name}, retry {attempt}/{self.retries} in {delay:.2f}s")
                time.sleep(delay)

    def submit(self, signature, inputs, output_filter=()):
        """A future of :meth:`predict` (at most ``in_flight`` run at once)."""
        return self.pool.submit(self.predict, signature, inputs, output_filter)

    # -- metadata

    @property
    def meta(self):
        if self._meta is None:
            try:
                text = self.predict("metadata", {})["kerasnuc_json"]
            except ServingError as error:
                raise ServingError(error.code, f"model '{self.model}' at {self.target} has no readable "
                                               f"'metadata' signature ({error}); pass --metadata") from None
            self._meta = json.loads(text.item().decode() if hasattr(text, "item") else text)
        return self._meta

    # -- the prediction engine over this client

    def engine(self, batch=4):
        """A :class:`kerasnuc.predict.Predictor` whose runtime is this client: the engine tiles,
        normalises (in the server's graph), averages and post-processes."""
        from kerasnuc.predict.engine import Predictor
        from kerasnuc.predict.runtimes import GrpcRuntime

        return Predictor(GrpcRuntime(client=self), batch_size=batch)

    def predict_maps(self, image, tile=None, margin=None, batch=4):
        """((H, W, K) maps, variance or None) of a uint8 image, tiled; Monte-Carlo models
        use the ``uncertainty_with_range`` signature."""
        return self.engine(batch).predict_maps(image, tile, margin)

    def classify(self, image, points, batch=64):
        """(K, classes) probabilities of nuclei at (x, y) ``points`` (patches, whole-image range)."""
        return self.engine().classify(image, points, batch_size=batch)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m serving.client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+")
    parser.add_argument("--target", default="127.0.0.1:8500", help="HOST:PORT of the gRPC endpoint")
    parser.add_argument("--model", required=True, help="model name in the serving base")
    parser.add_argument("--version", type=int, help="model version (default: what the server serves)")
    parser.add_argument("--out", default="client_out", help="output folder (default client_out)")
    parser.add_argument("--tile", type=int, help="tile side (default: metadata serving_tile)")
    parser.add_argument("--margin", type=int, help="margin cropped from tile sides (default: metadata)")
    parser.add_argument("--batch", type=int, default=4, help="tiles per request (default 4)")
    parser.add_argument("--in-flight", type=int, default=4, dest="in_flight", help="concurrent requests")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline per request, seconds")
    parser.add_argument("--retries", type=int, default=4, help="retries of UNAVAILABLE (exponential backoff)")
    parser.add_argument("--metadata", help="kerasnuc.json of the export, if the server has no metadata signature")
    parser.add_argument("--points", help="classification: CSV of x,y for every image, or a folder of <stem>.csv")
    parser.add_argument("--save-maps", action="store_true", dest="save_maps", help="also write <stem>_maps.npy")
    args = parser.parse_args(argv)

    from kerasnuc.predict.postprocess import instances, points_from_maps
    from serving.edge import points_for, read_image, write_labels_png, write_points_csv

    metadata = None
    if args.metadata:
        with open(args.metadata) as handle:
            metadata = json.load(handle)
        if metadata.get("stain"):  # a dcgmm network travels beside kerasnuc.json (assets.extra)
            from kerasnuc.data.stain import resolve_paths

            try:
                metadata["stain"] = resolve_paths(metadata["stain"], os.path.dirname(os.path.abspath(args.metadata)),
                                                  where=args.metadata)
            except (OSError, ValueError) as error:
                sys.exit(f"serving.client: {error}")
    client = ServingClient(args.target, args.model, args.version, args.timeout, args.retries,
                           in_flight=args.in_flight, metadata=metadata)
    try:
        meta = client.meta
        task = meta["task"]
        if task == "classification" and not args.points:
            sys.exit("serving.client: a classification model needs --points CSV|DIR")
        os.makedirs(args.out, exist_ok=True)
        started = time.perf_counter()
        images = [(path, read_image(path)) for path in args.images]
        engine = client.engine(args.batch)
        try:  # the engine stain-normalises each image as training did (a dcgmm network needs its file)
            engine.stain_normalizer
        except (OSError, ValueError) as error:
            sys.exit(f"serving.client: {error}; pass --metadata with the export's assets.extra/kerasnuc.json")
        post = meta.get("postprocess") or {}
        total_nuclei = 0
        for path, image in images:
            stem = os.path.splitext(os.path.basename(path))[0]
            if task == "classification":
                points = points_for(args.points, path)
                probabilities = engine.classify(image, points)
                names = meta.get("class_names") or [f"class_{i}" for i in range(probabilities.shape[-1])]
                classes = probabilities.argmax(-1) if len(points) else np.zeros(0, int)
                out = os.path.join(args.out, f"{stem}_classes.csv")
                write_points_csv(out, points, ["class", "name", *[f"p_{n}" for n in names]],
                                 [[int(c), names[int(c)], *(f"{p:.4f}" for p in probs)]
                                  for c, probs in zip(classes, probabilities)])
                count, detail = len(points), f"{len(points)} nuclei classified"
            elif task == "instance":  # Mask R-CNN: tiles of its fixed input, detections -> nuclei in the engine
                before = client.requests
                labels = engine.predict_instances(image, margin=args.margin)[0]
                out = os.path.join(args.out, f"{stem}_labels.png")
                write_labels_png(out, labels)
                count = int(labels.max())
                detail = (f"{count} nuclei, {image.shape[1]}x{image.shape[0]} px in "
                          f"{client.requests - before} requests")
            else:
                before = client.requests
                maps, variance = engine.predict_maps(image, args.tile, args.margin)
                if args.save_maps:
                    np.save(os.path.join(args.out, f"{stem}_maps.npy"), maps)
                if variance is not None:
                    np.save(os.path.join(args.out, f"{stem}_variance.npy"), variance)
                if task == "segmentation":
                    labels = instances(maps, post)
                    out = os.path.join(args.out, f"{stem}_labels.png")
                    write_labels_png(out, labels)
                    count = int(labels.max())
                else:
                    points = points_from_maps(maps, task, post)
                    out = os.path.join(args.out, f"{stem}_centroids.csv")
                    write_points_csv(out, points)
                    count = len(points)
                detail = (f"{count} nuclei, {image.shape[1]}x{image.shape[0]} px in "
                          f"{client.requests - before} requests")
            total_nuclei += count
            print(f"{path}: {detail} -> {out}", flush=True)
        elapsed = time.perf_counter() - started
        print(f"summary: {len(images)} images, {total_nuclei} nuclei, {client.requests} requests "
              f"({client.retried} retried) to {args.target} model {args.model}, {elapsed:.2f} s "
              f"({1000 * elapsed / max(len(images), 1):.0f} ms per image)")
    except ServingError as error:
        sys.exit(f"serving.client: {error}")
    finally:
        client.close()


if __name__ == "__main__":
    main()
