import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import CrashAtEpochEnd
from helpers import compile_with_schedule
from helpers import make_data
from helpers import make_model
from helpers import saved_steps
from helpers import train_snapshots

import keras_snapshot
from keras_snapshot import SnapshotCheckpoint
from keras_snapshot import _fs
from keras_snapshot import manifest as manifest_lib


def test_fit_writes_one_snapshot_per_cycle_end_mid_epoch(snapshot_run):
    directory, schedule = snapshot_run
    # 5 epochs x 6 steps = 30 steps, 3 cycles of 10: ends at 10, 20, 30.
    # Steps 10 and 20 fall in the middle of epochs 2 and 4.
    assert schedule.cycle_end_steps == [10, 20, 30]
    files = sorted(f for f in os.listdir(directory) if f.endswith(".keras"))
    assert files == [
        "snapshot-01.keras",
        "snapshot-02.keras",
        "snapshot-03.keras",
    ]
    assert saved_steps(directory) == [10, 20, 30]
    manifest = keras_snapshot.read_manifest(directory)
    entries = manifest["snapshots"]
    assert [e["index"] for e in entries] == [1, 2, 3]
    assert [e["step"] for e in entries] == [10, 20, 30]
    assert [e["epoch"] for e in entries] == [2, 4, 5]
    assert [e["batch"] for e in entries] == [4, 2, None]
    for entry in entries:
        path = os.path.join(directory, entry["file"])
        assert entry["sha256"] == _fs.sha256(path)
        assert entry["size"] == os.path.getsize(path)
        expected_lr = float(schedule(entry["step"] - 1))
        assert entry["learning_rate"] == pytest.approx(expected_lr, rel=1e-5)
        assert entry["learning_rate"] < 0.1 * 0.05
        assert "loss" in entry["logs"] and "accuracy" in entry["logs"]
    assert manifest["cycle_end_steps"] == [10, 20, 30]


def test_snapshots_are_distinct_complete_models(snapshot_run):
    directory, _ = snapshot_run
    models = keras_snapshot.load_snapshots(directory)
    kernels = [m.layers[0].kernel.numpy() for m in models]
    assert not np.allclose(kernels[0], kernels[1])
    assert not np.allclose(kernels[1], kernels[2])
    # Optimizer state (momentum) is inside each file: training can continue.
    full = keras.saving.load_model(os.path.join(directory, "snapshot-02.keras"))
    assert isinstance(
        full.optimizer._learning_rate, keras_snapshot.SnapshotSchedule
    )
    momenta = [v.numpy() for v in full.optimizer.variables[2:]]
    assert any(np.abs(m).sum() > 0 for m in momenta)
    x, y = make_data()
    full.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert int(full.optimizer.iterations.numpy()) == 26


def test_tf_data_dataset_and_uneven_cycles(tmp_path):
    keras.utils.set_random_seed(1)
    x, y = make_data(n=100)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)  # 7 steps
    model = make_model()
    schedule = compile_with_schedule(model, total_steps=28, num_snapshots=3)
    assert schedule.cycle_end_steps == [10, 20, 28]
    directory = str(tmp_path / "snaps")
    model.fit(
        dataset,
        epochs=4,
        callbacks=[SnapshotCheckpoint(directory, verbose=0)],
        verbose=0,
    )
    assert saved_steps(directory) == [10, 20, 28]


def test_composes_with_backup_restore_checkpoint_and_tensorboard(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = make_model()
    compile_with_schedule(model, total_steps=24, num_snapshots=2)
    directory = str(tmp_path / "snaps")
    callbacks = [
        keras.callbacks.BackupAndRestore(str(tmp_path / "backup")),
        SnapshotCheckpoint(directory, verbose=0),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras")),
        keras.callbacks.TensorBoard(str(tmp_path / "logs")),
    ]
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=4,
        callbacks=callbacks,
        verbose=0,
        validation_data=(x, y),
    )
    assert saved_steps(directory) == [12, 24]
    assert os.path.exists(tmp_path / "best.keras")
    entries = keras_snapshot.read_manifest(directory)["snapshots"]
    # Cycle ends at epoch ends: the epoch logs, validation included.
    assert "val_loss" in entries[0]["logs"]


