"""Trains a tiny model with `BackupAndRestore` and callbacks, for tests.

`tests/test_resume.py` runs this script in a subprocess, kills it, runs the
same command again and compares the result with an uninterrupted run. It is
not collected by pytest (its name does not start with `test_`).

Usage:

    python tests/train_script.py WORKDIR [--callbacks snapshot]
        [--epochs 5] [--snapshots 4] [--deterministic] [--sleep SECONDS]
        [--url-prefix file://]

`--callbacks` picks what trains besides `BackupAndRestore` (in
`WORKDIR/backup`):

- `snapshot`: `SnapshotSchedule` and `SnapshotCheckpoint` (snapshots in
  `WORKDIR/snapshots`).
- `averaging`: `WeightAveraging(mode="ema")` with BatchNorm recalibration
  (`WORKDIR/ema.keras`), two `AveragedModelCheckpoint`s of it (every epoch,
  `ema-EE.keras`, and the best loss, `best_ema.keras`), and
  `WeightAveraging(mode="swa", average_batchnorm=True)` every 4 steps from
  step 8 (`swa.keras`). `--url-prefix file://` writes the two averages
  through `tf.io.gfile`, the code path of remote storage, on a local disk
  that processes share.
- `freezeout`: `FreezeOut(t0=0.5, scaling="linear")` on three Dense
  layers (with `--epochs 4`: groups 0 and 1 freeze at steps 12 and 18).

Every run writes its final weights to `WORKDIR/weights.npz` and
`WORKDIR/result.json` (the first step of this process, FreezeOut's events).

The data (48 samples, batch 8: 6 steps per epoch) and the initial weights
are fixed by `keras.utils.set_random_seed(0)`, and the data is not
shuffled, so that a resumed run replays exactly the batches of an
uninterrupted one. With 5 epochs (30 steps) and 4 snapshots the cycles end
at steps 8, 16, 24 and 30: snapshots 1 and 2 fall in the middle of epochs
2 and 3, snapshot 3 at the end of epoch 4.

Faults are injected from the `TRAIN_SCRIPT_FAULT` environment variable, so
that the resumed run is the very same command line:

- `kill_after_step:N`: SIGKILL once N optimizer steps have run (in
  `on_train_batch_begin`, before step N + 1).
- `pause_at_step:N`: print `paused at step N` once N steps have run and
  sleep, so that the parent can send the SIGKILL itself.
- `kill_after_snapshot:K`: SIGKILL right after snapshot K (file and
  manifest) is written.
- `kill_before_snapshot:K`: SIGKILL right before snapshot K is written
  (for the last one: after the last epoch's backup).
- `kill_during_write:K`: SIGKILL in the middle of snapshot K's write: the
  file is half written under its temporary name.
- `kill_at_epoch_end:E`: SIGKILL at the end of epoch E (1-based), after the
  callbacks listed before the fault's (`BackupAndRestore` has saved), before
  those after it.

`--deterministic` also calls `tf.config.experimental.enable_op_determinism()`,
which holds for the whole process: one more reason to train in a
subprocess. `--sleep` slows every batch down, for a parent that times its
own kill.
The fault hooks live here, in test code; the library has none.
"""

import argparse
import json
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from helpers import make_data  # noqa: E402
from helpers import make_model  # noqa: E402

import keras_snapshot  # noqa: E402
from keras_snapshot import manifest as manifest_lib  # noqa: E402

FAULT_VARIABLE = "TRAIN_SCRIPT_FAULT"
SAMPLES = 48
BATCH_SIZE = 8


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class FaultCallback(keras.callbacks.Callback):
    """Sleeps every batch, and kills or pauses the process at a step or at
    an epoch's end; notes the step this process started at."""

    def __init__(
        self,
        sleep=0.0,
        kill_after_step=None,
        pause_at_step=None,
        kill_at_epoch_end=None,
    ):
        super().__init__()
        self.sleep = sleep
        self.kill_after_step = kill_after_step
        self.pause_at_step = pause_at_step
        self.kill_at_epoch_end = kill_at_epoch_end
        self.first_step = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.first_step is None:
            self.first_step = int(
                keras.ops.convert_to_numpy(self.model.optimizer.iterations)
            )

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.kill_at_epoch_end:
            die()

    def on_train_batch_begin(self, batch, logs=None):
        if self.sleep:
            time.sleep(self.sleep)
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if step == self.kill_after_step:
            die()
        if step == self.pause_at_step:
            print(f"paused at step {step}", flush=True)
            while True:  # Until the parent's SIGKILL.
                time.sleep(1)


class FaultySnapshotCheckpoint(keras_snapshot.SnapshotCheckpoint):
    """Dies right after, or in the middle of, writing one snapshot."""

    def __init__(
        self,
        *args,
        kill_before_snapshot=None,
        kill_after_snapshot=None,
        kill_during_write=None,
    ):
        super().__init__(*args)
        self.kill_before_snapshot = kill_before_snapshot
        self.kill_after_snapshot = kill_after_snapshot
        self.kill_during_write = kill_during_write

    def _save_snapshot(self, step, batch, logs):
        index = self._steps_due[step]
        if index == self.kill_before_snapshot:
            die()
        super()._save_snapshot(step, batch, logs)
        if index == self.kill_after_snapshot:
            die()

    def _save_model_to(self, path):
        super()._save_model_to(path)
        if self.kill_during_write is not None and os.path.basename(
            path
        ) == manifest_lib.snapshot_filename(self.kill_during_write):
            # Half of the file is on disk when the process dies.
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
                f.flush()
                os.fsync(f.fileno())
            die()


