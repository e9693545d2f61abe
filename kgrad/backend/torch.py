"""The step hook's backend operations on PyTorch.

Keras's torch trainer is stateful and eager: `train_step` calls `loss.backward()`,
collects `v.value.grad` and calls `optimizer.apply` under `torch.no_grad()`, in
Python at every step, or inside `torch.compile` with `jit_compile=True`. The hook's
state variables are plain Keras variables written in place (no optimizer state to
travel in, as on JAX), made before the first step so that a compiled step finds them.

Two things cost a step dearly on torch and are avoided here: a Python read of a
tensor (`if tensor:`, `.item()`), a host sync per step on an accelerator and a graph
break under `torch.compile`, so nothing here branches on a value; and a functional
row update (`ops.slice_update` with a tensor index clones the whole buffer), so rows
are written in place (`index_copy_`, `index_put_`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import torch

from kgrad.backend.single_device import SingleDevice

INDEX_DTYPE = "int64"
# The step's variables are made before it runs: a `torch.compile`d step that made
# them would break its graph there.
STATE_BEFORE_STEP = True
# Writes inside `when` are plain in-place writes (`when` runs them in every step).
BRANCH_WRITES = True



def strategy(model: keras.Model) -> SingleDevice:
    """A single-device stand-in (Keras has no multi-device trainer on torch)."""
    return SingleDevice()


def new_train_function(model: keras.Model) -> Any:
    """A train function made anew (`torch.compile` of a new closure with
    `jit_compile=True`: dynamo guards on what the hook reads, so each set of
    participants gets its own graph)."""
    model.make_train_function(force=True)
    return model.train_function


def make_variable(
    strategy: Any,
    optimizer: keras.optimizers.Optimizer,
    initial_value: Any,
    dtype: Any,
    name: str,
) -> keras.Variable:
    """A non-trainable Keras variable that the step writes in place.

    `optimizer` is unused: the eager (or compiled) step writes any tensor, and a
    variable outside the optimizer leaves its saved state unchanged.
    """
    del strategy, optimizer
    value = np.asarray(initial_value, dtype=keras.backend.standardize_dtype(dtype))
    return keras.Variable(value, dtype=value.dtype.name, trainable=False, name=name)


def track(optimizer: keras.optimizers.Optimizer, variables: Sequence[Any]) -> None:
    """Nothing to do on torch: the step writes variables it does not return."""


def untrack(optimizer: keras.optimizers.Optimizer, variables: Sequence[Any]) -> None:
    """Nothing to do on torch (see `track`)."""


def read(variable: keras.Variable) -> torch.Tensor:
    """The tensor of a state variable inside the step."""
    return variable.value


def weight_values(variables: Sequence[keras.Variable]) -> list[torch.Tensor]:
    """The tensors of the model's Keras variables inside the step: the parameters
    themselves (`Variable.value` asks for the device and scopes at every call, ~1.5
    us a variable; no autocast scope is open where the optimizer runs)."""
    return [variable._value for variable in variables]


def increment(variable: keras.Variable, amount: Any = 1) -> None:
    """Adds `amount` in place (no new tensor, no host read)."""
    variable.value.add_(amount)


def when(strategy: Any, condition: Any, function: Callable[[], None]) -> None:
    """Runs `function` in every step, with no branch: a branch on a tensor's value
    reads it on the host (a device sync per step on an accelerator, a graph break
    under `torch.compile`). Callers make the writes of other steps harmless (a
    scratch row)."""
    function()


def scale_gradient(gradient: Any, factor: Any) -> Any:
    """Multiplies a gradient by `factor`; `None` stays `None`."""
    if gradient is None:
        return None
    return gradient * factor


def aggregate(strategy: Any, gradients: list[Any]) -> list[Any]:
    """The gradients as they are (one device)."""
    return gradients


def write_row(strategy: Any, rows: keras.Variable, row: Any, value: Any) -> None:
    """Writes `value` into row `row` of `rows` in place (`index_copy_`: the row only,
    where `ops.slice_update` with a tensor index clones the whole buffer)."""
    buffer = rows.value
    index = torch.as_tensor(row, dtype=torch.int64, device=buffer.device).reshape(1)
    buffer.index_copy_(0, index, value.reshape(1, -1).to(buffer.dtype))


def write_cells(
    strategy: Any, rows: keras.Variable, row: Any, columns: Sequence[int], value: Any
) -> None:
    """Writes `value` into `columns` of row `row` of `rows` in place."""
    buffer = rows.value
    index = torch.as_tensor(row, dtype=torch.int64, device=buffer.device)
    cells = torch.as_tensor(list(columns), dtype=torch.int64, device=buffer.device)
    buffer.index_put_((index.expand(cells.shape[0]), cells), value.to(buffer.dtype))


def entries(gradient: Any) -> Any:
    """The entries of a gradient (torch's are dense)."""
    return gradient


def dense(value: Any) -> Any:
    return value


def summed_rows(gradient: Any) -> Any:
    """A gradient with repeated sparse rows summed: torch's gradients are dense."""
    return gradient


def with_entries(gradient: Any, values: Any) -> Any:
    """A gradient of the same structure as `gradient` holding `values` (dense here)."""
    return values


def euclidean_norm(value: Any, axis: Sequence[int]) -> Any:
    """The L2 norm of `value` over `axis` (one reduction)."""
    return torch.linalg.vector_norm(value, dim=tuple(axis))


def host_value(model: keras.Model, variable: keras.Variable) -> np.ndarray:
    """The current value of a state variable, read on the host between steps (the
    eager step writes its variables as it goes)."""
    return variable.value.detach().cpu().numpy()


def host_assign(model: keras.Model, variable: keras.Variable, value: Any) -> None:
    """Sets a state variable on the host between steps, for the next step to use."""
    variable.assign(value)


# -- reductions with torch's own ops (`kgrad.stats` uses them when present) ----------


def safe_norms(values: Sequence[Any], *, jit_compile: bool = False) -> torch.Tensor:
    """L2 norms of several tensors, finite whenever float32 can represent them.

    `torch._foreach_norm` takes every norm in one call (as
    `torch.nn.utils.clip_grad_norm_` does), its squares summed in float64: the
    squares of float32 entries cannot overflow there, so there is no second pass
    and no branch, and nothing is read on the host (the step never waits for the
    device, and `torch.compile` keeps one graph). The result is `inf` only for a
    norm beyond float32's range, or inf entries; NaN for NaN entries. Measured on
    this CPU, the float64 sums cost about twice the float32 ones and less than a
    second, scaled pass. `jit_compile` is `kgrad.stats.safe_norms`'s (unused).

    Example:

    >>> safe_norms([torch.tensor([3.0, 4.0]), torch.full((100,), 1e20)]).tolist()
    [5.0, 1.0000000200408773e+21]
    """
    del jit_compile
    if not values:
        return torch.zeros((0,), dtype=torch.float32)
    return _wide_norms(values).float()


def _wide_norms(values: Sequence[Any]) -> torch.Tensor:
    """The norms of `values` with float64 sums of squares, one call for all."""
    return torch.stack(torch._foreach_norm(list(values), 2, dtype=torch.float64))


def all_finite(values: Sequence[Any]) -> torch.Tensor:
    """Whether every entry of every tensor is finite, as a scalar bool tensor.

    One `torch._foreach_norm` with float64 sums for all: the norm is finite exactly
    when the entries are (no float32 entry's square overflows float64), with no
    branch and no host read.
    """
    if not values:
        return torch.tensor(True)
    return torch.isfinite(_wide_norms(values)).all()


# -- gradients of a probe loss, and what the layers output on the way ------------------
# (`diagnose`, `probe_gradients`, the logger's probe mode, the monitor's unit probes.)
# The same functions as in `kgrad.backend.tensorflow` and `kgrad.backend.jax`. The
# forward pass runs eagerly inside a `StatelessScope` that maps each differentiated
# variable to a leaf tensor sharing its storage (`detach()`, no copy) that requires
# grad, and `torch.autograd.grad` differentiates the loss with respect to those leaves
# (nothing accumulates in the parameters' `.grad`). The scope also keeps the forward
# pass's assignments (batch-norm statistics) from the model, as on JAX. Everything
# returned is detached: a tensor that requires grad cannot be read with `.numpy()`.


def _leaves(variables: Sequence[keras.Variable]) -> list[torch.Tensor]:
    """A leaf tensor per variable, on the variable's storage, that requires grad
    (an integer variable's cannot: it gets no gradient)."""
    leaves = []
    for variable in variables:
        leaf = variable.value.detach()
        if leaf.is_floating_point() or leaf.is_complex():
            leaf.requires_grad_(True)
        leaves.append(leaf)
    return leaves


def _detached(value: Any) -> Any:
    """`value` (a tensor or a nest of them) with every tensor detached."""
    return keras.tree.map_structure(
        lambda item: item.detach() if isinstance(item, torch.Tensor) else item, value
    )


def _gradients(loss: torch.Tensor, targets: Sequence[torch.Tensor]) -> list[Any]:
    """`d loss / d target` for each target; `None` for one that requires no grad or
    that the loss does not depend on."""
    differentiable = [i for i, target in enumerate(targets) if target.requires_grad]
    found: list[Any] = [None] * len(targets)
    if differentiable and loss.requires_grad:
        grads = torch.autograd.grad(
            loss, [targets[i] for i in differentiable], allow_unused=True
        )
        for index, gradient in zip(differentiable, grads):
            found[index] = gradient
    return found


def _differentiable(slot: int, index: int, output: Any) -> Any:
    """A recorded layer output that autograd can differentiate the loss with respect
    to: as it is where it depends on a differentiated leaf, else a leaf of its own
    (the output of a layer with no weights upstream, or of an integer input)."""
    if (
        isinstance(output, torch.Tensor)
        and not output.requires_grad
        and output.is_floating_point()
    ):
        return output.detach().requires_grad_(True)
    return output


def probe_gradients(
    model: keras.Model,
    function: Callable[[], tuple[Any, Any]],
    variables: Sequence[keras.Variable],
    recorder: Any = None,
) -> tuple[Any, Any, list[Any], list[list[tuple[Any, Any, Any]]]]:
    """Runs `function()` at the model's current weights and differentiates its loss.

    The same contract as `kgrad.backend.tensorflow.probe_gradients`: one eager
    forward pass and one `torch.autograd.grad` with respect to the variables and to
    each recorded layer output. Non-trainable updates (batch-norm statistics) are
    not kept, as on JAX. A variable that `function` does not read gets `None`.
    """
    variables = list(variables)
    leaves = _leaves(variables)
    recording = (
        contextlib.nullcontext([])
        if recorder is None
        else recorder.recording(_differentiable)
    )
    with torch.enable_grad(), keras.StatelessScope(
        list(zip(variables, leaves))
    ), recording as calls:
        loss, aux = function()
    outputs = [output for made in calls for _, output in made]
    found = _gradients(loss, leaves + outputs)
    output_gradients = iter(found[len(leaves) :])
    paired = [
        [
            (_detached(given), _detached(output), next(output_gradients))
            for given, output in made
        ]
        for made in calls
    ]
    return loss.detach(), _detached(aux), found[: len(leaves)], paired


def gradient_function(
    model: keras.Model, loss: Callable[[], Any], variables: Sequence[keras.Variable]
) -> Callable[[], tuple[Any, list[Any]]]:
    """`() -> (loss, gradients)` at the current weights, for repeated probes.

    Eager (a probe runs between steps, where the weights are the parameters
    themselves); a variable that `loss` does not read gets `None`.
    """
    variables = list(variables)

    def gradients() -> tuple[Any, list[Any]]:
        leaves = _leaves(variables)
        with torch.enable_grad(), keras.StatelessScope(list(zip(variables, leaves))):
            value = loss()
        return value.detach(), _gradients(value, leaves)

    return gradients


def compiled_probe_step(
    model: keras.Model, function: Callable[[Any], None]
) -> Callable[[int], None]:
    """`function(step)`, a probe that reads the model's weights and writes state
    variables, run eagerly and outside autograd (its writes are in place, as the
    step's; `gradient_function` turns autograd on for its own pass)."""

    def run(step: int) -> None:
        with torch.no_grad():
            function(step)

    return run


class UnitStatistics:
    """The monitor's unit probe: `forward(x)` and how far the weights moved since the
    previous call, eagerly and outside autograd.

    The weights at the previous probe are kept as float32 copies on the device; the
    movement and the weight norms take one `torch._foreach_norm` each over every
    watched variable, summed per segment with one `index_add_`. The same contract
    as `kgrad.backend.tensorflow.UnitStatistics`, with the same arguments.
    """

    def __init__(
        self,
        model: keras.Model,
        forward: Callable[[Any], tuple],
        variables: Sequence[keras.Variable],
        segments: Sequence[int],
    ):
        self._forward = forward
        self._variables = list(variables)
        self.reset()
        self._count = max(segments) + 1 if len(segments) else 0
        device = self._previous[0].device if self._previous else None
        self._segments = torch.as_tensor(list(segments), dtype=torch.int64, device=device)

    @staticmethod
    def _float32(variable: keras.Variable) -> torch.Tensor:
        value = variable.value.detach()
        return value if value.dtype == torch.float32 else value.float()

    def reset(self) -> None:
        """The weights now become the previous ones (a new `fit()`)."""
        self._previous = [self._float32(v).clone() for v in self._variables]

    def _per_segment(self, norms: list[torch.Tensor]) -> torch.Tensor:
        squares = torch.stack(norms).square()
        total = torch.zeros(self._count, dtype=torch.float32, device=squares.device)
        return total.index_add_(0, self._segments, squares).sqrt()

    def __call__(self, x: Any) -> tuple[Any, Any, Any]:
        """`(forward(x), ‖w − w_prev‖ per segment, ‖w‖ per segment)`."""
        with torch.no_grad():
            results = self._forward(x)
            if not self._variables:
                return results, torch.zeros([0]), torch.zeros([0])
            weights = [self._float32(v) for v in self._variables]
            deltas = torch._foreach_norm(torch._foreach_sub(weights, self._previous))
            norms = torch._foreach_norm(weights)
            torch._foreach_copy_(self._previous, weights)
            return results, self._per_segment(deltas), self._per_segment(norms)

    def previous(self, variable: keras.Variable) -> np.ndarray:
        """The value of `variable` at the last probe (its current value if untracked)."""
        for watched, value in zip(self._variables, self._previous):
            if watched is variable:
                return value.cpu().numpy()
        return variable.value.detach().cpu().numpy()