def test_resume_with_initial_epoch_matches_one_run(tmp_path):
    x, y = make_data()

    def run(directory, split):
        keras.utils.set_random_seed(0)
        model = make_model()
        compile_with_schedule(model, total_steps=30, num_snapshots=3)
        callback = SnapshotCheckpoint(directory, verbose=0)
        if split:
            model.fit(
                x,
                y,
                batch_size=16,
                epochs=3,
                callbacks=[callback],
                verbose=0,
                shuffle=False,
            )
            model.fit(
                x,
                y,
                batch_size=16,
                epochs=5,
                initial_epoch=3,
                callbacks=[callback],
                verbose=0,
                shuffle=False,
            )
        else:
            model.fit(
                x,
                y,
                batch_size=16,
                epochs=5,
                callbacks=[callback],
                verbose=0,
                shuffle=False,
            )
        return keras_snapshot.load_snapshots(directory)

    whole = run(str(tmp_path / "whole"), split=False)
    split = run(str(tmp_path / "split"), split=True)
    assert saved_steps(str(tmp_path / "split")) == [10, 20, 30]
    for a, b in zip(whole, split):
        for wa, wb in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


def test_backup_and_restore_resumes_without_duplicates(tmp_path):
    """Crash after snapshot 2 (mid-epoch 4) but before epoch 4's backup."""
    x, y = make_data()
    directory = str(tmp_path / "snaps")
    backup = str(tmp_path / "backup")

    def fit(crash_at):
        keras.utils.set_random_seed(0)
        model = make_model()
        compile_with_schedule(model, total_steps=30, num_snapshots=3)
        callbacks = [
            keras.callbacks.BackupAndRestore(backup),
            SnapshotCheckpoint(directory, verbose=0),
        ]
        if crash_at is not None:
            callbacks.insert(0, CrashAtEpochEnd(crash_at))
        model.fit(x, y, batch_size=16, epochs=5, callbacks=callbacks, verbose=0)
        return model

    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(crash_at=3)  # Epoch index 3 = 4th epoch, after step 20.
    entries = keras_snapshot.read_manifest(directory)["snapshots"]
    assert [e["step"] for e in entries] == [10, 20]
    with pytest.warns(UserWarning, match="were moved to"):
        fit(crash_at=None)
    entries = keras_snapshot.read_manifest(directory)["snapshots"]
    assert [e["step"] for e in entries] == [10, 20, 30]
    assert saved_steps(directory) == [10, 20, 30]
    for entry in entries:
        manifest_lib.SnapshotDirectory(directory).verified_path(
            manifest_lib.SnapshotEntry(**entry)
        )


def test_explicit_cycle_length_with_another_schedule(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = make_model()
    sgdr = keras.optimizers.schedules.CosineDecayRestarts(
        0.1, first_decay_steps=12, t_mul=1.0, m_mul=1.0, alpha=0.0
    )
    model.compile(keras.optimizers.SGD(sgdr), "sparse_categorical_crossentropy")
    directory = str(tmp_path / "snaps")
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=4,
        verbose=0,
        callbacks=[SnapshotCheckpoint(directory, cycle_length=12, verbose=0)],
    )
    assert saved_steps(directory) == [12, 24]
    # The manifest records the optimizer's real rate of each last step.
    entries = keras_snapshot.read_manifest(directory)["snapshots"]
    for entry in entries:
        want = float(sgdr(entry["step"] - 1))
        assert entry["learning_rate"] == pytest.approx(want, rel=1e-5)


def test_without_snapshot_schedule_needs_cycle_length(tmp_path):
    x, y = make_data()
    model = make_model()
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="cycle_length"):
        model.fit(
            x,
            y,
            epochs=1,
            verbose=0,
            callbacks=[SnapshotCheckpoint(str(tmp_path / "s"), verbose=0)],
        )


def test_cycle_length_disagreeing_with_schedule(tmp_path):
    x, y = make_data()
    model = make_model()
    compile_with_schedule(model, 30, 3)
    callback = SnapshotCheckpoint(str(tmp_path), cycle_length=7, verbose=0)
    with pytest.raises(ValueError, match="disagrees"):
        model.fit(
            x, y, batch_size=16, epochs=1, verbose=0, callbacks=[callback]
        )


def test_keeps_keras_async_batch_dispatch():
    """Keras turns async dispatch off for callbacks with batch-end hooks.

    (It is on for thread-safe backends such as JAX; the TensorFlow backend
    never uses it.)
    """
    from keras.src.utils.python_utils import is_default

    callback = SnapshotCheckpoint("unused", verbose=0)
    for hook in ("on_batch_end", "on_train_batch_end"):
        assert is_default(getattr(callback, hook))
    baseline = keras.callbacks.CallbackList([], model=make_model())
    ours = keras.callbacks.CallbackList([callback], model=make_model())
    assert ours._async_train == baseline._async_train


