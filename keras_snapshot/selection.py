"""Choosing and calibrating ensemble members on validation predictions.

Public: `select_snapshots` and `fit_temperature`. The rest (greedy and
last-m selection, temperature fits, member predictions) is internal, shared
with the command line. Fit every choice on validation data, never on the
test set. Member predictions have shape
`(num_members, num_examples, num_classes)`, oldest snapshot first.
"""

import dataclasses

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize
from scipy import special

from keras_snapshot import _scoring
from keras_snapshot import layers
from keras_snapshot import metrics
from keras_snapshot._checks import check_positive_int
from keras_snapshot._checks import check_positive_number
from keras_snapshot._checks import is_dataset
from keras_snapshot._checks import is_endless
from keras_snapshot.ensemble import normalize_weights
from keras_snapshot.ensemble import resolve_from_logits
from keras_snapshot.loading import Member
from keras_snapshot.loading import load_members

# Temperatures are searched in [0.05, 20], on a log scale: beyond these,
# a validation split is telling more about its own size than about
# calibration (a split with no errors pushes T towards 0).
TEMPERATURE_BOUNDS = (0.05, 20.0)
_LOG_T_TOLERANCE = 1e-8
# An optimum this close to a bound (in log T) counts as on the bound.
_LOG_T_AT_BOUND = 1e-3
# Below this relative gain in validation NLL, the temperature is not
# identified and T = 1 is kept.
MIN_NLL_GAIN = 0.01


def _check_selection_inputs(member_probs, y_val, metric):
    """Checked `(member_probs, labels, metric)` for the selection functions."""
    member_probs = metrics._check_member_probs(member_probs)
    _, num_examples, num_classes = member_probs.shape
    labels = metrics._check_labels(
        y_val, num_examples, num_classes, name="y_val"
    )
    return member_probs, labels, _scoring.check_metric(metric)


def _argbest(keys: np.ndarray) -> int:
    """Index of the lexicographically smallest row of keys (first on ties)."""
    # np.lexsort is stable and takes its primary key last.
    return int(np.lexsort(keys.T[::-1])[0])


