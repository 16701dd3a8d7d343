"""Shared fixtures; the helpers they use live in tests/helpers.py."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402
from helpers import train_snapshots  # noqa: E402


@pytest.fixture(scope="session")
def snapshot_run(tmp_path_factory):
    """One trained run with 3 snapshots, shared by read-only tests."""
    directory = str(tmp_path_factory.mktemp("run") / "snapshots")
    model, schedule, _ = train_snapshots(directory)
    return directory, schedule
