"""`FreezeOut`: anneal each layer group's rate to zero, then freeze it.

FreezeOut (Brock, Lim, Ritchie, Weston 2017, arXiv:1706.04983) speeds up
training by giving each layer group `i` of `L + 1` its own cosine-annealed
learning rate, which reaches zero at the fraction `t_i` of training:

    lr_i(t) = 0.5 * lr_i(0) * (1 + cos(pi * t / (t_i * T)))   for t < t_i * T
    t_i     = s(t0 + (1 - t0) * i / L),  s(x) = x, x**2 or x**3
    lr_i(0) = lr0 / t_i   (scaled, the default)   or   lr0   (unscaled)

`t` is the 0-based optimizer step and `T` the number of steps. The indexing
is the reference code's (ajbrock/FreezeOut): groups are numbered `0 .. L`,
so the first group freezes at `s(t0)` and the last group (the classifier)
has `t_L = 1` and trains to the end. From step `ceil(t_i * T)` on, group `i`
is frozen: its weights stop changing, its BatchNorm layers run in inference
mode, and it is left out of the backward pass.

Design (why a callback that attaches to the optimizer, and nothing else):

- One line for the user: `model.fit(..., callbacks=[FreezeOut()])` with an
  ordinary, stock optimizer (`SGD`, momentum, Nesterov, `Adam`, ...) whose
  learning rate is `lr0`. Nothing of ours enters the model or the
  optimizer's class or config, so `.keras` files written during or after
  training load and predict without keras_snapshot, with or without
  `compile`.
- Exact per-group rates for every optimizer: the rate is applied where the
  optimizer itself uses its rate, in `update_step(gradient, variable,
  learning_rate)`, as `learning_rate * factor_i(t)`. Scaling the gradient
  instead would be exact only for plain and momentum SGD, not for Adam
  (whose step does not scale with the gradient). For the training run the
  callback wraps `update_step` of the optimizer *instance* (and, on JAX,
  `stateless_apply`, so that the optimizer accepts the shrinking set of
  trainable variables) and removes both wrappers at the end of `fit`. This
  is the only place that touches optimizer internals: `_attach_rates`.
  A wrapper optimizer class would do the same with more code and would
  put a custom class into every saved file. With a learning-rate schedule
  in the optimizer, group `i`'s rate is `schedule(t) * factor_i(t)`.
- Real freezing: at the freeze step the callback sets `layer.trainable =
  False` on the group's layers (Keras then runs BatchNorm in inference mode
  and leaves them out of `model.trainable_variables`, the list that the
  train step differentiates) and asks Keras for a new train function. The
  new function is traced once, with a gradient graph that stops at the
  lowest group still training. Groups freezing at the same step share one
  new function, so there are at most as many retraces as distinct freeze
  steps. At the end of `fit` the layers get their own `trainable` back.
- Resuming: the frozen state is a function of `optimizer.iterations`,
  read at each epoch begin (after `BackupAndRestore` has restored it), so a
  resumed run freezes what the interrupted run had frozen. Batch hooks only
  add the batch index to that step: no device sync per batch.

Decoupled weight decay (`AdamW`, `weight_decay=`) uses the group's rate,
`w -= w * weight_decay * lr_i(t)`, like the rest of the update; L2
regularizers go through the gradient. Both stop when the group freezes.
"""

import math
from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from keras_snapshot._checks import check_positive_int
from keras_snapshot._checks import check_positive_number
from keras_snapshot._io import print_msg

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

    `t_i = s(t0 + (1 - t0) * i / L)` for groups `i = 0 .. L` (FreezeOut,
    Brock et al. 2017, arXiv:1706.04983, indexed as in the reference code):
    the first group freezes at `s(t0)`, the last trains to the end (`1.0`).

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
            "FreezeOut needs at least 2 layer groups: the last one trains "
            "to the end and the ones below freeze earlier. Received: "
            f"num_groups={num_groups}"
        )
    t0 = _check_t0(t0)
    s = SCALINGS[_check_scaling(scaling)]
    last = num_groups - 1
    return [s(t0 + (1 - t0) * i / last) for i in range(last)] + [1.0]


