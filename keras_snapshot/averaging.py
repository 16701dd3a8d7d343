"""Weight averaging: SWA over snapshots, and a running average in `fit`.

Stochastic Weight Averaging (Izmailov, Podoprikhin, Garipov, Vetrov,
Wilson, "Averaging Weights Leads to Wider Optima and Better
Generalization", UAI 2018, arXiv:1803.05407) averages the weights that one
run visits, then recomputes the BatchNorm statistics: one model, predicting
at the cost of one model. `average_weights` averages the snapshots of a run
after training; `StochasticWeightAveraging` keeps the running average
during training. Both leave BatchNorm recalibration to
`recalibrate_batchnorm`, as PyTorch keeps `AveragedModel` and `update_bn`
apart.
"""

import io
import json
import os
import warnings

import keras
import numpy as np
from keras import ops

from keras_snapshot import _fs
from keras_snapshot._checks import check_positive_int
from keras_snapshot._io import print_msg
from keras_snapshot._steps import StepTracker
from keras_snapshot.batchnorm import batchnorm_layers
from keras_snapshot.batchnorm import recalibrate_batchnorm
from keras_snapshot.ensemble import normalize_weights
from keras_snapshot.loading import clone_model
from keras_snapshot.loading import describe
from keras_snapshot.loading import load_members

# Keys of a layer's config that do not change what its weights mean.
_IGNORED_CONFIG_KEYS = ("name",)
_IGNORED_CONFIG_SUFFIXES = ("_initializer",)


def _leaf_layers(model) -> list:
    """Every layer that is not itself a model, nested models entered."""
    found = []

    def visit(layer):
        children = getattr(layer, "layers", None)
        if children:
            for child in children:
                visit(child)
        else:
            found.append(layer)

    for layer in model.layers:
        visit(layer)
    return found


def _layer_signature(layer) -> tuple:
    config = {
        key: value
        for key, value in layer.get_config().items()
        if key not in _IGNORED_CONFIG_KEYS
        and not key.endswith(_IGNORED_CONFIG_SUFFIXES)
    }
    return type(layer).__name__, json.dumps(config, sort_keys=True, default=str)


def _is_float(variable) -> bool:
    return "float" in str(variable.dtype)


def check_same_architecture(models: list, names: list | None = None) -> None:
    """Checks that the weights of `models` can be averaged one to one.

    The members must have the same variables (count, shapes and dtypes, in
    the same order) and the same layers with the same configurations
    (layer names and initializers aside).

    Raises:
        ValueError: naming the first member that differs from the first.

    Example:

    ```python
    check_same_architecture([model_a, model_b])
    ```
    """
    names = names or [f"model {m.name!r}" for m in models]
    reference, reference_name = models[0], names[0]
    ref_vars = [(tuple(v.shape), str(v.dtype)) for v in reference.weights]
    ref_layers = [_layer_signature(layer) for layer in _leaf_layers(reference)]
    for model, name in zip(models[1:], names[1:]):
        variables = [(tuple(v.shape), str(v.dtype)) for v in model.weights]
        if len(variables) != len(ref_vars):
            raise ValueError(
                f"Cannot average the weights of {name}: it has "
                f"{len(variables)} variables, but {reference_name} has "
                f"{len(ref_vars)}. All members must share one architecture "
                "(snapshots of one run do)."
            )
        for i, (mine, theirs) in enumerate(zip(variables, ref_vars)):
            if mine != theirs:
                raise ValueError(
                    f"Cannot average the weights of {name}: its variable "
                    f"{model.weights[i].path} has shape/dtype {mine}, but "
                    f"{reference_name} has {theirs} "
                    f"({reference.weights[i].path}). All members must share "
                    "one architecture."
                )
        signatures = [_layer_signature(layer) for layer in _leaf_layers(model)]
        if len(signatures) != len(ref_layers):
            raise ValueError(
                f"Cannot average the weights of {name}: it has "
                f"{len(signatures)} layers, but {reference_name} has "
                f"{len(ref_layers)}. All members must share one architecture."
            )
        for mine, theirs in zip(signatures, ref_layers):
            if mine != theirs:
                raise ValueError(
                    f"Cannot average the weights of {name}: its layer "
                    f"{mine[0]} {mine[1]} differs from {theirs[0]} "
                    f"{theirs[1]} in {reference_name}. All members must "
                    "share one architecture."
                )


