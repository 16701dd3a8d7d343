"""A real training process, killed with SIGKILL and started again.

Every run is `tests/train_script.py` in a subprocess: a tiny model trained
for 30 steps (6 per epoch) with `SnapshotSchedule`, `SnapshotCheckpoint`
and `keras.callbacks.BackupAndRestore`, snapshots at steps 8, 16, 24 and 30.
One run is killed three times in a row, at different kinds of moments, and
each time started again with the same command; after every kill the
snapshot directory must hold only complete, verified snapshots. The run that
finally completes must equal an uninterrupted run of the same command.

Subprocesses are few (each one imports TensorFlow): two uninterrupted runs,
started in the background and shared with the determinism test, and the
four runs of the killed one.
"""

import glob
import os
import signal
import time
import zipfile

import keras
import numpy as np
import pytest
from helpers import finish_script
from helpers import script_output
from helpers import start_script

import keras_snapshot
from keras_snapshot import manifest as manifest_lib

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "train_script.py")
FAULT_VARIABLE = "TRAIN_SCRIPT_FAULT"
CYCLE_END_STEPS = [8, 16, 24, 30]
TIMEOUT = 300


def start(workdir, fault=None):
    """Starts the training script; its output goes to files in `workdir`.

    The same command every time; only the injected fault differs.
    """
    env = {FAULT_VARIABLE: fault or None, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return start_script(SCRIPT, workdir, env, args=("--deterministic",))


output = script_output
finish = finish_script


def run(workdir, fault=None):
    return finish(start(workdir, fault), workdir)


def listed_keras_files(directory):
    """What a user sees with `ls *.keras` (set-aside runs not entered)."""
    return sorted(glob.glob(os.path.join(directory, "*.keras")))


def check_directory(directory, taken):
    """The first `taken` snapshots are there, complete, and nothing else."""
    entries = keras_snapshot.read_manifest(directory)["snapshots"]
    assert [e["index"] for e in entries] == list(range(1, taken + 1))
    assert [e["step"] for e in entries] == CYCLE_END_STEPS[:taken]
    paths = [os.path.join(directory, e["file"]) for e in entries]
    assert listed_keras_files(directory) == paths
    for entry, path in zip(entries, paths):
        manifest_lib.SnapshotDirectory(directory).verified_path(
            manifest_lib.SnapshotEntry(**entry)
        )
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() is None
    if taken:
        assert keras_snapshot.snapshot_paths(directory) == paths
    return entries


def partial_leftovers(directory):
    return [
        name
        for name in os.listdir(directory)
        if name.startswith(manifest_lib.PARTIAL_PREFIX)
    ]


def snapshot_state(path):
    """The optimizer step and every variable saved in a snapshot file."""
    model = keras.saving.load_model(path)
    step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    variables = model.weights + model.optimizer.variables
    return step, [keras.ops.convert_to_numpy(v) for v in variables]


def compare_with(directory, reference, exact):
    """Same snapshots as `reference`: steps, metadata and saved variables."""
    ours = keras_snapshot.read_manifest(directory)["snapshots"]
    theirs = keras_snapshot.read_manifest(reference)["snapshots"]
    keys = ("index", "file", "step", "epoch", "batch")
    assert [[e[k] for k in keys] for e in ours] == [
        [e[k] for k in keys] for e in theirs
    ]
    for a, b in zip(ours, theirs):
        assert a["learning_rate"] == pytest.approx(b["learning_rate"])
        # A snapshot retaken before the first batch of an epoch has no
        # running metrics; the others saw the same batches.
        if a["logs"]:
            assert a["logs"] == pytest.approx(b["logs"], rel=1e-5)
        step, values = snapshot_state(os.path.join(directory, a["file"]))
        step_ref, values_ref = snapshot_state(
            os.path.join(reference, b["file"])
        )
        assert step == step_ref == a["step"]
        assert len(values) == len(values_ref)
        for value, value_ref in zip(values, values_ref):
            if exact:
                np.testing.assert_array_equal(value, value_ref)
            else:
                np.testing.assert_allclose(
                    value, value_ref, rtol=1e-6, atol=1e-7
                )


class UninterruptedRuns:
    """Uninterrupted runs started in the background, awaited on first use."""

    def __init__(self, root, count):
        self.workdirs = [os.path.join(root, f"run-{i}") for i in range(count)]
        self.processes = [start(workdir) for workdir in self.workdirs]
        self.finished = False

    def directories(self):
        if not self.finished:
            for process, workdir in zip(self.processes, self.workdirs):
                returncode, out, err = finish(process, workdir)
                assert returncode == 0, err[-3000:]
                assert "done" in out
            self.finished = True
        return [os.path.join(w, "snapshots") for w in self.workdirs]

    def close(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = UninterruptedRuns(str(tmp_path_factory.mktemp("uninterrupted")), 2)
    yield runs
    runs.close()


def kill_when_paused(process, workdir, step):
    """Sends SIGKILL once the script reports that it waits at `step`."""
    deadline = time.monotonic() + TIMEOUT
    while f"paused at step {step}" not in output(workdir)[0]:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"The script did not pause: {output(workdir)}")
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    return finish(process, workdir)


def test_killed_run_resumes_to_the_uninterrupted_result(
    tmp_path, uninterrupted
):
    workdir = str(tmp_path / "run")
    directory = os.path.join(workdir, "snapshots")
    backup = os.path.join(workdir, "backup")

    # 1. Killed from outside in the middle of cycle 2 (after step 11, in
    #    epoch 2); snapshot 1 (step 8) was taken in this epoch, after the
    #    last backup (end of epoch 1, step 6).
    process = start(workdir, fault="pause_at_step:11")
    returncode, out, err = kill_when_paused(process, workdir, 11)
    assert returncode == -signal.SIGKILL, err[-3000:]
    check_directory(directory, taken=1)
    assert os.path.isdir(backup)

    # 2. The same command restores step 6, drops snapshot 1 (taken after
    #    that step) and retakes it, then dies right after writing snapshot
    #    2 in the middle of epoch 3 (step 16; last backup at step 12).
    returncode, out, err = run(workdir, fault="kill_after_snapshot:2")
    assert returncode == -signal.SIGKILL, err[-3000:]
    assert "training is at step 6; snapshot(s) [1] from later" in err
    check_directory(directory, taken=2)

    # 3. Restores step 12, drops and retakes snapshot 2, then dies in the
    #    middle of writing snapshot 3 (end of epoch 4, step 24, just after
    #    that epoch's backup): half a file under a hidden temporary name.
    returncode, out, err = run(workdir, fault="kill_during_write:3")
    assert returncode == -signal.SIGKILL, err[-3000:]
    assert "training is at step 12; snapshot(s) [2] from later" in err
    check_directory(directory, taken=2)
    (leftover,) = partial_leftovers(directory)
    half_written = os.path.join(directory, leftover, "snapshot-03.keras")
    assert os.listdir(os.path.join(directory, leftover)) == [
        "snapshot-03.keras"
    ]
    assert not zipfile.is_zipfile(half_written)
    assert not os.path.exists(os.path.join(directory, "snapshot-03.keras"))

    # 4. Restores step 24, removes the half-written file, retakes snapshot 3
    #    at once (before the first batch of epoch 5) and completes. The
    #    schedule goes on from step 24: snapshots 1 and 2 are not retaken.
    returncode, out, err = run(workdir)
    assert returncode == 0, err[-3000:]
    assert "removed 1 incomplete write(s)" in out
    assert "Snapshot 1/4" not in out and "Snapshot 2/4" not in out
    assert "from later steps" not in err
    check_directory(directory, taken=4)
    assert partial_leftovers(directory) == []
    assert not os.path.exists(backup)  # BackupAndRestore's end of training.
    for path in listed_keras_files(directory):
        assert snapshot_state(path)[0] in CYCLE_END_STEPS

    # BackupAndRestore restores weights, optimizer state and step exactly,
    # the data is not shuffled and ops are deterministic, so the resumed
    # run recomputes the very same steps as an uninterrupted one.
    reference = uninterrupted.directories()[0]
    compare_with(directory, reference, exact=False)
    ensemble = keras_snapshot.build_ensemble(directory)
    names = {layer.name for layer in ensemble.layers}
    assert {f"snapshot_{i}" for i in range(1, 5)} <= names


def test_seeded_deterministic_runs_give_identical_snapshots(uninterrupted):
    """`set_random_seed` + `enable_op_determinism`: bit-identical weights.

    The files themselves differ (zip entries carry timestamps), so the
    saved variables are compared, and the manifests apart from hashes and
    times.
    """
    first, second = uninterrupted.directories()
    compare_with(first, second, exact=True)
    volatile = ("sha256", "saved_at")
    manifests = [keras_snapshot.read_manifest(d) for d in (first, second)]
    for manifest in manifests:
        manifest.pop("updated")
        for entry in manifest["snapshots"]:
            for key in volatile:
                entry.pop(key)
    assert manifests[0] == manifests[1]
