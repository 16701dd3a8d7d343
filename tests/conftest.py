"""Shared fixtures: tiny data, tiny models and one trained snapshot run."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_snapshot  # noqa: E402


def make_data(n=96, features=8, classes=3, seed=0):
    """A small learnable classification problem."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    w = rng.normal(size=(features, classes))
    y = np.argmax(x @ w, axis=1).astype("int32")
    return x, y


def make_model(features=8, classes=3, batchnorm=True, name=None):
    layers = [keras.Input((features,)), keras.layers.Dense(16)]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization())
    layers += [
        keras.layers.Activation("relu"),
        keras.layers.Dense(classes, activation="softmax"),
    ]
    return keras.Sequential(layers, name=name)


def compile_with_schedule(model, total_steps, num_snapshots, lr=0.1):
    schedule = keras_snapshot.SnapshotSchedule(lr, total_steps, num_snapshots)
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return schedule


def train_snapshots(directory, epochs=5, batch_size=16, num_snapshots=3, **kw):
    """Trains the tiny model with snapshots; 96 samples -> 6 steps/epoch."""
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = make_model()
    steps = epochs * int(np.ceil(len(x) / batch_size))
    schedule = compile_with_schedule(model, steps, num_snapshots)
    callback = keras_snapshot.SnapshotCheckpoint(directory, verbose=0, **kw)
    model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=epochs,
        callbacks=[callback],
        verbose=0,
    )
    return model, schedule, callback


def saved_steps(directory):
    """The optimizer step stored inside each snapshot file, in file order."""
    steps = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".keras"):
            model = keras.saving.load_model(os.path.join(directory, name))
            steps.append(
                int(keras.ops.convert_to_numpy(model.optimizer.iterations))
            )
    return steps


@pytest.fixture(scope="session")
def snapshot_run(tmp_path_factory):
    """One trained run with 3 snapshots, shared by read-only tests."""
    directory = str(tmp_path_factory.mktemp("run") / "snapshots")
    model, schedule, _ = train_snapshots(directory)
    return directory, schedule
