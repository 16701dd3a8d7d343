"""`FreezeOut`: anneal each layer group's rate to zero, then freeze it.

FreezeOut (Brock, Lim, Ritchie, Weston 2017, arXiv:1706.04983) speeds up
training by giving each layer group `i` of `L + 1` its own cosine-annealed
learning rate, which reaches zero at the fraction `t_i` of training:

    lr_i(t) = 0.5 * lr_i(0) * (1 + cos(pi * t / (t_i * T)))   for t < t_i * T
    t_i     = s(t0 + (1 - t0) * i / L),  s(x) = x, x**2 or x**3
    lr_i(0) = lr0 / t_i   (scaled, the default)   or   lr0   (unscaled)

`t` is the 0-based optimizer step (`optimizer.iterations`, read through
`keras_snapshot._steps`) and `T` the number of steps; groups are numbered
`0 .. L` as in the reference code (ajbrock/FreezeOut), so the last group
has `t_L = 1`. From step `ceil(t_i * T)` on, group `i` is frozen
(`trainable = False`) and left out of the backward pass.

The per-group rate is applied where the optimizer uses its rate, in
`update_step`, so it is exact for every optimizer (Adam included); the
wrapping of the optimizer instance and its undoing whatever ends `fit`
live in `_keras_compat`. Nothing of ours enters the model or the saved
files.
"""

import math
import warnings
from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from keras_snapshot._checks import check_positive_int
from keras_snapshot._checks import check_positive_number
from keras_snapshot._io import print_msg
from keras_snapshot._keras_compat import FitState
from keras_snapshot._keras_compat import attach_group_rates
from keras_snapshot._keras_compat import check_optimizer_internals
from keras_snapshot._keras_compat import fit_frame
from keras_snapshot._keras_compat import fit_state_of
from keras_snapshot._keras_compat import innermost_optimizer
from keras_snapshot._keras_compat import nested_layers
from keras_snapshot._steps import StepTracker
from keras_snapshot._steps import join_fit
from keras_snapshot._tensorboard import TensorBoardLog
from keras_snapshot._tensorboard import check_log_dir
from keras_snapshot._tensorboard import update_rates
from keras_snapshot.checkpoint import SnapshotCheckpoint

SCALINGS = {
    "linear": lambda x: x,
    "squared": lambda x: x**2,
    "cubic": lambda x: x**3,
}
"""The annealing strategies of the paper, `name -> s`, `t_i = s(...)`."""

_NORMALIZATION = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
)


def _check_t0(t0) -> float:
    t0 = check_positive_number(
        "t0",
        t0,
        hint="It is the (unscaled) fraction of training after "
        "which the first group freezes, in (0, 1], e.g. 0.8.",
    )
    if t0 > 1:
        raise ValueError(
            "`t0` must be in (0, 1]: the (unscaled) fraction of training "
            f"after which the first group freezes, e.g. 0.8. Received: t0={t0}"
        )
    return t0


def _check_scaling(scaling) -> str:
    if scaling not in SCALINGS:
        raise ValueError(
            f"`scaling` must be one of {sorted(SCALINGS)}. "
            f"Received: scaling={scaling!r}"
        )
    return scaling


def freeze_fractions(
    num_groups: int, t0: float = 0.8, scaling: str = "cubic"
) -> list[float]:
    """The fraction of training `t_i` at which each group freezes.

    `t_i = s(t0 + (1 - t0) * i / L)` for groups `i = 0 .. L`; the last
    trains to the end (`1.0`).

    Args:
        num_groups: Number of layer groups `L + 1`, at least 2.
        t0: Unscaled fraction for the first group, in `(0, 1]`.
        scaling: `"linear"`, `"squared"` or `"cubic"`.

    Returns:
        A list of `num_groups` increasing floats, the last one `1.0`.

    Example:

    ```python
    freeze_fractions(3, t0=0.5, scaling="linear")  # [0.5, 0.75, 1.0]
    ```
    """
    num_groups = check_positive_int("num_groups", num_groups)
    if num_groups < 2:
        raise ValueError(
            "FreezeOut needs at least 2 layer groups (the last trains to the "
            f"end). Received: num_groups={num_groups}"
        )
    t0 = _check_t0(t0)
    s = SCALINGS[_check_scaling(scaling)]
    last = num_groups - 1
    return [s(t0 + (1 - t0) * i / last) for i in range(last)] + [1.0]


