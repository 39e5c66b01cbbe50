"""kerasnuc.predict on a Dask cluster: one task per block on worker processes that open the
inputs by path and load the model once each; the client stitches, and every output (labels,
CSV table, GeoJSON, overlay) equals the serial run's, for small images and for an image split
into several blocks, on a local cluster started by the CLI and on an existing scheduler."""

import csv
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
pytest.importorskip("keras")
cv2 = pytest.importorskip("cv2")
tifffile = pytest.importorskip("tifffile")

from import_blocker import FRAMEWORKS, LEAK_CHECK, PREAMBLE, environment  # noqa: E402
from kerasnuc.predict import __main__ as cli  # noqa: E402
from kerasnuc.predict import distributed as dask_predict  # noqa: E402
from kerasnuc.predict.engine import block_grid  # noqa: E402
from test_predict import TINY  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BLOCK = 256  # the large image splits into several blocks


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from training import fit
    from training.config import resolve

    out = tmp_path_factory.mktemp("dask") / "unet"
    return fit.run(resolve(overrides={**TINY, "out": str(out)}), log=lambda m: None)


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory):
    """A folder of three small DSB test images, one large one and a broken file; its block count."""
    paths = sorted(glob.glob(os.path.join(shared_data, "dsb2018", "stage1_test", "images", "*.png")))
    if not paths:
        pytest.skip("DSB 2018 stage1_test not in ../shared/data")
    shapes = {p: cv2.imread(p).shape[:2] for p in paths[:40]}
    small = [p for p, s in shapes.items() if max(s) <= BLOCK][:3]
    large = [p for p, s in shapes.items() if min(s) >= 2 * BLOCK][:1]
    assert len(small) == 3 and large, "DSB stage1_test has 256 x 256 and 520 x 696 images"
    folder = tmp_path_factory.mktemp("inputs")
    for path in small + large:
        os.symlink(path, folder / os.path.basename(path))
    (folder / "broken.png").write_bytes(b"not a png")
    blocks = sum(len(list(block_grid(*shapes[p], BLOCK, 16))) for p in small + large)
    return str(folder), [os.path.splitext(os.path.basename(p))[0] for p in small + large], blocks


