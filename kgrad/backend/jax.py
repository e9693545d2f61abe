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

import jax
import jax.numpy as jnp
import keras
import numpy as np
from keras import ops

from kgrad.backend.single_device import SingleDevice

INDEX_DTYPE = "int32"  # JAX without x64 has no int64
# JAX's step state is fixed when `fit` takes it at the first batch: the hook's
# variables must exist by `on_train_begin`.
STATE_BEFORE_STEP = True
# Whether the traced step may write state variables inside a branch (`when`).
BRANCH_WRITES = False



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


def weight_values(variables: Sequence[keras.Variable]) -> list[Any]:
    """The values of the model's Keras variables inside the step (the stateless
    scope's values)."""
    return [variable.value for variable in variables]


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
    # The state holds `optimizer.variables`: with a `LossScaleOptimizer`'s inner
    # optimizer, or other optimizers whose state a custom step carries, past its own.
    tracked = optimizer.variables
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


# -- gradients of a probe loss, and what the layers output on the way ------------------
# (`diagnose`, `probe_gradients`, the logger's probe mode, the monitor's unit probes.)
# The same functions as in `kgrad.backend.tensorflow`. Keras calls run inside a
# `StatelessScope` that maps every variable of the model to a value (a traced one for
# those differentiated), as `model.stateless_call` does, and `jax.grad` differentiates
# the function of those values. A layer output is differentiated by adding a zero
# array to it in the forward pass (an argument of the differentiated function) and
# taking the gradient with respect to that array.


class _Scope(keras.StatelessScope):
    """A `StatelessScope` that notes which variables were read and which assigned."""

    def __init__(self, mapping: Sequence[tuple[keras.Variable, Any]]):
        super().__init__(state_mapping=mapping, collect_losses=True)
        self.read: set[int] = set()
        self.assigned: dict[int, keras.Variable] = {}

    def get_current_value(self, variable: keras.Variable) -> Any:
        self.read.add(id(variable))
        return super().get_current_value(variable)

    def add_update(self, update: tuple[keras.Variable, Any]) -> None:
        self.assigned[id(update[0])] = update[0]
        super().add_update(update)


# The parts of the trainer's state that hold the model's own variables.
_STATE_KEYS = ("trainable_variables", "non_trainable_variables", "metrics_variables")


def _model_state(model: keras.Model) -> tuple[list[keras.Variable], list[Any]]:
    """Every variable of the model and its value at the current step.

    In the middle of an epoch the values are those of the state the last step
    returned (`model._jax_state`): the variables hold none then (the trainer purges
    them until the epoch ends). Read on the main thread, before the next step
    donates that state.
    """
    state = getattr(model, "_jax_state", None)
    live = bool(state) and not getattr(model, "_jax_state_synced", True)
    variables, values = [], []
    for key in _STATE_KEYS:
        held = list(getattr(model, key, None) or [])
        current = (state.get(key) if live else None) or [v.value for v in held]
        variables += held
        values += list(current)
    return variables, values


def _mapping(
    model: keras.Model, variables: Sequence[keras.Variable]
) -> tuple[list[Any], list[keras.Variable], list[Any]]:
    """The current values of `variables`, and every other variable of the model with
    its current value."""
    held, values = _model_state(model)
    current = {id(v): value for v, value in zip(held, values)}
    ours = {id(v) for v in variables}
    first = [current.get(id(v), v.value) for v in variables]
    others = [(v, value) for v, value in zip(held, values) if id(v) not in ours]
    return first, [v for v, _ in others], [value for _, value in others]


def probe_gradients(
    model: keras.Model,
    function: Callable[[], tuple[Any, Any]],
    variables: Sequence[keras.Variable],
    recorder: Any = None,
) -> tuple[Any, Any, list[Any], list[list[tuple[Any, Any, Any]]]]:
    """Runs `function()` at the model's current weights and differentiates its loss.

    The same contract as `kgrad.backend.tensorflow.probe_gradients`. With a
    `recorder`, the output shapes of the recorded calls are found first
    (`jax.eval_shape`, no computation), then one `jax.value_and_grad` pass gives the
    gradients with respect to the variables and to a zero added to each output.
    Non-trainable updates (batch-norm statistics) are not kept. A variable that
    `function` does not read gets `None`, as on TensorFlow.
    """
    variables = list(variables)
    values, others, other_values = _mapping(model, variables)
    shapes: dict[tuple[int, int], jax.ShapeDtypeStruct] = {}
    read: set[int] = set()

    def run(values: list[Any], perturbations: dict | None) -> tuple[Any, Any]:
        def transform(slot: int, index: int, output: Any) -> Any:
            if perturbations is None:
                shapes[(slot, index)] = jax.ShapeDtypeStruct(output.shape, output.dtype)
                return output
            zero = perturbations.get((slot, index))
            return output if zero is None else output + zero

        mapping = list(zip(variables, values)) + list(zip(others, other_values))
        recording = (
            contextlib.nullcontext([])
            if recorder is None
            else recorder.recording(transform)
        )
        with _Scope(mapping) as scope, recording as calls:
            loss, aux = function()
        read.update(scope.read)
        return loss, (aux, calls)

    perturbations: dict = {}
    if recorder is not None:
        jax.eval_shape(lambda v: run(v, None), values)
        perturbations = {
            key: jnp.zeros(shape.shape, shape.dtype) for key, shape in shapes.items()
        }
    read.clear()
    (loss, (aux, calls)), (gradients, output_gradients) = jax.value_and_grad(
        run, argnums=(0, 1), has_aux=True
    )(values, perturbations)
    gradients = [
        gradient if id(v) in read else None for v, gradient in zip(variables, gradients)
    ]
    paired = [
        [
            (given, output, output_gradients.get((slot, index)))
            for index, (given, output) in enumerate(made)
        ]
        for slot, made in enumerate(calls)
    ]
    return loss, aux, gradients, paired


