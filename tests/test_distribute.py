"""`get_strategy`, and snapshots under `tf.distribute` strategies.

The distributed runs happen in subprocesses (`tests/distribute_script.py`):
logical CPU devices must be configured before TensorFlow starts, and each
worker of a `MultiWorkerMirroredStrategy` cluster is its own process. Each
subprocess has a timeout, so that a hang (a collective op waiting for a
worker that never comes) fails the test instead of blocking CI.
"""

import json
import os
import re
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import make_data
from helpers import saved_steps

import keras_snapshot
from keras_snapshot import manifest as manifest_lib
from keras_snapshot.app.distribute import STRATEGY_NAMES
from keras_snapshot.app.distribute import get_strategy

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute strategies need the TensorFlow backend.",
)

SCRIPT = os.path.join(os.path.dirname(__file__), "distribute_script.py")
TIMEOUT_SECONDS = 300
# The script's schedule: 24 steps, 3 snapshots.
CYCLE_ENDS = [8, 16, 24]
SNAPSHOT_FILES = [
    manifest_lib.MANIFEST_NAME,
    "snapshot-01.keras",
    "snapshot-02.keras",
    "snapshot-03.keras",
]
SAVED_LINE = re.compile(r"Snapshot (\d)/3 saved at step (\d+) .*: (\S+)")


