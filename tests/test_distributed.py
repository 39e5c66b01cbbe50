"""Data-parallel training (training.fit --distribute) gives what one device gives on the
same global batch, and Keras Tuner's distributed mode (a chief and two workers) shares one
search. Every run is a subprocess: the device count (XLA_FLAGS, TF logical devices) and the
backend are fixed before JAX or TensorFlow start."""

import csv
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from training import distribute

# Two XLA host devices; a collective waits up to 10 minutes for the other device's thread (XLA's
# default, 40 s, aborts the process when a loaded 2-core CI machine starves one thread).
TWO_CPU_DEVICES_XLA_FLAGS = "--xla_force_host_platform_device_count=2 --xla_cpu_collective_call_terminate_timeout_seconds=600"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny and exactly decomposable: no BatchNorm (per-replica statistics under tf.distribute),
# no dropout, no augmentation, a per-pixel loss (a batch Dice is not a mean of per-replica
# Dice values), 3 Adam steps on the shipped sample; one test image, no post-processing grid.
TINY = {"model": "unet", "model_config": {"filters": 4, "depth": 2, "batch_norm": False, "dropout": 0.0},
        "data": "sample", "tile": 64, "batch_size": 8, "steps_per_epoch": 3, "epochs": 1, "seed": 5,
        "loss": "bce", "augment": {"flip": False, "rotate90": False, "brightness": 0.0, "contrast": 0.0},
        "tune_postprocess": False, "val_fraction": 0.05, "test_fraction": 0.03}
# Both runs in one process (half the start-up and compiling): one device, then all of them.
# TensorFlow gets two logical CPUs before anything initialises it.
BOTH_RUNS = """
import sys
if sys.argv[1] == "tensorflow":
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from training import fit
config, out = sys.argv[2:4]
for flag in sys.argv[4:]:
    fit.main(["--config", config, "--distribute", flag, "--out", f"{out}/{flag}"])
"""


def _env(**extra):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT, **extra}
    for name in distribute.JAX_CLUSTER_VARIABLES + ("TF_CONFIG",) + ("KERASTUNER_TUNER_ID",
                                                                   "KERASTUNER_ORACLE_IP",
                                                                   "KERASTUNER_ORACLE_PORT"):
        if name not in extra:
            env.pop(name, None)
    return env


