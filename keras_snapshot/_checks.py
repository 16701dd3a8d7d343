"""Argument checks shared by the modules, with errors in one wording."""

import numbers


def check_positive_int(name: str, value) -> int:
    """Returns `value` as an int >= 1, or raises a ValueError naming it."""
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
