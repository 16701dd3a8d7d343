"""Small data, models and training runs shared by the tests.

Import these from here (`from helpers import make_data`), never from
`conftest`; conftest.py only holds the fixtures.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np

import keras_snapshot
from keras_snapshot._keras_compat import optimizer_iterations


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


class CrashAtEpochEnd(keras.callbacks.Callback):
    """Raises `RuntimeError(message)` at the end of epoch `epoch` (0-based),
    as a crash would stop `fit`: callbacks listed before it have ended the
    epoch (a `BackupAndRestore` there has saved), those after it have not."""

    def __init__(self, epoch, message="simulated crash"):
        super().__init__()
        self.epoch = epoch
        self.message = message

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError(self.message)


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
            # The inner count under loss scaling (Keras 3.8 keeps the
            # LossScaleOptimizer's own at 0).
            steps.append(optimizer_iterations(model.optimizer))
    return steps


_LOCK_PROCESS = textwrap.dedent(
    """
    import sys
    sys.argv[0] = "keras-snapshot"  # The package then imports no Keras.
    from keras_snapshot._lock import DirectoryLockedError
    from keras_snapshot._lock import FolderLock

    locks = {}
    for line in sys.stdin:
        command, path, what = line.rstrip("\\n").split("\\t")
        if command == "acquire":
            try:
                locks[path] = FolderLock(path, what=what).acquire()
                reply = ["locked"]
            except DirectoryLockedError as e:
                reply = ["refused", e.path, e.holder, e.what, str(e)]
        else:
            locks.pop(path).release()
            reply = ["released"]
        print("\\t".join(reply), flush=True)
    """
)


class LockProcess:
    """A second Python process that takes and releases folder locks.

    It imports `keras_snapshot._lock` only (no Keras), so it starts fast.
    `acquire` returns `["locked"]` or `["refused", path, holder, what,
    message]`, as that process saw it.
    """

    def __init__(self):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.process = subprocess.Popen(
            [sys.executable, "-c", _LOCK_PROCESS],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=root),
        )
        self.pid = self.process.pid

    def _ask(self, *words) -> list:
        self.process.stdin.write("\t".join(map(str, words)) + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().rstrip("\n").split("\t")

    def acquire(self, path, what="snapshot directory") -> list:
        return self._ask("acquire", path, what)

    def release(self, path) -> list:
        return self._ask("release", path, "")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.process.kill()  # Its locks die with it.
        self.process.wait(timeout=60)


def write_image_folder(
    root,
    classes=("cat", "dog", "eel"),
    count=10,
    size=(8, 6),
    channels=3,
    seed=0,
):
    """Writes `count` random PNG images per class into `root/<class>/`.

    Each class's images are bright in a different row band, so that a
    model can learn them. Returns `{path: (image uint8 array, label)}`.
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    written = {}
    for label, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(count):
            image = rng.integers(0, 100, (*size, channels), dtype=np.uint8)
            band = label % size[0]
            image[band] = 255
            path = os.path.join(root, name, f"{i:03d}.png")
            tf.io.write_file(path, tf.io.encode_png(image))
            written[path] = (image, label)
    return written


SCRIPT_TIMEOUT = 300


def start_script(script, workdir, env=None, args=()):
    """Starts `python script workdir *args` with this checkout first.

    `env` sets (or, with None, removes) environment variables, such as the
    fault a script injects; stdout and stderr go to files in `workdir`
    (`script_output`), so a test can watch a run it kills.
    """
    os.makedirs(workdir, exist_ok=True)
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            environment.get("PYTHONPATH", ""),
        ]
    )
    for name, value in (env or {}).items():
        environment.pop(name, None)
        if value is not None:
            environment[name] = value
    with (
        open(os.path.join(workdir, "stdout.txt"), "w") as out,
        open(os.path.join(workdir, "stderr.txt"), "w") as err,
    ):
        return subprocess.Popen(
            [sys.executable, script, str(workdir), *args],
            env=environment,
            stdout=out,
            stderr=err,
        )


def script_output(workdir):
    """`(stdout, stderr)` of a script started with `start_script`."""
    with open(os.path.join(workdir, "stdout.txt")) as f:
        out = f.read()
    with open(os.path.join(workdir, "stderr.txt")) as f:
        return out, f.read()


def finish_script(process, workdir, timeout=SCRIPT_TIMEOUT):
    """Waits for the script (kills it after `timeout`): code, out, err."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return (process.returncode, *script_output(workdir))
