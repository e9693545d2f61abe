"""The step hook's backend operations on TensorFlow (`tf.Variable`, `tf.distribute`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2
from tensorflow.python.eager import context as eager_context
from tensorflow.python.ops.resource_variable_ops import BaseResourceVariable

# Index dtype of step counters and buffer rows.
INDEX_DTYPE = "int64"
# Whether the step hook's state must exist before the first step (JAX's returned
# state is fixed then); TensorFlow makes it inside the first step's trace.
STATE_BEFORE_STEP = False
# Whether the traced step may write state variables inside a branch (`when`).
BRANCH_WRITES = True


def strategy(model: keras.Model) -> tf.distribute.Strategy:
    """The model's distribution strategy."""
    return model.distribute_strategy


def new_train_function(model: keras.Model) -> Any:
    """A train function traced anew (`tf.function` traces each instance apart)."""
    model.make_train_function(force=True)
    return model.train_function


def make_variable(
    strategy: tf.distribute.Strategy,
    optimizer: keras.optimizers.Optimizer,
    initial_value: Any,
    dtype: Any,
    name: str,
) -> tf.Variable:
    """A non-trainable state variable that the traced step may write.

    Made eagerly even while a step is being traced (a model built by its first batch
    gets its state there). Under a distribution strategy the variable is mirrored and
    written from the first replica only (every replica holds the same aggregated
    values). `optimizer` is unused here: TensorFlow's step writes any variable.
    """
    del optimizer
    with tf.init_scope(), strategy.scope():
        return tf.Variable(
            initial_value,
            dtype=dtype,
            trainable=False,
            name=name,
            synchronization=tf.VariableSynchronization.ON_WRITE,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )


def track(optimizer: keras.optimizers.Optimizer, variables: Sequence[Any]) -> None:
    """Nothing to do on TensorFlow: the step writes variables it does not return."""


def untrack(optimizer: keras.optimizers.Optimizer, variables: Sequence[Any]) -> None:
    """Nothing to do on TensorFlow (see `track`)."""


def read(variable: tf.Variable) -> tf.Tensor:
    """The value of a state variable inside the traced step."""
    return variable.read_value()


def weight_values(variables: Sequence[keras.Variable]) -> list[Any]:
    """The values of the model's Keras variables inside the step."""
    return [variable.value for variable in variables]


def increment(variable: tf.Variable, amount: Any = 1) -> None:
    variable.assign_add(tf.cast(amount, variable.dtype))


def when(strategy: tf.distribute.Strategy, condition: Any, function: Callable[[], None]) -> None:
    """Runs `function` in the traced step only when `condition` holds.

    Writes to mirrored variables cannot sit inside a `tf.cond` in a replica context,
    so with several replicas `function` always runs; callers then make their writes
    harmless (for example to a scratch row).
    """
    if strategy.num_replicas_in_sync > 1:
        function()
        return
    tf.cond(condition, lambda: (function(), tf.constant(True))[1], lambda: False)


def scale_gradient(gradient: Any, factor: Any) -> Any:
    """Multiplies a dense gradient or `tf.IndexedSlices` by `factor`; `None` stays `None`."""
    if gradient is None:
        return None
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(
            gradient.values * tf.cast(factor, gradient.values.dtype),
            gradient.indices,
            gradient.dense_shape,
        )
    return gradient * tf.cast(factor, gradient.dtype)


def aggregate(strategy: tf.distribute.Strategy, gradients: list[Any]) -> list[Any]:
    """The gradients summed over replicas, as the optimizer will sum them."""
    replica_context = tf.distribute.get_replica_context()
    if strategy.num_replicas_in_sync <= 1 or replica_context is None:
        return gradients
    present = [i for i, g in enumerate(gradients) if g is not None]
    reduced = replica_context.all_reduce(
        tf.distribute.ReduceOp.SUM, [gradients[i] for i in present]
    )
    aggregated = list(gradients)
    for i, value in zip(present, reduced):
        aggregated[i] = value
    return aggregated


