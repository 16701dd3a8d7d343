"""Step-exact under every Keras training mode (`keras_snapshot._steps`).

A step is an optimizer update. Each test trains a tiny model for real in a
mode that makes batches and updates differ (gradient accumulation, mixed
precision loss scaling, `steps_per_execution`) and checks the property
that matters: the manifest's step is the step the file holds, the weights
are those of that update, the recorded rate is the rate of that update.
"""

import math
import os

import keras
import numpy as np
import pytest
from helpers import make_data
from helpers import make_model
from helpers import saved_steps

import keras_snapshot
from keras_snapshot import _steps
from keras_snapshot._keras_compat import optimizer_iterations


def snapshot_rate(lr0, step, cycle):
    """The rate of the update that made `step` (numpy reference)."""
    t = (step - 1) % cycle
    return lr0 / 2 * (math.cos(math.pi * t / cycle) + 1)


class UpdateRecorder(keras.callbacks.Callback):
    """Weights and the next update's rate after every batch, by update."""

    def __init__(self):
        super().__init__()
        self.weights, self.rates, self.batches = {}, {}, 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        optimizer = self.model.optimizer
        # Updates applied (Keras 3.8's LossScaleOptimizer counts inside).
        step = optimizer_iterations(optimizer)
        self.weights[step] = [w.copy() for w in self.model.get_weights()]
        rate = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        self.rates.setdefault(step, set()).add(round(rate, 7))


class WeightsAtTrainBegin(keras.callbacks.Callback):
    """Checks that a refused `fit` changed no weight."""

    def on_train_begin(self, logs=None):
        self.before = self.model.get_weights()

    def assert_unchanged(self):
        for b, w in zip(self.before, self.model.get_weights()):
            np.testing.assert_array_equal(b, w)


def manifest(directory):
    return keras_snapshot.read_manifest(directory)["snapshots"]


def train(optimizer, callbacks, samples=64, epochs=4, mixed=False, **compile):
    """Fits the tiny model (no BatchNorm) on `samples` examples, batch 8,
    unshuffled. `mixed`: `mixed_float16` with a loss scale of 2**24, which
    overflows float16 gradients, so the first updates are skipped (and the
    scale halved) until it fits. Returns the model and an `UpdateRecorder`
    (which runs first)."""
    keras.utils.set_random_seed(0)
    x, y = make_data(n=samples)
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
        optimizer = keras.optimizers.LossScaleOptimizer(
            optimizer, initial_scale=2.0**24
        )
    try:
        model = make_model(batchnorm=False)
        model.compile(optimizer, "sparse_categorical_crossentropy", **compile)
        recorder = UpdateRecorder()
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=[recorder, *callbacks],
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return model, recorder


def snapshots_into(directory, **kwargs):
    return keras_snapshot.SnapshotCheckpoint(directory, verbose=0, **kwargs)


def assert_files_hold(directory, recorder, steps):
    """Each snapshot file holds the weights of its manifest step."""
    for entry in manifest(directory):
        path = os.path.join(directory, entry["file"])
        got = keras.saving.load_model(path).get_weights()
        for g, w in zip(got, recorder.weights[entry["step"]]):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    assert [e["step"] for e in manifest(directory)] == steps
    assert saved_steps(directory) == steps


# 1. Gradient accumulation ------------------------------------------------


def test_gradient_accumulation_counts_updates(tmp_path, recwarn):
    """64 samples, batch 8, k=2: 8 batches and 4 updates per epoch; 4
    epochs = 16 updates, 4 cycles of 4 updates."""
    schedule = keras_snapshot.SnapshotSchedule(
        0.05, total_steps=16, num_snapshots=4, gradient_accumulation_steps=2
    )
    directory = str(tmp_path / "snaps")
    _, recorder = train(
        keras.optimizers.SGD(schedule, gradient_accumulation_steps=2),
        [snapshots_into(directory)],
    )
    assert recorder.batches == 32
    assert_files_hold(directory, recorder, [4, 8, 12, 16])
    # The schedule counts updates: one rate per update, the formula's.
    for step, rates in recorder.rates.items():
        assert rates == {round(schedule_rate(schedule, step), 7)}
    for entry in manifest(directory):
        assert entry["learning_rate"] == pytest.approx(
            snapshot_rate(0.05, entry["step"], 4), rel=1e-5
        )
    assert not [w for w in recwarn if "SnapshotCheckpoint" in str(w.message)]


