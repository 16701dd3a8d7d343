"""FGESchedule: the rate at every step against the paper's formula."""

import math

import keras
import numpy as np
import pytest
from helpers import make_data
from helpers import make_model
from helpers import saved_steps

import keras_snapshot
from keras_snapshot.fge import FGESchedule


def fge_rate(step, alpha1, alpha2, c, start=0, base=None):
    """Garipov et al. 2018, with the 1-based iteration i = step - start + 1."""
    if step < start:
        if base is None:
            return alpha1
        return alpha1 + (base - alpha1) / 2 * (
            1 + math.cos(math.pi * step / start)
        )
    i = step - start + 1
    t = ((i - 1) % c + 1) / c
    if t <= 0.5:
        return (1 - 2 * t) * alpha1 + 2 * t * alpha2
    return (2 - 2 * t) * alpha2 + (2 * t - 1) * alpha1


@pytest.mark.parametrize(
    "c, start, base", [(4, 0, None), (5, 7, None), (6, 10, 0.3), (2, 3, 0.2)]
)
def test_rate_matches_formula_at_every_step(c, start, base):
    schedule = FGESchedule(
        0.1,
        0.001,
        c,
        num_snapshots=3,
        start_step=start,
        initial_learning_rate=base,
    )
    steps = range(start + 4 * c)
    expected = [fge_rate(s, 0.1, 0.001, c, start, base) for s in steps]
    got = [float(keras.ops.convert_to_numpy(schedule(s))) for s in steps]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-8)


def test_snapshots_follow_the_alpha2_minima():
    schedule = FGESchedule(0.05, 0.0005, 6, num_snapshots=3, start_step=10)
    assert schedule.cycle_end_steps == [13, 19, 25]
    assert schedule.snapshot_steps == schedule.cycle_end_steps
    assert schedule.total_steps == 25
    assert schedule.cycle_length == 6
    rates = [float(keras.ops.convert_to_numpy(schedule(s))) for s in range(30)]
    for end in schedule.cycle_end_steps:
        # The last step before the snapshot has the lowest rate, alpha2.
        assert rates[end - 1] == pytest.approx(0.0005)
        assert rates[end - 1] == pytest.approx(min(rates[10:]))
    assert [schedule.cycle_of_step(s) for s in (0, 9, 10, 15, 16)] == [
        0,
        0,
        1,
        1,
        2,
    ]


