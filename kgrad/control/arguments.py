"""Argument checks shared by the training-control callbacks."""

from __future__ import annotations

import math
from typing import Any


def _rule(
    greater_than: float | None, at_least: float | None, at_most: float | None
) -> str:
    if greater_than is not None and at_most is not None:
        return f"in ({greater_than:g}, {at_most:g}]"
    if greater_than is not None:
        return f"> {greater_than:g}"
    if at_least is not None:
        return f"≥ {at_least:g}"
    return "(finite)"


def check_number(
    value: Any,
    argument: str,
    *,
    greater_than: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    allow_none: bool = False,
    label: str | None = None,
) -> float | None:
    """Returns `value` as a float if it is a finite number within the bounds.

    Args:
        value: What the caller received.
        argument: The argument's name, echoed with the value.
        greater_than: An exclusive lower bound. Defaults to `None`.
        at_least: An inclusive lower bound. Defaults to `None`.
        at_most: An inclusive upper bound. Defaults to `None`.
        allow_none: Accept (and return) `None`. Defaults to `False`.
        label: How the message names the argument. Defaults to `None`, its name.

    Returns:
        The float, or `None` when allowed.

    Raises:
        ValueError: naming the argument, the rule and the value received.

    Example:

    >>> check_number(100, "percentile", greater_than=0, at_most=100)
    100.0
    """
    if value is None and allow_none:
        return None
    valid = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and (greater_than is None or value > greater_than)
        and (at_least is None or value >= at_least)
        and (at_most is None or value <= at_most)
    )
    if not valid:
        raise ValueError(
            f"`{label or argument}` must be a number "
            f"{_rule(greater_than, at_least, at_most)}. Received: {argument}={value!r}"
        )
    return float(value)