def greedy_selection(
    member_probs: ArrayLike,
    y_val: ArrayLike,
    metric: str = "nll",
    max_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy forward selection with replacement (Caruana et al. 2004).

    Adds the member that most improves the validation `metric` of the
    average, until none does or after `max_size` (default `2 * num_members`)
    additions; the lowest index wins ties. Returns `(weights, counts)`.
    """
    member_probs, labels, metric = _check_selection_inputs(
        member_probs, y_val, metric
    )
    num_members, num_examples, num_classes = member_probs.shape
    if max_size is None:
        max_size = 2 * num_members
    max_size = check_positive_int("max_size", max_size)

    counts = np.zeros(num_members, dtype=np.int64)
    total = np.zeros((num_examples, num_classes))
    best = None
    for size in range(1, max_size + 1):
        candidates = (total + member_probs) / size
        keys = _scoring.score_keys(candidates, labels, metric)
        index = _argbest(keys)
        if best is not None and not tuple(keys[index]) < best:
            break
        best = tuple(keys[index])
        counts[index] += 1
        total += member_probs[index]
    return normalize_weights(counts, num_members), counts


def best_last_m(
    member_probs: ArrayLike, y_val: ArrayLike, metric: str = "nll"
) -> tuple[int, np.ndarray]:
    """The number `m` of most recent members whose average is best.

    The smaller `m` wins ties. Returns `(m, weights)`, with `1 / m` on the
    last `m` members.
    """
    member_probs, labels, metric = _check_selection_inputs(
        member_probs, y_val, metric
    )
    num_members, num_examples, num_classes = member_probs.shape

    # Row i averages the last i + 1 members.
    sizes = np.arange(1, num_members + 1)[:, None, None]
    averages = np.cumsum(member_probs[::-1], axis=0) / sizes
    m = _argbest(_scoring.score_keys(averages, labels, metric)) + 1
    weights = np.zeros(num_members)
    weights[num_members - m :] = 1.0
    return m, normalize_weights(weights, num_members)


def _check_scores(logits_or_probs: ArrayLike, from_logits: bool, ndim: int):
    """Checked predictions, as float64: probabilities, or logits."""
    if from_logits:
        arr = np.asarray(logits_or_probs, dtype=np.float64)
        if arr.ndim != ndim or 0 in arr.shape or arr.shape[-1] < 2:
            raise ValueError(
                "`logits_or_probs` must be a non-empty array with at least 2 "
                f"classes on its last axis and {ndim} dimensions. Received: "
                f"shape={arr.shape}."
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(
                "`logits_or_probs` must contain only finite values. Received "
                "NaN or infinite logits."
            )
        return arr
    return metrics._check_probs(
        logits_or_probs, name="logits_or_probs", ndim=ndim
    )


def _check_temperature(temperature: float) -> float:
    """A positive temperature, or an error."""
    return check_positive_number(
        "temperature", temperature, "e.g. the output of `fit_temperature`."
    )


def _scaled_nll(logits: np.ndarray, labels: np.ndarray, log_t: float):
    """Mean NLL of softmax(logits / exp(log_t))."""
    z = layers.temperature_logits(logits, np.exp(log_t), from_logits=True)
    log_norm = special.logsumexp(z, axis=1)
    return float(np.mean(log_norm - z[np.arange(z.shape[0]), labels]))


@dataclasses.dataclass(frozen=True)
class TemperatureFit:
    """What `calibrate_temperature` found on the validation split.

    `temperature` is the one to use: `fitted`, or 1.0 when `status` is
    `"no_errors"`, `"at_bound"` or `"flat"` rather than `"fitted"`.
    """

    temperature: float
    fitted: float
    status: str
    nll: float
    fitted_nll: float
    bounds: tuple[float, float]
    min_nll_gain: float

    @property
    def message(self) -> str:
        """One sentence that says what happened, for logs and reports."""
        nlls = (
            f"validation NLL {self.nll:.4f} at T = 1, {self.fitted_nll:.4f} "
            f"at T = {self.fitted:.3g}"
        )
        if self.status == "fitted":
            return f"temperature T = {self.fitted:.3g} fitted ({nlls})."
        reason = {
            "no_errors": "the validation error is 0, so validation NLL keeps "
            "falling as T goes to 0",
            "at_bound": "the validation optimum lies on the search bound "
            f"(T in [{self.bounds[0]:g}, {self.bounds[1]:g}])",
            "flat": "validation NLL barely changes with T (under "
            f"{100 * self.min_nll_gain:g}% lower)",
        }[self.status]
        return (
            f"temperature not identified: {reason}; {nlls}. Using T = 1 "
            "(no scaling)."
        )


def calibrate_temperature(
    logits_or_probs: ArrayLike,
    y_val: ArrayLike,
    from_logits: bool = False,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
    min_nll_gain: float = MIN_NLL_GAIN,
) -> TemperatureFit:
    """Fits a temperature on validation data, or keeps `T = 1`.

    `T = 1` is kept when validation cannot identify it: no validation
    errors, the optimum on a `bounds` edge, or NLL less than `min_nll_gain`
    (relative) below `T = 1`'s. The result's `message` says which.
    """
    # The logits at T = 1 (log-probabilities for probabilities).
    logits = layers.temperature_logits(
        _check_scores(logits_or_probs, from_logits, ndim=2), 1.0, from_logits
    )
    labels = metrics._check_labels(y_val, *logits.shape, name="y_val")
    low, high = _check_bounds(bounds)
    min_nll_gain = check_positive_number(
        "min_nll_gain", min_nll_gain, "e.g. 0.01 for 1%."
    )
    log_bounds = (np.log(low), np.log(high))
    result = optimize.minimize_scalar(
        lambda log_t: _scaled_nll(logits, labels, log_t),
        bounds=log_bounds,
        method="bounded",
        options={"xatol": _LOG_T_TOLERANCE},
    )
    log_t = float(result.x)
    nll = _scaled_nll(logits, labels, 0.0)
    fitted_nll = _scaled_nll(logits, labels, log_t)
    if not np.any(np.argmax(logits, axis=1) != labels):
        status = "no_errors"
    elif min(abs(log_t - b) for b in log_bounds) < _LOG_T_AT_BOUND:
        status = "at_bound"
    elif nll - fitted_nll < min_nll_gain * nll:
        status = "flat"
    else:
        status = "fitted"
    fitted = float(np.exp(log_t))
    return TemperatureFit(
        temperature=fitted if status == "fitted" else 1.0,
        fitted=fitted,
        status=status,
        nll=nll,
        fitted_nll=fitted_nll,
        bounds=(low, high),
        min_nll_gain=min_nll_gain,
    )


def _check_bounds(bounds) -> tuple[float, float]:
    """`bounds` as floats `(low, high)`, `0 < low < 1 < high`, or an error."""
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        low = high = float("nan")
    if not (0 < low < 1 < high < np.inf):
        raise ValueError(
            "`bounds` must be two temperatures `(low, high)` with "
            "0 < low < 1 < high, e.g. (0.05, 20.0). Received: "
            f"bounds={bounds!r}."
        )
    return low, high


def fit_temperature(
    logits_or_probs: ArrayLike, y_val: ArrayLike, from_logits: bool = False
) -> float:
    """Fits the temperature that minimises validation NLL, or returns 1.

    Temperature scaling (Guo et al. 2017) divides the logits by one scalar
    `T` before the softmax (for probabilities, `log(probs)` are the
    logits); the predicted class never changes. `T` is searched in
    `[0.05, 20]`. When validation cannot identify it (no validation errors,
    the optimum on a bound, or under 1% lower NLL than at `T = 1`), the
    result is `1.0`. Fit it on validation data, never on the test set.

    Args:
        logits_or_probs: Validation predictions of shape
            `(num_examples, num_classes)`: probabilities, or logits if
            `from_logits=True`.
        y_val: Validation labels, integer or one-hot.
        from_logits: Whether `logits_or_probs` holds logits.

    Returns:
        The temperature, a positive Python float.

    Example:

    ```python
    ensemble = keras_snapshot.build_ensemble(
        snapshots, temperature=keras_snapshot.fit_temperature(p_val, y_val)
    )
    ```
    """
    return calibrate_temperature(
        logits_or_probs, y_val, from_logits=from_logits
    ).temperature


def apply_temperature(
    logits_or_probs: ArrayLike, temperature: float, from_logits: bool = False
) -> np.ndarray:
    """Predictions at temperature `T`: `softmax(logits / T)`.

    For probabilities this is `probs ** (1 / T)` renormalised; 2-D or
    stacked 3-D predictions keep their shape.
    """
    temperature = _check_temperature(temperature)
    ndim = 3 if np.ndim(logits_or_probs) == 3 else 2
    return layers.temperature_softmax(
        _check_scores(logits_or_probs, from_logits, ndim),
        temperature,
        from_logits,
    )


def _check_finite_dataset(data, name: str) -> None:
    """Refuses an endless dataset, which would be predicted forever."""
    if is_endless(data):
        raise ValueError(
            f"`{name}` is an endless dataset (cardinality INFINITE, e.g. "
            "`.repeat()`); drop `.repeat()` or add `.take(num_batches)`. "
            f"Received: {name}={data!r}."
        )


def _resolve_probabilities(members: list, from_logits) -> bool:
    """Whether the members output logits, decided as `build_ensemble` does."""
    if from_logits is False:
        return False
    named = [
        m if isinstance(m, Member) else Member(f"snapshot_{i}", m)
        for i, m in enumerate(members, start=1)
    ]
    return resolve_from_logits(named, from_logits)


def _dataset_batches(data, name: str, with_labels: bool):
    """Yields `(x, y)` per batch of a finite dataset (`y` None if unused).

    The element structure is checked before any batch is read.
    """
    _check_finite_dataset(data, name)
    spec = data.element_spec
    is_tuple = isinstance(spec, (tuple, list))
    if with_labels and not (is_tuple and len(spec) == 2):
        raise ValueError(
            f"`{name}` must be a dataset of `(x, y)` batches; drop sample "
            "weights, e.g. `data.map(lambda x, y, w: (x, y))`. Received: "
            f"element_spec={spec!r}."
        )
    if isinstance(spec, dict) or (is_tuple and isinstance(spec[0], dict)):
        raise ValueError(
            f"`{name}` must yield batches of one input array (the members "
            f"have one input). Received: element_spec={spec!r}."
        )
    for batch in data:
        if isinstance(batch, (tuple, list)):
            yield batch[0], (batch[1] if with_labels else None)
        else:
            yield batch, None


def _predict_batches(members: list, batches, name: str):
    """`(outputs (m, n, k), labels or None)` from one pass over `batches`.

    Every member predicts a batch before the next is read, so labels match
    even when the dataset reshuffles on every pass.
    """
    import keras

    # As `model.predict` does with a tf.data dataset: TensorFlow takes its
    # tensors, the other backends numpy arrays.
    as_numpy = keras.backend.backend() != "tensorflow"
    outputs = [[] for _ in members]
    labels = []
    for x, y in batches:
        if as_numpy:
            x = np.asarray(x)
        for out, model in zip(outputs, members):
            out.append(np.asarray(model.predict_on_batch(x)))
        if y is not None:
            labels.append(np.asarray(y))
    if not outputs[0]:
        raise ValueError(
            f"`{name}` is an empty dataset: pass a dataset with at least one "
            f"batch. Received: {name} with 0 batches."
        )
    stacked = np.stack([np.concatenate(out) for out in outputs])
    return stacked, (np.concatenate(labels) if labels else None)


def predict_members(
    members: list,
    x,
    batch_size: int = 256,
    from_logits: bool | None = False,
) -> np.ndarray:
    """The members' probabilities on `x`, of shape `(m, n, k)`.

    `x` is an array or a finite `tf.data.Dataset` (read once, batch by
    batch). `from_logits=True` applies a softmax; `None` decides as
    `build_ensemble` does.
    """
    members = list(members)
    from_logits = _resolve_probabilities(members, from_logits)
    if is_dataset(x):
        batches = _dataset_batches(x, "x", with_labels=False)
        outputs, _ = _predict_batches(members, batches, "x")
    else:
        outputs = np.stack(
            [
                np.asarray(m.predict(x, batch_size=batch_size, verbose=0))
                for m in members
            ]
        )
    return _scoring.probabilities(outputs, from_logits)


def _check_labelled_data(data, name: str) -> None:
    """Refuses what is neither `(x, y)` nor a finite dataset."""
    if is_dataset(data):
        _check_finite_dataset(data, name)
        return
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        received = f"a {type(data).__name__}"
        if isinstance(data, (tuple, list)):
            received += f" of length {len(data)}"
        raise ValueError(
            f"`{name}` must be a tuple `(x_val, y_val)` of held-out arrays "
            f"(inputs and labels), e.g. `{name}=(x_val, y_val)`, or "
            "a finite `tf.data.Dataset` of `(x, y)` batches. Received: "
            f"{received}."
        )


def predict_members_and_labels(
    members: list,
    data,
    batch_size: int = 256,
    from_logits: bool | None = False,
) -> tuple[np.ndarray, np.ndarray]:
    """`(member_probs, labels)` from one pass over `data`.

    `data` is `(x, y)` or a finite `tf.data.Dataset` of `(x, y)` batches;
    labels come from the same pass, so they match a reshuffling dataset.
    """
    return _predictions_and_labels(
        list(members), data, batch_size, from_logits, "data"
    )


def _predictions_and_labels(members, data, batch_size, from_logits, name):
    """`predict_members_and_labels`, with `data` named `name` in errors."""
    _check_labelled_data(data, name)
    if not is_dataset(data):
        x, y = data
        return predict_members(members, x, batch_size, from_logits), (
            np.asarray(y)
        )
    from_logits = _resolve_probabilities(members, from_logits)
    batches = _dataset_batches(data, name, with_labels=True)
    outputs, labels = _predict_batches(members, batches, name)
    return _scoring.probabilities(outputs, from_logits), labels


class SnapshotSelection:
    """What `select_snapshots` chose: `snapshots`, `weights`, `method` and
    `validation_scores` (`metrics.evaluate_predictions` of the ensemble).
    """

    def __init__(self, snapshots, weights, method, validation_scores):
        self.snapshots = list(snapshots)
        self.weights = np.asarray(weights, dtype="float64")
        self.method = method
        self.validation_scores = validation_scores

    def __repr__(self):
        return (
            f"SnapshotSelection(method={self.method!r}, "
            f"members={len(self.snapshots)}, "
            f"weights={np.round(self.weights, 3).tolist()})"
        )


_SELECTION_METHODS = ("greedy", "last_m", "all")


def _check_method(method: str) -> str:
    """`method` if it is a selection method, or an error."""
    if method not in _SELECTION_METHODS:
        raise ValueError(
            f"`method` must be one of {_SELECTION_METHODS}. "
            f"Received: method={method!r}."
        )
    return method


def choose_members(
    member_probs: ArrayLike,
    y_val: ArrayLike,
    method: str = "greedy",
    metric: str = "nll",
) -> np.ndarray:
    """Member weights (zeros for those left out) chosen by `method`.

    `"greedy"` is `greedy_selection`, `"last_m"` `best_last_m`, `"all"` the
    uniform average; shared by `select_snapshots` and the command line.
    """
    _check_method(method)
    member_probs, _, metric = _check_selection_inputs(
        member_probs, y_val, metric
    )
    if method == "greedy":
        weights, _ = greedy_selection(member_probs, y_val, metric=metric)
    elif method == "last_m":
        _, weights = best_last_m(member_probs, y_val, metric=metric)
    else:
        count = len(member_probs)
        weights = normalize_weights(np.ones(count), count)
    return weights


def members_and_weights(members, weights) -> tuple[list, np.ndarray]:
    """The members with a positive weight, and their renormalised weights."""
    members = list(members)
    weights = normalize_weights(weights, len(members))
    keep = [i for i, w in enumerate(weights) if w > 0]
    return [members[i] for i in keep], normalize_weights(
        weights[keep], len(keep)
    )


def select_snapshots(
    snapshots,
    *,
    validation_data,
    method: str = "greedy",
    metric: str = "nll",
    batch_size: int = 256,
    from_logits: bool | None = None,
    safe_mode: bool = True,
    skip_invalid: bool = False,
    custom_objects: dict | None = None,
    allow_nonfinite: bool = False,
) -> SnapshotSelection:
    """Chooses snapshots and weights on held-out validation data.

    Early snapshots can be weak, so averaging all of them can be worse than
    averaging some. Members that output logits get a softmax before they
    are scored. Select on validation data, never on the test set.

    Args:
        snapshots: A snapshot directory, a list of `.keras` paths or a list
            of Keras models.
        validation_data: `(x_val, y_val)` with integer or one-hot labels,
            or a finite `tf.data.Dataset` of `(x, y)` batches.
        method: `"greedy"` (forward selection with replacement, Caruana et
            al. 2004), `"last_m"` (the best number of most recent
            snapshots) or `"all"` (the uniform average).
        metric: `"nll"` or `"error"`, the validation score to optimise.
        batch_size: Batch size for predicting arrays.
        from_logits: Whether members output logits; `None` reads it from
            their output layer.
        safe_mode, skip_invalid, custom_objects, allow_nonfinite: How the
            snapshots are loaded, as for `load_snapshots`.

    Returns:
        A `SnapshotSelection` whose `snapshots` and `weights` go to
        `build_ensemble`.

    Example:

    ```python
    choice = keras_snapshot.select_snapshots(
        "snapshots", validation_data=(x_val, y_val)
    )
    ensemble = keras_snapshot.build_ensemble(
        choice.snapshots, weights=choice.weights
    )
    ```
    """
    _check_method(method)
    metric = _scoring.check_metric(metric)
    # Refused before any snapshot is loaded.
    _check_labelled_data(validation_data, "validation_data")
    loaded = load_members(
        snapshots,
        safe_mode=safe_mode,
        skip_invalid=skip_invalid,
        custom_objects=custom_objects,
        allow_nonfinite=allow_nonfinite,
    )
    from_logits = resolve_from_logits(loaded, from_logits)
    members = [member.model for member in loaded]
    # What the caller passes on to build_ensemble: paths, or the models.
    items = [member.source or member.model for member in loaded]
    member_probs, y_val = _predictions_and_labels(
        members, validation_data, batch_size, from_logits, "validation_data"
    )
    weights = choose_members(member_probs, y_val, method, metric)
    chosen, chosen_weights = members_and_weights(range(len(members)), weights)
    probs = np.tensordot(chosen_weights, member_probs[chosen], axes=1)
    return SnapshotSelection(
        [items[i] for i in chosen],
        chosen_weights,
        method,
        metrics.evaluate_predictions(probs, y_val),
    )
