"""The core of keras_snapshot on the JAX backend, in subprocesses.

The Keras backend is fixed when Keras is imported, so each check runs in a
Python process of its own with `KERAS_BACKEND=jax`. Skipped where JAX is
not installed (`pip install -e ".[test]"` installs it).
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_data
from conftest import saved_steps

import keras_snapshot

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CORE_TESTS = [
    "tests/test_schedule.py",
    "tests/test_checkpoint.py",
    "tests/test_ensemble.py",
    "tests/test_batchnorm.py",
]
TIMEOUT_SECONDS = 600

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("jax") is None,
        reason="JAX is not installed: pip install jax (or '.[test]').",
    ),
]


def run_on_jax(args, **env):
    """Runs `python args...` with `KERAS_BACKEND=jax`; returns its output."""
    try:
        result = subprocess.run(
            [sys.executable, *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=TIMEOUT_SECONDS,
            env={**os.environ, "KERAS_BACKEND": "jax", **env},
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"Timed out on JAX: {args}: {str(e.stdout)[-3000:]}")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    return result.stdout


def test_core_tests_pass_on_jax():
    """Schedule, callback, ensemble, BatchNorm; SavedModel export too."""
    output = run_on_jax(
        ["-m", "pytest", "-v", "-x", "-p", "no:cacheprovider", *CORE_TESTS]
    )
    summary = output.strip().splitlines()[-1]
    assert " passed" in summary and " failed" not in summary, summary
    # Keras exports a JAX model through jax2tf; TensorFlow reloads it and
    # reproduces the ensemble's predictions.
    for test in (
        "test_savedmodel_export_reproduces_predictions",
        "test_weighted_ensemble_survives_savedmodel",
    ):
        assert f"tests/test_ensemble.py::{test} PASSED" in output


def test_data_parallel_on_two_jax_cpu_devices(tmp_path):
    run_on_jax(
        [os.path.join(HERE, "distribute_script.py"), "jax_data_parallel"]
        + [str(tmp_path)],
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    with open(tmp_path / "result.json") as f:
        result = json.load(f)
    assert result["backend"] == "jax"
    assert result["jax_devices"] == 2
    # The weights are replicated on both devices: data parallel.
    assert result["kernel_devices"] == 2
    assert result["saved_steps"] == [8, 16, 24]
    assert "KERAS_BACKEND=tensorflow" in result["tf_strategy_error"]
    assert "DataParallel" in result["tf_strategy_error"]
    # Snapshots written on JAX load and ensemble on this process's backend.
    directory = str(tmp_path / "snapshots")
    assert saved_steps(directory) == [8, 16, 24]
    x, _ = make_data(n=32, seed=5)
    members = keras_snapshot.load_snapshots(directory)
    np.testing.assert_allclose(
        keras_snapshot.build_ensemble(directory).predict(x, verbose=0),
        np.mean([m.predict(x, verbose=0) for m in members], axis=0),
        atol=1e-6,
    )
