"""The step hook's backend operations on JAX.

Keras's JAX trainer is stateless: its jitted step takes every variable's value as an
argument and returns the new values (`optimizer.stateless_apply` calls the optimizer's
`apply` inside a `StatelessScope`). State that the hook writes in the step must
therefore be optimizer variables (`optimizer.add_variable`): they travel in the step's
returned state and are written back at each epoch's end (`jax_state_sync`). The hook
tracks them while it is installed and untracks them when the last participant leaves,
so that saved models and checkpoints outside `fit` are unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

INDEX_DTYPE = "int32"  # JAX without x64 has no int64
# JAX's step state is fixed when `fit` takes it at the first batch: the hook's
# variables must exist by `on_train_begin`.
STATE_BEFORE_STEP = True
# Whether the traced step may write state variables inside a branch (`when`).
BRANCH_WRITES = False


class SingleDevice:
    """The strategy stand-in of a model trained without a `tf.distribute` strategy."""

    num_replicas_in_sync = 1

    def scope(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def strategy(model: keras.Model) -> SingleDevice:
    """A single-device stand-in (a `keras.distribution` sums gradients in the step)."""
    return SingleDevice()


def new_train_function(model: keras.Model) -> Any:
    """A train function that is traced anew, apart from every other.

    `jax.jit` keeps its traces by function and argument structure, and Keras jits the
    bound method `model.train_step`, equal for every train function of the model: a
    second function with the same state structure would reuse the first one's trace
    (and its participants). Each gets a function object of its own instead.
    """
    step = type(model).train_step

    def train_step(state: Any, data: Any) -> Any:
        return step(model, state, data)

    vars(model)["train_step"] = train_step
    try:
        model.make_train_function(force=True)
    finally:
        del vars(model)["train_step"]
    return model.train_function


def make_variable(
    strategy: Any,
    optimizer: keras.optimizers.Optimizer,
    initial_value: Any,
    dtype: Any,
    name: str,
) -> keras.Variable:
    """An optimizer variable of `optimizer` that its (stateless) `apply` may write."""
    value = np.asarray(initial_value, dtype=keras.backend.standardize_dtype(dtype))
    variable = optimizer.add_variable(
        value.shape, initializer="zeros", dtype=value.dtype.name, name=name
    )
    variable.assign(value)
    return variable


def _tracked(optimizer: keras.optimizers.Optimizer) -> list[keras.Variable]:
    return optimizer._variables


def track(optimizer: keras.optimizers.Optimizer, variables: Sequence[keras.Variable]) -> None:
    """Makes `variables` part of the optimizer's state (idempotent)."""
    present = {id(v) for v in _tracked(optimizer)}
    for variable in variables:
        if id(variable) not in present:
            optimizer._track_variable(variable)


def untrack(optimizer: keras.optimizers.Optimizer, variables: Sequence[keras.Variable]) -> None:
    """Removes `variables` from the optimizer's state (saved files stay unchanged)."""
    ours = {id(v) for v in variables}
    for variable in [v for v in _tracked(optimizer) if id(v) in ours]:
        optimizer._untrack_variable(variable)


def read(variable: keras.Variable) -> Any:
    """The value of a state variable inside the step (the stateless scope's value)."""
    return variable.value


def increment(variable: keras.Variable, amount: Any = 1) -> None:
    variable.assign(variable.value + ops.cast(amount, variable.dtype))


def when(strategy: Any, condition: Any, function: Callable[[], None]) -> None:
    """Runs `function` always: writes in a traced branch would leak from the stateless
    scope. Callers make the writes of other steps harmless (a scratch row)."""
    function()


def scale_gradient(gradient: Any, factor: Any) -> Any:
    """Multiplies a gradient by `factor`; `None` stays `None`."""
    if gradient is None:
        return None
    return gradient * ops.cast(factor, gradient.dtype)


def aggregate(strategy: Any, gradients: list[Any]) -> list[Any]:
    """The gradients as they are: under `keras.distribution` the jitted step's
    gradients are already those of the global batch."""
    return gradients


def write_row(strategy: Any, rows: keras.Variable, row: Any, value: Any) -> None:
    """Writes `value` into row `row` of `rows` (an in-place dynamic update under jit)."""
    start = (ops.cast(row, "int32"), 0)
    rows.assign(ops.slice_update(rows.value, start, ops.expand_dims(value, 0)))


def write_cells(
    strategy: Any, rows: keras.Variable, row: Any, columns: Sequence[int], value: Any
) -> None:
    """Writes `value` into `columns` of row `row` of `rows`."""
    current = ops.take(rows.value, ops.cast(row, "int32"), axis=0)
    updated = ops.scatter_update(
        current, np.asarray(columns, np.int32)[:, None], value
    )
    write_row(strategy, rows, row, updated)


def entries(gradient: Any) -> Any:
    """The entries of a gradient (JAX's are dense)."""
    return gradient


def dense(value: Any) -> Any:
    return value


def host_value(model: keras.Model, variable: keras.Variable) -> np.ndarray:
    """The current value of a state variable, read on the host between steps.

    In the middle of an epoch JAX's variables hold the values of the epoch's start
    (the trainer writes its state back at epoch ends only): the value is taken from
    the state the last step returned (`model._jax_state`) without writing the whole
    state back. Called from batch hooks that are not async-safe (the main thread),
    before the next step donates that state.
    """
    state = getattr(model, "_jax_state", None)
    optimizer = getattr(model, "optimizer", None)
    if state and optimizer is not None and not getattr(model, "_jax_state_synced", True):
        position = _position(optimizer, variable)
        if position is not None:
            return np.asarray(state["optimizer_variables"][position])
    return np.asarray(variable.numpy())


# Where each state variable sits in its optimizer's variables (checked at each use):
# `host_value` runs once per step, and the variables do not move during a `fit`.
_POSITIONS: dict[int, int] = {}


def _position(optimizer: keras.optimizers.Optimizer, variable: keras.Variable) -> int | None:
    tracked = _tracked(optimizer)
    position = _POSITIONS.get(id(variable))
    if position is None or position >= len(tracked) or tracked[position] is not variable:
        position = next((i for i, v in enumerate(tracked) if v is variable), None)
        if position is None:
            return None
        _POSITIONS[id(variable)] = position
    return position


def host_assign(model: keras.Model, variable: keras.Variable, value: Any) -> None:
    """Sets a state variable on the host between steps, for the next step to use.

    In the middle of an epoch the steps pass their state to each other
    (`model._jax_state`) and the trainer writes it into the variables only at the
    epoch's end, which would overwrite a plain `assign`: the state is written back
    first (`jax_state_sync`), which also makes the next step take its state from the
    variables again. Called from the main thread (not from an async-safe batch hook).
    """
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()
    variable.assign(value)


def summed_rows(gradient: Any) -> Any:
    """A gradient with repeated sparse rows summed: JAX's gradients are dense."""
    return gradient


def with_entries(gradient: Any, values: Any) -> Any:
    """A gradient of the same structure as `gradient` holding `values` (dense here)."""
    return values


def euclidean_norm(value: Any, axis: Sequence[int]) -> Any:
    """The L2 norm of `value` over `axis` (XLA fuses the squares into the sum)."""
    return ops.sqrt(ops.sum(ops.square(value), axis=tuple(axis)))
