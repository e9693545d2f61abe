"""The step hook's backend operations on TensorFlow (`tf.Variable`, `tf.distribute`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

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
