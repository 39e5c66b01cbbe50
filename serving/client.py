"""Find nuclei in images through TensorFlow Serving (or ``serving.server``) over gRPC.

    python -m serving.client --target localhost:8500 --model unet IMAGE... [--out DIR]
    python -m serving.client --target localhost:8500 --model dcrn IMAGE... --points CSV|DIR

Large images are cut into tiles (``--tile``, overlapping by ``2 * --margin``; defaults
from the model's metadata), each tile normalised with the whole image's intensity range
(the ``with_range`` signatures), several requests in flight at once (``--in-flight``),
each with a deadline (``--timeout``); UNAVAILABLE is retried with exponential backoff
(``--retries``). The maps are reassembled by keeping each tile's centre and
post-processed with the export's tuned thresholds:

* segmentation: ``<stem>_labels.png`` (16-bit instance labels);
* detection: ``<stem>_centroids.csv`` (x, y);
* classification: ``<stem>_classes.csv`` for nuclei at ``--points`` (x, y CSV, or a folder
  of ``<stem>.csv``);
* Monte-Carlo dropout models: the ``uncertainty`` signature (mean + variance of T passes);
  the mean is post-processed, the variance saved as ``<stem>_variance.npy``.

``--save-maps`` also writes the model maps as ``<stem>_maps.npy``. The model's metadata
(task, channels, tile, thresholds, classes) comes from its ``metadata`` signature, or
from ``--metadata kerasnuc.json`` (``assets.extra/kerasnuc.json`` of the export).
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

from kerasnuc.predict.tiling import TilePlan, intensity_range, patches_at  # noqa: E402

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


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
    """One model on one TF-Serving endpoint: metadata, retried Predict calls, tiled maps."""

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
                if code not in RETRYABLE or attempt >= self.retries:
                    raise ServingError(code, error.details() if hasattr(error, "details") else str(error)) from None
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

    # -- tiled maps

    def submit_maps(self, image, tile=None, margin=None, batch=4, uncertainty=None):
        """Futures for the tiles of one image and a function that stitches their results.

        Returns ``finish()``; calling it waits and returns ((H, W, K) maps, variance or None).
        """
        meta = self.meta
        channels, multiple = meta["channels"], meta.get("multiple", 1)
        uncertainty = meta.get("stochastic", False) if uncertainty is None else uncertainty
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[..., None]
        plan = TilePlan(image.shape[0], image.shape[1], tile or meta.get("serving_tile", 256),
                        meta.get("tile_margin", 32) if margin is None else margin, multiple)
        padded = plan.pad(image)
        value_range = np.asarray(intensity_range(image, channels), np.float32)
        signature = "uncertainty_with_range" if uncertainty else "with_range"
        keys = ("mean", "variance") if uncertainty else ("maps",)
        jobs = []
        for indices in plan.batches(batch):
            tiles = plan.extract(padded, indices)
            ranges = np.repeat(value_range[None], len(tiles), axis=0)
            jobs.append(self.submit(signature, {"image": tiles, "intensity_range": ranges}, keys))

        def finish():
            results = [job.result() for job in jobs]
            stitched = [plan.stitch([tile for r in results for tile in r[key]]) for key in keys]
            return stitched[0], (stitched[1] if uncertainty else None)

        finish.tiles = len(plan)
        finish.requests = len(jobs)
        return finish

    def predict_maps(self, image, tile=None, margin=None, batch=4, uncertainty=None):
        """((H, W, K) maps, variance or None) of a uint8 image, tiled."""
        return self.submit_maps(image, tile, margin, batch, uncertainty)()

    def classify(self, image, points, batch=64):
        """(K, classes) probabilities of nuclei at (x, y) ``points`` (patches, whole-image range)."""
        meta = self.meta
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if len(points) == 0:
            return np.zeros((0, meta.get("output_channels", 1)), np.float32)
        value_range = np.asarray(intensity_range(image, meta["channels"]), np.float32)
        patches = patches_at(image, points, meta["patch"])
        signature = "uncertainty_with_range" if meta.get("stochastic") else "with_range"
        key = "mean" if meta.get("stochastic") else "probabilities"
        jobs = [self.submit(signature, {"image": patches[i:i + batch],
                                        "intensity_range": np.repeat(value_range[None], len(patches[i:i + batch]), 0)},
                            (key,)) for i in range(0, len(patches), batch)]
        return np.concatenate([job.result()[key] for job in jobs]).astype(np.float32)


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

    from kerasnuc.predict.postprocess import _kwargs
    from serving.edge import _apply_stain, points_for, read_image, write_labels_png, write_points_csv

    metadata = None
    if args.metadata:
        with open(args.metadata) as handle:
            metadata = json.load(handle)
    client = ServingClient(args.target, args.model, args.version, args.timeout, args.retries,
                           in_flight=args.in_flight, metadata=metadata)
    try:
        meta = client.meta
        task = meta["task"]
        if task == "classification" and not args.points:
            sys.exit("serving.client: a classification model needs --points CSV|DIR")
        os.makedirs(args.out, exist_ok=True)
        started = time.perf_counter()
        images = [(path, _apply_stain(meta, read_image(path))) for path in args.images]
        pending = []
        if task != "classification":  # all tiles of all images in flight together
            pending = [client.submit_maps(image, args.tile, args.margin, args.batch) for _, image in images]
        from kerasnuc.postprocess import centroids_from_density, instances_from_probability

        post = meta.get("postprocess") or {}
        total_nuclei = 0
        for index, (path, image) in enumerate(images):
            stem = os.path.splitext(os.path.basename(path))[0]
            if task == "classification":
                points = points_for(args.points, path)
                probabilities = client.classify(image, points)
                names = meta.get("class_names") or [f"class_{i}" for i in range(probabilities.shape[-1])]
                classes = probabilities.argmax(-1) if len(points) else np.zeros(0, int)
                out = os.path.join(args.out, f"{stem}_classes.csv")
                write_points_csv(out, points, ["class", "name", *[f"p_{n}" for n in names]],
                                 [[int(c), names[int(c)], *(f"{p:.4f}" for p in probs)]
                                  for c, probs in zip(classes, probabilities)])
                count, detail = len(points), f"{len(points)} nuclei classified"
            else:
                maps, variance = pending[index]()
                if args.save_maps:
                    np.save(os.path.join(args.out, f"{stem}_maps.npy"), maps)
                if variance is not None:
                    np.save(os.path.join(args.out, f"{stem}_variance.npy"), variance)
                if task == "segmentation":
                    labels = instances_from_probability(maps, **_kwargs(instances_from_probability, post))
                    out = os.path.join(args.out, f"{stem}_labels.png")
                    write_labels_png(out, labels)
                    count = int(labels.max())
                else:
                    density = maps[..., 0] if maps.shape[-1] == 1 else maps.max(axis=-1)
                    points = centroids_from_density(density, **_kwargs(centroids_from_density, post))
                    out = os.path.join(args.out, f"{stem}_centroids.csv")
                    write_points_csv(out, points)
                    count = len(points)
                detail = (f"{count} nuclei, {image.shape[1]}x{image.shape[0]} px in "
                          f"{pending[index].tiles} tiles / {pending[index].requests} requests")
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
