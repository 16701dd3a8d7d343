"""Weight averaging, during `fit` and after it: SWA, EMA and model soups.

Every average here folds values in with one rule, `fold(avg, x, w) = avg +
w (x - avg)`: `w = 1 / (n + 1)` keeps the equal-weight mean (Stochastic
Weight Averaging, Izmailov et al. 2018, arXiv:1803.05407; the uniform and
greedy soups of Wortsman et al. 2022, arXiv:2203.05482), `w = 1 - decay_t`
an exponential moving average (`ema_weight`, warm-up as in TensorFlow's
`ExponentialMovingAverage(num_updates=...)`), as PyTorch's `AveragedModel`
does both. `WeightAveraging` keeps the running average in `fit` (in Keras
variables that `BackupAndRestore` saves with the weights);
`average_weights` averages saved models afterwards. Averaged models are
rebuilt by `keras_snapshot.loading.model_with_weights`; BatchNorm
recalibration stays apart (`recalibrate_batchnorm`), as PyTorch keeps
`update_bn` apart.
"""

import contextlib
import json
import math
import os
import random
import warnings
import weakref

import keras
import numpy as np
from keras import ops

from keras_snapshot import _fs
from keras_snapshot._checks import check_in_range
from keras_snapshot._checks import check_labels
from keras_snapshot._checks import check_positive_int
from keras_snapshot._deprecation import module_getattr
from keras_snapshot._io import print_msg
from keras_snapshot._keras_compat import innermost_optimizer
from keras_snapshot._keras_compat import model_checkpoint_best
from keras_snapshot._scoring import check_metric
from keras_snapshot._scoring import score
from keras_snapshot._steps import StepTracker
from keras_snapshot._steps import join_fit
from keras_snapshot._steps import optimizer_updates
from keras_snapshot._tensorboard import TensorBoardLog
from keras_snapshot._tensorboard import check_log_dir
from keras_snapshot.batchnorm import batchnorm_layers
from keras_snapshot.batchnorm import recalibrate_batchnorm
from keras_snapshot.ensemble import declares_probabilities
from keras_snapshot.ensemble import normalize_weights
from keras_snapshot.loading import assign_weights
from keras_snapshot.loading import describe
from keras_snapshot.loading import is_float
from keras_snapshot.loading import load_members
from keras_snapshot.loading import model_with_weights

MODES = ("swa", "ema")
DEFAULT_DECAY = 0.999
# The optimizer attribute that holds the state of each mode's average:
# `model.save_weights` (so `BackupAndRestore`) saves the optimizer's
# attributes that are Keras objects, and a fresh model ignores the entry.
_STATE_ATTRIBUTE = "keras_snapshot_{mode}_average"
# The callback that keeps each state's average (a state left by another
# callback, e.g. of an earlier fit, starts a new average).
_OWNERS = weakref.WeakKeyDictionary()


def check_writable(path: str, label: str) -> None:
    """Refuses, before training, a file path that cannot be written (its
    folder is created if needed)."""
    folder = _fs.parent(_fs.absolute(path))
    above = folder
    while above is not None and not _fs.exists(above):
        above = _fs.parent(above)
    if above is not None and not _fs.isdir(above):
        reason = f"{above} is a file, not a folder"
    else:
        probe = _fs.join(folder, f".write-check-{os.getpid()}")
        try:
            _fs.write_bytes(probe, b"")
            _fs.remove(probe)
            return
        except OSError as e:
            reason = str(e.strerror or e)
    raise OSError(
        f"{label} cannot write {path}: {reason}. Pass a path in a writable "
        f"folder. Received: filepath={path!r}."
    )


def warn_batchnorm(model, averaged_statistics: bool, stacklevel=3) -> None:
    """Warns that a BatchNorm model's statistics do not fit its weights."""
    if not batchnorm_layers(model):
        return
    which = (
        "averages of the visited models' statistics"
        if averaged_statistics
        else "those of the last trained weights"
    )
    warnings.warn(
        "The averaged model has BatchNormalization layers whose moving "
        f"statistics are {which}, which do not match the averaged weights. "
        "Pass `recalibration_data` (training inputs) to recompute them, as "
        "SWA does.",
        stacklevel=stacklevel,
    )


def fold(average, value, weight):
    """The one update rule: `average + weight * (value - average)`.

    On numpy arrays or Keras tensors alike. `weight = 1 / (n + 1)` with `n`
    values in `average` keeps their mean (SWA, the soups); `ema_weight`
    gives the EMA's.

    Example:

    ```python
    fold(np.array([1.0]), np.array([4.0]), 1 / 3)  # array([2.])
    ```
    """
    return average + weight * (value - average)


def ema_weight(decay: float, warmup: bool, count: int) -> float:
    """`w_t` of an EMA update when the average already holds `count`.

    The first update copies the weights (`w = 1`); then `w = 1 - decay_t`
    with `decay_t = min(decay, (1 + count) / (10 + count))` under warm-up
    (TensorFlow's `ExponentialMovingAverage` with `num_updates`), else
    `decay`.
    """
    if count == 0:
        return 1.0
    if warmup:
        decay = min(decay, (1.0 + count) / (10.0 + count))
    return 1.0 - decay


def _assign_copy(target, source) -> None:
    """`target.assign(source)` into a buffer of its own: on JAX an assigned
    array is shared, and `fit` donates the model's buffers to each step."""
    target.assign(ops.copy(ops.cast(source, target.dtype)))


def _averaged_dtype(variable) -> str:
    return "float64" if "64" in str(variable.dtype) else "float32"