def freeze_steps(fractions: Sequence[float], total_steps: int) -> list[int]:
    """The first step at which each group is frozen: `ceil(t_i * T)`.

    Example:

    ```python
    freeze_steps([0.5, 0.75, 1.0], 10)  # [5, 8, 10]
    ```
    """
    total_steps = check_positive_int("total_steps", total_steps)
    return [math.ceil(f * total_steps - 1e-9) for f in fractions]


def group_rate_factor(step, fraction, total_steps, scale_lr=True):
    """`lr_i(t) / lr0` for a group that freezes at `fraction` of training.

    `0.5 * (1 / t_i if scale_lr else 1) * (1 + cos(pi * t / (t_i * T)))`
    for `t < t_i * T`, and 0 from there on (in `keras.ops`).

    Example:

    ```python
    group_rate_factor(0, 0.5, 100)  # 2.0: the scaled start, 1 / t_i
    group_rate_factor(50, 0.5, 100)  # 0.0: frozen
    ```
    """
    progress = ops.minimum(
        ops.divide(ops.cast(step, "float32"), fraction * total_steps), 1.0
    )
    start = 1.0 / fraction if scale_lr else 1.0
    return 0.5 * start * (1.0 + ops.cos(math.pi * progress))


def _is_normalization(layer) -> bool:
    return isinstance(layer, _NORMALIZATION)


DEFAULT_GROUPS = 4
"""Groups of `groups=None`: at most 3 retraces, and within 2 points of the
FLOP saving of one group per layer (`benchmarks/freezeout.py`)."""


def layer_groups(model) -> list[list]:
    """One group per trainable weighted layer, in the order of `model.layers`.

    A normalization layer joins the group of the weighted layer before it,
    as in the reference code; layers without trainable weights are in none.

    Example:

    ```python
    groups = layer_groups(model)  # [[conv, bn], [conv_1, bn_1], ...]
    ```
    """
    groups = []
    for layer in model.layers:
        if not (layer.trainable and layer.trainable_weights):
            continue
        if groups and _is_normalization(layer):
            groups[-1].append(layer)
        else:
            groups.append([layer])
    return groups


def _is_per_layer(groups) -> bool:
    return isinstance(groups, str) and groups == "layers"


def _is_count(groups) -> bool:
    return isinstance(groups, (int, np.integer)) and not isinstance(
        groups, (bool, np.bool_)
    )


def _check_groups_form(groups) -> None:
    """Raises unless `groups` is None, "layers", an int or a non-empty list."""
    if _is_count(groups) and groups < 2:
        raise ValueError(
            "An integer `groups` must be at least 2 (the last group trains "
            f"to the end). Received: groups={groups}"
        )
    if groups is None or _is_per_layer(groups) or _is_count(groups):
        return
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise ValueError(
            '`groups` must be None, "layers", an int, or a list of lists '
            f"of layers or layer names. Received: groups={groups!r}"
        )
    if not groups:
        raise ValueError(
            "`groups` is empty: pass None for the default groups, or at "
            "least 2 groups of layers. Received: groups=[]"
        )