def test_schedule_counts_updates_under_gradient_accumulation():
    """With k=3 the rate of batch b is the rate of update b // 3."""
    plain = FGESchedule(
        0.05, 0.01, 4, 2, start_step=8, initial_learning_rate=0.1
    )
    counted = FGESchedule(
        0.05,
        0.01,
        4,
        2,
        start_step=8,
        initial_learning_rate=0.1,
        gradient_accumulation_steps=3,
    )
    rates = [float(keras.ops.convert_to_numpy(counted(b))) for b in range(48)]
    expected = [
        float(keras.ops.convert_to_numpy(plain(b // 3))) for b in range(48)
    ]
    np.testing.assert_allclose(rates, expected, rtol=1e-6)
    assert counted.cycle_end_steps == plain.cycle_end_steps  # In updates.


def test_schedule_base_and_serialization_round_trip():
    base = keras.optimizers.schedules.CosineDecay(0.2, decay_steps=8)
    schedule = FGESchedule(
        0.05, 0.01, 4, 2, start_step=8, initial_learning_rate=base, name="fge"
    )
    config = schedule.get_config()
    assert set(config) == {
        "alpha1",
        "alpha2",
        "cycle_steps",
        "num_snapshots",
        "start_step",
        "initial_learning_rate",
        "gradient_accumulation_steps",
        "name",
    }
    for restored in (
        FGESchedule.from_config(config),
        FGESchedule(**config),
        keras.optimizers.schedules.deserialize(
            keras.optimizers.schedules.serialize(schedule)
        ),
    ):
        assert isinstance(restored, FGESchedule)
        assert restored.get_config() == config
        for s in range(20):
            assert float(keras.ops.convert_to_numpy(restored(s))) == (
                pytest.approx(float(keras.ops.convert_to_numpy(schedule(s))))
            )
    # Before start_step the base schedule rules.
    for s in range(8):
        assert float(keras.ops.convert_to_numpy(schedule(s))) == (
            pytest.approx(float(keras.ops.convert_to_numpy(base(s))))
        )


def test_from_epochs():
    schedule = FGESchedule.from_epochs(
        0.05,
        0.0005,
        cycle_epochs=2,
        steps_per_epoch=5,
        num_snapshots=3,
        start_epoch=4,
        initial_learning_rate=0.1,
    )
    assert schedule.start_step == 20 and schedule.cycle_steps == 10
    assert schedule.cycle_end_steps == [25, 35, 45]


class RateRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rates = []

    def on_train_batch_begin(self, batch, logs=None):
        optimizer = self.model.optimizer
        step = int(keras.ops.convert_to_numpy(optimizer.iterations))
        self.rates.append(
            (step, float(keras.ops.convert_to_numpy(optimizer.learning_rate)))
        )


def test_fit_uses_the_rate_and_saves_in_a_keras_file(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = make_data(n=48)
    model = make_model()
    schedule = FGESchedule(
        0.05, 0.001, 4, 3, start_step=6, initial_learning_rate=0.1
    )
    model.compile(
        keras.optimizers.SGD(schedule, momentum=0.9),
        "sparse_categorical_crossentropy",
    )
    recorder = RateRecorder()
    model.fit(x, y, batch_size=8, epochs=3, callbacks=[recorder], verbose=0)
    steps = [s for s, _ in recorder.rates]
    assert steps == list(range(18))
    np.testing.assert_allclose(
        [r for _, r in recorder.rates],
        [fge_rate(s, 0.05, 0.001, 4, 6, 0.1) for s in steps],
        rtol=1e-5,
    )
    path = str(tmp_path / "fge.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.optimizer._learning_rate.get_config() == (
        schedule.get_config()
    )


def test_snapshot_checkpoint_takes_fge_snapshots(tmp_path):
    """SnapshotCheckpoint reads FGESchedule's cycle ends (its alpha2 minima).

    64 samples, batch 8: 8 steps per epoch. Start at step 6, cycles of 4:
    snapshots after steps 8 (end of epoch 1), 12 (mid-epoch 2) and 16.
    """
    keras.utils.set_random_seed(0)
    x, y = make_data(n=64)
    model = make_model()
    schedule = FGESchedule(0.05, 0.001, 4, 3, start_step=6)
    model.compile(
        keras.optimizers.SGD(schedule, momentum=0.9),
        "sparse_categorical_crossentropy",
    )
    directory = str(tmp_path / "fge")
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[keras_snapshot.SnapshotCheckpoint(directory, verbose=0)],
    )
    manifest = keras_snapshot.read_manifest(directory)
    assert manifest["cycle_end_steps"] == [8, 12, 16]
    entries = manifest["snapshots"]
    assert [e["step"] for e in entries] == [8, 12, 16]
    assert [e["batch"] for e in entries] == [None, 4, None]
    for entry in entries:
        # Each snapshot follows a step at the cycle's minimum rate alpha2.
        assert entry["learning_rate"] == pytest.approx(0.001)
        assert fge_rate(entry["step"] - 1, 0.05, 0.001, 4, 6) == (
            pytest.approx(0.001)
        )
    # The snapshot files hold the model after exactly these steps.
    assert saved_steps(directory) == [8, 12, 16]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha1": 0}, "alpha1"),
        ({"alpha1": float("nan")}, "alpha1"),
        ({"alpha2": 0.2}, r"between 0 and `alpha1`.*alpha2=0.2"),
        ({"alpha2": -0.1}, "alpha2=-0.1"),
        ({"alpha2": "low"}, "alpha2='low'"),
        ({"cycle_steps": 1}, "at least 2.*cycle_steps=1"),
        ({"cycle_steps": 2.5}, "cycle_steps"),
        ({"num_snapshots": 0}, "num_snapshots=0"),
        ({"start_step": -1}, "start_step=-1"),
        ({"start_step": True}, "start_step=True"),
        ({"initial_learning_rate": 0.1}, "start_step=0"),
        (
            {"start_step": 5, "initial_learning_rate": -1.0},
            "initial_learning_rate=-1.0",
        ),
    ],
)
def test_bad_arguments(kwargs, match):
    arguments = {
        "alpha1": 0.1,
        "alpha2": 0.001,
        "cycle_steps": 4,
        "num_snapshots": 2,
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match="Received") as info:
        FGESchedule(**arguments)
    assert info.match(match)


def test_from_epochs_counts_a_dataset_and_accumulation_as_snapshot_schedule():
    import tensorflow as tf

    batches = tf.data.Dataset.range(100).filter(lambda i: i % 2 == 0).batch(8)
    schedule = FGESchedule.from_epochs(
        0.05,
        0.0005,
        cycle_epochs=2,
        steps_per_epoch=batches,
        num_snapshots=3,
        start_epoch=4,
        gradient_accumulation_steps=2,
    )
    # 50 examples -> 7 batches per epoch, 2 batches per update.
    assert schedule.cycle_steps == 2 * 7 // 2
    assert schedule.start_step == 4 * 7 // 2
    assert schedule.gradient_accumulation_steps == 2
    with pytest.raises(ValueError, match="endless"):
        FGESchedule.from_epochs(0.05, 0.0005, 2, batches.repeat(), 3)