class _AverageState(keras.layers.Layer):
    """The running average and its bookkeeping, as Keras variables.

    `count` (models in the average), `step` (the optimizer step of the last
    update, -1 before any), `epochs` (epochs done at the last update) and
    `run` (a random number drawn when the average begins: it tells a run
    resumed by `BackupAndRestore` from another run on the same files).
    It is set as an attribute of the optimizer, which does not list it in
    `optimizer.variables`, so neither the model's nor the optimizer's
    weight list changes, yet `model.save_weights` saves it.
    """

    def __init__(self, variables, **kwargs):
        super().__init__(**kwargs)
        self.shapes = [tuple(v.shape) for v in variables]
        self.average = [
            self.add_weight(
                shape=tuple(v.shape),
                dtype=_averaged_dtype(v),
                initializer="zeros",
                trainable=False,
                name=f"average_{i}",
            )
            for i, v in enumerate(variables)
        ]
        self.count = self._scalar("count", 0)
        self.step = self._scalar("step", -1)
        self.epochs = self._scalar("epochs", 0)
        self.run = self._scalar("run", 0)

    def begin(self) -> None:
        """Starts a new, empty average with a new run number."""
        self.write(0, -1, 0)
        self.run.assign(random.SystemRandom().randrange(1, 2**31 - 1))

    def run_number(self) -> int:
        return int(ops.convert_to_numpy(self.run))

    def _scalar(self, name, value):
        return self.add_weight(
            shape=(),
            dtype="int32",
            initializer=keras.initializers.Constant(value),
            trainable=False,
            name=name,
        )

    def read(self) -> tuple:
        """`(count, step, epochs)` (three scalar device reads)."""
        return tuple(
            int(ops.convert_to_numpy(v))
            for v in (self.count, self.step, self.epochs)
        )

    def write(self, count: int, step: int, epochs: int) -> None:
        self.count.assign(count)
        self.step.assign(step)
        self.epochs.assign(epochs)