def test_steps_per_execution_must_align(tmp_path):
    x, y = make_data()
    model = make_model()
    schedule = keras_snapshot.SnapshotSchedule(0.1, 30, 3)
    model.compile(
        keras.optimizers.SGD(schedule),
        "sparse_categorical_crossentropy",
        steps_per_execution=4,
    )
    # 6 batches an epoch: hooks at steps 0, 4, 6, 10, 12, 16, 18, 22, ...
    with pytest.raises(ValueError, match=r"steps \[20\] cannot be taken"):
        model.fit(
            x,
            y,
            batch_size=16,
            epochs=5,
            verbose=0,
            callbacks=[SnapshotCheckpoint(str(tmp_path), verbose=0)],
        )


def test_steps_per_execution_aligned_takes_exact_steps(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = make_model()
    schedule = keras_snapshot.SnapshotSchedule(0.1, 30, 3)
    model.compile(
        keras.optimizers.SGD(schedule),
        "sparse_categorical_crossentropy",
        steps_per_execution=2,
    )
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=5,
        verbose=0,
        callbacks=[SnapshotCheckpoint(str(tmp_path), verbose=0)],
    )
    assert saved_steps(str(tmp_path)) == [10, 20, 30]


def test_recalibration_option(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = make_model()
    compile_with_schedule(model, total_steps=12, num_snapshots=1)
    directory = str(tmp_path / "snaps")
    callback = SnapshotCheckpoint(directory, recalibration_data=x, verbose=0)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[callback])
    entry = keras_snapshot.read_manifest(directory)["snapshots"][0]
    assert entry["batchnorm_recalibrated"] is True
    snapshot = keras_snapshot.load_snapshots(directory)[0]
    bn = snapshot.layers[1]
    features = (
        x @ snapshot.layers[0].kernel.numpy() + snapshot.layers[0].bias.numpy()
    )
    np.testing.assert_allclose(
        bn.moving_mean.numpy(), features.mean(0), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        bn.moving_variance.numpy(), features.var(0), rtol=1e-4, atol=1e-5
    )
    # The model being trained keeps its own exponential averages.
    assert not np.allclose(
        model.layers[1].moving_mean.numpy(), features.mean(0), atol=1e-3
    )


@pytest.mark.parametrize("failing", ["manifest"])
def test_failed_write_keeps_earlier_snapshots(tmp_path, monkeypatch, failing):
    """A full disk while writing snapshot 2's manifest update.

    A full disk while writing the snapshot file itself is tested for real
    (the kernel refusing to grow the file) in test_manifest.py.
    """
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = make_model()
    compile_with_schedule(model, total_steps=30, num_snapshots=3)
    directory = str(tmp_path / "snaps")
    callback = SnapshotCheckpoint(directory, verbose=0)
    original = _fs.commit
    calls = []

    def failing_commit(temporary, final):
        kind = "snapshot" if final.endswith(".keras") else "manifest"
        calls.append(kind)
        # The manifest is written once at train begin, then per snapshot.
        nth = 2 if kind == "snapshot" else 3
        if kind == failing and calls.count(kind) == nth:
            raise OSError(28, "No space left on device")
        return original(temporary, final)

    monkeypatch.setattr(_fs, "commit", failing_commit)
    with pytest.raises(OSError, match="could not write snapshot 2"):
        model.fit(
            x, y, batch_size=16, epochs=5, verbose=0, callbacks=[callback]
        )
    entries = keras_snapshot.read_manifest(directory)["snapshots"]
    assert [e["index"] for e in entries] == [1]
    manifest_lib.SnapshotDirectory(directory).verified_path(
        manifest_lib.SnapshotEntry(**entries[0])
    )
    # No scratch files are left; a snapshot file without a manifest entry
    # is never used and is replaced when training resumes.
    names = sorted(os.listdir(directory))
    assert not [n for n in names if n.startswith(".partial")]
    assert keras_snapshot.snapshot_paths(directory) == [
        os.path.join(directory, "snapshot-01.keras")
    ]


def test_read_only_directory_gives_clear_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write to read-only directories")
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o500)
    with pytest.raises(OSError, match="not writable"):
        train_snapshots(str(directory))


def test_manifest_file_is_valid_json_with_schema(snapshot_run):
    directory, _ = snapshot_run
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["format"] == "keras_snapshot.manifest"
    assert manifest["cycle_end_steps"] == [10, 20, 30]


def test_snapshot_line_is_printed_on_its_own_line(tmp_path, capsys):
    """Below the finished progress bar, never inside it (verbose fit)."""
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = make_model()
    compile_with_schedule(model, total_steps=30, num_snapshots=3)
    callback = SnapshotCheckpoint(str(tmp_path / "snaps"))
    model.fit(x, y, batch_size=16, epochs=5, verbose=1, callbacks=[callback])
    out = capsys.readouterr().out
    lines = [line for line in out.split("\n") if "Snapshot " in line]
    assert len(lines) == 3
    assert all(line.startswith("Snapshot ") for line in lines), lines
