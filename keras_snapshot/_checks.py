"""Argument checks shared by the modules, with errors in one wording:
"`name` must be ... Received: name=value."
"""

import math
import numbers

import numpy as np


def check_positive_int(name: str, value, hint: str = "") -> int:
    """Returns `value` as an int >= 1, or raises a ValueError naming it.

    `hint` is appended to the message (e.g. what the value means).

    Example:

    ```python
    check_positive_int("epochs", 3)  # 3
    check_positive_int("epochs", 0)  # ValueError: `epochs` must be ...
    ```
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"`{name}` must be a positive integer.{_space(hint)} "
            f"Received: {name}={value!r} (type {type(value).__name__})."
        )
    if value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer.{_space(hint)} "
            f"Received: {name}={value}."
        )
    return int(value)


def check_positive_number(name: str, value, hint: str = "") -> float:
    """Returns `value` as a finite float > 0, or raises a ValueError.

    `hint` is appended to the message (e.g. how to get a good value).

    Example:

    ```python
    check_positive_number("temperature", 1.5)  # 1.5
    ```
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"`{name}` must be a finite positive number.{_space(hint)} "
            f"Received: {name}={value!r} (type {type(value).__name__})."
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"`{name}` must be a finite positive number.{_space(hint)} "
            f"Received: {name}={value}."
        )
    return float(value)


def check_in_range(
    name: str,
    value,
    low: float,
    high: float,
    hint: str = "",
    *,
    include_low: bool = True,
    include_high: bool = False,
) -> float:
    """Returns `value` as a float in `[low, high)`, or raises a ValueError.

    `include_low` and `include_high` say whether each bound is accepted
    (`[low, high)` by default); `hint` is appended to the message.

    Example:

    ```python
    check_in_range("momentum", 0.9, 0.0, 1.0)  # 0.9
    check_in_range("alpha", 1.0, 0.0, 1.0, include_high=True)  # 1.0
    ```
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or not (low <= value if include_low else low < value)
        or not (value <= high if include_high else value < high)
    ):
        interval = (
            f"{'[' if include_low else '('}{low}, {high}"
            f"{']' if include_high else ')'}"
        )
        raise ValueError(
            f"`{name}` must be a number in {interval}.{_space(hint)} "
            f"Received: {name}={value!r}."
        )
    return float(value)


def check_non_negative_int(name: str, value, hint: str = "") -> int:
    """Returns `value` as an int >= 0, or raises a ValueError naming it.

    Example:

    ```python
    check_non_negative_int("start_step", 0)  # 0
    ```
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < 0
    ):
        raise ValueError(
            f"`{name}` must be a non-negative integer.{_space(hint)} "
            f"Received: {name}={value!r}."
        )
    return int(value)


def check_accumulation_steps(value) -> int | None:
    """`gradient_accumulation_steps` as Keras takes it: None or an int >= 2.

    Example:

    ```python
    check_accumulation_steps(None)  # None
    check_accumulation_steps(4)  # 4
    ```
    """
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < 2
    ):
        raise ValueError(
            "`gradient_accumulation_steps` must be None or an integer >= 2, "
            "the optimizer's value. "
            f"Received: gradient_accumulation_steps={value!r}."
        )
    return int(value)


def _space(hint: str) -> str:
    return f" {hint}" if hint else ""


# tf.data's cardinality constants, without importing TensorFlow here.
_INFINITE_CARDINALITY = -1  # tf.data.INFINITE_CARDINALITY
_UNKNOWN_CARDINALITY = -2  # tf.data.UNKNOWN_CARDINALITY


def is_dataset(data) -> bool:
    """Whether `data` is a `tf.data.Dataset` (duck-typed: no TF import)."""
    return callable(getattr(data, "cardinality", None)) and hasattr(
        data, "element_spec"
    )


def is_endless(data) -> bool:
    """Whether `data` is a dataset that repeats forever (`.repeat()`)."""
    cardinality = getattr(data, "cardinality", None)
    return callable(cardinality) and (
        int(cardinality()) == _INFINITE_CARDINALITY
    )


