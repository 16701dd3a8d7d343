"""Bad inputs to every public entry point, table by table.

Each row gives the call, the exception type and fragments that the message
must contain: the value received, or the argument and a hint how to fix it.
"""

import json
import math
import os
import shutil

import keras
import numpy as np
import pytest
from helpers import make_data
from helpers import make_model

from keras_snapshot import SnapshotCheckpoint
from keras_snapshot import SnapshotSchedule
from keras_snapshot import build_ensemble
from keras_snapshot import load_snapshots
from keras_snapshot import manifest as manifest_lib
from keras_snapshot import recalibrate_batchnorm
from keras_snapshot import select_snapshots
from keras_snapshot import snapshot_paths

NAN = float("nan")
INF = float("inf")


def check(error, fragments, call, *args, **kwargs):
    with pytest.raises(error) as info:
        call(*args, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"


# SnapshotSchedule and SnapshotSchedule.from_epochs -------------------------

SCHEDULE = {"initial_learning_rate": 0.1, "total_steps": 10, "num_snapshots": 2}
SCHEDULE_CASES = [
    ("initial_learning_rate", 0, ["initial_learning_rate=0", "positive"]),
    ("initial_learning_rate", -0.1, ["initial_learning_rate=-0.1"]),
    ("initial_learning_rate", NAN, ["initial_learning_rate=nan", "finite"]),
    ("initial_learning_rate", INF, ["initial_learning_rate=inf", "finite"]),
    ("initial_learning_rate", True, ["initial_learning_rate=True", "bool"]),
    ("initial_learning_rate", "0.1", ["initial_learning_rate='0.1'", "str"]),
    ("total_steps", 0, ["total_steps=0", "positive integer"]),
    ("total_steps", -10, ["total_steps=-10"]),
    ("total_steps", 10.0, ["total_steps=10.0", "float"]),
    ("total_steps", 10.5, ["total_steps=10.5"]),
    ("total_steps", NAN, ["total_steps=nan"]),
    ("total_steps", INF, ["total_steps=inf"]),
    ("total_steps", True, ["total_steps=True", "bool"]),
    ("total_steps", None, ["total_steps=None"]),
    ("num_snapshots", 0, ["num_snapshots=0", "positive integer"]),
    ("num_snapshots", -2, ["num_snapshots=-2"]),
    ("num_snapshots", 2.5, ["num_snapshots=2.5"]),
    ("num_snapshots", NAN, ["num_snapshots=nan"]),
    ("num_snapshots", False, ["num_snapshots=False", "bool"]),
    ("num_snapshots", 11, ["num_snapshots=11", "(10)", "fewer snapshots"]),
]


@pytest.mark.parametrize(
    "argument, value, fragments",
    SCHEDULE_CASES,
    ids=[f"{a}={v!r}" for a, v, _ in SCHEDULE_CASES],
)
def test_snapshot_schedule(argument, value, fragments):
    check(
        ValueError, fragments, SnapshotSchedule, **{**SCHEDULE, argument: value}
    )


FROM_EPOCHS = {
    "initial_learning_rate": 0.1,
    "epochs": 2,
    "steps_per_epoch": 5,
    "num_snapshots": 2,
}
FROM_EPOCHS_CASES = [
    ("epochs", 0, ["epochs=0"]),
    ("epochs", 2.5, ["epochs=2.5"]),
    ("epochs", True, ["epochs=True"]),
    ("steps_per_epoch", 0, ["steps_per_epoch=0"]),
    ("steps_per_epoch", -1, ["steps_per_epoch=-1"]),
    ("steps_per_epoch", NAN, ["steps_per_epoch=nan"]),
    ("steps_per_epoch", None, ["steps_per_epoch=None"]),
    ("num_snapshots", 11, ["num_snapshots=11", "(10)"]),
    ("initial_learning_rate", INF, ["initial_learning_rate=inf"]),
]


@pytest.mark.parametrize(
    "argument, value, fragments",
    FROM_EPOCHS_CASES,
    ids=[f"{a}={v!r}" for a, v, _ in FROM_EPOCHS_CASES],
)
def test_snapshot_schedule_from_epochs(argument, value, fragments):
    check(
        ValueError,
        fragments,
        SnapshotSchedule.from_epochs,
        **{**FROM_EPOCHS, argument: value},
    )


# SnapshotCheckpoint --------------------------------------------------------

CHECKPOINT_CASES = [
    ({"directory": None}, ["directory=None"]),
    ({"directory": ""}, ["directory=''"]),
    ({"directory": 5}, ["directory=5"]),
    ({"cycle_length": 0}, ["cycle_length=0"]),
    ({"cycle_length": -3}, ["cycle_length=-3"]),
    ({"cycle_length": 2.5}, ["cycle_length=2.5"]),
    ({"cycle_length": True}, ["cycle_length=True"]),
    ({"cycle_length": 5, "num_snapshots": 0}, ["num_snapshots=0"]),
    ({"cycle_length": 5, "num_snapshots": 1.5}, ["num_snapshots=1.5"]),
    ({"recalibration_steps": 0}, ["recalibration_steps=0"]),
    ({"recalibration_steps": -1}, ["recalibration_steps=-1"]),
]


@pytest.mark.parametrize(
    "kwargs, fragments",
    CHECKPOINT_CASES,
    ids=[repr(k) for k, _ in CHECKPOINT_CASES],
)
def test_snapshot_checkpoint_arguments(kwargs, fragments):
    check(
        ValueError,
        fragments,
        SnapshotCheckpoint,
        **{"directory": "d", **kwargs},
    )


def fit_with(
    tmp_path, callback_kwargs, schedule=(30, 3), data=None, **compile_kw
):
    """`fit` with a SnapshotCheckpoint; the errors come before any step."""
    x, y = make_data()
    model = make_model()
    if schedule is None:
        learning_rate = 0.1
    else:
        learning_rate = SnapshotSchedule(0.1, *schedule)
    model.compile(
        keras.optimizers.SGD(learning_rate),
        "sparse_categorical_crossentropy",
        **compile_kw,
    )
    callback_kwargs = {"directory": str(tmp_path / "snaps"), **callback_kwargs}
    callback = SnapshotCheckpoint(verbose=0, **callback_kwargs)
    if data is None:
        model.fit(
            x, y, batch_size=16, epochs=5, verbose=0, callbacks=[callback]
        )
    else:
        model.fit(data, epochs=1, verbose=0, callbacks=[callback])


def _generator():
    x, y = make_data(n=32)
    for start in range(0, 32, 16):
        yield x[start : start + 16], y[start : start + 16]


def _file_as_directory(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return {"directory": str(path)}, [str(path), "is a file"]


def _other_schedules_directory(tmp_path):
    directory = tmp_path / "other"
    directory.mkdir()
    from keras_snapshot.manifest import Manifest
    from keras_snapshot.manifest import SnapshotEntry

    entry = SnapshotEntry(index=1, file="snapshot-01.keras", step=5)
    folder = manifest_lib.SnapshotDirectory(str(directory))
    folder.write(Manifest(cycle_end_steps=[5, 10], entries=[entry]))
    return {"directory": str(directory)}, [
        "another schedule",
        "[5, 10]",
        "[10, 20, 30]",
        "new directory",
    ]


def _broken_manifest_directory(tmp_path):
    directory = tmp_path / "broken"
    directory.mkdir()
    (directory / "manifest.json").write_text("{oops")
    return {"directory": str(directory)}, [
        str(directory / "manifest.json"),
        "not valid JSON",
    ]


FIT_CASES = {
    "no-schedule-no-cycle-length": (
        lambda tmp_path: ({}, ["cycle_length=", "SnapshotSchedule", "SGD"]),
        {"schedule": None},
        ValueError,
    ),
    "cycle-length-disagrees": (
        lambda tmp_path: ({"cycle_length": 7}, ["cycle_length=7", "10"]),
        {},
        ValueError,
    ),
    "steps-per-execution-misaligned": (
        lambda tmp_path: ({}, ["steps_per_execution=4", "[20]"]),
        {"steps_per_execution": 4},
        ValueError,
    ),
    "unknown-length-needs-num-snapshots": (
        lambda tmp_path: ({"cycle_length": 2}, ["num_snapshots="]),
        {"schedule": None, "data": "generator"},
        ValueError,
    ),
    "directory-is-a-file": (_file_as_directory, {}, NotADirectoryError),
    "directory-of-another-schedule": (
        _other_schedules_directory,
        {},
        ValueError,
    ),
    "broken-manifest": (_broken_manifest_directory, {}, ValueError),
}


@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_snapshot_checkpoint_at_fit_time(tmp_path, case):
    setup, fit_kwargs, error = FIT_CASES[case]
    callback_kwargs, fragments = setup(tmp_path)
    if fit_kwargs.get("data") == "generator":
        fit_kwargs = {**fit_kwargs, "data": _generator()}
    check(error, fragments, fit_with, tmp_path, callback_kwargs, **fit_kwargs)


# build_ensemble, load_snapshots, snapshot_paths: directories ---------------


def _missing(tmp_path, run):
    path = str(tmp_path / "nowhere")
    return path, [path, "not"]


def _empty(tmp_path, run):
    (tmp_path / "empty").mkdir()
    path = str(tmp_path / "empty")
    return path, [path, "manifest.json", "no `.keras` files"]


def _without_keras_files(tmp_path, run):
    directory = tmp_path / "notes"
    directory.mkdir()
    (directory / "notes.txt").write_text("hello")
    return str(directory), [str(directory), "no `.keras` files"]


def _keras_files_without_manifest(tmp_path, run):
    directory = tmp_path / "loose"
    shutil.copytree(run, directory)
    os.remove(directory / "manifest.json")
    return str(directory), ["snapshot-01.keras", "pass their paths as a list"]


def _edited(change):
    def setup(tmp_path, run):
        directory = tmp_path / "edited"
        shutil.copytree(run, directory)
        path = directory / "manifest.json"
        manifest = json.loads(path.read_text())
        expected = change(manifest)
        path.write_text(json.dumps(manifest))
        return str(directory), [str(directory / "snapshot-02.keras"), *expected]

    return setup


def _wrong_sha(manifest):
    manifest["snapshots"][1]["sha256"] = "0" * 64
    return ["sha256", "0" * 64]


def _wrong_size(manifest):
    manifest["snapshots"][1]["size"] += 1
    return ["manifest recorded", "truncated or was replaced"]


def _no_entries(tmp_path, run):
    directory = tmp_path / "none"
    shutil.copytree(run, directory)
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["snapshots"] = []
    path.write_text(json.dumps(manifest))
    return str(directory), [str(directory), "no usable snapshots", "Train"]


DIRECTORY_CASES = {
    "missing": (_missing, FileNotFoundError),
    "empty": (_empty, FileNotFoundError),
    "no-keras-files": (_without_keras_files, FileNotFoundError),
    "keras-files-without-manifest": (
        _keras_files_without_manifest,
        FileNotFoundError,
    ),
    "manifest-sha-mismatch": (_edited(_wrong_sha), ValueError),
    "manifest-size-mismatch": (_edited(_wrong_size), ValueError),
    "manifest-without-entries": (_no_entries, ValueError),
}


@pytest.mark.parametrize(
    "entry_point", [build_ensemble, load_snapshots, snapshot_paths]
)
@pytest.mark.parametrize("case", sorted(DIRECTORY_CASES))
def test_snapshot_directories(tmp_path, snapshot_run, case, entry_point):
    setup, error = DIRECTORY_CASES[case]
    directory, fragments = setup(tmp_path, snapshot_run[0])
    check(error, fragments, entry_point, directory)


# build_ensemble and load_snapshots: members and options --------------------


def _two_outputs():
    inputs = keras.Input((8,))
    a = keras.layers.Dense(3, activation="softmax")(inputs)
    b = keras.layers.Dense(3, activation="softmax")(inputs)
    return keras.Model(inputs, [a, b], name="two_outputs")


def _two_inputs():
    a, b = keras.Input((8,)), keras.Input((8,))
    outputs = keras.layers.Dense(3, activation="softmax")(
        keras.layers.Concatenate()([a, b])
    )
    return keras.Model([a, b], outputs, name="two_inputs")


def _image_model():
    return keras.Sequential(
        [
            keras.Input((4, 4, 1)),
            keras.layers.Conv2D(2, 3),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ],
        name="image_model",
    )


def _not_a_model_file(tmp_path):
    path = tmp_path / "notes.keras"
    path.write_text("not a zip file")
    return [str(path)], [str(path), "not a `.keras` model"]


def _undeclared_output_model():
    """Ends in a ReLU: neither probabilities nor logits declared."""
    inputs = keras.Input((8,))
    outputs = keras.layers.Activation("relu")(keras.layers.Dense(3)(inputs))
    return keras.Model(inputs, outputs)


MEMBER_CASES = {
    "other-output-shape": (
        lambda p: (
            [make_model(), make_model(classes=4, name="four")],
            ["'four'", "output shape (4,)", "(3,)"],
        ),
        ValueError,
    ),
    "other-architecture-and-input": (
        lambda p: (
            [make_model(), _image_model()],
            ["'image_model'", "input shape (4, 4, 1)"],
        ),
        ValueError,
    ),
    "multi-output": (
        lambda p: (
            [_two_outputs()],
            ["two_outputs", "2 outputs", "one input and one output"],
        ),
        ValueError,
    ),
    "multi-input": (
        lambda p: ([_two_inputs()], ["two_inputs", "2 inputs"]),
        ValueError,
    ),
    "logits-without-from_logits": (
        lambda p: (
            [_undeclared_output_model()],
            ["Cannot tell", "from_logits=True"],
        ),
        ValueError,
    ),
    "none": (lambda p: (None, ["Received: None"]), TypeError),
    "an-int": (lambda p: (5, ["Received: 5"]), TypeError),
    "empty-list": (lambda p: ([], ["empty", "at least one"]), ValueError),
    "list-of-ints": (
        lambda p: ([3], ["Received: 3 (type int)"]),
        TypeError,
    ),
    "missing-file": (
        lambda p: (
            [str(p / "gone.keras")],
            [str(p / "gone.keras"), "does not exist"],
        ),
        FileNotFoundError,
    ),
    "missing-path": (
        lambda p: (str(p / "gone"), [str(p / "gone"), "does not exist"]),
        FileNotFoundError,
    ),
    "not-a-model-file": (_not_a_model_file, ValueError),
}


@pytest.mark.parametrize("case", sorted(MEMBER_CASES))
def test_build_ensemble_members(tmp_path, case):
    setup, error = MEMBER_CASES[case]
    snapshots, fragments = setup(tmp_path)
    check(error, fragments, build_ensemble, snapshots)


LAST_CASES = [0, 4, -1, 1.5, True, "2", NAN]


@pytest.mark.parametrize(
    "entry_point", [build_ensemble, load_snapshots, snapshot_paths]
)
@pytest.mark.parametrize("last", LAST_CASES, ids=[repr(v) for v in LAST_CASES])
def test_last_out_of_range(snapshot_run, entry_point, last):
    fragments = [f"last={last!r}"]
    if isinstance(last, int) and not isinstance(last, bool):
        fragments = [
            f"last={last}",
            "between 1 and the number of snapshots (3)",
        ]
    check(ValueError, fragments, entry_point, snapshot_run[0], last=last)


def test_last_accepts_numpy_integers(snapshot_run):
    assert len(snapshot_paths(snapshot_run[0], last=np.int64(2))) == 2


WEIGHT_CASES = [
    ([1, 2], ["shape (3,)", "weights=[1, 2]"]),
    ([1, 2, 3, 4], ["shape (3,)"]),
    ([1, -1, 1], ["non-negative", "[1.0, -1.0, 1.0]"]),
    ([NAN, 1, 1], ["finite", "nan"]),
    ([INF, 1, 1], ["finite", "inf"]),
    ([0, 0, 0], ["all zero"]),
    ("abc", ["weights='abc'"]),
]


@pytest.mark.parametrize(
    "weights, fragments", WEIGHT_CASES, ids=[repr(w) for w, _ in WEIGHT_CASES]
)
def test_build_ensemble_weights(snapshot_run, weights, fragments):
    check(
        ValueError, fragments, build_ensemble, snapshot_run[0], weights=weights
    )


# recalibrate_batchnorm -----------------------------------------------------

X = make_data(n=16)[0]
RECALIBRATION_CASES = {
    "batch_size=0": ({"batch_size": 0}, ValueError, ["batch_size=0"]),
    "batch_size=-1": ({"batch_size": -1}, ValueError, ["batch_size=-1"]),
    "batch_size=True": ({"batch_size": True}, ValueError, ["batch_size=True"]),
    "batch_size=2.5": ({"batch_size": 2.5}, ValueError, ["batch_size=2.5"]),
    "steps=0": ({"steps": 0}, ValueError, ["steps=0"]),
    "steps=-1": ({"steps": -1}, ValueError, ["steps=-1"]),
    "steps=1.5": ({"steps": 1.5}, ValueError, ["steps=1.5"]),
    "data=None": ({"data": None}, ValueError, ["data=None", "array"]),
    "data-empty": (
        {"data": np.zeros((0, 8), "float32")},
        ValueError,
        ["empty", "(0, 8)"],
    ),
    "data-list-of-dicts": (
        {"data": [{"x": X}]},
        ValueError,
        ["dict objects", "numeric array"],
    ),
    "data-dict-batches": (
        {"data": iter([{"x": X}])},
        ValueError,
        ["dict with keys ['x']"],
    ),
    "model-not-a-model": (
        {"model": "model.keras"},
        TypeError,
        ["'model.keras'", "Keras model"],
    ),
}


@pytest.mark.parametrize("case", sorted(RECALIBRATION_CASES))
def test_recalibrate_batchnorm(case):
    kwargs, error, fragments = RECALIBRATION_CASES[case]
    kwargs = {"model": make_model(), "data": X, **kwargs}
    check(error, fragments, recalibrate_batchnorm, **kwargs)


def test_recalibrate_batchnorm_refuses_renorm():
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.BatchNormalization(renorm=True, name="renormed"),
        ]
    )
    check(
        ValueError, ["renorm=True", "renormed"], recalibrate_batchnorm, model, X
    )