def resolve_groups(model, groups=None) -> list[list]:
    """The layer groups of `model`, checked: a list of lists of layers.

    Args:
        model: A built Keras model.
        groups: `None` for `layer_groups(model)` merged into at most
            `DEFAULT_GROUPS` contiguous groups; `"layers"` for one group
            per weighted layer; an int `n >= 2` for `n` contiguous groups;
            or a list of groups of layers or layer names, from input to
            output. A nested layer may not be in another group than the
            model or block around it.

    Returns:
        A list of at least 2 non-empty lists of layers. Every trainable
        weight of the model is in exactly one group.

    Example:

    ```python
    resolve_groups(model, [["conv1", "bn1"], ["conv2"], ["dense"]])
    ```
    """
    if groups is None or _is_per_layer(groups) or _is_count(groups):
        resolved = layer_groups(model)
        if groups is None:
            count = min(DEFAULT_GROUPS, len(resolved))
        elif _is_per_layer(groups):
            count = len(resolved)
        else:
            count = check_positive_int("groups", groups)
            if count < 2 or count > len(resolved):
                raise ValueError(
                    "An integer `groups` must be between 2 and the number "
                    f"of weighted layer groups ({len(resolved)}). "
                    f"Received: groups={groups}"
                )
        chunks = np.array_split(np.arange(len(resolved)), max(count, 1))
        resolved = [
            [layer for i in chunk for layer in resolved[i]] for chunk in chunks
        ]
    else:
        _check_groups_form(groups)
        resolved = []
        for index, group in enumerate(groups):
            if isinstance(group, (str, keras.layers.Layer)):
                group = [group]
            if not group:
                raise ValueError(
                    f"Group {index} of `groups` is empty; every group needs "
                    f"at least one layer. Received: groups={groups!r}"
                )
            resolved.append([_get_layer(model, g) for g in group])
    if len(resolved) < 2:
        raise ValueError(
            "FreezeOut needs at least 2 layer groups, and the model has "
            f"{len(resolved)} group(s): pass a model with several weighted "
            f"layers or explicit `groups`. Received: groups={groups!r}"
        )
    seen = {}
    for index, group in enumerate(resolved):
        for layer in group:
            if id(layer) in seen:
                raise ValueError(
                    f"Layer {layer.name!r} is in groups {seen[id(layer)]} "
                    f"and {index}; each layer can be in one group only. "
                    f"Received: groups={groups!r}"
                )
            seen[id(layer)] = index
    _check_nesting(resolved, seen, groups)
    # A layer is in a group itself, or through the layers inside it.
    grouped = {
        id(v)
        for group in resolved
        for la in group
        for v in la.trainable_weights
    }
    missing = [
        layer.name
        for layer in model.layers
        if layer.trainable
        and any(id(v) not in grouped for v in layer.trainable_weights)
    ]
    if missing:
        raise ValueError(
            f"The trainable layers {missing} are in no group: add them to "
            "a group, or set their `trainable` to False. "
            f"Received: groups={groups!r}"
        )
    return resolved


def _check_nesting(resolved, seen, groups) -> None:
    """Refuses a layer that is in one group while a layer around it (a
    nested model, a block) is in another."""
    for index, group in enumerate(resolved):
        for parent in group:
            for inner in nested_layers(parent, include_self=False):
                other = seen.get(id(inner))
                if other is not None and other != index:
                    raise ValueError(
                        f"Layer {inner.name!r} (group {other}) is inside "
                        f"{parent.name!r} (group {index}): put both in one "
                        f"group, or list the layers inside {parent.name!r} "
                        f"instead of it. Received: groups={groups!r}"
                    )


def _get_layer(model, layer):
    if isinstance(layer, str):
        try:
            return model.get_layer(layer)
        except ValueError:
            raise ValueError(
                f"The model has no layer named {layer!r} (layers: "
                f"{[lay.name for lay in model.layers]}). Received: "
                f"groups entry {layer!r}"
            ) from None
    if isinstance(layer, keras.layers.Layer):
        if not any(layer is own for own in nested_layers(model)):
            raise ValueError(
                f"Layer {layer.name!r} is not part of the model "
                f"{model.name!r}. Received: groups entry {layer!r}"
            )
        return layer
    raise ValueError(
        "Each entry of a group must be a layer or a layer name. "
        f"Received: groups entry {layer!r}"
    )


def _layer_flops(layer) -> float:
    """Forward FLOPs of one layer: `2 * kernel.size * output positions`
    with a kernel, else 4 per output element."""
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):
        shape = None
    kernel = getattr(layer, "kernel", None)
    if kernel is None:
        kernel = getattr(layer, "depthwise_kernel", None)
    if shape is None:
        return 2.0 * sum(int(np.prod(w.shape)) for w in layer.weights)
    positions = float(np.prod([d for d in shape[1:-1] if d is not None]))
    if kernel is not None:
        return 2.0 * float(np.prod(kernel.shape)) * positions
    return 4.0 * positions * float(shape[-1] or 1)