@pytest.fixture(scope="module")
def serial(trained_run, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    assert cli.main([trained_run, inputs[0], "--out", str(out), "--block", str(BLOCK), "--skip-bad"]) == 0
    return out


def assert_same_outputs(out, expected, stems):
    """Labels, CSV, GeoJSON (but its random feature ids) and overlay equal, and nuclei found."""
    nuclei = 0
    for stem in stems:
        labels = tifffile.imread(out / f"{stem}_labels.tif")
        np.testing.assert_array_equal(labels, tifffile.imread(expected / f"{stem}_labels.tif"), err_msg=stem)
        rows = list(csv.reader(open(out / f"{stem}_nuclei.csv")))
        assert rows == list(csv.reader(open(expected / f"{stem}_nuclei.csv"))), stem
        assert len(rows) - 1 == labels.max() == len(np.unique(labels)) - 1
        features, reference = (json.load(open(folder / f"{stem}.geojson"))["features"] for folder in (out, expected))
        assert [{**f, "id": None} for f in features] == [{**f, "id": None} for f in reference], stem
        np.testing.assert_array_equal(cv2.imread(str(out / f"{stem}_overlay.png")),
                                      cv2.imread(str(expected / f"{stem}_overlay.png")))
        nuclei += int(labels.max())
    assert nuclei >= 20, "the tiny trained U-Net finds nuclei on DSB test images"
    assert not [n for n in os.listdir(out) if ".tmp" in n]


def test_local_cluster_equals_the_serial_run(trained_run, inputs, serial, tmp_path, capsys):
    folder, stems, blocks = inputs
    assert blocks >= len(stems) + 5  # the large image is several blocks
    out = tmp_path / "dask"
    capsys.readouterr()
    code = cli.main([trained_run, folder, "--out", str(out), "--block", str(BLOCK), "--skip-bad",
                     "--dask", "--dask-workers", "2"])
    assert code == 0
    printed = capsys.readouterr().out  # broken.png is reported by name, the others go on
    assert "4 images" in printed and "1 skipped as bad" in printed and "broken.png" in printed
    assert_same_outputs(out, serial, stems)


@pytest.fixture(scope="module")
def joined():
    """A cluster of two worker processes started here, as ``dask-scheduler`` + ``dask-worker`` would be."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        yield cluster.scheduler_address, client


def test_scheduler_joins_an_existing_cluster_whose_workers_load_the_model_once(trained_run, inputs, serial,
                                                                              joined, tmp_path):
    folder, stems, blocks = inputs
    address, client = joined
    out = tmp_path / "joined"
    before = client.run(dask_predict.worker_stats)
    code = cli.main([trained_run, folder, "--out", str(out), "--block", str(BLOCK), "--skip-bad",
                     "--scheduler", address])
    after = client.run(dask_predict.worker_stats)
    assert len(client.nthreads()) == 2  # the CLI left the cluster running
    assert code == 0
    assert_same_outputs(out, serial, stems)
    done = {worker: after[worker].get("blocks", 0) - before[worker].get("blocks", 0) for worker in after}
    assert sum(done.values()) == blocks  # every block ran on a worker
    for worker, count in done.items():
        loads = after[worker].get("loads", 0) - before[worker].get("loads", 0)
        assert loads == (1 if count else 0), (worker, count, loads)  # once per worker, not per block
        assert after[worker].get("measured", 0) == 0, worker  # the client's metadata, not probed again


def open_on_the_client_only(path):
    """Opens an image here but fails on a worker (as a file missing on the workers' machines would)."""
    from kerasnuc.data.imageio import DataError
    from kerasnuc.predict.sources import open_view

    try:
        distributed.get_worker()
    except ValueError:
        return open_view(path)
    raise DataError(f"{path}: not on this worker")


def stitched(results):
    """{view index: (labels, table, glass blocks) or the error} of a stream, stitched as
    predict_instances does."""
    from kerasnuc.predict.engine import paste_labels
    from kerasnuc.predict.measure import concat_tables

    views = {}
    for result in results:
        if result.error is not None:
            views[result.index] = result.error
            continue
        labels, tables, glass = views.setdefault(result.index, (np.zeros(result.view.shape[:2], np.uint32), [], []))
        paste_labels(labels, result)
        glass.append(result.glass)
        if result.table is not None and len(result.table["id"]):
            tables.append(result.table)
    return {i: v if isinstance(v, Exception) else (v[0], concat_tables(v[1]), sum(v[2])) for i, v in views.items()}


def assert_same_views(remote, local, indices):
    for index in indices:
        labels, table, glass = remote[index]
        np.testing.assert_array_equal(labels, local[index][0])
        assert list(table) == list(local[index][1]) and glass == local[index][2]
        for name, column in table.items():
            np.testing.assert_array_equal(column, local[index][1][name], err_msg=name)


@pytest.fixture(scope="module")
def slide(shared_data, tmp_path_factory):
    """A two-level pyramidal TIFF: a 300 x 300 MoNuSeg H&E crop on glass (5 of its 9 blocks are glass)."""
    from test_slides import write_slide

    paths = sorted(glob.glob(os.path.join(shared_data, "monuseg2018", "train", "images", "*.png")))
    if not paths:
        pytest.skip("MoNuSeg images not found")
    canvas = np.full((3 * BLOCK, 3 * BLOCK, 3), 245, np.uint8)
    canvas[:300, :300] = cv2.imread(paths[0])[:300, :300, ::-1]
    path = str(tmp_path_factory.mktemp("slide") / "mosaic.tif")
    write_slide(path, canvas, levels=2)
    return path


def test_stream_on_a_cluster_equals_the_serial_stream_and_reports_a_failing_worker(trained_run, inputs, slide,
                                                                                   joined):
    import functools

    import kerasnuc
    from kerasnuc.predict.sources import open_view

    small = os.path.join(inputs[0], inputs[1][0] + ".png")
    views = [functools.partial(open_on_the_client_only, small), slide]
    with dask_predict.DaskPredictor(trained_run, client=joined[1], block=BLOCK) as predictor:
        remote = stitched(predictor.stream(views))
    local = stitched(kerasnuc.load(trained_run, block=BLOCK).stream([functools.partial(open_view, slide)] * 2))
    assert sorted(remote) == [0, 1]
    assert "not on this worker" in str(remote[0])  # reported for its view; the others went on
    assert_same_views(remote, local, (1,))
    assert remote[1][2] == 5 and remote[1][0].max() > 0  # the slide: glass skipped, nuclei in the tissue
    assert joined[1].status == "running"  # a client given is not closed
    with pytest.raises(AttributeError, match="stream"):
        predictor.predict_instances  # would run on the client, not the cluster


def test_tflite_on_a_cluster_equals_litert_here(trained_run, slide, joined, tmp_path):
    pytest.importorskip("ai_edge_litert")
    import functools

    import kerasnuc
    from export import tflite
    from kerasnuc.predict.sources import open_view

    path, _ = tflite.export_tflite(trained_run, "float32", out=str(tmp_path / "unet.tflite"),
                                   evaluate_model=False, log=lambda m: None)
    with dask_predict.DaskPredictor(path, client=joined[1], block=BLOCK) as predictor:
        remote = stitched(predictor.stream([slide]))
    local = stitched(kerasnuc.load(path, block=BLOCK).stream([functools.partial(open_view, slide)]))
    assert remote[0][0].max() > 0
    assert_same_views(remote, local, (0,))


def test_unreachable_scheduler_is_one_line(trained_run, tmp_path):
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), pytest.raises(SystemExit) as exit:
        cli.main([trained_run, str(tmp_path), "--out", str(tmp_path / "out"), "--scheduler", "tcp://127.0.0.1:9"])
    message = str(exit.value)
    assert message.startswith("kerasnuc.predict: tcp://127.0.0.1:9: cannot reach the Dask scheduler")
    assert "\n" not in message


def test_arrays_are_refused_workers_read_inputs_by_path():
    with pytest.raises(ValueError, match="file paths"):
        dask_predict._opener(np.zeros((8, 8), np.uint8))


IMPORTS = PREAMBLE + r'''
import kerasnuc.predict
import kerasnuc.predict.__main__
from kerasnuc.predict import distributed

try:
    distributed.connect()
except ValueError as error:
    print("REFUSED", error)
''' + LEAK_CHECK + '''
print("NO-BLOCKED-IMPORTS")
'''


def test_engine_and_this_module_import_without_dask():
    blocked = FRAMEWORKS + ("dask", "distributed")
    result = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, timeout=120,
                            cwd=REPO, env=environment(blocked))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "NO-BLOCKED-IMPORTS" in result.stdout
    assert "REFUSED prediction on a Dask cluster needs dask.distributed: pip install 'kerasnuc[dask]'" in result.stdout


