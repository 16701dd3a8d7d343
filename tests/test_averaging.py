"""Weight averaging: `average_weights` and `StochasticWeightAveraging`.

The resume test runs this file as a script in a subprocess (see `main` at
the bottom), kills it with SIGKILL and runs the same command again, as
`tests/test_resume.py` does with `tests/train_script.py`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import make_data  # noqa: E402
from helpers import make_model  # noqa: E402

from keras_snapshot.averaging import StochasticWeightAveraging  # noqa: E402
from keras_snapshot.averaging import average_weights  # noqa: E402


def numpy_weights(model):
    return [keras.ops.convert_to_numpy(v) for v in model.weights]


def trained_members(count=3, batchnorm=True):
    """`count` models of one architecture with different weights."""
    keras.utils.set_random_seed(0)
    x, y = make_data(n=64)
    members = []
    for i in range(count):
        model = make_model(batchnorm=batchnorm)
        model.compile("sgd", "sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=16, epochs=i + 1, verbose=0)
        members.append(model)
    return members, x


# average_weights ------------------------------------------------------------


def test_average_is_the_numpy_mean_of_every_variable(tmp_path):
    members, _ = trained_members()
    paths = []
    for i, member in enumerate(members):
        paths.append(str(tmp_path / f"m{i}.keras"))
        member.save(paths[-1])
    before = [numpy_weights(m) for m in members]
    with pytest.warns(UserWarning, match="recalibration_data"):
        averaged = average_weights(paths)
    expected = [np.mean(arrays, axis=0) for arrays in zip(*before)]
    assert len(averaged.weights) == len(expected) == 8  # BN stats included.
    for got, want in zip(numpy_weights(averaged), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # The members are untouched and the result is a new model.
    for member, saved in zip(members, before):
        for got, want in zip(numpy_weights(member), saved):
            np.testing.assert_array_equal(got, want)
    assert all(averaged is not m for m in members)


def test_weighted_average_and_last():
    members, _ = trained_members(batchnorm=False)
    arrays = [numpy_weights(m) for m in members]
    averaged = average_weights(members, weights=[3, 1, 0])
    for i, got in enumerate(numpy_weights(averaged)):
        want = 0.75 * arrays[0][i] + 0.25 * arrays[1][i]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    last_two = average_weights(members, last=2)
    for i, got in enumerate(numpy_weights(last_two)):
        want = (arrays[1][i] + arrays[2][i]) / 2
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_snapshot_directory(snapshot_run):
    directory, _ = snapshot_run
    members = [
        keras.saving.load_model(os.path.join(directory, f"snapshot-0{i}.keras"))
        for i in (2, 3)
    ]
    with pytest.warns(UserWarning):
        averaged = average_weights(directory, last=2)
    for got, a, b in zip(
        numpy_weights(averaged), *(numpy_weights(m) for m in members)
    ):
        np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-6, atol=1e-7)


def test_swa_with_batchnorm_recalibration_matches_numpy():
    members, x = trained_members()
    averaged = average_weights(members, recalibration_data=x, batch_size=24)
    dense, bn = averaged.layers[0], averaged.layers[1]
    kernel = np.mean(
        [keras.ops.convert_to_numpy(m.layers[0].kernel) for m in members],
        axis=0,
    )
    bias = np.mean(
        [keras.ops.convert_to_numpy(m.layers[0].bias) for m in members], axis=0
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(dense.kernel), kernel, rtol=1e-6, atol=1e-7
    )
    # BN statistics are the moments of the averaged layer's inputs, not the
    # mean of the members' statistics.
    features = x @ kernel + bias
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(bn.moving_mean),
        features.mean(0),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(bn.moving_variance),
        features.var(0),
        rtol=1e-4,
        atol=1e-6,
    )
    mean_of_stats = np.mean(
        [keras.ops.convert_to_numpy(m.layers[1].moving_mean) for m in members],
        axis=0,
    )
    assert not np.allclose(mean_of_stats, features.mean(0), atol=1e-3)


def wide_model():
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(32),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def tanh_model():
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16),
            keras.layers.Activation("tanh"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


@pytest.mark.parametrize(
    "make_other, match",
    [
        (lambda: make_model(batchnorm=True), r"has 8 variables.*has 4"),
        (wide_model, r"shape/dtype \(\(8, 32\)"),
        (tanh_model, r"layer Activation .*tanh"),
    ],
)
def test_refuses_members_of_another_architecture(make_other, match, tmp_path):
    first = make_model(batchnorm=False)
    other = make_other()
    path = str(tmp_path / "other.keras")
    other.save(path)
    with pytest.raises(ValueError, match="Cannot average") as info:
        average_weights([first, first, path])
    assert info.match(match)
    assert path in str(info.value)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"snapshots": []}, ValueError, "empty"),
        ({"snapshots": 3}, TypeError, "Received: 3"),
        ({"weights": [1, -1]}, ValueError, r"Received: weights=\[1.0, -1.0\]"),
        ({"weights": [1]}, ValueError, "one entry per member"),
        ({"weights": [0, 0]}, ValueError, "all zero"),
        ({"batch_size": 0}, ValueError, "batch_size=0"),
        ({"recalibration_steps": -2}, ValueError, "recalibration_steps=-2"),
        ({"last": 5}, ValueError, "last=5"),
    ],
)
def test_bad_inputs(kwargs, error, match, tmp_path):
    members = [make_model(batchnorm=False), make_model(batchnorm=False)]
    arguments = {"snapshots": members, **kwargs}
    with pytest.raises(error, match=match):
        average_weights(**arguments)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        average_weights(str(tmp_path / "nowhere"))


# StochasticWeightAveraging -------------------------------------------------


class WeightRecorder(keras.callbacks.Callback):
    """The float weights after every optimizer step (in a batch-end hook)."""

    def __init__(self):
        super().__init__()
        self.by_step = {}

    def on_train_batch_end(self, batch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.by_step[step] = [w.copy() for w in numpy_weights(self.model)]


def fit_with(callback, epochs=4, batchnorm=True):
    keras.utils.set_random_seed(0)
    x, y = make_data(n=48)
    model = make_model(batchnorm=batchnorm)
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        "sparse_categorical_crossentropy",
    )
    recorder = WeightRecorder()
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[recorder, callback],
    )
    return model, recorder, x


@pytest.mark.parametrize(
    "kwargs, steps",
    [
        ({"start_epoch": 2}, [12, 18, 24]),  # 6 steps per epoch.
        ({"start_step": 5, "every_steps": 7}, [5, 12, 19]),
    ],
)
def test_running_average_equals_numpy_mean(kwargs, steps, tmp_path):
    path = str(tmp_path / "swa.keras")
    swa = StochasticWeightAveraging(**kwargs, filepath=path, verbose=0)
    with pytest.warns(UserWarning, match="recalibration_data"):
        swa_set = StochasticWeightAveraging(
            **kwargs, set_weights_at_end=True, verbose=0
        )
        model, recorder, _ = fit_with(swa)
        model_set, _, _ = fit_with(swa_set)
    assert swa.num_averaged == len(steps)
    expected = [
        np.mean(a, axis=0) for a in zip(*(recorder.by_step[s] for s in steps))
    ]
    saved = keras.saving.load_model(path)
    for got in (
        numpy_weights(saved),
        numpy_weights(swa.averaged_model()),
        numpy_weights(model_set),
    ):
        for g, w in zip(got, expected):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # Without set_weights_at_end the model keeps its last weights.
    for g, w in zip(numpy_weights(model), recorder.by_step[24]):
        np.testing.assert_array_equal(g, w)


def test_recalibrated_average_matches_numpy(tmp_path):
    x, _ = make_data(n=48)
    swa = StochasticWeightAveraging(
        start_epoch=3, recalibration_data=x, set_weights_at_end=True, verbose=0
    )
    model, recorder, x = fit_with(swa)
    kernel = np.mean([recorder.by_step[s][0] for s in (18, 24)], axis=0)
    bias = np.mean([recorder.by_step[s][1] for s in (18, 24)], axis=0)
    features = x @ kernel + bias
    bn = model.layers[1]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(bn.moving_mean),
        features.mean(0),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(bn.moving_variance),
        features.var(0),
        rtol=1e-4,
        atol=1e-6,
    )


def test_nothing_averaged_warns(tmp_path):
    swa = StochasticWeightAveraging(
        start_epoch=9, filepath=str(tmp_path / "swa.keras"), verbose=0
    )
    with pytest.warns(UserWarning, match="averaged no weights"):
        fit_with(swa, epochs=1)
    assert not os.path.exists(tmp_path / "swa.keras")
    with pytest.raises(ValueError, match="end of epoch 9"):
        swa.averaged_model()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "start_epoch=None, start_step=None"),
        ({"start_epoch": 0}, "start_epoch=0"),
        ({"start_step": 3}, "start_step=3, every_steps=None"),
        ({"every_steps": 3}, "start_step=None, every_steps=3"),
        ({"start_step": 3, "every_steps": 0}, "every_steps=0"),
        ({"start_step": 0, "every_steps": 2}, "start_step=0"),
        (
            {"start_epoch": 2, "every_steps": 2, "start_step": 2},
            "start_epoch=2, every_steps=2",
        ),
        ({"start_epoch": 1, "filepath": "swa.h5"}, "filepath='swa.h5'"),
        ({"start_epoch": 1, "backup_dir": ""}, "backup_dir=''"),
        ({"start_epoch": 1, "recalibration_steps": 0}, "recalibration_steps=0"),
    ],
)
def test_callback_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match="Received") as info:
        StochasticWeightAveraging(**kwargs)
    assert info.match(match)


def test_start_in_the_past_without_a_saved_average_is_refused():
    keras.utils.set_random_seed(0)
    x, y = make_data(n=48)
    model = make_model()
    model.compile("sgd", "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)  # Step 12.
    swa = StochasticWeightAveraging(start_step=4, every_steps=4, verbose=0)
    with pytest.raises(ValueError, match=r"step\(s\) \[4, 8, 12\]"):
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=3,
            initial_epoch=2,
            verbose=0,
            callbacks=[swa],
        )
