"""A real training process, killed with SIGKILL and started again.

One harness for every callback that must survive a kill: every run is
`tests/train_script.py` in a subprocess, a tiny model trained with
`keras.callbacks.BackupAndRestore` and the callbacks under test
(`--callbacks`), 6 steps per epoch. A run is killed at given moments (from
outside at a step, or by a fault the script injects), each time started
again with the same command, and checked after every kill; the run that
finally completes must equal an uninterrupted run of the same command.
`test_killed_run_resumes_to_the_uninterrupted_result` is parametrised over
the callbacks (`SCENARIOS`):

- `snapshot`: `SnapshotSchedule` and `SnapshotCheckpoint`, snapshots at
  steps 8, 16, 24 and 30; killed three times at different kinds of
  moments; after every kill the snapshot directory holds only complete,
  verified snapshots. `snapshot-after-last-backup`: killed once, after the
  last epoch's backup and before the last snapshot.
- `averaging`: `WeightAveraging` (EMA, with BatchNorm recalibration), its
  `AveragedModelCheckpoint`s (every epoch and the best) and
  `WeightAveraging` (SWA, every 4 steps), in one `fit`; killed twice.
  `averaging-remote`: the same, its averages written to `file://` paths
  (the `tf.io.gfile` code path of remote storage); killed once.
- `freezeout`: `FreezeOut`, killed once between its two freezes.

Subprocesses are few (each one imports TensorFlow): the uninterrupted runs
start in the background (two of `snapshot`, shared with the determinism
test), then the killed runs.
"""

import glob
import json
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


ARGS = {
    "snapshot": ("--callbacks", "snapshot"),
    "averaging": ("--callbacks", "averaging"),
    "averaging-remote": ("--callbacks", "averaging", "--url-prefix", "file://"),
    "freezeout": ("--callbacks", "freezeout", "--epochs", "4"),
}