def freeze_steps(fractions: Sequence[float], total_steps: int) -> list[int]:
    """The first step at which each group is frozen: `ceil(t_i * T)`.

    Group `i` trains at the 0-based steps `t < t_i * T`. The last group
    (`t_i = 1`) gets `total_steps`: it trains to the end.

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
    for `t < t_i * T`, and 0 from there on. In `keras.ops`, so it runs in
    the train step; `step` can also be a numpy array of steps.

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
"""Groups of `groups=None`: the weighted layers merged into at most this many.

Each freeze step retraces the train function (seconds on a CPU or GPU
host, whatever the step time), and the estimated FLOP saving of 4 merged
groups is within 2 points of one group per layer for ResNet-20/56 and
DenseNets (`benchmarks/freezeout.py`), so the default keeps retraces at 3.
"""


def layer_groups(model) -> list[list]:
    """One group per trainable weighted layer, in the order of `model.layers`.

    A normalization layer (BatchNorm, LayerNorm, GroupNorm) joins the group
    of the weighted layer before it (the convolution whose output it
    normalizes in a post-activation ResNet; the preceding convolution in a
    pre-activation DenseNet), as in the reference code, where a layer's
    BatchNorm freezes with it. Layers without trainable weights belong to
    no group.

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
            "An integer `groups` must be at least 2: the last group trains "
            f"to the end and the ones below freeze. Received: groups={groups}"
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
            "`groups` is empty. Pass None for the default groups, or at "
            "least 2 groups of layers. Received: groups=[]"
        )