def parse_fault(text):
    if not text:
        return {}
    kind, _, value = text.partition(":")
    kinds = (
        "kill_after_step",
        "pause_at_step",
        "kill_before_snapshot",
        "kill_after_snapshot",
        "kill_during_write",
        "kill_at_epoch_end",
    )
    if kind not in kinds or not value.isdigit():
        raise SystemExit(
            f"{FAULT_VARIABLE} must be KIND:NUMBER with KIND in {kinds}. "
            f"Received: {text!r}."
        )
    return {kind: int(value)}


def freezeout_model(features=8, classes=3):
    """Three Dense layers (one FreezeOut group each), BatchNorm after the
    first: `make_model(3, batchnorm=True)` of `tests/test_freezeout.py`."""
    inputs = keras.Input((features,))
    x = keras.layers.Dense(16, name="dense_0")(inputs)
    x = keras.layers.BatchNormalization(name="bn_0")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dense(16, activation="relu", name="dense_1")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="dense_2")(
        x
    )
    return keras.Model(inputs, outputs)


def snapshot_callbacks(args, fault, x, backup, faults):
    """SnapshotCheckpoint after the backup: the backup is written before
    the snapshot at an epoch end, so a kill while that snapshot is written
    resumes exactly at its step."""
    checkpoint = FaultySnapshotCheckpoint(
        os.path.join(args.workdir, "snapshots"),
        kill_before_snapshot=fault.get("kill_before_snapshot"),
        kill_after_snapshot=fault.get("kill_after_snapshot"),
        kill_during_write=fault.get("kill_during_write"),
    )
    return [faults, backup, checkpoint], {}


def averaging_callbacks(args, fault, x, backup, faults):
    """The EMA (and its checkpoints) before the backup, so the backup of an
    epoch holds that epoch's last update; the SWA after the fault, so a
    kill at an epoch's end comes after the backup and before the SWA takes
    that epoch's last average."""
    ema = keras_snapshot.WeightAveraging(
        mode="ema",
        decay=0.9,
        warmup=True,
        recalibration_data=x,
        filepath=args.url_prefix + os.path.join(args.workdir, "ema.keras"),
    )
    every = keras_snapshot.AveragedModelCheckpoint(
        ema, os.path.join(args.workdir, "ema-{epoch:02d}.keras")
    )
    best = keras_snapshot.AveragedModelCheckpoint(
        ema,
        os.path.join(args.workdir, "best_ema.keras"),
        monitor="loss",
        save_best_only=True,
    )
    swa = keras_snapshot.WeightAveraging(
        mode="swa",
        average_batchnorm=True,  # What StochasticWeightAveraging was.
        start_step=8,
        every_steps=4,
        filepath=args.url_prefix + os.path.join(args.workdir, "swa.keras"),
    )
    return [ema, every, best, backup, faults, swa], {}


def freezeout_callbacks(args, fault, x, backup, faults):
    freeze = keras_snapshot.FreezeOut(t0=0.5, scaling="linear", verbose=0)
    return [backup, freeze, faults], {"freeze": freeze}


CALLBACKS = {
    "snapshot": snapshot_callbacks,
    "averaging": averaging_callbacks,
    "freezeout": freezeout_callbacks,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument(
        "--callbacks", choices=sorted(CALLBACKS), default="snapshot"
    )
    parser.add_argument("--url-prefix", default="")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--snapshots", type=int, default=4)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--deterministic", action="store_true")
    args = parser.parse_args(argv)
    fault = parse_fault(os.environ.get(FAULT_VARIABLE))

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # One thread is plenty for this model and leaves the CPU to others.
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        if args.deterministic:
            tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)

    x, y = make_data(n=SAMPLES)
    steps_per_epoch = int(np.ceil(SAMPLES / BATCH_SIZE))
    if args.callbacks == "snapshot":
        model = make_model()
        learning_rate = keras_snapshot.SnapshotSchedule.from_epochs(
            0.1, args.epochs, steps_per_epoch, args.snapshots
        )
    elif args.callbacks == "averaging":
        model, learning_rate = make_model(), 0.05
    else:
        model, learning_rate = freezeout_model(), 0.1
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    faults = FaultCallback(
        sleep=args.sleep,
        kill_after_step=fault.get("kill_after_step"),
        pause_at_step=fault.get("pause_at_step"),
        kill_at_epoch_end=fault.get("kill_at_epoch_end"),
    )
    backup = keras.callbacks.BackupAndRestore(
        os.path.join(args.workdir, "backup")
    )
    callbacks, named = CALLBACKS[args.callbacks](args, fault, x, backup, faults)
    model.fit(
        x,
        y,
        batch_size=BATCH_SIZE,
        epochs=args.epochs,
        shuffle=False,
        callbacks=callbacks,
        verbose=0,
    )
    np.savez(
        os.path.join(args.workdir, "weights.npz"),
        *[keras.ops.convert_to_numpy(w) for w in model.weights],
    )
    result = {"first_step": faults.first_step}
    if "freeze" in named:
        result["freeze_events"] = named["freeze"].freeze_events
    with open(os.path.join(args.workdir, "result.json"), "w") as f:
        json.dump(result, f)
    print("done", flush=True)


if __name__ == "__main__":
    main()