# select_snapshots ----------------------------------------------------------

SELECT_CASES = {
    "bad-method": ({"method": "best"}, ["method='best'", "greedy"]),
    "bad-metric": ({"metric": "accuracy"}, ["metric='accuracy'", "nll"]),
    "validation-array": (
        {"validation_data": X},
        ["Received: a ndarray", "(x_val, y_val)"],
    ),
    "validation-one-item": (
        {"validation_data": (X,)},
        ["a tuple of length 1", "(x_val, y_val)"],
    ),
    "validation-three-items": (
        {"validation_data": [X, X, X]},
        ["a list of length 3"],
    ),
}


@pytest.mark.parametrize("case", sorted(SELECT_CASES))
def test_select_snapshots(case):
    kwargs, fragments = SELECT_CASES[case]
    kwargs = {"validation_data": make_data(n=16), **kwargs}
    check(ValueError, fragments, select_snapshots, [make_model()], **kwargs)


def test_members_of_other_architectures_with_same_shapes_are_allowed():
    """Not an error: any models mapping the same inputs to the same classes
    can be averaged; only shapes must agree."""
    keras.utils.set_random_seed(0)
    wide = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    ensemble = build_ensemble([make_model(), wide])
    assert ensemble.output_shape == (None, 3)
    assert math.isclose(
        float(ensemble.predict(X, verbose=0).sum(axis=1).mean()),
        1.0,
        rel_tol=1e-5,
    )
