"""Gradient statistics as pure functions.

Two families live here: in-graph reductions (`tensor_norm`, `safe_norm`, `norms`) that
run inside the compiled train step on the device, and host-side functions over NumPy arrays of norms
(`first_to_last_ratio`, `per_layer_ratio`) that summarise a profile across depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops


# `safe_norm`'s second scale: 2**-64 keeps the squares of any finite float32 entry
# finite (|x| * 2**-64 <= 1.8e19), and every entry that it sends below float32's
# normal range (|x| < 2) weighs less than 1e-38 of a sum that overflowed unscaled.
_DOWN, _UP = 2.0**-64, 2.0**64
_SQRT2 = float(np.sqrt(2.0))


def _dense(value: tf.Tensor | tf.IndexedSlices) -> tf.Tensor:
    """`value` as a dense float32 tensor (the rows of `tf.IndexedSlices` summed)."""
    if isinstance(value, tf.IndexedSlices):
        unique, positions = tf.unique(value.indices)
        value = tf.math.unsorted_segment_sum(
            value.values, positions, tf.shape(unique)[0]
        )
    return tf.cast(value, tf.float32)


def tensor_norm(value: tf.Tensor | tf.IndexedSlices) -> tf.Tensor:
    """The L2 norm of a dense or sparse tensor, in float32.

    Sparse gradients (`tf.IndexedSlices`, produced by `Embedding` layers) may name the
    same row several times; the rows are summed first, as the optimizer would.

    Args:
        value: A tensor or `tf.IndexedSlices`.

    Returns:
        A float32 scalar tensor; NaN or inf when `value` holds such entries.
    """
    value = _dense(value)
    return tf.sqrt(tf.reduce_sum(tf.square(value)))


def half_square(value: tf.Tensor | tf.IndexedSlices) -> tf.Tensor:
    """Half the squared L2 norm of a dense or sparse tensor, as a float32 scalar.

    One op (`tf.nn.l2_loss`) for a dense tensor, where a norm takes three: the
    norms are kept as half-squares and their square roots taken later, once for all.

    Args:
        value: A tensor or `tf.IndexedSlices`.

    Returns:
        A float32 scalar tensor.
    """
    if isinstance(value, tf.IndexedSlices):
        return 0.5 * tf.square(tensor_norm(value))
    return tf.nn.l2_loss(tf.cast(value, tf.float32))


def safe_norm(value: tf.Tensor | tf.IndexedSlices) -> tf.Tensor:
    """The L2 norm of a tensor, finite whenever float32 can represent it.

    A float32 sum of squares overflows once the norm passes ~1.8e19, long before the
    norm itself (up to ~3.4e38) does. This takes two half-squares, of the tensor and of
    the tensor scaled by 2**-64, and keeps the scaled one only where the plain one is
    not finite: no branch, and both reductions read the same input. The result is
    `inf` or NaN only when the tensor holds such entries, or when its norm exceeds
    float32's range.

    Args:
        value: A tensor or `tf.IndexedSlices`.

    Returns:
        A float32 scalar tensor.

    Example:

    >>> float(safe_norm(tf.fill([100], 1e20)))  # the squares overflow float32
    1.0000000200408773e+21
    """
    value = _dense(value)
    plain = tf.nn.l2_loss(value)
    scaled = tf.nn.l2_loss(value * _DOWN)
    return tf.where(
        tf.math.is_finite(plain),
        _SQRT2 * tf.sqrt(plain),
        (_SQRT2 * _UP) * tf.sqrt(scaled),
    )


def safe_norms(
    values: Sequence[tf.Tensor | tf.IndexedSlices], *, jit_compile: bool = False
) -> tf.Tensor:
    """L2 norms of several tensors, finite whenever float32 can represent them.

    One `tf.nn.l2_loss` per tensor, as cheap as the half-squares of up to now, then one
    `tf.cond` for all of them: only when some half-square is not finite (a sum of
    squares that overflowed, or a gradient with inf or NaN entries) are the norms
    taken again with `safe_norm`. A step whose norms are finite pays one predicate and
    one branch, whatever the number of tensors.

    Args:
        values: Dense tensors or `tf.IndexedSlices` (no `None`).
        jit_compile: Whether the calling function is compiled with XLA. Defaults to
            `False`. The same formulation measured cheapest under both compilers
            (`benchmarks/bench_norms.py`); the argument lets the caller pass what it
            knows, so that a formulation per compiler needs no change of callers.

    Returns:
        A float32 vector of shape `(len(values),)`.

    Example:

    >>> safe_norms([tf.constant([3.0, 4.0]), tf.fill([100], 1e20)]).numpy().tolist()
    [5.0, 1.0000000200408773e+21]
    """
    if keras.backend.backend() != "tensorflow":
        return _safe_norms_ops(values)
    if not values:
        return tf.zeros((0,), tf.float32)
    dense = [_dense(value) for value in values]
    halves = tf.stack([tf.nn.l2_loss(value) for value in dense])
    return tf.cond(
        tf.reduce_all(tf.math.is_finite(halves)),
        lambda: _SQRT2 * tf.sqrt(halves),
        lambda: tf.stack([safe_norm(value) for value in dense]),
    )


def _safe_norms_ops(values: Sequence) -> object:
    """`safe_norms` in `keras.ops`, for the backends other than TensorFlow.

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
        largest = ops.max(ops.abs(value))
        usable = ops.logical_and(largest > 0, ops.isfinite(largest))
        scale = ops.where(usable, largest, ops.ones_like(largest))
        norm = scale * ops.sqrt(ops.sum(ops.square(value / scale)))
        return ops.where(ops.isinf(largest), largest, norm)

    def scaled() -> object:
        again = ops.stack([rescaled(value) for value in dense])
        return ops.where(ops.isfinite(squares), ops.sqrt(squares), again)

    return ops.cond(ops.all(ops.isfinite(squares)), lambda: ops.sqrt(squares), scaled)


