"""Metrics of ensemble predictions: accuracy, calibration and diversity.

Public (`__all__`): `evaluate_predictions`, `error_interval`,
`reliability_curve`, `mcnemar_test`, `diversity` and `uncertainty`; the
rest is internal. `probs` are probabilities of shape
`(num_examples, num_classes)`, `member_probs` of shape
`(num_members, num_examples, num_classes)`; labels are integers of shape
`(num_examples,)` or `(num_examples, 1)`, or one-hot. Entropies are in nats.
"""

import numpy as np
from numpy.typing import ArrayLike
from scipy import special
from scipy import stats

from keras_snapshot import _scoring
from keras_snapshot._checks import check_in_range
from keras_snapshot._checks import check_labels as _check_labels
from keras_snapshot._checks import check_non_negative_int
from keras_snapshot._checks import check_positive_int
from keras_snapshot._deprecation import module_getattr

__all__ = [
    "diversity",
    "error_interval",
    "evaluate_predictions",
    "mcnemar_test",
    "reliability_curve",
    "uncertainty",
]

# Rows of `probs` may be off by float32 rounding; anything further off is
# almost surely logits or unnormalised scores.
_ROW_SUM_ATOL = 1e-3

_SHAPE_NAMES = {
    2: "(num_examples, num_classes)",
    3: "(num_members, num_examples, num_classes)",
}


