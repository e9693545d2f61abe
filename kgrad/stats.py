"""Gradient statistics as pure functions.

Two families live here: in-graph reductions (`tensor_norm`, `norms`) that run inside the
compiled train step on the device, and host-side functions over NumPy arrays of norms
(`first_to_last_ratio`, `per_layer_ratio`) that summarise a profile across depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf


def tensor_norm(value: tf.Tensor | tf.IndexedSlices) -> tf.Tensor:
    """The L2 norm of a dense or sparse tensor, in float32.

    Sparse gradients (`tf.IndexedSlices`, produced by `Embedding` layers) may name the
    same row several times; the rows are summed first, as the optimizer would.

    Args:
        value: A tensor or `tf.IndexedSlices`.

    Returns:
        A float32 scalar tensor; NaN or inf when `value` holds such entries.
    """
    if isinstance(value, tf.IndexedSlices):
        unique, positions = tf.unique(value.indices)
        summed = tf.math.unsorted_segment_sum(
            value.values, positions, tf.shape(unique)[0]
        )
        value = summed
    value = tf.cast(value, tf.float32)
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

    A non-finite gradient makes the global norm non-finite, as it should.

    Args:
        per_tensor_norms: The output of `norms` over tensors that all have a gradient.

    Returns:
        A float32 scalar tensor.
    """
    return tf.sqrt(tf.reduce_sum(tf.square(per_tensor_norms)))


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