def test_tf_serving_target_is_used_from_every_worker(trained_run, slide, joined, tmp_path):
    pytest.importorskip("tensorflow_serving.apis")
    import functools

    import kerasnuc
    from export import saved_model
    from kerasnuc.predict.sources import open_view
    from serving.server import create_server

    base = str(tmp_path / "exports")
    name = os.path.basename(os.path.dirname(saved_model.export_saved_model(trained_run, base, log=lambda m: None)))
    server, port, registry = create_server(base, port=0, threads=4, poll_seconds=60, log=lambda m: None)
    target = f"127.0.0.1:{port}"
    try:
        with dask_predict.DaskPredictor(target, model_name=name, client=joined[1], block=BLOCK) as predictor:
            remote = stitched(predictor.stream([slide]))
        served = kerasnuc.load(target, model_name=name, block=BLOCK)
        local = stitched(served.stream([functools.partial(open_view, slide)]))
    finally:
        registry.stop()
        server.stop(0)
    assert remote[0][0].max() > 0
    assert_same_views(remote, local, (0,))


def test_classifier_on_the_workers_equals_the_serial_run(trained_run, slide, joined, tmp_path):
    import functools

    import keras

    import kerasnuc
    from kerasnuc import models
    from kerasnuc.predict.sources import open_view
    from kerasnuc.runs import write_run

    keras.utils.set_random_seed(4)
    dcrn = models.build("dcrn", input_shape=(16, 16, 3), num_classes=3, blocks=2, layers_per_block=2,
                        growth=4, initial_filters=8, steps=1)
    classifier = write_run(str(tmp_path / "dcrn"), dcrn, task="classification", model_name="dcrn", patch=16)
    with dask_predict.DaskPredictor(trained_run, classifier=classifier, client=joined[1], block=BLOCK) as predictor:
        remote = stitched(predictor.stream([slide]))
    here = kerasnuc.load(trained_run, classifier=classifier, block=BLOCK)
    local = stitched(here.stream([functools.partial(open_view, slide)]))
    assert {"class", "class_probability"} <= set(remote[0][1]) and len(remote[0][1]["class"])
    assert_same_views(remote, local, (0,))