class WeightAveraging(keras.callbacks.Callback):
    """Keeps a running average of the weights during training (SWA or EMA).

    After each averaged optimizer update (`optimizer.iterations`: updates
    really applied, so with gradient accumulation or loss scaling too) it
    folds every averaged variable `x` into its average on the device,
    `avg <- avg + w_t (x - avg)` (`fold`):

    - `mode="swa"`: Stochastic Weight Averaging (Izmailov et al. 2018,
      arXiv:1803.05407), `w_t = 1 / (n + 1)` with `n` models averaged: the
      mean of the weights at the end of every epoch from `start_epoch` on,
      or every `every_steps` steps from step `start_step` on.
    - `mode="ema"`: an exponential moving average, `w_t = 1 - decay_t`
      (`ema_weight`; the first update a copy; `warmup=True` forgets the
      early weights fast). By default every update is averaged.

    The average lives in Keras variables of a small state layer set as an
    attribute of the optimizer, so `keras.callbacks.BackupAndRestore`
    saves it with the weights and a killed run resumes with the average of
    the restored weights; the model's and optimizer's variable lists do not
    change, and `.keras` files saved meanwhile load into the plain
    architecture. Use one `WeightAveraging` per mode on a model.

    BatchNorm moving statistics are not averaged unless
    `average_batchnorm=True`: pass `recalibration_data` to recompute them
    for the averaged weights (`recalibrate_batchnorm`). With
    `validate_with_average=True`, validation inside `fit` runs on the
    average, swapped in and out as `keras.callbacks.SwapEMAWeights` does,
    so `val_*` logs judge the average while training continues from the
    trained weights (refused with an optimizer's own `use_ema=True`). At
    the end of training the average can be saved (`filepath`, written
    atomically) and/or put into the model (`set_weights_at_end`);
    `averaged_model()` returns it at any time.

    Args:
        mode: `"swa"` or `"ema"`.
        start_epoch: Average at the end of every epoch from the
            `start_epoch`-th (1-based) on. Not with `every_steps`.
        start_step: With `every_steps`: the optimizer step of the first
            averaged model (default for EMA: `every_steps`).
        every_steps: Average every that many optimizer steps (default for
            EMA: 1).
        decay: EMA only: the decay per update, in (0, 1) (default 0.999).
        warmup: EMA only: the warm-up `min(decay, (1 + n) / (10 + n))`.
        average_batchnorm: Average the BatchNorm moving statistics too.
        recalibration_data: Optional training inputs; the BatchNorm
            statistics of the averaged model are recomputed on them.
        recalibration_steps: Optional limit on the batches used for that.
        validate_with_average: Validate inside `fit` with the averaged
            weights.
        filepath: Optional `.keras` path for the averaged model at the end.
        set_weights_at_end: Put the averaged weights into the model at the
            end of training (recalibrated if `recalibration_data` is set).
        verbose: 1 prints a line when training resumes an average and when
            the averaged model is saved; 0 is silent.
        log_dir: The `log_dir` of the fit's `keras.callbacks.TensorBoard`
            (or any folder): the number of models averaged goes into its
            `train` run, at the optimizer step (docs/tensorboard.md). None
            logs nothing.

    Example:

    ```python
    ema = keras_snapshot.WeightAveraging(
        mode="ema", decay=0.99, warmup=True, validate_with_average=True,
        recalibration_data=x_train[:512], filepath="ema.keras",
    )
    model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=5,
              callbacks=[keras.callbacks.BackupAndRestore("backup"), ema])
    ema_model = keras.saving.load_model("ema.keras")
    ```
    """

    def __init__(
        self,
        mode: str = "swa",
        start_epoch: int | None = None,
        start_step: int | None = None,
        every_steps: int | None = None,
        decay: float | None = None,
        warmup: bool = False,
        average_batchnorm: bool = False,
        recalibration_data=None,
        recalibration_steps: int | None = None,
        validate_with_average: bool = False,
        filepath: str | None = None,
        set_weights_at_end: bool = False,
        verbose: int = 1,
        log_dir: str | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(
                f"`mode` must be one of {MODES}. Received: mode={mode!r}."
            )
        if mode == "swa":
            if decay is not None or warmup:
                raise ValueError(
                    "`decay` and `warmup` are for mode='ema'; SWA weighs "
                    "every averaged model equally. Received: "
                    f"mode='swa', decay={decay}, warmup={warmup}."
                )
        else:
            if decay is not None:
                check_in_range("decay", decay, 0.0, 1.0, include_low=False)
        self._check_schedule(mode, start_epoch, start_step, every_steps)
        if filepath is not None and not str(filepath).endswith(".keras"):
            raise ValueError(
                "`filepath` must end in `.keras`. Received: "
                f"filepath={filepath!r}."
            )
        if recalibration_steps is not None:
            check_positive_int("recalibration_steps", recalibration_steps)
        self.mode = mode
        self.start_epoch = start_epoch
        self.start_step = start_step
        self.every_steps = every_steps
        self.decay = decay
        self.warmup = warmup
        self.average_batchnorm = average_batchnorm
        self.recalibration_data = recalibration_data
        self.recalibration_steps = recalibration_steps
        self.validate_with_average = validate_with_average
        self.filepath = None if filepath is None else os.fspath(filepath)
        self.set_weights_at_end = set_weights_at_end
        self.log_dir = check_log_dir(log_dir)
        self.verbose = verbose
        # The schedule in effect (the EMA defaults filled in).
        self._every = every_steps
        self._start = start_step
        if mode == "ema" and start_epoch is None:
            self._every = every_steps or 1
            self._start = start_step or self._every
        self._decay = DEFAULT_DECAY if decay is None else float(decay)
        self._state = None
        self._pairs = []  # (model variable, average variable)
        self._count = 0
        self._last_step = -1
        self._epochs_done = 0
        self._epoch = 0
        self._steps = StepTracker(self)
        self._tensorboard = TensorBoardLog()
        self._update_fn = None
        self._training = False
        self._epoch_open = False
        self._replaced = 0  # Models in another callback's average, replaced.
        self._swapped = None  # The trained values while validating.
        # ((count, last step), BatchNorm statistics) of the last
        # recalibration of the average.
        self._recalibrated = None

    @staticmethod
    def _check_schedule(mode, start_epoch, start_step, every_steps) -> None:
        if every_steps is None:
            if start_step is not None and mode == "swa":
                raise ValueError(
                    "`start_step` needs `every_steps` (average every that "
                    "many steps); to average at epoch ends pass "
                    f"`start_epoch`. Received: start_step={start_step}, "
                    "every_steps=None."
                )
            if start_epoch is None and start_step is None:
                if mode == "ema":
                    return  # Every update.
                raise ValueError(
                    "Say when averaging starts: pass `start_epoch` (average "
                    "at the end of every epoch from then on) or `start_step` "
                    "and `every_steps`. Received: start_epoch=None, "
                    "start_step=None, every_steps=None."
                )
        else:
            check_positive_int("every_steps", every_steps)
            if start_step is None and mode == "swa":
                raise ValueError(
                    "`every_steps` needs `start_step`, the step count of the "
                    "first averaged model. Received: start_step=None, "
                    f"every_steps={every_steps}."
                )
        if start_epoch is not None and (
            every_steps is not None or start_step is not None
        ):
            raise ValueError(
                "Pass either `start_epoch` (average at epoch ends) or "
                "`start_step` with `every_steps`, not both. Received: "
                f"start_epoch={start_epoch}, every_steps={every_steps}."
            )
        if start_epoch is not None:
            check_positive_int("start_epoch", start_epoch)
        if start_step is not None:
            check_positive_int("start_step", start_step)

    def get_config(self) -> dict:
        return {
            "mode": self.mode,
            "start_epoch": self.start_epoch,
            "start_step": self.start_step,
            "every_steps": self.every_steps,
            "decay": self.decay,
            "warmup": self.warmup,
            "average_batchnorm": self.average_batchnorm,
            "recalibration_data": self.recalibration_data,
            "recalibration_steps": self.recalibration_steps,
            "validate_with_average": self.validate_with_average,
            "filepath": self.filepath,
            "set_weights_at_end": self.set_weights_at_end,
            "verbose": self.verbose,
        }

    @property
    def _label(self) -> str:
        return type(self).__name__

    # The state variables ------------------------------------------------------

    @property
    def num_averaged(self) -> int:
        """How many models the running average holds."""
        return self._count

    def _averaged_variables(self, model) -> list:
        skip = set()
        if not self.average_batchnorm:
            for layer in batchnorm_layers(model):
                skip.update(
                    id(v) for v in (layer.moving_mean, layer.moving_variance)
                )
        return [v for v in model.weights if is_float(v) and id(v) not in skip]

    def set_model(self, model):
        super().set_model(model)
        # Before any `on_train_begin`, so that `BackupAndRestore` finds the
        # state to restore whatever the order of the callbacks.
        self._attach_state(model)

    def set_params(self, params):
        super().set_params(params)
        join_fit(self)

    def check_fit_peer(self, other) -> None:
        """Refuses a second averaging callback of the same mode in the fit:
        both would keep one state (`_steps.join_fit` calls it)."""
        if isinstance(other, WeightAveraging) and other.mode == self.mode:
            raise ValueError(
                f"One fit can run one {self.mode.upper()} average: two "
                f"WeightAveraging(mode={self.mode!r}) callbacks would keep "
                "the same state. Pass one. Received: callbacks=["
                f"{self._label}, {other._label}]"
            )

    def _attach_state(self, model) -> None:
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None or not model.built:
            return
        variables = self._averaged_variables(model)
        name = _STATE_ATTRIBUTE.format(mode=self.mode)
        state = getattr(optimizer, name, None)
        shapes = [tuple(v.shape) for v in variables]
        if not isinstance(state, _AverageState) or state.shapes != shapes:
            scope = getattr(model, "distribute_strategy", None)
            if scope is not None:
                with scope.scope():
                    state = _AverageState(variables, name=name)
            else:
                state = _AverageState(variables, name=name)
            setattr(optimizer, name, state)
            state.begin()
        elif _OWNERS.get(state, lambda: None)() is not self:
            # Left by another callback (an earlier fit): a new average.
            # BackupAndRestore, which runs later, restores a saved one
            # (`_resume` says which happened).
            self._replaced = state.read()[0]
            state.begin()
        _OWNERS[state] = weakref.ref(self)
        self._state = state
        self._pairs = list(zip(variables, state.average))
        self._update_fn = None

    # What is averaged ---------------------------------------------------------

    def _weight(self) -> float:
        if self.mode == "swa":
            return 1.0 / (self._count + 1)
        return ema_weight(self._decay, self.warmup, self._count)

    def _update(self, step: int, epochs_done: int) -> None:
        """One update of the average, on the device (no host copy)."""
        if self.model is None:  # On JAX this syncs the training state.
            return
        weight = self._weight()
        self._count += 1
        self._last_step = step
        self._epochs_done = epochs_done
        if weight == 1.0:
            for variable, average in self._pairs:
                _assign_copy(average, variable.value)
            self._state.write(self._count, step, epochs_done)
        else:
            self._compiled_update()(weight, self._count, step, epochs_done)

    def _compiled_update(self):
        """`avg += w (x - avg)` for every pair and the state, in one call.

        On TensorFlow one `tf.function` (one dispatch per update instead of
        a few eager ops per variable); elsewhere the same ops eagerly.
        """
        if self._update_fn is not None:
            return self._update_fn
        pairs, state = self._pairs, self._state

        def update(weight, count, step, epochs):
            for variable, average in pairs:
                value = ops.cast(variable.value, average.dtype)
                w = ops.cast(weight, average.dtype)
                average.assign(fold(average, value, w))
            state.count.assign(ops.cast(count, "int32"))
            state.step.assign(ops.cast(step, "int32"))
            state.epochs.assign(ops.cast(epochs, "int32"))

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            compiled = tf.function(update, reduce_retracing=True)

            def call(weight, count, step, epochs):
                compiled(
                    tf.constant(weight, tf.float64),
                    tf.constant(count, tf.int32),
                    tf.constant(step, tf.int32),
                    tf.constant(epochs, tf.int32),
                )

            self._update_fn = call
        else:
            self._update_fn = update
        return self._update_fn

    def averaged_weights(self) -> list:
        """The model's weights as numpy arrays, the averaged ones averaged.

        In the order of `model.weights`; the variables that are not
        averaged (integer state, and the BatchNorm statistics unless
        `average_batchnorm`) as they are in the model now.

        Example:

        ```python
        arrays = averaging_callback.averaged_weights()
        ```
        """
        averaged = {id(v): a for v, a in self._pairs}
        return [
            ops.convert_to_numpy(averaged.get(id(v), v)).astype(v.dtype)
            for v in self.model.weights
        ]

    def averaged_model(self):
        """A new model holding the running average (recalibrated if set).

        Example:

        ```python
        swa_model = averaging_callback.averaged_model()
        ```
        """
        if self._count == 0:
            raise ValueError(
                "No weights were averaged yet: training has not reached "
                f"{self._start_description()}."
            )
        model = model_with_weights(self.model, self.averaged_weights())
        self._recalibrate(model)
        return model

    def _recalibrate(self, model) -> None:
        if self.recalibration_data is not None:
            recalibrate_batchnorm(
                model, self.recalibration_data, steps=self.recalibration_steps
            )

    def _start_description(self) -> str:
        if self._every is None:
            return f"the end of epoch {self.start_epoch}"
        return f"step {self._start}"

    def _is_update_step(self, step: int) -> bool:
        return step >= self._start and (step - self._start) % self._every == 0

    # Scheduling ---------------------------------------------------------------

    def _next_due(self) -> int | None:
        """The next step at which `every_steps` averaging is due."""
        if self._every is None:
            return None
        if self._last_step < self._start:
            return self._start
        done = (self._last_step - self._start) // self._every
        return self._start + (done + 1) * self._every

    def _check_reachable(self, step: int, epoch: int) -> None:
        """Refuses averages due at steps no batch hook of this fit sees."""
        left = self._steps.fit_updates(epoch)
        if self._every is None or left is None:
            return
        first = max(self._start, self._next_due() or step)
        self._steps.refuse_unreachable(
            step,
            range(first, step + left + 1, self._every),
            epoch,
            what=f"the averages (every {self._every} steps from step "
            f"{self._start})",
            fix="Choose `start_step` and `every_steps` that are multiples of "
            "steps_per_execution with an epoch length that is one too, or "
            "average per epoch (`start_epoch`).",
        )

    def _take_due(self, step: int, epochs_done: int) -> None:
        due = self._next_due()
        if due is not None and due < step:
            warnings.warn(
                f"{self._label}: the average due at step {due} was not "
                f"taken: the optimizer was at step {step} when Keras next "
                "called back.",
                stacklevel=3,
            )
        if step > self._last_step and self._is_update_step(step):
            self._update(step, epochs_done)

    def _catch_up(self, epoch: int) -> None:
        """Takes the update due after the epoch's last batch (once)."""
        step = self._steps.read()
        if self._every is None:
            if epoch + 1 >= self.start_epoch and step > self._last_step:
                self._update(step, epoch + 1)
        else:
            self._take_due(step, epoch + 1)

    # Keras hooks --------------------------------------------------------------

    def on_train_begin(self, logs=None):
        self._restore_trained_weights(warn=True)
        self._attach_state(self.model)
        if self._state is None:
            raise ValueError(
                f"{self._label} needs a built, compiled model. Received "
                f"model {self.model.name!r} without an optimizer."
            )
        if self.validate_with_average and getattr(
            innermost_optimizer(self.model.optimizer), "use_ema", False
        ):
            raise ValueError(
                f"{self._label}(validate_with_average=True) and an "
                "optimizer with use_ema=True would both put averaged "
                "weights into the model. Use Keras's SwapEMAWeights with "
                "use_ema=True, or use_ema=False with "
                f"{self._label}(mode='ema', validate_with_average=True). "
                "Received: use_ema=True."
            )
        if self.filepath is not None:
            check_writable(self.filepath, self._label)
        self._training = True
        self._epoch_open = False
        self._recalibrated = None
        self._steps.attach()
        self._tensorboard.open(self.log_dir, self.model)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_open = True
        step = self._steps.epoch_begin()
        if self._steps.starts_fit:
            # After every on_train_begin: BackupAndRestore has restored.
            self._resume(step, epoch)
            self._check_reachable(step, epoch)

    def on_train_batch_begin(self, batch, logs=None):
        step = self._steps.poll(batch, self._next_due())
        if step is not None:
            self._take_due(step, self._epochs_done)

    def on_test_begin(self, logs=None):
        if self._training and self.validate_with_average:
            self._end_epoch()  # Validation in `fit` follows the last batch.
            self._swap_in_average()

    def on_test_end(self, logs=None):
        self._restore_trained_weights(warn=False)

    @contextlib.contextmanager
    def average_in_model(self):
        """A context in which the model holds the averaged weights.

        Recalibrated when `recalibration_data` is set; the trained weights
        are put back on exit. In the middle of an epoch it holds the average
        as of the last update (no update is added). Before anything is
        averaged the model keeps its trained weights.

        Example:

        ```python
        with ema.average_in_model():
            model.evaluate(x_test, y_test)
        ```
        """
        swapped = self._swap_in_average()
        try:
            yield self.model
        finally:
            if swapped:  # Not when nested in another swap: that one restores.
                self._restore_trained_weights(warn=False)

    def _swap_in_average(self) -> bool:
        """Keeps the trained values and puts the average into the model;
        returns whether it did."""
        if self._count == 0 or self._swapped is not None:
            return False  # Nothing averaged yet, or already swapped in.
        self._swapped = [ops.copy(v.value) for v in self.model.weights]
        for variable, average in self._pairs:
            _assign_copy(variable, average.value)
        if self.recalibration_data is None:
            return True
        statistics = [
            v
            for layer in batchnorm_layers(self.model)
            for v in (layer.moving_mean, layer.moving_variance)
        ]
        key = (self._count, self._last_step)
        if self._recalibrated is not None and self._recalibrated[0] == key:
            # Recalibrated for this average already (validation, then a
            # checkpoint of the same epoch): no second pass over the data.
            for variable, value in zip(statistics, self._recalibrated[1]):
                variable.assign(value)
            return True
        self._recalibrate(self.model)
        self._recalibrated = (key, [ops.copy(v.value) for v in statistics])
        return True

    def _restore_trained_weights(self, warn: bool) -> None:
        if self._swapped is None:
            return
        for variable, value in zip(self.model.weights, self._swapped):
            variable.assign(value)
        self._swapped = None
        if warn:
            warnings.warn(
                f"{self._label}: the last `fit` ended during validation; "
                "put the trained weights back into the model.",
                stacklevel=3,
            )

    def _end_epoch(self) -> None:
        """Takes the update due after the epoch's last batch, once per epoch
        (validation, an `AveragedModelCheckpoint` and `on_epoch_end` may
        each ask, in any order)."""
        if self._training and self._epoch_open:
            self._epoch_open = False
            self._catch_up(self._epoch)

    def on_epoch_end(self, epoch, logs=None):
        self._end_epoch()
        self._steps.epoch_end()
        self._epochs_done = epoch + 1
        self._log_count()

    def _log_count(self) -> None:
        """TensorBoard: `num_averaged` at the step of the last update."""
        if self._count:
            self._tensorboard.scalar(
                "num_averaged", self._count, self._last_step
            )

    def on_train_end(self, logs=None):
        self._training = False
        if self.model is None:
            self._tensorboard.close()
            return
        try:
            step = self._steps.read()
            if self._every is not None:
                self._take_due(step, self._epochs_done)
            self._log_count()
        finally:
            self._tensorboard.close()
        if self._count == 0:
            if self.filepath or self.set_weights_at_end:
                warnings.warn(
                    f"{self._label} averaged no weights: training ended at "
                    f"step {step}, before {self._start_description()}. "
                    "Nothing was saved or set.",
                    stacklevel=2,
                )
            return
        if self.filepath is not None:
            self._save_averaged(self.averaged_model())
        if self.set_weights_at_end:
            # At this callback's `on_train_end`: a callback listed after it
            # that also sets weights there (EarlyStopping(
            # restore_best_weights=True)) has the last word.
            for variable, average in self._pairs:
                _assign_copy(variable, average.value)
            self._recalibrate(self.model)
            if self.recalibration_data is None:
                warn_batchnorm(self.model, self.average_batchnorm)
            if self.verbose:
                print_msg(
                    f"{self._label}: put the average of {self._count} "
                    "models into the model."
                )

    def _save_averaged(self, model) -> None:
        with _fs.atomic_write(self.filepath) as local_path:
            model.save(local_path)
        if self.verbose:
            print_msg(
                f"{self._label}: saved the average of {self._count} models "
                f"(last at step {self._last_step}) to {self.filepath}"
            )

    # Resuming -----------------------------------------------------------------

    def _resume(self, step: int, epoch: int) -> None:
        """Checks that the restored average belongs to optimizer step `step`
        (BackupAndRestore restores both together) and redoes an update due
        exactly at `step` that a kill lost."""
        count, last, done = self._state.read()
        if self._replaced and not count and self.verbose:
            print_msg(
                f"{self._label}: the model held an average of "
                f"{self._replaced} models kept by another callback; this "
                "one starts a new average (pass the same callback to `fit` "
                "to continue one)."
            )
        self._replaced = 0
        if count and last > step:
            warnings.warn(
                f"{self._label}: the model's average was last updated at "
                f"step {last}, after the optimizer's step {step}; starting "
                "a new average.",
                stacklevel=3,
            )
            count, last, done = 0, -1, 0
            self._state.write(count, last, done)
        self._count, self._last_step, self._epochs_done = count, last, done
        if self._every is None:
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
        if missing and not redo and self.mode == "ema" and not count:
            # A new EMA on a model trained before it: it starts here (an
            # EMA forgets its start anyway); a new SWA would silently miss
            # models it was asked for, and is refused below.
            now = epoch if self._every is None else step
            earlier = [m for m in missing if m < now]
            if self._every is None:
                self._epochs_done = max(earlier)
            else:
                self._last_step = max(earlier)
            redo = now in missing
            missing = [now] if redo else []
            if self.verbose:
                print_msg(
                    f"{self._label}: the model is at step {step}, past the "
                    f"average's start; the average starts here."
                )
        if missing and not redo:
            raise ValueError(
                f"{self._label} should have averaged the model at {what}, "
                f"before training resumed at step {step} (epoch {epoch}), "
                "but the model holds no average that covers them. Resume "
                "with keras.callbacks.BackupAndRestore (which saves the "
                "average with the weights), or start averaging at or after "
                "the current step/epoch."
            )
        if redo:
            # The restored weights are the weights of that step.
            self._update(step, epoch)
        if self._count and self.verbose:
            print_msg(
                f"{self._label}: resumed at step {step} with the average of "
                f"{self._count} models."
            )


class AveragedModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """`keras.callbacks.ModelCheckpoint` that saves the averaged model.

    Keras's `ModelCheckpoint` saves the trained weights, even when the
    `val_*` metric it monitors was computed with the average
    (`WeightAveraging(validate_with_average=True)`). This one saves the
    average of `averaging` (recalibrated if set) at the end of an epoch, so
    that `save_best_only=True` keeps the averaged model that scored best.
    Before the first averaged model it saves the trained weights. Pass
    `averaging` in the same `fit` callbacks, in any order; `save_freq` is
    `"epoch"` only.

    A run resumed by `BackupAndRestore` in a new process keeps its best:
    with `save_best_only=True` and a `filepath` without `{...}` fields, the
    best score is written beside the file (`FILEPATH.best.json`) and read
    back when `fit` starts above step 0. A run from step 0 starts anew.

    Args:
        averaging: The `WeightAveraging` callback of the same `fit`.
        filepath: As `ModelCheckpoint`: a `.keras` path (or
            `.weights.h5` with `save_weights_only=True`), which may hold
            `{epoch}` and logged metrics.
        **kwargs: `ModelCheckpoint`'s `monitor`, `mode`, `save_best_only`,
            `save_weights_only`, `initial_value_threshold`, `verbose`.

    Example:

    ```python
    ema = keras_snapshot.WeightAveraging(
        mode="ema", decay=0.999, validate_with_average=True)
    best = keras_snapshot.AveragedModelCheckpoint(
        ema, "best_ema.keras", monitor="val_loss", save_best_only=True)
    model.fit(x, y, validation_data=(x_val, y_val), epochs=20,
              callbacks=[ema, best])
    ```
    """

    def __init__(self, averaging, filepath, **kwargs):
        if not isinstance(averaging, WeightAveraging):
            raise TypeError(
                "`averaging` must be the WeightAveraging callback whose "
                "average to save. Received: "
                f"averaging={type(averaging).__name__}."
            )
        save_freq = kwargs.pop("save_freq", "epoch")
        if save_freq != "epoch":
            raise ValueError(
                "AveragedModelCheckpoint saves at the end of an epoch, when "
                "the average was validated. Received: "
                f"save_freq={save_freq!r}; leave it at 'epoch'."
            )
        super().__init__(filepath, **kwargs)
        self.averaging = averaging
        self._steps = StepTracker(self)

    @property
    def best_record_path(self) -> str | None:
        """Where the best score is kept for a resumed run, if anywhere."""
        if self.save_best_only and "{" not in self.filepath:
            return f"{self.filepath}.best.json"
        return None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._steps.attach()
        if "{" not in os.path.dirname(self.filepath):
            check_writable(self.filepath, "AveragedModelCheckpoint")
        if self.averaging.model is not self.model:
            raise ValueError(
                "AveragedModelCheckpoint needs its WeightAveraging in the "
                "callbacks of the same `fit`. Received a WeightAveraging "
                "that is not attached to this model; pass both: "
                "callbacks=[averaging, AveragedModelCheckpoint(averaging, "
                "...)]."
            )
        if (
            self.save_best_only
            and self.monitor.startswith("val_")
            and not self.averaging.validate_with_average
        ):
            warnings.warn(
                f"AveragedModelCheckpoint monitors {self.monitor!r}, but "
                "the WeightAveraging validates the trained weights "
                "(validate_with_average=False): the best epoch is chosen "
                "by the trained model, the average is saved. Pass "
                "validate_with_average=True.",
                stacklevel=2,
            )

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        step = self._steps.epoch_begin()
        if self._steps.starts_fit:
            # After every on_train_begin: BackupAndRestore has restored.
            self._resume_best(step)

    def _resume_best(self, step: int) -> None:
        path = self.best_record_path
        if (
            path is None
            or model_checkpoint_best(self) is not None
            or not _fs.exists(path)
        ):
            return
        if step == 0:
            return  # A new run: its own best.
        try:
            record = json.loads(_fs.read_text(path))
            best, at = float(record["best"]), int(record["step"])
            same = (
                record.get("monitor") == self.monitor
                and record.get("run") == self.averaging._state.run_number()
                and at <= step
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            print_msg(
                f"AveragedModelCheckpoint: ignoring {path}, which is not a "
                f"record of a best score ({type(e).__name__}: {e}); this run "
                "keeps its own best."
            )
            return
        if not same or not math.isfinite(best):
            print_msg(
                f"AveragedModelCheckpoint: {path} was written by another "
                "run (or an older keras-snapshot); this run keeps its own "
                "best."
            )
            return
        self.best = best
        print_msg(
            f"AveragedModelCheckpoint: resumed at step {step}; the best "
            f"{self.monitor} so far is {self.best:.5f} (epoch "
            f"{record.get('epoch')}, step {record['step']}, {self.filepath})."
        )

    def on_epoch_end(self, epoch, logs=None):
        best = self.best
        self.averaging._end_epoch()  # Whatever the callbacks' order.
        with self.averaging.average_in_model():
            super().on_epoch_end(epoch, logs)
        path = self.best_record_path
        if path is not None and self.best is not None and self.best != best:
            _fs.write_json(
                path,
                {
                    "monitor": self.monitor,
                    "best": float(self.best),
                    "epoch": epoch + 1,
                    "step": optimizer_updates(self.model),
                    "run": self.averaging._state.run_number(),
                },
            )


# After training: the uniform average and the greedy soup ----------------------

# Keys of a layer's config that do not change what its weights mean.
_IGNORED_CONFIG_KEYS = ("name",)
_IGNORED_CONFIG_SUFFIXES = ("_initializer",)
METHODS = ("uniform", "greedy")


def _layer_signature(layer) -> tuple:
    config = {
        key: value
        for key, value in layer.get_config().items()
        if key not in _IGNORED_CONFIG_KEYS
        and not key.endswith(_IGNORED_CONFIG_SUFFIXES)
    }
    return type(layer).__name__, json.dumps(config, sort_keys=True, default=str)


def _leaf_signatures(model) -> list:
    """The signatures of every layer that is not itself a model."""
    found = []

    def visit(layer):
        children = getattr(layer, "layers", None)
        if children:
            for child in children:
                visit(child)
        else:
            found.append(_layer_signature(layer))

    for layer in model.layers:
        visit(layer)
    return found


def check_same_architecture(models: list, names: list | None = None) -> None:
    """Checks that the weights of `models` can be averaged one to one.

    The members must have the same variables (count, shapes and dtypes, in
    order) and the same layers with the same configurations (layer names
    and initializers aside). The error names the first member that differs.

    Example:

    ```python
    check_same_architecture([model_a, model_b])
    ```
    """
    names = names or [f"model {m.name!r}" for m in models]
    reference, reference_name = models[0], names[0]
    ref_vars = [(tuple(v.shape), str(v.dtype)) for v in reference.weights]
    ref_layers = _leaf_signatures(reference)
    fix = "All members must share one architecture (snapshots of one run do)."
    for model, name in zip(models[1:], names[1:]):
        variables = [(tuple(v.shape), str(v.dtype)) for v in model.weights]
        layers = _leaf_signatures(model)
        problem = None
        if len(variables) != len(ref_vars):
            problem = (
                f"it has {len(variables)} variables, but {reference_name} "
                f"has {len(ref_vars)}"
            )
        elif variables != ref_vars:
            i = next(i for i, v in enumerate(variables) if v != ref_vars[i])
            problem = (
                f"its variable {model.weights[i].path} has shape/dtype "
                f"{variables[i]}, but {reference_name} has {ref_vars[i]} "
                f"({reference.weights[i].path})"
            )
        elif len(layers) != len(ref_layers):
            problem = (
                f"it has {len(layers)} layers, but {reference_name} has "
                f"{len(ref_layers)}"
            )
        elif layers != ref_layers:
            mine, theirs = next(
                (a, b) for a, b in zip(layers, ref_layers) if a != b
            )
            problem = (
                f"its layer {mine[0]} {mine[1]} differs from {theirs[0]} "
                f"{theirs[1]} in {reference_name}"
            )
        if problem:
            raise ValueError(
                f"Cannot average the weights of {name}: {problem}. {fix}"
            )


def _fold_member(soup: list, member: list, weight: float, floats: list):
    """`fold` every float array of `member` into `soup` (others kept)."""
    with np.errstate(invalid="ignore", over="ignore"):  # allow_nonfinite.
        return [
            fold(s, v, weight) if f else s
            for s, v, f in zip(soup, member, floats)
        ]


def _check_method(method, weights, validation_data) -> None:
    if method not in METHODS:
        raise ValueError(
            f"`method` must be one of {METHODS}. Received: method={method!r}."
        )
    if method == "greedy" and weights is not None:
        raise ValueError(
            "The greedy soup weighs the members it keeps equally; drop "
            f"`weights`. Received: method='greedy', weights={weights!r}."
        )
    if method == "uniform" and validation_data is not None:
        raise ValueError(
            "A uniform average uses no validation data; pass "
            "method='greedy' to choose members with it. Received: "
            "method='uniform', validation_data=..."
        )
    if method == "greedy" and (
        not isinstance(validation_data, tuple) or len(validation_data) != 2
    ):
        raise ValueError(
            "The greedy soup needs `validation_data`, a tuple `(x, y)` with "
            "integer or one-hot labels y. Received: validation_data of type "
            f"{type(validation_data).__name__}."
        )


def average_weights(
    snapshots,
    weights=None,
    *,
    method: str = "uniform",
    validation_data=None,
    metric: str = "error",
    from_logits: bool | None = None,
    recalibration_data=None,
    recalibration_steps: int | None = None,
    batch_size: int = 128,
    last: int | None = None,
    safe_mode: bool = True,
    skip_invalid: bool = False,
    custom_objects: dict | None = None,
    allow_nonfinite: bool = False,
):
    """One model whose weights are an average of the members' weights.

    `method="uniform"` is SWA over snapshots (Izmailov et al. 2018,
    arXiv:1803.05407): every float variable becomes `sum_k a_k w_k`, `a_k =
    weights[k] / sum(weights)` (equal by default); snapshots of one run lie
    in one basin, and their average predicts about as well as their
    ensemble at the cost of one model. `method="greedy"` is the greedy soup
    (Wortsman et al. 2022, arXiv:2203.05482): members sorted by their own
    `metric` on `validation_data` ("error" or "nll", lower is better, as in
    `select_snapshots`), each joins the equal-weight soup only if its score
    does not get worse, so a member from another basin is left out (one
    predicting NaN or inf is never kept).

    BatchNorm statistics are averaged too (a warning says they do not fit):
    `recalibration_data` recomputes them, for every candidate soup too. The
    members must share an architecture (the first that does not is named);
    the result is a new, uncompiled model; the members are not changed.

    Args:
        snapshots: A directory written by `SnapshotCheckpoint`, a list of
            `.keras` paths, or a list of Keras models.
        weights: `"uniform"` only: a non-negative weight per member.
        method: `"uniform"` or `"greedy"`.
        validation_data: `"greedy"` only (required): `(x, y)`, labels
            integer or one-hot.
        metric: `"greedy"` only: `"error"` or `"nll"`.
        from_logits: `"greedy"` only: whether the models output logits;
            None reads it from the output layer.
        recalibration_data: Optional training inputs (array, `(x, y)` or a
            `tf.data.Dataset`) to recompute the BatchNorm statistics on.
        recalibration_steps: Optional limit on the batches used for that.
        batch_size: Batch size for prediction and recalibration.
        last: Use only the last `last` snapshots.
        safe_mode, skip_invalid, custom_objects, allow_nonfinite: How the
            snapshots are loaded: see `keras_snapshot.loading.LoadOptions`.

    Returns:
        A new `keras.Model` with the averaged weights. For `"greedy"`, its
        attribute `soup_members` lists the indices (into the loaded
        members, oldest first) of the members in the soup, in the order
        they were added.

    Example:

    ```python
    soup = keras_snapshot.average_weights(
        "snapshots", method="greedy", validation_data=(x_val, y_val),
        recalibration_data=x_train,
    )
    print(soup.soup_members)
    ```
    """
    _check_method(method, weights, validation_data)
    if method == "greedy":
        check_metric(metric)
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
    values = [
        [ops.convert_to_numpy(v).astype(np.float64) for v in m.weights]
        for m in members
    ]
    floats = [is_float(v) for v in members[0].weights]
    model = model_with_weights(members[0], values[0], safe_mode, custom_objects)

    def holding(arrays):
        """`model` with `arrays`, BatchNorm recalibrated if asked."""
        assign_weights(model, arrays)
        if recalibration_data is not None:
            recalibrate_batchnorm(
                model, recalibration_data, batch_size, recalibration_steps
            )
        return model

    if method == "uniform":
        coefficients = (
            np.ones(len(members))
            if weights is None
            else normalize_weights(weights, len(members))
        )
        kept = [i for i, c in enumerate(coefficients) if c > 0]
        soup, total = values[kept[0]], coefficients[kept[0]]
        for i in kept[1:]:
            total += coefficients[i]
            soup = _fold_member(
                soup, values[i], coefficients[i] / total, floats
            )
    else:
        if from_logits is None:
            from_logits = not _declares_probabilities(members[0])
        x_val, y_val = validation_data

        def scored(arrays) -> float:
            outputs = holding(arrays).predict(x_val, batch_size, verbose=0)
            if outputs.ndim != 2 or outputs.shape[-1] < 2:
                raise ValueError(
                    "The greedy soup scores classifiers with one output per "
                    "class (2 or more); give a sigmoid model a 2-way "
                    f"softmax. Received outputs of shape {outputs.shape}."
                )
            if not np.all(np.isfinite(outputs)):
                return math.nan  # Ranks last, never kept.
            labels = check_labels(y_val, *outputs.shape, name="y_val")
            return float(score(outputs, labels, metric, from_logits))

        kept, soup = _greedy(values, floats, scored)
        model.soup_members = kept
    holding(soup)
    if recalibration_data is None and len(kept) > 1:
        warn_batchnorm(model, averaged_statistics=True)
    return model


def _declares_probabilities(model) -> bool:
    declared = declares_probabilities(model)
    if declared is None:
        raise ValueError(
            "Cannot tell whether the models output probabilities or logits: "
            "their last layer declares neither a softmax nor a linear "
            "activation. Pass `from_logits=True` or `from_logits=False`."
        )
    return declared


def _greedy(values: list, floats: list, scored) -> tuple:
    """`(kept, soup)`: the greedy soup of the members' `values`, `scored`
    lower is better (NaN ranks last and never joins; a tie joins)."""
    own = [scored(v) for v in values]
    order = sorted(
        range(len(values)), key=lambda i: (math.isnan(own[i]), own[i])
    )
    if math.isnan(own[order[0]]):
        raise ValueError(
            "The greedy soup cannot score any member: every member predicts "
            "non-finite values (NaN or inf) on `validation_data`. Received: "
            f"{len(values)} members, all non-finite."
        )
    kept, soup, best = [order[0]], values[order[0]], own[order[0]]
    for i in order[1:]:
        candidate = _fold_member(soup, values[i], 1 / (len(kept) + 1), floats)
        candidate_score = scored(candidate)
        if candidate_score <= best:
            kept.append(i)
            soup, best = candidate, candidate_score
    return kept, soup


def _greedy_soup(
    models,
    validation_data,
    metric: str = "accuracy",
    from_logits: bool | None = None,
    recalibration_data=None,
    recalibration_steps: int | None = None,
    batch_size: int = 128,
    safe_mode: bool = True,
    skip_invalid: bool = False,
    custom_objects: dict | None = None,
    allow_nonfinite: bool = False,
):
    """The old `greedy_soup`: `(model, kept)`, metric "accuracy" or "nll"."""
    if metric not in ("accuracy", "nll"):
        raise ValueError(
            "`metric` must be one of ('accuracy', 'nll'). Received: "
            f"metric={metric!r}."
        )
    model = average_weights(
        models,
        method="greedy",
        validation_data=validation_data,
        metric="error" if metric == "accuracy" else metric,
        from_logits=from_logits,
        recalibration_data=recalibration_data,
        recalibration_steps=recalibration_steps,
        batch_size=batch_size,
        safe_mode=safe_mode,
        skip_invalid=skip_invalid,
        custom_objects=custom_objects,
        allow_nonfinite=allow_nonfinite,
    )
    return model, list(model.soup_members)


OLD_NAMES = {
    "greedy_soup": (
        "average_weights(models, method='greedy', validation_data=...)",
        _greedy_soup,
    ),
    "StochasticWeightAveraging": (
        "WeightAveraging(mode='swa', average_batchnorm=True)",
        None,
    ),
}
__getattr__ = module_getattr(__name__, OLD_NAMES)
