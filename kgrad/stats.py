"""Gradient statistics as pure functions.

Two families live here: in-graph reductions (`tensor_norm`, `safe_norm`, `norms`) that
run inside the compiled train step on the device, and host-side functions over NumPy arrays of norms
(`first_to_last_ratio`, `per_layer_ratio`) that summarise a profile across depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from kgrad import backend as backends


def _fast(name: str) -> Any:
    """The backend module's own version of a reduction, where it has a faster one
    (TensorFlow's `tf.nn.l2_loss` and sparse `tf.IndexedSlices`), else `None`."""
    return getattr(backends.current(), name, None)


def _dense(value: Any) -> Any:
    return ops.cast(backends.current().dense(value), "float32")


def tensor_norm(value: Any) -> Any:
    """The L2 norm of a dense or sparse tensor, in float32.

    Sparse gradients (`tf.IndexedSlices`, produced by `Embedding` layers on
    TensorFlow) may name the same row several times; the rows are summed first, as
    the optimizer would.

    Args:
        value: A tensor (or `tf.IndexedSlices` on TensorFlow).

    Returns:
        A float32 scalar tensor; NaN or inf when `value` holds such entries.
    """
    fast = _fast("tensor_norm")
    if fast is not None:
        return fast(value)
    return ops.sqrt(ops.sum(ops.square(_dense(value))))


def half_square(value: Any) -> Any:
    """Half the squared L2 norm of a dense or sparse tensor, as a float32 scalar.

    One op on TensorFlow (`tf.nn.l2_loss`) for a dense tensor, where a norm takes
    three: the norms are kept as half-squares and their square roots taken later,
    once for all.

    Args:
        value: A tensor (or `tf.IndexedSlices` on TensorFlow).

    Returns:
        A float32 scalar tensor.
    """
    fast = _fast("half_square")
    if fast is not None:
        return fast(value)
    return 0.5 * ops.sum(ops.square(_dense(value)))


def safe_norm(value: Any) -> Any:
    """The L2 norm of a tensor, finite whenever float32 can represent it.

    A float32 sum of squares overflows once the norm passes ~1.8e19, long before the
    norm itself (up to ~3.4e38) does. The result is `inf` or NaN only when the tensor
    holds such entries, or when its norm exceeds float32's range. On TensorFlow two
    half-squares are taken, of the tensor and of the tensor scaled by 2**-64, with no
    branch; elsewhere it is `safe_norms` of the one tensor.

    Args:
        value: A tensor (or `tf.IndexedSlices` on TensorFlow).

    Returns:
        A float32 scalar tensor.

    Example:

    >>> float(safe_norm(keras.ops.full([100], 1e20)))  # the squares overflow float32
    1.0000000200408773e+21
    """
    fast = _fast("safe_norm")
    if fast is not None:
        return fast(value)
    return safe_norms([value])[0]


def safe_norms(values: Sequence[Any], *, jit_compile: bool = False) -> Any:
    """L2 norms of several tensors, finite whenever float32 can represent them.

    One reduction per tensor, then one branch for all of them: only when some sum
    of squares is not finite (it overflowed, or a gradient holds inf or NaN entries)
    are the norms taken again, overflow-free. A step whose norms are finite pays one
    predicate and one branch, whatever the number of tensors.

    Args:
        values: Dense tensors (or `tf.IndexedSlices` on TensorFlow; no `None`).
        jit_compile: Whether the calling function is compiled with XLA. Defaults to
            `False`. The same formulation measured cheapest under both compilers
            (`benchmarks/bench_norms.py`); the argument lets the caller pass what it
            knows, so that a formulation per compiler needs no change of callers.

    Returns:
        A float32 vector of shape `(len(values),)`.

    Example:

    >>> [round(float(v), 3) for v in safe_norms([keras.ops.array([3.0, 4.0])])]
    [5.0]
    """
    fast = _fast("safe_norms")
    if fast is not None:
        return fast(values, jit_compile=jit_compile)
    return _safe_norms_ops(values)


def _safe_norms_ops(values: Sequence) -> object:
    """`safe_norms` in `keras.ops` (every backend but TensorFlow, which has its own).

    One sum of squares per tensor, then one `ops.cond` for all: only in a step where
    some sum is not finite are the norms taken again, each tensor divided by its
    largest magnitude. Measured on JAX (`benchmarks/bench_backends.py`, 20x128 MLP,
    CPU time per step against plain `fit`): 1.34x, against 1.26x for the plain sums
    alone (not overflow-free) and 1.62x for both sums in every step with no branch.
    Not scaled by a constant power of two as on TensorFlow: XLA rewrites
    `square(value * 2**-64)` into `square(value) * 2**-128`, which is `inf * 0`.
    """
    if not values:
        return ops.zeros((0,), "float32")
    dense = [ops.cast(value, "float32") for value in values]
    squares = ops.stack([ops.sum(ops.square(value)) for value in dense])

    def rescaled(value: object) -> object:
        if 0 in tuple(ops.shape(value)):  # no entries: `max` has no identity
            return ops.zeros((), "float32")
        largest = ops.max(ops.abs(value))
        usable = ops.logical_and(largest > 0, ops.isfinite(largest))
        scale = ops.where(usable, largest, ops.ones_like(largest))
        norm = scale * ops.sqrt(ops.sum(ops.square(value / scale)))
        return ops.where(ops.isinf(largest), largest, norm)

    def scaled() -> object:
        again = ops.stack([rescaled(value) for value in dense])
        return ops.where(ops.isfinite(squares), ops.sqrt(squares), again)

    return ops.cond(ops.all(ops.isfinite(squares)), lambda: ops.sqrt(squares), scaled)


def tensor_norm_float64(value: Any) -> Any:
    """The L2 norm of a tensor accumulated in float64, returned as float32.

    The squares of float32 entries neither overflow nor underflow in float64, so the
    norm is exact to float32 rounding over float32's whole range. A reference for
    the benchmarks and tests; TensorFlow only (JAX has no float64 by default).

    Raises:
        NotImplementedError: on the other backends.
    """
    fast = _fast("tensor_norm_float64")
    if fast is None:
        backends.require("`stats.tensor_norm_float64`")
    return fast(value)


def norms(values: Sequence[Any]) -> Any:
    """L2 norms of several tensors, stacked into one float32 vector.

    Each dense tensor costs one reduction (`half_square`) and the square roots are
    taken once for all.

    Args:
        values: Tensors (or `None`, recorded as NaN: the variable got no gradient).

    Returns:
        A float32 tensor of shape `(len(values),)`.
    """
    if not values:
        return ops.zeros((0,), "float32")
    halves = [
        ops.convert_to_tensor(float("nan"), "float32") if value is None else half_square(value)
        for value in values
    ]
    return ops.sqrt(2.0 * ops.stack(halves))


def global_norm(per_tensor_norms: Any) -> Any:
    """The global norm: the square root of the sum of squared per-tensor norms.

    The norms are divided by the largest one before they are squared, so the global
    norm of finite norms is finite whenever float32 can represent it (the squares of
    norms above ~1.8e19 overflow). A non-finite gradient makes the global norm
    non-finite, as it should.

    Args:
        per_tensor_norms: The output of `norms` or `safe_norms` over tensors that all
            have a gradient.

    Returns:
        A float32 scalar tensor.
    """
    if ops.shape(per_tensor_norms)[0] == 0:
        return ops.zeros((), "float32")
    largest = ops.max(per_tensor_norms)
    usable = ops.logical_and(largest > 0, ops.isfinite(largest))
    scale = ops.where(usable, largest, ops.ones_like(largest))
    return scale * ops.sqrt(ops.sum(ops.square(per_tensor_norms / scale)))


def combine_norms(norm_values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Combines norms of disjoint tensors into the norm of their concatenation.

    Args:
        norm_values: Array of L2 norms.
        axis: Axis to combine over. Defaults to `-1`.

    Returns:
        sqrt(sum(norm**2)) along `axis`.
    """
    norm_values = np.asarray(norm_values, dtype=np.float64)
    return np.sqrt(np.sum(np.square(norm_values), axis=axis))


def first_to_last_ratio(profile: Sequence[float] | np.ndarray) -> float:
    """The ratio of the first entry of a depth profile to the last one.

    With a profile of gradient norms ordered from the input to the output, a value far
    below 1 means the signal reaching the first layer is a small fraction of the one
    at the last layer: the gradient vanishes on its way back.

    Args:
        profile: Norms ordered by depth, index 0 nearest the input.

    Returns:
        `profile[0] / profile[-1]`, NaN when the profile is empty or the last entry
        is zero.

    Example:

    >>> first_to_last_ratio([1e-6, 1e-3, 1.0])
    1e-06
    """
    profile = np.asarray(profile, dtype=np.float64)
    if profile.size == 0 or profile[-1] == 0:
        return float("nan")
    return float(profile[0] / profile[-1])


def per_layer_ratio(profile: Sequence[float] | np.ndarray) -> float:
    """The geometric-mean ratio between consecutive layers of a depth profile.

    This is `(first / last) ** (1 / (n - 1))`: the factor by which the backpropagated
    signal grows (> 1) or shrinks (< 1) per layer on its way from the output towards
    the input, averaged so that no single layer needs to cross a threshold.

    Args:
        profile: Norms ordered by depth, index 0 nearest the input.

    Returns:
        The per-layer ratio; NaN for fewer than two entries or non-positive values.

    References:
        Glorot & Bengio 2010; Schoenholz et al. 2017, "Deep Information Propagation"
        (the per-layer gain √χ of the backward signal).

    Example:

    >>> round(per_layer_ratio([0.01, 0.1, 1.0]), 6)
    0.1
    """
    profile = np.asarray(profile, dtype=np.float64)
    if profile.size < 2 or profile[0] <= 0 or profile[-1] <= 0:
        return float("nan")
    if not np.isfinite(profile[[0, -1]]).all():
        return float("nan")
    return float((profile[0] / profile[-1]) ** (1.0 / (profile.size - 1)))
