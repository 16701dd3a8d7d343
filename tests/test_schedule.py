import math

import keras
import numpy as np
import pytest
from helpers import make_data
from helpers import make_model

from keras_snapshot import SnapshotSchedule


def reference_lr(lr0, total_steps, num_snapshots, t):
    """The formula of Huang et al. 2017 with a 0-based step."""
    c = math.ceil(total_steps / num_snapshots)
    return lr0 / 2 * (math.cos(math.pi * (t % c) / c) + 1)


@pytest.mark.parametrize(
    "total_steps,num_snapshots", [(100, 5), (103, 4), (7, 3), (10, 1), (5, 5)]
)
def test_matches_numpy_reference_at_every_step(total_steps, num_snapshots):
    schedule = SnapshotSchedule(0.2, total_steps, num_snapshots)
    steps = np.arange(total_steps + 5)
    got = keras.ops.convert_to_numpy(schedule(steps))
    want = [reference_lr(0.2, total_steps, num_snapshots, t) for t in steps]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_cycle_start_is_initial_rate_and_end_is_near_zero():
    schedule = SnapshotSchedule(0.1, total_steps=1003, num_snapshots=4)
    c = schedule.cycle_length
    assert c == 251
    for end in schedule.cycle_end_steps:
        last_step_rate = float(schedule(end - 1))
        assert last_step_rate < 0.1 * 1e-3
        if end < schedule.total_steps:
            assert float(schedule(end)) == pytest.approx(0.1)
    assert float(schedule(0)) == pytest.approx(0.1)


def test_cycle_end_steps_last_cycle_is_shorter():
    schedule = SnapshotSchedule(0.1, total_steps=103, num_snapshots=4)
    assert schedule.cycle_length == 26
    assert schedule.cycle_end_steps == [26, 52, 78, 103]
    assert schedule.cycle_of_step(0) == 1
    assert schedule.cycle_of_step(25) == 1
    assert schedule.cycle_of_step(26) == 2
    assert schedule.cycle_of_step(102) == 4


def test_from_epochs():
    schedule = SnapshotSchedule.from_epochs(0.2, 200, 782, 5)
    assert schedule.total_steps == 200 * 782
    assert schedule.cycle_end_steps[-1] == 200 * 782
    assert schedule.cycle_length == 40 * 782


def test_config_round_trip():
    schedule = SnapshotSchedule(0.05, 300, 6, name="snap")
    config = schedule.get_config()
    assert config == {
        "initial_learning_rate": 0.05,
        "total_steps": 300,
        "num_snapshots": 6,
        "gradient_accumulation_steps": None,
        "name": "snap",
    }
    again = SnapshotSchedule.from_config(config)
    assert again.get_config() == config
    restored = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(schedule)
    )
    assert isinstance(restored, SnapshotSchedule)
    assert restored.get_config() == config


def test_compiled_model_saves_and_reloads_with_schedule(tmp_path):
    x, y = make_data()
    model = make_model()
    schedule = SnapshotSchedule(0.1, 30, 3)
    model.compile(
        keras.optimizers.SGD(schedule), "sparse_categorical_crossentropy"
    )
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    restored = reloaded.optimizer._learning_rate
    assert isinstance(restored, SnapshotSchedule)
    assert restored.get_config() == schedule.get_config()
    assert int(reloaded.optimizer.iterations.numpy()) == 6
    # The reloaded optimizer continues on the same schedule.
    assert float(reloaded.optimizer.learning_rate) == pytest.approx(
        reference_lr(0.1, 30, 3, 6), rel=1e-5
    )


def test_runs_inside_compiled_function():
    """XLA-compiled by the backend, as in a train step (or on a TPU)."""
    schedule = SnapshotSchedule(0.1, 50, 5)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(schedule, jit_compile=True)

        def as_step(step):
            return tf.constant(step, tf.int64)  # The optimizer's dtype.
    elif backend == "jax":
        import jax

        compiled = jax.jit(schedule)

        def as_step(step):
            return jax.numpy.asarray(step, "int32")
    else:
        pytest.skip(f"No XLA compilation to test on the {backend} backend.")
    for step in [0, 9, 10, 49]:
        assert float(compiled(as_step(step))) == pytest.approx(
            reference_lr(0.1, 50, 5, step), rel=1e-5, abs=1e-7
        )


