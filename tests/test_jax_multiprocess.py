"""Snapshots from 2 JAX processes training one model with `DataParallel`.

Two real processes on this machine (`tests/distribute_script.py
jax_multiprocess`) call `keras.distribution.initialize` with a coordinator
on 127.0.0.1, as two hosts would, and train one model with
`keras.distribution.DataParallel` over their CPU devices (one each). A third
process trains the same model alone, for reference. Each subprocess has a
timeout, so a hang at a collective operation fails the test.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import make_data
from helpers import saved_steps

import keras_snapshot
from keras_snapshot import manifest as manifest_lib

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "distribute_script.py")
TIMEOUT_SECONDS = 300
# The script's schedule: 24 steps, 3 snapshots.
CYCLE_ENDS = [8, 16, 24]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("jax") is None,
        reason="JAX is not installed: pip install jax (or '.[test]').",
    ),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, tmpdir):
    """Starts the script on the JAX backend with its own `TMPDIR`."""
    os.makedirs(tmpdir)
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        # Each process sees only its own CPU device.
        "XLA_FLAGS": "",
        "TMPDIR": str(tmpdir),
    }
    return subprocess.Popen(
        [sys.executable, SCRIPT, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def wait_for(processes):
    """Outputs of `processes`; fails the test on error or timeout."""
    try:
        outputs = [p.communicate(timeout=TIMEOUT_SECONDS)[0] for p in processes]
    except subprocess.TimeoutExpired:
        for p in processes:
            p.kill()
        tails = [p.communicate()[0][-2000:] for p in processes]
        pytest.fail(f"The JAX processes timed out (a hang?): {tails}")
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output[-5000:]
    return outputs


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Runs 2 JAX processes (and a 1-process reference) once."""
    out = tmp_path_factory.mktemp("jax_multiprocess")
    coordinator = f"127.0.0.1:{free_port()}"
    processes = [
        start(
            [
                "jax_multiprocess",
                str(out),
                # Different paths, as on two hosts' local disks: the
                # non-writer's must stay empty.
                str(out / f"snapshots-{index}"),
                coordinator,
                "2",
                str(index),
            ],
            out / f"tmp-{index}",
        )
        for index in range(2)
    ]
    outputs = wait_for(processes)
    wait_for([start(["jax_single", str(out)], out / "tmp-single")])
    results = []
    for index in range(2):
        with open(out / f"process-{index}.json") as f:
            results.append(json.load(f))
    return out, outputs, results


def test_both_processes_train_one_replicated_model(two_process_run):
    _, _, results = two_process_run
    for index, result in enumerate(results):
        assert result["process_index"] == index
        assert result["process_count"] == 2
        assert result["local_devices"] == 1
        assert result["global_devices"] == 2
        # DataParallel: every weight lives on both processes' devices.
        assert result["kernel_devices"] == 2
        assert result["steps"] == 24


def test_only_process_0_writes(two_process_run):
    out, outputs, results = two_process_run
    writer, other = results
    assert writer["writer"] and not other["writer"]
    # Both saved at the same steps (the non-writer into a scratch folder).
    assert writer["saved_steps"] == other["saved_steps"] == CYCLE_ENDS
    assert outputs[0].count("Snapshot ") == 3
    assert "Snapshot " not in outputs[1]
    directory = out / "snapshots-0"
    assert sorted(os.listdir(directory)) == [
        manifest_lib.MANIFEST_NAME,
        "snapshot-01.keras",
        "snapshot-02.keras",
        "snapshot-03.keras",
    ]
    entries = keras_snapshot.read_manifest(str(directory))["snapshots"]
    assert [e["step"] for e in entries] == CYCLE_ENDS
    for entry in entries:
        manifest_lib.SnapshotDirectory(str(directory)).verified_path(
            manifest_lib.SnapshotEntry(**entry)
        )
    assert saved_steps(str(directory)) == CYCLE_ENDS
    assert not os.path.exists(out / "snapshots-1")
    # No scratch folder left behind by either process.
    assert os.listdir(out / "tmp-0") == []
    assert os.listdir(out / "tmp-1") == []


def test_ensemble_from_process_0_matches_one_process(two_process_run):
    out, _, _ = two_process_run
    distributed = str(out / "snapshots-0")
    single = str(out / "single")
    assert saved_steps(single) == CYCLE_ENDS
    # Same initial weights, same global batches: the same snapshots.
    x, _ = make_data(n=32, seed=5)
    for a, b in zip(
        keras_snapshot.load_snapshots(distributed),
        keras_snapshot.load_snapshots(single),
    ):
        np.testing.assert_allclose(
            a.predict(x, verbose=0), b.predict(x, verbose=0), atol=1e-5
        )
    np.testing.assert_allclose(
        keras_snapshot.build_ensemble(distributed).predict(x, verbose=0),
        keras_snapshot.build_ensemble(single).predict(x, verbose=0),
        atol=1e-5,
    )