def _model_with_weights(
    template, arrays: list, safe_mode=True, custom_objects=None
):
    """A new model of `template`'s architecture holding `arrays`."""
    model = clone_model(template, safe_mode, custom_objects)
    if len(model.weights) != len(arrays):
        raise ValueError(
            f"Could not rebuild {template.name!r} with clone_model: the "
            f"clone has {len(model.weights)} variables instead of "
            f"{len(arrays)}. Build subclassed models before averaging."
        )
    for variable, array in zip(model.weights, arrays):
        variable.assign(np.asarray(array).astype(variable.dtype))
    return model


def _warn_batchnorm(model, recalibration_data) -> None:
    if recalibration_data is None and batchnorm_layers(model):
        warnings.warn(
            "The averaged model has BatchNormalization layers whose moving "
            "statistics are averages of the members' statistics, which do "
            "not match the averaged weights. Pass `recalibration_data` "
            "(training inputs) to recompute them, as SWA does.",
            stacklevel=3,
        )


def average_weights(
    snapshots,
    weights=None,
    recalibration_data=None,
    recalibration_steps: int | None = None,
    batch_size: int = 128,
    last: int | None = None,
    safe_mode: bool = True,
    skip_invalid: bool = False,
    custom_objects: dict | None = None,
    allow_nonfinite: bool = False,
):
    """One model whose weights are the mean of the snapshots' weights.

    SWA over snapshots (Izmailov et al. 2018, arXiv:1803.05407): the
    snapshots of one run lie in one basin, and their weight average often
    predicts about as well as their ensemble, at the cost of one model.
    Every variable is averaged, `w = sum_k a_k w_k` with `a_k =
    weights[k] / sum(weights)` (equal by default), the BatchNorm moving
    statistics too. Those averaged statistics do not belong to the averaged
    weights: pass `recalibration_data` to recompute them on training data
    with `recalibrate_batchnorm` (SWA needs this for BatchNorm models; a
    warning says so otherwise).

    The members must share an architecture (same variables and layer
    configurations, names and initializers aside); the first that does not
    is named in the error. The result is a clone of the first member's
    architecture (`keras.models.clone_model`), not compiled; the members are
    not changed.

    Args:
        snapshots: A directory written by `SnapshotCheckpoint`, a list of
            `.keras` paths, or a list of Keras models.
        weights: Optional non-negative weight per member (after `last`).
        recalibration_data: Optional training inputs (array, `(x, y)` or a
            `tf.data.Dataset`) to recompute the BatchNorm statistics.
        recalibration_steps: Optional limit on the batches used for that.
        batch_size: Batch size of the recalibration over arrays.
        last: Average only the last `last` snapshots.
        safe_mode, skip_invalid, custom_objects, allow_nonfinite: How the
            snapshots are loaded, the same for every loader: see
            `keras_snapshot.loading.LoadOptions`.

    Returns:
        A new `keras.Model` with the averaged weights.

    Example:

    ```python
    swa = keras_snapshot.average_weights(
        "snapshots", last=3, recalibration_data=x_train
    )
    swa.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    swa.evaluate(x_test, y_test)
    ```
    """
    check_positive_int("batch_size", batch_size)
    if recalibration_steps is not None:
        check_positive_int("recalibration_steps", recalibration_steps)
    loaded = load_members(
        snapshots,
        last=last,
        safe_mode=safe_mode,
        skip_invalid=skip_invalid,
        custom_objects=custom_objects,
        allow_nonfinite=allow_nonfinite,
    )
    members = [member.model for member in loaded]
    check_same_architecture(members, [describe(m) for m in loaded])
    if weights is None:
        coefficients = np.full(len(members), 1.0 / len(members))
    else:
        coefficients = normalize_weights(weights, len(members))
    first = members[0]
    averaged = []
    for i, variable in enumerate(first.weights):
        if not _is_float(variable):
            # Integer state (e.g. counters) is not averaged.
            averaged.append(ops.convert_to_numpy(variable))
            continue
        total = np.zeros(tuple(variable.shape), dtype=np.float64)
        for coefficient, member in zip(coefficients, members):
            value = ops.convert_to_numpy(member.weights[i])
            total += coefficient * value.astype(np.float64)
        averaged.append(total)
    model = _model_with_weights(first, averaged, safe_mode, custom_objects)
    if recalibration_data is not None:
        recalibrate_batchnorm(
            model, recalibration_data, batch_size, recalibration_steps
        )
    else:
        _warn_batchnorm(model, recalibration_data)
    return model


