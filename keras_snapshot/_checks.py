"""Argument checks shared by the modules, with errors in one wording.

Every public function and class checks its arguments through these, so that
a bad value is refused in the same words everywhere:
"`name` must be ... Received: name=value."
"""

import math
import numbers


def check_positive_int(name: str, value) -> int:
    """Returns `value` as an int >= 1, or raises a ValueError naming it.

    Example:

    ```python
    check_positive_int("epochs", 3)  # 3
    check_positive_int("epochs", 0)  # ValueError: `epochs` must be ...
    ```
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"`{name}` must be a positive integer. "
            f"Received: {name}={value!r} (type {type(value).__name__})."
        )
    if value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value}."
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


def check_in_range(name: str, value, low: float, high: float) -> float:
    """Returns `value` as a float in `[low, high)`, or raises a ValueError.

    Example:

    ```python
    check_in_range("momentum", 0.9, 0.0, 1.0)  # 0.9
    ```
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or not low <= value < high
    ):
        raise ValueError(
            f"`{name}` must be a number in [{low}, {high}). "
            f"Received: {name}={value!r}."
        )
    return float(value)


def _space(hint: str) -> str:
    return f" {hint}" if hint else ""
