"""`SnapshotCheckpoint`: saves one `.keras` model per learning-rate cycle."""

import os
import shutil
import sys
import time
import warnings

import keras
from keras import ops

from keras_snapshot import manifest as manifest_lib
from keras_snapshot._checks import check_positive_int
from keras_snapshot._distribution import is_writer
from keras_snapshot.batchnorm import recalibrate_batchnorm
from keras_snapshot.batchnorm import restore_batchnorm_statistics
from keras_snapshot.batchnorm import save_batchnorm_statistics
from keras_snapshot.schedule import SnapshotSchedule


def find_snapshot_schedule(optimizer) -> SnapshotSchedule | None:
    """The `SnapshotSchedule` that drives `optimizer`, if there is one."""
    while optimizer is not None:
        schedule = getattr(optimizer, "_learning_rate", None)
        if isinstance(schedule, SnapshotSchedule):
            return schedule
        # `LossScaleOptimizer` wraps the optimizer that holds the schedule.
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return None


def _is_chief(model) -> bool:
    """Whether this process writes the snapshots (multi-worker training)."""
    return is_writer(model)


def _to_float(value):
    try:
        return float(ops.convert_to_numpy(value))
    except (TypeError, ValueError):
        return None


class SnapshotCheckpoint(keras.callbacks.Callback):
    """Saves a complete `.keras` model at the end of every learning-rate cycle.

    Snapshot Ensembles (Huang et al. 2017, arXiv:1704.00109) save the model
    at each minimum of a cyclic learning rate. This callback reads the cycles
    from the optimizer's `SnapshotSchedule` and writes snapshot `k` right
    after optimizer step `schedule.cycle_end_steps[k - 1]`, also when that
    step falls in the middle of an epoch. Each snapshot is a full `.keras`
    file (architecture, weights and optimizer state), so it can be loaded
    with `keras.saving.load_model` to predict, fine-tune or continue training.

    The directory also gets a `manifest.json` that lists, for every snapshot,
    its index, epoch, optimizer step, the learning rate of its last step, the
    training logs available then, and the file's name, size and sha256.
    Files are written under a hidden temporary name and renamed when
    complete; the manifest is replaced atomically afterwards. Whether a
    snapshot is due is decided from the optimizer's step count, so the
    callback stays right when training resumes through
    `keras.callbacks.BackupAndRestore` or `initial_epoch`; snapshots that
    a resumed run has not reached again are dropped and retaken.

    The per-batch check is a Python integer comparison in
    `on_train_batch_begin`, which leaves Keras's asynchronous batch dispatch
    on (Keras turns it off only for callbacks that override batch-end hooks).

    Args:
        directory: Folder for the snapshots and manifest; created if needed.
        cycle_length: Steps per cycle, needed only when the optimizer's
            learning rate is not a `SnapshotSchedule`. Snapshots are then
            taken after every `cycle_length` steps.
        num_snapshots: With `cycle_length`, the number of snapshots to take;
            by default as many cycles as fit in the `fit` call.
        recalibration_data: Optional training inputs (array, `(x, y)` tuple
            or `tf.data.Dataset`). When given, each snapshot is saved with its
            BatchNorm moving statistics recomputed on this data (see
            `recalibrate_batchnorm`); the model being trained keeps its own.
        recalibration_steps: Optional limit on the batches used for that.
        verbose: 1 prints one line per snapshot, 0 is silent.

    Example:

    ```python
    schedule = keras_snapshot.SnapshotSchedule.from_epochs(
        0.1, epochs=10, steps_per_epoch=len(x_train) // 32, num_snapshots=5
    )
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=0.9),
        loss="sparse_categorical_crossentropy",
    )
    model.fit(
        x_train, y_train, batch_size=32, epochs=10,
        callbacks=[keras_snapshot.SnapshotCheckpoint("snapshots")],
    )
    ensemble = keras_snapshot.build_ensemble("snapshots")
    ```
    """

    def __init__(
        self,
        directory: str,
        cycle_length: int | None = None,
        num_snapshots: int | None = None,
        recalibration_data=None,
        recalibration_steps: int | None = None,
        verbose: int = 1,
    ):
        super().__init__()
        if not isinstance(directory, (str, os.PathLike)) or not str(directory):
            raise ValueError(
                "`directory` must be a path to a folder for the snapshots. "
                f"Received: directory={directory!r}."
            )
        # Checked the same way as the schedule checks its arguments.
        if cycle_length is not None:
            check_positive_int("cycle_length", cycle_length)
        if num_snapshots is not None and cycle_length is None:
            raise ValueError(
                "`num_snapshots` is only used together with `cycle_length`; "
                "with a `SnapshotSchedule` the schedule sets it. Received: "
                f"num_snapshots={num_snapshots}, cycle_length=None."
            )
        if num_snapshots is not None:
            check_positive_int("num_snapshots", num_snapshots)
        if recalibration_steps is not None:
            check_positive_int("recalibration_steps", recalibration_steps)
        self.directory = os.fspath(directory)
        self.cycle_length = cycle_length
        self.num_snapshots = num_snapshots
        self.recalibration_data = recalibration_data
        self.recalibration_steps = recalibration_steps
        self.verbose = verbose
        self._schedule = None
        self._steps_due = {}
        self._planned = False
        self._epoch = 0
        self._epoch_start_step = 0
        self.last_write_seconds = None

    # Cycles -----------------------------------------------------------------

    def _resolve_schedule(self) -> SnapshotSchedule:
        optimizer = getattr(self.model, "optimizer", None)
        schedule = find_snapshot_schedule(optimizer)
        if schedule is not None:
            if (
                self.cycle_length is not None
                and self.cycle_length != schedule.cycle_length
            ):
                raise ValueError(
                    f"`cycle_length={self.cycle_length}` disagrees with the "
                    "optimizer's SnapshotSchedule, whose cycle length is "
                    f"{schedule.cycle_length}. Leave `cycle_length` unset to "
                    "follow the schedule."
                )
            return schedule
        if self.cycle_length is None:
            learning_rate = getattr(optimizer, "_learning_rate", None)
            raise ValueError(
                "SnapshotCheckpoint needs to know where the learning-rate "
                "cycles end. Compile the model with an optimizer whose "
                "learning rate is a `keras_snapshot.SnapshotSchedule`, or "
                "pass `cycle_length=` (steps per cycle) to SnapshotCheckpoint."
                f" Received: optimizer={type(optimizer).__name__} with "
                f"learning_rate={learning_rate!r}."
            )
        num_snapshots = self.num_snapshots
        if num_snapshots is None:
            epochs = self.params.get("epochs")
            steps = self.params.get("steps")
            if not epochs or not steps:
                raise ValueError(
                    "With `cycle_length` and a dataset of unknown length, "
                    "SnapshotCheckpoint cannot count the cycles: pass "
                    "`num_snapshots=` as well."
                )
            num_snapshots = max(1, epochs * steps // self.cycle_length)
        # The schedule is the one place that knows the cycle arithmetic.
        return SnapshotSchedule(
            1.0, self.cycle_length * num_snapshots, num_snapshots
        )

    def _learning_rate_of_step(self, step: int):
        """The optimizer's real learning rate at `step` (any schedule)."""
        optimizer = self.model.optimizer
        while getattr(optimizer, "inner_optimizer", None) is not None:
            optimizer = optimizer.inner_optimizer
        rate = getattr(optimizer, "_learning_rate", None)
        if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            return _to_float(rate(step))
        return _to_float(rate if rate is not None else self._schedule(step))

    def _current_step(self) -> int:
        return int(ops.convert_to_numpy(self.model.optimizer.iterations))

    # Keras hooks --------------------------------------------------------------

    def on_train_begin(self, logs=None):
        self._schedule = self._resolve_schedule()
        steps_per_execution = getattr(self.model, "steps_per_execution", 1)
        if steps_per_execution and steps_per_execution > 1:
            misaligned = [
                s
                for s in self._schedule.cycle_end_steps
                if s % steps_per_execution
            ]
            if misaligned:
                raise ValueError(
                    f"With steps_per_execution={steps_per_execution}, Keras "
                    "runs callbacks only every that many steps, so snapshots "
                    f"at steps {misaligned} cannot be taken exactly. Choose "
                    "a total_steps and num_snapshots whose cycle ends are "
                    "multiples of steps_per_execution."
                )
        self._chief = _is_chief(self.model)
        if self._chief:
            if os.path.exists(self.directory) and not os.path.isdir(
                self.directory
            ):
                raise NotADirectoryError(
                    f"SnapshotCheckpoint writes snapshots into a folder, but "
                    f"{self.directory} is a file. Pass the path of a new or "
                    "existing folder as `directory`."
                )
            os.makedirs(self.directory, exist_ok=True)
            removed = manifest_lib.remove_partial_files(self.directory)
            if removed and self.verbose:
                print(
                    f"SnapshotCheckpoint: removed {len(removed)} incomplete "
                    f"write(s) left in {self.directory}."
                )
        self._steps_due = {}
        self._planned = False

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        # Read once per epoch; batch hooks then only add the batch index.
        self._epoch_start_step = self._current_step()
        if not self._planned and self._schedule is not None:
            # Once per `fit`: the manifest may change under a non-chief
            # worker later, and the workers must agree on the steps.
            self._steps_due = self._plan(self._epoch_start_step)
            self._planned = True

    def on_train_batch_begin(self, batch, logs=None):
        step = self._epoch_start_step + batch
        if step in self._steps_due:
            self._save_snapshot(step, batch=batch, logs=None)

    def on_epoch_end(self, epoch, logs=None):
        step = self._current_step()
        if step in self._steps_due:
            self._save_snapshot(step, batch=None, logs=logs)

    def on_train_end(self, logs=None):
        if self.model is not None and self._schedule is not None:
            step = self._current_step()
            if step in self._steps_due:
                self._save_snapshot(step, batch=None, logs=logs)
        self._steps_due = {}

    # Snapshots --------------------------------------------------------------

    def _plan(self, step: int) -> dict:
        """Snapshots still to take, `{step: index}`, given the current step.

        Entries of the manifest from steps the run has not reached (a resumed
        run that went back to an earlier backup) are stale: they are removed
        and taken again.
        """
        schedule = self._schedule
        manifest = self._read_or_new_manifest()
        stale = [e for e in manifest["snapshots"] if e["step"] > step]
        if stale and self._chief:
            manifest["snapshots"] = [
                e for e in manifest["snapshots"] if e["step"] <= step
            ]
            # Manifest first: a kill between the two steps leaves a stray
            # file, never a manifest entry whose file is gone.
            manifest_lib.write_manifest(self.directory, manifest)
            for entry in stale:
                path = manifest_lib.snapshot_path(self.directory, entry)
                if os.path.exists(path):
                    os.remove(path)
            warnings.warn(
                f"SnapshotCheckpoint: training is at step {step}; removed "
                f"snapshot(s) {[e['index'] for e in stale]} taken at later "
                "steps by an earlier run. They are taken again when the run "
                "reaches them.",
                stacklevel=2,
            )
        # Other workers leave the files alone but plan as the chief does:
        # every worker must save at the same steps (saving runs collective
        # ops under MultiWorkerMirroredStrategy).
        taken = {e["step"] for e in manifest["snapshots"] if e["step"] <= step}
        return {
            end: index
            for index, end in enumerate(schedule.cycle_end_steps, start=1)
            if end >= step and end not in taken
        }

    def _read_or_new_manifest(self) -> dict:
        schedule = self._schedule
        try:
            manifest = manifest_lib.read_manifest(self.directory)
        except FileNotFoundError:
            return manifest_lib.new_manifest(
                schedule.cycle_length, schedule.cycle_end_steps
            )
        previous = manifest.get("cycle_end_steps")
        if previous != schedule.cycle_end_steps:
            raise ValueError(
                f"The snapshot directory {self.directory} holds snapshots of "
                f"another schedule (cycle ends {previous}, this run: "
                f"{schedule.cycle_end_steps}). Use a new "
                "directory for a new run, or delete the old snapshots."
            )
        return manifest

    def _training_logs(self, logs):
        if logs is None:
            # Mid-epoch: the running metrics of the epoch so far.
            try:
                logs = self.model.get_metrics_result()
            except Exception:  # Metrics not built yet.
                logs = {}
        result = {}
        for key, value in (logs or {}).items():
            number = _to_float(value)
            if number is not None:
                result[key] = number
        return result

    def _save_snapshot(self, step: int, batch, logs) -> None:
        index = self._steps_due.pop(step)
        # The JAX trainer keeps its state outside the model between steps.
        if hasattr(self.model, "jax_state_sync"):
            self.model.jax_state_sync()
        learning_rate = self._learning_rate_of_step(max(step - 1, 0))
        epoch = self._epoch + 1
        if batch == 0:
            # Before any batch of this epoch: no running metrics yet. A
            # resumed run retakes here a snapshot due at the end of the
            # previous epoch, and records it as that epoch's end.
            logs = {}
            if self._epoch > 0:
                epoch, batch = self._epoch, None
        entry = {
            "index": index,
            "file": manifest_lib.snapshot_filename(index),
            "epoch": epoch,
            "batch": batch,
            "step": step,
            "learning_rate": learning_rate,
            "logs": self._training_logs(logs),
            "batchnorm_recalibrated": self.recalibration_data is not None,
        }
        started = time.perf_counter()
        if self._chief:
            self._write(entry)
        else:
            self._write_and_discard()
        self.last_write_seconds = time.perf_counter() - started
        if self.verbose and self._chief:
            where = "end of epoch" if batch is None else f"batch {batch}"
            # On a line of its own, below Keras's progress bar.
            sys.stdout.write(
                f"\nSnapshot {index}/{self._schedule.num_snapshots} "
                f"saved at step {step} (epoch {epoch}, {where}, "
                f"lr {learning_rate:.3g}): "
                f"{os.path.join(self.directory, entry['file'])}\n"
            )
            sys.stdout.flush()

    def _save_model_to(self, path: str) -> None:
        if self.recalibration_data is None:
            self.model.save(path)
            return
        saved = save_batchnorm_statistics(self.model)
        try:
            recalibrate_batchnorm(
                self.model,
                self.recalibration_data,
                steps=self.recalibration_steps,
            )
            self.model.save(path)
        finally:
            restore_batchnorm_statistics(self.model, saved)

    def _write(self, entry: dict) -> None:
        final_path = os.path.join(self.directory, entry["file"])
        partial_dir = None
        try:
            partial_dir = manifest_lib.make_partial_dir(self.directory)
            partial_path = os.path.join(partial_dir, entry["file"])
            self._save_model_to(partial_path)
            entry["size"] = os.path.getsize(partial_path)
            entry["sha256"] = manifest_lib.sha256_of_file(partial_path)
            entry["saved_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            manifest = self._read_or_new_manifest()
            manifest_lib.commit_file(partial_path, final_path)
            manifest["snapshots"] = [
                e for e in manifest["snapshots"] if e["index"] != entry["index"]
            ] + [entry]
            manifest_lib.write_manifest(self.directory, manifest)
        except OSError as e:
            raise OSError(
                f"SnapshotCheckpoint could not write snapshot {entry['index']} "
                f"to {final_path}: {e}. The earlier snapshots and the manifest "
                f"in {self.directory} are unchanged; free some space or "
                "choose a writable directory, then resume training."
            ) from e
        finally:
            if partial_dir is not None:
                shutil.rmtree(partial_dir, ignore_errors=True)

    def _write_and_discard(self) -> None:
        # Non-chief workers take part in the save (which may run collective
        # ops) but write to a private scratch folder that is removed.
        import tempfile

        scratch = tempfile.mkdtemp(prefix="keras_snapshot_worker_")
        try:
            self._save_model_to(os.path.join(scratch, "snapshot.keras"))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