def schedule_rate(schedule, update):
    """The rate the schedule gives the update after `update` (numpy)."""
    cycle = schedule.cycle_length
    lr0 = schedule.initial_learning_rate
    return lr0 / 2 * (math.cos(math.pi * (update % cycle) / cycle) + 1)


@pytest.mark.parametrize(
    "schedule, match",
    [
        (
            keras_snapshot.SnapshotSchedule(0.05, 16, 4),
            "counts one update per 1 batch",
        ),
        (
            keras.optimizers.schedules.CosineDecayRestarts(0.05, 4),
            "calls the CosineDecayRestarts schedule with the batch count",
        ),
    ],
)
def test_accumulation_with_a_batch_counting_schedule_is_refused(
    schedule, match, tmp_path
):
    weights = WeightsAtTrainBegin()
    callback = snapshots_into(str(tmp_path / "s"), num_snapshots=4)
    with pytest.raises(ValueError, match=match):
        train(
            keras.optimizers.SGD(schedule, gradient_accumulation_steps=2),
            [weights, callback],
        )
    weights.assert_unchanged()  # Refused before the first step.


def test_schedule_counts_updates_per_accumulation():
    schedule = keras_snapshot.SnapshotSchedule(
        1.0, total_steps=8, num_snapshots=2, gradient_accumulation_steps=3
    )
    rates = [float(schedule(b)) for b in range(24)]
    expected = [schedule_rate(schedule, b // 3) for b in range(24)]
    np.testing.assert_allclose(rates, expected, rtol=1e-6, atol=1e-7)
    config = schedule.get_config()
    assert config["gradient_accumulation_steps"] == 3
    assert keras_snapshot.SnapshotSchedule.from_config(config).get_config() == (
        config
    )
    with pytest.raises(ValueError, match="Received: gradient_accumulation"):
        keras_snapshot.SnapshotSchedule(
            1.0, 8, 2, gradient_accumulation_steps=1
        )
    from_epochs = keras_snapshot.SnapshotSchedule.from_epochs(
        1.0,
        epochs=4,
        steps_per_epoch=8,
        num_snapshots=2,
        gradient_accumulation_steps=2,
    )
    assert from_epochs.total_steps == 16


# 2. Mixed precision: skipped updates are not steps ------------------------


def fit_mixed(directory, epochs):
    """8 batches an epoch; cycle ends at updates 8, 16 and 24."""
    schedule = keras_snapshot.SnapshotSchedule(0.05, 24, 3)
    _, recorder = train(
        keras.optimizers.SGD(schedule),
        [snapshots_into(directory)],
        epochs=epochs,
        mixed=True,
    )
    return recorder


def test_loss_scaling_skips_are_not_steps(tmp_path):
    """Once, the files held steps 1/8/15 while the manifest said 8/16/24."""
    directory = str(tmp_path / "snaps")
    with pytest.warns(UserWarning, match="past the schedule's total_steps"):
        recorder = fit_mixed(directory, epochs=5)  # 40 batches.
    assert recorder.batches - max(recorder.weights) > 0  # Skipped updates.
    assert_files_hold(directory, recorder, [8, 16, 24])
    assert all(e["planned_step"] is None for e in manifest(directory))


def test_a_run_short_by_skipped_updates_ends_with_a_marked_snapshot(tmp_path):
    """32 batches, 9 skipped: training ends at update 23 of 24. The last
    snapshot is taken at 23 and says it stands for the cycle end 24."""
    directory = str(tmp_path / "snaps")
    with pytest.warns(UserWarning) as warned:
        recorder = fit_mixed(directory, epochs=4)
    messages = " ".join(str(w.message) for w in warned)
    assert "recorded with planned_step=24" in messages
    assert "snapshots in" not in messages  # No "2 of 3 snapshots" warning.
    last = max(recorder.weights)
    assert last < 24 and 24 - last <= recorder.batches - last
    assert_files_hold(directory, recorder, [8, 16, last])
    assert [e["planned_step"] for e in manifest(directory)] == [None, None, 24]
    assert len(keras_snapshot.snapshot_paths(directory)) == 3


# 3. steps_per_execution ----------------------------------------------------


def fit_spe(directory, samples, epochs, total, snapshots, spe):
    schedule = keras_snapshot.SnapshotSchedule(0.05, total, snapshots)
    return train(
        keras.optimizers.SGD(schedule, momentum=0.9),
        [snapshots_into(directory)],
        samples=samples,
        epochs=epochs,
        steps_per_execution=spe,
    )


def test_steps_per_execution_takes_every_reachable_cycle_end(tmp_path):
    """6 batches an epoch, N=4: hooks at batches 0, 4 and 6 of each epoch,
    so the cycle ends 6, 12, 18, 24 (epoch ends) and 4, 10, 16, 22 are
    seen; each snapshot holds the weights of a run without N."""
    _, reference = fit_spe(str(tmp_path / "ref"), 48, 4, 24, 4, 1)
    directory = str(tmp_path / "spe")
    fit_spe(directory, 48, 4, 24, 4, 4)
    assert_files_hold(directory, reference, [6, 12, 18, 24])


def test_steps_per_execution_refuses_unreachable_cycle_ends(tmp_path):
    """5 batches an epoch, N=2: hooks at batches 0, 2, 4 and 5 of each
    epoch (steps 0, 2, 4, 5, 7, 9, 10, ...), so the cycle ends 8 and 16
    of 4, 8, 12, 16, 20 can never be seen: refused before the first step
    (once, snapshots 2 and 4 were lost with a warning at the end)."""
    with pytest.raises(ValueError, match=r"steps \[8, 16\] cannot be taken"):
        fit_spe(str(tmp_path / "spe"), 40, 4, 20, 5, 2)


@pytest.mark.parametrize(
    "spe, k, length, due, start, expected",
    [
        (1, 1, 10, [3, 7], 0, []),
        (4, 1, 6, [4, 6, 10, 12, 14], 0, [14]),
        (2, 1, 5, [4, 8, 12, 16, 20], 0, [8, 16]),
        (2, 1, 5, [7, 9, 11], 5, [11]),  # Resumed at 5: hooks 5, 7, 9, 10
        (4, 2, 8, [2, 3, 4], 0, [3]),  # Hooks at batches 0, 4, 8, ...
        (3, 1, None, [4], 0, []),  # Unknown epoch length: checked live.
        (2, 1, 5, [8, 40], 0, [8]),  # 40 is past this fit's 20 steps.
    ],
)
def test_unreachable_steps_rule(spe, k, length, due, start, expected):
    tracker = _steps.StepTracker(keras.callbacks.Callback())
    tracker.steps_per_execution, tracker.accumulation = spe, k
    tracker.epoch_steps = length
    assert tracker.unreachable(start, due, epochs_left=4) == expected


# WeightAveraging(mode="swa", every_steps=...) in the same modes -----------


def fit_swa(swa, samples=64, spe=1, accumulation=None, mixed=False):
    optimizer = keras.optimizers.SGD(
        0.05, momentum=0.9, gradient_accumulation_steps=accumulation
    )
    _, recorder = train(
        optimizer, [swa], samples, mixed=mixed, steps_per_execution=spe
    )
    return recorder


def assert_average_of(swa, recorder, steps):
    assert swa.num_averaged == len(steps)
    expected = [
        np.mean(a, axis=0) for a in zip(*(recorder.weights[s] for s in steps))
    ]
    for got, want in zip(swa.averaged_model().get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_swa_averages_updates_under_gradient_accumulation():
    """8 batches an epoch, k=2: 16 updates; every 3 updates from 3."""
    swa = keras_snapshot.WeightAveraging(
        mode="swa",
        average_batchnorm=True,
        start_step=3,
        every_steps=3,
        verbose=0,
    )
    recorder = fit_swa(swa, accumulation=2)
    assert_average_of(swa, recorder, [3, 6, 9, 12, 15])


def test_swa_counts_only_applied_updates_under_loss_scaling():
    swa = keras_snapshot.WeightAveraging(
        mode="swa",
        average_batchnorm=True,
        start_step=4,
        every_steps=4,
        verbose=0,
    )
    recorder = fit_swa(swa, mixed=True)
    last = max(recorder.weights)
    assert last < recorder.batches  # Updates were skipped.
    assert_average_of(swa, recorder, list(range(4, last + 1, 4)))


def test_swa_steps_per_execution_takes_every_due_average():
    """6 batches an epoch, N=2: hooks at every even step."""
    reference = fit_swa(
        keras_snapshot.WeightAveraging(
            mode="swa",
            average_batchnorm=True,
            start_step=2,
            every_steps=2,
            verbose=0,
        ),
        samples=48,
    )
    swa = keras_snapshot.WeightAveraging(
        mode="swa",
        average_batchnorm=True,
        start_step=2,
        every_steps=2,
        verbose=0,
    )
    fit_swa(swa, samples=48, spe=2)
    assert_average_of(swa, reference, list(range(2, 25, 2)))


def test_swa_steps_per_execution_refuses_unreachable_averages():
    """5 batches an epoch, N=2: steps 6 and 8 fall between hooks (once,
    only 6 of the 10 due averages were taken, without a word)."""
    swa = keras_snapshot.WeightAveraging(
        mode="swa",
        average_batchnorm=True,
        start_step=2,
        every_steps=2,
        verbose=0,
    )
    with pytest.raises(ValueError, match=r"at steps \[6, 8, 16, 18\]"):
        fit_swa(swa, samples=40, spe=2)


@pytest.mark.parametrize(
    "mode",
    [
        dict(accumulation=2),
        dict(mixed=True),
        dict(samples=48, spe=2),
    ],
    ids=["gradient_accumulation", "loss_scaling", "steps_per_execution"],
)
def test_averaged_checkpoint_saves_the_epochs_average(tmp_path, mode):
    """`AveragedModelCheckpoint` in each mode: the last epoch's file holds
    the average of every due update, as the callback has it at the end."""
    swa = keras_snapshot.WeightAveraging(
        mode="swa",
        average_batchnorm=True,
        start_step=2,
        every_steps=2,
        verbose=0,
    )
    checkpoint = keras_snapshot.AveragedModelCheckpoint(
        swa, str(tmp_path / "avg-{epoch}.keras")
    )
    optimizer = keras.optimizers.SGD(
        0.05, momentum=0.9, gradient_accumulation_steps=mode.get("accumulation")
    )
    train(
        optimizer,
        [checkpoint, swa],
        mode.get("samples", 64),
        mixed=mode.get("mixed", False),
        steps_per_execution=mode.get("spe", 1),
    )
    saved = keras.saving.load_model(tmp_path / "avg-4.keras")
    assert swa.num_averaged > 0
    for got, want in zip(saved.get_weights(), swa.averaged_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert sorted(os.listdir(tmp_path)) == [
        f"avg-{e}.keras" for e in (1, 2, 3, 4)
    ]


# 8. The optimizer's EMA (`use_ema=True`) ------------------------------------


def fit_ema(directory, ema_weights):
    schedule = keras_snapshot.SnapshotSchedule(0.05, 16, 2)
    return train(
        keras.optimizers.SGD(schedule, use_ema=True, ema_momentum=0.8),
        [snapshots_into(directory, ema_weights=ema_weights)],
        epochs=2,
    )


def numpy_ema(recorder, step, momentum=0.8):
    """Keras's EMA: the first update's weights, then m * ema + (1-m) * w."""
    average = recorder.weights[1]
    for s in range(2, step + 1):
        average = [
            momentum * a + (1 - momentum) * w
            for a, w in zip(average, recorder.weights[s])
        ]
    return average


@pytest.mark.parametrize("ema_weights", [False, True])
def test_snapshots_hold_trained_or_ema_weights(tmp_path, ema_weights):
    directory = str(tmp_path / "snaps")
    model, recorder = fit_ema(directory, ema_weights)
    for entry in manifest(directory):
        path = os.path.join(directory, entry["file"])
        got = keras.saving.load_model(path).get_weights()
        step = entry["step"]
        want = (
            numpy_ema(recorder, step)
            if ema_weights
            else (recorder.weights[step])
        )
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # Either way, training went on from the trained weights, and `fit`
    # ends with the EMA in the model (Keras's own behaviour).
    for g, w in zip(model.get_weights(), numpy_ema(recorder, 16)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_ema_weights_without_an_ema_is_refused(tmp_path):
    schedule = keras_snapshot.SnapshotSchedule(0.05, 16, 2)
    callback = snapshots_into(str(tmp_path / "s"), ema_weights=True)
    with pytest.raises(ValueError, match="Build it with `use_ema=True`"):
        train(keras.optimizers.SGD(schedule), [callback], epochs=2)


# jit_compile and EarlyStopping ---------------------------------------------


def test_jit_compiled_training_snapshots_at_exact_steps(tmp_path):
    """XLA-compiled train step: cycle ends mid-epoch (6 batches an epoch,
    cycles of 8 updates) are taken at their update."""
    directory = str(tmp_path / "snaps")
    _, recorder = train(
        keras.optimizers.SGD(keras_snapshot.SnapshotSchedule(0.05, 24, 3)),
        [snapshots_into(directory)],
        samples=48,
        jit_compile=True,
    )
    assert_files_hold(directory, recorder, [8, 16, 24])


def test_early_stopping_keeps_what_was_taken_and_says_so(tmp_path):
    """A fit stopped by EarlyStopping ends with the snapshots it reached
    and a warning; no last snapshot stands in for a cycle end it never
    reached (that is only for updates skipped by loss scaling)."""
    directory = str(tmp_path / "snaps")
    stop = keras.callbacks.EarlyStopping(
        monitor="loss",
        patience=0,
        min_delta=10.0,  # Stops after epoch 2.
    )
    with pytest.warns(UserWarning, match="ended at step 12 with 2 of 4"):
        train(
            keras.optimizers.SGD(keras_snapshot.SnapshotSchedule(0.05, 24, 4)),
            [stop, snapshots_into(directory)],
            samples=48,
        )
    assert [e["step"] for e in manifest(directory)] == [6, 12]
    assert [e["planned_step"] for e in manifest(directory)] == [None, None]


def test_the_device_is_read_near_due_steps_only(tmp_path, monkeypatch):
    """20 epochs of 8 batches, cycle ends at 54, 108 (mid-epoch) and 160:
    the step is read at each epoch's begin and end and at the two batch
    hooks that reach a mid-epoch cycle end, not at each of the 160 batches
    (Keras keeps dispatching asynchronously)."""
    reads = []
    original = _steps.optimizer_updates

    def counting(model):
        reads.append(1)
        return original(model)

    monkeypatch.setattr(_steps, "optimizer_updates", counting)
    directory = str(tmp_path / "snaps")
    schedule = keras_snapshot.SnapshotSchedule(0.05, 160, 3)
    train(
        keras.optimizers.SGD(schedule), [snapshots_into(directory)], epochs=20
    )
    assert [e["step"] for e in manifest(directory)] == [54, 108, 160]
    assert [e["batch"] for e in manifest(directory)] == [6, 4, None]
    # Epoch begins and ends, train end, and one read per mid-epoch end.
    assert len(reads) == 2 * 20 + 1 + 2
