"""A device-side buffer of per-step norms, written in the traced step, read in bulk.

Writing one row per logged step into a preallocated variable keeps the statistics on
the device: the host fetches the whole buffer once per epoch instead of making a round
trip per step per variable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from keras import ops

from kgrad import stats
from kgrad.capture.step_hook import StepContext, StepHook
from kgrad.capture.variables import TrackedVariable, track_variables

# The norm written for a tracked variable that got no gradient: no real norm is
# negative, so the host reads it back as NaN ("no gradient").
_ABSENT = -1.0


def _norms(values: np.ndarray) -> np.ndarray:
    """Stored norms as float64; `_ABSENT` becomes NaN, NaN and inf stay as they are."""
    values = values.astype(np.float64)
    return np.where(values < 0, np.nan, values)


def _global_norms(values: np.ndarray) -> np.ndarray:
    """Per row, the global norm of stored norms (`_ABSENT` entries left out), summed
    in float64: the squares of norms that float32 holds do not overflow there."""
    values = values.astype(np.float64)
    present = np.where(values < 0, 0.0, values)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.sqrt(np.square(present).sum(axis=1))


class NormBuffer:
    """Rows of gradient and weight norms for the logged steps of one epoch.

    Row layout: `[global, clipped_global, grad x V, weight x V, clipped x V]` for the
    `V` tracked variables, each held as a halved squared norm (one `L2Loss` per tensor
    in the step; roots on the host). The two global slots are filled in the step only
    when some variables are not tracked; otherwise the host sums the tracked ones. One
    extra scratch row takes the writes that find the buffer full, and, under a
    distribution strategy (where a write cannot sit in a branch), those of steps that
    are not logged.

    Args:
        hook: The step hook that owns the strategy (for mirrored variables).
        tracked: The variables to record, in depth order.
        capacity: The number of logged steps the buffer holds between fetches.
        every_n_steps: Log steps whose index is a multiple of this.
        histogram_every_n_steps: Also keep a copy of the gradients of tracked
            variables at these steps (for TensorBoard histograms). `None`: never.
        weight_norms: Also compute the weight norms (else NaN). Defaults to `True`.
        optimizer: The name of the optimizer whose calls write the buffer (its state
            on JAX). Defaults to `"optimizer"`.
    """

    def __init__(
        self,
        hook: StepHook,
        tracked: Sequence[TrackedVariable],
        capacity: int,
        every_n_steps: int,
        histogram_every_n_steps: int | None = None,
        weight_norms: bool = True,
        optimizer: str = "optimizer",
    ):
        self.tracked = list(tracked)
        self.weight_norms = weight_norms
        self.capacity = int(capacity)
        self.every_n_steps = int(every_n_steps)
        self.transformed = False
        self.global_on_host = True  # set when the step is traced
        width = 2 + 3 * len(self.tracked)
        index = hook.backend.INDEX_DTYPE
        self._index_dtype = index

        def make(value: Any, dtype: str, name: str) -> Any:
            return hook.make_variable(value, dtype, name, optimizer=optimizer)

        self.rows = make(
            np.zeros((self.capacity + 1, width), np.float32), "float32", "kgrad_rows"
        )
        self.count = make(0, index, "kgrad_count")
        self.histogram_every_n_steps = histogram_every_n_steps
        self.snapshots: list[Any] = []
        self.snapshot_step = None
        if histogram_every_n_steps:
            self.snapshots = [
                make(np.zeros(item.variable.shape, np.float32), "float32", "kgrad_snap")
                for item in self.tracked
            ]
            self.snapshot_step = make(-1, index, "kgrad_snap_step")
        self._hook = hook
        self._last_picks: tuple[tuple, list[int], bool] | None = None

    # -- in the traced step ---------------------------------------------------------

    def _norms(self, context: StepContext, values: list[Any]) -> tuple[Any, Any]:
        """The norms of the tracked `values` as one vector, and the global norm of all.

        One reduction per tensor (`stats.safe_norms`: finite whenever float32 holds
        the norm, with a second pass only in a step whose squares overflow); the
        tracked ones are picked with one gather. A tracked variable with no gradient
        gets `_ABSENT` (read back as NaN); the global norm is `None` when it follows
        from the tracked norms on the host (every variable of the step tracked).
        """
        present = [i for i, value in enumerate(values) if value is not None]
        vector = stats.safe_norms([values[i] for i in present])
        picks, every_one = self._picks(context.variables, present)
        total = None
        if not every_one:
            total = stats.global_norm(vector) if present else ops.zeros((), "float32")
            absent = ops.full((1,), _ABSENT, "float32")
            vector = ops.take(ops.concatenate([vector, absent], 0), np.asarray(picks))
        return total, vector

    def _picks(self, variables: list[Any], present: list[int]) -> tuple[list[int], bool]:
        """Where each tracked variable's norm sits among the norms of the `present`
        gradients (`len(present)`: no gradient), and whether the picks are every norm
        in order. Kept for the last variables seen: an eager step (torch) asks at
        every step with the same ones."""
        key = (tuple(id(variable) for variable in variables), tuple(present))
        if self._last_picks is None or self._last_picks[0] != key:
            position = {id(variable): i for i, variable in enumerate(variables)}
            slot = {index: k for k, index in enumerate(present)}
            picks = [
                slot.get(position.get(id(item.variable)), len(present))
                for item in self.tracked
            ]
            self._last_picks = (key, picks, picks == list(range(len(variables))))
        return self._last_picks[1], self._last_picks[2]

    def _put(self, row: Any, value: Any, columns: Sequence[int] | None = None) -> None:
        """Writes `value` into `row` of the buffer: the whole row or `columns` of it."""
        backend, strategy = self._hook.backend, self._hook.strategy
        if columns is None:
            backend.write_row(strategy, self.rows, row, value)
        else:
            backend.write_cells(strategy, self.rows, row, columns, value)

    def _row(self, logged: Any | None) -> Any:
        """The row of this step: the next free one, or the scratch row when the step
        is not logged (or the buffer is full)."""
        row = ops.minimum(self._hook.read(self.count), self.capacity)
        return row if logged is None else ops.where(logged, row, self.capacity)

    def _weight_norms(self) -> Any:
        variables = [item.variable for item in self.tracked]
        return stats.safe_norms(self._hook.backend.weight_values(variables))

    def write(self, context: StepContext, always: bool = False) -> None:
        """Records the norms of `context` when its step is a logged one.

        Every step logged: the norms are computed and written with no branch (one
        `Pack`, one scatter). Every `n`-th step: the gradient norms and the weight
        norms sit in two separate branches, taken on logged steps only. The weight
        branch depends on nothing but the step, so it runs at the start of the step
        and holds back no weight update (one branch reading the weights and the
        gradients would make every update wait for the last gradient).

        Args:
            context: The step's gradients and variables.
            always: Record whatever the step index (probe mode). Defaults to `False`.
        """
        hook = self._hook
        every_step = always or self.every_n_steps == 1
        # The step index only where something depends on it (an eager step, torch's,
        # pays for every op at every step).
        step = (
            None
            if every_step and not self.snapshots
            else ops.cast(context.step, self._index_dtype)
        )
        logged = None if every_step else ops.equal(step % self.every_n_steps, 0)
        self.transformed = self.transformed or context.applied is not context.gradients
        width = len(self.tracked)

        def gradient_values() -> tuple[Any, Any, Any]:
            total, grads = self._norms(context, context.gradients)
            if context.applied is context.gradients:
                clipped_total, clipped = total, grads
            else:
                clipped_total, clipped = self._norms(context, context.applied)
            self.global_on_host = total is None
            # Slots the host ignores hold a zero.
            if total is None and clipped_total is None:
                return ops.zeros((2,), "float32"), grads, clipped
            zero = ops.zeros((), "float32")
            head = ops.stack(
                [
                    zero if total is None else total,
                    zero if clipped_total is None else clipped_total,
                ]
            )
            return head, grads, clipped

        if every_step:
            head, grads, clipped = gradient_values()
            # Without weight norms, the weight slots (ignored on the host) repeat the
            # gradients: nothing is read or computed for them.
            weights = self._weight_norms() if self.weight_norms else grads
            self._put(self._row(None), ops.concatenate([head, grads, weights, clipped], 0))
            hook.increment(self.count, 1)
        elif not hook.backend.BRANCH_WRITES:
            # JAX: a traced branch may compute but not write (its writes would leak
            # from the stateless scope). The norms are computed on logged steps only,
            # in one pure branch; the write goes to the scratch row on the others.
            def row_values() -> Any:
                head, grads, clipped = gradient_values()
                weights = self._weight_norms() if self.weight_norms else grads
                return ops.concatenate([head, grads, weights, clipped], 0)

            skipped = lambda: ops.zeros((2 + 3 * width,), "float32")  # noqa: E731
            self._put(self._row(logged), ops.cond(logged, row_values, skipped))
            hook.increment(self.count, ops.cast(logged, self._index_dtype))
        else:
            if self.weight_norms:  # first: it reads the row before the count moves

                def record_weights() -> None:
                    columns = list(range(2 + width, 2 + 2 * width))
                    self._put(self._row(logged), self._weight_norms(), columns)

                hook.when(logged, record_weights)

            def record_gradients() -> None:
                head, grads, clipped = gradient_values()
                columns = list(range(2 + width)) + list(
                    range(2 + 2 * width, 2 + 3 * width)
                )
                values = ops.concatenate([head, grads, clipped], 0)
                self._put(self._row(logged), values, columns)
                hook.increment(self.count, ops.cast(logged, self._index_dtype))

            hook.when(logged, record_gradients)

        if self.snapshots:
            snapshot = ops.equal(step % self.histogram_every_n_steps, 0)

            def keep() -> None:
                position = {id(v): i for i, v in enumerate(context.variables)}
                for item, target in zip(self.tracked, self.snapshots):
                    gradient = (
                        context.gradients[position[id(item.variable)]]
                        if id(item.variable) in position
                        else None
                    )
                    if gradient is None:
                        continue
                    dense = ops.cast(hook.backend.dense(gradient), "float32")
                    target.assign(ops.where(snapshot, dense, hook.read(target)))
                previous = hook.read(self.snapshot_step)
                self.snapshot_step.assign(ops.where(snapshot, step, previous))

            hook.when(snapshot, keep)

    # -- on the host ------------------------------------------------------------------

    def reset(self) -> None:
        """Empties the buffer (host side, between epochs)."""
        self.count.assign(0)

    def fetch(
        self, first_step: int, steps: Sequence[int] | None = None
    ) -> tuple[dict[str, np.ndarray], int]:
        """Reads the logged rows in one transfer and empties the buffer.

        Rows are written in step order, so their step indices follow from the first
        step since the last fetch: no per-step write of the step is needed.

        Args:
            first_step: The index of the first training step since the last fetch.
            steps: The steps of the rows when they were written by hand (probe mode).
                Defaults to `None`: the multiples of `every_n_steps` from
                `first_step` on.

        Returns:
            A dict with `step`, `global_norm`, `clipped_global_norm`, `grad_norm`,
            `weight_norm` and `clipped_grad_norm` arrays (the clipped ones `None` when
            no transform ran), and the number of logged steps that did not fit.
        """
        count = int(np.asarray(self.count.numpy()))
        kept = min(count, self.capacity)
        rows = np.asarray(self.rows.numpy())[:kept]  # one read, no slicing op
        self.reset()
        if steps is None:
            start = first_step + (-first_step) % self.every_n_steps
            steps = start + self.every_n_steps * np.arange(kept)
        steps = np.asarray(steps, dtype=np.int64)[:kept]
        width = len(self.tracked)
        grads = rows[:, 2 : 2 + width]
        clipped = rows[:, 2 + 2 * width :]
        if self.global_on_host:  # every variable of the step is tracked
            global_norm, clipped_global = _global_norms(grads), _global_norms(clipped)
        else:
            global_norm, clipped_global = _norms(rows[:, 0]), _norms(rows[:, 1])
        if self.weight_norms:
            weight_norm = _norms(rows[:, 2 + width : 2 + 2 * width])
        else:
            weight_norm = np.full_like(grads, np.nan, dtype=np.float64)
        out = {
            "step": steps,
            "global_norm": global_norm,
            "clipped_global_norm": clipped_global if self.transformed else None,
            "grad_norm": _norms(grads),
            "weight_norm": weight_norm,
            "clipped_grad_norm": _norms(clipped) if self.transformed else None,
        }
        return out, count - kept

    def fetch_snapshot(self) -> tuple[int, dict[str, np.ndarray]]:
        """The latest kept gradient copy: its step (-1 if none) and arrays by name."""
        if not self.snapshots:
            return -1, {}
        step = int(np.asarray(self.snapshot_step.numpy()))
        return step, {
            f"{item.layer}/{item.name}": np.asarray(target.numpy())
            for item, target in zip(self.tracked, self.snapshots)
        }


class OptimizerBuffers:
    """One `NormBuffer` per optimizer that the step calls, made when it is first called.

    A model that Keras builds on its first batch has no variables before its first
    step: the buffer of each optimizer is made inside that step's trace, over the
    tracked variables the optimizer updates (`tf.init_scope` makes them eagerly).
    Under a strategy with several replicas (where variables cannot be made in a
    replica context) Keras has built the model already, and `prepare` makes every
    optimizer's buffer up front over every tracked variable.

    The same instance serves several `fit()` calls while `fits` says so: its
    variables are then those the kept train function writes.

    Args:
        hook: The model's step hook.
        layers: Glob patterns of the layers to track (`track_variables`), or `None`.
        capacity: Logged steps held per epoch.
        every_n_steps: Log steps whose index is a multiple of this.
        histogram_every_n_steps: Keep gradient copies at these steps, or `None`.
        weight_norms: Also record weight norms.
    """

    def __init__(
        self,
        hook: StepHook,
        layers: Sequence[str] | None,
        capacity: int,
        every_n_steps: int,
        histogram_every_n_steps: int | None,
        weight_norms: bool,
    ):
        self.hook = hook
        self.layers = layers
        self.capacity = capacity
        self.options = (every_n_steps, histogram_every_n_steps, weight_norms)
        self.buffers: dict[str, NormBuffer | None] = {}
        self.trainable_ids: tuple[int, ...] | None = None

    def fits(self, hook: StepHook, capacity: int, trainable_ids: tuple[int, ...]) -> bool:
        """Whether these buffers can serve a new `fit()` as they are."""
        return (
            hook is self.hook
            and capacity <= self.capacity
            and (self.trainable_ids is None or self.trainable_ids == trainable_ids)
        )

    def prepare(self, tracked: Sequence[TrackedVariable]) -> None:
        """Makes every optimizer's buffer now, over the variables of `tracked` that it
        updates (all of them while it is not built)."""
        for name, optimizer in self.hook.optimizers.items():
            if name in self.buffers:
                continue
            mine = tracked
            if optimizer.built and getattr(optimizer, "_trainable_variables", None):
                updated = {id(v) for v in optimizer._trainable_variables}
                mine = [item for item in tracked if id(item.variable) in updated]
            self.buffers[name] = (
                NormBuffer(self.hook, mine, self.capacity, *self.options, optimizer=name)
                if mine
                else None
            )

    def write(self, context: StepContext) -> None:
        """The observer: records `context` in its optimizer's buffer (made if new)."""
        name = context.optimizer_name
        if name not in self.buffers:
            model = self.hook.model
            self.trainable_ids = tuple(id(v) for v in model.trainable_variables)
            updated = {id(variable) for variable in context.variables}
            tracked = [
                item
                for item in track_variables(model, self.layers)
                if id(item.variable) in updated
            ]
            self.buffers[name] = (
                NormBuffer(self.hook, tracked, self.capacity, *self.options, optimizer=name)
                if tracked
                else None
            )
        buffer = self.buffers[name]
        if buffer is not None:
            buffer.write(context)

    def reset(self) -> None:
        """Empties every buffer (host side, at the start of a `fit()`)."""
        for buffer in self.buffers.values():
            if buffer is not None:
                buffer.reset()