def _fit_both(tmp_path, backend, flag, **env):
    """training.fit with --distribute none, then ``flag``, in one subprocess; returns the two
    run folders and the log."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    command = [sys.executable, "-c", BOTH_RUNS, backend, str(config), str(tmp_path), "none", flag]
    result = subprocess.run(command, cwd=ROOT, env=_env(KERAS_BACKEND=backend, **env), capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path / "none", tmp_path / flag, result.stdout


def _weights(run):
    import keras

    model = keras.models.load_model(os.path.join(run, "model.keras"))
    return {w.path: np.asarray(w) for w in model.weights}


def _history(run):
    with open(os.path.join(run, "history.csv")) as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _assert_same_training(one, many):
    """Same weights and losses up to float32 summation order. Why these tolerances: the
    replicas sum their halves of the batch, then the halves are summed, where one device
    sums in another order (~1e-7 relative per sum); 3 Adam steps of lr 1e-3 keep that far
    below 1e-5 in the weights (seen: <= 3e-8). A different batch or a missed gradient
    reduction moves weights by ~lr = 1e-3 and losses in the third decimal."""
    a, b = _weights(one), _weights(many)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-5, err_msg=key)
    # and training really moved them (3 steps of Adam: ~3e-3), so equality means something
    initial = max(float(np.abs(a[k]).max()) for k in a if k.endswith("bias"))
    assert initial > 1e-3
    for row_one, row_many in zip(_history(one), _history(many), strict=True):
        for key in ("loss", "val_loss"):
            assert row_many[key] == pytest.approx(row_one[key], rel=1e-4), key


def test_mirrored_on_two_cpus_equals_one_device(tmp_path):
    pytest.importorskip("tensorflow")
    one, many, log = _fit_both(tmp_path, "tensorflow", "mirrored")
    assert "distribute: mirrored, 2 replicas (MirroredStrategy), 4 crops per replica" in log
    assert json.load(open(many / "config.json"))["distribute"] == "mirrored"
    _assert_same_training(one, many)


def test_data_parallel_on_two_jax_devices_and_on_two_processes_equals_one_device(tmp_path):
    pytest.importorskip("jax")
    one, many, log = _fit_both(tmp_path, "jax", "data_parallel",
                               XLA_FLAGS=TWO_CPU_DEVICES_XLA_FLAGS)
    assert "distribute: data_parallel over 2 devices" in log and "4 crops per device" in log
    _assert_same_training(one, many)

    # Two machines, as two processes of one device each on loopback (keras.distribution.initialize):
    # each feeds its half of every batch; both end with the weights of one device.
    cluster = {"KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{_free_port()}",
               "KERAS_DISTRIBUTION_NUM_PROCESSES": "2"}
    processes = [subprocess.Popen([sys.executable, "-m", "training.fit", "--config", str(tmp_path / "tiny.json"),
                                   "--distribute", "data_parallel", "--out", str(tmp_path / f"host{i}")],
                                  cwd=ROOT, env=_env(KERAS_BACKEND="jax", KERAS_DISTRIBUTION_PROCESS_ID=str(i),
                                                     **cluster),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    try:
        logs = [process.communicate(timeout=400)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for i, (process, text) in enumerate(zip(processes, logs)):
        assert process.returncode == 0, text[-3000:]
        assert f"data_parallel over 2 devices, process {i} of 2" in text
        _assert_same_training(one, tmp_path / f"host{i}")


SHORT_LAST_BATCH = """
import numpy as np, keras
from training.distribute import local_batches
class Nuclei(keras.utils.PyDataset):  # like ClassificationDataset(evaluation=True): 4 + 3 samples
    def __len__(self):
        return 2
    def __getitem__(self, i):
        n = 4 if i == 0 else 3
        return np.full((n, 8, 8, 3), i, "float32"), np.full((n,), i, "int32")
with keras.distribution.DataParallel(devices=keras.distribution.list_devices()).scope():
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inputs)))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    even = local_batches(Nuclei())
    print("batches", [len(even[i][0]) for i in range(len(even))])
    print("evaluated", model.evaluate(even, verbose=0))
    try:
        model.evaluate(Nuclei(), verbose=0)
    except Exception as error:
        print("unpatched:", type(error).__name__)
