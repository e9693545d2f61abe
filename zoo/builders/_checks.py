"""Argument checks and name resolution shared by the MLP and CNN builders.

Every check raises a `ValueError` that names the argument, states the rule, echoes what it
received and, where there is a closed set, lists the valid options.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Literal, Union

import keras

Block = Literal["plain", "residual", "batchnorm", "residual_bn"]
"""The block types every builder accepts."""

BLOCKS: tuple[str, ...] = ("plain", "residual", "batchnorm", "residual_bn")
"""The block types, in the order they are documented."""

RESIDUAL_BLOCKS: frozenset[str] = frozenset({"residual", "residual_bn"})
BATCHNORM_BLOCKS: frozenset[str] = frozenset({"batchnorm", "residual_bn"})

COMMON_ACTIVATIONS: tuple[str, ...] = (
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "elu",
    "selu",
    "gelu",
)
"""Hidden activations the zoo is tested with; any `keras.activations` name works."""

InitializerLike = Union[str, keras.initializers.Initializer]

# He et al. 2015 derive Var[W] = 2 / fan_in for ReLU; the same gain is the usual choice for
# its smooth or leaky relatives, whose derivative is ~1 on half the line and small elsewhere.
_HE_ACTIVATIONS = frozenset(
    {"relu", "relu6", "leaky_relu", "elu", "celu", "gelu", "silu", "swish", "mish"}
)
# Klambauer et al. 2017: SELU's self-normalizing fixed point assumes Var[W] = 1 / fan_in.
_LECUN_ACTIVATIONS = frozenset({"selu"})


def default_initializer(activation: str) -> str:
    """Returns the kernel initializer that `kernel_initializer="auto"` picks for an activation.

    | activation                                                   | initializer      |
    | ------------------------------------------------------------ | ---------------- |
    | `relu`, `relu6`, `leaky_relu`, `elu`, `celu`, `gelu`,        | `he_normal`      |
    | `silu`, `swish`, `mish` (the ReLU family)                    |                  |
    | `selu`                                                       | `lecun_normal`   |
    | anything else (`sigmoid`, `tanh`, `linear`, `softplus`, ...) | `glorot_uniform` |

    Args:
        activation: A Keras activation name, e.g. `"relu"`.

    Returns:
        The Keras name of the initializer, e.g. `"he_normal"`.

    Raises:
        ValueError: If `activation` is not a Keras activation name.

    Example:

    >>> default_initializer("relu"), default_initializer("tanh"), default_initializer("selu")
    ('he_normal', 'glorot_uniform', 'lecun_normal')

    References:
        Glorot & Bengio 2010, "Understanding the difficulty of training deep feedforward
        neural networks" (Var[W] = 2 / (fan_in + fan_out)).
        He et al. 2015, "Delving Deep into Rectifiers" (Var[W] = 2 / fan_in).
        Klambauer et al. 2017, "Self-Normalizing Neural Networks" (Var[W] = 1 / fan_in).
    """
    activation = check_activation(activation)
    if activation in _HE_ACTIVATIONS:
        return "he_normal"
    if activation in _LECUN_ACTIVATIONS:
        return "lecun_normal"
    return "glorot_uniform"


def is_int_at_least(value: Any, minimum: int) -> bool:
    """Whether `value` is an integer (not a bool) >= `minimum`."""
    return (
        not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= minimum
    )


def is_real_in(value: Any, low: float, high: float, *, include_low: bool = True) -> bool:
    """Whether `value` is a real number (not a bool) in [low, high) or (low, high)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return (low <= value if include_low else low < value) and value < high


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """Returns `value` as an `int` if it is an integer >= `minimum`, else raises."""
    if not is_int_at_least(value, minimum):
        raise ValueError(
            f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}"
        )
    return int(value)


def check_int_list(
    value: Any, name: str, length: int | None = None, length_name: str = "depth"
) -> list[int]:
    """Returns an int or a sequence of ints as a list of positive ints.

    An int is repeated `length` times (once when `length` is None). A sequence must have
    `length` entries when `length` is given.
    """
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) == 0:
            raise ValueError(
                f"`{name}` must be a positive integer or a non-empty list of them. "
                f"Received: {name}={value!r}"
            )
        if length is not None and len(value) != length:
            raise ValueError(
                f"`{name}` must have one entry per block ({length_name}={length}), but it "
                f"has {len(value)}. Received: {name}={list(value)!r}. Pass "
                f"{length_name}={len(value)} or a single integer {name}."
            )
        for entry in value:
            _check_list_entry(entry, name, value)
        return [int(entry) for entry in value]
    _check_list_entry(value, name, value)
    return [int(value)] * (1 if length is None else length)