def write_row(
    strategy: tf.distribute.Strategy, rows: tf.Variable, row: Any, value: Any
) -> None:
    """Writes `value` into row `row` of the 2-D variable `rows` (one scatter)."""
    indices = tf.expand_dims(row, 0)
    if strategy.num_replicas_in_sync > 1:
        # Mirrored variables have no scatter update: rewrite the (small) buffer.
        rows.assign(
            tf.tensor_scatter_nd_update(rows, indices[:, None], tf.expand_dims(value, 0))
        )
        return
    rows.scatter_update(tf.IndexedSlices(tf.expand_dims(value, 0), indices))


def write_cells(
    strategy: tf.distribute.Strategy,
    rows: tf.Variable,
    row: Any,
    columns: Sequence[int],
    value: Any,
) -> None:
    """Writes `value` into `columns` of row `row` of `rows`."""
    cells = [tf.fill([len(columns)], row), tf.constant(columns, tf.int64)]
    indices = tf.stack(cells, 1)
    if strategy.num_replicas_in_sync > 1:
        rows.assign(tf.tensor_scatter_nd_update(rows, indices, value))
        return
    rows.scatter_nd_update(indices, value)


def compiled_step(function: Callable[[Any], None]) -> Callable[[int], None]:
    """`function(step)` compiled once (`tf.function`), called with a Python step
    index (passed as an int64 tensor, so that each step does not trace anew)."""
    compiled = tf.function(function)
    return lambda step: compiled(tf.constant(step, tf.int64))


def entries(gradient: Any) -> Any:
    """The entries of a gradient: a dense tensor, or the values of `tf.IndexedSlices`."""
    return gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient


def dense(value: Any) -> Any:
    """A dense tensor of a gradient (`tf.IndexedSlices` made dense)."""
    if isinstance(value, tf.IndexedSlices):
        return tf.convert_to_tensor(value)
    return value


def host_value(model: keras.Model, variable: tf.Variable) -> np.ndarray:
    """The current value of a state variable, read on the host between steps."""
    return variable.numpy()


def host_assign(model: keras.Model, variable: tf.Variable, value: Any) -> None:
    """Sets a state variable on the host between steps, for the next step to use."""
    variable.assign(value)


def summed_rows(gradient: Any) -> Any:
    """A `tf.IndexedSlices` with the values of repeated rows summed (as the optimizer
    would apply them) and each row named once; a dense gradient as it is."""
    if not isinstance(gradient, tf.IndexedSlices):
        return gradient
    unique, positions = tf.unique(gradient.indices)
    values = tf.math.unsorted_segment_sum(
        gradient.values, positions, tf.shape(unique)[0]
    )
    return tf.IndexedSlices(values, unique, gradient.dense_shape)


def with_entries(gradient: Any, values: Any) -> Any:
    """A gradient of the same structure as `gradient` holding `values`: the
    `tf.IndexedSlices` of `gradient`'s rows, or `values` for a dense gradient."""
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
    return values


def euclidean_norm(value: Any, axis: Sequence[int]) -> tf.Tensor:
    """The L2 norm of `value` over `axis` in one op (`EuclideanNorm`, no squared copy
    of the tensor). XLA has no kernel for it: not for an XLA-compiled step."""
    return tf.math.reduce_euclidean_norm(value, axis=list(axis))


# -- reductions with TensorFlow's own ops (`kgrad.stats` uses them when present) -------
# `tf.nn.l2_loss` is one op where a norm in `keras.ops` takes three, and sparse
# `tf.IndexedSlices` gradients are summed by row without making them dense.

# `safe_norm`'s second scale: 2**-64 keeps the squares of any finite float32 entry
# finite (|x| * 2**-64 <= 1.8e19), and every entry that it sends below float32's
# normal range (|x| < 2) weighs less than 1e-38 of a sum that overflowed unscaled.
_DOWN, _UP = 2.0**-64, 2.0**64
_SQRT2 = float(np.sqrt(2.0))