def _check_probs(probs: ArrayLike, name: str = "probs", ndim: int = 2):
    """Validates probabilities and returns them as a float64 array."""
    try:
        arr = np.asarray(probs, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"`{name}` must be an array of numbers with shape "
            f"{_SHAPE_NAMES[ndim]}. Could not convert it: {e}"
        ) from None
    if arr.ndim != ndim or 0 in arr.shape:
        raise ValueError(
            f"`{name}` must be a non-empty array of shape "
            f"{_SHAPE_NAMES[ndim]}. Received: {name}.shape={arr.shape}."
        )
    if arr.shape[-1] < 2:
        raise ValueError(
            f"`{name}` must have at least 2 classes on its last axis. "
            f"Received: {name}.shape={arr.shape}."
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(
            f"`{name}` must contain only finite values. Received "
            f"{np.size(arr) - np.count_nonzero(np.isfinite(arr))} NaN or "
            "infinite values."
        )
    row_sums = arr.sum(axis=-1)
    if arr.min() < 0 or np.any(np.abs(row_sums - 1.0) > _ROW_SUM_ATOL):
        raise ValueError(
            f"Each row of `{name}` must be a probability distribution "
            "(non-negative, summing to 1 over the last axis); apply a "
            "softmax to logits first. Received: "
            f"min value={arr.min():.4g}, row sums between "
            f"{row_sums.min():.4g} and {row_sums.max():.4g}."
        )
    return arr


def _check_member_probs(member_probs: ArrayLike, name: str = "member_probs"):
    """Validates stacked member predictions of shape (m, n, k)."""
    return _check_probs(member_probs, name=name, ndim=3)


def _check_inputs(probs: ArrayLike, y: ArrayLike):
    """Validates `probs` and `y` together; returns (probs, integer labels)."""
    probs = _check_probs(probs)
    return probs, _check_labels(y, *probs.shape)


# Kernels on validated arrays (error and NLL are `_scoring`'s).


def _brier(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean squared distance to the one-hot labels, per leading index."""
    one_hot = np.eye(probs.shape[-1])[labels]
    return np.mean(np.sum((probs - one_hot) ** 2, axis=-1), axis=-1)


def _entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy over the last axis, in nats (`0 * log(0)` is 0)."""
    return np.sum(special.entr(probs), axis=-1)


def _reliability(probs: np.ndarray, labels: np.ndarray, num_bins: int):
    """`reliability_curve` on validated arrays."""
    confidence = np.max(probs, axis=1)
    correct = (np.argmax(probs, axis=1) == labels).astype(np.float64)
    # Bin b holds confidences in (b / num_bins, (b + 1) / num_bins]; the
    # first bin also holds 0.
    inner_edges = np.linspace(0.0, 1.0, num_bins + 1)[1:-1]
    bins = np.searchsorted(inner_edges, confidence, side="left")
    count = np.bincount(bins, minlength=num_bins)
    conf_sum = np.bincount(bins, weights=confidence, minlength=num_bins)
    acc_sum = np.bincount(bins, weights=correct, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return conf_sum / count, acc_sum / count, count


def _ece(probs: np.ndarray, labels: np.ndarray, num_bins: int) -> float:
    """Expected calibration error on validated arrays."""
    conf, acc, count = _reliability(probs, labels, num_bins)
    full = count > 0
    gap = np.abs(acc[full] - conf[full])
    return float(np.sum(count[full] * gap) / probs.shape[0])


def evaluate_predictions(
    probs: ArrayLike, y: ArrayLike, num_bins: int = 15
) -> dict[str, float]:
    """Error, NLL, Brier score and ECE, in one call.

    - `error`: fraction of examples whose argmax is wrong (the first class
      wins ties), as in Huang et al. 2017;
    - `nll`: `-mean(log(probs[i, y[i]]))`, probabilities clipped at 1e-12;
    - `brier`: mean squared distance to the one-hot label, in `[0, 2]`;
    - `ece`: `sum_b (count_b / n) * |accuracy_b - confidence_b|` over
      `num_bins` equal-width confidence bins (Guo et al. 2017).

    Example:

    ```python
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    evaluate_predictions(probs, np.array([0, 1]))
    # {'error': 0.0, 'nll': 0.164..., 'brier': 0.05, 'ece': 0.15}
    ```
    """
    probs, labels = _check_inputs(probs, y)
    num_bins = check_positive_int("num_bins", num_bins)
    return {
        "error": float(_scoring.error(probs, labels)),
        "nll": float(_scoring.nll(probs, labels)),
        "brier": float(_brier(probs, labels)),
        "ece": _ece(probs, labels, num_bins),
    }


def reliability_curve(
    probs: ArrayLike, y: ArrayLike, num_bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin confidence, accuracy and count for a reliability diagram.

    Confidence is each example's largest probability; bin `b` holds
    confidences in `(b / num_bins, (b + 1) / num_bins]` (Guo et al. 2017).
    An empty bin has NaN confidence and accuracy.

    Example:

    ```python
    probs = np.array([[0.95, 0.05], [0.6, 0.4], [0.3, 0.7]])
    confidence, accuracy, count = reliability_curve(
        probs, np.array([0, 1, 1]), num_bins=5
    )
    # count == [0, 0, 1, 1, 1]; accuracy == [nan, nan, 0, 1, 1]
    ```
    """
    probs, labels = _check_inputs(probs, y)
    return _reliability(probs, labels, check_positive_int("num_bins", num_bins))


def diversity(member_probs: ArrayLike) -> dict[str, np.ndarray]:
    """How different the members are, pair by pair.

    - `disagreement[i, j]`: fraction of examples whose argmax differs
      between members `i` and `j`;
    - `correlation[i, j]`: Pearson correlation of the two members' flattened
      softmax outputs, as in Section 4.3 of Huang et al. 2017 (NaN for a
      member whose outputs are constant).

    Example:

    ```python
    member_probs = np.array([
        [[0.9, 0.1], [0.8, 0.2]],
        [[0.9, 0.1], [0.3, 0.7]],
    ])
    diversity(member_probs)["disagreement"]  # [[0, 0.5], [0.5, 0]]
    ```
    """
    member_probs = _check_member_probs(member_probs)
    preds = np.argmax(member_probs, axis=-1)
    disagreement = np.stack([np.mean(p != preds, axis=1) for p in preds])
    flat = member_probs.reshape(member_probs.shape[0], -1)
    centered = flat - flat.mean(axis=1, keepdims=True)
    norms = np.sqrt(np.sum(centered**2, axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = (centered @ centered.T) / np.outer(norms, norms)
    correlation = np.clip(correlation, -1.0, 1.0)
    np.fill_diagonal(correlation, np.where(norms > 0, 1.0, np.nan))
    return {"disagreement": disagreement, "correlation": correlation}


def uncertainty(member_probs: ArrayLike) -> dict[str, np.ndarray]:
    """Per-example uncertainty of the members' average, in nats.

    - `entropy`: entropy of the average prediction (total uncertainty);
    - `mutual_information`: that entropy minus the members' mean entropy
      (BALD, Houlsby et al. 2011): the part due to the members' diversity,
      never below 0.

    Example:

    ```python
    member_probs = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    uncertainty(member_probs)  # entropy [log 2], mutual_information [log 2]
    ```
    """
    member_probs = _check_member_probs(member_probs)
    entropy = _entropy(member_probs.mean(axis=0))
    mean_entropy = np.mean(_entropy(member_probs), axis=0)
    return {
        "entropy": entropy,
        "mutual_information": np.maximum(entropy - mean_entropy, 0.0),
    }


def mcnemar_test(probs_a: ArrayLike, probs_b: ArrayLike, y: ArrayLike) -> dict:
    """Exact McNemar test: do two models' errors differ beyond chance?

    Only the examples exactly one model gets right count: under the null
    hypothesis, `a_only` is Binomial(`a_only + b_only`, 1/2), and the
    p-value is the two-sided binomial test's (1 without such examples).

    Args:
        probs_a: Predictions of model A, shape `(num_examples, num_classes)`.
        probs_b: Predictions of model B on the same examples, same shape.
        y: Labels, integer or one-hot.

    Returns:
        A dict with `"a_only"` and `"b_only"` (Python ints: examples that
        only A, or only B, classifies correctly) and `"p_value"` (a Python
        float in `[0, 1]`).

    Example:

    ```python
    y = np.array([0, 0, 1, 1])
    a = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    b = np.array([[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.6, 0.4]])
    mcnemar_test(a, b, y)  # {'a_only': 2, 'b_only': 0, 'p_value': 0.5}
    ```
    """
    probs_a, labels = _check_inputs(probs_a, y)
    probs_b = _check_probs(probs_b, name="probs_b")
    if probs_b.shape != probs_a.shape:
        raise ValueError(
            "`probs_a` and `probs_b` must be predictions on the same "
            f"examples, of the same shape. Received: probs_a.shape="
            f"{probs_a.shape}, probs_b.shape={probs_b.shape}."
        )
    right_a = np.argmax(probs_a, axis=1) == labels
    right_b = np.argmax(probs_b, axis=1) == labels
    a_only = int(np.sum(right_a & ~right_b))
    b_only = int(np.sum(right_b & ~right_a))
    p_value = 1.0
    if a_only + b_only:
        p_value = float(stats.binomtest(a_only, a_only + b_only, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p_value": min(p_value, 1.0)}


def error_interval(
    num_errors: int, num_examples: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Exact (Clopper-Pearson) confidence interval of an error rate.

    The interval says how far apart two errors on this test set must be
    before it can tell them apart.

    Example:

    ```python
    error_interval(5, 1000)  # (0.0016..., 0.0116...)
    ```
    """
    num_examples = check_positive_int("num_examples", num_examples)
    num_errors = check_non_negative_int("num_errors", num_errors)
    if num_errors > num_examples:
        raise ValueError(
            "`num_errors` must be at most `num_examples`. Received: "
            f"num_errors={num_errors!r}, num_examples={num_examples!r}."
        )
    confidence = check_in_range(
        "confidence", confidence, 0.0, 1.0, "e.g. 0.95.", include_low=False
    )
    ci = stats.binomtest(num_errors, num_examples).proportion_ci(
        confidence, method="exact"
    )
    return float(ci.low), float(ci.high)


# Names of 0.5, for one more release.
def _error_rate(probs, y):
    return evaluate_predictions(probs, y)["error"]


def _negative_log_likelihood(probs, y, eps=_scoring.EPS):
    probs, labels = _check_inputs(probs, y)
    eps = check_in_range("eps", eps, 0.0, 1.0, "e.g. 1e-12.", include_low=False)
    return float(_scoring.nll(probs, labels, eps))


def _brier_score(probs, y):
    return evaluate_predictions(probs, y)["brier"]


def _expected_calibration_error(probs, y, num_bins=15):
    return evaluate_predictions(probs, y, num_bins)["ece"]


def _predictive_entropy(probs):
    return _entropy(_check_probs(probs))


_OLD = "keras_snapshot.metrics."
OLD_NAMES = {
    "error_rate": (
        _OLD + "evaluate_predictions(probs, y)['error']",
        _error_rate,
    ),
    "negative_log_likelihood": (
        _OLD + "evaluate_predictions(probs, y)['nll']",
        _negative_log_likelihood,
    ),
    "brier_score": (
        _OLD + "evaluate_predictions(probs, y)['brier']",
        _brier_score,
    ),
    "expected_calibration_error": (
        _OLD + "evaluate_predictions(probs, y)['ece']",
        _expected_calibration_error,
    ),
    "pairwise_disagreement": (
        _OLD + "diversity(member_probs)['disagreement']",
        lambda member_probs: diversity(member_probs)["disagreement"],
    ),
    "prediction_correlation": (
        _OLD + "diversity(member_probs)['correlation']",
        lambda member_probs: diversity(member_probs)["correlation"],
    ),
    "predictive_entropy": (
        _OLD + "uncertainty(member_probs)['entropy']",
        _predictive_entropy,
    ),
    "mutual_information": (
        _OLD + "uncertainty(member_probs)['mutual_information']",
        lambda member_probs: uncertainty(member_probs)["mutual_information"],
    ),
}
__getattr__ = module_getattr(__name__, OLD_NAMES)