"""


def test_a_short_last_batch_is_cut_to_whole_device_multiples():
    pytest.importorskip("jax")
    result = subprocess.run([sys.executable, "-c", SHORT_LAST_BATCH], cwd=ROOT, capture_output=True, text=True,
                            env=_env(KERAS_BACKEND="jax", XLA_FLAGS=TWO_CPU_DEVICES_XLA_FLAGS),
                            timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batches [4, 2]" in result.stdout and "evaluated [" in result.stdout
    assert "unpatched: IndivisibleError" in result.stdout  # what fit's validation hit without it


def test_the_choice_must_fit_the_backend(monkeypatch, capsys):
    with pytest.raises(ValueError, match="needs KERAS_BACKEND=jax, but Keras runs on tensorflow"):
        distribute.check_choice("data_parallel", "tensorflow")
    for choice in ("mirrored", "multi_worker"):
        with pytest.raises(ValueError, match="needs KERAS_BACKEND=tensorflow, but Keras runs on jax"):
            distribute.check_choice(choice, "jax")
    with pytest.raises(ValueError, match="distribute must be one of"):
        distribute.check_choice("horovod", "jax")
    distribute.check_choice("none", "torch")
    assert distribute.resolve_choice("auto") in ("none", "data_parallel", "mirrored")
    if not distribute._accelerators(keras_backend()):
        assert distribute.resolve_choice("auto") == "none"  # CPUs only: one device, as before
    with pytest.raises(ValueError, match="must be divisible by the 3 replicas"):
        distribute._check_batch(8, 3, "mirrored")
    # The CLI says it in one line, before loading anything.
    import keras

    from training import fit

    wrong = "data_parallel" if keras.backend.backend() != "jax" else "mirrored"
    with pytest.raises(SystemExit) as caught:
        fit.main(["--distribute", wrong, "--out", "unused"])
    message = str(caught.value)
    assert message.startswith("training.fit: distribute") and "KERAS_BACKEND=" in message
    assert "\n" not in message


def test_multi_worker_needs_tf_config_and_refuses_several_workers(monkeypatch):
    pytest.importorskip("tensorflow")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs TF_CONFIG"):
        distribute._tf_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        distribute._tf_strategy("multi_worker")
    # Two workers: Keras 3's fit cannot train across them (checked, see training/distribute.py).
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["localhost:1", "localhost:2"]},
                                                "task": {"type": "worker", "index": 0}}))
    with pytest.raises(ValueError, match="cannot train with MultiWorkerMirroredStrategy across workers"):
        distribute._tf_strategy("multi_worker")


def test_data_parallel_on_several_machines_needs_all_three_variables(monkeypatch):
    for name in distribute.JAX_CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="missing KERAS_DISTRIBUTION_JOB_ADDRESSES, KERAS_DISTRIBUTION_PROCESS_ID"):
        distribute._jax_scope(8, print)


def keras_backend():
    import keras

    return keras.backend.backend()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(path, text, processes, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if os.path.exists(path) and text in open(path).read():
            return
        for process in processes:
            assert process.poll() is None, open(path).read()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"'{text}' not in {path} after {seconds}s")


def test_keras_tuner_chief_and_two_workers_share_one_search(tmp_path):
    pytest.importorskip("keras_tuner")
    pytest.importorskip("grpc")
    out, port = tmp_path / "search", _free_port()
    command = [sys.executable, "-m", "training.tune", "--model", "unet", "--model-config",
               '{"filters": 4, "depth": 2}', "--data", "sample", "--tile", "64", "--batch-size", "8",
               "--steps-per-epoch", "2", "--epochs", "1", "--seed", "3", "--val-fraction", "0.05",
               "--max-trials", "3", "--max-epochs", "1", "--filters", "4", "--depth", "2", "--out", str(out)]
    logs, processes = {}, []
    try:
        # The workers first: they wait for the chief, so both hold a request when it starts
        # serving and each gets a trial.
        for tuner_id in ("tuner0", "tuner1", "chief"):
            logs[tuner_id] = tmp_path / f"{tuner_id}.log"
            env = _env(KERASTUNER_TUNER_ID=tuner_id, KERASTUNER_ORACLE_IP="127.0.0.1",
                       KERASTUNER_ORACLE_PORT=str(port))
            with open(logs[tuner_id], "w") as handle:
                processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle,
                                                  stderr=subprocess.STDOUT, text=True))
            if tuner_id == "tuner1":
                for worker in ("tuner0", "tuner1"):
                    _wait_for(logs[worker], f"{worker}: asking the chief", processes, 200)
        for process in processes:
            process.wait(timeout=300)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    text = {k: open(v).read() for k, v in logs.items()}
    for tuner_id, process in zip(logs, processes):
        assert process.returncode == 0, text[tuner_id][-3000:]

    trials = json.load(open(out / "trials.json"))["trials"]
    assert len(trials) == 3 and all(t["status"] == "COMPLETED" for t in trials), trials
    owners = [t["tuner_id"] for t in trials]
    assert set(owners) == {"tuner0", "tuner1"}, owners  # spread over both workers, none on the chief
    for tuner_id in ("tuner0", "tuner1"):
        mine = sorted(t["trial_id"] for t in trials if t["tuner_id"] == tuner_id)
        assert f"{tuner_id}: ran {len(mine)} trials ({', '.join(mine)})" in text[tuner_id]
        assert "best: trial" not in text[tuner_id]  # workers write and report no results
    # The chief alone wrote the results, from every worker's trials.
    best = max(trials, key=lambda t: t["score"])
    assert f"best: trial id {best['trial_id']}" in text["chief"]
    config = json.load(open(out / "best_config.json"))
    assert config["learning_rate"] == pytest.approx(best["hyperparameters"]["learning_rate"])
    with open(out / "trials.csv") as handle:
        assert sorted(row["tuner_id"] for row in csv.DictReader(handle)) == sorted(owners)
    assert sorted(os.listdir(out)) == ["best_config.json", "summary.txt", "trials.csv", "trials.json", "tuner"]
