"""Shared fixtures: where the real datasets are, and quiet TensorFlow logs."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture(scope="session")
def shared_data():
    """Path of ../shared/data beside the repository; skips the test if it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA


def pytest_runtest_logreport(report):
    """With KERASNUC_TEST_TIMES=FILE, append each test phase's seconds to FILE as it ends (the
    suite's duration budget is found while it runs, not only at the end as --durations does)."""
    path = os.environ.get("KERASNUC_TEST_TIMES")
    if path and report.duration >= 0.5:
        with open(path, "a") as handle:
            handle.write(f"{report.duration:.1f}\t{report.when}\t{report.nodeid}\n")
