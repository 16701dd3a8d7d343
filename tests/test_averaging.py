"""`average_weights` (uniform, greedy soup) and SWA with `WeightAveraging`.

The kill-and-resume test of the running averages is in `tests/test_resume.py`;
their numpy references are in `tests/test_weight_averaging.py`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import make_data  # noqa: E402
from helpers import make_model  # noqa: E402

from keras_snapshot.averaging import WeightAveraging  # noqa: E402
from keras_snapshot.averaging import average_weights  # noqa: E402
from keras_snapshot.batchnorm import recalibrate_batchnorm  # noqa: E402


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


@pytest.mark.parametrize(
    "kwargs, coefficients",
    [({}, [1, 1, 1]), ({"weights": [3, 1, 0]}, [3, 1, 0]), ({"last": 2}, None)],
    ids=["uniform", "weights", "last"],
)
def test_average_is_the_numpy_mean_of_every_variable(
    kwargs, coefficients, tmp_path
):
    members, _ = trained_members()
    paths = []
    for i, member in enumerate(members):
        paths.append(str(tmp_path / f"m{i}.keras"))
        member.save(paths[-1])
    before = [numpy_weights(m) for m in members]
    with pytest.warns(UserWarning, match="recalibration_data"):
        averaged = average_weights(paths, **kwargs)
    used = before if coefficients else before[1:]  # `last=2`: the last two.
    expected = [
        np.average(np.array(arrays, np.float64), axis=0, weights=coefficients)
        for arrays in zip(*used)
    ]
    assert len(averaged.weights) == len(expected) == 8  # BN stats included.
    for got, want in zip(numpy_weights(averaged), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # The members are untouched and the result is a new model.
    for member, saved in zip(members, before):
        for got, want in zip(numpy_weights(member), saved):
            np.testing.assert_array_equal(got, want)
    assert all(averaged is not m for m in members)


def test_snapshot_directory(snapshot_run):
    directory, _ = snapshot_run
    paths = [os.path.join(directory, f"snapshot-0{i}.keras") for i in (2, 3)]
    with pytest.warns(UserWarning):
        from_directory = average_weights(directory, last=2)
        from_paths = average_weights(paths)
    for got, want in zip(
        numpy_weights(from_directory), numpy_weights(from_paths)
    ):
        np.testing.assert_array_equal(got, want)


def test_recalibration_data_recalibrates_the_average():
    """`recalibration_data` is `recalibrate_batchnorm` of the average
    (checked against numpy in tests/test_batchnorm.py)."""
    members, x = trained_members()
    averaged = average_weights(members, recalibration_data=x, batch_size=24)
    with pytest.warns(UserWarning, match="recalibration_data"):
        want = average_weights(members)
    mean_of_stats = numpy_weights(want)[4]
    recalibrate_batchnorm(want, x, 24)
    for got, w in zip(numpy_weights(averaged), numpy_weights(want)):
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7)
    moving_mean = keras.ops.convert_to_numpy(averaged.layers[1].moving_mean)
    assert not np.allclose(moving_mean, mean_of_stats, atol=1e-3)


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


VALIDATION = (np.zeros((4, 8), "float32"), np.zeros(4, "int32"))
GREEDY = {"method": "greedy", "validation_data": VALIDATION}


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
        ({"method": "mean"}, ValueError, "Received: method='mean'"),
        ({"validation_data": VALIDATION}, ValueError, "method='uniform', v"),
        ({**GREEDY, "weights": [1, 2]}, ValueError, r"weights=\[1, 2\]"),
        ({"method": "greedy"}, ValueError, "validation_data of type None"),
        ({**GREEDY, "metric": "accuracy"}, ValueError, "metric='accuracy'"),
    ],
)
def test_bad_inputs(kwargs, error, match, tmp_path):
    members = [make_model(batchnorm=False), make_model(batchnorm=False)]
    arguments = {"snapshots": members, **kwargs}
    with pytest.raises(error, match=match) as info:
        average_weights(**arguments)
    assert len(str(info.value).splitlines()) == 1


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        average_weights(str(tmp_path / "nowhere"))


# WeightAveraging(mode="swa", average_batchnorm=True) ------------------------


def swa(**kwargs):
    """SWA as the removed `StochasticWeightAveraging` did it."""
    return WeightAveraging(mode="swa", average_batchnorm=True, **kwargs)


def fit_with(callback, epochs=4, batchnorm=True):
    keras.utils.set_random_seed(0)
    x, y = make_data(n=48)
    model = make_model(batchnorm=batchnorm)
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
        callbacks=[callback],
    )
    return model


@pytest.mark.parametrize(
    "kwargs, count",
    [
        ({"start_epoch": 2}, 3),  # 6 steps per epoch: 12, 18, 24.
        ({"start_step": 5, "every_steps": 7}, 3),  # 5, 12, 19.
    ],
)
def test_the_file_the_model_and_averaged_model_hold_the_average(
    kwargs, count, tmp_path
):
    """The numbers are checked against numpy in test_weight_averaging.py;
    here every way out holds them."""
    path = str(tmp_path / "swa.keras")
    averaging = swa(**kwargs, filepath=path, verbose=0)
    with pytest.warns(UserWarning, match="recalibration_data"):
        model_set = fit_with(swa(**kwargs, set_weights_at_end=True, verbose=0))
    model = fit_with(averaging)
    assert averaging.num_averaged == count
    trained = numpy_weights(model)
    expected = averaging.averaged_weights()
    for got in (
        numpy_weights(keras.saving.load_model(path)),
        numpy_weights(averaging.averaged_model()),
        numpy_weights(model_set),
    ):
        for g, w in zip(got, expected):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    # Without set_weights_at_end the model keeps its last weights.
    assert not np.allclose(trained[0], expected[0])


def test_nothing_averaged_warns(tmp_path):
    averaging = swa(
        start_epoch=9, filepath=str(tmp_path / "swa.keras"), verbose=0
    )
    with pytest.warns(UserWarning, match="averaged no weights"):
        fit_with(averaging, epochs=1)
    assert not os.path.exists(tmp_path / "swa.keras")
    with pytest.raises(ValueError, match="end of epoch 9"):
        averaging.averaged_model()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"start_step": 3}, "start_step=3, every_steps=None"),
        ({"every_steps": 3}, "start_step=None, every_steps=3"),
        ({"start_step": 3, "every_steps": 0}, "every_steps=0"),
        ({"start_step": 0, "every_steps": 2}, "start_step=0"),
        (
            {"start_epoch": 2, "every_steps": 2, "start_step": 2},
            "start_epoch=2, every_steps=2",
        ),
        ({"start_epoch": 1, "filepath": "swa.h5"}, "filepath='swa.h5'"),
        ({"start_epoch": 1, "recalibration_steps": 0}, "recalibration_steps=0"),
    ],
)
def test_callback_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match="Received") as info:
        swa(**kwargs)
    assert info.match(match)


def test_start_in_the_past_without_a_saved_average_is_refused():
    keras.utils.set_random_seed(0)
    x, y = make_data(n=48)
    model = make_model()
    model.compile("sgd", "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)  # Step 12.
    averaging = swa(start_step=4, every_steps=4, verbose=0)
    with pytest.raises(ValueError, match=r"step\(s\) \[4, 8, 12\]"):
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=3,
            initial_epoch=2,
            verbose=0,
            callbacks=[averaging],
        )