def start(workdir, callbacks, fault=None):
    """Starts the training script; its output goes to files in `workdir`.

    The same command every time; only the injected fault differs.
    """
    env = {FAULT_VARIABLE: fault or None, "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = (*ARGS[callbacks], "--deterministic")
    return start_script(SCRIPT, workdir, env, args=args)


output = script_output
finish = finish_script


def run(workdir, callbacks, fault=None):
    """Runs the script to its end, or until the fault kills it.

    `pause_at_step:N` makes the script wait at step N, where this process
    sends the SIGKILL itself (a kill from outside, at no callback).
    """
    process = start(workdir, callbacks, fault)
    if fault and fault.startswith("pause_at_step:"):
        return kill_when_paused(process, workdir, int(fault.split(":")[1]))
    return finish(process, workdir)


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
    """Uninterrupted runs started in the background, awaited on first use:
    `counts[callbacks]` runs of each command."""

    def __init__(self, root, counts):
        self.runs = {}  # callbacks -> [[process, workdir, out]]
        for callbacks, count in counts.items():
            for i in range(count):
                workdir = os.path.join(root, f"{callbacks}-{i}")
                process = start(workdir, callbacks)
                self.runs.setdefault(callbacks, []).append(
                    [process, workdir, None]
                )

    def workdirs(self, callbacks):
        """The finished runs' folders; their stdout in `self.out`."""
        for entry in self.runs[callbacks]:
            process, workdir, out = entry
            if out is None:
                returncode, out, err = finish(process, workdir)
                assert returncode == 0, err[-3000:]
                assert "done" in out
                entry[2] = out
        return [workdir for _, workdir, _ in self.runs[callbacks]]

    def out(self, callbacks):
        self.workdirs(callbacks)
        return self.runs[callbacks][0][2]

    def directories(self):
        """The snapshot folders of the `snapshot` runs."""
        return [
            os.path.join(workdir, "snapshots")
            for workdir in self.workdirs("snapshot")
        ]

    def close(self):
        for runs in self.runs.values():
            for process, _, _ in runs:
                if process.poll() is None:
                    process.kill()
                    process.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = UninterruptedRuns(
        str(tmp_path_factory.mktemp("uninterrupted")),
        {"snapshot": 2, "averaging": 1, "freezeout": 1},
    )
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


def load_weights(path):
    model = keras.saving.load_model(path)
    return [keras.ops.convert_to_numpy(w) for w in model.weights]


def assert_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def result_of(workdir):
    with open(os.path.join(workdir, "result.json")) as f:
        return json.load(f)


# SnapshotCheckpoint: killed four times, each time at another kind of moment.


def snapshot_killed_at_step_11(workdir, out, err):
    # Killed from outside in the middle of cycle 2 (after step 11, in epoch
    # 2); snapshot 1 (step 8) was taken in this epoch, after the last
    # backup (end of epoch 1, step 6).
    check_directory(os.path.join(workdir, "snapshots"), taken=1)
    assert os.path.isdir(os.path.join(workdir, "backup"))


def snapshot_killed_after_snapshot_2(workdir, out, err):
    # The same command restores step 6, drops snapshot 1 (taken after that
    # step) and retakes it, then dies right after writing snapshot 2 in the
    # middle of epoch 3 (step 16; last backup at step 12).
    assert "training is at step 6; snapshot(s) [1] from later" in err
    check_directory(os.path.join(workdir, "snapshots"), taken=2)


def snapshot_killed_during_write_3(workdir, out, err):
    # Restores step 12, drops and retakes snapshot 2, then dies in the
    # middle of writing snapshot 3 (end of epoch 4, step 24, just after
    # that epoch's backup): half a file under a hidden temporary name.
    directory = os.path.join(workdir, "snapshots")
    assert "training is at step 12; snapshot(s) [2] from later" in err
    check_directory(directory, taken=2)
    (leftover,) = partial_leftovers(directory)
    half_written = os.path.join(directory, leftover, "snapshot-03.keras")
    assert os.listdir(os.path.join(directory, leftover)) == [
        "snapshot-03.keras"
    ]
    assert not zipfile.is_zipfile(half_written)
    assert not os.path.exists(os.path.join(directory, "snapshot-03.keras"))


def snapshot_completed(workdir, out, err, uninterrupted):
    # Restores step 24, removes the half-written file, retakes snapshot 3
    # at once (before the first batch of epoch 5) and completes. The
    # schedule goes on from step 24: snapshots 1 and 2 are not retaken.
    directory = os.path.join(workdir, "snapshots")
    assert "removed 1 incomplete write(s)" in out
    assert "Snapshot 1/4" not in out and "Snapshot 2/4" not in out
    assert "from later steps" not in err
    check_directory(directory, taken=4)
    assert partial_leftovers(directory) == []
    assert not os.path.exists(os.path.join(workdir, "backup"))
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


def steps_in(directory):
    entries = keras_snapshot.read_manifest(directory)["snapshots"]
    return [e["step"] for e in entries]


def killed_before_the_last_snapshot(workdir, out, err):
    # A kill after epoch 5's backup, before snapshot 4 (step 30).
    assert steps_in(os.path.join(workdir, "snapshots")) == [8, 16, 24]


def last_snapshot_taken(workdir, out, err, uninterrupted):
    # The backup says all 5 epochs ran: Keras runs no epoch on resume, and
    # the last snapshot is still taken.
    directory = os.path.join(workdir, "snapshots")
    assert steps_in(directory) == [8, 16, 24, 30]
    assert len(keras_snapshot.snapshot_paths(directory)) == 4
    entries = keras_snapshot.read_manifest(directory)["snapshots"]
    # Taken at the end of the last epoch (epoch 5), not "epoch 1".
    assert [(e["epoch"], e["batch"]) for e in entries][-1] == (5, None)
    want = keras_snapshot.read_manifest(uninterrupted.directories()[0])
    assert [e["epoch"] for e in entries] == [
        e["epoch"] for e in want["snapshots"]
    ]


# WeightAveraging (EMA of every step), its AveragedModelCheckpoints, and
# an SWA (every 4 steps from step 8: 8, 12, ..., 28).


def averages_killed_at_step_22(workdir, out, err):
    # From outside at step 22 (epoch 4; last backup at step 18). SWA
    # averages at steps 8, 12, 16 and 20 were saved; 20 is stale then.
    assert sorted(glob.glob(os.path.join(workdir, "ema-*.keras"))) == [
        os.path.join(workdir, f"ema-0{epoch}.keras") for epoch in (1, 2, 3)
    ]


def averages_killed_at_end_of_epoch_4(workdir, out, err):
    # Resumes at step 18 from the averages BackupAndRestore saved with the
    # weights (the SWA of steps 8, 12, 16: the one of step 20 is redone),
    # then dies at the end of epoch 4 after BackupAndRestore saved step 24
    # but before the SWA of step 24 was taken.
    assert "resumed at step 18 with the average of 3 models" in out
    assert "resumed at step 18 with the average of 18 models" in out


def averages_completed(workdir, out, err, uninterrupted):
    # Resumes at step 24 from the SWA of step 20 and redoes the one of step
    # 24 from the restored weights, then completes (step 30).
    reference = uninterrupted.workdirs("averaging")[0]
    reference_out = uninterrupted.out("averaging")
    assert "resumed at step 24 with the average of 5 models" in out
    assert "resumed at step 24 with the average of 24 models" in out
    for done in (
        "average of 6 models (last at step 28)",
        "average of 30 models (last at step 30)",
    ):
        assert done in out
        assert done in reference_out
    names = ["swa.keras", "ema.keras", "best_ema.keras"]
    names += [f"ema-0{epoch}.keras" for epoch in range(1, 6)]
    for name in names:
        assert_close(
            load_weights(os.path.join(workdir, name)),
            load_weights(os.path.join(reference, name)),
        )
    records = []
    for folder in (workdir, reference):
        with open(os.path.join(folder, "best_ema.keras.best.json")) as f:
            record = json.load(f)
        record.pop("run")
        records.append(record)
    best = [record.pop("best") for record in records]
    assert best[0] == pytest.approx(best[1], rel=1e-5)
    assert records[0] == records[1]  # The same monitor, epoch and step.


def remote_averages_completed(workdir, out, err, uninterrupted):
    # Killed at the end of epoch 4 (after BackupAndRestore saved step 24,
    # before the SWA of step 24); the new process resumes and writes the
    # averages to a `file://` path: the same averages as a run never killed.
    reference = uninterrupted.workdirs("averaging")[0]
    assert "resumed at step 24 with the average of 5 models" in out
    for name in ("swa.keras", "ema.keras"):
        assert_close(
            load_weights(os.path.join(workdir, name)),
            load_weights(os.path.join(reference, name)),
        )


# FreezeOut: t0=0.5 over 24 steps, groups 0 and 1 freeze at steps 12 and 18.


def freezeout_completed(workdir, out, err, uninterrupted):
    # Killed after epoch 3 (step 18): the new process starts at step 18
    # and freezes groups 0 and 1 there, in one go.
    reference = uninterrupted.workdirs("freezeout")[0]
    resumed, straight = result_of(workdir), result_of(reference)
    assert resumed["first_step"] == 18
    assert resumed["freeze_events"] == [[18, [0, 1]]]
    assert straight["freeze_events"] == [[12, [0]], [18, [1]]]
    a = np.load(os.path.join(workdir, "weights.npz"))
    b = np.load(os.path.join(reference, "weights.npz"))
    assert_close([a[k] for k in a], [b[k] for k in a])


# name -> (callbacks, [(fault, check after the kill)], check of the end)
SCENARIOS = {
    "snapshot": (
        "snapshot",
        [
            ("pause_at_step:11", snapshot_killed_at_step_11),
            ("kill_after_snapshot:2", snapshot_killed_after_snapshot_2),
            ("kill_during_write:3", snapshot_killed_during_write_3),
        ],
        snapshot_completed,
    ),
    "snapshot-after-last-backup": (
        "snapshot",
        [("kill_before_snapshot:4", killed_before_the_last_snapshot)],
        last_snapshot_taken,
    ),
    "averaging": (
        "averaging",
        [
            ("pause_at_step:22", averages_killed_at_step_22),
            ("kill_at_epoch_end:4", averages_killed_at_end_of_epoch_4),
        ],
        averages_completed,
    ),
    "averaging-remote": (
        "averaging-remote",
        [("kill_at_epoch_end:4", lambda workdir, out, err: None)],
        remote_averages_completed,
    ),
    "freezeout": (
        "freezeout",
        [("kill_at_epoch_end:3", lambda workdir, out, err: None)],
        freezeout_completed,
    ),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_killed_run_resumes_to_the_uninterrupted_result(
    tmp_path, uninterrupted, scenario
):
    """Each kill, then the same command again; the end as if never killed."""
    callbacks, kills, check_completed = SCENARIOS[scenario]
    workdir = str(tmp_path / "run")
    for fault, check in kills:
        returncode, out, err = run(workdir, callbacks, fault)
        assert returncode == -signal.SIGKILL, (fault, err[-3000:])
        check(workdir, out, err)
    returncode, out, err = run(workdir, callbacks)
    assert returncode == 0, err[-3000:]
    assert "done" in out
    check_completed(workdir, out, err, uninterrupted)


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
