"""`SnapshotCheckpoint`: saves one `.keras` model per learning-rate cycle."""

import math
import os
import tempfile
import time
import warnings

import keras
from keras import ops

from keras_snapshot import _fs
from keras_snapshot import manifest as manifest_lib
from keras_snapshot._checks import check_positive_int
from keras_snapshot._distribution import is_writer
from keras_snapshot._io import print_msg
from keras_snapshot._keras_compat import BACKUP_AND_RESTORE_FILES
from keras_snapshot._keras_compat import innermost_optimizer
from keras_snapshot._keras_compat import learning_rate_schedule
from keras_snapshot._steps import StepTracker
from keras_snapshot._steps import check_schedule_counts_updates
from keras_snapshot._steps import join_fit
from keras_snapshot._tensorboard import TensorBoardLog
from keras_snapshot._tensorboard import check_log_dir
from keras_snapshot._tensorboard import update_rates
from keras_snapshot.batchnorm import check_bounded_data
from keras_snapshot.batchnorm import recalibrate_batchnorm
from keras_snapshot.batchnorm import restore_batchnorm_statistics
from keras_snapshot.batchnorm import save_batchnorm_statistics
from keras_snapshot.loading import weights_are_finite
from keras_snapshot.schedule import SnapshotSchedule
from keras_snapshot.schedule import restart_steps


def _finite_number(value):
    try:
        return float(ops.convert_to_numpy(value))
    except (TypeError, ValueError):
        return None