def _check_list_entry(entry: Any, name: str, received: Any) -> None:
    if not is_int_at_least(entry, 1):
        raise ValueError(
            f"`{name}` must be a positive integer or a list of positive integers. "
            f"Received: {name}={received!r}"
        )


def check_input_shape(input_shape: Any, rank: int | None = None) -> tuple[int, ...]:
    """Returns `input_shape` as a tuple of positive ints of the given rank, else raises."""
    expected = "(height, width, channels)" if rank == 3 else "(features,) or an image shape"
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = None
    if (
        not shape
        or not all(is_int_at_least(dim, 1) for dim in shape)
        or (rank is not None and len(shape) != rank)
    ):
        rank_rule = f"of rank {rank} " if rank is not None else ""
        raise ValueError(
            f"`input_shape` must be a tuple of positive integers {rank_rule}without the batch "
            f"axis, {expected}. Received: input_shape={input_shape!r}"
        )
    return tuple(int(dim) for dim in shape)


def check_choice(value: Any, name: str, options: tuple[str, ...]) -> str:
    """Returns `value` if it is one of `options`, else raises listing them."""
    if value not in options:
        raise ValueError(
            f"`{name}` must be one of {', '.join(map(repr, options))}. "
            f"Received: {name}={value!r}"
        )
    return value


def check_block(block: Any, preactivation: bool) -> str:
    """Returns `block` if it is one of `BLOCKS` and fits `preactivation`, else raises."""
    check_choice(block, "block", BLOCKS)
    if preactivation and block not in RESIDUAL_BLOCKS:
        raise ValueError(
            "`preactivation=True` applies only to residual blocks ('residual', "
            f"'residual_bn'). Received: block={block!r}, preactivation=True"
        )
    return block


def _keras_knows(get: Any, identifier: Any) -> bool:
    """Whether `identifier` is a string that the Keras lookup `get` resolves."""
    if not isinstance(identifier, str):
        return False
    try:
        get(identifier)
    except ValueError:
        return False
    return True


def check_activation(activation: Any, name: str = "activation") -> str:
    """Returns `activation` if Keras knows it by that name, else raises."""
    if not _keras_knows(keras.activations.get, activation):
        raise ValueError(
            f"`{name}` must be the name of a Keras activation, e.g. "
            f"{', '.join(map(repr, COMMON_ACTIVATIONS))}; any name that "
            f"`keras.activations.get` accepts works. Received: {name}={activation!r}"
        )
    return activation


def check_initializer(initializer: Any) -> InitializerLike:
    """Returns `initializer` (`"auto"`, a Keras name or instance) if Keras accepts it."""
    if isinstance(initializer, keras.initializers.Initializer) or (
        isinstance(initializer, str) and initializer == "auto"
    ):
        return initializer
    if not _keras_knows(keras.initializers.get, initializer):
        raise ValueError(
            "`kernel_initializer` must be 'auto', a `keras.initializers` name such as "
            "'he_normal', 'glorot_uniform', 'lecun_normal' or 'orthogonal', or a "
            "`keras.initializers.Initializer` instance. "
            f"Received: kernel_initializer={initializer!r}"
        )
    return initializer


def check_dropout(dropout: Any) -> float:
    """Returns `dropout` as a float in [0, 1), else raises."""
    if not is_real_in(dropout, 0.0, 1.0):
        raise ValueError(
            f"`dropout` must be a float in [0, 1). Received: dropout={dropout!r}"
        )
    return float(dropout)


def check_l2(l2: Any) -> float:
    """Returns `l2` as a float >= 0, else raises."""
    if not is_real_in(l2, 0.0, float("inf")):
        raise ValueError(f"`l2` must be a float >= 0. Received: l2={l2!r}")
    return float(l2)


def check_output_activation(output_activation: Any, num_classes: int) -> str | None:
    """Returns `output_activation` (None or a Keras activation name) if it fits the head."""
    if output_activation is None:
        return None
    check_activation(output_activation, name="output_activation")
    if output_activation == "softmax" and num_classes == 1:
        raise ValueError(
            "`output_activation='softmax'` over a single unit always outputs 1. With "
            "num_classes=1 use output_activation='sigmoid' or None (logits). "
            f"Received: num_classes={num_classes}, output_activation={output_activation!r}"
        )
    return output_activation


def check_name(name: Any, default: str) -> str:
    """Returns `name`, or `default` when `name` is None; raises on an empty or non-str name."""
    if name is None:
        return default
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"`name` must be a non-empty string or None. Received: name={name!r}"
        )
    return name