def estimate_speedup(
    model,
    groups=None,
    t0: float = 0.8,
    scaling: str = "cubic",
    backward_ratio: float = 2.0,
) -> float:
    """The fraction of training FLOPs that FreezeOut saves, estimated.

    Like `calc_speedup` of the reference code: with forward costs `f_i`,
    `1 - sum_i f_i (1 + b t_i) / sum_i f_i (1 + b)`, where `b` is the
    backward over forward cost (2: input and weight gradients; the
    reference code uses 1).

    Args:
        model: A built Keras model.
        groups: As for `FreezeOut`.
        t0: As for `FreezeOut`.
        scaling: As for `FreezeOut`.
        backward_ratio: Backward over forward cost `b` of a layer.

    Returns:
        A float in `[0, 1)`: the estimated saving of training FLOPs.

    Example:

    ```python
    estimate_speedup(model, t0=0.8, scaling="cubic")  # e.g. 0.17
    ```
    """
    b = check_positive_number("backward_ratio", backward_ratio)
    resolved = resolve_groups(model, groups)
    fractions = freeze_fractions(len(resolved), t0, scaling)
    costs = np.array([sum(_layer_flops(la) for la in g) for g in resolved])
    t = np.array(fractions)
    return float(1.0 - np.sum(costs * (1 + b * t)) / np.sum(costs * (1 + b)))