def resolve_groups(model, groups=None) -> list[list]:
    """The layer groups of `model`, checked: a list of lists of layers.

    Args:
        model: A built Keras model.
        groups: `None` for `layer_groups(model)` merged into at most
            `DEFAULT_GROUPS` (4) contiguous groups; `"layers"` for
            `layer_groups(model)` itself (one group per weighted layer, the
            paper's setting, one retrace per freeze); an int `n >= 2` to
            merge `layer_groups(model)` into `n` contiguous groups of about
            the same number of layers; or a list of groups, each a list of
            layers or layer names, ordered from the input to the output.

    Returns:
        A list of at least 2 non-empty lists of layers. Every trainable
        weighted layer of the model is in exactly one group.

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
                    f"Group {index} of `groups` is empty. Every group needs "
                    f"at least one layer. Received: groups={groups!r}"
                )
            resolved.append([_get_layer(model, g) for g in group])
    if len(resolved) < 2:
        raise ValueError(
            "FreezeOut needs at least 2 layer groups: the last one trains "
            "to the end and the ones below freeze earlier. The model has "
            f"{len(resolved)} group(s); pass a model with several weighted "
            f"layers or explicit `groups`. Received: groups={groups!r}"
        )
    seen = {}
    for index, group in enumerate(resolved):
        for layer in group:
            if id(layer) in seen:
                raise ValueError(
                    f"Layer {layer.name!r} is in groups {seen[id(layer)]} "
                    f"and {index}. Each layer can be in one group only. "
                    f"Received: groups={groups!r}"
                )
            seen[id(layer)] = index
    missing = [
        layer.name
        for layer in model.layers
        if layer.trainable and layer.trainable_weights and id(layer) not in seen
    ]
    if missing:
        raise ValueError(
            f"The trainable layers {missing} are in no group. Add them to "
            "a group (the last one trains to the end), or set their "
            f"`trainable` to False. Received: groups={groups!r}"
        )
    return resolved


def _get_layer(model, layer):
    if isinstance(layer, str):
        try:
            return model.get_layer(layer)
        except ValueError:
            raise ValueError(
                f"The model has no layer named {layer!r}. Layer names: "
                f"{[lay.name for lay in model.layers]}. Received: "
                f"groups entry {layer!r}"
            ) from None
    if isinstance(layer, keras.layers.Layer):
        if not any(layer is own for own in model._flatten_layers()):
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
    """Forward multiply-adds x 2 of one layer, from its weights and output.

    For layers with a kernel (Dense, ConvND): `2 * kernel.size * positions`
    where `positions` is the number of output positions per example (1 for
    Dense, H*W for Conv2D). Other weighted layers (BatchNorm ...): 4 FLOPs
    per output element.
    """
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

    Like `calc_speedup` of the reference code (Brock et al. 2017,
    arXiv:1706.04983): group `i` with forward cost `f_i` costs `f_i` per
    step in the forward pass, always, and `backward_ratio * f_i` in the
    backward pass while it or a group below it trains, i.e. for the
    fraction `t_i` of training. The saving is

        1 - sum_i f_i (1 + b t_i) / sum_i f_i (1 + b).

    A layer's backward pass computes the gradients of its input and of its
    weights, each about as costly as its forward pass, hence `b = 2` by
    default (the reference code uses `b = 1`).

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


def _attach_rates(optimizer, factor_of_variable, active_variables):
    """Makes `optimizer` use a rate per variable; returns an undo function.

    The one place that touches optimizer internals. Wraps, on this instance
    only, `update_step` so that each variable is updated with
    `learning_rate * factor_of_variable(index)`, where `index` is the
    variable's position in the optimizer (`_get_variable_index`, the
    lookup every Keras optimizer's `update_step` uses for its slots).
    Decoupled weight decay (`weight_decay=`, AdamW) moves into that step
    too, with the same rate: Keras's own `_apply_weight_decay` pass, which
    would use the optimizer's rate for every variable, is switched off. On
    JAX, also wraps `stateless_apply`, which Keras's JAX trainer calls with
    the model's current trainable variables: after a freeze those are fewer
    than the optimizer was built with, and the wrapper applies the
    gradients to them only (`active_variables()` names them).
    """
    while hasattr(optimizer, "inner_optimizer"):  # LossScaleOptimizer
        optimizer = optimizer.inner_optimizer

    def detach():
        for name in ("update_step", "stateless_apply", "_apply_weight_decay"):
            if getattr(vars(optimizer).get(name), "freezeout", False):
                delattr(optimizer, name)

    # A `fit` that raised never reached `on_train_end`: undo its wrappers.
    detach()
    update_step = optimizer.update_step
    stateless_apply = optimizer.stateless_apply

    def group_update_step(gradient, variable, learning_rate):
        factor = factor_of_variable(optimizer._get_variable_index(variable))
        if factor is not None:
            learning_rate = ops.multiply(
                ops.cast(learning_rate, "float32"), factor
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

    def subset_stateless_apply(optimizer_variables, grads, trainable_values):
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

    group_update_step.freezeout = True
    subset_stateless_apply.freezeout = True
    no_weight_decay_pass.freezeout = True
    optimizer.update_step = group_update_step
    optimizer._apply_weight_decay = no_weight_decay_pass
    if keras.backend.backend() == "jax":
        optimizer.stateless_apply = subset_stateless_apply
    return detach


@keras.saving.register_keras_serializable(package="keras_snapshot")
class FreezeOut(keras.callbacks.Callback):
    """Anneals each layer group's learning rate to zero, then freezes it.

    FreezeOut (Brock, Lim, Ritchie, Weston 2017, arXiv:1706.04983) makes
    training faster: the layer groups of the network, from the input to the
    output, get cosine-annealed learning rates that reach zero one after
    the other. Group `i` of `L + 1` trains for the fraction
    `t_i = s(t0 + (1 - t0) * i / L)` of the `T` steps with the rate
    `lr_i(t) = 0.5 * lr_i(0) * (1 + cos(pi * t / (t_i * T)))`, where
    `lr_i(0) = lr0 / t_i` (`scale_lr=True`) or `lr0`, and `lr0` is the
    optimizer's learning rate. Then the group is frozen: its layers get
    `trainable = False` (BatchNorm runs in inference mode) and the train
    function is rebuilt, so no gradient is computed for the group or
    anything below it. The last group trains to the end.

    The frozen state follows from `optimizer.iterations`, so training
    resumed by `keras.callbacks.BackupAndRestore` freezes the same groups.
    At the end of `fit`, the layers' `trainable` flags are restored and
    the optimizer is left as it was. Nothing of keras_snapshot is saved
    into the model or the optimizer.

    Args:
        t0: Fraction of training after which the first group freezes,
            before `scaling`, in `(0, 1]`. Defaults to the paper's `0.8`
            (with cubic scaling, the first group freezes at 51.2%).
            `t0=1` trains every group to the end (plain cosine annealing).
        scaling: How `t_i` grows with depth: `"linear"`, `"squared"` or
            `"cubic"` (default).
        scale_lr: Whether to start group `i` at `lr0 / t_i` so that every
            group travels about as far (default `True`).
        groups: `None` (default) for the weighted layers in the order of
            `model.layers` (normalization layers join the layer before
            them) merged into at most 4 contiguous groups, so at most 3
            retraces; `"layers"` for one group per weighted layer (the
            paper's setting: finer, but one retrace per freeze step); an
            int `n` to merge the weighted layers into `n` contiguous
            groups; or a list of groups from input to output, each a list
            of layers or layer names (e.g. one group per ResNet stage).
        total_steps: Optimizer steps `T` of the whole training run. By
            default `epochs * steps_per_epoch` of the `fit` call, which is
            right when one `fit` call does the whole run (also when it is
            resumed). Pass it when training is split over several `fit`
            calls or the dataset has no known length.
        verbose: 1 prints the plan before training and the freezes at the
            end of each epoch; 0 is silent.

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
        self.verbose = verbose
        self.freeze_events = []
        """`(step, [group indices])` of every freeze, in this `fit` call."""

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
            "verbose": self.verbose,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # The plan -----------------------------------------------------------

    def learning_rate_factor(self, group: int, step):
        """`lr_i(t) / lr0` of group `i` at `step`; see `group_rate_factor`.

        Valid once `fit` has begun (it needs `T` and the groups).
        """
        return group_rate_factor(
            step, self.fractions_[group], self.total_steps_, self.scale_lr
        )

    def _resolve_total_steps(self) -> int:
        if self.total_steps is not None:
            return self.total_steps
        epochs = self.params.get("epochs")
        steps = self.params.get("steps")
        if not epochs or not steps:
            raise ValueError(
                "FreezeOut needs the number of training steps, but this "
                "`fit` call does not say how many steps an epoch has. Pass "
                "`FreezeOut(total_steps=...)` or `steps_per_epoch` to "
                f"`fit`. Received: epochs={epochs}, steps={steps}"
            )
        return int(epochs) * int(steps)

    # Keras hooks ----------------------------------------------------------

    def on_train_begin(self, logs=None):
        model = self.model
        self.groups_ = resolve_groups(model, self.groups)
        self.total_steps_ = self._resolve_total_steps()
        self.fractions_ = freeze_fractions(
            len(self.groups_), self.t0, self.scaling
        )
        self.freeze_steps_ = freeze_steps(self.fractions_, self.total_steps_)
        self._trainable = [[la.trainable for la in g] for g in self.groups_]
        self._frozen = [False] * len(self.groups_)
        self.freeze_events = []
        self._printed_events = 0
        group_of = {}
        for index, group in enumerate(self.groups_):
            for layer in group:
                for variable in layer.trainable_variables:
                    group_of[id(variable)] = index
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        optimizer = model.optimizer
        while hasattr(optimizer, "inner_optimizer"):
            optimizer = optimizer.inner_optimizer
        variable_groups = [
            group_of.get(id(v)) for v in optimizer._trainable_variables
        ]

        def factor_of_variable(index):
            group = variable_groups[index]
            if group is None:
                group = len(self.groups_) - 1
            return self.learning_rate_factor(group, optimizer.iterations)

        self._detach = _attach_rates(
            model.optimizer,
            factor_of_variable,
            lambda: model.trainable_variables,
        )
        self._epoch_start_step = 0
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
        step = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        self._epoch_start_step = step
        self._freeze_through(step)

    def on_train_batch_begin(self, batch, logs=None):
        step = self._epoch_start_step + batch
        if step >= self._next_freeze_step():
            self._freeze_through(step)

    def on_epoch_end(self, epoch, logs=None):
        if self.verbose:
            for step, groups in self.freeze_events[self._printed_events :]:
                print_msg(
                    f"Epoch {epoch + 1}: FreezeOut froze group(s) {groups} "
                    f"at step {step}; {self._frozen.count(False)} of "
                    f"{len(self._frozen)} groups still train."
                )
            self._printed_events = len(self.freeze_events)

    def on_train_end(self, logs=None):
        model = self.model  # On JAX, reading it syncs the training state.
        self._detach()
        for group, flags in zip(self.groups_, self._trainable):
            for layer, flag in zip(group, flags):
                layer.trainable = flag
        model.make_train_function(force=True)

    # Freezing -------------------------------------------------------------

    def _next_freeze_step(self) -> int:
        for frozen, step in zip(self._frozen[:-1], self.freeze_steps_[:-1]):
            if not frozen:
                return step
        return self.total_steps_ + 1

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
