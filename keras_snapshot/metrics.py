"""Metrics for ensemble predictions: accuracy, calibration and diversity.

Snapshot Ensembles (Huang et al. 2017, arXiv:1704.00109) average the softmax
outputs of the snapshots taken at the end of each cosine cycle. The functions
here score such averaged probabilities (error, negative log-likelihood, Brier
score, expected calibration error), measure how different the snapshots are
(pairwise disagreement and the correlation of softmax outputs that Section 4.3
of the paper uses), and give per-example uncertainty (predictive entropy and
mutual information); two more say whether two models' test errors differ beyond
chance (`mcnemar_test`, `error_interval`, with `scipy.stats`).

Everything is plain numpy (and scipy for the two tests). Predictions are
probabilities, not logits: `probs` has shape `(num_examples, num_classes)`
and each row sums to 1; `member_probs` stacks the predictions of several
members (snapshots) into shape `(num_members, num_examples, num_classes)`.
Labels `y` are integer class indices of shape `(num_examples,)` (or
`(num_examples, 1)`, as returned by `keras.datasets.cifar10.load_data()`),
or one-hot of shape `(num_examples, num_classes)`. Entropies use the
natural logarithm (nats).
"""

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from keras_snapshot._checks import check_in_range
from keras_snapshot._checks import check_labels as _check_labels
from keras_snapshot._checks import check_non_negative_int
from keras_snapshot._checks import check_positive_int

# Default floor on probabilities inside logarithms (NLL, log-probs).
_EPS = 1e-12
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
            "(non-negative, summing to 1 over the last axis). Received: "
            f"min value={arr.min():.4g}, row sums between "
            f"{row_sums.min():.4g} and {row_sums.max():.4g}. If these are "
            "logits, apply a softmax first."
        )
    return arr


def _check_member_probs(member_probs: ArrayLike, name: str = "member_probs"):
    """Validates stacked member predictions of shape (m, n, k)."""
    return _check_probs(member_probs, name=name, ndim=3)


def _check_inputs(probs: ArrayLike, y: ArrayLike):
    """Validates `probs` and `y` together; returns (probs, integer labels)."""
    probs = _check_probs(probs)
    return probs, _check_labels(y, *probs.shape)


def _check_eps(eps: float) -> float:
    return check_in_range(
        "eps", eps, 0.0, 1.0, "A small floor, e.g. 1e-12.", include_low=False
    )


# Kernels on validated arrays. They accept any leading batch axes, so
# `probs` may be (n, k) or (c, n, k) with `labels` of shape (n,); selection
# uses this to score many candidate ensembles at once.


