"""Trains a tiny model with snapshots and `BackupAndRestore`, for tests.

`tests/test_resume.py` runs this script in a subprocess, kills it, runs the
same command again and compares the result with an uninterrupted run. It is
not collected by pytest (its name does not start with `test_`).

Usage:

    python tests/train_script.py WORKDIR [--epochs 5] [--snapshots 4]
        [--deterministic] [--sleep SECONDS]

The snapshots go to `WORKDIR/snapshots`, the `BackupAndRestore` state to
`WORKDIR/backup`. The data (48 samples, batch 8: 6 steps per epoch) and the
initial weights are fixed by `keras.utils.set_random_seed(0)`, and the data
is not shuffled, so that a resumed run replays exactly the batches of an
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

`--deterministic` also calls `tf.config.experimental.enable_op_determinism()`,
which holds for the whole process: one more reason to train in a
subprocess. `--sleep` slows every batch down, for a parent that times its
own kill.
The fault hooks live here, in test code; the library has none.
"""

import argparse
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
    """Sleeps every batch, and kills or pauses the process at a step."""

    def __init__(self, sleep=0.0, kill_after_step=None, pause_at_step=None):
        super().__init__()
        self.sleep = sleep
        self.kill_after_step = kill_after_step
        self.pause_at_step = pause_at_step

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
    )
    if kind not in kinds or not value.isdigit():
        raise SystemExit(
            f"{FAULT_VARIABLE} must be KIND:NUMBER with KIND in {kinds}. "
            f"Received: {text!r}."
        )
    return {kind: int(value)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
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
    model = make_model()
    steps_per_epoch = int(np.ceil(SAMPLES / BATCH_SIZE))
    schedule = keras_snapshot.SnapshotSchedule.from_epochs(
        0.1, args.epochs, steps_per_epoch, args.snapshots
    )
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    callbacks = [
        FaultCallback(
            sleep=args.sleep,
            kill_after_step=fault.get("kill_after_step"),
            pause_at_step=fault.get("pause_at_step"),
        ),
        # The backup is written before the snapshot at an epoch end, so a
        # kill while that snapshot is written resumes exactly at its step.
        keras.callbacks.BackupAndRestore(os.path.join(args.workdir, "backup")),
        FaultySnapshotCheckpoint(
            os.path.join(args.workdir, "snapshots"),
            kill_before_snapshot=fault.get("kill_before_snapshot"),
            kill_after_snapshot=fault.get("kill_after_snapshot"),
            kill_during_write=fault.get("kill_during_write"),
        ),
    ]
    model.fit(
        x,
        y,
        batch_size=BATCH_SIZE,
        epochs=args.epochs,
        shuffle=False,
        callbacks=callbacks,
        verbose=0,
    )
    print("done", flush=True)


if __name__ == "__main__":
    main()