def _summed(value: tf.Tensor | tf.IndexedSlices) -> tf.Tensor:
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
    value = _summed(value)
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
    value = _summed(value)
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

    `jit_compile` is `kgrad.stats.safe_norms`'s (one formulation measured cheapest
    under both compilers).

    Example:

    >>> safe_norms([tf.constant([3.0, 4.0]), tf.fill([100], 1e20)]).numpy().tolist()
    [5.0, 1.0000000200408773e+21]
    """
    if not values:
        return tf.zeros((0,), tf.float32)
    dense = [_summed(value) for value in values]
    halves = tf.stack([tf.nn.l2_loss(value) for value in dense])
    return tf.cond(
        tf.reduce_all(tf.math.is_finite(halves)),
        lambda: _SQRT2 * tf.sqrt(halves),
        lambda: tf.stack([safe_norm(value) for value in dense]),
    )


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
    wide = tf.cast(_summed(value), tf.float64)
    return tf.cast(tf.sqrt(2.0 * tf.nn.l2_loss(wide)), tf.float32)


# -- gradients of a probe loss, and what the layers output on the way ------------------
# (`diagnose`, `probe_gradients`, the logger's probe mode, the monitor's unit probes.)
# Each backend module has these functions under the same names: a forward pass and a
# loss are written once with Keras calls; how they are differentiated, and how the
# weights at the current step are read, is the backend's.


def probe_gradients(
    model: keras.Model,
    function: Callable[[], tuple[Any, Any]],
    variables: Sequence[Any],
    recorder: Any = None,
) -> tuple[Any, Any, list[Any], list[list[tuple[Any, Any, Any]]]]:
    """Runs `function()` under a `tf.GradientTape` and differentiates its loss.

    Args:
        model: The model whose weights `function` reads (the current ones here).
        function: `function() -> (loss, aux)`: Keras calls (a forward pass, a loss)
            returning a scalar and anything else to keep (`aux`).
        variables: The variables to differentiate with respect to.
        recorder: A `kgrad.diagnosis.graph.CallRecorder` of the layers whose outputs
            (in every call) are differentiated too, or `None`. Defaults to `None`.

    Returns:
        `(loss, aux, gradients, calls)`: the gradients are aligned with `variables`
        (`None` for one the loss does not depend on); `calls` holds, per recorded
        layer, one `(input, output, output_gradient)` per call.
    """
    recording = contextlib.nullcontext([]) if recorder is None else recorder.recording()
    with tf.GradientTape() as tape, recording as calls:
        loss, aux = function()
    outputs = [output for made in calls for _, output in made]
    gradients = tape.gradient(loss, list(variables) + outputs)
    output_gradients = iter(gradients[len(variables) :])
    paired = [
        [(given, output, next(output_gradients)) for given, output in made]
        for made in calls
    ]
    return loss, aux, list(gradients[: len(variables)]), paired


def gradient_function(
    model: keras.Model, loss: Callable[[], Any], variables: Sequence[Any]
) -> Callable[[], tuple[Any, list[Any]]]:
    """`() -> (loss, gradients)` at the current weights, for repeated probes.

    Traced inside the function of `compiled_probe_step` with the rest of the probe.
    """
    variables = list(variables)

    def gradients() -> tuple[Any, list[Any]]:
        with tf.GradientTape() as tape:
            value = loss()
        return value, tape.gradient(value, variables)

    return gradients


def compiled_probe_step(
    model: keras.Model, function: Callable[[Any], None]
) -> Callable[[int], None]:
    """`function(step)`, a probe that reads the model's weights and writes state
    variables, compiled once (see `compiled_step`)."""
    return compiled_step(function)


@contextlib.contextmanager
def plain_function_calls() -> Iterator[None]:
    """Runs the `tf.function` calls made in this block, on this thread, without
    Grappler's graph rewrites.

    On a 20-layer MLP the rewrites took ~60 of the ~90 ms of the unit probe's first
    run (after its trace; measured), for no measurable gain per call: the probe is a
    forward pass and a few reductions. The setting is part of the key under which
    TensorFlow keeps an instantiated function, so every call of one function must use
    it alike. Where TensorFlow's internals differ, calls run as usual.
    """
    try:
        context = eager_context.context()
        options = context.function_call_options
        config = config_pb2.ConfigProto.FromString(options.config_proto_serialized)
        config.graph_options.rewrite_options.disable_meta_optimizer = True
        plain = eager_context.FunctionCallOptions(options.executor_type, config)
    except (AttributeError, TypeError, ValueError):
        yield
        return
    context.function_call_options = plain
    try:
        yield
    finally:
        context.function_call_options = options


def _read_float32(variable: Any) -> tf.Tensor:
    """The value of `variable` as float32, in as few traced ops as possible.

    A raw read: the public conversions add reads and identities, and every op traced
    lengthens the probe's one-off trace (each op costs ~0.1 ms to trace, the weight
    movement has six per variable). Mirrored variables take the public path.
    """
    if isinstance(variable, BaseResourceVariable):
        value = tf.raw_ops.ReadVariableOp(resource=variable.handle, dtype=variable.dtype)
    else:
        value = tf.convert_to_tensor(variable)
    return value if value.dtype == tf.float32 else tf.cast(value, tf.float32)


class UnitStatistics:
    """The monitor's unit probe compiled once: `forward(x)` and how far the weights
    moved since the previous call.

    The weights at the previous probe stay on the device, one copy per variable: the
    movement is a subtraction and two `L2Loss` per variable, computed in the same call
    as the forward pass, where they fill the gaps between its layers. (One flat copy
    would take fewer ops to trace but costs more per probe: a concatenation of every
    weight and segment sums over them. Host copies take nothing to trace but cost
    ~0.6 ms more per probe, 1–2% per step at one probe every 50 steps: measured.)
    Compiled at the first call: eager probes cost ~35 ms each on a 20-layer MLP, a
    compiled one ~2 ms.

    Args:
        model: The model being trained.
        forward: `forward(x) -> tuple` of tensors, in Keras calls.
        variables: The variables whose movement is measured.
        segments: The segment (layer) of each variable, in order.
    """

    def __init__(
        self,
        model: keras.Model,
        forward: Callable[[Any], tuple],
        variables: Sequence[Any],
        segments: Sequence[int],
    ):
        self._forward = forward
        self._variables = list(variables)
        self._segments = list(segments)
        self._previous = [
            tf.Variable(tf.cast(variable.value, tf.float32), trainable=False)
            for variable in self._variables
        ]
        self._copies = {
            id(variable): copy for variable, copy in zip(self._variables, self._previous)
        }
        self._measure = tf.function(self._statistics, autograph=False)

    def _statistics(self, x: Any) -> tuple[Any, tf.Tensor, tf.Tensor]:
        results = self._forward(x)
        delta_halves, weight_halves = [], []
        for variable, previous in zip(self._variables, self._previous):
            weight = _read_float32(variable.value)
            delta_halves.append(tf.raw_ops.L2Loss(t=weight - _read_float32(previous)))
            weight_halves.append(tf.raw_ops.L2Loss(t=weight))
            # After the reads above: ops on one resource keep their traced order.
            tf.raw_ops.AssignVariableOp(resource=previous.handle, value=weight)
        if not delta_halves:
            return results, tf.zeros([0]), tf.zeros([0])
        delta_norms, weight_norms = (
            tf.sqrt(2.0 * tf.math.segment_sum(tf.stack(halves), self._segments))
            for halves in (delta_halves, weight_halves)
        )
        return results, delta_norms, weight_norms

    def reset(self) -> None:
        """The weights now become the previous ones (a new `fit()`); nothing is
        traced again."""
        for variable, previous in zip(self._variables, self._previous):
            previous.assign(tf.cast(variable.value, tf.float32))

    def __call__(self, x: Any) -> tuple[Any, tf.Tensor, tf.Tensor]:
        """`(forward(x), ‖w − w_prev‖ per segment, ‖w‖ per segment)`."""
        with plain_function_calls():
            return self._measure(x)

    def previous(self, variable: Any) -> np.ndarray:
        """The value of `variable` at the last probe (its current value if untracked)."""
        return np.asarray(self._copies.get(id(variable), variable))


def summary() -> Any:
    """`tf.summary`: TensorBoard's event files are written by TensorFlow on every Keras
    backend, as Keras's own `TensorBoard` callback does (the TensorBoard sink imports
    this module on first use only)."""
    return tf.summary