def gradient_function(
    model: keras.Model, loss: Callable[[], Any], variables: Sequence[keras.Variable]
) -> Callable[[], tuple[Any, list[Any]]]:
    """`() -> (loss, gradients)` at the current weights, compiled once (`jax.jit`).

    Each call reads the values of the current step (`model._jax_state` in the middle
    of an epoch); a variable that `loss` does not read gets `None`.
    """
    variables = list(variables)
    read: set[int] = set()

    def pure(values: list[Any], others: list[keras.Variable], other_values: list[Any]):
        mapping = list(zip(variables, values)) + list(zip(others, other_values))
        with _Scope(mapping) as scope:
            value = loss()
        read.update(scope.read)
        return value

    compiled: dict[tuple[int, ...], Callable] = {}

    def gradients() -> tuple[Any, list[Any]]:
        values, others, other_values = _mapping(model, variables)
        key = tuple(id(v) for v in others)
        if key not in compiled:
            compiled[key] = jax.jit(
                jax.value_and_grad(lambda v, o: pure(v, others, o))
            )
        value, grads = compiled[key](values, other_values)
        return value, [g if id(v) in read else None for v, g in zip(variables, grads)]

    return gradients


def compiled_probe_step(
    model: keras.Model, function: Callable[[Any], None]
) -> Callable[[int], None]:
    """`function(step)`, a probe that reads the model's weights and writes state
    variables (a norm buffer that is no part of the training step's state).

    Runs at the current step's weights (a `StatelessScope` over the model's
    variables); the writes to other variables are applied afterwards. The heavy part,
    the gradients, is compiled on its own (`gradient_function`); the writes are a few
    small operations.
    """

    def run(step: int) -> None:
        held, values = _model_state(model)
        with _Scope(list(zip(held, values))) as scope:
            function(step)
        ours = {id(v) for v in held}
        written = [v for key, v in scope.assigned.items() if key not in ours]
        updates = [scope.get_current_value(v) for v in written]
        for variable, value in zip(written, updates):
            variable.assign(value)

    return run


class UnitStatistics:
    """The monitor's unit probe compiled once (`jax.jit`): `forward(x)` and how far
    the weights moved since the previous call.

    The weights of the previous call are kept as arrays (copies: the training step
    donates the state they come from). The same contract as
    `kgrad.backend.tensorflow.UnitStatistics`.

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
        variables: Sequence[keras.Variable],
        segments: Sequence[int],
    ):
        self._model = model
        self._variables = list(variables)
        self.reset()
        segments = np.asarray(segments, np.int32)
        count = int(segments.max()) + 1 if segments.size else 0
        watched = self._variables

        def statistics(held, values, previous, x):
            with _Scope(list(zip(held, values))):
                results = forward(x)
                weights = [jnp.asarray(v.value, jnp.float32) for v in watched]
            if not weights:
                return results, jnp.zeros([0]), jnp.zeros([0]), []
            deltas = jnp.stack([jnp.sum(jnp.square(w - p)) for w, p in zip(weights, previous)])
            squares = jnp.stack([jnp.sum(jnp.square(w)) for w in weights])
            norms = [
                jnp.sqrt(jax.ops.segment_sum(s, segments, count)) for s in (deltas, squares)
            ]
            return results, norms[0], norms[1], [jnp.copy(w) for w in weights]

        self._compiled: dict[tuple[int, ...], Callable] = {}
        self._statistics = statistics

    def reset(self) -> None:
        """The weights now become the previous ones (a new `fit()`); nothing is
        traced again."""
        self._previous = [
            jnp.array(v.value, dtype=jnp.float32, copy=True) for v in self._variables
        ]

    def __call__(self, x: Any) -> tuple[Any, Any, Any]:
        """`(forward(x), ‖w − w_prev‖ per segment, ‖w‖ per segment)`."""
        held, values = _model_state(self._model)
        key = tuple(id(v) for v in held)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(
                lambda v, p, inputs: self._statistics(held, v, p, inputs)
            )
        results, deltas, weights, self._previous = self._compiled[key](
            values, self._previous, x
        )
        return results, deltas, weights

    def previous(self, variable: keras.Variable) -> np.ndarray:
        """The value of `variable` at the last probe (its current value if untracked)."""
        for watched, value in zip(self._variables, self._previous):
            if watched is variable:
                return np.asarray(value)
        held, values = _model_state(self._model)
        for candidate, value in zip(held, values):
            if candidate is variable:
                return np.asarray(value)
        return np.asarray(variable.value)
