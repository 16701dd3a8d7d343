"""Every Keras internal keras-snapshot relies on, and why, in one place.

Keras 3.8 to 3.15 were checked; `tests/test_keras_compat.py` runs each
reliance on the installed Keras (CI: 3.8.0 and the newest) and fails when a
release changes it. Version differences are feature-detected (`hasattr`, a
signature), never read from version strings. What is here:

- the supported stack: the Keras floor, checked when this module is
  imported, and `check_backend` (TensorFlow or JAX, not torch), checked
  when a step-driven callback starts training (`_steps.StepTracker`);
- `learning_rate_schedule`: the schedule object, kept only in the private
  `optimizer._learning_rate`;
- `optimizer_iterations`: the update count under `LossScaleOptimizer`, whose
  own `iterations` stays 0 before Keras 3.9 (the inner one counts);
- `batchnorm_renorm`: `BatchNormalization.renorm`, new in Keras 3.14;
- `model_checkpoint_best`: `ModelCheckpoint.best` before any score;
- `nested_layers`: `Layer._flatten_layers`;
- `BACKUP_AND_RESTORE_FILES`: the file names `BackupAndRestore` writes;
- FreezeOut's per-group learning rates: the optimizer methods it wraps on
  the instance (`update_step`, `_apply_weight_decay`, `stateless_apply`;
  checked by `check_optimizer_internals`), and the clean-up after a `fit`
  that raised (`FitState`): Keras calls no hook then, so `FitState` asks
  whether the `fit` is still on the call stack (`fit_frame`). A wrapper
  optimizer class would put a class of ours into every saved model's config.
"""

import inspect
import math
import sys
import threading

import keras
from keras import ops

KERAS_FLOOR = (3, 8)
"""The oldest Keras CI tests (setup.py: `keras>=3.8,<4`)."""

BACKENDS = ("tensorflow", "jax")
"""The Keras backends keras-snapshot supports (docs/api.md)."""


def _version_tuple(version: str) -> tuple:
    parts = []
    for part in version.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


if _version_tuple(keras.version()) < KERAS_FLOOR:
    raise ImportError(
        'keras-snapshot needs Keras 3.8 or newer: `pip install "keras>=3.8"`.'
        f" Received: Keras {keras.version()}."
    )


def check_backend(backend: str | None = None) -> None:
    """Refuses a Keras backend other than TensorFlow or JAX in one line.

    Example:

    ```python
    check_backend()  # in on_train_begin: the backend Keras runs
    ```
    """
    backend = backend or keras.backend.backend()
    if backend not in BACKENDS:
        raise RuntimeError(
            "keras-snapshot supports the TensorFlow and JAX backends: set "
            "KERAS_BACKEND=tensorflow (or jax) before importing Keras. "
            f"Received: backend={backend!r}."
        )


def learning_rate_schedule(optimizer):
    """The `LearningRateSchedule` that drives `optimizer`, or None.

    Relies on `optimizer._learning_rate` (Keras 3.0-3.15): Keras keeps the
    schedule object only there (`optimizer.learning_rate` is its value).
    """
    rate = getattr(innermost_optimizer(optimizer), "_learning_rate", None)
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        return rate
    return None


def innermost_optimizer(optimizer):
    """The optimizer that holds the learning rate (unwraps loss scaling)."""
    while getattr(optimizer, "inner_optimizer", None) is not None:
        optimizer = optimizer.inner_optimizer
    return optimizer


def optimizer_iterations(optimizer) -> int:
    """The weight updates `optimizer` has applied (a device read).

    `iterations` of the innermost optimizer: under `LossScaleOptimizer`
    the outer count stays 0 in Keras 3.8 (later releases forward it),
    and the inner count skips the updates that loss scaling dropped.
    """
    return int(ops.convert_to_numpy(innermost_optimizer(optimizer).iterations))


def batchnorm_renorm(layer) -> bool:
    """Whether a `BatchNormalization` layer uses batch renormalization
    (`renorm`, an argument since Keras 3.14; False before)."""
    return bool(getattr(layer, "renorm", False))


def model_checkpoint_best(checkpoint):
    """The best score a `keras.callbacks.ModelCheckpoint` has seen, or None.

    Before any score it is None from Keras 3.9 on, but +-inf in 3.8.
    """
    best = checkpoint.best
    if best is None or not math.isfinite(float(best)):
        return None
    return best


BACKUP_AND_RESTORE_FILES = ("training_metadata.json", "latest.weights.h5")
"""The files `keras.callbacks.BackupAndRestore` writes in its folder (Keras
3.0-3.15; its `_training_metadata_path`, `_weights_path`)."""


def nested_layers(layer, include_self: bool = True) -> list:
    """`layer` and the layers nested in it, at any depth, parents first.

    Relies on `Layer._flatten_layers(include_self, recursive)` (Keras
    3.0-3.15): Keras has no public list of a layer's nested layers.
    """
    return layer._flatten_layers(include_self=include_self, recursive=True)