def _error(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.mean(np.argmax(probs, axis=-1) != labels, axis=-1)


def _nll(probs: np.ndarray, labels: np.ndarray, eps: float) -> np.ndarray:
    true_class = probs[..., np.arange(labels.shape[0]), labels]
    return -np.mean(np.log(np.clip(true_class, eps, None)), axis=-1)


def _brier(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    one_hot = np.eye(probs.shape[-1])[labels]
    return np.mean(np.sum((probs - one_hot) ** 2, axis=-1), axis=-1)


def _entropy(probs: np.ndarray) -> np.ndarray:
    # 0 * log(0) is taken as 0.
    # `0.0 - x` rather than `-x`, so that zero entropy is +0.0, not -0.0.
    return 0.0 - np.sum(
        probs * np.log(np.where(probs > 0, probs, 1.0)), axis=-1
    )


def _reliability(probs: np.ndarray, labels: np.ndarray, num_bins: int):
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
    conf, acc, count = _reliability(probs, labels, num_bins)
    full = count > 0
    gap = np.abs(acc[full] - conf[full])
    return float(np.sum(count[full] * gap) / probs.shape[0])


def error_rate(probs: ArrayLike, y: ArrayLike) -> float:
    """Fraction of examples whose most probable class is wrong.

    The predicted class is the argmax of each row of `probs` (the first
    class on ties). This is the test error that Huang et al. 2017
    (arXiv:1704.00109) report for Snapshot Ensembles, as a fraction.

    Args:
        probs: Predicted probabilities of shape `(num_examples, num_classes)`.
        y: Integer labels of shape `(num_examples,)` or `(num_examples, 1)`,
            or one-hot labels of shape `(num_examples, num_classes)`.

    Returns:
        A Python float in `[0, 1]`.

    Example:

    ```python
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2]])
    error_rate(probs, np.array([0, 1, 1]))  # 1 / 3
    ```
    """
    probs, labels = _check_inputs(probs, y)
    return float(_error(probs, labels))


def negative_log_likelihood(
    probs: ArrayLike, y: ArrayLike, eps: float = 1e-12
) -> float:
    """Mean negative log-likelihood of the true class.

    Computes `-mean(log(probs[i, y[i]]))`, the cross-entropy of the
    predictions. Probabilities are clipped below at `eps` so that a
    confidently wrong prediction gives a large finite loss rather than
    infinity. Uniform predictions over `k` classes give `log(k)`.

    Args:
        probs: Predicted probabilities of shape `(num_examples, num_classes)`.
        y: Integer labels of shape `(num_examples,)` or `(num_examples, 1)`,
            or one-hot labels of shape `(num_examples, num_classes)`.
        eps: Smallest probability used inside the logarithm. Defaults to
            `1e-12`.

    Returns:
        A non-negative Python float, in nats.

    Example:

    ```python
    probs = np.full((4, 10), 0.1)
    negative_log_likelihood(probs, np.arange(4))  # log(10) = 2.3026
    ```
    """
    probs, labels = _check_inputs(probs, y)
    return float(_nll(probs, labels, _check_eps(eps)))


def brier_score(probs: ArrayLike, y: ArrayLike) -> float:
    """Mean Brier score: squared distance to the one-hot label.

    For each example, sums `(probs[i, c] - onehot(y)[i, c]) ** 2` over the
    classes `c`, then averages over examples. It ranges from 0 (confident
    and correct) to 2 (confident and wrong) and, unlike the error rate,
    rewards well-calibrated probabilities.

    Args:
        probs: Predicted probabilities of shape `(num_examples, num_classes)`.
        y: Integer labels of shape `(num_examples,)` or `(num_examples, 1)`,
            or one-hot labels of shape `(num_examples, num_classes)`.

    Returns:
        A Python float in `[0, 2]`.

    Example:

    ```python
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    brier_score(probs, np.array([0, 0]))  # (0 + 0.5) / 2 = 0.25
    ```
    """
    probs, labels = _check_inputs(probs, y)
    return float(_brier(probs, labels))


def reliability_curve(
    probs: ArrayLike, y: ArrayLike, num_bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin confidence, accuracy and count for a reliability diagram.

    Each example's confidence is its largest predicted probability. The
    interval `[0, 1]` is cut into `num_bins` bins of equal width, bin `b`
    holding confidences in `(b / num_bins, (b + 1) / num_bins]`, as in
    Guo et al. 2017, "On Calibration of Modern Neural Networks". A
    calibrated model has accuracy equal to confidence in every bin. The bin
    edges are `np.linspace(0, 1, num_bins + 1)`.

    Args:
        probs: Predicted probabilities of shape `(num_examples, num_classes)`.
        y: Integer labels of shape `(num_examples,)` or `(num_examples, 1)`,
            or one-hot labels of shape `(num_examples, num_classes)`.
        num_bins: Number of equal-width confidence bins. Defaults to `15`.

    Returns:
        A tuple `(confidence, accuracy, count)` of arrays of shape
        `(num_bins,)`: the mean confidence and the accuracy of the examples
        in each bin (NaN for an empty bin), and the number of examples in
        each bin (integers).

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


def expected_calibration_error(
    probs: ArrayLike, y: ArrayLike, num_bins: int = 15
) -> float:
    """Expected calibration error (ECE) over equal-width confidence bins.

    Computes `sum_b (count_b / n) * |accuracy_b - confidence_b|` over the
    non-empty bins of `reliability_curve`, the standard estimate of
    Guo et al. 2017, "On Calibration of Modern Neural Networks" (15 bins by
    default). Ensembles such as Snapshot Ensembles (Huang et al. 2017,
    arXiv:1704.00109) are usually better calibrated than a single snapshot.

    Args:
        probs: Predicted probabilities of shape `(num_examples, num_classes)`.
        y: Integer labels of shape `(num_examples,)` or `(num_examples, 1)`,
            or one-hot labels of shape `(num_examples, num_classes)`.
        num_bins: Number of equal-width confidence bins. Defaults to `15`.

    Returns:
        A Python float in `[0, 1]`.

    Example:

    ```python
    probs = np.array([[0.9, 0.1], [0.9, 0.1]])
    expected_calibration_error(probs, np.array([0, 1]))  # |0.5 - 0.9| = 0.4
    ```
    """
    probs, labels = _check_inputs(probs, y)
    return _ece(probs, labels, check_positive_int("num_bins", num_bins))


def evaluate_predictions(
    probs: ArrayLike, y: ArrayLike, num_bins: int = 15
) -> dict[str, float]:
    """Error, NLL, Brier score and ECE of predictions in one call.

    Validates the inputs once and computes `error_rate`,
    `negative_log_likelihood`, `brier_score` and
    `expected_calibration_error`.

    Args:
        probs: Predicted probabilities of shape `(num_examples, num_classes)`.
        y: Integer labels of shape `(num_examples,)` or `(num_examples, 1)`,
            or one-hot labels of shape `(num_examples, num_classes)`.
        num_bins: Number of confidence bins for the ECE. Defaults to `15`.

    Returns:
        A dict with the Python float entries `"error"`, `"nll"`, `"brier"`
        and `"ece"`.

    Example:

    ```python
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    evaluate_predictions(probs, np.array([0, 1]))
    # {'error': 0.0, 'nll': 0.164..., 'brier': 0.05, 'ece': 0.15}
    ```
    """
    probs, labels = _check_inputs(probs, y)
    return {
        "error": float(_error(probs, labels)),
        "nll": float(_nll(probs, labels, _EPS)),
        "brier": float(_brier(probs, labels)),
        "ece": _ece(probs, labels, check_positive_int("num_bins", num_bins)),
    }


def pairwise_disagreement(member_probs: ArrayLike) -> np.ndarray:
    """Fraction of examples on which each pair of members disagrees.

    Entry `(i, j)` is the fraction of examples whose predicted class
    (argmax) differs between member `i` and member `j`. Snapshot Ensembles
    (Huang et al. 2017, arXiv:1704.00109) help only when snapshots disagree;
    a larger restart learning rate gives more diverse snapshots.

    Args:
        member_probs: Predicted probabilities of each member, of shape
            `(num_members, num_examples, num_classes)`.

    Returns:
        A symmetric array of shape `(num_members, num_members)` with values
        in `[0, 1]` and zeros on the diagonal.

    Example:

    ```python
    member_probs = np.array([
        [[0.9, 0.1], [0.8, 0.2]],
        [[0.9, 0.1], [0.3, 0.7]],
    ])
    pairwise_disagreement(member_probs)  # [[0, 0.5], [0.5, 0]]
    ```
    """
    member_probs = _check_member_probs(member_probs)
    preds = np.argmax(member_probs, axis=-1)
    return np.stack([np.mean(p != preds, axis=1) for p in preds])


def prediction_correlation(member_probs: ArrayLike) -> np.ndarray:
    """Pearson correlation between the softmax outputs of each pair.

    Each member's probabilities are flattened into one vector of length
    `num_examples * num_classes` and entry `(i, j)` is the Pearson
    correlation between the vectors of members `i` and `j`. Section 4.3 of
    Huang et al. 2017 (arXiv:1704.00109) uses this correlation of softmax
    outputs to show that snapshots from different cycles are diverse.

    Args:
        member_probs: Predicted probabilities of each member, of shape
            `(num_members, num_examples, num_classes)`.

    Returns:
        A symmetric array of shape `(num_members, num_members)` with values
        in `[-1, 1]` and ones on the diagonal. A member whose probabilities
        are all equal has no defined correlation: its row and column are
        NaN.

    Example:

    ```python
    member_probs = np.array([
        [[0.9, 0.1], [0.2, 0.8]],
        [[0.8, 0.2], [0.3, 0.7]],
    ])
    prediction_correlation(member_probs)  # [[1, 0.998], [0.998, 1]]
    ```
    """
    member_probs = _check_member_probs(member_probs)
    flat = member_probs.reshape(member_probs.shape[0], -1)
    centered = flat - flat.mean(axis=1, keepdims=True)
    norms = np.sqrt(np.sum(centered**2, axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (centered @ centered.T) / np.outer(norms, norms)
    corr = np.clip(corr, -1.0, 1.0)
    np.fill_diagonal(corr, np.where(norms > 0, 1.0, np.nan))
    return corr


def predictive_entropy(probs: ArrayLike) -> np.ndarray:
    """Entropy of each example's predictive distribution, in nats.

    Computes `-sum_c probs[i, c] * log(probs[i, c])` (with `0 * log 0 = 0`).
    It is 0 for a one-hot prediction and `log(num_classes)` for a uniform
    one. Applied to the ensemble average, it measures the total uncertainty.

    Args:
        probs: Predicted probabilities of shape `(num_examples, num_classes)`.

    Returns:
        An array of shape `(num_examples,)`.

    Example:

    ```python
    predictive_entropy(np.array([[1.0, 0.0], [0.5, 0.5]]))  # [0, log(2)]
    ```
    """
    return _entropy(_check_probs(probs))


def mutual_information(member_probs: ArrayLike) -> np.ndarray:
    """Mutual information between prediction and member, per example (BALD).

    Computes the entropy of the members' average prediction minus the
    average of the members' entropies (Houlsby et al. 2011, "Bayesian
    Active Learning by Disagreement"). It is 0 when all members predict the
    same distribution and grows as they disagree, so it isolates the part
    of the uncertainty that comes from the ensemble's diversity. Tiny
    negative values from floating-point rounding are returned as 0.

    Args:
        member_probs: Predicted probabilities of each member, of shape
            `(num_members, num_examples, num_classes)`.

    Returns:
        A non-negative array of shape `(num_examples,)`, in nats.

    Example:

    ```python
    member_probs = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    mutual_information(member_probs)  # [log(2)]
    ```
    """
    member_probs = _check_member_probs(member_probs)
    mean_entropy = np.mean(_entropy(member_probs), axis=0)
    return np.maximum(_entropy(member_probs.mean(axis=0)) - mean_entropy, 0.0)


def mcnemar_test(probs_a: ArrayLike, probs_b: ArrayLike, y: ArrayLike) -> dict:
    """Exact McNemar test: do two models' errors differ beyond chance?

    Two models scored on the same test images are paired: only the images
    that exactly one of them gets right (the discordant pairs) carry
    information about which is better. Under the null hypothesis that both
    have the same error rate, each discordant image is equally likely to
    favour either model, so the count `a_only` of images that only model A
    gets right is Binomial(`a_only + b_only`, 1/2). The two-sided p-value
    is `scipy.stats.binomtest(a_only, a_only + b_only, 0.5).pvalue`, and 1
    when there are no discordant pairs (McNemar 1947; Dietterich 1998,
    "Approximate Statistical Tests for Comparing Supervised Classification
    Learning Algorithms"). Use it to say whether a Snapshot Ensemble
    (Huang et al. 2017, arXiv:1704.00109) beats a single model on a test
    set, rather than reading a difference of a few images as a gain.

    Args:
        probs_a: Predictions of model A, shape `(num_examples, num_classes)`.
        probs_b: Predictions of model B on the same examples, same shape.
        y: Integer labels of shape `(num_examples,)` or `(num_examples, 1)`,
            or one-hot labels of shape `(num_examples, num_classes)`.

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

    A test error measured on `num_examples` images is a binomial
    proportion: `num_errors / num_examples` with a resolution of one image
    (`1 / num_examples`). The interval is
    `scipy.stats.binomtest(num_errors, num_examples).proportion_ci(
    confidence, method="exact")`, which shows how far apart two errors
    must be before the test set can tell them apart.

    Args:
        num_errors: Number of misclassified examples, `0 <= num_errors <=
            num_examples`.
        num_examples: Number of test examples, a positive integer.
        confidence: Confidence level in `(0, 1)`. Defaults to `0.95`.

    Returns:
        A tuple `(low, high)` of Python floats in `[0, 1]`.

    Example:

    ```python
    error_interval(5, 1000)  # (0.0016..., 0.0116...)
    ```
    """
    num_examples = check_positive_int("num_examples", num_examples)
    between = f"between 0 and `num_examples` ({num_examples})"
    num_errors = check_non_negative_int(
        "num_errors", num_errors, f"It must be {between}."
    )
    if num_errors > num_examples:
        raise ValueError(
            f"`num_errors` must be an integer {between}. Received: "
            f"num_errors={num_errors!r}."
        )
    confidence = check_in_range(
        "confidence", confidence, 0.0, 1.0, "e.g. 0.95.", include_low=False
    )
    ci = stats.binomtest(num_errors, num_examples).proportion_ci(
        confidence, method="exact"
    )
    return float(ci.low), float(ci.high)