def run_script(*args, env=None):
    """Runs the script to the end; fails the test on error or timeout."""
    try:
        result = subprocess.run(
            [sys.executable, SCRIPT, *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_SECONDS,
            env=env,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{args[0]} run timed out: {str(e.stdout)[-3000:]}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def saved_lines(stdout):
    """`(index, step, path)` of every "Snapshot K/M saved" line printed."""
    return [
        (int(k), int(step), path)
        for k, step, path in SAVED_LINE.findall(stdout)
    ]


def check_snapshot_directory(directory):
    """Exactly 3 snapshots at the cycle ends, matching their sha256.

    (Runs a later run superseded are kept aside in `superseded-*/`.)
    """
    names = os.listdir(directory)
    kept = [
        n for n in names if not n.startswith(manifest_lib.SUPERSEDED_PREFIX)
    ]
    assert sorted(kept) == SNAPSHOT_FILES
    entries = keras_snapshot.read_manifest(directory)["snapshots"]
    assert [e["step"] for e in entries] == CYCLE_ENDS
    for entry in entries:
        manifest_lib.SnapshotDirectory(directory).verified_path(
            manifest_lib.SnapshotEntry(**entry)
        )
    assert saved_steps(directory) == CYCLE_ENDS


def test_unknown_strategy_lists_the_valid_names():
    with pytest.raises(ValueError, match="Received: name='gpu'") as info:
        get_strategy("gpu")
    for name in STRATEGY_NAMES:
        assert repr(name) in str(info.value)


def test_default_and_one_device_mirrored():
    import tensorflow as tf

    assert get_strategy() is tf.distribute.get_strategy()
    strategy = get_strategy("mirrored", devices=["/cpu:0"])
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == 1
    with pytest.raises(ValueError, match="only used with the 'mirrored'"):
        get_strategy("default", devices=["/cpu:0"])
    with pytest.raises(ValueError, match="only used with the 'tpu'"):
        get_strategy("mirrored", tpu="local")


def test_tpu_without_a_tpu_gives_a_clear_error():
    with pytest.raises(ValueError, match="No TPU found") as info:
        get_strategy("tpu")
    assert "Change runtime type > TPU" in str(info.value)


def test_only_working_strategies_are_offered():
    assert "multiworker" not in STRATEGY_NAMES
    with pytest.raises(ValueError, match="keras-team/keras#20585") as info:
        get_strategy("multiworker")
    assert "keras.distribution.initialize" in str(info.value)
    assert "Received: name='multiworker'" in str(info.value)
    # DataParallel belongs to the JAX backend (tested in test_backends.py).
    with pytest.raises(ValueError, match="needs KERAS_BACKEND=jax"):
        get_strategy("data_parallel")


@pytest.mark.slow
def test_mirrored_strategy_on_two_cpus_matches_one_device(tmp_path):
    stdout = run_script("mirrored", str(tmp_path))
    with open(tmp_path / "result.json") as f:
        result = json.load(f)
    assert result["replicas"] == 2
    assert result["variable"] == "MirroredVariable"
    assert result["saved_steps"] == CYCLE_ENDS
    assert result["single_saved_steps"] == CYCLE_ENDS
    mirrored = str(tmp_path / "mirrored")
    single = str(tmp_path / "single")
    # One file per snapshot, each written once.
    lines = [line for line in saved_lines(stdout) if mirrored in line[2]]
    assert [(k, step) for k, step, _ in lines] == [(1, 8), (2, 16), (3, 24)]
    check_snapshot_directory(mirrored)
    check_snapshot_directory(single)
    # Same global batch, same initial weights: the same snapshots.
    x, _ = make_data(n=32, seed=5)
    for a, b in zip(
        keras_snapshot.load_snapshots(mirrored),
        keras_snapshot.load_snapshots(single),
    ):
        np.testing.assert_allclose(
            a.predict(x, verbose=0), b.predict(x, verbose=0), atol=1e-5
        )
    np.testing.assert_allclose(
        keras_snapshot.build_ensemble(mirrored).predict(x, verbose=0),
        keras_snapshot.build_ensemble(single).predict(x, verbose=0),
        atol=1e-5,
    )
    # The EMA kept on the mirrored variables is the single device's, in the
    # validation logs and in the files saved during and after fit.
    np.testing.assert_allclose(
        result["val_loss"], result["single_val_loss"], rtol=1e-5
    )
    for name in ("-ema-1.keras", "-ema-2.keras", "-ema.keras"):
        a = keras.saving.load_model(mirrored + name)
        b = keras.saving.load_model(single + name)
        np.testing.assert_allclose(
            a.predict(x, verbose=0), b.predict(x, verbose=0), atol=1e-5
        )


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_workers(tmp_path, *args, mode="multiworker", count=2):
    """Runs `count` workers of `mode` on 127.0.0.1; returns their outputs."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(count)]}
    workers = []
    for index in range(count):
        scratch = tmp_path / f"tmp-{index}"
        scratch.mkdir()
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
            # Where tempfile puts each worker's scratch folders.
            "TMPDIR": str(scratch),
        }
        workers.append(
            subprocess.Popen(
                [sys.executable, SCRIPT, mode, str(tmp_path), *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
        )
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=TIMEOUT_SECONDS)[0])
    except subprocess.TimeoutExpired:
        for worker in workers:
            worker.kill()
        tails = [w.communicate()[0][-2000:] for w in workers]
        pytest.fail(f"The workers timed out (a hang?): {tails}")
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-5000:]
    return outputs


@pytest.mark.slow
def test_multi_worker_only_the_chief_writes(tmp_path):
    # Every worker is given the same path, as on a shared file system.
    snapshot_dir = str(tmp_path / "snapshots")
    outputs = run_workers(tmp_path, snapshot_dir)
    results = []
    for index in range(2):
        with open(tmp_path / f"worker-{index}.json") as f:
            results.append(json.load(f))
    chief, other = results
    assert chief["replicas"] == other["replicas"] == 2
    assert chief["should_checkpoint"] and not other["should_checkpoint"]
    assert {r["variable"] for r in chief["runs"]} == {"MirroredVariable"}
    assert [r["chief"] for r in chief["runs"]] == [True, True]
    assert [r["chief"] for r in other["runs"]] == [False, False]
    # Both runs: all workers saved at the same steps (saving runs
    # collective ops), the second run also one epoch past the budget.
    for result in results:
        assert [r["saved_steps"] for r in result["runs"]] == [CYCLE_ENDS] * 2
        assert [r["steps"] for r in result["runs"]] == [24, 36]
    # Only the chief wrote, each snapshot once per run; the second run
    # retook the first run's snapshots, which were stale.
    lines = saved_lines(outputs[0])
    assert [(k, step) for k, step, _ in lines] == [(1, 8), (2, 16), (3, 24)] * 2
    assert {path for _, _, path in lines} == {
        os.path.join(snapshot_dir, name) for name in SNAPSHOT_FILES[1:]
    }
    assert "snapshot(s) [1, 2, 3] from later steps" in outputs[0]
    assert saved_lines(outputs[1]) == []
    check_snapshot_directory(snapshot_dir)
    aside = [
        n
        for n in os.listdir(snapshot_dir)
        if n.startswith(manifest_lib.SUPERSEDED_PREFIX)
    ]
    assert len(aside) == 1  # The first run's snapshots, kept.
    check_snapshot_directory(os.path.join(snapshot_dir, aside[0]))
    # The other worker's scratch folders are gone (and the chief had none).
    for index in range(2):
        left = os.listdir(tmp_path / f"tmp-{index}")
        assert not [n for n in left if n.startswith("keras_snapshot_worker_")]
    x, _ = make_data(n=32, seed=5)
    members = keras_snapshot.load_snapshots(snapshot_dir)
    ensemble = keras_snapshot.build_ensemble(snapshot_dir)
    np.testing.assert_allclose(
        ensemble.predict(x, verbose=0),
        np.mean([m.predict(x, verbose=0) for m in members], axis=0),
        atol=1e-6,
    )


@pytest.mark.slow
def test_multi_worker_fit_still_fails_upstream(tmp_path):
    """Keras 3's plain `fit` on 2 workers fails (keras-team/keras#20585).

    This is why `get_strategy` offers no 'multiworker'. If this test fails
    because `fit` worked, Keras has fixed the bug: offer 'multiworker'
    again, and say from which Keras version in docs/distributed.md.
    """
    run_workers(tmp_path, mode="multiworker_upstream")
    for index in range(2):
        with open(tmp_path / f"worker-{index}.json") as f:
            result = json.load(f)
        assert result["error"] is not None, (
            f"Keras {result['keras']} ran fit on 2 workers: "
            "keras-team/keras#20585 looks fixed."
        )
        assert "PerReplica" in result["error"]
        # Nothing was written: the failure comes before the first step.
        assert not os.path.exists(tmp_path / f"snapshots-{index}")
