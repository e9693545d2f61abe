"""A bounded history of global gradient norms on the device: AutoClip's memory."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from kgrad.capture.step_hook import StepHook
from kgrad.control.clipping_functions import percentile


class NormHistory:
    """The last `size` finite global norms, in a ring buffer the traced step writes.

    Args:
        hook: The step hook whose strategy owns the variables.
        size: How many norms are kept (the oldest are overwritten).

    References:
        Seetharaman, Wichern, Pardo & Le Roux 2020, "AutoClip: Adaptive Gradient
        Clipping for Source Separation Networks".
    """

    def __init__(self, hook: StepHook, size: int):
        self.size = int(size)
        self.values = hook.make_variable(
            np.zeros((self.size,), np.float32), tf.float32, "kgrad_norm_history"
        )
        self.count = hook.make_variable(0, tf.int64, "kgrad_norm_history_count")

    def record_and_percentile(self, norm: tf.Tensor, q: tf.Tensor) -> tf.Tensor:
        """Records `norm` (if finite), then returns the q-th percentile of the history.

        In the traced step. The current norm is included, as in the paper; before
        any finite norm the result is +inf (nothing to clip against).
        """
        finite = tf.math.is_finite(norm)
        count = self.count.read_value()
        # Written without branching (mirrored variables allow no scatter): the slot
        # `count % size` takes the norm when it is finite.
        slot = tf.range(self.size, dtype=tf.int64) == count % self.size
        values = tf.where(slot & finite, norm, self.values.read_value())
        count = count + tf.cast(finite, tf.int64)
        self.values.assign(values)
        self.count.assign(count)
        threshold = percentile(values, tf.minimum(count, self.size), q)
        return tf.where(count > 0, threshold, float("inf"))

    def to_numpy(self) -> np.ndarray:
        """The recorded norms, oldest first (host side)."""
        count = int(self.count.numpy())
        values = self.values.numpy()
        if count <= self.size:
            return values[:count]
        return np.roll(values, -(count % self.size))