def count_batches(dataset) -> int:
    """The number of batches in one pass over a finite `tf.data.Dataset`.

    A schedule must know its budget in steps before training starts. A
    known cardinality is returned without reading data; an unknown one
    (after `.filter()`, `from_generator`) is counted in one pass over the
    dataset, so a slow pipeline is better given as an int. An endless
    dataset (`.repeat()`) is refused.

    Args:
        dataset: A finite `tf.data.Dataset` whose elements are batches.

    Returns:
        The number of batches, a Python int (0 for an empty dataset).

    Example:

    ```python
    batches = tf.data.Dataset.range(100).filter(lambda i: i % 2 == 0)
    count_batches(batches.batch(8))  # 50 examples -> 7 batches (one pass)
    count_batches(tf.data.Dataset.range(100).batch(8))  # 13, no pass
    ```
    """
    cardinality = getattr(dataset, "cardinality", None)
    if not callable(cardinality) or not hasattr(dataset, "reduce"):
        raise TypeError(
            "`count_batches` needs a `tf.data.Dataset`; pass the number of "
            "steps as an int instead. Received: an object of type "
            f"{type(dataset).__name__}."
        )
    if is_endless(dataset):
        raise ValueError(
            "The dataset is endless (cardinality INFINITE, e.g. `.repeat()`),"
            " so it has no steps per epoch: pass `steps_per_epoch=` an int, "
            "the value of `model.fit(steps_per_epoch=...)`. "
            f"Received: {dataset!r}."
        )
    value = int(cardinality())
    if value != _UNKNOWN_CARDINALITY:
        return value
    # A numpy int64 initial state, so this module never imports TF.
    return int(dataset.reduce(np.int64(0), lambda count, _: count + 1))


def resolve_steps_per_epoch(steps_per_epoch) -> int:
    """`steps_per_epoch` as a positive int: an int, or a dataset's batches."""
    if callable(getattr(steps_per_epoch, "cardinality", None)):
        count = count_batches(steps_per_epoch)
        if count < 1:
            raise ValueError(
                "`steps_per_epoch` is a dataset with no batches; pass one with "
                "at least one batch or a positive int. "
                f"Received: {steps_per_epoch!r}."
            )
        return count
    return check_positive_int(
        "steps_per_epoch",
        steps_per_epoch,
        "Pass the number of batches per epoch, or the finite "
        "`tf.data.Dataset` of batches you pass to `model.fit`.",
    )


def check_labels(y, num_examples: int, num_classes: int, name: str = "y"):
    """Validates labels against (n, k) and returns integer labels (n,)."""
    arr = np.asarray(y)
    expected = (
        f"`{name}` must hold integer labels of shape ({num_examples},) or "
        f"({num_examples}, 1), or one-hot labels of shape "
        f"({num_examples}, {num_classes}), to match the predictions' shape "
        f"({num_examples}, {num_classes})."
    )
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{expected} Received: {name}.dtype={arr.dtype}.")
    if arr.shape == (num_examples, num_classes):
        if not (
            np.all((arr == 0) | (arr == 1)) and np.all(arr.sum(axis=1) == 1)
        ):
            raise ValueError(
                f"{expected} Received: {name}.shape={arr.shape} with rows "
                "that are not one-hot."
            )
        return np.argmax(arr, axis=1)
    if arr.shape == (num_examples, 1):
        arr = arr[:, 0]
    if arr.shape != (num_examples,):
        raise ValueError(f"{expected} Received: {name}.shape={arr.shape}.")
    if arr.dtype.kind == "f" and not np.all(arr == np.round(arr)):
        raise ValueError(
            f"{expected} Received non-integer values in `{name}`, e.g. "
            f"{arr[arr != np.round(arr)][0]!r}."
        )
    if arr.min() < 0 or arr.max() >= num_classes:
        raise ValueError(
            f"Labels in `{name}` must be between 0 and {num_classes - 1} "
            f"(num_classes={num_classes}). Received: min={arr.min()}, "
            f"max={arr.max()}."
        )
    return arr.astype(np.int64)
