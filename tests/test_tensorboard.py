"""What the callbacks write to TensorBoard next to Keras's own scalars."""

import glob
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import make_data
from helpers import make_model

import keras_snapshot
from keras_snapshot._tensorboard import MAX_POINTS_PER_EPOCH
from keras_snapshot._tensorboard import logged_steps
from keras_snapshot.freezeout import group_rate_factor


def read_events(log_dir, run="train"):
    """`{tag: {step: value}}` of every scalar and text in `log_dir/run`."""
    found = {}
    for path in glob.glob(os.path.join(log_dir, run, "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                if array.dtype == object:
                    array = array.item().decode()
                else:
                    array = float(array)
                found.setdefault(value.tag, {})[event.step] = array
    return found


def board(log_dir, **kwargs):
    return keras.callbacks.TensorBoard(
        str(log_dir), write_graph=False, profile_batch=0, **kwargs
    )


def fit_with_snapshots(
    tmp_path,
    board_first=False,
    accumulation=None,
    steps_per_execution=1,
    fits=((0, 3),),
    batch_size=16,
    **board_kwargs,
):
    """Trains 12 optimizer updates with 3 snapshots and a TensorBoard; 64
    samples, `fits` the `(initial_epoch, epochs)` of each `fit` call."""
    x, y = make_data(n=64)
    model = make_model()
    schedule = keras_snapshot.SnapshotSchedule(
        0.1, 12, 3, gradient_accumulation_steps=accumulation
    )
    optimizer = keras.optimizers.SGD(
        schedule, gradient_accumulation_steps=accumulation
    )
    model.compile(
        optimizer,
        "sparse_categorical_crossentropy",
        steps_per_execution=steps_per_execution,
    )
    checkpoint = keras_snapshot.SnapshotCheckpoint(
        tmp_path / "s", log_dir=tmp_path / "logs", verbose=0
    )
    tensorboard = board(tmp_path / "logs", **board_kwargs)
    # The TensorBoard first: its hooks run before ours.
    callbacks = (
        [tensorboard, checkpoint]
        if board_first
        else [
            checkpoint,
            tensorboard,
        ]
    )
    for first, last in fits:
        model.fit(
            x,
            y,
            batch_size=batch_size,
            initial_epoch=first,
            epochs=last,
            verbose=0,
            callbacks=callbacks,
        )
    return read_events(tmp_path / "logs")


def snapshot_rate(step, lr0, total, count):
    """The paper's formula for the update that makes optimizer step `step`."""
    t = step - 1
    cycle = math.ceil(total / count)
    return lr0 / 2 * (math.cos(math.pi * (t % cycle) / cycle) + 1)


def test_snapshot_checkpoint_logs_every_updates_rate_and_each_snapshot(
    tmp_path,
):
    events = fit_with_snapshots(tmp_path)
    rates = events["learning_rate"]
    assert sorted(rates) == list(range(1, 13))
    for step, value in rates.items():
        assert value == pytest.approx(snapshot_rate(step, 0.1, 12, 3), abs=1e-6)
    assert events["snapshot"] == {4: 1.0, 8: 2.0, 12: 3.0}
    assert events["snapshot_file"][8] == "snapshot-02.keras"
    # Keras's own scalars are still there, in the same run.
    assert "epoch_loss" in events


@pytest.mark.parametrize(
    "mode",
    [
        # 8 batches of 8 an epoch, one update per 2 batches.
        dict(accumulation=2, batch_size=8),
        # 4 batches an epoch, 2 per execution: the callbacks see steps 2, 4.
        dict(steps_per_execution=2),
        dict(steps_per_execution=3, board_first=True),
    ],
    ids=["gradient_accumulation", "steps_per_execution", "uneven_execution"],
)
def test_events_are_at_optimizer_updates_whatever_the_batching(tmp_path, mode):
    events = fit_with_snapshots(tmp_path, **mode)
    rates = events["learning_rate"]
    assert sorted(rates) == list(range(1, 13))
    for step, value in rates.items():
        assert value == pytest.approx(snapshot_rate(step, 0.1, 12, 3), abs=1e-6)
    assert events["snapshot"] == {4: 1.0, 8: 2.0, 12: 3.0}


def test_freezeout_logs_each_groups_rate_and_the_freezes(tmp_path):
    x, y = make_data(n=64)
    model = make_model(batchnorm=False)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    freeze = keras_snapshot.FreezeOut(
        t0=0.5,
        scaling="linear",
        scale_lr=False,
        groups=2,
        log_dir=tmp_path / "logs",
        verbose=0,
    )
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=4,
        verbose=0,
        callbacks=[freeze, board(tmp_path / "logs")],
    )
    events = read_events(tmp_path / "logs")
    total = freeze.total_steps_
    for group in (0, 1):
        rates = events[f"learning_rate/group_{group}"]
        assert sorted(rates) == list(range(1, total + 1))
        for step, value in rates.items():
            factor = group_rate_factor(
                step - 1, freeze.fractions_[group], total, False
            )
            assert value == pytest.approx(0.1 * float(factor), abs=1e-6)
    ((step, groups),) = freeze.freeze_events
    assert events["frozen_groups"] == {step: 1.0}


def test_weight_averaging_logs_the_number_averaged(tmp_path):
    x, y = make_data(n=64)
    model = make_model()
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    ema = keras_snapshot.WeightAveraging(
        mode="ema", decay=0.9, log_dir=tmp_path / "logs", verbose=0
    )
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=3,
        verbose=0,
        callbacks=[ema, board(tmp_path / "logs")],
    )
    events = read_events(tmp_path / "logs")
    assert events["num_averaged"] == {4: 4.0, 8: 8.0, 12: 12.0}


