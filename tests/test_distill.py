"""distill: the student's loss against Hinton et al.'s formula in numpy."""

import json
import zipfile

import keras
import numpy as np
import pytest
from helpers import make_data
from helpers import make_model

from keras_snapshot.distill import MAX_TEMPERATURE
from keras_snapshot.distill import distill
from keras_snapshot.ensemble import build_ensemble


def fixed_teacher(probabilities, name=None):
    """A model that outputs `probabilities` whatever its input."""
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(
                len(probabilities),
                kernel_initializer="zeros",
                bias_initializer=keras.initializers.Constant(
                    np.log(probabilities)
                ),
            ),
            keras.layers.Softmax(),
        ],
        name=name,
    )


class EpochLogs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = []

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(dict(logs))


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


def numpy_loss(teacher_p, student_p, labels, temperature, alpha):
    """Hinton et al. 2015 with the student's logits z = log p."""
    z = np.log(np.clip(student_p, 1e-7, 1.0))
    soft = softmax(np.log(teacher_p) / temperature)
    log_p = np.log(softmax(z))
    log_p_t = np.log(softmax(z / temperature))
    kl = np.sum(soft * (np.log(soft) - log_p_t), axis=-1)
    ce = -log_p[np.arange(len(labels)), labels]
    return np.mean(alpha * ce + (1 - alpha) * temperature**2 * kl)


@pytest.mark.parametrize(
    "temperature, alpha", [(1.0, 0.0), (3.0, 0.3), (4.0, 1.0), (2.5, 0.5)]
)
def test_loss_is_the_formula_with_the_ensembles_probabilities(
    temperature, alpha
):
    keras.utils.set_random_seed(0)
    x, y = make_data(n=48)
    p1, p2 = np.array([0.7, 0.2, 0.1]), np.array([0.1, 0.3, 0.6])
    # The teacher is an ensemble of two fixed members: q = (p1 + p2) / 2.
    teacher = [fixed_teacher(p1), fixed_teacher(p2)]
    student = make_model(batchnorm=False)
    before = [w.copy() for w in student.get_weights()]
    logs = EpochLogs()
    returned = distill(
        teacher,
        student,
        (x, y),
        temperature=temperature,
        alpha=alpha,
        epochs=1,
        batch_size=16,
        optimizer=keras.optimizers.SGD(learning_rate=0.0),
        callbacks=[logs],
        verbose=0,
    )
    assert returned is student
    for a, b in zip(before, student.get_weights()):
        np.testing.assert_array_equal(a, b)  # Learning rate 0.
    student_p = keras.ops.convert_to_numpy(student(x))
    q = np.tile((p1 + p2) / 2, (len(x), 1))
    expected = numpy_loss(q, student_p, y, temperature, alpha)
    assert logs.logs[0]["loss"] == pytest.approx(expected, rel=1e-5)
    accuracy = np.mean(student_p.argmax(-1) == y)
    assert logs.logs[0]["accuracy"] == pytest.approx(accuracy)
    # Had the teacher been the first member alone, the loss would differ.
    if alpha < 1:
        alone = numpy_loss(
            np.tile(p1, (len(x), 1)), student_p, y, temperature, alpha
        )
        assert abs(alone - expected) > 1e-3


def test_student_still_learns_at_the_highest_temperature():
    """At MAX_TEMPERATURE the float32 gradient still matches the logits.

    There the loss is the high-temperature limit (matching logits, Hinton
    et al. 2015), so the student learns the teacher's probabilities.
    """
    keras.utils.set_random_seed(0)
    x, y = make_data(n=48)
    p = np.array([0.7, 0.2, 0.1])
    student = make_model(batchnorm=False)
    distill(
        [fixed_teacher(p)],
        student,
        x,
        temperature=MAX_TEMPERATURE,
        alpha=0.0,
        epochs=30,
        batch_size=16,
        optimizer=keras.optimizers.Adam(learning_rate=0.02),
        verbose=0,
    )
    assert all(np.all(np.isfinite(w)) for w in student.get_weights())
    student_p = keras.ops.convert_to_numpy(student(x))
    np.testing.assert_allclose(student_p.mean(axis=0), p, atol=0.05)


def test_student_learns_the_teacher_and_saves_without_keras_snapshot(
    tmp_path,
):
    keras.utils.set_random_seed(0)
    x, _ = make_data(n=64)
    p = np.array([0.85, 0.1, 0.05])
    logs = EpochLogs()
    student = distill(
        fixed_teacher(p),
        data=x,
        temperature=1.0,
        alpha=0.0,
        epochs=40,
        batch_size=16,
        optimizer=keras.optimizers.Adam(0.03),
        callbacks=[logs],
        verbose=0,
    )
    uniform_loss = np.sum(p * np.log(p * 3))  # KL(p || uniform), T = 1.
    assert logs.logs[-1]["loss"] < uniform_loss / 10
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(student(x)).mean(0), p, atol=0.05
    )
    path = str(tmp_path / "student.keras")
    student.save(path)
    with zipfile.ZipFile(path) as archive:
        config = archive.read("config.json").decode()
    modules = {
        value
        for key, value in _items(json.loads(config))
        if key == "module" and isinstance(value, str)
    }
    assert modules and all(m.startswith("keras") for m in modules), modules
    assert "keras_snapshot" not in config and "distill" not in config
    keras.saving.load_model(path)


