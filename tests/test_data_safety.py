"""Nothing lost, nothing mixed: the data-loss paths of issue 12.

Each test reproduces one way snapshots were lost or runs were mixed on the
previous main, with real training, real files and, where a kill or a second
writer is involved, real processes.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import CrashAtEpochEnd
from helpers import compile_with_schedule
from helpers import make_data
from helpers import make_model

import keras_snapshot
from keras_snapshot import SnapshotCheckpoint
from keras_snapshot import manifest as manifest_lib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def fit(directory, epochs=5, callbacks=(), lr=0.1, model=None, **kw):
    """30 steps (6 per epoch), snapshots at steps 10, 20 and 30."""
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = model or make_model()
    compile_with_schedule(model, total_steps=30, num_snapshots=3, lr=lr)
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=epochs,
        verbose=0,
        callbacks=[*callbacks, SnapshotCheckpoint(directory, verbose=0, **kw)],
    )
    return model


def steps_in(directory):
    return [
        e["step"] for e in keras_snapshot.read_manifest(directory)["snapshots"]
    ]


# 2. The last snapshot after a kill between the last backup and the
# snapshot: `snapshot-after-last-backup` in tests/test_resume.py.


# 3. A snapshot folder shared with BackupAndRestore.


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["same", "inside"])
def test_snapshots_inside_the_backup_folder_are_refused(tmp_path, layout):
    backup = str(tmp_path / "backup")
    directory = backup if layout == "same" else os.path.join(backup, "snaps")
    with pytest.raises(ValueError, match="BackupAndRestore deletes its folder"):
        fit(
            directory,
            callbacks=[keras.callbacks.BackupAndRestore(backup)],
        )
    # Refused before Keras's on_train_end could remove the folder.
    assert manifest_lib.SnapshotDirectory(directory).has_manifest()


# 4. Two writers in one folder.

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from keras_snapshot.manifest import SnapshotDirectory
    SnapshotDirectory(sys.argv[1]).lock()
    print("locked", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.slow
def test_second_writer_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    directory = str(tmp_path / "snaps")
    os.makedirs(directory)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, directory],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match="is being written by process"):
            fit(directory)
        assert not manifest_lib.SnapshotDirectory(directory).has_manifest()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    fit(directory)  # The lock died with its process.
    assert steps_in(directory) == [10, 20, 30]


@pytest.mark.slow
def test_one_process_can_refit_into_its_own_folder(tmp_path):
    """A notebook cell run again: the same process takes its lock over."""
    directory = str(tmp_path / "snaps")

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(directory, callbacks=[Interrupt()])
    fit(directory)
    assert steps_in(directory) == [10, 20, 30]


# 5. A rerun of a finished training.


@pytest.mark.slow
def test_rerun_sets_old_snapshots_aside_and_a_crash_loses_nothing(tmp_path):
    directory = str(tmp_path / "snaps")
    first = fit(directory)
    old = keras_snapshot.build_ensemble(directory)
    x, _ = make_data()
    with pytest.warns(UserWarning, match="were moved to"):
        with pytest.raises(RuntimeError, match="rerun crashed"):
            fit(directory, callbacks=[CrashAtEpochEnd(0, "rerun crashed")])
    aside = [
        os.path.join(directory, n)
        for n in os.listdir(directory)
        if n.startswith(manifest_lib.SUPERSEDED_PREFIX)
    ]
    assert len(aside) == 1
    assert steps_in(aside[0]) == [10, 20, 30]
    np.testing.assert_allclose(
        keras_snapshot.build_ensemble(aside[0]).predict(x, verbose=0),
        old.predict(x, verbose=0),
        atol=1e-6,
    )
    assert steps_in(directory) == []
    del first


# 7. Diverged training.


@pytest.mark.slow
def test_nonfinite_snapshots_are_marked_and_refused(tmp_path):
    directory = str(tmp_path / "snaps")
    with pytest.warns(UserWarning, match="NaN or infinite"):
        fit(directory, lr=1e12)
    with open(os.path.join(directory, "manifest.json")) as f:
        text = f.read()

    def refuse(name):
        raise ValueError(f"bare {name} in the manifest")

    manifest = json.loads(text, parse_constant=refuse)  # Strict JSON.
    assert [e["finite"] for e in manifest["snapshots"]] == [False] * 3
    with pytest.raises(ValueError, match="allow_nonfinite=True"):
        keras_snapshot.build_ensemble(directory)
    ensemble = keras_snapshot.build_ensemble(
        directory, allow_nonfinite=True, from_logits=False
    )
    assert ensemble is not None


# 8. Hangs.


def test_endless_recalibration_data_is_refused_up_front():
    x, _ = make_data()
    endless = tf.data.Dataset.from_tensor_slices(x).batch(16).repeat()
    with pytest.raises(ValueError, match="endless dataset"):
        SnapshotCheckpoint("unused", recalibration_data=endless)
    SnapshotCheckpoint(
        "unused", recalibration_data=endless, recalibration_steps=2
    )
    with pytest.raises(ValueError, match="endless dataset"):
        keras_snapshot.recalibrate_batchnorm(make_model(), endless)


@pytest.mark.slow
def test_large_and_deep_manifests_are_read_or_refused(tmp_path):
    directory = tmp_path / "snaps"
    directory.mkdir()
    entries = [
        {"index": i, "file": f"s{i}.keras", "step": i, "size": 1, "sha256": ""}
        for i in range(1, 20001)
    ]
    manifest = {
        "format": manifest_lib.MANIFEST_FORMAT,
        "snapshots": entries,
    }
    path = directory / "manifest.json"
    path.write_text(json.dumps(manifest))
    started = time.perf_counter()
    assert len(keras_snapshot.read_manifest(str(directory))["snapshots"]) == (
        20000
    )
    # Linear, not quadratic: far below the 18 s of the old duplicate check.
    print(f"20k entries read in {time.perf_counter() - started:.2f} s")
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="nested deeper"):
        keras_snapshot.read_manifest(str(directory))
    with open(path, "w") as f:
        f.truncate(manifest_lib.MAX_MANIFEST_BYTES + 1)
    with pytest.raises(ValueError, match="larger than"):
        keras_snapshot.read_manifest(str(directory))


# 10. Smaller.


def test_manifest_and_snapshots_follow_the_umask(tmp_path):
    directory = str(tmp_path / "snaps")
    old = os.umask(0o022)
    try:
        fit(directory, epochs=2)
    finally:
        os.umask(old)
    for name in ("manifest.json", "snapshot-01.keras"):
        mode = os.stat(os.path.join(directory, name)).st_mode & 0o777
        assert mode == 0o644, (name, oct(mode))


def test_unrelated_snapshot_file_is_not_overwritten(tmp_path):
    directory = tmp_path / "snaps"
    directory.mkdir()
    precious = directory / "snapshot-01.keras"
    precious.write_bytes(b"someone else's model")
    with pytest.raises(FileExistsError, match="did not write"):
        fit(str(directory))
    assert precious.read_bytes() == b"someone else's model"


def test_non_zip_snapshot_is_named_as_such(tmp_path):
    path = tmp_path / "snapshot-01.keras"
    path.write_text("not a model")
    with pytest.raises(ValueError, match="not a `.keras` model"):
        keras_snapshot.load_snapshots([str(path)])


def test_unsafe_layer_refusal_keeps_keras_reason(tmp_path):
    inputs = keras.Input((8,))
    outputs = keras.layers.Lambda(lambda t: t * 2)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, "softmax")(outputs))
    path = str(tmp_path / "snapshot-01.keras")
    model.save(path)
    with pytest.raises(ValueError, match="safe_mode=False") as info:
        keras_snapshot.load_snapshots([path])
    assert path in str(info.value)


@pytest.mark.slow
def test_training_past_total_steps_and_short_fits_warn(tmp_path):
    with pytest.warns(UserWarning, match="past the schedule's total_steps"):
        fit(str(tmp_path / "long"), epochs=7)
    with pytest.warns(UserWarning, match="will not be taken"):
        fit(str(tmp_path / "short"), epochs=3)


# 1. --overwrite only replaces a run, and only the run's own files.


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    from keras_snapshot.app import cli

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    code = cli.main(
        ["train", "--output-dir", str(precious), "--overwrite", "--epochs", "2"]
    )
    assert code == 2
    assert (precious / "thesis.tex").read_text() == "years of work"
    link = tmp_path / "link"
    link.symlink_to(precious)
    assert cli.main(["train", "--output-dir", str(link), "--overwrite"]) == 2
    assert (precious / "thesis.tex").exists()


def test_overwrite_removes_only_the_runs_own_files(tmp_path):
    from keras_snapshot.app import run as run_lib

    run_dir = tmp_path / "run"
    (run_dir / "snapshots").mkdir(parents=True)
    (run_dir / "run.json").write_text("{}")
    (run_dir / "report.md").write_text("old report")
    (run_dir / "notes.txt").write_text("mine")
    run_lib.remove_run(str(run_dir))
    assert sorted(os.listdir(run_dir)) == ["notes.txt"]


# 6. A backup cut short by a kill.


def _train_until_backup(run_dir, needed):
    """Starts a CLI run and SIGKILLs it once the backup holds `needed`."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    command = [sys.executable, "-m", "keras_snapshot", "train"]
    command += ["--dataset", "digits", "--model", "small_cnn"]
    command += ["--epochs", "12", "--snapshots", "3", "--verbose", "0"]
    command += ["--output-dir", run_dir]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    target = os.path.join(run_dir, "backup", needed)
    deadline = time.monotonic() + 300
    while not os.path.exists(target) and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before the backup"
        time.sleep(0.02)
    time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    return command, env


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["latest", "both"])
def test_unreadable_backup_resumes_or_restarts_keeping_snapshots(
    tmp_path, broken
):
    run_dir = str(tmp_path / "run")
    command, env = _train_until_backup(run_dir, "latest.weights.h5.bkp")
    backup = os.path.join(run_dir, "backup")
    names = ["latest.weights.h5"]
    if broken == "both":
        names.append("latest.weights.h5.bkp")
    for name in names:
        with open(os.path.join(backup, name), "wb") as f:
            f.write(b"cut short by a kill")
    rerun = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    expected = "one before" if broken == "latest" else "starts again"
    assert expected in rerun.stdout, rerun.stdout[-3000:]
    snapshots = os.path.join(run_dir, "snapshots")
    schedule = keras_snapshot.read_manifest(snapshots)["cycle_end_steps"]
    assert steps_in(snapshots) == schedule


