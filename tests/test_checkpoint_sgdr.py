"""SnapshotCheckpoint under SGDR (CosineDecayRestarts) and explicit steps.

Loshchilov & Hutter 2017 restart the cosine after `first_decay_steps`,
then after cycles `t_mul` times longer. With `first_decay_steps=4`,
`t_mul=2` and 6 steps per epoch (96 samples, batch 16) the restarts fall
at steps 4 (mid-epoch 1), 12 (end of epoch 2) and 28 (mid-epoch 5).
"""

import os

import keras
import numpy as np
import pytest
from helpers import CrashAtEpochEnd
from helpers import make_data
from helpers import make_model
from helpers import saved_steps

import keras_snapshot
from keras_snapshot import SnapshotCheckpoint
from keras_snapshot import _fs
from keras_snapshot import manifest as manifest_lib
from keras_snapshot.schedule import restart_steps

STEPS_PER_EPOCH = 6  # 96 samples, batch 16.


def sgdr(first=4, t_mul=2.0, m_mul=0.8, alpha=0.01):
    return keras.optimizers.schedules.CosineDecayRestarts(
        0.1, first_decay_steps=first, t_mul=t_mul, m_mul=m_mul, alpha=alpha
    )


def numpy_sgdr(step, lr=0.1, first=4, t_mul=2.0, m_mul=0.8, alpha=0.01):
    """The SGDR rate at `step`, from the cycle lengths first * t_mul**k."""
    start, length, k = 0, first, 0
    while step >= start + length:
        start, length, k = start + length, length * t_mul, k + 1
    fraction = (step - start) / length
    cosine = 0.5 * (1 + np.cos(np.pi * fraction))
    # Keras scales the cosine by m_mul**k, not the floor alpha.
    return lr * ((1 - alpha) * m_mul**k * cosine + alpha)


def fit_sgdr(directory, epochs=5, schedule=None, callbacks=(), **kwargs):
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = make_model()
    schedule = schedule or sgdr()
    model.compile(
        keras.optimizers.SGD(schedule, momentum=0.9),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    checkpoint = SnapshotCheckpoint(directory, verbose=0, **kwargs)
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=epochs,
        verbose=0,
        callbacks=list(callbacks) + [checkpoint],
    )
    return model, schedule


def test_restart_steps_with_growing_cycles():
    assert restart_steps(sgdr(first=4), 30) == [4, 12, 28]
    assert restart_steps(sgdr(first=4), 28) == [4, 12, 28]
    assert restart_steps(sgdr(first=5, t_mul=2.0), 200) == [5, 15, 35, 75, 155]
    assert restart_steps(sgdr(first=3, t_mul=1.5), 30) == [3, 8, 15, 25]
    assert restart_steps(sgdr(first=10, t_mul=1.0), 35) == [10, 20, 30]
    for first, t_mul in ((4, 2.0), (5, 2.0), (7, 2.0), (3, 1.5), (6, 3.0)):
        schedule = sgdr(first=first, t_mul=t_mul)
        rates = np.array([float(schedule(s)) for s in range(160)])
        # The restarts are where Keras's own rate jumps back up.
        jumps = [s for s in range(1, 160) if rates[s] > rates[s - 1]]
        assert restart_steps(schedule, 159) == jumps
        reference = [
            numpy_sgdr(s, first=first, t_mul=t_mul) for s in range(160)
        ]
        np.testing.assert_allclose(rates, reference, rtol=1e-4, atol=1e-7)


def test_snapshots_at_every_restart_with_the_rate_at_its_minimum(tmp_path):
    directory = str(tmp_path / "snaps")
    _, schedule = fit_sgdr(directory, epochs=5)
    manifest = keras_snapshot.read_manifest(directory)
    entries = manifest["snapshots"]
    assert manifest["cycle_end_steps"] == [4, 12, 28]
    assert [e["step"] for e in entries] == [4, 12, 28]
    # The snapshot files hold the model after exactly these steps.
    assert saved_steps(directory) == [4, 12, 28]
    # Mid-epoch restarts record their batch, the epoch-end one none.
    assert [e["epoch"] for e in entries] == [1, 2, 5]
    assert [e["batch"] for e in entries] == [4, None, 4]
    rates = np.array([numpy_sgdr(s) for s in range(30)])
    starts = [0, 4, 12]
    for k, (entry, start) in enumerate(zip(entries, starts)):
        end = entry["step"]
        # The last step of each cycle ran at the cycle's lowest rate ...
        assert entry["learning_rate"] == pytest.approx(rates[end - 1], 1e-4)
        assert rates[end - 1] == pytest.approx(rates[start:end].min())
        # ... and the next step restarts at the top, scaled by m_mul**k.
        assert rates[end] == pytest.approx(0.1 * 0.99 * 0.8 ** (k + 1) + 0.001)
        path = os.path.join(directory, entry["file"])
        assert entry["sha256"] == _fs.sha256(path)
        assert "loss" in entry["logs"]


def test_num_snapshots_keeps_the_first_restarts(tmp_path):
    directory = str(tmp_path / "snaps")
    fit_sgdr(directory, epochs=5, num_snapshots=2)
    entries = keras_snapshot.read_manifest(directory)["snapshots"]
    assert [e["step"] for e in entries] == [4, 12]