def fit_frame(callback):
    """The frame of the `fit` (or custom loop) whose hook runs `callback`.

    Reads the call stack, the one place in the package that does: Keras
    calls each hook through a `keras.callbacks.CallbackList` that holds the
    callback, and the frame that calls the list is `fit`'s. `FitState`
    uses it to tell whether that `fit` still runs. Call it from a hook.
    """
    hook = inspect.currentframe().f_back
    frame, found = hook.f_back, False
    try:
        for _ in range(8):
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if isinstance(owner, keras.callbacks.CallbackList) and any(
                c is callback for c in owner.callbacks
            ):
                found = True
            elif found:
                return frame
            frame = frame.f_back
        return hook.f_back
    finally:
        del hook, frame


OPTIMIZER_INTERNALS = {
    "update_step": ("gradient", "variable", "learning_rate"),
    "_apply_weight_decay": ("variables",),
    "stateless_apply": ("optimizer_variables", "grads", "trainable_variables"),
    "_get_variable_index": ("variable",),
    "_use_weight_decay": ("variable",),
}
"""The optimizer methods FreezeOut wraps or calls, and the arguments that
Keras passes them (positionally)."""


def check_optimizer_internals(optimizer) -> None:
    """Refuses an optimizer whose private methods are not what FreezeOut
    wraps (`OPTIMIZER_INTERNALS`, `_get_variable_index`, `update_step`)."""
    problems = []
    for name, arguments in OPTIMIZER_INTERNALS.items():
        method = getattr(optimizer, name, None)
        if not callable(method):
            problems.append(f"`{name}` is not callable (found {method!r})")
            continue
        try:
            signature = inspect.signature(method)
        except (TypeError, ValueError):
            continue  # No signature to read (a builtin): trust it.
        try:
            signature.bind(*arguments)
        except TypeError:
            problems.append(
                f"`{name}{signature}` does not take ({', '.join(arguments)})"
            )
    variables = getattr(optimizer, "_trainable_variables", None)
    if not isinstance(variables, list):
        problems.append(
            "`_trainable_variables` is not the list of variables it was "
            "built with"
        )
    elif callable(getattr(optimizer, "_get_variable_index", None)):
        try:
            misplaced = any(
                optimizer._get_variable_index(v) != i
                for i, v in enumerate(variables)
            )
        except Exception:  # Any failure is a mismatch to report.
            misplaced = True
        if misplaced:
            problems.append(
                "`_get_variable_index` does not give each variable its "
                "position in `_trainable_variables`"
            )
    if hasattr(type(optimizer), "_parallel_update_step"):
        problems.append(
            "it updates all variables at once in `_parallel_update_step`, "
            "without calling `update_step`"
        )
    if problems:
        name = type(optimizer).__name__
        raise ValueError(
            f"FreezeOut cannot set per-group learning rates in {name}: "
            f"{'; '.join(problems)} (Keras {keras.version()}, "
            f"{keras.backend.backend()} backend). Use a stock Keras optimizer "
            f"(SGD, Adam, AdamW, ...). Received: optimizer={name}."
        )


WRAPPED_METHODS = ("update_step", "_apply_weight_decay", "stateless_apply")
"""The optimizer methods that `attach_group_rates` wraps on the instance."""


