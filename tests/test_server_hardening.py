"""serving.server under hostile requests: broadcast tensors, empty and odd shapes, pixel budgets,
a full queue, cancelled requests, and a version that fails to load once. Tiny model, no training."""

import os
import shutil
import threading
import time

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
grpc = pytest.importorskip("grpc")
pytest.importorskip("tensorflow_serving.apis")

from tensorflow_serving.apis import prediction_service_pb2_grpc  # noqa: E402

from serving import server as srv  # noqa: E402
from serving.client import ServingClient, ServingError  # noqa: E402
from test_serving import _request, export_tiny_unet  # noqa: E402

MAX_REQUEST_MPIX = 0.05   # 50,000 px: 216 x 216 fits, 224 x 224 (after padding to 8) does not
MAX_INFLIGHT_MPIX = 0.1
CHUNK_MPIX = 0.002        # 2,000 px: a batch of 40 x 40 images runs one image per model call


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny U-Net (multiple 8) exported as version 1 of 'unet' in a fresh base."""
    root = tmp_path_factory.mktemp("hardening")
    _, _, base, path = export_tiny_unet(root)
    return {"base": base, "v1": path, "root": root}


@pytest.fixture(scope="module")
def served(export):
    """One request runs at a time, one more may wait; small pixel budgets."""
    server, port, registry = srv.create_server(export["base"], port=0, max_inflight=1, max_queue=1,
                                               max_request_mpix=MAX_REQUEST_MPIX,
                                               max_inflight_mpix=MAX_INFLIGHT_MPIX, chunk_mpix=CHUNK_MPIX,
                                               poll_seconds=30,
                                               log=lambda m: None)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield {"stub": prediction_service_pb2_grpc.PredictionServiceStub(channel), "service": server.predictions,
           "gate": server.predictions.gate, "target": f"127.0.0.1:{port}"}
    channel.close()
    registry.stop()
    server.stop(0)


def _refused(stub, request, code=grpc.StatusCode.INVALID_ARGUMENT):
    """The details of a refused request (asserting its status code)."""
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=30)
    assert info.value.code() == code, info.value.details()
    details = info.value.details()
    assert "\n" not in details and "Graph execution error" not in details
    return details


def _wait_for(condition, seconds=10):
    deadline = time.time() + seconds
    while time.time() < deadline and not condition():
        time.sleep(0.01)
    assert condition()


def test_broadcast_and_short_tensors_are_refused_without_running(served):
    stub, runs = served["stub"], served["service"].stats["runs"]
    one_value = _request(np.zeros((1, 64, 64, 3), np.uint8))
    proto = one_value.inputs["image"]
    proto.ClearField("tensor_content")
    proto.int_val.append(7)  # TF's make_ndarray would broadcast it to 1 x 64 x 64 x 3
    assert tf.make_ndarray(proto).shape == (1, 64, 64, 3)  # the hole being closed
    assert "broadcasting" in _refused(stub, one_value) and "1 values" in _refused(stub, one_value)
    proto.ClearField("int_val")  # no values at all: make_ndarray gives zeros of the whole shape
    assert "0 values" in _refused(stub, one_value)
    short = _request(np.zeros((1, 64, 64, 3), np.uint8))
    short.inputs["image"].tensor_content = short.inputs["image"].tensor_content[:-1]
    assert "12287 bytes" in _refused(stub, short)
    assert served["service"].stats["runs"] == runs
    exact = _request(np.zeros((1, 2, 2, 3), np.uint8))  # typed values, one per element: accepted
    exact.inputs["image"].ClearField("tensor_content")
    exact.inputs["image"].int_val.extend([5] * 12)
    assert tf.make_ndarray(stub.Predict(exact, timeout=30).outputs["maps"]).shape == (1, 2, 2, 1)


def test_empty_and_odd_shapes_get_clear_invalid_argument(served):
    stub = served["stub"]
    for shape in [(1, 0, 0, 3), (0, 16, 16, 3), (1, 16, 16, 0)]:
        details = _refused(stub, _request(np.zeros(shape, np.uint8)))
        assert "empty shape" in details and str(list(shape)) in details, details
    assert "5 channels" in _refused(stub, _request(np.zeros((1, 16, 16, 5), np.uint8)))
    unknown = _request(np.zeros((1, 4, 4, 3), np.uint8))
    unknown.inputs["image"].tensor_shape.unknown_rank = True
    assert "unknown rank" in _refused(stub, unknown)
    mismatch = _request(np.zeros((2, 16, 16, 3), np.uint8), signature="with_range")
    mismatch.inputs["intensity_range"].CopyFrom(tf.make_tensor_proto(np.zeros((3, 2), np.float32)))
    assert "batch size" in _refused(stub, mismatch)
    for shape in [(1, 1, 1, 3), (1, 3, 1000, 1), (2, 7, 5, 3)]:  # odd but valid: served, cropped back
        maps = tf.make_ndarray(stub.Predict(_request(np.full(shape, 9, np.uint8)), timeout=30).outputs["maps"])
        assert maps.shape == shape[:3] + (1,) and np.isfinite(maps).all()


def test_batches_run_in_chunks_equal_to_the_whole_batch(served, export):
    stub, stats = served["stub"], served["service"].stats
    images = np.random.default_rng(1).integers(0, 255, size=(3, 40, 40, 3), dtype=np.uint8)
    images[1] //= 4  # a different intensity range per image: normalisation stays per image
    ranges = np.array([[0, 255], [0, 63], [10, 200]], np.float32)
    chunks = stats["chunks"]
    request = _request(images, signature="with_range")
    request.inputs["intensity_range"].CopyFrom(tf.make_tensor_proto(ranges))
    maps = tf.make_ndarray(stub.Predict(request, timeout=30).outputs["maps"])
    assert stats["chunks"] == chunks + 3
    whole = tf.saved_model.load(export["v1"]).signatures["with_range"](
        image=tf.constant(images), intensity_range=tf.constant(ranges))["maps"].numpy()
    np.testing.assert_allclose(maps, whole, atol=1e-5)


def test_pixel_budgets(served):
    stub, gate = served["stub"], served["gate"]
    fits = stub.Predict(_request(np.zeros((1, 216, 216, 3), np.uint8)), timeout=30).outputs["maps"]
    assert tf.make_ndarray(fits).shape == (1, 216, 216, 1)
    details = _refused(stub, _request(np.zeros((1, 221, 221, 3), np.uint8)))  # 48,841 px, 224 x 224 padded
    assert "0.05 Mpix per request" in details and "--max-request-mpix" in details
    chunks = served["service"].stats["chunks"]  # 2 x 25,600 px: over as one call, within as two
    batch = stub.Predict(_request(np.zeros((2, 160, 160, 3), np.uint8)), timeout=30).outputs["maps"]
    assert tf.make_ndarray(batch).shape == (2, 160, 160, 1) and served["service"].stats["chunks"] == chunks + 2
    model = srv.LoadedModel("m", 1, "", None, {}, meta={"multiple": 8, "stochastic": True, "mc_samples": 30})
    assert srv.call_plan(model, "uncertainty", {"image": [4, 100, 100, 3]}, 10 ** 9) == (10 ** 9 // 104 ** 2 // 10,
                                                                                        4 * 104 ** 2 * 10)
    model.meta = {}  # a foreign SavedModel runs whole: the batch counts
    assert srv.call_plan(model, "serving_default", {"x": [4, 100, 100, 3]}, 10 ** 9) == (None, 4 * 100 ** 2)
    held = int(MAX_INFLIGHT_MPIX * srv.MPIX) - 100
    with gate.slot(held):  # the in-flight budget is taken: refused at once, retryable
        details = _refused(stub, _request(np.zeros((1, 16, 16, 3), np.uint8)), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "--max-inflight-mpix" in details
    assert gate.pixels == 0 and gate.running == 0
    with pytest.raises(ValueError):
        srv.create_server("unused", port=0, max_request_mpix=2, max_inflight_mpix=1)


def test_memory_budgets_count_the_models_width(export):
    """The export records its working bytes per pixel (3 x the tiny U-Net's widest activation, 8
    floats = 32 bytes); requests are refused by estimated memory, not only by pixels."""
    import json

    meta = json.load(open(os.path.join(export["v1"], "assets.extra", "kerasnuc.json")))
    assert meta["working_bytes_per_pixel"] == 96.0
    server, port, registry = srv.create_server(export["base"], port=0, max_inflight=1, max_queue=1,
                                               max_request_mb=1.0, max_inflight_mb=1.5, poll_seconds=30,
                                               log=lambda m: None)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        fits = stub.Predict(_request(np.zeros((1, 96, 96, 3), np.uint8)), timeout=30)  # 0.84 MB
        assert tf.make_ndarray(fits.outputs["maps"]).shape == (1, 96, 96, 1)
        details = _refused(stub, _request(np.zeros((1, 112, 112, 3), np.uint8)))  # 1.15 MB
        assert "working memory" in details and "96 bytes per pixel" in details and "--max-request-mb" in details
        gate = server.predictions.gate
        with gate.slot(0, memory=int(1.0 * srv.MB)):  # 1 of 1.5 MB in flight: 0.84 MB more is refused
            details = _refused(stub, _request(np.zeros((1, 96, 96, 3), np.uint8)), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "--max-inflight-mb" in details and gate.bytes == 0
    finally:
        channel.close()
        registry.stop()
        server.stop(0)
    with pytest.raises(ValueError, match="max_inflight_mb"):
        srv.create_server("unused", port=0, max_request_mb=2, max_inflight_mb=1)


def test_full_queue_is_resource_exhausted_at_once(served):
    stub, gate = served["stub"], served["gate"]
    image = np.zeros((1, 32, 32, 3), np.uint8)
    with gate.slot(0):  # the only running slot
        queued = stub.Predict.future(_request(image), timeout=60)
        _wait_for(lambda: gate.waiting == 1)
        started = time.time()
        details = _refused(stub, _request(image), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert time.time() - started < 5 and "--max-queue" in details
    assert queued.result().outputs["maps"].tensor_shape.dim[1].size == 32  # the queued one ran afterwards


def test_client_retries_a_busy_server_but_not_an_oversized_request(served):
    gate = served["gate"]
    meta = {"task": "segmentation", "channels": 3, "multiple": 8}
    client = ServingClient(served["target"], "unet", timeout=30, retries=6, backoff=0.05, metadata=meta,
                           log=lambda m: None)
    image = {"image": np.zeros((1, 32, 32, 3), np.uint8)}
    try:
        with gate.slot(0):
            queued = served["stub"].Predict.future(_request(image["image"]), timeout=60)
            _wait_for(lambda: gate.waiting == 1)  # running slot and queue both taken
            answer = {}
            worker = threading.Thread(target=lambda: answer.update(client.predict("serving_default", image)))
            worker.start()
            _wait_for(lambda: client.retried >= 1)
        worker.join(30)
        assert answer["maps"].shape == (1, 32, 32, 1) and queued.result()
        retried = client.retried
        with pytest.raises(ServingError) as info:  # over the per-request budget: not worth retrying
            client.predict("serving_default", {"image": np.zeros((1, 256, 256, 3), np.uint8)})
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and client.retried == retried
    finally:
        client.close()


def test_cancelled_and_expired_requests_do_not_run_the_model(served):
    stub, gate, stats = served["stub"], served["gate"], served["service"].stats
    image = np.zeros((1, 32, 32, 3), np.uint8)
    runs, cancelled = stats["runs"], stats["cancelled"]
    with gate.slot(0):
        future = stub.Predict.future(_request(image), timeout=60)
        _wait_for(lambda: gate.waiting == 1)
        assert future.cancel()
        _wait_for(lambda: gate.waiting == 0)  # it left the queue while the slot was still held
        expiring = stub.Predict.future(_request(image), timeout=0.3)
        _wait_for(lambda: expiring.done())
        assert expiring.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait_for(lambda: gate.waiting == 0)
    time.sleep(0.2)
    assert stats["runs"] == runs and stats["cancelled"] == cancelled + 2
    assert stub.Predict(_request(image), timeout=30) and stats["runs"] == runs + 1


def test_version_that_failed_to_load_is_retried(export, tmp_path):
    """A version copied in file by file fails while incomplete, is logged once, and loads once whole."""
    base = tmp_path / "base"
    shutil.copytree(export["v1"], base / "unet" / "1")
    logs = []
    registry = srv.ModelRegistry(str(base), poll_seconds=0.01, log=logs.append)
    registry.poll()
    assert registry.models()["unet"].version == 1
    target = base / "unet" / "2"
    target.mkdir()
    shutil.copy2(os.path.join(export["v1"], "saved_model.pb"), target)  # the graph first, no variables yet
    registry.poll()
    registry.poll()
    failures = [line for line in logs if "cannot load unet version 2" in line]
    assert len(failures) == 1 and "\n" not in failures[0] and registry.models()["unet"].version == 1
    for name in os.listdir(export["v1"]):  # the rest of the copy arrives
        if name != "saved_model.pb":
            source = os.path.join(export["v1"], name)
            (shutil.copytree if os.path.isdir(source) else shutil.copy2)(source, target / name)
    registry.poll()  # still changing since the last poll: not tried yet
    assert registry.models()["unet"].version == 1
    registry.poll()  # settled: retried, and it loads
    assert registry.models()["unet"].version == 2
    assert any("unet version 2 loads now" in line for line in logs)


def test_unchanged_failed_version_is_retried_after_back_off(export, tmp_path, monkeypatch):
    base = tmp_path / "base"
    shutil.copytree(export["v1"], base / "unet" / "3")
    now = [100.0]
    calls = []
    real = srv.load_version

    def flaky(name, version, path):
        calls.append(version)
        if len(calls) == 1:
            raise OSError("disk hiccup")
        return real(name, version, path)

    monkeypatch.setattr(srv, "load_version", flaky)
    logs = []
    registry = srv.ModelRegistry(str(base), poll_seconds=2.0, log=logs.append, clock=lambda: now[0])
    registry.poll()
    assert calls == [3] and "unet" not in registry.models()
    now[0] += 1.0
    registry.poll()  # folder unchanged, back-off (2 s) not over: not retried
    assert calls == [3]
    now[0] += 1.5
    registry.poll()
    assert calls == [3, 3] and registry.models()["unet"].version == 3
    assert sum("cannot load" in line for line in logs) == 1


def test_gate_counts_stay_consistent_under_threads():
    gate = srv.Gate(max_inflight=2, max_queue=3, max_pixels=10 ** 9)
    peak, outcomes, lock = [0], [], threading.Lock()

    def one():
        try:
            with gate.slot(10) as turn:
                with lock:
                    peak[0] = max(peak[0], gate.running)
                time.sleep(0.05)
                outcomes.append(turn)
        except srv._Abort as abort:
            outcomes.append(abort.code)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] <= 2 and outcomes.count(True) >= 5
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in outcomes
    assert gate.running == gate.waiting == gate.pixels == 0