# 9. Checks before the first step; no run recorded for a run that never ran.


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--momentum", "1.5"], "momentum"),
        (["--weight-decay", "-5"], "weight_decay"),
        (["--validation-fraction", "1.5"], "validation_fraction"),
        (["--output-dir", ""], "--output-dir is empty"),
        (
            ["--validation-fraction", "0", "--temperature-scaling"],
            "validation split",
        ),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(
    tmp_path, capsys, argv, message, monkeypatch
):
    from keras_snapshot.app import cli

    monkeypatch.chdir(tmp_path)
    argv = ["train", *argv]
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "run")]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")
    assert not os.path.exists(tmp_path / "runs")


def test_model_that_does_not_fit_records_no_run(tmp_path, capsys):
    from keras_snapshot.app import cli

    wrong = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    path = str(tmp_path / "wrong.keras")
    wrong.save(path)
    run_dir = tmp_path / "run"
    code = cli.main(["train", "--model", path, "--output-dir", str(run_dir)])
    assert code == 2
    assert not (run_dir / "run.json").exists()


def test_evaluate_on_a_run_without_settings_is_one_line(tmp_path, capsys):
    from keras_snapshot.app import cli

    (tmp_path / "run.json").write_text('{"status": "trained"}')
    assert cli.main(["evaluate", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no run settings" in err and len(err.splitlines()) == 1


def test_diverging_run_stops_with_one_line(tmp_path, capsys):
    from keras_snapshot.app import cli

    code = cli.main(
        ["train", "--dataset", "digits", "--lr", "1e6", "--epochs", "4"]
        + ["--snapshots", "2"]
        + ["--verbose", "0", "--output-dir", str(tmp_path / "run")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "training diverged" in err and len(err.splitlines()) == 1


def test_second_cli_run_on_a_live_run_directory_is_refused(tmp_path, capsys):
    from keras_snapshot.app import cli

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["train", "--dataset", "digits", "--epochs", "2"]
        assert cli.main([*argv, "--output-dir", str(run_dir)]) == 2
        err = capsys.readouterr().err.strip()
        assert "is being written by process" in err
        assert len(err.splitlines()) == 1
        assert not (run_dir / "run.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