def tensor_norm_float64(value: tf.Tensor | tf.IndexedSlices) -> tf.Tensor:
    """The L2 norm of a tensor accumulated in float64, returned as float32.

    The squares of float32 entries neither overflow nor underflow in float64, so the
    norm is exact to float32 rounding over float32's whole range; the cast costs a
    float64 copy of the tensor without XLA (XLA fuses it into the reduction).

    Args:
        value: A tensor or `tf.IndexedSlices`.

    Returns:
        A float32 scalar tensor; NaN or inf when `value` holds such entries.
    """
    wide = tf.cast(_dense(value), tf.float64)
    return tf.cast(tf.sqrt(2.0 * tf.nn.l2_loss(wide)), tf.float32)


def norms(values: Sequence[tf.Tensor | tf.IndexedSlices | None]) -> tf.Tensor:
    """L2 norms of several tensors, stacked into one float32 vector.

    Each dense tensor costs one reduction op (`half_square`) and the square roots are
    taken once for all.

    Args:
        values: Tensors (or `None`, recorded as NaN: the variable got no gradient).

    Returns:
        A float32 tensor of shape `(len(values),)`.
    """
    if not values:
        return tf.zeros((0,), tf.float32)
    halves = [
        tf.constant(float("nan")) if value is None else half_square(value)
        for value in values
    ]
    return tf.sqrt(2.0 * tf.stack(halves))


def global_norm(per_tensor_norms: tf.Tensor) -> tf.Tensor:
    """The global norm: the square root of the sum of squared per-tensor norms.

    The norms are divided by the largest one before they are squared, so the global
    norm of finite norms is finite whenever float32 can represent it (the squares of
    norms above ~1.8e19 overflow). A non-finite gradient makes the global norm
    non-finite, as it should.

    Args:
        per_tensor_norms: The output of `norms` or `safe_norm` over tensors that all
            have a gradient.

    Returns:
        A float32 scalar tensor.
    """
    if keras.backend.backend() != "tensorflow":
        largest = ops.max(per_tensor_norms)
        usable = ops.logical_and(largest > 0, ops.isfinite(largest))
        scale = ops.where(usable, largest, ops.ones_like(largest))
        return scale * ops.sqrt(ops.sum(ops.square(per_tensor_norms / scale)))
    largest = tf.reduce_max(per_tensor_norms)
    usable = tf.logical_and(largest > 0, tf.math.is_finite(largest))
    scale = tf.where(usable, largest, tf.ones_like(largest))
    return scale * tf.sqrt(tf.reduce_sum(tf.square(per_tensor_norms / scale)))


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
