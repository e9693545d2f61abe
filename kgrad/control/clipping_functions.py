"""Gradient clipping as pure in-graph functions (`keras.ops`, on every backend).

Each function takes a list of gradients aligned with the variables (entries may be
`None`, for a variable without a gradient, or, on TensorFlow, `tf.IndexedSlices`
from `Embedding` layers, handled through `kgrad.backend`) and returns the clipped
list with the same structure, plus a scalar boolean tensor that says whether anything
was clipped. They hold no state: the callback `GradientClipping` owns the thresholds
(in variables) and the AutoClip history.

Every norm is computed in float32 and every result cast back to the gradient's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keras import ops

from kgrad import backend, stats
from kgrad.capture.step_hook import scale_gradient

Gradients = list[Any]

# Below this, a unit's gradient norm counts as zero (no division by it); as in optax.
_TINY_NORM = 1e-6


def _false() -> Any:
    return ops.convert_to_tensor(False)


def gradients_global_norm(gradients: Sequence[Any]) -> Any:
    """The global L2 norm (float32) of the gradients that are not `None`."""
    present = [g for g in gradients if g is not None]
    if not present:
        return ops.zeros((), "float32")
    return stats.global_norm(stats.norms(present))


def _norm_scale(norm: Any, max_norm: Any) -> Any:
    # min(1, c/‖g‖), with 1 (not NaN) for a zero gradient.
    max_norm = ops.cast(max_norm, "float32")
    return ops.where(norm > max_norm, max_norm / norm, ops.ones_like(norm))


def clip_by_global_norm(
    gradients: Sequence[Any],
    max_norm: Any,
    norm: Any | None = None,
) -> tuple[Gradients, Any, Any]:
    """Scales all gradients together so that their global norm is at most `max_norm`.

    g ← g · min(1, c / ‖g‖), with ‖g‖ the norm of all gradients concatenated.

    Args:
        gradients: Gradients (tensors, `tf.IndexedSlices` or `None`).
        max_norm: The threshold c > 0 (a scalar tensor or float).
        norm: The global norm of `gradients` when the caller has computed it
            already. Defaults to `None`, computed here.

    Returns:
        The clipped gradients, the global norm before clipping (float32) and
        whether it exceeded `max_norm`.

    References:
        Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent
        neural networks".

    Example:

    >>> clipped, norm, _ = clip_by_global_norm([keras.ops.array([3.0, 4.0])], 1.0)
    >>> [round(float(v), 6) for v in clipped[0]], float(norm)
    ([0.6, 0.8], 5.0)
    """
    if norm is None:
        norm = gradients_global_norm(gradients)
    scale = _norm_scale(norm, max_norm)
    return [scale_gradient(g, scale) for g in gradients], norm, scale < 1.0


def clip_by_group_norm(
    gradients: Sequence[Any],
    groups: Sequence[Sequence[int]],
    max_norm: Any,
) -> tuple[Gradients, Any]:
    """Clips each group of gradients (a layer) by its own joint norm.

    Every group is scaled by min(1, c / ‖g_group‖); indices in no group pass
    through.

    Args:
        gradients: Gradients (tensors, `tf.IndexedSlices` or `None`).
        groups: Lists of indices into `gradients`, one list per layer.
        max_norm: The threshold c > 0.

    Returns:
        The clipped gradients and whether any group exceeded `max_norm`.

    References:
        Pascanu et al. 2013 (the same rule, applied per layer).

    Example:

    >>> grads = [keras.ops.array([3.0, 4.0]), keras.ops.array([0.1])]
    >>> clipped, _ = clip_by_group_norm(grads, [[0], [1]], 1.0)
    >>> [round(float(v), 3) for g in clipped for v in g]
    [0.6, 0.8, 0.1]
    """
    clipped = list(gradients)
    exceeded = [_false()]
    for group in groups:
        members = [i for i in group if gradients[i] is not None]
        if not members:
            continue
        norm = gradients_global_norm([gradients[i] for i in members])
        scale = _norm_scale(norm, max_norm)
        exceeded.append(scale < 1.0)
        for i in members:
            clipped[i] = scale_gradient(gradients[i], scale)
    return clipped, ops.any(ops.stack(exceeded))


def clip_by_value(gradients: Sequence[Any], clip_value: Any) -> tuple[Gradients, Any]:
    """Clips every gradient entry to [-c, c].

    Sparse gradients (TensorFlow's `tf.IndexedSlices`) have their repeated rows
    summed first, so the clipped entries are those of the gradient the optimizer
    would apply.

    Args:
        gradients: Gradients (tensors, `tf.IndexedSlices` or `None`).
        clip_value: The bound c > 0.

    Returns:
        The clipped gradients and whether any entry exceeded `clip_value`.

    Example:

    >>> clipped, _ = clip_by_value([keras.ops.array([-3.0, 0.5])], 1.0)
    >>> [float(v) for v in clipped[0]]
    [-1.0, 0.5]
    """
    operations = backend.current()
    clipped: Gradients = []
    exceeded = [_false()]
    for gradient in gradients:
        if gradient is None:
            clipped.append(None)
            continue
        gradient = operations.summed_rows(gradient)
        values = operations.entries(gradient)
        bound = ops.cast(clip_value, values.dtype)
        exceeded.append(ops.any(ops.abs(values) > bound))
        clipped.append(operations.with_entries(gradient, ops.clip(values, -bound, bound)))
    return clipped, ops.any(ops.stack(exceeded))


def percentile(values: Any, count: Any, q: Any) -> Any:
    """The q-th percentile of the first `count` entries of `values`.

    Linear interpolation between the two nearest ranks, as `numpy.percentile`'s
    default `method="linear"`. The whole (fixed-size) vector is sorted with the unused
    entries pushed to the end, so the shape stays static (XLA-friendly).

    Args:
        values: A float32 vector; entries from index `count` on are ignored.
        count: How many leading entries hold data (≥ 1; clamped to the size).
        q: The percentile in (0, 100].

    Returns:
        A float32 scalar tensor.

    Example:

    >>> float(percentile(keras.ops.array([4.0, 1.0, 3.0, 99.0]), 3, 50.0))
    3.0
    """
    index = backend.current().INDEX_DTYPE
    values = ops.cast(values, "float32")
    size = ops.shape(values)[0]
    count = ops.clip(ops.cast(count, index), 1, size)
    used = ops.arange(size, dtype=index) < count
    ordered = ops.sort(ops.where(used, values, float("inf")))
    position = ops.cast(q, "float32") / 100.0 * ops.cast(count - 1, "float32")
    below = ops.floor(position)
    lower = ops.take(ordered, ops.cast(below, index))
    upper = ops.take(ordered, ops.minimum(ops.cast(below, index) + 1, count - 1))
    fraction = position - below
    # NumPy's lerp: a + (b - a)·t, or b - (b - a)·(1 - t) when t ≥ 0.5.
    return ops.where(
        fraction >= 0.5,
        upper - (upper - lower) * (1.0 - fraction),
        lower + (upper - lower) * fraction,
    )


def unitwise_norm(value: Any) -> Any:
    """Per-unit L2 norms of a Keras weight (or its gradient), broadcastable to it.

    Keras kernels keep output units on the last axis: Dense kernels are (in, out),
    convolution kernels HWIO. A unit's norm reduces over every axis but the last; a
    vector (bias, scale) is unit-wise elementwise, so its norm is the absolute value.

    Args:
        value: A dense tensor.

    Returns:
        A float32 tensor with the rank of `value` and size 1 on the reduced axes.

    References:
        Brock, De, Smith & Simonyan 2021, "High-Performance Large-Scale Image
        Recognition Without Normalization" (unit-wise norms).

    Example:

    >>> norms = unitwise_norm(keras.ops.array([[3.0, 1.0], [4.0, 0.0]]))
    >>> keras.ops.convert_to_numpy(norms).tolist()
    [[5.0, 1.0]]
    """
    return _unit_norms(value)


def _unit_norms(value: Any, keepdims: bool = True) -> Any:
    value = ops.cast(value, "float32")
    rank = len(value.shape)  # static; `ops.ndim` fails on a tf.Variable in Keras 3.8
    if rank <= 1:
        return ops.abs(value)
    # Not TensorFlow's fused EuclideanNorm: XLA has no kernel for it.
    axes = tuple(range(rank - 1))
    return ops.sqrt(ops.sum(ops.square(value), axis=axes, keepdims=keepdims))


def _unit_norm_vector(value: Any, fused: bool) -> Any:
    # Per-unit norms as a vector (one entry for a scalar), so that every tensor's
    # scales concatenate into one vector for the "anything clipped" flag.
    value = ops.cast(value, "float32")
    rank = len(value.shape)  # static; `ops.ndim` fails on a tf.Variable in Keras 3.8
    if rank == 0:
        return ops.reshape(ops.abs(value), (1,))
    if fused and rank > 1:  # one op where the backend has one (TensorFlow's)
        return backend.current().euclidean_norm(value, range(rank - 1))
    return _unit_norms(value, keepdims=False)


def adaptive_clip(
    gradients: Sequence[Any],
    weights: Sequence[Any],
    ratio: Any,
    epsilon: float = 1e-3,
    skip: Sequence[bool] | None = None,
    fused: bool = True,
) -> tuple[Gradients, Any]:
    """Adaptive gradient clipping (AGC): unit-wise, relative to the weights.

    Unit i is clipped when ‖G_i‖ / max(‖W_i‖, ε) > λ, by scaling it to norm
    λ·max(‖W_i‖, ε); the other units are left exactly as they are.

    Args:
        gradients: Gradients aligned with `weights` (sparse ones are densified).
        weights: The current values of the variables.
        ratio: λ > 0, the largest allowed gradient-to-weight norm ratio.
        epsilon: ε, the smallest weight norm a unit is measured against, so that
            zero-initialised weights (biases) can still move. Defaults to `1e-3`.
        skip: One flag per gradient; `True` passes it through unclipped (the final
            layer, by default in `GradientClipping`). Defaults to `None`, no skip.
        fused: On TensorFlow, reduce each kernel with one `EuclideanNorm` op
            (measured: AGC costs about 6% less of a small model's CPU step than
            with squares and sums). XLA has no kernel for it: pass `False` inside
            an XLA-compiled step. The same squares and sums elsewhere. Defaults to
            `True`.

    Returns:
        The clipped gradients and whether any unit was clipped.

    References:
        Brock, De, Smith & Simonyan 2021, "High-Performance Large-Scale Image
        Recognition Without Normalization".

    Example:

    >>> grads, weights = [keras.ops.array([1.0, 0.001])], [keras.ops.array([1.0, 1.0])]
    >>> clipped, _ = adaptive_clip(grads, weights, 0.01)
    >>> [round(float(v), 6) for v in clipped[0]]
    [0.01, 0.001]
    """
    skip = [False] * len(gradients) if skip is None else list(skip)
    clipped: Gradients = list(gradients)
    members = [
        index
        for index, (gradient, skipped) in enumerate(zip(gradients, skip))
        if gradient is not None and not skipped
    ]
    if not members:
        return clipped, _false()
    dense = backend.current().dense
    for index in members:
        clipped[index] = dense(clipped[index])
    # Each tensor is clipped on its own, as soon as its gradient exists: no step-wide
    # barrier, so the updates of the last layers overlap the rest of the backward
    # pass (measured: 5% of a small model's CPU step less than clipping after one
    # concatenation of every tensor's norms, although it takes more ops). Only the
    # "anything clipped" flag waits for all of them.
    ratio = ops.cast(ratio, "float32")
    scales = []
    for index in members:
        gradient = clipped[index]
        # The scale min(1, λ·max(‖W_i‖, ε)/‖G_i‖) is exactly 1 for the units under
        # the limit: they stay as they are.
        limits = ops.maximum(_unit_norm_vector(weights[index], fused), epsilon) * ratio
        norms = ops.maximum(_unit_norm_vector(gradient, fused), _TINY_NORM)
        scale = ops.minimum(1.0, limits / norms)
        scales.append(scale)
        if len(gradient.shape) == 0:
            scale = ops.reshape(scale, ())
        clipped[index] = gradient * ops.cast(scale, gradient.dtype)
    return clipped, ops.min(ops.concatenate(scales, 0)) < 1.0
