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