@keras.saving.register_keras_serializable(package="keras_snapshot")
class FreezeOut(keras.callbacks.Callback):
    """Anneals each layer group's learning rate to zero, then freezes it.

    FreezeOut (Brock et al. 2017, arXiv:1706.04983): group `i` of `L + 1`,
    from input to output, trains for the fraction
    `t_i = s(t0 + (1 - t0) * i / L)` of the `T` optimizer steps with the
    rate `lr_i(t) = 0.5 * lr_i(0) * (1 + cos(pi * t / (t_i * T)))`, where
    `lr_i(0) = lr0 / t_i` (`scale_lr=True`) or `lr0`, the optimizer's rate.
    Then the group is frozen and no gradient is computed for it; the last
    group trains to the end. With `steps_per_execution=N` a group can
    freeze up to `N - 1` updates late (its rate is already zero).

    The frozen state follows from `optimizer.iterations`, so a run resumed
    by `BackupAndRestore` freezes the same groups. The `trainable` flags
    and the optimizer are restored at the end of `fit`, or, after an
    exception, at the model's next `fit`, `save` or `get_config`.
    FreezeOut refuses to share a `fit` with `SnapshotCheckpoint` or a
    second FreezeOut.

    Args:
        t0: Fraction of training after which the first group freezes,
            before `scaling`, in `(0, 1]`. Defaults to the paper's `0.8`
            (with cubic scaling, the first group freezes at 51.2%).
            `t0=1` trains every group to the end (plain cosine annealing).
        scaling: How `t_i` grows with depth: `"linear"`, `"squared"` or
            `"cubic"` (default).
        scale_lr: Whether to start group `i` at `lr0 / t_i` so that every
            group travels about as far (default `True`).
        groups: `None` (default) for the weighted layers merged into at
            most 4 groups; `"layers"` for one group per weighted layer (the
            paper's setting, one retrace per freeze); an int `n`; or a list
            of groups of layers or layer names (see `resolve_groups`).
        total_steps: Optimizer updates `T` of the whole run. By default
            those of the `fit` call; pass it when training is split over
            several `fit` calls or the dataset has no known length.
        verbose: 1 prints the plan before training and the freezes at the
            end of each epoch; 0 is silent.
        log_dir: The `log_dir` of the fit's `keras.callbacks.TensorBoard`
            (or any folder): each group's rate per update and the freezes
            go into its `train` run. None logs nothing.

    Example:

    ```python
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
                  "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=10, callbacks=[FreezeOut(t0=0.8)])
    ```
    """

    def __init__(
        self,
        t0: float = 0.8,
        scaling: str = "cubic",
        scale_lr: bool = True,
        groups=None,
        total_steps: int | None = None,
        verbose: int = 1,
        log_dir: str | None = None,
    ):
        super().__init__()
        self.t0 = _check_t0(t0)
        self.scaling = _check_scaling(scaling)
        if not isinstance(scale_lr, (bool, np.bool_)):
            raise ValueError(
                f"`scale_lr` must be True or False. Received: "
                f"scale_lr={scale_lr!r}"
            )
        self.scale_lr = bool(scale_lr)
        _check_groups_form(groups)
        self.groups = groups
        self.total_steps = (
            None
            if total_steps is None
            else check_positive_int("total_steps", total_steps)
        )
        self.log_dir = check_log_dir(log_dir)
        self.verbose = verbose
        self.freeze_events = []
        """`(step, [group indices])` of every freeze, in this `fit` call."""
        self._steps = StepTracker(self)
        self._state = None
        self._tensorboard = TensorBoardLog()

    def get_config(self) -> dict:
        groups = self.groups
        if not (groups is None or _is_per_layer(groups) or _is_count(groups)):
            groups = [
                [g if isinstance(g, str) else g.name for g in group]
                if isinstance(group, (list, tuple))
                else (group if isinstance(group, str) else group.name)
                for group in groups
            ]
        return {
            "t0": self.t0,
            "scaling": self.scaling,
            "scale_lr": self.scale_lr,
            "groups": groups,
            "total_steps": self.total_steps,
            "log_dir": self.log_dir,
            "verbose": self.verbose,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # The plan -----------------------------------------------------------

    def learning_rate_factor(self, group: int, step):
        """`lr_i(t) / lr0` of group `i` at `step`, once `fit` has begun."""
        return group_rate_factor(
            step, self.fractions_[group], self.total_steps_, self.scale_lr
        )

    def _resolve_total_steps(self) -> int:
        if self.total_steps is not None:
            return self.total_steps
        total = self._steps.fit_updates()
        if not total:
            epochs, steps = self.params.get("epochs"), self.params.get("steps")
            k = self._steps.accumulation
            raise ValueError(
                "FreezeOut cannot tell how many optimizer updates this `fit` "
                "runs: pass `FreezeOut(total_steps=...)` or `steps_per_epoch`"
                f" to `fit`. Received: epochs={epochs}, steps={steps}, "
                f"gradient_accumulation_steps={k}"
            )
        return total

    def _warn_if_fit_passes_total_steps(self, step: int, epoch: int) -> None:
        run = self._steps.fit_updates(epoch)
        if run is None:
            return
        last, total = step + run, self.total_steps_
        if last <= total:
            return
        source = "" if self.total_steps is not None else " (this fit's)"
        if step >= total:
            what = (
                f"starts at step {step}, at or past total_steps={total}"
                f"{source}: every group's learning rate is 0, so its {run} "
                "steps train nothing"
            )
        else:
            what = (
                f"runs to step {last}, past total_steps={total}{source}: "
                f"from step {total} on every group's learning rate is 0, so "
                f"{last - total} of its {run} steps train nothing"
            )
        warnings.warn(
            f"FreezeOut: this fit {what}. Pass `total_steps` for the whole "
            "run, counted in optimizer updates over all the fit calls that "
            "make it.",
            stacklevel=2,
        )

    # Keras hooks ----------------------------------------------------------

    def set_params(self, params):
        super().set_params(params)
        # Refused here, when `fit` makes its CallbackList: before any
        # callback's `on_train_begin` (and SnapshotCheckpoint's folder).
        join_fit(self)

    def check_fit_peer(self, other) -> None:
        """Refuses a `SnapshotCheckpoint` or a second FreezeOut in the fit
        (`_steps.join_fit` calls it for each of our callbacks there)."""
        if isinstance(other, SnapshotCheckpoint):
            raise ValueError(
                "FreezeOut and SnapshotCheckpoint cannot share a fit: frozen "
                "groups cannot follow the restarts of the snapshot cycles. "
                "Received: callbacks=[FreezeOut, SnapshotCheckpoint]"
            )
        if isinstance(other, FreezeOut):
            raise ValueError(
                "A fit can run one FreezeOut only. "
                "Received: callbacks=[FreezeOut, FreezeOut]"
            )

    def on_train_begin(self, logs=None):
        model = self.model
        frame = fit_frame(self)
        for owner in (model, innermost_optimizer(model.optimizer)):
            left = fit_state_of(owner)  # Left by a fit that raised.
            if left is not None and not left.ended():
                raise ValueError(
                    "Another FreezeOut is training this model or optimizer "
                    "in a fit that is still running; pass one FreezeOut. "
                    f"Received: optimizer={type(model.optimizer).__name__}"
                )
        self.groups_ = resolve_groups(model, self.groups)
        self._steps.attach()
        self.total_steps_ = self._resolve_total_steps()
        self.fractions_ = freeze_fractions(
            len(self.groups_), self.t0, self.scaling
        )
        self.freeze_steps_ = freeze_steps(self.fractions_, self.total_steps_)
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        optimizer = innermost_optimizer(model.optimizer)
        check_optimizer_internals(optimizer)
        state = FitState(model, frame)
        # Layers, parents before the layers inside them, then variables:
        # setting a layer's flag sets those of all it holds.
        layers = [
            nested
            for group in self.groups_
            for layer in group
            for nested in nested_layers(layer)
        ]
        state.flags = [(la, la.trainable) for la in layers] + [
            (v, v.trainable) for la in layers for v in la.weights
        ]
        group_of = {
            id(variable): index
            for index, group in enumerate(self.groups_)
            for layer in group
            for variable in layer.trainable_variables
        }
        state.detach = attach_group_rates(
            optimizer,
            group_of,
            len(self.groups_),
            lambda group: self.learning_rate_factor(
                group, optimizer.iterations
            ),
            lambda: model.trainable_variables,
            state,
        )
        state.guard_model()
        self._state = state
        self._frozen = [False] * len(self.groups_)
        self.freeze_events = []
        self._printed_events = 0
        self._tensorboard.open(self.log_dir, model)
        if self.verbose:
            saving = estimate_speedup(
                model, self.groups_, self.t0, self.scaling
            )
            print_msg(
                f"FreezeOut: {len(self.groups_)} groups, t0={self.t0} "
                f"({self.scaling}, {'scaled' if self.scale_lr else 'unscaled'}"
                f"), {self.total_steps_} steps; groups freeze at steps "
                f"{self.freeze_steps_[:-1]}; estimated saving "
                f"{100 * saving:.1f}% of training FLOPs."
            )

    def on_epoch_begin(self, epoch, logs=None):
        step = self._steps.epoch_begin()
        if self._steps.starts_fit:
            # After BackupAndRestore has restored the step, once per fit.
            self._warn_if_fit_passes_total_steps(step, epoch)
        self._freeze_through(step)

    def on_train_batch_begin(self, batch, logs=None):
        step = self._steps.poll(batch, self._next_freeze_step())
        if step is not None:
            self._freeze_through(step)

    def on_epoch_end(self, epoch, logs=None):
        self._steps.epoch_end()
        if self._tensorboard.active:
            self._log_learning_rates(self._steps.read())
        if self.verbose:
            for step, groups in self.freeze_events[self._printed_events :]:
                print_msg(
                    f"Epoch {epoch + 1}: FreezeOut froze group(s) {groups} "
                    f"at step {step}; {self._frozen.count(False)} of "
                    f"{len(self._frozen)} groups still train."
                )
            self._printed_events = len(self.freeze_events)

    def on_train_end(self, logs=None):
        try:
            if self._tensorboard.active:
                self._log_learning_rates(self._steps.read())
        finally:
            self._tensorboard.close()
            if self._state is not None:
                self._state.restore()

    def _log_learning_rates(self, step: int) -> None:
        """TensorBoard: each group's rate for the updates since last time
        (update `s` uses the group's factor at `s - 1`)."""
        if self._steps.fit_start_step is None:
            return
        steps = self._tensorboard.new_steps(self._steps.fit_start_step, step)
        if not len(steps):
            return
        base = update_rates(
            self.model.optimizer, steps, self._steps.accumulation
        )
        for group in range(len(self.groups_)):
            factors = ops.convert_to_numpy(
                self.learning_rate_factor(group, steps - 1)
            )
            self._tensorboard.scalars(
                f"learning_rate/group_{group}", base * factors, steps
            )

    # Freezing -------------------------------------------------------------

    def _next_freeze_step(self):
        """The step of the next group to freeze, or None."""
        for frozen, step in zip(self._frozen[:-1], self.freeze_steps_[:-1]):
            if not frozen:
                return step
        return None

    def _freeze_through(self, step: int) -> None:
        """Freezes every group due at `step`; one new train function."""
        due = [
            i
            for i, (frozen, at) in enumerate(
                zip(self._frozen[:-1], self.freeze_steps_[:-1])
            )
            if not frozen and at <= step
        ]
        if not due:
            return
        # On JAX, reading `self.model` writes the running state back to
        # the variables before the set of trainable variables changes.
        model = self.model
        for i in due:
            for layer in self.groups_[i]:
                layer.trainable = False
            self._frozen[i] = True
        model.make_train_function(force=True)
        self.freeze_events.append((step, due))
        self._tensorboard.scalar(
            "frozen_groups", self._frozen.count(True), step
        )