# Bad arguments: one table in tests/test_bad_inputs.py.


def test_cycles_that_would_repeat_the_last_snapshot_are_refused():
    # ceil(64 / 9) = 8: eight cycles use all 64 steps, a ninth would be empty.
    with pytest.raises(ValueError, match="repeat an earlier one"):
        SnapshotSchedule(0.1, 64, 9)
    assert SnapshotSchedule(0.1, 64, 8).cycle_end_steps[-1] == 64


# steps_per_epoch from a tf.data pipeline ----------------------------------


def _counting_dataset(num_examples, known_length):
    """Batches of 4 from a Python generator that counts its passes."""
    import tensorflow as tf

    passes = []

    def generate():
        passes.append(1)
        yield from range(num_examples)

    dataset = tf.data.Dataset.from_generator(
        generate, output_signature=tf.TensorSpec((), tf.int64)
    )
    if known_length:
        dataset = dataset.apply(
            tf.data.experimental.assert_cardinality(num_examples)
        )
    return dataset.batch(4), passes


def test_from_epochs_counts_the_batches_of_a_filtered_dataset():
    import tensorflow as tf

    from keras_snapshot.schedule import count_batches

    # 100 examples, 67 kept (i % 3 > 0), batches of 8 -> 9 batches.
    dataset = tf.data.Dataset.range(100).filter(lambda i: i % 3 > 0).batch(8)
    assert int(dataset.cardinality()) == tf.data.UNKNOWN_CARDINALITY
    assert count_batches(dataset) == 9 == len(list(dataset))
    schedule = SnapshotSchedule.from_epochs(0.1, 10, dataset, 3)
    assert schedule.total_steps == 90
    assert schedule.get_config() == SnapshotSchedule(0.1, 90, 3).get_config()
    # The config holds numbers only, and round-trips.
    again = SnapshotSchedule.from_config(schedule.get_config())
    assert again.get_config() == schedule.get_config()
    # With gradient accumulation the budget is in weight updates.
    accumulated = SnapshotSchedule.from_epochs(
        0.1, 10, dataset, 3, gradient_accumulation_steps=4
    )
    assert accumulated.total_steps == 90 // 4


def test_unknown_length_is_counted_in_one_pass_known_length_in_none():
    from keras_snapshot.schedule import count_batches

    unknown, passes = _counting_dataset(10, known_length=False)
    assert count_batches(unknown) == 3
    assert len(passes) == 1
    known, passes = _counting_dataset(10, known_length=True)
    assert int(known.cardinality()) == 3
    assert SnapshotSchedule.from_epochs(0.1, 2, known, 3).total_steps == 6
    assert passes == []  # Read from the cardinality: no batch was made.


def test_from_epochs_refuses_an_endless_or_empty_dataset():
    import tensorflow as tf

    endless = tf.data.Dataset.range(10).batch(4).repeat()
    with pytest.raises(
        ValueError,
        match=r"(?s)endless.*INFINITE.*`steps_per_epoch=` an int.*"
        r"model\.fit\(steps_per_epoch=\.\.\.\).*Received: ",
    ):
        SnapshotSchedule.from_epochs(0.1, 10, endless, 3)
    empty = tf.data.Dataset.range(10).filter(lambda i: i < 0).batch(4)
    with pytest.raises(ValueError, match="no batches"):
        SnapshotSchedule.from_epochs(0.1, 10, empty, 3)
    with pytest.raises(ValueError, match=r"Received: steps_per_epoch=0\."):
        SnapshotSchedule.from_epochs(0.1, 10, 0, 3)
    with pytest.raises(ValueError, match=r"steps_per_epoch=\[1, 2\]"):
        SnapshotSchedule.from_epochs(0.1, 10, [1, 2], 3)
