"""Snapshots on a remote file system: TensorFlow's in-memory `ram://`.

`ram://` goes through `tf.io.gfile` like `gs://` or `s3://`, with no
network: the remote code path (upload of a complete file, read-back check,
manifest last, no `flock`) runs for real. A `ram://` file system lives in
one process only, so resuming on it is tested in-process (a `fit` stopped
by an exception, then a second `fit`). Killed processes are tested on a
`file://` URL: the same gfile code path on local disk, which subprocesses
share.
"""

import os
import signal
import subprocess
import sys
import uuid

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import CrashAtEpochEnd
from helpers import compile_with_schedule
from helpers import make_data
from helpers import make_model
from helpers import train_snapshots

import keras_snapshot
from keras_snapshot import _fs
from keras_snapshot import manifest as manifest_lib

gfile = tf.io.gfile


def ram_folder(name="snapshots"):
    """A fresh folder on the in-memory file system (shared per process)."""
    return f"ram://keras_snapshot_{uuid.uuid4().hex[:12]}/{name}"


def manifest_values(directory, key):
    entries = keras_snapshot.read_manifest(directory)["snapshots"]
    return [e[key] for e in entries]


def listed(directory):
    return manifest_values(directory, "file")


def check_verified(directory):
    """Every listed file is there, with the manifest's size and sha256."""
    folder = manifest_lib.SnapshotDirectory(directory)
    for entry in folder.read().entries:
        path = folder.verified_path(entry)
        assert gfile.stat(path).length == entry.size


@pytest.mark.parametrize(
    "path, remote",
    [
        ("gs://bucket/run/snapshots", True),
        ("s3://bucket/snapshots", True),
        ("ram://x", True),
        ("/gcs/bucket/snapshots", True),
        ("snapshots", False),
        ("/tmp/run/snapshots", False),
        ("./gs:/x", False),
    ],
)
def test_remote_paths_are_those_keras_sends_to_gfile(path, remote):
    from keras.src.utils import file_utils

    assert _fs.is_remote(path) == remote == file_utils.is_remote_path(path)


def test_parent_stops_at_the_bucket():
    assert _fs.parent("gs://bucket/a/b/") == "gs://bucket/a"
    assert _fs.parent("gs://bucket/a") == "gs://bucket"
    assert _fs.parent("gs://bucket") is None
    assert _fs.parent("/") is None


def test_fit_writes_verified_snapshots_to_ram(snapshot_run):
    """A real fit into ram:// gives the same ensemble as the local run."""
    local, _ = snapshot_run
    remote = ram_folder()
    train_snapshots(remote)  # The snapshot_run settings, seed and data.

    ours = keras_snapshot.read_manifest(remote)["snapshots"]
    theirs = keras_snapshot.read_manifest(local)["snapshots"]
    keys = ("index", "file", "step", "epoch", "batch")
    assert [[e[k] for k in keys] for e in ours] == [
        [e[k] for k in keys] for e in theirs
    ]
    check_verified(remote)
    # Only the manifest and complete snapshots: no scratch object, no lock.
    assert sorted(gfile.listdir(remote)) == sorted(
        [manifest_lib.MANIFEST_NAME] + listed(remote)
    )
    assert keras_snapshot.snapshot_paths(remote) == [
        f"{remote}/{name}" for name in listed(remote)
    ]

    x, _ = make_data()
    expected = keras_snapshot.build_ensemble(local).predict(x, verbose=0)
    ensemble = keras_snapshot.build_ensemble(remote)
    np.testing.assert_allclose(ensemble.predict(x, verbose=0), expected, 1e-5)
    for a, b in zip(
        keras_snapshot.load_snapshots(remote),
        keras_snapshot.load_snapshots(local),
    ):
        for u, v in zip(a.weights, b.weights):
            np.testing.assert_allclose(u.numpy(), v.numpy(), atol=1e-6)
    # A single remote `.keras` path loads too.
    (model,) = keras_snapshot.load_snapshots(f"{remote}/snapshot-01.keras")
    assert model.count_params() == ensemble.layers[1].count_params()


def fit_tiny(directory, backup, extra=(), epochs=5):
    """30 steps (6 per epoch, not shuffled), cycle ends at 10, 20 and 30."""
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = make_model()
    compile_with_schedule(model, total_steps=30, num_snapshots=3)
    callbacks = [
        keras.callbacks.BackupAndRestore(backup),
        keras_snapshot.SnapshotCheckpoint(directory, verbose=0),
        *extra,
    ]
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )


