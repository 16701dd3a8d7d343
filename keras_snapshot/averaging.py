"""Weight averaging: SWA over snapshots, and a running average in `fit`.

Stochastic Weight Averaging (Izmailov, Podoprikhin, Garipov, Vetrov,
Wilson, "Averaging Weights Leads to Wider Optima and Better
Generalization", UAI 2018, arXiv:1803.05407) averages the weights that one
run visits, then recomputes the BatchNorm statistics: one model, predicting
at the cost of one model. `average_weights` averages the snapshots of a run
after training; `greedy_soup` averages only the members that help on
validation data (Wortsman et al. 2022, arXiv:2203.05482);
`StochasticWeightAveraging` is `WeightAveraging(mode="swa")` (the running
average during training) under its old name and arguments. All leave
BatchNorm recalibration to `recalibrate_batchnorm`, as PyTorch keeps
`AveragedModel` and `update_bn` apart.
"""

import json
import math
import os
import warnings

import numpy as np
from keras import ops

from keras_snapshot._checks import check_labels
from keras_snapshot._checks import check_positive_int
from keras_snapshot.batchnorm import recalibrate_batchnorm
from keras_snapshot.ensemble import declares_probabilities
from keras_snapshot.ensemble import normalize_weights
from keras_snapshot.loading import assign_weights
from keras_snapshot.loading import describe
from keras_snapshot.loading import load_members
from keras_snapshot.loading import model_with_weights
from keras_snapshot.weight_averaging import WeightAveraging
from keras_snapshot.weight_averaging import is_float as _is_float
from keras_snapshot.weight_averaging import warn_batchnorm

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


def _load_one_architecture(
    sources, batch_size, recalibration_steps, **load_kwargs
) -> list:
    """The models of `sources` (`load_members`), checked to be one
    architecture, after the shared argument checks of the soups."""
    check_positive_int("batch_size", batch_size)
    if recalibration_steps is not None:
        check_positive_int("recalibration_steps", recalibration_steps)
    loaded = load_members(sources, **load_kwargs)
    members = [member.model for member in loaded]
    check_same_architecture(members, [describe(m) for m in loaded])
    return members


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
    members = _load_one_architecture(
        snapshots,
        batch_size,
        recalibration_steps,
        last=last,
        safe_mode=safe_mode,
        skip_invalid=skip_invalid,
        custom_objects=custom_objects,
        allow_nonfinite=allow_nonfinite,
    )
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
    model = model_with_weights(first, averaged, safe_mode, custom_objects)
    if recalibration_data is not None:
        recalibrate_batchnorm(
            model, recalibration_data, batch_size, recalibration_steps
        )
    else:
        warn_batchnorm(model, averaged_statistics=True)
    return model


def _probabilities(model, x, batch_size: int, from_logits: bool):
    scores = model.predict(x, batch_size=batch_size, verbose=0)
    scores = np.asarray(scores, dtype=np.float64)
    if from_logits:
        scores = scores - scores.max(axis=-1, keepdims=True)
        scores = np.exp(scores)
        scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def _soup_score(probs, labels, metric: str) -> float:
    """Higher is better: accuracy, or minus the mean NLL."""
    if metric == "accuracy":
        return float(np.mean(np.argmax(probs, axis=-1) == labels))
    picked = probs[np.arange(len(labels)), labels]
    return float(np.mean(np.log(np.clip(picked, 1e-12, None))))


SOUP_METRICS = ("accuracy", "nll")


