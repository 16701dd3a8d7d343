"""Averaging snapshot models in one functional Keras model."""

import os

import keras
import numpy as np
from numpy.typing import ArrayLike

from keras_snapshot import layers
from keras_snapshot._checks import check_positive_int
from keras_snapshot.batchnorm import recalibrate_batchnorm
from keras_snapshot.loading import load_snapshots
from keras_snapshot.loading import snapshot_paths

_EXTRA_OUTPUTS = ("entropy", "mutual_information")


def normalize_weights(weights: ArrayLike, num_members: int) -> np.ndarray:
    """Checks ensemble weights and scales them to sum to 1.

    Weighted Snapshot Ensembles average member probabilities with these
    weights. This is the one place where weights are validated: they must
    be finite, non-negative, not all zero, and one per member.

    Args:
        weights: A 1-D sequence of `num_members` non-negative numbers, such
            as member counts from `greedy_selection`.
        num_members: The number of ensemble members.

    Returns:
        A float64 array of shape `(num_members,)` that sums to 1.

    Example:

    ```python
    normalize_weights([2, 1, 1], num_members=3)  # [0.5, 0.25, 0.25]
    ```
    """
    num_members = check_positive_int("num_members", num_members)
    try:
        arr = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"`weights` must be a 1-D sequence of {num_members} numbers. "
            f"Received: weights={weights!r}."
        ) from None
    if arr.shape != (num_members,):
        raise ValueError(
            f"`weights` must have one entry per member, i.e. shape "
            f"({num_members},). Received: weights.shape={arr.shape}, "
            f"weights={weights!r}."
        )
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(
            "`weights` must be finite and non-negative. Received: "
            f"weights={arr.tolist()}."
        )
    total = arr.sum()
    if total <= 0:
        raise ValueError(
            "`weights` must not be all zero: at least one member needs a "
            f"positive weight. Received: weights={arr.tolist()}."
        )
    return arr / total


def _describe(model, item) -> str:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    return f"model {model.name!r}"


def _looks_like_probabilities(model) -> bool:
    """Whether the model's outputs are non-negative and sum to one."""
    shape = model.inputs[0].shape
    if any(dim is None for dim in shape[1:]) or model.inputs[0].dtype not in (
        "float16",
        "float32",
        "float64",
        "bfloat16",
    ):
        return True  # Cannot probe; trust the caller.
    probe = np.random.default_rng(0).normal(size=(2, *shape[1:]))
    outputs = keras.ops.convert_to_numpy(
        model(probe.astype(model.inputs[0].dtype), training=False)
    )
    return bool(
        np.all(outputs >= -1e-6)
        and np.allclose(outputs.sum(axis=-1), 1.0, atol=1e-3)
    )


def check_members(models: list, names: list | None = None) -> None:
    """Checks that members can be averaged: one input, same shapes.

    Raises:
        ValueError: naming the offending member.
    """
    names = names or [_describe(m, m) for m in models]
    reference = None
    for model, name in zip(models, names):
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ValueError(
                f"Snapshot {name} has {len(model.inputs)} inputs and "
                f"{len(model.outputs)} outputs; build_ensemble averages "
                "models with one input and one output (class probabilities)."
            )
        shapes = (
            tuple(model.inputs[0].shape[1:]),
            tuple(model.outputs[0].shape[1:]),
        )
        if reference is None:
            reference = (shapes, name)
        elif shapes != reference[0]:
            raise ValueError(
                f"Snapshot {name} has input shape {shapes[0]} and output "
                f"shape {shapes[1]}, but {reference[1]} has input shape "
                f"{reference[0][0]} and output shape {reference[0][1]}. All "
                "members of an ensemble must agree."
            )


