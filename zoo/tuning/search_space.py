"""Search-space dimensions: how each hypermodel argument becomes a keras-tuner hyperparameter.

Every argument of `zoo.HyperMLP` and `zoo.HyperCNN` that shapes a trial accepts one of:

| given                                       | becomes                                        |
| ------------------------------------------- | ---------------------------------------------- |
| the default (`DEFAULT`)                     | the documented default space of the argument   |
| a list, or a tuple that is not a range      | `hp.Choice(argument, values)`                  |
| a tuple of two numbers `(min, max)`         | `hp.Int` / `hp.Float` over that range (below)  |
| a keras-tuner hyperparameter object         | itself, under its own name                     |
| one int, float, str or bool                 | `hp.Fixed(argument, value)`: shown in results  |
| anything else (None, an initializer object) | a constant, not a hyperparameter               |

A range `(min, max)` is sampled as the argument's `RangeKind` says: `"int"` every integer,
`"int_doubling"` the powers of two times `min` (`(32, 256)` → 32, 64, 128, 256), `"float"`
uniformly, `"float_log"` log-uniformly. Every value a dimension can take (the choices, both
ends of a range) is checked when the hypermodel is constructed, so an impossible space fails
before the first trial.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from typing import Any, Literal

import keras_tuner

RangeKind = Literal["int", "int_doubling", "float", "float_log"]

HyperParameter = keras_tuner.engine.hyperparameters.HyperParameter


class _Default:
    """The marker of an argument left to its default search space."""

    def __repr__(self) -> str:
        return "DEFAULT"

    def __deepcopy__(self, memo: dict) -> "_Default":
        return self


DEFAULT = _Default()
"""Marks an argument left to its documented default search space."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one argument is searched.

    Attributes:
        check: Validates one value the argument may take; raises `ValueError` naming it.
        range_kind: How a `(min, max)` range is sampled, or None when ranges make no sense
            (names such as `block`).
        default: The default space: a list (choice), a range tuple or a fixed value.
    """

    check: Callable[[Any], Any]
    range_kind: RangeKind | None
    default: Any


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_range(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(map(_is_number, value))


def _range_hyperparameter(argument: str, low: Any, high: Any, kind: RangeKind):
    hp_types = keras_tuner.engine.hyperparameters
    if kind == "int":
        return hp_types.Int(argument, int(low), int(high))
    if kind == "int_doubling":
        return hp_types.Int(argument, int(low), int(high), step=2, sampling="log")
    sampling = "log" if kind == "float_log" else "linear"
    return hp_types.Float(argument, float(low), float(high), sampling=sampling)


def _possible_values(hyperparameter: HyperParameter) -> list[Any]:
    """The values to validate: every choice, or both ends of a range."""
    if hasattr(hyperparameter, "min_value"):
        return [hyperparameter.min_value, hyperparameter.max_value]
    return list(hyperparameter.values)


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One argument of a hypermodel: a hyperparameter to declare, or a constant.

    Attributes:
        argument: The hypermodel argument it feeds, e.g. `"depth"`.
        hyperparameter: The keras-tuner hyperparameter, or None for a constant.
        constant: The value used when `hyperparameter` is None.
    """

    argument: str
    hyperparameter: HyperParameter | None = None
    constant: Any = None

    @property
    def name(self) -> str | None:
        """The hyperparameter's name in the tuner (and in `tuner_results`), or None."""
        return None if self.hyperparameter is None else self.hyperparameter.name

    def declare(self, hp: keras_tuner.HyperParameters) -> Any:
        """Registers the hyperparameter in `hp` (once) and returns its current value."""
        if self.hyperparameter is None:
            return self.constant
        hp.merge([self.hyperparameter], overwrite=False)
        return hp.values.get(self.hyperparameter.name)


def make_dimension(argument: str, given: Any, rule: Rule) -> Dimension:
    """Turns what the user gave for `argument` into a checked `Dimension`.

    Args:
        argument: The argument's name, e.g. `"depth"`.
        given: `DEFAULT`, a list of choices, a `(min, max)` range, a keras-tuner
            hyperparameter, a fixed value or a constant (see the module docstring).
        rule: How the argument is checked and how ranges are sampled.

    Returns:
        The `Dimension`.

    Raises:
        ValueError: If a range has min > max, a list is empty, or any possible value fails
            the argument's check (the message echoes the space received).
    """
    if given is DEFAULT:
        given = rule.default
    if isinstance(given, HyperParameter):
        _check_all(argument, given, _possible_values(given), rule)
        return Dimension(argument, given)
    if _is_range(given) and rule.range_kind is not None:
        low, high = given
        if low > high:
            raise ValueError(
                f"`{argument}` as a range must be (min, max) with min <= max. "
                f"Received: {argument}={given!r}. Swap the ends, or pass a list of "
                "choices."
            )
        _check_all(argument, given, [low, high], rule)
        hyperparameter = _range_hyperparameter(argument, low, high, rule.range_kind)
    elif isinstance(given, (list, tuple)):
        if not given:
            raise ValueError(
                f"`{argument}` must be a value, a non-empty list of choices or a keras-tuner "
                f"hyperparameter. Received: {argument}={given!r}"
            )
        _check_all(argument, given, given, rule)
        hyperparameter = keras_tuner.engine.hyperparameters.Choice(argument, list(given))
    elif isinstance(given, (str, bool, numbers.Real)):
        _check_all(argument, given, [given], rule)
        hyperparameter = keras_tuner.engine.hyperparameters.Fixed(argument, given)
    else:
        _check_all(argument, given, [given], rule)
        return Dimension(argument, constant=given)
    return Dimension(argument, hyperparameter)


def _check_all(argument: str, given: Any, values: list[Any], rule: Rule) -> None:
    for value in values:
        try:
            rule.check(value)
        except ValueError as error:
            if given is value:
                raise
            raise ValueError(f"{error} (in the search space {argument}={given!r})") from None


class SearchSpace:
    """The checked dimensions of a hypermodel, in declaration order.

    Args:
        rules: The rule of every searchable argument, by name.
        given: What the user gave for each argument (`DEFAULT` to keep the default).

    Raises:
        ValueError: From `make_dimension`, for the first argument with an impossible space.
    """

    def __init__(self, rules: Mapping[str, Rule], given: Mapping[str, Any]):
        self.dimensions = {
            argument: make_dimension(argument, given.get(argument, DEFAULT), rule)
            for argument, rule in rules.items()
        }

    def declare(self, hp: keras_tuner.HyperParameters) -> dict[str, Any]:
        """Declares every dimension in `hp` and returns the current value of each argument."""
        return {argument: dim.declare(hp) for argument, dim in self.dimensions.items()}

    def is_tuned(self, argument: str) -> bool:
        """Whether `argument` can take more than one value in this space."""
        hyperparameter = self.dimensions[argument].hyperparameter
        if hyperparameter is None:
            return False
        return type(hyperparameter).__name__ != "Fixed"

    def hyperparameter_names(self) -> list[str]:
        """The names of the declared hyperparameters, fixed ones included."""
        return [dim.name for dim in self.dimensions.values() if dim.name is not None]
