"""A device-side buffer of per-step norms, written in the traced step, read in bulk.

Writing one row per logged step into a preallocated variable keeps the statistics on
the device: the host fetches the whole buffer once per epoch instead of making a round
trip per step per variable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from kgrad import stats
from kgrad.capture.step_hook import StepContext, StepHook
from kgrad.capture.variables import TrackedVariable


class NormBuffer:
    """Rows of gradient and weight norms for the logged steps of one epoch.

    Row layout: `[global, clipped_global, grad x V, weight x V, clipped x V]` for the
    `V` tracked variables. One extra scratch row takes the writes of steps that are
    not logged (and any overflow), so the traced step never branches on a write.

    Args:
        hook: The step hook that owns the strategy (for mirrored variables).
        tracked: The variables to record, in depth order.
        capacity: The number of logged steps the buffer holds between fetches.
        every_n_steps: Log steps whose index is a multiple of this.
        histogram_every_n_steps: Also keep a copy of the gradients of tracked
            variables at these steps (for TensorBoard histograms). `None`: never.
        weight_norms: Also compute the weight norms (else NaN). Defaults to `True`.
    """

    def __init__(
        self,
        hook: StepHook,
        tracked: Sequence[TrackedVariable],
        capacity: int,
        every_n_steps: int,
        histogram_every_n_steps: int | None = None,
        weight_norms: bool = True,
    ):
        self.tracked = list(tracked)
        self.weight_norms = weight_norms
        self.capacity = int(capacity)
        self.every_n_steps = int(every_n_steps)
        self.transformed = False
        width = 2 + 3 * len(self.tracked)
        self.rows = hook.make_variable(
            tf.zeros((self.capacity + 1, width), tf.float32), tf.float32, "kgrad_rows"
        )
        self.count = hook.make_variable(0, tf.int64, "kgrad_count")
        self.histogram_every_n_steps = histogram_every_n_steps
        self.snapshots: list[tf.Variable] = []
        self.snapshot_step = None
        if histogram_every_n_steps:
            self.snapshots = [
                hook.make_variable(
                    tf.zeros(item.variable.shape, tf.float32), tf.float32, "kgrad_snap"
                )
                for item in self.tracked
            ]
            self.snapshot_step = hook.make_variable(-1, tf.int64, "kgrad_snap_step")
        self._hook = hook

    # -- in the traced step ---------------------------------------------------------

    def _norms(self, context: StepContext, values: list[Any]) -> tuple[tf.Tensor, tf.Tensor]:
        """The global norm of `values` and the norms of the tracked ones.

        Every gradient's norm is computed once; the tracked ones are gathered from
        those, so the global norm costs no second pass over the gradients.
        """
        every = stats.norms(values)  # None -> NaN, "no gradient"
        present = [i for i, value in enumerate(values) if value is not None]
        if len(present) < len(values):
            global_norm = stats.global_norm(tf.gather(every, present))
        else:
            global_norm = stats.global_norm(every)
        position = {id(variable): i for i, variable in enumerate(context.variables)}
        missing = len(values)  # the index of an appended NaN, for untracked variables
        picks = [position.get(id(item.variable), missing) for item in self.tracked]
        if picks == list(range(len(values))):
            return global_norm, every
        padded = tf.concat([every, [float("nan")]], axis=0)
        return global_norm, tf.gather(padded, picks)

    def _put(self, target: tf.Variable, row: tf.Tensor, value: tf.Tensor) -> None:
        if self._hook.strategy.num_replicas_in_sync > 1:
            # Mirrored variables have no scatter update: rewrite the (small) buffer.
            target.assign(tf.tensor_scatter_nd_update(target, [[row]], [value]))
        else:
            target[row].assign(value)

    def write(self, context: StepContext, always: bool = False) -> None:
        """Records the norms of `context` when its step is a logged one.

        Args:
            context: The step's gradients and variables.
            always: Record whatever the step index (probe mode). Defaults to `False`.
        """
        step = tf.cast(context.step, tf.int64)
        every_step = always or self.every_n_steps == 1
        logged = None if every_step else tf.equal(step % self.every_n_steps, 0)
        self.transformed = self.transformed or context.applied is not context.gradients

        def record() -> None:
            global_norm, grad_norms = self._norms(context, context.gradients)
            if self.weight_norms:
                weight_norms = stats.norms([item.variable.value for item in self.tracked])
            else:  # a constant: nothing to compute or read in the step
                weight_norms = tf.fill([len(self.tracked)], float("nan"))
            if context.applied is context.gradients:
                clipped_global, clipped_norms = global_norm, grad_norms
            else:
                clipped_global, clipped_norms = self._norms(context, context.applied)
            values = tf.concat(
                [
                    tf.stack([global_norm, clipped_global]),
                    grad_norms,
                    weight_norms,
                    clipped_norms,
                ],
                axis=0,
            )
            # Steps that are not logged (and any overflow) write to the scratch row.
            row = tf.minimum(self.count.read_value(), self.capacity)
            if logged is not None:
                row = tf.where(logged, row, self.capacity)
            self._put(self.rows, row, values)
            self.count.assign_add(1 if logged is None else tf.cast(logged, tf.int64))

        if every_step:
            record()  # no branch to trace or run when every step is logged
        else:
            self._hook.when(logged, record)

        if self.snapshots:
            snapshot = tf.equal(step % self.histogram_every_n_steps, 0)

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
                    dense = tf.cast(tf.convert_to_tensor(gradient), tf.float32)
                    target.assign(tf.where(snapshot, dense, target))
                self.snapshot_step.assign(tf.where(snapshot, step, self.snapshot_step))

            self._hook.when(snapshot, keep)

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
        count = int(self.count.numpy())
        kept = min(count, self.capacity)
        rows = self.rows[:kept].numpy()
        self.reset()
        if steps is None:
            start = first_step + (-first_step) % self.every_n_steps
            steps = start + self.every_n_steps * np.arange(kept)
        steps = np.asarray(steps, dtype=np.int64)[:kept]
        width = len(self.tracked)
        out = {
            "step": steps,
            "global_norm": rows[:, 0],
            "clipped_global_norm": rows[:, 1] if self.transformed else None,
            "grad_norm": rows[:, 2 : 2 + width],
            "weight_norm": rows[:, 2 + width : 2 + 2 * width],
            "clipped_grad_norm": rows[:, 2 + 2 * width :] if self.transformed else None,
        }
        return out, count - kept

    def fetch_snapshot(self) -> tuple[int, dict[str, np.ndarray]]:
        """The latest kept gradient copy: its step (-1 if none) and arrays by name."""
        if not self.snapshots:
            return -1, {}
        step = int(self.snapshot_step.numpy())
        return step, {
            f"{item.layer}/{item.name}": target.numpy()
            for item, target in zip(self.tracked, self.snapshots)
        }