def build_ensemble(
    snapshots,
    last: int | None = None,
    weights=None,
    from_logits: bool = False,
    recalibration_data=None,
    safe_mode: bool = True,
    skip_invalid: bool = False,
    custom_objects: dict | None = None,
    temperature: float | None = None,
    extra_outputs: tuple | list = (),
    name: str = "snapshot_ensemble",
):
    """Averages snapshot models into one functional Keras model.

    The prediction of a Snapshot Ensemble (Huang et al. 2017,
    arXiv:1704.00109) is the average of its members' softmax outputs. This
    builds that as an ordinary Keras model: every member is a sub-model with
    a unique name (`snapshot_1`, ...), and a `keras.layers.Average` (or,
    with `weights`, `Rescaling` and `Add` layers) combines their
    probabilities. Only built-in Keras layers are used, so the ensemble
    saves to `.keras` and reloads without importing keras_snapshot, and
    `ensemble.export(path)` writes a TensorFlow SavedModel.

    Args:
        snapshots: A directory written by `SnapshotCheckpoint`, a list of
            `.keras` paths, or a list of Keras models.
        last: Use only the last `last` snapshots (often the best ones).
        weights: Optional non-negative weight per member (after `last`);
            normalised to sum to one. Choose them on validation data (see
            `select_snapshots`), never on the test set.
        from_logits: Set when members output logits: a softmax is applied
            to each member before averaging.
        recalibration_data: Optional training inputs; each member's
            BatchNorm statistics are recomputed on it first (see
            `recalibrate_batchnorm`). Models passed in are cloned, not
            changed.
        safe_mode: Passed to `keras.saving.load_model`.
        skip_invalid: Skip missing or corrupted snapshot files with a
            warning instead of raising an error.
        custom_objects: Custom objects needed to load the snapshots.
        temperature: Optional temperature applied to the averaged
            probabilities (`softmax(log(p) / T)`); fit it on validation
            data with `keras_snapshot.selection.fit_temperature`.
        extra_outputs: Optional uncertainty outputs for serving:
            `"entropy"` (predictive entropy of the ensemble) and
            `"mutual_information"` (disagreement between members). The
            model then returns a dict with `"probabilities"` and these.
            `temperature` and `extra_outputs` use keras_snapshot layers, so
            such an ensemble reloads from `.keras` after
            `import keras_snapshot` (its SavedModel needs nothing).
        name: Name of the ensemble model.

    Returns:
        A `keras.Model` that maps inputs to averaged class probabilities.

    Example:

    ```python
    ensemble = keras_snapshot.build_ensemble("snapshots", last=3)
    probabilities = ensemble.predict(x_test)
    ensemble.save("ensemble.keras")
    ensemble.export("ensemble_savedmodel")  # TensorFlow SavedModel
    ```
    """
    if isinstance(snapshots, (str, os.PathLike)) and os.path.isdir(snapshots):
        items = snapshot_paths(
            os.fspath(snapshots), last=last, skip_invalid=skip_invalid
        )
        last = None
    elif isinstance(snapshots, (str, os.PathLike)):
        if not os.path.exists(snapshots):
            raise FileNotFoundError(
                f"{os.fspath(snapshots)} does not exist. `snapshots` must be "
                "a snapshot directory written by SnapshotCheckpoint, a "
                "`.keras` file, or a list of `.keras` paths or models."
            )
        items = [snapshots]
    else:
        items = snapshots
    members = load_snapshots(
        items,
        last=last,
        safe_mode=safe_mode,
        custom_objects=custom_objects,
    )
    if isinstance(items, (list, tuple)):
        names = [
            _describe(m, item)
            for m, item in zip(members, list(items)[-len(members) :])
        ]
    else:
        names = None
    check_members(members, names)
    names = names or [_describe(m, m) for m in members]
    if weights is not None:
        weights = normalize_weights(weights, len(members))
    unknown = set(extra_outputs) - set(_EXTRA_OUTPUTS)
    if unknown or isinstance(extra_outputs, str):
        raise ValueError(
            f"`extra_outputs` must be a list drawn from {_EXTRA_OUTPUTS}. "
            f"Received: extra_outputs={extra_outputs!r}."
        )
    if recalibration_data is not None:
        members = [
            recalibrate_batchnorm(_private_copy(m), recalibration_data)
            for m in members
        ]
    if not from_logits:
        for member, member_name in zip(members, names):
            if not _looks_like_probabilities(member):
                raise ValueError(
                    f"Snapshot {member_name} does not output probabilities "
                    "(its outputs are not non-negative rows that sum to 1). "
                    "If it outputs logits, pass `from_logits=True`."
                )
    first = members[0]
    inputs = keras.Input(
        shape=first.inputs[0].shape[1:],
        dtype=first.inputs[0].dtype,
        name="inputs",
    )
    outputs = []
    for i, member in enumerate(members, start=1):
        wrapped = keras.Model(
            member.inputs[0], member.outputs[0], name=f"snapshot_{i}"
        )
        output = wrapped(inputs)
        if from_logits:
            output = keras.layers.Softmax(name=f"snapshot_{i}_softmax")(output)
        outputs.append(output)
    if len(outputs) == 1 and weights is None:
        probabilities = keras.layers.Identity(name="probabilities")(outputs[0])
    elif weights is None:
        probabilities = keras.layers.Average(name="probabilities")(outputs)
    else:
        scaled = [
            keras.layers.Rescaling(float(w), name=f"snapshot_{i}_weight")(o)
            for i, (w, o) in enumerate(zip(weights, outputs), start=1)
        ]
        if len(scaled) == 1:
            probabilities = keras.layers.Identity(name="probabilities")(
                scaled[0]
            )
        else:
            probabilities = keras.layers.Add(name="probabilities")(scaled)
    if temperature is not None:
        probabilities = layers.TemperatureScaling(
            temperature, name="temperature_scaling"
        )(probabilities)
    if not extra_outputs:
        return keras.Model(inputs, probabilities, name=name)
    result = {"probabilities": probabilities}
    if "entropy" in extra_outputs:
        result["entropy"] = layers.PredictiveEntropy(name="entropy")(
            probabilities
        )
    if "mutual_information" in extra_outputs:
        result["mutual_information"] = layers.MutualInformation(
            name="mutual_information"
        )(outputs)
    return keras.Model(inputs, result, name=name)


def _private_copy(model):
    """A copy of `model` whose weights can be changed without touching it."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def export_ensemble(ensemble, path: str, format: str = "tf_saved_model"):
    """Exports an ensemble for serving (a TensorFlow SavedModel by default).

    The SavedModel has a `serve` endpoint and a `serving_default`
    signature, both returning the averaged probabilities. It is
    `ensemble.export(path)` with a clear error on backends that cannot
    export.

    Example:

    ```python
    keras_snapshot.export_ensemble(ensemble, "ensemble_savedmodel")
    reloaded = tf.saved_model.load("ensemble_savedmodel")
    probabilities = reloaded.serve(x_test)
    ```
    """
    try:
        ensemble.export(path, format=format, verbose=False)
    except ImportError as e:
        raise RuntimeError(
            f"Exporting to {format} needs TensorFlow installed next to the "
            f"{keras.backend.backend()} backend ({e}). Install tensorflow or "
            "save a `.keras` file with `ensemble.save(...)` instead."
        ) from e
    return path
