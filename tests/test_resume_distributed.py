"""--resume of a data-parallel run: a run trained with --distribute data_parallel over two
(virtual) devices, killed with kill -9 after an epoch, resumes to the history of the same
run never killed. Subprocesses: the device count and the backend are fixed before JAX starts."""

import os
import signal

import numpy as np
import pytest

from tests.test_distributed import TWO_CPU_DEVICES_XLA_FLAGS
from tests.test_resume import _fit, _history, _wait_for_epoch

ARGS = ["--data", "sample", "--epochs", "3", "--steps-per-epoch", "8", "--tile", "64", "--batch-size", "4",
        "--model", "unet", "--model-config", '{"filters": 4, "depth": 2, "dropout": 0.2}', "--seed", "4",
        "--distribute", "data_parallel"]
TWO_DEVICES = {"KERAS_BACKEND": "jax", "XLA_FLAGS": TWO_CPU_DEVICES_XLA_FLAGS}


@pytest.fixture(autouse=True)
def two_jax_devices(monkeypatch):
    for name, value in TWO_DEVICES.items():
        monkeypatch.setenv(name, value)


def test_kill_9_then_resume_a_data_parallel_run(tmp_path):
    reference = str(tmp_path / "reference")
    code, output = _fit(*ARGS, "--out", reference)
    assert code == 0, output
    assert "data_parallel" in output and "2 devices" in output, output

    out = str(tmp_path / "run")
    job = _fit(*ARGS, "--out", out, wait=False)
    try:
        _wait_for_epoch(os.path.join(out + ".incomplete", "resume", "state.json"), 1, job)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    code, output = _fit("--resume", out)
    assert code == 0, output
    assert "resuming after epoch" in output and "data_parallel" in output, output
    resumed, uninterrupted = _history(out), _history(reference)
    assert list(resumed["epoch"]) == [0, 1, 2]
    for key in uninterrupted:
        np.testing.assert_allclose(resumed[key], uninterrupted[key], rtol=1e-4, atol=1e-6, err_msg=key)