def greedy_soup(
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
    """Averages the members whose weights help on validation data.

    The greedy soup of Wortsman et al. 2022 ("Model soups: averaging
    weights of multiple fine-tuned models improves accuracy without
    increasing inference time", arXiv:2203.05482): sort the members by
    their own validation score, best first; start the soup with the best,
    then add each next member to the (uniform) average only if the
    validation score of the average does not get worse. A member from
    another basin (a diverged run, a bad learning rate) is left out, where
    a uniform average (`average_weights`) would be spoiled by it.

    Scores are computed with numpy on the model's predictions:
    `metric="accuracy"` (higher is better, the paper's choice) or `"nll"`
    (the mean negative log-likelihood, lower is better; finer-grained on
    small validation sets). With `recalibration_data`, the BatchNorm
    statistics of every member and candidate soup are recomputed on it
    before scoring (`recalibrate_batchnorm`); without it, the statistics
    are averaged like the other variables (a warning says so for BatchNorm
    models).

    Args:
        models: A directory written by `SnapshotCheckpoint`, a list of
            `.keras` paths (e.g. separately fine-tuned copies of one
            model) or a list of Keras models, of one architecture.
        validation_data: `(x, y)` with integer labels `y`.
        metric: `"accuracy"` or `"nll"`.
        from_logits: Whether the models output logits; None reads it from
            the output layer (softmax: probabilities; linear: logits).
        recalibration_data: Optional training inputs for BatchNorm.
        recalibration_steps: Optional limit on the batches used for that.
        batch_size: Batch size for prediction and recalibration.
        safe_mode, skip_invalid, custom_objects, allow_nonfinite: How the
            members are loaded: see `keras_snapshot.loading.LoadOptions`.

    Returns:
        `(model, kept)`: a new `keras.Model` holding the soup (not
        compiled), and the indices (into the loaded members, oldest first)
        of the members in it, in the order they were added.

    Example:

    ```python
    soup, kept = keras_snapshot.greedy_soup(
        ["run_a.keras", "run_b.keras", "run_c.keras"],
        validation_data=(x_val, y_val), metric="nll",
    )
    print("kept", kept)
    ```
    """
    if metric not in SOUP_METRICS:
        raise ValueError(
            f"`metric` must be one of {SOUP_METRICS}. Received: "
            f"metric={metric!r}."
        )
    if not isinstance(validation_data, tuple) or len(validation_data) != 2:
        raise ValueError(
            "`validation_data` must be a tuple `(x, y)` of arrays with "
            "integer labels y. Received: "
            f"{type(validation_data).__name__}."
        )
    members = _load_one_architecture(
        models,
        batch_size,
        recalibration_steps,
        safe_mode=safe_mode,
        skip_invalid=skip_invalid,
        custom_objects=custom_objects,
        allow_nonfinite=allow_nonfinite,
    )
    if from_logits is None:
        declared = declares_probabilities(members[0])
        if declared is None:
            raise ValueError(
                "Cannot tell whether the models output probabilities or "
                "logits: their last layer declares neither a softmax nor a "
                "linear activation. Pass `from_logits=True` or "
                "`from_logits=False`."
            )
        from_logits = not declared
    x_val, y_val = validation_data
    values = [
        [ops.convert_to_numpy(v).astype(np.float64) for v in m.weights]
        for m in members
    ]
    floats = [_is_float(v) for v in members[0].weights]
    work = model_with_weights(members[0], values[0], safe_mode, custom_objects)

    def score(arrays) -> float:
        assign_weights(work, arrays)
        if recalibration_data is not None:
            recalibrate_batchnorm(
                work, recalibration_data, batch_size, recalibration_steps
            )
        probs = _probabilities(work, x_val, batch_size, from_logits)
        if probs.ndim != 2 or probs.shape[-1] < 2:
            raise ValueError(
                "greedy_soup scores classifiers with one output per class "
                "(2 or more). Received outputs of shape "
                f"{probs.shape}; for one sigmoid output, give the model a "
                "2-way softmax."
            )
        if not np.all(np.isfinite(probs)):
            return math.nan  # Ranks last, never kept.
        labels = check_labels(y_val, *probs.shape, name="y_val")
        return _soup_score(probs, labels, metric)

    own = [score(v) for v in values]
    order = sorted(
        range(len(members)), key=lambda i: (math.isnan(own[i]), -own[i])
    )
    if math.isnan(own[order[0]]):
        raise ValueError(
            "greedy_soup: every member predicts non-finite values (NaN or "
            "inf) on `validation_data`, so none can be scored. Received: "
            f"{len(members)} members, all non-finite."
        )
    kept = [order[0]]
    soup, best = values[order[0]], own[order[0]]
    for i in order[1:]:
        n = len(kept)
        candidate = [
            (n * s + v) / (n + 1) if is_f else s
            for s, v, is_f in zip(soup, values[i], floats)
        ]
        candidate_score = score(candidate)
        if candidate_score >= best:
            kept.append(i)
            soup, best = candidate, candidate_score
    model = model_with_weights(members[0], soup, safe_mode, custom_objects)
    if recalibration_data is not None:
        recalibrate_batchnorm(
            model, recalibration_data, batch_size, recalibration_steps
        )
    elif len(kept) > 1:
        warn_batchnorm(model, averaged_statistics=True)
    return model, kept


class StochasticWeightAveraging(WeightAveraging):
    """Keeps the running average of the weights during training (SWA).

    `WeightAveraging(mode="swa", average_batchnorm=True)` under its
    earlier name and arguments (Izmailov et al. 2018, arXiv:1803.05407):
    `w_swa <- (n w_swa + w) / (n + 1)` after each averaged step, at the end
    of every epoch from `start_epoch` on, or every `every_steps` optimizer
    steps from step `start_step` on. Every float variable is averaged, the
    BatchNorm moving statistics too; recompute those with
    `recalibration_data`. New code should use `WeightAveraging`, which
    also validates with the average and does EMA.

    Resuming: the running average now lives in Keras variables that
    `keras.callbacks.BackupAndRestore` saves with the weights, so
    `backup_dir` is no longer needed: it is accepted, ignored, and warned
    about (`DeprecationWarning`); nothing is written there.

    Args:
        start_epoch, start_step, every_steps, filepath,
        set_weights_at_end, recalibration_data, recalibration_steps,
        verbose: As for `WeightAveraging`.
        backup_dir: Deprecated and ignored.

    Example:

    ```python
    swa = keras_snapshot.StochasticWeightAveraging(
        start_epoch=16, filepath="swa.keras", recalibration_data=x_train,
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
        log_dir: str | None = None,
    ):
        if backup_dir is not None:
            if not isinstance(backup_dir, (str, os.PathLike)) or not str(
                backup_dir
            ):
                raise ValueError(
                    "`backup_dir` must be a path to a folder. Received: "
                    f"backup_dir={backup_dir!r}."
                )
            warnings.warn(
                "StochasticWeightAveraging(backup_dir=...) is deprecated "
                "and ignored: the running average is now kept in Keras "
                "variables that keras.callbacks.BackupAndRestore saves with "
                "the weights. Drop `backup_dir`.",
                DeprecationWarning,
                stacklevel=2,
            )
        super().__init__(
            mode="swa",
            start_epoch=start_epoch,
            start_step=start_step,
            every_steps=every_steps,
            average_batchnorm=True,
            recalibration_data=recalibration_data,
            recalibration_steps=recalibration_steps,
            filepath=filepath,
            set_weights_at_end=set_weights_at_end,
            log_dir=log_dir,
            verbose=verbose,
        )
        self.backup_dir = None if backup_dir is None else os.fspath(backup_dir)

    def get_config(self) -> dict:
        return {
            "start_epoch": self.start_epoch,
            "start_step": self.start_step,
            "every_steps": self.every_steps,
            "filepath": self.filepath,
            "set_weights_at_end": self.set_weights_at_end,
            "backup_dir": self.backup_dir,
            "recalibration_data": self.recalibration_data,
            "recalibration_steps": self.recalibration_steps,
            "log_dir": self.log_dir,
            "verbose": self.verbose,
        }