def test_interrupted_write_is_never_listed_and_fit_resumes(
    tmp_path, monkeypatch
):
    """A stop between snapshot 2's file and its manifest, then a resume.

    The backup (BackupAndRestore) stays on local disk; the snapshots are
    remote. The stop leaves snapshot 2's complete file unlisted; the
    resumed fit takes it again and ends with the snapshots of a fit that
    was never stopped.
    """
    remote = ram_folder()
    original = _fs.commit
    manifests = []

    def stop_before_manifest(temporary, final):
        if final.endswith(manifest_lib.MANIFEST_NAME):
            manifests.append(final)
            # At train begin, after snapshot 1, then snapshot 2's update.
            if len(manifests) == 3:
                raise RuntimeError("stopped between file and manifest")
        return original(temporary, final)

    monkeypatch.setattr(_fs, "commit", stop_before_manifest)
    with pytest.raises(RuntimeError, match="between file and manifest"):
        fit_tiny(remote, str(tmp_path / "backup"))
    monkeypatch.undo()

    assert listed(remote) == ["snapshot-01.keras"]
    check_verified(remote)
    # Snapshot 2's file is complete but not listed, so nobody uses it.
    assert "snapshot-02.keras" in gfile.listdir(remote)
    assert keras_snapshot.snapshot_paths(remote) == [
        f"{remote}/snapshot-01.keras"
    ]
    first = keras_snapshot.read_manifest(remote)["snapshots"][0]

    fit_tiny(remote, str(tmp_path / "backup"))  # Resumes at step 18.

    assert manifest_values(remote, "step") == [10, 20, 30]
    # Snapshot 1 is not taken again.
    assert manifest_values(remote, "sha256")[0] == first["sha256"]
    check_verified(remote)
    assert not [n for n in gfile.listdir(remote) if n.startswith(".partial")]
    assert not [n for n in gfile.listdir(remote) if n.startswith("superseded")]

    reference = ram_folder()
    fit_tiny(reference, str(tmp_path / "backup_reference"))
    x, _ = make_data()
    np.testing.assert_allclose(
        keras_snapshot.build_ensemble(remote).predict(x, verbose=0),
        keras_snapshot.build_ensemble(reference).predict(x, verbose=0),
        atol=1e-5,
    )


def test_stop_in_an_epoch_resumes_in_process(tmp_path):
    """`fit` stopped after epoch 2 (snapshot 1 taken), then fit again."""
    remote = ram_folder()
    with pytest.raises(RuntimeError, match="stopped"):
        fit_tiny(
            remote,
            str(tmp_path / "backup"),
            extra=[CrashAtEpochEnd(1, "stopped")],
        )
    assert manifest_values(remote, "step") == [10]
    fit_tiny(remote, str(tmp_path / "backup"))
    assert listed(remote) == [
        manifest_lib.snapshot_filename(i) for i in (1, 2, 3)
    ]
    check_verified(remote)