def test_backup_and_restore_resumes_without_duplicates(tmp_path):
    """Killed after the mid-epoch snapshot at step 28, before its backup."""
    directory = str(tmp_path / "snaps")
    backup = str(tmp_path / "backup")

    def fit(crash_at):
        callbacks = [keras.callbacks.BackupAndRestore(backup)]
        if crash_at is not None:
            callbacks.insert(0, CrashAtEpochEnd(crash_at))
        return fit_sgdr(directory, epochs=5, callbacks=callbacks)

    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(crash_at=4)  # The 5th epoch: steps 24..30; backup at step 24.
    entries = keras_snapshot.read_manifest(directory)["snapshots"]
    assert [e["step"] for e in entries] == [4, 12, 28]
    first_hashes = [e["sha256"] for e in entries[:2]]
    with pytest.warns(UserWarning, match="were moved to"):
        fit(crash_at=None)
    entries = keras_snapshot.read_manifest(directory)["snapshots"]
    assert [e["step"] for e in entries] == [4, 12, 28]
    assert saved_steps(directory) == [4, 12, 28]
    # Snapshots before the backup are kept as they were, not retaken.
    assert [e["sha256"] for e in entries[:2]] == first_hashes
    folder = manifest_lib.SnapshotDirectory(directory)
    for entry in entries:
        folder.verified_path(manifest_lib.SnapshotEntry(**entry))


def test_split_fit_calls_with_the_restarts_listed(tmp_path):
    """fit(epochs=2) then fit(epochs=5, initial_epoch=2).

    The restarts of `CosineDecayRestarts` are counted from the steps one
    `fit` call runs, so a run split over calls lists them for the whole
    run with `restart_steps` and `snapshot_steps=`.
    """
    directory = str(tmp_path / "snaps")
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = make_model()
    schedule = sgdr()
    model.compile(
        keras.optimizers.SGD(schedule), "sparse_categorical_crossentropy"
    )
    steps = restart_steps(schedule, 5 * STEPS_PER_EPOCH)
    for first, last in ((0, 2), (2, 5)):
        model.fit(
            x,
            y,
            batch_size=16,
            epochs=last,
            initial_epoch=first,
            verbose=0,
            callbacks=[
                SnapshotCheckpoint(directory, snapshot_steps=steps, verbose=0)
            ],
        )
    assert saved_steps(directory) == [4, 12, 28]


def test_another_schedule_in_the_same_folder_is_refused(tmp_path):
    directory = str(tmp_path / "snaps")
    fit_sgdr(directory, epochs=2)
    with pytest.raises(ValueError, match="another schedule"):
        fit_sgdr(directory, epochs=2, schedule=sgdr(first=5))


def test_unknown_length_data_needs_steps(tmp_path):
    import tensorflow as tf

    x, y = make_data()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat(2)
    model = make_model()
    model.compile(
        keras.optimizers.SGD(sgdr()), "sparse_categorical_crossentropy"
    )
    callback = SnapshotCheckpoint(str(tmp_path / "s"), verbose=0)
    with pytest.raises(ValueError, match="snapshot_steps="):
        model.fit(data.repeat(), epochs=1, verbose=0, callbacks=[callback])
    # With steps_per_epoch the restarts are known.
    model.fit(
        data.repeat(),
        epochs=5,
        steps_per_epoch=STEPS_PER_EPOCH,
        verbose=0,
        callbacks=[callback],
    )
    assert saved_steps(str(tmp_path / "s")) == [4, 12, 28]


def test_explicit_snapshot_steps(tmp_path):
    """Any schedule (here a constant rate) with a list of steps."""
    directory = str(tmp_path / "snaps")
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = make_model()
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=4,
        verbose=0,
        callbacks=[
            SnapshotCheckpoint(directory, snapshot_steps=[5, 12, 13], verbose=0)
        ],
    )
    manifest = keras_snapshot.read_manifest(directory)
    assert manifest["cycle_end_steps"] == [5, 12, 13]
    entries = manifest["snapshots"]
    assert [e["step"] for e in entries] == [5, 12, 13]
    assert [e["batch"] for e in entries] == [5, None, 1]
    assert saved_steps(directory) == [5, 12, 13]
    for entry in entries:
        assert entry["learning_rate"] == pytest.approx(0.05)


def test_explicit_steps_override_the_schedule(tmp_path):
    directory = str(tmp_path / "snaps")
    fit_sgdr(directory, epochs=3, snapshot_steps=[6, 18])
    assert saved_steps(directory) == [6, 18]


def test_explicit_steps_beyond_the_run_warn(tmp_path):
    directory = str(tmp_path / "snaps")
    with pytest.warns(UserWarning, match="will not be taken"):
        fit_sgdr(directory, epochs=2, snapshot_steps=[6, 40])
    assert saved_steps(directory) == [6]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"snapshot_steps": []}, r"snapshot_steps=\[\]"),
        ({"snapshot_steps": [5, 3]}, r"snapshot_steps=\[5, 3\]"),
        ({"snapshot_steps": [4, 4]}, r"snapshot_steps=\[4, 4\]"),
        ({"snapshot_steps": [0, 4]}, "snapshot_steps=0"),
        ({"snapshot_steps": [2.5]}, "snapshot_steps=2.5"),
        ({"snapshot_steps": [4], "cycle_length": 4}, "not both"),
    ],
)
def test_bad_snapshot_steps(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match="Received") as info:
        SnapshotCheckpoint(str(tmp_path), **kwargs)
    assert info.match(match)
