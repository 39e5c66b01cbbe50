"""serving.server + serving.client: TF-Serving API over gRPC, tiling equal to whole-image Keras maps,
malformed requests, metadata/status, new-version pickup, retries. Tiny model, no training."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
grpc = pytest.importorskip("grpc")
apis = pytest.importorskip("tensorflow_serving.apis")

from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,  # noqa: E402
                                     predict_pb2, prediction_service_pb2_grpc)

from export import saved_model as sm  # noqa: E402
from kerasnuc.runs import write_run  # noqa: E402
from kerasnuc import models  # noqa: E402
from kerasnuc.predict.runtimes import predict_maps  # noqa: E402
from serving.client import ServingClient, ServingError  # noqa: E402
from serving.server import create_server  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MAX_MB = 2


def export_tiny_unet(root):
    """(model, run, base, version path): an untrained U-Net (filters 4, depth 3, multiple 8) as a
    run folder in ``root`` and version 1 of 'unet' in a fresh export base there."""
    keras.utils.set_random_seed(0)
    model = models.build("unet", input_shape=(None, None, 3), filters=4, depth=3)
    run = write_run(str(root / "run"), model, model_config={"filters": 4, "depth": 3},
                    postprocess={"threshold": 0.5, "min_distance": 3, "min_area": 5})
    base = str(root / "base")
    return model, run, base, sm.export_saved_model(run, base, log=lambda m: None)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    model, run, base, _ = export_tiny_unet(root)
    logs = []
    server, port, registry = create_server(base, port=0, threads=4, max_message_mb=MAX_MB,
                                           poll_seconds=0.5, log=logs.append)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield {"model": model, "run": run, "base": base, "port": port, "registry": registry, "logs": logs,
           "target": f"127.0.0.1:{port}", "channel": channel}
    channel.close()
    registry.stop()
    server.stop(0)


def _request(image, name="unet", signature="serving_default"):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(image))
    return request


def test_plain_stub_predict(served):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(served["channel"])
    image = np.random.default_rng(0).integers(0, 255, size=(1, 40, 56, 3), dtype=np.uint8)
    response = stub.Predict(_request(image), timeout=30)
    maps = tf.make_ndarray(response.outputs["maps"])
    assert response.model_spec.version.value == 1 and response.model_spec.signature_name == "serving_default"
    np.testing.assert_allclose(maps[0], predict_maps(served["model"], image[0], 3, 8), atol=1e-4)


def test_client_tiles_equal_whole_image_keras(served):
    with ServingClient(served["target"], "unet", in_flight=3) as client:
        meta = client.meta
        assert meta["task"] == "segmentation" and meta["multiple"] == 8
        margin = meta["tile_margin"]
        assert margin >= meta["receptive_radius"]
        rng = np.random.default_rng(3)
        large = rng.integers(0, 120, size=(150, 260, 3), dtype=np.uint8)  # larger than a tile, odd sizes
        large[40:70, 100:140] = 230
        maps, variance = client.predict_maps(large, tile=2 * margin + 32, margin=margin, batch=2)
        assert variance is None and maps.shape == (150, 260, 1)
        reference = predict_maps(served["model"], large, 3, 8)
        assert np.abs(maps - reference).max() < 1e-4
        assert client.requests > 1  # several tiles, several requests
        small = rng.integers(0, 255, size=(30, 45, 1), dtype=np.uint8)  # grey, smaller than a tile
        maps, _ = client.predict_maps(small)
        assert np.abs(maps - predict_maps(served["model"], small, 3, 8)).max() < 1e-4


def test_malformed_requests_are_invalid_argument_and_server_survives(served):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(served["channel"])
    good = np.zeros((1, 16, 16, 3), np.uint8)
    bad = [
        _request(good.astype(np.float32)),                       # wrong dtype
        _request(np.zeros((16, 16, 3), np.uint8)),               # wrong rank
        _request(np.zeros((1, 16, 16, 2), np.uint8)),            # 2 channels: caught in the graph
        _request(good, signature="no_such_signature"),
    ]
    wrong_name = predict_pb2.PredictRequest()
    wrong_name.model_spec.name = "unet"
    wrong_name.inputs["pixels"].CopyFrom(tf.make_tensor_proto(good))
    bad.append(wrong_name)
    garbage = _request(good)
    garbage.inputs["image"].tensor_content = b"\x01\x02\x03"   # 3 bytes for 768 values
    bad.append(garbage)
    for request in bad:
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(_request(good, name="nope"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    too_big = np.zeros((1, 1024, 1024, 3), np.uint8)              # 3 MiB > the 2 MiB limit
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(_request(too_big), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.Predict(_request(good), timeout=30).outputs["maps"].dtype == tf.float32.as_datatype_enum


def test_model_status_and_metadata(served):
    status_stub = model_service_pb2_grpc.ModelServiceStub(served["channel"])
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "unet"
    status = status_stub.GetModelStatus(request, timeout=30).model_version_status
    assert [(s.version, s.state) for s in status] == [(1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]
    assert status[0].status.error_code == 0

    stub = prediction_service_pb2_grpc.PredictionServiceStub(served["channel"])
    meta_request = get_model_metadata_pb2.GetModelMetadataRequest()
    meta_request.model_spec.name = "unet"
    meta_request.metadata_field.append("signature_def")
    response = stub.GetModelMetadata(meta_request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    default = signatures.signature_def["serving_default"]
    assert default.inputs["image"].dtype == tf.uint8.as_datatype_enum
    assert "maps" in default.outputs and "metadata" in signatures.signature_def
    meta_request.metadata_field[0] = "nonsense"
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModelMetadata(meta_request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_client_command_line_against_embedded_server(served, tmp_path):
    import cv2

    image = np.random.default_rng(5).integers(0, 60, size=(90, 130, 3), dtype=np.uint8)
    image[20:40, 30:60] = 200
    path = str(tmp_path / "cells.png")
    cv2.imwrite(path, image)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "serving.client", "--target", served["target"], "--model",
                             "unet", path, "--out", str(out), "--tile", "128", "--save-maps"],
                            capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "summary: 1 images" in result.stdout
    labels = cv2.imread(str(out / "cells_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (90, 130) and labels.dtype == np.uint16
    maps = np.load(out / "cells_maps.npy")
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)  # what read_image returns
    assert np.abs(maps - predict_maps(served["model"], rgb, 3, 8)).max() < 1e-4


def test_new_version_is_picked_up(served):
    sm.export_saved_model(served["run"], served["base"], log=lambda m: None)  # version 2
    deadline = time.time() + 60
    while time.time() < deadline and served["registry"].models()["unet"].version != 2:
        time.sleep(0.2)
    assert served["registry"].models()["unet"].version == 2
    stub = prediction_service_pb2_grpc.PredictionServiceStub(served["channel"])
    response = stub.Predict(_request(np.zeros((1, 16, 16, 3), np.uint8)), timeout=30)
    assert response.model_spec.version.value == 2
    assert any("version 2" in line for line in served["logs"])


def test_client_retries_unavailable_then_gives_up():
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = ServingClient(f"127.0.0.1:{port}", "unet", timeout=5, retries=3, backoff=0.01,
                           metadata={"task": "segmentation", "channels": 3, "multiple": 8}, log=lambda m: None)
    started = time.time()
    with pytest.raises(ServingError) as info:
        client.predict("serving_default", {"image": np.zeros((1, 8, 8, 3), np.uint8)})
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert client.retried == 3 and client.requests == 4 and time.time() - started < 30
    client.close()


def test_client_with_classifier_and_mc_models(served):
    from kerasnuc.predict.tiling import intensity_range, normalize_with_range, patches_at

    root = os.path.dirname(served["base"])
    keras.utils.set_random_seed(4)
    dcrn = models.build("dcrn", input_shape=(16, 16, 3), num_classes=3, blocks=2, layers_per_block=2,
                        growth=4, initial_filters=8, steps=1)
    mc = models.build("mc_unet", input_shape=(None, None, 3), filters=4, depth=2)
    sm.export_saved_model(write_run(os.path.join(root, "dcrn_run"), dcrn, task="classification",
                                    model_name="dcrn", patch=16), served["base"], log=lambda m: None)
    sm.export_saved_model(write_run(os.path.join(root, "mc_run"), mc, model_config={"filters": 4, "depth": 2},
                                    mc_samples=5), served["base"], name="mc", log=lambda m: None)
    deadline = time.time() + 60
    while time.time() < deadline and not {"dcrn", "mc"} <= set(served["registry"].models()):
        time.sleep(0.2)
    image = np.random.default_rng(6).integers(0, 90, size=(70, 100, 3), dtype=np.uint8)
    points = np.array([[5.0, 5.0], [50.2, 30.7], [99.0, 69.0]])
    with ServingClient(served["target"], "dcrn") as client:
        assert client.meta["task"] == "classification" and len(client.meta["class_names"]) == 3
        probabilities = client.classify(image, points)
    patches = normalize_with_range(patches_at(image, points, 16), 3, intensity_range(image, 3))
    np.testing.assert_allclose(probabilities, dcrn.predict(patches, verbose=0), atol=1e-5)

    with ServingClient(served["target"], "mc") as client:
        assert client.meta["stochastic"]
        mean, variance = client.predict_maps(image, tile=64, margin=16)  # uncertainty_with_range, tiled
    assert mean.shape == variance.shape == (70, 100, 1)
    assert variance.max() > 0 and np.all(variance >= 0) and np.all((mean >= 0) & (mean <= 1))


def test_engine_grpc_runtime_gives_the_keras_instances(served, shared_data):
    """kerasnuc.load(host:port, model_name) runs the same engine as the run folder (AJI >= 0.99)."""
    import glob

    import kerasnuc
    from kerasnuc import metrics
    from kerasnuc.data.imageio import read_image

    paths = sorted(glob.glob(os.path.join(shared_data, "dsb2018", "stage1_test", "images", "*.png")))
    if not paths:
        pytest.skip("DSB 2018 stage1_test not in ../shared/data")
    image = read_image(paths[0], channels=3)
    remote = kerasnuc.load(served["target"], model_name="unet")
    local = kerasnuc.load(served["run"])
    assert remote.meta["tile_margin"] == local.meta["tile_margin"]
    a, _ = local.predict_instances(image)
    b, _ = remote.predict_instances(image)
    assert a.max() > 0
    assert metrics.aggregated_jaccard_index(a, b) >= 0.99
