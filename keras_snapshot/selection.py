"""Choosing and calibrating ensemble members on validation predictions.

Snapshot Ensembles (Huang et al. 2017, arXiv:1704.00109) average the softmax
outputs of all snapshots, or of the last `m` only: early snapshots can be
weak, and averaging them in can make the ensemble worse. This module picks
members and weights from predictions, in plain numpy:

- `greedy_selection`: greedy forward selection with replacement
  (Caruana et al. 2004, "Ensemble Selection from Libraries of Models").
- `best_last_m`: the number `m` of most recent snapshots to average.
- `fit_temperature` and `apply_temperature`: temperature scaling
  (Guo et al. 2017, "On Calibration of Modern Neural Networks");
  `calibrate_temperature` also says whether validation identified the
  temperature or fell back to `T = 1`.
- `choose_members`: the one function that turns a selection method
  (`"greedy"`, `"last_m"` or `"all"`) into member weights, and
  `members_and_weights`, which drops the members a choice left out.
- `predict_members` and `predict_members_and_labels`: the members'
  probabilities (a softmax for logits members) on arrays or on a finite
  `tf.data.Dataset`, read once, with the labels of the same pass.

All choices must be fitted on validation data, held out from training and
distinct from the test set. Choosing members, `m` or a temperature on the
test set makes the reported test numbers optimistic and meaningless.

Member predictions have shape `(num_members, num_examples, num_classes)`,
in snapshot order (oldest first), and labels are as in
`keras_snapshot.metrics`: integer labels of shape `(num_examples,)` or
`(num_examples, 1)`, or one-hot labels.
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
    """Greedy forward selection of members, with replacement, on validation.

    Implements ensemble selection of Caruana et al. 2004 ("Ensemble Selection
    from Libraries of Models", ICML) for the snapshots of a Snapshot
    Ensemble (Huang et al. 2017, arXiv:1704.00109). Starting from an empty
    ensemble, each step adds the member (a member may be added again) whose
    addition gives the best validation `metric` for the average of the
    selected members' probabilities. Selection stops as soon as no addition
    strictly improves the metric, or after `max_size` additions. Adding a
    member several times gives it a proportionally larger weight. On ties,
    the member with the lowest index is added.

    Fit this on validation data only, never on the test set: the weights
    are tuned to the data they are chosen on.

    Args:
        member_probs: Validation predictions of each member, of shape
            `(num_members, num_examples, num_classes)`.
        y_val: Validation labels: integers of shape `(num_examples,)` or
            `(num_examples, 1)`, or one-hot of shape
            `(num_examples, num_classes)`.
        metric: `"nll"` (negative log-likelihood) or `"error"` (error rate,
            ties broken by NLL, since the error alone rarely changes with
            one addition). Defaults to `"nll"`.
        max_size: The largest number of additions, counting repeats.
            Defaults to `2 * num_members`, enough to give some members
            double weight while keeping the selection cheap.

    Returns:
        A tuple `(weights, counts)`: `weights` is a float64 array of shape
        `(num_members,)` summing to 1 (zero for unselected members) and
        `counts` an integer array of shape `(num_members,)` with how often
        each member was added; `counts.sum()` is the ensemble size.

    Example:

    ```python
    rng = np.random.default_rng(0)
    member_probs = rng.dirichlet(np.ones(10), size=(5, 100))
    y_val = rng.integers(0, 10, size=100)
    weights, counts = greedy_selection(member_probs, y_val, metric="nll")
    ensemble_probs = np.tensordot(weights, member_probs, axes=1)
    ```
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
    """Number `m` of most recent snapshots whose average is best on validation.

    Huang et al. 2017 (arXiv:1704.00109) report ensembles of the last `m`
    snapshots; when early snapshots are weak (for example with a small
    restart learning rate) the last few do better than all of them. This
    scores the average of the last `m` members for every `m` from 1 to
    `num_members` and keeps the best. On ties, the smaller `m` wins, since
    it is cheaper at inference time.

    Fit this on validation data only, never on the test set.

    Args:
        member_probs: Validation predictions of each member, of shape
            `(num_members, num_examples, num_classes)`, oldest snapshot
            first.
        y_val: Validation labels: integers of shape `(num_examples,)` or
            `(num_examples, 1)`, or one-hot of shape
            `(num_examples, num_classes)`.
        metric: `"nll"` (negative log-likelihood) or `"error"` (error rate,
            ties broken by NLL). Defaults to `"nll"`.

    Returns:
        A tuple `(m, weights)`: the chosen Python int `m` and a float64
        array of shape `(num_members,)` with `1 / m` on the last `m`
        members and zeros elsewhere.

    Example:

    ```python
    rng = np.random.default_rng(0)
    member_probs = rng.dirichlet(np.ones(10), size=(6, 100))
    y_val = rng.integers(0, 10, size=100)
    m, weights = best_last_m(member_probs, y_val)
    ```
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

    Attributes:
        temperature: The temperature to use: the fitted one, or `1.0` when
            validation could not identify it.
        fitted: The minimiser of validation NLL within `bounds`.
        status: `"fitted"`, or why `T = 1` was kept: `"no_errors"` (the
            validation error is 0, so the NLL falls as `T -> 0` and has no
            interior minimum), `"at_bound"` (the minimiser lies on a
            bound) or `"flat"` (the NLL improves by less than
            `min_nll_gain`, relative).
        nll: Validation NLL at `T = 1`.
        fitted_nll: Validation NLL at `fitted`.
        bounds: The `(low, high)` temperatures searched.
        min_nll_gain: The relative NLL gain below which `T = 1` is kept.
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

    Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural
    Networks") divides the logits by one scalar `T` before the softmax.
    The minimiser of validation NLL is searched in `bounds` (bounded Brent
    search over `log T`, `scipy.optimize.minimize_scalar`). A validation
    split cannot always identify `T`: when it has no errors, NLL falls
    without end as `T -> 0`, and a split with a handful of errors makes
    the optimum a statement about those few images. Such a temperature
    can make test NLL several times worse, so `T = 1` is kept, and the
    result says why, when:

    - the validation error is 0 (`status="no_errors"`);
    - the minimiser lies on a bound (`status="at_bound"`);
    - the NLL at the minimiser is less than `min_nll_gain` (relative)
      below the NLL at `T = 1` (`status="flat"`).

    Fit this on validation data only, never on the test set.

    Args:
        logits_or_probs: Validation predictions of shape
            `(num_examples, num_classes)`: probabilities, or logits if
            `from_logits=True`.
        y_val: Validation labels: integers of shape `(num_examples,)` or
            `(num_examples, 1)`, or one-hot of shape
            `(num_examples, num_classes)`.
        from_logits: Whether `logits_or_probs` holds logits. Defaults to
            `False`.
        bounds: `(low, high)` temperatures searched, `0 < low < 1 < high`.
            Defaults to `(0.05, 20.0)`.
        min_nll_gain: Smallest relative improvement of validation NLL
            over `T = 1` that counts as identified. Defaults to `0.01`.

    Returns:
        A `TemperatureFit`; its `temperature` is the one to use and its
        `message` says what happened.

    Example:

    ```python
    probs_val = np.array([[0.99, 0.01], [0.99, 0.01], [0.01, 0.99]])
    fit = calibrate_temperature(probs_val, np.array([0, 1, 1]))
    fit.temperature, fit.status  # (> 1, "fitted"): overconfident
    fit = calibrate_temperature(probs_val, np.array([0, 0, 1]))
    fit.temperature, fit.status  # (1.0, "no_errors")
    ```
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

    Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural
    Networks") divides the logits by a single scalar `T` before the
    softmax: `T > 1` softens overconfident predictions, `T < 1` sharpens
    them, and the predicted class never changes. For probabilities, such as
    the averaged output of a Snapshot Ensemble (Huang et al. 2017,
    arXiv:1704.00109), `log(probs)` serves as the logits (probabilities
    below 1e-12 are clipped first). The NLL is convex in `1 / T`, hence
    unimodal in `log T`: `scipy.optimize.minimize_scalar` (bounded Brent
    search over `log T`) finds its minimum in `[0.05, 20]`.

    When validation cannot identify `T` (no validation errors, the optimum
    on a bound, or less than 1% lower NLL than at `T = 1`), returns `1.0`:
    `calibrate_temperature` does the fit and says which case happened.

    Fit this on validation data only, never on the test set.

    Args:
        logits_or_probs: Validation predictions of shape
            `(num_examples, num_classes)`: probabilities, or logits if
            `from_logits=True`.
        y_val: Validation labels: integers of shape `(num_examples,)` or
            `(num_examples, 1)`, or one-hot of shape
            `(num_examples, num_classes)`.
        from_logits: Whether `logits_or_probs` holds logits. Defaults to
            `False`.

    Returns:
        The fitted temperature (or `1.0`), a positive Python float.

    Example:

    ```python
    probs_val = np.array([[0.99, 0.01], [0.99, 0.01], [0.01, 0.99]])
    y_val = np.array([0, 1, 1])
    temperature = fit_temperature(probs_val, y_val)  # > 1: overconfident
    calibrated = apply_temperature(probs_val, temperature)
    ```
    """
    return calibrate_temperature(
        logits_or_probs, y_val, from_logits=from_logits
    ).temperature


def apply_temperature(
    logits_or_probs: ArrayLike, temperature: float, from_logits: bool = False
) -> np.ndarray:
    """Rescales predictions by a temperature: `softmax(logits / T)`.

    The calibration step of temperature scaling (Guo et al. 2017, "On
    Calibration of Modern Neural Networks"), with `T` from
    `fit_temperature`. For probabilities, `log(probs)` serves as the logits,
    so the result is `probs ** (1 / T)` renormalised. The predicted class
    is unchanged.

    Args:
        logits_or_probs: Predictions of shape `(num_examples, num_classes)`
            or `(num_members, num_examples, num_classes)`: probabilities, or
            logits if `from_logits=True`.
        temperature: A positive float.
        from_logits: Whether `logits_or_probs` holds logits. Defaults to
            `False`.

    Returns:
        Probabilities of the same shape as `logits_or_probs`.

    Example:

    ```python
    apply_temperature(np.array([[0.8, 0.2]]), temperature=2.0)  # [[2/3, 1/3]]
    ```
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
            f"`{name}` is an endless dataset (its cardinality is INFINITE, "
            "e.g. it ends in `.repeat()`), so predicting it would never "
            "finish. Pass one finite pass over the data: drop `.repeat()` "
            f"or add `.take(num_batches)`. Received: {name}={data!r}."
        )


def _resolve_probabilities(members: list, from_logits) -> bool:
    """Whether the members' outputs are logits, as `build_ensemble` decides.

    `None` reads each member's output layer; members that disagree are
    refused (see `keras_snapshot.ensemble.combine_members`).
    """
    if from_logits is False:
        return False
    named = [
        m if isinstance(m, Member) else Member(f"snapshot_{i}", m)
        for i, m in enumerate(members, start=1)
    ]
    return resolve_from_logits(named, from_logits)


def _dataset_batches(data, name: str, with_labels: bool):
    """Yields `(x, y)` per batch of a finite dataset (`y` None if unused).

    The element structure is checked on `element_spec` before any batch
    is read.
    """
    _check_finite_dataset(data, name)
    spec = data.element_spec
    is_tuple = isinstance(spec, (tuple, list))
    if with_labels and not (is_tuple and len(spec) == 2):
        raise ValueError(
            f"`{name}` must be a dataset of `(x, y)` batches (inputs and "
            "labels). Received a dataset whose elements are "
            f"{spec!r}. Sample weights are not used for selection: drop "
            "them, e.g. `data.map(lambda x, y, w: (x, y))`."
        )
    if isinstance(spec, dict) or (is_tuple and isinstance(spec[0], dict)):
        raise ValueError(
            f"`{name}` must yield batches of one input array (the members "
            "have one input). Received a dataset whose elements are "
            f"{spec!r}."
        )
    for batch in data:
        if isinstance(batch, (tuple, list)):
            yield batch[0], (batch[1] if with_labels else None)
        else:
            yield batch, None


def _predict_batches(members: list, batches, name: str):
    """`(outputs (m, n, k), labels or None)`, from one pass over `batches`.

    Each batch is predicted by every member before the next is read, so
    the labels are those of the same pass as the predictions (even when
    the dataset reshuffles on every pass), and only one batch of inputs is
    held at a time.
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
            f"`{name}` is an empty dataset: it yielded no batch to predict. "
            "Pass a dataset with at least one batch."
        )
    stacked = np.stack([np.concatenate(out) for out in outputs])
    return stacked, (np.concatenate(labels) if labels else None)


