"""The one scoring helper: error and NLL of probabilities or logits.

Selection, weight soups and distillation rank candidates with `score`;
`keras_snapshot.metrics` reports the same numbers. Inputs are validated
arrays: `outputs` of shape `(..., num_examples, num_classes)` (any leading
axes, so many candidate ensembles are scored at once) and integer `labels`
of shape `(num_examples,)`. Lower is better for both metrics.
"""

import numpy as np
from scipy import special

# Floor on probabilities inside logarithms.
EPS = 1e-12
METRICS = ("nll", "error")


def probabilities(outputs, from_logits: bool) -> np.ndarray:
    """`outputs` as float64 probabilities (a softmax for logits)."""
    outputs = np.asarray(outputs, dtype=np.float64)
    return special.softmax(outputs, axis=-1) if from_logits else outputs


def error(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.mean(np.argmax(probs, axis=-1) != labels, axis=-1)


def nll(probs: np.ndarray, labels: np.ndarray, eps: float = EPS):
    true_class = probs[..., np.arange(labels.shape[0]), labels]
    return -np.mean(np.log(np.clip(true_class, eps, None)), axis=-1)


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(
            f"`metric` must be one of {METRICS}. Received: metric={metric!r}."
        )
    return metric


def score(outputs, labels, metric: str, from_logits: bool = False):
    """Error or NLL of `outputs` (lower is better), per leading index.

    Example:

    ```python
    score(np.array([[0.9, 0.1], [0.4, 0.6]]), np.array([0, 0]), "error")
    # 0.5
    ```
    """
    probs = probabilities(outputs, from_logits)
    if check_metric(metric) == "nll":
        return nll(probs, labels)
    return error(probs, labels)


def score_keys(probs: np.ndarray, labels: np.ndarray, metric: str):
    """Sort keys of shape (..., num_keys); lexicographically smaller wins.

    "nll" ranks by NLL alone; "error" by error, ties broken by NLL.
    """
    by_nll = nll(probs, labels)[..., None]
    if check_metric(metric) == "nll":
        return by_nll
    return np.concatenate([error(probs, labels)[..., None], by_nll], axis=-1)