def test_a_short_upload_is_never_listed(tmp_path, monkeypatch):
    """The read-back check: a remote copy that came out short is refused.

    The object store is made to keep only half of snapshot 2's bytes; the
    write fails with the mismatch and the manifest never lists it.
    """
    remote = ram_folder()
    original = _fs.copy

    def short_copy(source, target):
        original(source, target)
        if target.endswith("snapshot-02.keras"):
            with gfile.GFile(target, "rb") as f:
                data = f.read()
            with gfile.GFile(target, "wb") as f:
                f.write(data[: len(data) // 2])

    monkeypatch.setattr(_fs, "copy", short_copy)
    with pytest.raises(OSError, match="could not write snapshot 2.*does not"):
        fit_tiny(remote, str(tmp_path / "backup"))
    monkeypatch.undo()
    assert listed(remote) == ["snapshot-01.keras"]
    check_verified(remote)
    assert len(keras_snapshot.load_snapshots(remote)) == 1


def test_prepare_removes_an_interrupted_upload():
    """An upload killed under its hidden name is removed, never listed."""
    remote = ram_folder()
    gfile.makedirs(remote)
    leftover = f"{remote}/.partial-0123456789ab-snapshot-01.keras"
    with gfile.GFile(leftover, "wb") as f:
        f.write(b"PK\x03\x04 half an upload")
    folder = manifest_lib.SnapshotDirectory(remote)
    assert folder.prepare() == [leftover]
    assert gfile.listdir(remote) == []


def test_new_run_sets_old_remote_snapshots_aside():
    """Remote set-aside copies, writes both manifests, then deletes."""
    remote = ram_folder()
    train_snapshots(remote)
    old = keras_snapshot.read_manifest(remote)["snapshots"]
    with pytest.warns(UserWarning, match="moved to"):
        train_snapshots(remote)
    (aside,) = [n for n in gfile.listdir(remote) if n.startswith("superseded")]
    aside = f"{remote}/{aside}"
    assert manifest_values(aside, "sha256") == [e["sha256"] for e in old]
    check_verified(aside)
    check_verified(remote)
    assert len(listed(remote)) == 3


def test_remote_manifest_entries_are_plain_names():
    remote = ram_folder()
    folder = manifest_lib.SnapshotDirectory(remote)
    for name in ("../snapshot-01.keras", "a/snapshot-01.keras", ".."):
        with pytest.raises(ValueError, match="not a plain file name"):
            folder.path_of(manifest_lib.SnapshotEntry(1, name, 1))
    entry = manifest_lib.SnapshotEntry(1, "snapshot-01.keras", 1)
    assert folder.path_of(entry) == f"{remote}/snapshot-01.keras"


def test_missing_remote_folder_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        keras_snapshot.build_ensemble(ram_folder())


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from test_remote_paths import fit_tiny
from keras_snapshot import _fs
from keras_snapshot import manifest as manifest_lib

directory, backup, fault = sys.argv[2:5]
replace, commit = _fs.replace, _fs.commit

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def killing_replace(source, target):
    # Snapshot 2 uploaded under its hidden name, not yet renamed.
    if fault == "upload" and target.endswith("snapshot-02.keras"):
        die()
    return replace(source, target)

def killing_commit(temporary, final):
    # Snapshot 3's file is in place and checked; its manifest is not.
    if fault == "manifest" and final.endswith(manifest_lib.MANIFEST_NAME):
        if "snapshot-03.keras" in _fs.listdir(directory):
            die()
    return commit(temporary, final)

_fs.replace = killing_replace
_fs.commit = killing_commit
fit_tiny(directory, backup)
"""


@pytest.mark.slow
def test_killed_processes_resume_through_gfile(tmp_path):
    """SIGKILL during an upload and before a manifest, then a resume.

    `ram://` cannot outlive a process, so this runs the remote code path
    (`tf.io.gfile`: hidden upload, rename, read-back check, no `flock`) on
    a `file://` URL, which gfile serves from local disk and subprocesses
    share. Its renames are atomic, unlike object storage's.
    """
    directory = f"file://{tmp_path}/snapshots"
    backup = str(tmp_path / "backup")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(here), env.get("PYTHONPATH", "")]
    )

    def run(fault):
        return subprocess.run(
            [sys.executable, "-c", KILL_SCRIPT, here, directory, backup, fault],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    killed = run("upload")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    names = _fs.listdir(directory)
    assert listed(directory) == ["snapshot-01.keras"]
    assert [n for n in names if n.startswith(".partial-")]  # Half done.
    check_verified(directory)

    killed = run("manifest")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert listed(directory) == ["snapshot-01.keras", "snapshot-02.keras"]
    assert "snapshot-03.keras" in _fs.listdir(directory)  # Unlisted.
    check_verified(directory)

    finished = run("none")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert manifest_values(directory, "step") == [10, 20, 30]
    check_verified(directory)
    assert not [
        n for n in _fs.listdir(directory) if n.startswith((".partial", "sup"))
    ]
    reference = ram_folder()
    fit_tiny(reference, str(tmp_path / "backup_reference"))
    x, _ = make_data()
    np.testing.assert_allclose(
        keras_snapshot.build_ensemble(directory).predict(x, verbose=0),
        keras_snapshot.build_ensemble(reference).predict(x, verbose=0),
        atol=1e-5,
    )


# WeightAveraging(mode="swa") on remote storage -------------------------------


def swa_fit(callback, epochs=5, extra=()):
    """48 samples, batch 8: 6 steps per epoch; returns the trained model."""
    keras.utils.set_random_seed(0)
    x, y = make_data(n=48)
    model = make_model()
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        "sparse_categorical_crossentropy",
    )
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[*extra, callback],
    )
    return model


def load_remote_model(path):
    with _fs.local_copy(path) as local:
        return keras.saving.load_model(local)


def assert_same_weights(got, want):
    for g, w in zip(got.get_weights(), want.get_weights()):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def test_swa_writes_its_average_to_ram(tmp_path, monkeypatch):
    """`filepath` on `ram://`: nothing lands on local disk (once a
    `./ram:/...` folder)."""
    monkeypatch.chdir(tmp_path)
    remote = ram_folder("swa")
    swa = keras_snapshot.WeightAveraging(
        mode="swa",
        average_batchnorm=True,
        start_step=8,
        every_steps=4,
        filepath=f"{remote}/swa.keras",
        verbose=0,
    )
    swa_fit(swa)
    assert os.listdir(tmp_path) == []
    assert swa.num_averaged == 6  # Steps 8, 12, ..., 28.
    assert_same_weights(
        load_remote_model(f"{remote}/swa.keras"), swa.averaged_model()
    )
    assert not [n for n in gfile.listdir(remote) if n.startswith(".partial")]


def test_swa_resumes_from_a_remote_backup_dir(tmp_path):
    """A `fit` stopped after epoch 3, resumed by a new callback object
    whose `filepath` is remote: the same average as a run never stopped."""
    remote = ram_folder("swa")
    backup = str(tmp_path / "backup")

    def make_callback(filepath=f"{remote}/swa.keras"):
        return keras_snapshot.WeightAveraging(
            mode="swa",
            average_batchnorm=True,
            start_step=8,
            every_steps=4,
            filepath=filepath,
            verbose=0,
        )

    with pytest.raises(RuntimeError, match="stopped"):
        swa_fit(
            make_callback(),
            extra=[
                keras.callbacks.BackupAndRestore(backup),
                CrashAtEpochEnd(2, "stopped"),
            ],
        )
    resumed = make_callback()
    swa_fit(resumed, extra=[keras.callbacks.BackupAndRestore(backup)])
    reference = make_callback(filepath=None)
    swa_fit(reference)
    assert resumed.num_averaged == reference.num_averaged == 6
    assert_same_weights(
        load_remote_model(f"{remote}/swa.keras"), reference.averaged_model()
    )
