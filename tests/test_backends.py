"""keras_snapshot on the JAX backend, in a subprocess.

The Keras backend is fixed when Keras is imported, so the check runs in a
Python process of its own with `KERAS_BACKEND=jax`. Skipped where JAX is
not installed (`pip install -e ".[test]"` installs it). The core test files
themselves run on JAX as a pytest invocation of their own in `.ci/run`
(`KERAS_BACKEND=jax python -m pytest -q tests/test_schedule.py ...`).
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import make_data
from helpers import saved_steps

import keras_snapshot

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
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