_STATE_PREFIX = "swa-state-"


class StochasticWeightAveraging(keras.callbacks.Callback):
    """Keeps the running average of the weights during training (SWA).

    Stochastic Weight Averaging (Izmailov et al. 2018, arXiv:1803.05407)
    trains with a constant or cyclic rate in its final phase and averages
    the weights visited: `w_swa <- (n w_swa + w) / (n + 1)` after each
    averaged step, `n` the number averaged so far. This callback does that
    either at the end of every epoch from epoch `start_epoch` on (the model
    after `start_epoch` epochs is the first averaged), or every
    `every_steps` optimizer steps from step `start_step` on (the first
    averaged model is the one after `start_step` steps, also in the middle
    of an epoch: with a cyclic rate set `every_steps` to the cycle length
    and `start_step` to the end of a cycle). Every variable is averaged, the
    BatchNorm moving statistics too; recompute those with
    `recalibration_data`.

    At the end of training the average can be saved (`filepath`, a `.keras`
    file written atomically, without optimizer) and/or put into the model
    (`set_weights_at_end`). `averaged_model()` returns it at any time.

    Resuming: with `backup_dir`, the running average, its count and the
    optimizer step of its last update are written after every update to a
    small `.npz` file in `backup_dir` (atomically: temporary file, then
    rename), the last few kept. When training resumes through
    `keras.callbacks.BackupAndRestore` (with its default
    `save_freq="epoch"`) or from `initial_epoch`, the callback reads the
    optimizer's step count and takes the saved average of that step; an
    update due exactly at that step that was lost in a kill is redone from
    the restored weights. The average then equals an uninterrupted run's.
    Put it in any order with `BackupAndRestore`. Files from steps the
    resumed run has not reached are dropped. The files stay after
    training, so that a later `fit` continues the average.

    Args:
        start_epoch: Average at the end of every epoch from the
            `start_epoch`-th (1-based) on. Not with `every_steps`.
        start_step: With `every_steps`: the optimizer step count of the
            first averaged model.
        every_steps: Average every that many optimizer steps.
        filepath: Optional `.keras` path for the averaged model at the end.
        set_weights_at_end: Put the averaged weights into the model at the
            end of training (recalibrated if `recalibration_data` is set).
        backup_dir: Optional folder for the running average, to resume.
        recalibration_data: Optional training inputs; the BatchNorm
            statistics of the averaged model are recomputed on them.
        recalibration_steps: Optional limit on the batches used for that.
        verbose: 1 prints a line when training resumes an average and when
            the averaged model is saved; 0 is silent.

    Example:

    ```python
    # 20 epochs: the last 5 at a constant rate, averaged every epoch.
    swa = keras_snapshot.StochasticWeightAveraging(
        start_epoch=16, filepath="swa.keras", backup_dir="swa_state",
        recalibration_data=x_train,
    )
    model.fit(x_train, y_train, epochs=20, callbacks=[
        keras.callbacks.BackupAndRestore("backup"), swa,
    ])
    swa_model = keras.saving.load_model("swa.keras")
    ```
    """

    def __init__(
        self,
        start_epoch: int | None = None,
        start_step: int | None = None,
        every_steps: int | None = None,
        filepath: str | None = None,
        set_weights_at_end: bool = False,
        backup_dir: str | None = None,
        recalibration_data=None,
        recalibration_steps: int | None = None,
        verbose: int = 1,
    ):
        super().__init__()
        if every_steps is None:
            if start_step is not None:
                raise ValueError(
                    "`start_step` needs `every_steps` (average every that "
                    "many steps); to average at epoch ends pass "
                    f"`start_epoch`. Received: start_step={start_step}, "
                    "every_steps=None."
                )
            if start_epoch is None:
                raise ValueError(
                    "Say when averaging starts: pass `start_epoch` (average "
                    "at the end of every epoch from then on) or `start_step` "
                    "and `every_steps`. Received: start_epoch=None, "
                    "start_step=None, every_steps=None."
                )
            check_positive_int("start_epoch", start_epoch)
        else:
            check_positive_int("every_steps", every_steps)
            if start_epoch is not None:
                raise ValueError(
                    "Pass either `start_epoch` (average at epoch ends) or "
                    "`start_step` with `every_steps`, not both. Received: "
                    f"start_epoch={start_epoch}, every_steps={every_steps}."
                )
            if start_step is None:
                raise ValueError(
                    "`every_steps` needs `start_step`, the step count of the "
                    "first averaged model. Received: start_step=None, "
                    f"every_steps={every_steps}."
                )
            check_positive_int("start_step", start_step)
        if filepath is not None and not str(filepath).endswith(".keras"):
            raise ValueError(
                "`filepath` must end in `.keras`. Received: "
                f"filepath={filepath!r}."
            )
        if backup_dir is not None and (
            not isinstance(backup_dir, (str, os.PathLike))
            or not str(backup_dir)
        ):
            raise ValueError(
                "`backup_dir` must be a path to a folder. Received: "
                f"backup_dir={backup_dir!r}."
            )
        if recalibration_steps is not None:
            check_positive_int("recalibration_steps", recalibration_steps)
        self.start_epoch = start_epoch
        self.start_step = start_step
        self.every_steps = every_steps
        self.filepath = None if filepath is None else os.fspath(filepath)
        self.set_weights_at_end = set_weights_at_end
        self.backup_dir = None if backup_dir is None else os.fspath(backup_dir)
        self.recalibration_data = recalibration_data
        self.recalibration_steps = recalibration_steps
        self.verbose = verbose
        self._average = None
        self._count = 0
        self._last_step = -1
        self._epochs_done = 0
        self._steps = StepTracker(self)
        self._resumed = False
        self._epoch_end_steps = []

    # What is averaged ---------------------------------------------------------

    @property
    def num_averaged(self) -> int:
        """How many models the running average holds."""
        return self._count

    def _float_variables(self, model) -> list:
        return [v for v in model.weights if _is_float(v)]

    def _current_values(self) -> list:
        # On JAX, reading `self.model` syncs the training state.
        return [
            ops.convert_to_numpy(v).astype(np.float64)
            for v in self._float_variables(self.model)
        ]

    def _averaged_values(self) -> list:
        """All of the model's variables, the float ones averaged."""
        averaged = iter(self._average)
        return [
            next(averaged) if _is_float(v) else ops.convert_to_numpy(v)
            for v in self.model.weights
        ]

    def averaged_model(self):
        """A new model holding the running average (recalibrated if set).

        Example:

        ```python
        swa_model = swa_callback.averaged_model()
        ```
        """
        if self._count == 0:
            raise ValueError(
                "No weights were averaged yet: training has not reached "
                f"{self._start_description()}."
            )
        model = _model_with_weights(self.model, self._averaged_values())
        self._recalibrate(model)
        return model

    def _recalibrate(self, model) -> None:
        if self.recalibration_data is not None:
            recalibrate_batchnorm(
                model, self.recalibration_data, steps=self.recalibration_steps
            )

    def _start_description(self) -> str:
        if self.every_steps is None:
            return f"the end of epoch {self.start_epoch}"
        return f"step {self.start_step}"

    def _is_update_step(self, step: int) -> bool:
        return (
            step >= self.start_step
            and (step - self.start_step) % self.every_steps == 0
        )

    def _update(self, step: int, epochs_done: int) -> None:
        values = self._current_values()
        if self._average is None or self._count == 0:
            self._average = values
        else:
            n = self._count
            self._average = [
                a + (w - a) / (n + 1) for a, w in zip(self._average, values)
            ]
        self._count += 1
        self._last_step = step
        self._epochs_done = epochs_done
        if self.backup_dir is not None:
            self._write_state()

    # Keras hooks --------------------------------------------------------------

    def _next_due(self) -> int | None:
        """The next step at which `every_steps` averaging is due."""
        if self.every_steps is None:
            return None
        if self._last_step < self.start_step:
            return self.start_step
        done = (self._last_step - self.start_step) // self.every_steps
        return self.start_step + (done + 1) * self.every_steps

    def _check_reachable(self, step: int, epoch: int) -> None:
        """Refuses averages due at steps no batch hook of this fit sees."""
        epochs, length = self.params.get("epochs"), self.params.get("steps")
        if (
            self.every_steps is None
            or self._steps.steps_per_execution == 1
            or not epochs
            or not length
        ):
            return
        end = step + (epochs - epoch) * length // self._steps.accumulation
        first = max(self.start_step, self._next_due() or step)
        due = range(first, end + 1, self.every_steps)
        missed = self._steps.unreachable(step, due, epochs - epoch)
        if missed:
            shown = missed[:5] + (["..."] if len(missed) > 5 else [])
            raise ValueError(
                f"With steps_per_execution={self._steps.steps_per_execution},"
                " Keras calls back only at batches 0, N, 2N, ... of each "
                f"epoch ({length} batches) and at its end, so "
                f"{len(missed)} of the averages due every {self.every_steps} "
                f"steps from step {self.start_step} (at steps {shown}) cannot "
                "be taken at their step. Choose `start_step` and "
                "`every_steps` that are multiples of steps_per_execution "
                "with an epoch length that is one too, or average per epoch "
                "(`start_epoch`)."
            )

    def _take_due(self, step: int, epochs_done: int) -> None:
        due = self._next_due()
        if due is not None and due < step:
            warnings.warn(
                f"StochasticWeightAveraging: the average due at step {due} "
                f"was not taken: the optimizer was at step {step} when Keras "
                "next called back.",
                stacklevel=3,
            )
        if step > self._last_step and self._is_update_step(step):
            self._update(step, epochs_done)

    def on_train_begin(self, logs=None):
        self._resumed = False
        self._steps.attach()

    def on_epoch_begin(self, epoch, logs=None):
        step = self._steps.epoch_begin()
        if not self._resumed:
            # After every on_train_begin: BackupAndRestore has restored.
            self._resume(step, epoch)
            self._check_reachable(step, epoch)
            self._resumed = True

    def on_train_batch_begin(self, batch, logs=None):
        step = self._steps.poll(batch, self._next_due())
        if step is not None:
            self._take_due(step, self._epochs_done)

    def on_epoch_end(self, epoch, logs=None):
        step = self._steps.read()
        if self.every_steps is None:
            if epoch + 1 >= self.start_epoch and step > self._last_step:
                self._update(step, epoch + 1)
        else:
            self._take_due(step, epoch + 1)
        self._epochs_done = epoch + 1
        self._epoch_end_steps = (self._epoch_end_steps + [step])[-2:]
        if self.backup_dir is not None:
            self._prune_states()

    def on_train_end(self, logs=None):
        if self.model is None:
            return
        step = self._steps.read()
        if self.every_steps is not None:
            self._take_due(step, self._epochs_done)
        if self._count == 0:
            if self.filepath or self.set_weights_at_end:
                warnings.warn(
                    "StochasticWeightAveraging averaged no weights: training "
                    f"ended at step {step}, before "
                    f"{self._start_description()}. Nothing was saved or set.",
                    stacklevel=2,
                )
            return
        if self.filepath is not None:
            self._save_averaged(self.averaged_model())
        if self.set_weights_at_end:
            for variable, value in zip(
                self.model.weights, self._averaged_values()
            ):
                variable.assign(np.asarray(value).astype(variable.dtype))
            self._recalibrate(self.model)
            if self.recalibration_data is None:
                _warn_batchnorm(self.model, None)

    def _save_averaged(self, model) -> None:
        with _fs.atomic_write(self.filepath) as local_path:
            model.save(local_path)
        if self.verbose:
            print_msg(
                f"StochasticWeightAveraging: saved the average of "
                f"{self._count} models (last at step {self._last_step}) to "
                f"{self.filepath}"
            )

    # Resuming -----------------------------------------------------------------

    def _fingerprint(self) -> dict:
        return {
            "start_epoch": self.start_epoch,
            "start_step": self.start_step,
            "every_steps": self.every_steps,
            "shapes": [
                list(v.shape) for v in self._float_variables(self.model)
            ],
        }

    def _state_files(self) -> dict:
        """`{step: path}` of the saved states in `backup_dir`."""
        found = {}
        for path in _fs.glob(self.backup_dir, f"{_STATE_PREFIX}*.npz"):
            digits = _fs.basename(path)[len(_STATE_PREFIX) : -len(".npz")]
            if digits.isdigit():
                found[int(digits)] = path
        return found

    def _write_state(self) -> None:
        metadata = {
            **self._fingerprint(),
            "count": self._count,
            "step": self._last_step,
            "epochs_done": self._epochs_done,
        }
        arrays = {f"average_{i}": a for i, a in enumerate(self._average)}
        name = f"{_STATE_PREFIX}{self._last_step:010d}.npz"
        with _fs.atomic_write(_fs.join(self.backup_dir, name)) as local_path:
            np.savez(
                local_path, metadata=np.array(json.dumps(metadata)), **arrays
            )
        self._prune_states()

    def _prune_states(self) -> None:
        """Keeps the newest state and the newest at each of the last two
        epoch ends (where `BackupAndRestore` may resume)."""
        states = self._state_files()
        keep = set()
        if states:
            keep.add(max(states))
        for end in self._epoch_end_steps:
            before = [s for s in states if s <= end]
            if before:
                keep.add(max(before))
        for step, path in states.items():
            if step not in keep:
                _fs.remove(path)

    def _read_state(self, path: str) -> dict:
        try:
            saved = io.BytesIO(_fs.read_bytes(path))
            with np.load(saved, allow_pickle=False) as data:
                metadata = json.loads(str(data["metadata"]))
                count = len([k for k in data.files if k != "metadata"])
                average = [data[f"average_{i}"] for i in range(count)]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(
                f"Could not read the running average in {path}: {e}. Delete "
                "the file to restart the average."
            ) from e
        expected = self._fingerprint()
        got = {key: metadata.get(key) for key in expected}
        if got != expected:
            raise ValueError(
                f"{path} holds the running average of another setup "
                f"({got}), not of this callback and model ({expected}). Use "
                "a new `backup_dir` for a new run."
            )
        return {**metadata, "average": average}

    def _load_from_disk(self, step: int) -> None:
        states = self._state_files()
        stale = sorted(s for s in states if s > step)
        for s in stale:
            _fs.remove(states.pop(s))
        if stale:
            warnings.warn(
                f"StochasticWeightAveraging: training is at step {step}; "
                f"dropped the running averages saved at later steps {stale} "
                "by an earlier run.",
                stacklevel=3,
            )
        self._average, self._count = None, 0
        self._last_step, self._epochs_done = -1, 0
        if states:
            state = self._read_state(states[max(states)])
            self._average = [
                np.asarray(a, np.float64) for a in state["average"]
            ]
            self._count = int(state["count"])
            self._last_step = int(state["step"])
            self._epochs_done = int(state["epochs_done"])

    def _resume(self, step: int, epoch: int) -> None:
        """Finds the average that belongs to optimizer step `step`."""
        if self._count and self._last_step <= step:
            pass  # This object's average, still current (a later `fit`).
        elif self.backup_dir is not None:
            self._load_from_disk(step)
        else:
            self._average, self._count = None, 0
            self._last_step, self._epochs_done = -1, 0
        self._epoch_end_steps = [step]
        if self.every_steps is None:
            missing = [
                e
                for e in range(self._epochs_done + 1, epoch + 1)
                if e >= self.start_epoch
            ]
            redo = missing == [epoch]
            what = f"the end of epoch(s) {missing}"
        else:
            missing = [
                s
                for s in range(self._last_step + 1, step + 1)
                if self._is_update_step(s)
            ]
            redo = missing == [step]
            what = f"step(s) {missing}"
        if missing and not redo:
            raise ValueError(
                f"StochasticWeightAveraging should have averaged the model "
                f"at {what}, before training resumed at step {step} (epoch "
                f"{epoch}), but no saved average covers them"
                + (
                    f" in {self.backup_dir}"
                    if self.backup_dir
                    else "; pass `backup_dir` to resume an average"
                )
                + ". Resume with BackupAndRestore(save_freq='epoch'), or "
                "start averaging at or after the current step/epoch."
            )
        if redo:
            # The restored weights are the weights of that step.
            self._update(step, epoch)
        if self._count and self.verbose:
            print_msg(
                f"StochasticWeightAveraging: resumed at step {step} with the "
                f"average of {self._count} models."
            )
