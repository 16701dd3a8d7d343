"""Members averaged in one functional Keras model.

Public: `build_ensemble`. The rest (`combine_members`, the weight and
`from_logits` checks) is internal, shared with selection, export and the
command line.
"""

import keras
import numpy as np
from numpy.typing import ArrayLike

from keras_snapshot import layers
from keras_snapshot._checks import check_positive_int
from keras_snapshot.batchnorm import recalibrate_batchnorm
from keras_snapshot.loading import Member
from keras_snapshot.loading import describe
from keras_snapshot.loading import load_members
from keras_snapshot.loading import model_with_weights

EXTRA_OUTPUTS = ("entropy", "mutual_information")
# The one name of the ensemble's output: its output layer, the key of its
# output dict, and the output of every format `keras_snapshot.export` writes.
OUTPUT_NAME = "probabilities"


def normalize_weights(weights: ArrayLike, num_members: int) -> np.ndarray:
    """Checked weights, one per member, as float64 scaled to sum to 1.

    The one place weights are validated: finite, non-negative, not all zero.
    `normalize_weights([2, 1, 1], 3)` is `[0.5, 0.25, 0.25]`.
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


def declares_probabilities(model) -> bool | None:
    """True for a softmax output layer, False for a linear one, else None."""
    if not getattr(model, "layers", None):
        return None
    last = model.layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return True
    activation = getattr(last, "activation", None)
    name = getattr(activation, "__name__", None)
    if name == "softmax":
        return True
    if name == "linear":
        return False
    return None


def resolve_from_logits(members: list, from_logits) -> bool:
    """`from_logits` checked, or (for None) read from the members' outputs.

    Members (`Member`s) whose output is unknown, or that disagree, are refused.
    """
    if from_logits is not None:
        if not isinstance(from_logits, bool):
            raise ValueError(
                "`from_logits` must be True, False or None (read from the "
                f"members' output layer). Received: from_logits="
                f"{from_logits!r}."
            )
        return from_logits
    declared = {m.name: declares_probabilities(m.model) for m in members}
    unknown = [name for name, d in declared.items() if d is None]
    if unknown:
        raise ValueError(
            f"Cannot tell whether {unknown} output probabilities or logits: "
            "their last layer declares neither a softmax nor a linear "
            "activation. Pass `from_logits=True` (logits) or "
            "`from_logits=False` (probabilities)."
        )
    if len(set(declared.values())) > 1:
        raise ValueError(
            "Some members output probabilities and others logits: "
            f"{declared} (True = probabilities). All members must agree."
        )
    return not next(iter(declared.values()))


def check_members(members: list) -> None:
    """Refuses members that are not one-input, one-output with equal shapes."""
    reference = None
    for member in members:
        model, name = member.model, describe(member)
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ValueError(
                f"Member {name} has {len(model.inputs)} inputs and "
                f"{len(model.outputs)} outputs; ensembles average models "
                "with one input and one output (class scores)."
            )
        shapes = (
            tuple(model.inputs[0].shape[1:]),
            tuple(model.outputs[0].shape[1:]),
        )
        if reference is None:
            reference = (shapes, name)
        elif shapes != reference[0]:
            raise ValueError(
                f"Member {name} has input shape {shapes[0]} and output "
                f"shape {shapes[1]}, but {reference[1]} has input shape "
                f"{reference[0][0]} and output shape {reference[0][1]}. All "
                "members of an ensemble must agree."
            )


def combine_members(
    members: list,
    weights=None,
    from_logits: bool | None = None,
    temperature: float | None = None,
    extra_outputs: tuple | list = (),
    name: str = "snapshot_ensemble",
):
    """`build_ensemble` for loaded members (models or `Member`s).

    The output layer is `probabilities`; with `extra_outputs` the model
    returns a dict of it and those outputs.
    """
    members = [
        m if isinstance(m, Member) else Member(f"snapshot_{i}", m)
        for i, m in enumerate(members, start=1)
    ]
    if not members:
        raise ValueError("`members` is empty: pass at least one model.")
    check_members(members)
    if isinstance(extra_outputs, str) or set(extra_outputs) - set(
        EXTRA_OUTPUTS
    ):
        raise ValueError(
            f"`extra_outputs` must be a list drawn from {EXTRA_OUTPUTS}. "
            f"Received: extra_outputs={extra_outputs!r}."
        )
    if weights is not None:
        weights = normalize_weights(weights, len(members))
    from_logits = resolve_from_logits(members, from_logits)
    first = members[0].model
    inputs = keras.Input(
        shape=first.inputs[0].shape[1:],
        dtype=first.inputs[0].dtype,
        name="inputs",
    )
    outputs = []
    for member_name, model, _ in members:
        wrapped = keras.Model(
            model.inputs[0], model.outputs[0], name=member_name
        )
        output = wrapped(inputs)
        if from_logits:
            output = keras.layers.Softmax(name=f"{member_name}_softmax")(output)
        outputs.append(output)
    if weights is not None:
        outputs_to_sum = [
            keras.layers.Rescaling(float(w), name=f"{n}_weight")(o)
            for w, o, (n, *_) in zip(weights, outputs, members)
        ]
        combined = (
            keras.layers.Add(name="weighted_average")(outputs_to_sum)
            if len(outputs_to_sum) > 1
            else outputs_to_sum[0]
        )
    elif len(outputs) > 1:
        combined = keras.layers.Average(name="average")(outputs)
    else:
        combined = outputs[0]
    if temperature is not None:
        probabilities = layers.TemperatureScaling(
            temperature, name=OUTPUT_NAME
        )(combined)
    else:
        probabilities = keras.layers.Identity(name=OUTPUT_NAME)(combined)
    if not extra_outputs:
        return keras.Model(inputs, probabilities, name=name)
    result = {OUTPUT_NAME: probabilities}
    if "entropy" in extra_outputs:
        result["entropy"] = layers.PredictiveEntropy(name="entropy")(
            probabilities
        )
    if "mutual_information" in extra_outputs:
        result["mutual_information"] = layers.MutualInformation(
            name="mutual_information"
        )(outputs)
    return keras.Model(inputs, result, name=name)


def build_ensemble(
    snapshots,
    last: int | None = None,
    weights=None,
    from_logits: bool | None = None,
    recalibration_data=None,
    safe_mode: bool = True,
    skip_invalid: bool = False,
    custom_objects: dict | None = None,
    temperature: float | None = None,
    extra_outputs: tuple | list = (),
    allow_nonfinite: bool = False,
    name: str = "snapshot_ensemble",
):
    """Loads snapshots and averages their probabilities in one Keras model.

    Members are sub-models named after their snapshot (`snapshot_3`). Only
    built-in Keras layers are used unless `temperature` or `extra_outputs`
    are set, so the ensemble reloads from `.keras` without keras_snapshot.

    Args:
        snapshots: A directory written by `SnapshotCheckpoint`, a `.keras`
            path, a list of `.keras` paths, or a list of Keras models.
        last: Use only the last `last` snapshots (often the best ones).
        weights: Optional non-negative weight per member (after `last`).
            Choose them on validation data (see `select_snapshots`).
        from_logits: Whether members output logits; `None` reads it from
            their output layer (softmax or linear).
        recalibration_data: Optional training inputs; each member's
            BatchNorm statistics are recomputed on it (on copies).
        safe_mode, skip_invalid, custom_objects, allow_nonfinite: How the
            snapshots are loaded, as for `load_snapshots`.
        temperature: Optional temperature for the averaged probabilities
            (`softmax(log(p) / T)`); see `keras_snapshot.fit_temperature`.
        extra_outputs: `"entropy"` and/or `"mutual_information"`.
        name: Name of the ensemble model.

    Returns:
        A `keras.Model` that maps inputs to averaged class probabilities.

    Example:

    ```python
    ensemble = keras_snapshot.build_ensemble("snapshots", last=3)
    probabilities = ensemble.predict(x_test)
    ```
    """
    members = load_members(
        snapshots,
        last=last,
        safe_mode=safe_mode,
        skip_invalid=skip_invalid,
        custom_objects=custom_objects,
        allow_nonfinite=allow_nonfinite,
    )
    if recalibration_data is not None:
        members = [
            Member(
                n,
                recalibrate_batchnorm(
                    _private_copy(m, safe_mode, custom_objects),
                    recalibration_data,
                ),
                s,
            )
            for n, m, s in members
        ]
    return combine_members(
        members,
        weights=weights,
        from_logits=from_logits,
        temperature=temperature,
        extra_outputs=extra_outputs,
        name=name,
    )


def _private_copy(model, safe_mode: bool, custom_objects):
    """A copy of `model` whose weights can be changed without touching it."""
    return model_with_weights(
        model, model.get_weights(), safe_mode, custom_objects
    )
