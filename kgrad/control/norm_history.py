"""A bounded history of global gradient norms on the device: AutoClip's memory."""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops

from kgrad.capture.step_hook import StepHook
from kgrad.control.clipping_functions import percentile


class NormHistory:
    """The last `size` finite global norms, in a ring buffer the traced step writes.

    Args:
        hook: The step hook that makes the variables (its strategy owns them).
        size: How many norms are kept (the oldest are overwritten).
        optimizer: The name of the optimizer whose calls write the history (its
            state on JAX). Defaults to `"optimizer"`.

    References:
        Seetharaman, Wichern, Pardo & Le Roux 2020, "AutoClip: Adaptive Gradient
        Clipping for Source Separation Networks".
    """

    def __init__(self, hook: StepHook, size: int, optimizer: str = "optimizer"):
        self.size = int(size)
        self._hook = hook
        self._index_dtype = hook.backend.INDEX_DTYPE
        self.values = hook.make_variable(
            np.zeros((self.size,), np.float32),
            "float32",
            "kgrad_norm_history",
            optimizer=optimizer,
        )
        self.count = hook.make_variable(
            0, self._index_dtype, "kgrad_norm_history_count", optimizer=optimizer
        )

    def record_and_percentile(self, norm: Any, q: Any) -> Any:
        """Records `norm` (if finite), then returns the q-th percentile of the history.

        In the traced step. The current norm is included, as in the paper; before
        any finite norm the result is +inf (nothing to clip against).
        """
        hook = self._hook
        finite = ops.isfinite(norm)
        count = hook.read(self.count)
        # Written without branching (mirrored variables allow no scatter, and JAX's
        # branches no writes): the slot `count % size` takes the norm when finite.
        slot = ops.arange(self.size, dtype=self._index_dtype) == count % self.size
        values = ops.where(ops.logical_and(slot, finite), norm, hook.read(self.values))
        count = count + ops.cast(finite, self._index_dtype)
        self.values.assign(values)
        self.count.assign(count)
        threshold = percentile(values, ops.minimum(count, self.size), q)
        return ops.where(count > 0, threshold, float("inf"))

    def reset(self) -> None:
        """Empties the history (host side, before a `fit()`)."""
        self.count.assign(0)

    def to_numpy(self) -> np.ndarray:
        """The recorded norms, oldest first (host side)."""
        hook = self._hook
        count = int(hook.backend.host_value(hook.model, self.count))
        values = np.asarray(hook.backend.host_value(hook.model, self.values))
        if count <= self.size:
            return values[:count]
        return np.roll(values, -(count % self.size))
