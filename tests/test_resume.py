"""Runs that survive crashes: a run folder is locked while a job writes it, a kill -9 leaves
the partial run with its checkpoint, ``--resume`` finishes it with the history and held-out
metrics of a run that was never killed, and nothing is deleted without --overwrite."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small but real: the shipped DSB 2018 sample, a 4-filter U-Net, 4 epochs of 12 batches,
# with dropout so the restored random state matters.
ARGS = ["--data", "sample", "--epochs", "4", "--steps-per-epoch", "12", "--tile", "64",
        "--batch-size", "4", "--model", "unet", "--model-config", '{"filters": 4, "depth": 2, "dropout": 0.2}',
        "--seed", "3"]


def _fit(*args, wait=True):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, "-m", "training.fit", *args]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    if not wait:
        return process
    output, _ = process.communicate(timeout=900)
    return process.returncode, output


def _history(run):
    with open(os.path.join(run, "history.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def _wait_for_epoch(state_path, epoch, process, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            with open(state_path) as handle:
                if json.load(handle)["epoch"] >= epoch:
                    return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"epoch {epoch} not reached")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reference") / "run")
    code, output = _fit(*ARGS, "--out", out)
    assert code == 0, output
    return out


def test_second_job_on_the_same_out_fails_at_once_and_touches_nothing(tmp_path):
    out = str(tmp_path / "run")
    long_args = [a if a != "4" else "200" for a in ARGS]  # 200 epochs: still running when job 2 starts
    job = _fit(*long_args, "--out", out, wait=False)
    try:
        _wait_for_epoch(os.path.join(out + ".incomplete", "resume", "state.json"), 1, job)
        before = {name: os.path.getmtime(os.path.join(out + ".incomplete", name))
                  for name in ("config.json", "split.json")}
        code, output = _fit(*ARGS, "--out", out)
        assert job.poll() is None, "the first job ended before the second one started"
        assert code != 0 and "another job is writing this run" in output, output
        assert output.strip().splitlines()[-1].startswith("training.fit: "), output
        assert "Traceback" not in output
        assert not os.path.exists(out)
        assert before == {name: os.path.getmtime(os.path.join(out + ".incomplete", name)) for name in before}
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()


def test_kill_9_then_resume_matches_an_uninterrupted_run(reference, tmp_path):
    out = str(tmp_path / "run")
    job = _fit(*ARGS, "--out", out, wait=False)
    try:
        _wait_for_epoch(os.path.join(out + ".incomplete", "resume", "state.json"), 2, job)
        time.sleep(0.3)  # into epoch 3
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    assert job.returncode == -signal.SIGKILL
    partial = out + ".incomplete"
    with open(os.path.join(partial, "resume", "state.json")) as handle:
        killed_at = json.load(handle)["epoch"]
    assert 2 <= killed_at < 4, killed_at
    assert os.path.isfile(os.path.join(partial, "model.keras"))

    # rerunning without --resume refuses and deletes nothing
    code, output = _fit(*ARGS, "--out", out)
    assert code != 0 and "--resume" in output and "Traceback" not in output, output
    assert os.path.isfile(os.path.join(partial, "resume", "state.json"))

    code, output = _fit("--resume", out)
    assert code == 0, output
    assert f"resuming after epoch {killed_at}/4" in output
    assert not os.path.exists(partial) and os.path.isfile(os.path.join(out, "model.keras"))
    assert not os.path.exists(os.path.join(out, "resume"))  # the checkpoint goes when the run is published
    assert not os.path.exists(out + ".lock")

    resumed, uninterrupted = _history(out), _history(reference)
    assert list(resumed["epoch"]) == [0, 1, 2, 3]
    for key in uninterrupted:
        np.testing.assert_allclose(resumed[key], uninterrupted[key], rtol=1e-4, atol=1e-6, err_msg=key)
    with open(os.path.join(out, "metrics.json")) as a, open(os.path.join(reference, "metrics.json")) as b:
        got, want = json.load(a), json.load(b)
    assert got["epochs"] == want["epochs"] == 4
    for key in ("dice", "aji", "pq", "f1"):
        assert got["mean"][key] == pytest.approx(want["mean"][key], abs=1e-3), key

    # a finished run: nothing to resume, and it is not replaced without --overwrite
    code, output = _fit("--resume", out)
    assert code != 0 and "nothing to resume" in output, output
    code, output = _fit(*ARGS, "--out", out)
    assert code != 0 and "--overwrite" in output and "Traceback" not in output, output
    assert os.path.isfile(os.path.join(out, "model.keras"))


def test_resume_refuses_other_settings_and_missing_runs(tmp_path):
    code, output = _fit("--resume", str(tmp_path / "nothing"))
    assert code != 0 and "no partial run to resume" in output and "Traceback" not in output, output
    code, output = _fit("--resume", str(tmp_path / "nothing"), "--epochs", "9")
    assert code != 0 and "drop --epochs" in output, output


def test_existing_out_fails_before_loading_data(tmp_path):
    """The --out check comes first: a bad --data is never even read."""
    out = tmp_path / "run"
    out.mkdir()
    code, output = _fit("--data", "folder:/does/not/exist", "--out", str(out))
    assert code != 0 and "run directory exists" in output and "Traceback" not in output, output
    assert os.listdir(out) == []


def test_failed_job_before_writing_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    code, output = _fit("--data", "folder:/does/not/exist", "--out", str(out))
    assert code != 0 and "Traceback" not in output, output
    assert not os.path.exists(str(out) + ".incomplete") and not os.path.exists(out)
    assert not os.path.exists(str(out) + ".lock")