def predict_members(
    members: list,
    x,
    batch_size: int = 256,
    from_logits: bool | None = False,
) -> np.ndarray:
    """Stacks the predictions of Keras models: shape `(m, n, k)`.

    The members of a Snapshot Ensemble (Huang et al. 2017,
    arXiv:1704.00109) are predicted on the same inputs, in order, for the
    selection functions of this module. `x` is an array, or a finite
    `tf.data.Dataset` of input batches (or of `(x, y)` batches, whose
    labels are ignored): a dataset is read once, every member predicting
    each batch in turn (`predict_on_batch`), so a dataset that reshuffles
    on every pass still gives every member the same order, and the inputs
    are never held in memory all at once.

    Args:
        members: Keras models with one input and one output.
        x: Inputs: an array, or a finite `tf.data.Dataset` of batches of
            inputs or of `(x, y)`. An endless dataset (`.repeat()`) is
            refused.
        batch_size: Batch size for arrays; a dataset keeps its own batches.
        from_logits: Whether the members output logits, which then get a
            softmax, so that the result is probabilities. `None` reads it
            from the members' output layers, as `build_ensemble` does.
            Defaults to `False`: the outputs as they are.

    Returns:
        A numpy array of shape `(num_members, num_examples, num_classes)`.

    Example:

    ```python
    member_probs = predict_members(load_snapshots("snapshots"), x_val)
    # The same from a pipeline, batch by batch:
    batches = tf.data.Dataset.from_tensor_slices(x_val).batch(256)
    member_probs = predict_members(load_snapshots("snapshots"), batches)
    ```
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
    """Member predictions and the labels they belong to, from one pass.

    What `select_snapshots` and the command line need from validation
    data to choose the members of a Snapshot Ensemble (Huang et al. 2017,
    arXiv:1704.00109): every member's predictions and the labels, in the
    same order. For a `tf.data.Dataset` of `(x, y)` batches, the labels are
    collected in the same pass as the predictions (each batch is predicted
    by every member before the next is read), so they match even when the
    dataset reshuffles on every pass, and only the predictions and labels
    (small) are kept, never all the inputs.

    Args:
        members: Keras models with one input and one output.
        data: `(x, y)` arrays, or a finite `tf.data.Dataset` of `(x, y)`
            batches. An endless dataset (`.repeat()`) is refused.
        batch_size: Batch size for arrays; a dataset keeps its own batches.
        from_logits: Whether the members output logits (a softmax is then
            applied); `None` reads it from their output layers, as
            `build_ensemble` does. Defaults to `False`.

    Returns:
        A tuple `(member_probs, labels)`: an array of shape
        `(num_members, num_examples, num_classes)` and the labels, of
        shape `(num_examples,)`, `(num_examples, 1)` or one-hot.

    Example:

    ```python
    val = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(128)
    member_probs, labels = predict_members_and_labels(members, val)
    weights = choose_members(member_probs, labels, method="greedy")
    ```
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
    """Members and weights chosen on validation data by `select_snapshots`.

    Attributes:
        snapshots: The chosen members (paths or models), oldest first;
            members with weight zero are left out.
        weights: Their normalised weights, for `build_ensemble(weights=)`.
        method: How they were chosen.
        validation_scores: `keras_snapshot.metrics.evaluate_predictions` of
            the chosen ensemble on the validation data.
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
    """Member weights chosen on validation predictions by `method`.

    The one place where a selection method becomes weights, for
    `select_snapshots` and the `keras-snapshot` command line alike:
    `"greedy"` is `greedy_selection` (Caruana et al. 2004), `"last_m"` is
    `best_last_m` (the ensembles of the last m snapshots of Huang et al.
    2017, arXiv:1704.00109) and `"all"` the uniform average.

    Fit this on validation data only, never on the test set.

    Args:
        member_probs: Validation predictions of shape
            `(num_members, num_examples, num_classes)`, oldest first.
        y_val: Validation labels, integer or one-hot.
        method: `"greedy"`, `"last_m"` or `"all"`. Defaults to `"greedy"`.
        metric: `"nll"` or `"error"`, the validation score to optimise.

    Returns:
        A float64 array of shape `(num_members,)` summing to 1, with zeros
        for the members left out (see `members_and_weights`).

    Example:

    ```python
    rng = np.random.default_rng(0)
    member_probs = rng.dirichlet(np.ones(10), size=(4, 100))
    y_val = rng.integers(0, 10, size=100)
    weights = choose_members(member_probs, y_val, method="last_m")
    ```
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
    """The members with a positive weight, and their renormalised weights.

    Example:

    ```python
    members_and_weights(["a", "b", "c"], [0.0, 0.5, 0.5])
    # (["b", "c"], array([0.5, 0.5]))
    ```
    """
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

    Averaging every snapshot of a Snapshot Ensemble (Huang et al. 2017,
    arXiv:1704.00109) can be worse than averaging the last few, since early
    snapshots may be weak. This picks members on validation data: `"greedy"`
    is forward selection with replacement (Caruana et al. 2004), `"last_m"`
    the best number of most recent snapshots, `"all"` the uniform average.

    It takes what `build_ensemble` takes: members that output logits get a
    softmax before they are scored (the ensemble averages probabilities),
    so a model with a linear output is chosen exactly as its twin with a
    softmax output. `validation_data` may be a finite `tf.data.Dataset`
    of `(x, y)` batches: it is read once, each batch predicted by every
    member, with the labels taken from the same pass (see
    `predict_members_and_labels`).

    `validation_data` is keyword-only on purpose: it must be data held out
    from training and kept apart from the test set. Selecting on the test
    set makes the reported test numbers optimistic.

    Args:
        snapshots: A snapshot directory, a list of `.keras` paths or a list
            of Keras models.
        validation_data: `(x_val, y_val)` with integer or one-hot labels,
            or a finite `tf.data.Dataset` of `(x, y)` batches (not an
            endless `.repeat()` one).
        method: `"greedy"`, `"last_m"` or `"all"`.
        metric: `"nll"` or `"error"`, the validation score to optimise.
        batch_size: Batch size for the members' predictions of arrays; a
            dataset keeps its own batches.
        from_logits: Whether members output logits; `None` reads it from
            their output layer (softmax or linear), as `build_ensemble`
            does, and refuses members that disagree.
        safe_mode, skip_invalid, custom_objects, allow_nonfinite: How the
            snapshots are loaded, the same for every loader: see
            `keras_snapshot.loading.LoadOptions`.

    Returns:
        A `SnapshotSelection` whose `snapshots` and `weights` go to
        `build_ensemble`.

    Example:

    ```python
    choice = keras_snapshot.select_snapshots(
        "snapshots", validation_data=(x_val, y_val), method="greedy"
    )
    ensemble = keras_snapshot.build_ensemble(
        choice.snapshots, weights=choice.weights
    )
    # The same from a tf.data pipeline of (x, y) batches:
    val = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(256)
    choice = keras_snapshot.select_snapshots("snapshots", validation_data=val)
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
