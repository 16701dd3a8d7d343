"""Argument checks shared by the modules, with errors in one wording.

Every public function and class checks its arguments through these, so that
a bad value is refused in the same words everywhere:
"`name` must be ... Received: name=value."
"""

import math
import numbers


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