def attach_group_rates(
    optimizer, group_of, num_groups, factor, active_variables, state
):
    """Makes `optimizer` use a rate per group; returns an undo function.

    Wraps, on this instance only, `update_step` so that each variable is
    updated with `learning_rate * factor(group_of[id(variable)])` (no group:
    the last), found by `_get_variable_index` as Keras's own `update_step`
    finds its slots. Decoupled weight decay moves into that step with the
    same rate (Keras's `_apply_weight_decay` pass is switched off). On JAX,
    also wraps `stateless_apply`, which Keras calls with the model's current
    trainable variables: fewer than the optimizer's after a freeze
    (`active_variables()` names them). Each wrapper first asks
    `state.ended()` and, once the `fit` has ended, runs the original.
    """
    variable_groups = [
        group_of.get(id(v), num_groups - 1)
        for v in optimizer._trainable_variables
    ]
    before = {name: vars(optimizer).get(name) for name in WRAPPED_METHODS}
    update_step = optimizer.update_step
    stateless_apply = optimizer.stateless_apply

    def detach():
        for name in WRAPPED_METHODS:
            if getattr(vars(optimizer).get(name), "freezeout", False):
                if before[name] is None:
                    delattr(optimizer, name)
                else:
                    setattr(optimizer, name, before[name])

    def group_update_step(gradient, variable, learning_rate):
        if state.ended():
            return optimizer.update_step(gradient, variable, learning_rate)
        index = optimizer._get_variable_index(variable)
        learning_rate = ops.multiply(
            ops.cast(learning_rate, "float32"), factor(variable_groups[index])
        )
        if optimizer.weight_decay is not None and optimizer._use_weight_decay(
            variable
        ):
            # Keras's decoupled decay, `w -= w * weight_decay * lr`, with
            # the group's rate (Keras's own pass is off while attached).
            decay = ops.multiply(
                ops.cast(optimizer.weight_decay, variable.dtype),
                ops.cast(learning_rate, variable.dtype),
            )
            optimizer.assign_sub(variable, ops.multiply(variable, decay))
        return update_step(gradient, variable, learning_rate)

    def no_weight_decay_pass(variables):
        """Decay is applied per variable in `group_update_step`."""
        if state.ended():
            optimizer._apply_weight_decay(variables)

    def subset_stateless_apply(optimizer_variables, grads, trainable_values):
        if state.ended():
            return optimizer.stateless_apply(
                optimizer_variables, grads, trainable_values
            )
        if len(trainable_values) == len(optimizer._trainable_variables):
            return stateless_apply(optimizer_variables, grads, trainable_values)
        variables = list(active_variables())
        mapping = list(zip(variables, trainable_values)) + list(
            zip(optimizer.variables, optimizer_variables)
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            optimizer.apply(grads, variables)
        return (
            [scope.get_current_value(v) for v in variables],
            [scope.get_current_value(v) for v in optimizer.variables],
        )

    wrappers = [group_update_step, no_weight_decay_pass]
    if keras.backend.backend() == "jax":  # Keras calls it on JAX only.
        wrappers.append(subset_stateless_apply)
    for name, wrapper in zip(WRAPPED_METHODS, wrappers):
        wrapper.freezeout = True
        wrapper.freezeout_state = state
        setattr(optimizer, name, wrapper)
    return detach


class FitState:
    """What one FreezeOut `fit` changed on a model, and how to undo it.

    The changes (frozen `trainable` flags, wrapped optimizer methods, the
    train function traced for them) are undone by `on_train_end`, or, since
    Keras calls no hook after an exception, by the first of the model's
    `make_train_function` or `get_config`, the optimizer's `update_step`
    or a new FreezeOut's `on_train_begin` to run once the `fit` has ended.

    Args:
        model: The model being trained.
        fit_frame: The frame of the `fit` that made the changes
            (`fit_frame`): it runs while it is on the call stack.

    Relies on `model.make_train_function(force=True)` (Keras 3.0-3.15)
    and on every `fit` and `train_on_batch` calling `make_train_function`
    first.
    """

    def __init__(self, model, fit_frame):
        self.model = model
        self.fit_frame = fit_frame
        self.thread = threading.get_ident()
        self.flags = []  # (layer or variable, trainable) before the fit.
        self.detach = None  # Undoes the optimizer's wrappers.
        self.guarded = {}  # Model attribute -> its instance value before.
        self.restored = False

    def running(self) -> bool:
        """Whether the `fit` is still running: its frame is on the stack of
        the thread that runs it (a thread that ended runs nothing)."""
        if threading.get_ident() == self.thread:
            frame = inspect.currentframe()
        else:  # Another thread (a replica of a distribution strategy ...).
            frame = sys._current_frames().get(self.thread)
        try:
            while frame is not None:
                if frame is self.fit_frame:
                    return True
                frame = frame.f_back
            return False
        finally:
            del frame

    def ended(self) -> bool:
        """Whether the `fit` has ended; if so, its changes are undone."""
        if not self.restored and not self.running():
            self.restore()
        return self.restored

    def guard_model(self) -> None:
        """Wraps the model's `make_train_function` and `get_config` so that
        they undo the changes first once the `fit` has ended."""
        model = self.model
        for name in ("make_train_function", "get_config"):
            self.guarded[name] = vars(model).get(name)
            method = getattr(model, name)

            def guarded(*args, _method=method, _name=name, **kwargs):
                self.ended()
                result = _method(*args, **kwargs)
                if _name == "make_train_function" and not self.restored:
                    self._guard_train_function()
                return result

            guarded.freezeout = True
            guarded.freezeout_state = self
            setattr(model, name, guarded)

    def _guard_train_function(self) -> None:
        """Wraps `model.train_function` so that an exception inside a step
        undoes the changes at once; the end of a dataset of unknown length
        (`StopIteration`, `OutOfRangeError`), which Keras catches, passes."""
        step = self.model.train_function
        if step is None or getattr(step, "freezeout", False):
            return

        def guarded_step(*args, **kwargs):
            try:
                return step(*args, **kwargs)
            except StopIteration:
                raise
            except BaseException as e:
                if type(e).__name__ != "OutOfRangeError":
                    self.restore()
                raise

        guarded_step.freezeout = True
        self.model.train_function = guarded_step

    def restore(self) -> None:
        """Puts the model and the optimizer back as they were."""
        if self.restored:
            return
        self.restored = True
        model = self.model
        for name, before in self.guarded.items():
            if getattr(vars(model).get(name), "freezeout", False):
                if before is None:
                    delattr(model, name)
                else:
                    setattr(model, name, before)
        if self.detach is not None:
            self.detach()
        sync = getattr(model, "jax_state_sync", None)
        if sync is not None:
            sync()  # JAX: the running state into the variables, first.
        for owner, flag in self.flags:  # Layers, parents first; variables.
            owner.trainable = flag
        model.make_train_function(force=True)
        self.fit_frame = None


def fit_state_of(owner):
    """The `FitState` whose wrappers `owner` (model or optimizer) holds."""
    for name in ("make_train_function", "update_step"):
        state = getattr(vars(owner).get(name), "freezeout_state", None)
        if state is not None:
            return state
    return None