class SnapshotCheckpoint(keras.callbacks.Callback):
    """Saves a complete `.keras` model at the end of every learning-rate cycle.

    Snapshot Ensembles (Huang et al. 2017, arXiv:1704.00109) save the model
    at each minimum of a cyclic learning rate. The cycle ends come from the
    optimizer's schedule (`SnapshotSchedule`, `FGESchedule`, Keras's
    `CosineDecayRestarts`), from `snapshot_steps=` or from `cycle_length=`;
    snapshot `k` is written right after its optimizer step, also in the
    middle of an epoch. The folder gets a `manifest.json` with each
    snapshot's step, epoch, learning rate, logs, finiteness, size and
    sha256; files are written atomically (uploaded and read back on remote
    storage) before the manifest lists them.

    Steps are optimizer updates (`optimizer.iterations`), so a run resumed
    with `keras.callbacks.BackupAndRestore` stays right: snapshots from
    steps it has not reached are moved to a `superseded-*` subfolder and
    taken again. A local folder is locked while `fit` runs.

    Args:
        directory: Folder for the snapshots and manifest; created if needed.
            A local path or a remote one that `tf.io.gfile` supports
            (`gs://bucket/run/snapshots`). It must not be (or be inside) a
            `BackupAndRestore` folder.
        cycle_length: Steps per cycle, only when the optimizer's schedule
            does not say where cycles end.
        num_snapshots: With `cycle_length` or a `CosineDecayRestarts`
            schedule: the number of snapshots (default: as many cycles as
            the `fit` call runs).
        snapshot_steps: Explicit step counts after which to save, e.g.
            `[1000, 3000, 7000]`; overrides the schedule.
        recalibration_data: Optional training inputs (array, `(x, y)` tuple
            or finite `tf.data.Dataset`). Each snapshot is then saved with
            its BatchNorm statistics recomputed on it (see
            `recalibrate_batchnorm`); the model being trained keeps its own.
        recalibration_steps: Batches of `recalibration_data` to use; needed
            for an endless dataset.
        ema_weights: With an optimizer built with `use_ema=True`, save the
            moving average of the weights instead of the weights trained at
            the cycle end (the default).
        verbose: 1 prints one line per snapshot, 0 is silent.
        log_dir: The `log_dir` of the fit's `keras.callbacks.TensorBoard`:
            the learning rate of every update and the snapshots go into its
            `train` run (docs/tensorboard.md). None logs nothing.

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
        snapshot_steps: list | None = None,
        recalibration_data=None,
        recalibration_steps: int | None = None,
        ema_weights: bool = False,
        verbose: int = 1,
        log_dir: str | None = None,
    ):
        super().__init__()
        if not isinstance(directory, (str, os.PathLike)) or not str(directory):
            raise ValueError(
                "`directory` must be a path to a folder for the snapshots. "
                f"Received: directory={directory!r}."
            )
        if cycle_length is not None:
            check_positive_int("cycle_length", cycle_length)
        if num_snapshots is not None:
            check_positive_int("num_snapshots", num_snapshots)
        if snapshot_steps is not None:
            steps = [
                check_positive_int("snapshot_steps", s) for s in snapshot_steps
            ]
            if not steps or steps != sorted(set(steps)):
                raise ValueError(
                    "`snapshot_steps` must be a non-empty list of increasing "
                    f"positive step counts. Received: snapshot_steps="
                    f"{snapshot_steps!r}."
                )
            if cycle_length is not None:
                raise ValueError(
                    "Pass either `snapshot_steps` or `cycle_length`, not both."
                    f" Received: snapshot_steps={snapshot_steps!r}, "
                    f"cycle_length={cycle_length}."
                )
        if recalibration_steps is not None:
            check_positive_int("recalibration_steps", recalibration_steps)
        if recalibration_data is not None:
            check_bounded_data(recalibration_data, recalibration_steps)
        self.directory = os.fspath(directory)
        self.cycle_length = cycle_length
        self.num_snapshots = num_snapshots
        self.snapshot_steps = snapshot_steps
        self.recalibration_data = recalibration_data
        self.recalibration_steps = recalibration_steps
        if not isinstance(ema_weights, bool):
            raise ValueError(
                "`ema_weights` must be True or False. "
                f"Received: ema_weights={ema_weights!r}."
            )
        self.ema_weights = ema_weights
        self.log_dir = check_log_dir(log_dir)
        self.verbose = verbose
        self._folder = manifest_lib.SnapshotDirectory(self.directory)
        self._cycle_ends = []
        self._steps_due = {}
        self._messages = []
        self._epoch = 0
        self._steps = StepTracker(self)
        self._tensorboard = TensorBoardLog()

    # Planning ----------------------------------------------------------------

    def _find_cycle_ends(self) -> list:
        """The step counts after which snapshots 1..M are due."""
        if self.snapshot_steps is not None:
            return list(self.snapshot_steps)
        schedule = learning_rate_schedule(self.model.optimizer)
        if isinstance(schedule, keras.optimizers.schedules.CosineDecayRestarts):
            total = self._steps.fit_updates()
            if total is None:
                raise ValueError(
                    "With CosineDecayRestarts and data of unknown length, "
                    "SnapshotCheckpoint cannot count the restarts: pass "
                    "`steps_per_epoch` to fit or `snapshot_steps=`."
                )
            ends = restart_steps(schedule, total)
            return ends[: self.num_snapshots] if self.num_snapshots else ends
        if hasattr(schedule, "cycle_end_steps"):
            if self.cycle_length not in (None, schedule.cycle_length):
                raise ValueError(
                    f"`cycle_length={self.cycle_length}` disagrees with the "
                    f"optimizer's {type(schedule).__name__}, whose cycle "
                    f"length is {schedule.cycle_length}. Leave `cycle_length`"
                    " unset to follow the schedule."
                )
            return list(schedule.cycle_end_steps)
        if self.cycle_length is None:
            raise ValueError(
                "SnapshotCheckpoint cannot tell where the cycles end: compile "
                "with a `SnapshotSchedule`, `FGESchedule` or "
                "`CosineDecayRestarts`, or pass `cycle_length=` or "
                "`snapshot_steps=`. Received: "
                f"optimizer={type(self.model.optimizer).__name__} with "
                f"learning_rate={schedule or 'a constant'}."
            )
        count = self.num_snapshots
        if count is None:
            total = self._steps.fit_updates()
            if total is None:
                raise ValueError(
                    "With `cycle_length` and a dataset of unknown length, "
                    "SnapshotCheckpoint cannot count the cycles: pass "
                    "`num_snapshots=` as well."
                )
            count = max(1, total // self.cycle_length)
        # The schedule is the one place that knows the cycle arithmetic.
        return SnapshotSchedule(
            1.0, self.cycle_length * count, count
        ).cycle_end_steps

    def _plan(self, step: int) -> dict:
        """Snapshots still to take, `{step: index}`; later ones set aside."""
        manifest = self._folder.read_or_new(self._cycle_ends)
        shorter = min(len(manifest.cycle_end_steps), len(self._cycle_ends))
        # A plan that grows with the fit (SGDR restarts counted over a
        # longer fit) keeps its earlier cycle ends: that is the same run.
        if manifest.entries and (
            manifest.cycle_end_steps[:shorter] != self._cycle_ends[:shorter]
        ):
            raise ValueError(
                f"{self.directory} holds snapshots of another schedule (cycle "
                f"ends {manifest.cycle_end_steps}, this run: "
                f"{self._cycle_ends}): use a new directory for a new run."
            )
        if self._writer and not self._folder.has_manifest():
            foreign = self._folder.unlisted_snapshot_files(manifest)
            if foreign:
                raise FileExistsError(
                    f"{self.directory} holds {foreign[:5]} but no "
                    f"{manifest_lib.MANIFEST_NAME}: SnapshotCheckpoint did not "
                    "write them and would overwrite them. Use another folder "
                    "or move those files away."
                )
        manifest.cycle_end_steps = list(self._cycle_ends)
        if self._writer and not self._folder.has_manifest():
            self._folder.write(manifest)
        stale = [e for e in manifest.entries if e.step > step]
        if stale and self._writer:
            aside = self._folder.set_aside(manifest, stale)
            warnings.warn(
                f"SnapshotCheckpoint: training is at step {step}; snapshot(s)"
                f" {[e.index for e in stale]} from later steps of an earlier "
                f"run were moved to {aside} and are taken again when this "
                "run reaches them.",
                stacklevel=2,
            )
        taken = {e.step for e in manifest.entries if e.step <= step}
        self._warn_if_fit_misses_cycles(step)
        due = {
            end: index
            for index, end in enumerate(self._cycle_ends, start=1)
            if end >= step and end not in taken
        }
        self._steps.refuse_unreachable(
            step,
            due,
            self._epoch,
            what="the snapshots",
            fix="Choose cycle ends that are multiples of steps_per_execution "
            "from the start of their epoch, or a smaller steps_per_execution.",
        )
        return due

    def _warn_if_fit_misses_cycles(self, step: int) -> None:
        left = self._steps.fit_updates(self._epoch)
        if left is None:
            return
        last_step = step + left
        missed = [s for s in self._cycle_ends if s > last_step]
        if missed:
            epochs, steps = self.params["epochs"], self.params["steps"]
            warnings.warn(
                f"SnapshotCheckpoint: this fit stops at step {last_step} "
                f"({epochs} epochs of {steps} steps), before the cycle ends "
                f"{missed}: {len(missed)} of {len(self._cycle_ends)} "
                "snapshots will not be taken. Compute `total_steps` from the "
                "steps fit really runs per epoch (validation_split and "
                "batch_size change it).",
                stacklevel=3,
            )
        schedule = learning_rate_schedule(self.model.optimizer)
        total = getattr(schedule, "total_steps", None)
        if total is not None and last_step > total:
            warnings.warn(
                f"SnapshotCheckpoint: this fit runs to step {last_step}, past "
                f"the schedule's total_steps={total}; from there the "
                "learning rate restarts a cycle that no snapshot ends.",
                stacklevel=3,
            )

    def _check_not_in_backup_folder(self) -> None:
        folder = _fs.absolute(self.directory)
        while folder is not None:
            found = [
                name
                for name in BACKUP_AND_RESTORE_FILES
                if _fs.exists(_fs.join(folder, name))
            ]
            if found:
                raise ValueError(
                    f"The snapshot directory {self.directory} is inside the "
                    f"BackupAndRestore folder {folder} (it holds {found}), and "
                    "BackupAndRestore deletes its folder when training ends. "
                    "Use separate folders, e.g. run/snapshots and run/backup."
                )
            folder = _fs.parent(folder)

    # Keras hooks --------------------------------------------------------------

    def set_params(self, params):
        super().set_params(params)
        join_fit(self)  # FreezeOut in the same fit refuses it here.

    def on_train_begin(self, logs=None):
        self._steps.attach()
        if self.ema_weights and not getattr(
            innermost_optimizer(self.model.optimizer), "use_ema", False
        ):
            raise ValueError(
                "SnapshotCheckpoint(ema_weights=True) needs an optimizer that "
                "keeps a moving average. Build it with `use_ema=True`, or "
                "leave ema_weights=False. Received: "
                f"optimizer={type(self.model.optimizer).__name__} with "
                "use_ema=False."
            )
        if self.snapshot_steps is None:
            check_schedule_counts_updates(
                "SnapshotCheckpoint", self.model.optimizer
            )
        self._cycle_ends = self._find_cycle_ends()
        self._writer = is_writer(self.model)
        if self._writer:
            self._check_not_in_backup_folder()
            removed = self._folder.prepare()
            self._folder.lock()
            if removed and self.verbose:
                print_msg(
                    f"SnapshotCheckpoint: removed {len(removed)} incomplete "
                    f"write(s) left in {self.directory}."
                )
        self._steps_due = {}
        self._tensorboard.open(self.log_dir, self.model)

    def _take_due(self, step: int, batch, logs) -> None:
        """Takes the snapshot due at `step`; reports the ones passed by."""
        passed = sorted(s for s in self._steps_due if s < step)
        for due in passed:
            index = self._steps_due.pop(due)
            warnings.warn(
                f"SnapshotCheckpoint: snapshot {index} was due at step {due}, "
                f"but the optimizer was at step {step} when Keras next "
                "called back; it is not taken.",
                stacklevel=3,
            )
        if step in self._steps_due:
            self._save_snapshot(step, batch=batch, logs=logs)

    def _take_last_if_short(self, step: int, logs) -> None:
        """Takes the last snapshot when loss scaling skipped updates.

        Only when the last cycle end alone is missed, by no more updates than
        were skipped; the manifest records it as `planned_step`.
        """
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        if (
            not self._steps_due
            or list(self._steps_due) != [self._cycle_ends[-1]]
            or self.model.stop_training
            or not epochs
            or not steps
            or self._epoch != epochs - 1
            or self._steps.fit_start_step is None
        ):
            return
        due = self._cycle_ends[-1]
        run = self._steps.updates_run()
        skipped = run - (step - self._steps.fit_start_step)
        if 0 < due - step <= skipped:
            warnings.warn(
                f"SnapshotCheckpoint: {skipped} update(s) were skipped (loss "
                f"scaling), so training ended at step {step}, before the "
                f"last cycle end {due}: the last snapshot is taken at step "
                f"{step} and recorded with planned_step={due}.",
                stacklevel=3,
            )
            self._save_snapshot(step, None, logs, due=due)

    def on_epoch_begin(self, epoch, logs=None):
        # The last epoch's messages, now that its progress bar is complete.
        self._flush_messages()
        self._epoch = epoch
        step = self._steps.epoch_begin()
        if self._steps.starts_fit:
            # After BackupAndRestore has restored the optimizer's step,
            # once per fit (all workers must agree).
            self._steps_due = self._plan(step)

    def on_train_batch_begin(self, batch, logs=None):
        due = min(self._steps_due) if self._steps_due else None
        step = self._steps.poll(batch, due)
        if step is not None:
            self._take_due(step, batch, None)

    def on_epoch_end(self, epoch, logs=None):
        self._steps.epoch_end()
        step = self._steps.read()
        self._take_due(step, None, logs)
        self._log_learning_rates(step)
        if self._writer:
            self._check_not_in_backup_folder()

    def _log_learning_rates(self, step: int) -> None:
        """TensorBoard: the rate of every update since the last call."""
        start = self._steps.fit_start_step
        if not self._tensorboard.active or start is None:
            return
        steps = self._tensorboard.new_steps(start, step)
        rates = update_rates(
            self.model.optimizer, steps, self._steps.accumulation
        )
        self._tensorboard.scalars("learning_rate", rates, steps)

    def on_train_end(self, logs=None):
        try:
            step = self._steps.read()
            if self._steps.fit_start_step is None:
                # A run restored at its very end runs no epoch: plan here;
                # its snapshots belong to the last epoch.
                self._epoch = max((self.params or {}).get("epochs", 1) - 1, 0)
                self._steps_due = self._plan(step)
            self._take_due(step, None, logs)
            self._take_last_if_short(step, logs)
            self._log_learning_rates(step)
            self._flush_messages()
            if self._writer:
                self._check_not_in_backup_folder()
                self._warn_if_snapshots_missing(step)
        finally:
            self._steps_due = {}
            self._folder.unlock()
            self._tensorboard.close()

    def _warn_if_snapshots_missing(self, step: int) -> None:
        # A last snapshot taken short of its cycle end counts as its own.
        taken = {
            e.planned_step or e.step
            for e in self._folder.read_or_new([]).entries
        }
        due = [s for s in self._cycle_ends if s <= step or s in taken]
        missing = [s for s in due if s not in taken]
        if missing or len(due) < len(self._cycle_ends):
            warnings.warn(
                f"SnapshotCheckpoint: training ended at step {step} with "
                f"{len(due) - len(missing)} of {len(self._cycle_ends)} "
                f"snapshots in {self.directory}.",
                stacklevel=2,
            )

    def _flush_messages(self) -> None:
        for message in self._messages:
            print_msg(message)
        self._messages = []

    # Snapshots --------------------------------------------------------------

    def _training_logs(self, logs):
        if logs is None:
            # Mid-epoch: the running metrics of the epoch so far.
            logs = (
                self.model.get_metrics_result() if self.model.compiled else {}
            )
        result = {}
        for key, value in (logs or {}).items():
            number = _finite_number(value)
            if number is not None:
                result[key] = number
        return result

    def _save_snapshot(self, step: int, batch, logs, due=None) -> None:
        """Saves the snapshot due at `due` (default `step`) at `step`."""
        due = step if due is None else due
        index = self._steps_due.pop(due)
        epoch = self._epoch + 1
        if batch == 0:
            # Before any batch of this epoch: no running metrics yet. A
            # resumed run retakes here a snapshot due at the end of the
            # previous epoch, and records it as that epoch's end.
            logs = {}
            if self._epoch > 0:
                epoch, batch = self._epoch, None
        logs = self._training_logs(logs)
        schedule = learning_rate_schedule(self.model.optimizer)
        # The rate of the update that made step `step`: Keras called the
        # schedule with that update's last batch count.
        batch_count = step * self._steps.accumulation - 1
        rate = schedule(max(batch_count, 0)) if schedule else None
        entry = manifest_lib.SnapshotEntry(
            index=index,
            file=manifest_lib.snapshot_filename(index),
            step=step,
            epoch=epoch,
            batch=batch,
            learning_rate=_finite_number(
                rate
                if rate is not None
                else innermost_optimizer(self.model.optimizer).learning_rate
            ),
            logs=logs,
            finite=_all_finite(self.model, logs),
            batchnorm_recalibrated=self.recalibration_data is not None,
            planned_step=None if due == step else due,
        )
        if not entry.finite:
            warnings.warn(
                f"SnapshotCheckpoint: snapshot {index} at step {step} has "
                "NaN or infinite weights or loss (the training diverged). It "
                "is saved and marked `finite: false` in the manifest; "
                "build_ensemble refuses it unless `allow_nonfinite=True`. "
                "Lower the learning rate.",
                stacklevel=2,
            )
        if self._writer:
            self._write(entry)
            self._tensorboard.scalar("snapshot", index, step)
            self._tensorboard.text("snapshot_file", entry.file, step)
        else:
            self._write_and_discard()
        if self.verbose and self._writer:
            where = "end of epoch" if batch is None else f"batch {batch}"
            rate_text = (
                f", lr {entry.learning_rate:.3g}"
                if entry.learning_rate is not None
                else ""
            )
            short = f" of {due}" if due != step else ""
            self._messages.append(
                f"Snapshot {index}/{len(self._cycle_ends)} saved at step "
                f"{step}{short} (epoch {epoch}, {where}{rate_text}): "
                f"{_fs.join(self.directory, entry.file)}"
            )

    def _save_model_to(self, path: str) -> None:
        """Saves the model, with EMA weights and recalibrated BatchNorm if
        asked; the model being trained keeps its own values."""
        trained = None
        saved = None
        try:
            if self.ema_weights:
                variables = self.model.trainable_variables
                trained = [ops.convert_to_numpy(v) for v in variables]
                # Public Keras API: the model's variables take the average.
                self.model.optimizer.finalize_variable_values(variables)
            if self.recalibration_data is not None:
                saved = save_batchnorm_statistics(self.model)
                recalibrate_batchnorm(
                    self.model,
                    self.recalibration_data,
                    steps=self.recalibration_steps,
                )
            self.model.save(path)
        finally:
            if saved is not None:
                restore_batchnorm_statistics(self.model, saved)
            if trained is not None:
                for variable, value in zip(variables, trained):
                    variable.assign(value)

    def _write(self, entry) -> None:
        final_path = _fs.join(self.directory, entry.file)
        try:
            # Saved complete to a local scratch file, then committed:
            # renamed, or uploaded and read back on remote storage. Only
            # then does the manifest list it.
            with _fs.atomic_write(final_path) as partial_path:
                self._save_model_to(partial_path)
                entry.size = _fs.getsize(partial_path)
                entry.sha256 = _fs.sha256(partial_path)
            entry.saved_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            manifest = self._folder.read_or_new(self._cycle_ends)
            manifest.cycle_end_steps = list(self._cycle_ends)
            self._folder.add(manifest, entry)
        except OSError as e:
            raise OSError(
                f"SnapshotCheckpoint could not write snapshot {entry.index} "
                f"to {final_path}: {e}. Earlier snapshots are unchanged: free "
                "some space or choose a writable directory, then resume."
            ) from e

    def _write_and_discard(self) -> None:
        # Non-writing workers take part in the save (which may run
        # collective ops) but write to a private scratch folder.
        scratch = tempfile.mkdtemp(prefix="keras_snapshot_worker_")
        try:
            self._save_model_to(os.path.join(scratch, "snapshot.keras"))
        finally:
            _fs.rmtree(scratch, ignore_errors=True)


def _all_finite(model, logs: dict) -> bool:
    return all(math.isfinite(v) for v in logs.values()) and (
        weights_are_finite(model)
    )