def test_without_log_dir_nothing_is_logged(tmp_path):
    # A TensorBoard in the fit, but no `log_dir`: Keras's scalars only.
    x, y = make_data(n=32)
    model = make_model()
    model.compile(
        keras.optimizers.SGD(keras_snapshot.SnapshotSchedule(0.1, 4, 2)),
        "sparse_categorical_crossentropy",
    )
    checkpoint = keras_snapshot.SnapshotCheckpoint(tmp_path / "s", verbose=0)
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        verbose=0,
        callbacks=[checkpoint, board(tmp_path / "logs")],
    )
    assert not checkpoint._tensorboard.active
    assert sorted(os.listdir(tmp_path)) == ["logs", "s"]
    assert "learning_rate" not in read_events(tmp_path / "logs")
    assert "epoch_loss" in read_events(tmp_path / "logs")


@pytest.mark.parametrize("log_dir", [3, "", ["logs"]])
def test_a_log_dir_that_is_not_a_folder_is_refused(log_dir):
    with pytest.raises(TypeError, match=r"Received: log_dir="):
        keras_snapshot.SnapshotCheckpoint("s", log_dir=log_dir)


def test_events_are_kept_when_update_freq_skips_the_epoch_end(tmp_path):
    # Keras leaves TensorBoard's `record_if(step % update_freq == 0)` on
    # between batches: with 4 batches an epoch and update_freq=3, epoch-end
    # summaries of epochs 1 and 2 would be dropped (tensorboard#4975).
    events = fit_with_snapshots(tmp_path, board_first=True, update_freq=3)
    assert sorted(events["learning_rate"]) == list(range(1, 13))
    assert events["snapshot"] == {4: 1.0, 8: 2.0, 12: 3.0}


@pytest.mark.filterwarnings("ignore:SnapshotCheckpoint")
def test_a_resumed_fit_logs_each_step_once(tmp_path):
    fit_with_snapshots(tmp_path, fits=((0, 1), (1, 3)))
    points = []
    for path in glob.glob(os.path.join(tmp_path, "logs", "train", "ev*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            points += [
                event.step
                for v in event.summary.value
                if v.tag == "learning_rate"
            ]
    assert sorted(points) == list(range(1, 13))


def test_validation_scalars_are_the_averaged_models(tmp_path):
    # validate_with_average=True: Keras's own validation scalars are the
    # average's, at the epoch and at the optimizer step.
    keras.utils.set_random_seed(0)
    x, y = make_data(n=64)
    model = make_model(batchnorm=False)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    ema = keras_snapshot.WeightAveraging(
        mode="ema",
        decay=0.9,
        validate_with_average=True,
        log_dir=tmp_path / "logs",
        verbose=0,
    )
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        verbose=0,
        validation_data=(x, y),
        callbacks=[ema, board(tmp_path / "logs")],
    )
    val = read_events(tmp_path / "logs", "validation")
    averaged = ema.averaged_model()
    probabilities = keras.ops.convert_to_numpy(averaged(x))
    loss = -np.mean(np.log(probabilities[np.arange(len(y)), y]))
    assert val["epoch_loss"][1] == pytest.approx(loss, rel=1e-4)
    assert val["evaluation_loss_vs_iterations"][8] == pytest.approx(
        loss, rel=1e-4
    )
    assert read_events(tmp_path / "logs")["num_averaged"] == {4: 4.0, 8: 8.0}
    trained = keras.ops.convert_to_numpy(model(x))
    assert not np.allclose(trained, probabilities)


def test_logged_steps_thin_a_long_epoch_and_keep_its_last_step():
    steps = logged_steps(1, 10_000)
    assert len(steps) == MAX_POINTS_PER_EPOCH
    assert steps[0] == 1 and steps[-1] == 10_000
    assert np.all(np.diff(steps) > 0)
    assert list(logged_steps(3, 5)) == [3, 4, 5]
    assert len(logged_steps(5, 4)) == 0


def test_a_log_dir_that_is_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "logs").write_text("a file")
    with pytest.raises(ValueError, match=r"is a file") as info:
        fit_with_snapshots(tmp_path)
    assert len(str(info.value).splitlines()) == 1