def _items(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _items(value)
    elif isinstance(node, list):
        for value in node:
            yield from _items(value)


def layer_types(model):
    return [
        type(layer)
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
    ]


def test_default_student_is_a_fresh_copy_of_the_first_member(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = make_data(n=32)
    members = []
    for i in range(2):
        model = make_model(batchnorm=False, name=f"member_{i}")
        model.compile("sgd", "sparse_categorical_crossentropy")
        model.fit(x, y, epochs=1, verbose=0)
        path = str(tmp_path / f"m{i}.keras")
        model.save(path)
        members.append(path)
    ensemble = build_ensemble(members)
    first = ensemble.get_layer("snapshot_1")
    for teacher in (ensemble, members):
        student = distill(teacher, data=(x, y), epochs=1, verbose=0)
        assert layer_types(student) == layer_types(first)
        assert student.get_layer(index=0) is not first.get_layer(index=0)
        # Re-initialized, not the member's weights.
        assert not np.allclose(student.get_weights()[0], first.get_weights()[0])


def test_validation_and_logit_outputs():
    keras.utils.set_random_seed(0)
    x, y = make_data(n=48)
    teacher = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(3)]  # Logits.
    )
    student = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    logs = EpochLogs()
    distill(
        teacher,
        student,
        (x[:32], y[:32]),
        validation_data=(x[32:], y[32:]),
        teacher_from_logits=True,
        student_from_logits=True,
        epochs=1,
        optimizer=keras.optimizers.SGD(0.0),
        callbacks=[logs],
        verbose=0,
    )
    z_t = keras.ops.convert_to_numpy(teacher(x[32:]))
    z_s = keras.ops.convert_to_numpy(student(x[32:]))
    temperature, alpha = 4.0, 0.1  # The defaults.
    soft = softmax(z_t / temperature)
    kl = np.sum(
        soft * (np.log(soft) - np.log(softmax(z_s / temperature))), axis=-1
    )
    ce = -np.log(softmax(z_s))[np.arange(16), y[32:]]
    expected = np.mean(alpha * ce + (1 - alpha) * temperature**2 * kl)
    assert logs.logs[0]["val_loss"] == pytest.approx(expected, rel=1e-4)


def subclassed_student():
    class Student(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3, activation="softmax")

        def call(self, x):
            return self.dense(x)

    return Student()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"data": None}, ValueError, "Received: data=None"),
        ({"temperature": 0}, ValueError, "temperature=0"),
        # Above 1000 the float32 soft loss is rounding noise: 1e20 gave NaN
        # weights in silence, 1e200 a bare OverflowError.
        ({"temperature": 1000.5}, ValueError, r"\(0.0, 1000.0\]"),
        ({"temperature": 1e20}, ValueError, r"temperature=1e\+20"),
        ({"temperature": 1e200}, ValueError, r"temperature=1e\+200"),
        ({"temperature": float("inf")}, ValueError, "temperature=inf"),
        ({"temperature": True}, ValueError, "temperature=True"),
        ({"alpha": 1.5}, ValueError, "alpha=1.5"),
        ({"alpha": "high"}, ValueError, "alpha='high'"),
        ({"epochs": 0}, ValueError, "epochs=0"),
        ({"batch_size": -1}, ValueError, "batch_size=-1"),
        ({"data": "x_train"}, ValueError, "Received: str"),
        ({"data": (1, 2, 3)}, ValueError, "tuple of 3 items"),
        ({"data": "noy"}, ValueError, "alpha=0.1, data without labels"),
        ({"data": "short_y"}, ValueError, "48 inputs but 40 labels"),
        ({"data": "big_y"}, ValueError, "labels from 1 to 7"),
        ({"data": "float_y"}, ValueError, "dtype float"),
        ({"student": "model"}, TypeError, "student='model'"),
        ({"student": "wide"}, ValueError, "outputs 5 classes"),
        ({"student": "subclassed"}, ValueError, "type Student"),
        ({"teacher": "logits"}, ValueError, "teacher_from_logits=True"),
        ({"teacher": 7}, TypeError, "Received: 7"),
        (
            {"validation_data": "noy"},
            ValueError,
            "validation inputs without labels",
        ),
    ],
)
def test_bad_inputs(kwargs, error, match):
    x, y = make_data(n=48)
    data = {
        "noy": x,
        "short_y": (x, y[:40]),
        "big_y": (x, y * 3 + 1),
        "float_y": (x, y.astype("float32")),
    }
    students = {
        "wide": keras.Sequential([keras.Input((8,)), keras.layers.Dense(5)]),
        "subclassed": subclassed_student(),
    }
    teachers = {
        "logits": keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    }
    trained = EpochLogs()
    arguments = {
        "teacher": fixed_teacher(np.array([0.5, 0.3, 0.2])),
        "data": (x, y),
        "epochs": 1,
        "verbose": 0,
        "callbacks": [trained],
        **kwargs,
    }
    if isinstance(arguments["data"], str) and arguments["data"] in data:
        arguments["data"] = data[arguments["data"]]
    if arguments.get("validation_data") == "noy":
        arguments["validation_data"] = x
    if isinstance(arguments.get("student"), str):
        arguments["student"] = students.get(
            arguments["student"], arguments["student"]
        )
    if isinstance(arguments["teacher"], str):
        arguments["teacher"] = teachers[arguments["teacher"]]
    with pytest.raises(error, match=match):
        distill(**arguments)
    assert trained.logs == []  # Refused before any training.
