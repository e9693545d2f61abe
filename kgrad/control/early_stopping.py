"""`EarlyStopping`: Keras's, plus stops on non-finite values, divergence, vanishing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import keras
import tensorflow as tf

from kgrad.callbacks.base import KgradCallback, check_positive_int
from kgrad.capture.step_hook import StepContext, StepHook
from kgrad.control.arguments import check_number


def gradients_finite(gradients: Sequence[Any]) -> tf.Tensor:
    """Whether every entry of every gradient is finite (a scalar bool tensor).

    `None` gradients are skipped; sparse gradients are checked on their values.
    """
    checks = [tf.constant(True)]
    for gradient in gradients:
        if gradient is None:
            continue
        values = gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient
        checks.append(tf.reduce_all(tf.math.is_finite(values)))
    return tf.reduce_all(tf.stack(checks))


# Where the first-to-last ratio comes from, best first: the diagnosis detectors'
# profile (GradientHealthMonitor), then the logger's bias/total norms.
_VANISHING_KEYS = ["health/first_to_last", "grad_norm/first_to_last"]


class EarlyStopping(keras.callbacks.EarlyStopping, KgradCallback):
    """`keras.callbacks.EarlyStopping` that also stops on NaN, divergence and vanishing.

    Every option of Keras's `EarlyStopping` works as there; on top of it:

    - `check_finite`: stop at the first batch whose loss or gradient is not finite
      (the running loss of `logs["loss"]`, and a flag written inside the real
      training step), not after burning the patience on NaN epochs. A non-finite
      monitored value at an epoch end stops too, and is never taken as the best.
    - `stopping_threshold` / `divergence_threshold`: stop as soon as the monitored
      value reaches the first, or is worse than the second (checked at every epoch
      end, `start_from_epoch` notwithstanding).
    - `vanishing_patience`: stop when the first-to-last layer ratio of the
      backpropagated signal stays below `vanishing_threshold` for that many epochs.
      The ratio is read from the logs, written there by a callback listed before
      this one: `health/first_to_last` from `kgrad.GradientHealthMonitor` (the
      diagnosis detectors' profile) when present, else `grad_norm/first_to_last`
      from `kgrad.GradientNormLogger`, or the key named by `vanishing_monitor`.
    - With `restore_best_weights`, a stop on a non-finite value restores the best
      weights seen so far, which are finite, or the weights at the start of
      training when no epoch had completed.

    Why training stopped is kept in `stop_reason` (printed when `verbose`); epochs
    and batches in it are counted from 1, as in the progress bar. `stopped_epoch`
    and `stopped_batch` hold the 0-based indices.

    `check_finite` needs a look at every batch, which makes Keras run the batch
    callbacks synchronously (one scalar read per step); pass `check_finite=False`
    to keep asynchronous dispatch. Under a `LossScaleOptimizer` non-finite gradients
    are routine (the step is skipped and the scale lowered), so only the loss is
    checked there.

    Args:
        monitor: The quantity to monitor. Defaults to `"val_loss"`.
        min_delta: The smallest change that counts as an improvement. Defaults to
            `0`.
        patience: Epochs without improvement before stopping. Defaults to `0`.
        verbose: `1` prints why training stopped. Defaults to `0`.
        mode: `"auto"`, `"min"` or `"max"`. Defaults to `"auto"`.
        baseline: A value the monitored quantity must improve on. Defaults to
            `None`.
        restore_best_weights: Restore the weights of the best epoch at the end.
            Defaults to `False`.
        start_from_epoch: Epochs to wait before counting patience. Defaults to `0`.
        check_finite: Stop at the first non-finite loss or gradient. Defaults to
            `True`.
        divergence_threshold: Stop when the monitored value is worse than this.
            Defaults to `None`.
        stopping_threshold: Stop when the monitored value reaches this. Defaults to
            `None`.
        vanishing_patience: Epochs of vanishing gradients before stopping. Defaults
            to `None`, no vanishing check.
        vanishing_threshold: The ratio below which an epoch counts as vanishing.
            Defaults to `1e-4` (the first layer gets under 1/10,000 of the last
            layer's signal, which the diagnosis calls critical).
        vanishing_monitor: The logs key holding that ratio. Defaults to `None`:
            `health/first_to_last`, else `grad_norm/first_to_last`.

    Raises:
        ValueError: for an unknown `mode` or a bad number; at an epoch end when
            `monitor` (or, with `vanishing_patience`, `vanishing_monitor`) is not in
            the logs — the message lists the keys that are.

    References:
        Lightning's `EarlyStopping` (`check_finite`, `stopping_threshold`,
        `divergence_threshold`).

    Example:

    >>> stopper = kgrad.EarlyStopping(monitor="loss", patience=3,
    ...                               restore_best_weights=True)
    >>> model.fit(x, y, epochs=50, callbacks=[stopper])  # doctest: +SKIP
    >>> stopper.stop_reason  # doctest: +SKIP
    'non-finite loss (nan) at epoch 4, batch 7'
    """

    _transient = (
        "_model",
        "_hook",
        "_nonfinite_steps",
        "_initial_weights",
        "best_weights",
    )

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0,
        patience: int = 0,
        verbose: int = 0,
        mode: Literal["auto", "min", "max"] = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
        check_finite: bool = True,
        divergence_threshold: float | None = None,
        stopping_threshold: float | None = None,
        vanishing_patience: int | None = None,
        vanishing_threshold: float = 1e-4,
        vanishing_monitor: str | None = None,
    ):
        if mode not in ("auto", "min", "max"):
            raise ValueError(
                f"`mode` must be one of auto, min, max. Received: mode={mode!r}"
            )
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(
                f"`patience` must be an integer ≥ 0. Received: patience={patience!r}"
            )
        check_positive_int(vanishing_patience, "vanishing_patience", allow_none=True)
        super().__init__(
            monitor=monitor,
            min_delta=min_delta,
            patience=patience,
            verbose=verbose,
            mode=mode,
            baseline=baseline,
            restore_best_weights=restore_best_weights,
            start_from_epoch=start_from_epoch,
        )
        self.check_finite = bool(check_finite)
        self.divergence_threshold = check_number(
            divergence_threshold, "divergence_threshold", allow_none=True
        )
        self.stopping_threshold = check_number(
            stopping_threshold, "stopping_threshold", allow_none=True
        )
        self.vanishing_patience = vanishing_patience
        self.vanishing_threshold = check_number(
            vanishing_threshold, "vanishing_threshold", greater_than=0
        )
        self.vanishing_monitor = vanishing_monitor
        # Without the finite check the batch hook does nothing.
        self.async_safe = not self.check_finite
        self.stop_reason: str | None = None
        self.stopped_batch: int | None = None
        self._hook: StepHook | None = None
        self._nonfinite_steps = None
        self._initial_weights = None

    # -- callback hooks ----------------------------------------------------------------

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        self.stop_reason = None
        self.stopped_batch = None
        self._stopped_nonfinite = False
        self._vanishing_wait = 0
        self._epoch = 0
        self._initial_weights = (
            self.model.get_weights()
            if self.check_finite and self.restore_best_weights
            else None
        )
        self._nonfinite_steps = None
        optimizer = self.model.optimizer
        if self.check_finite and not isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer
        ):
            self._hook = StepHook.attach(self.model)
            self._nonfinite_steps = self._hook.make_variable(
                0, tf.int64, "kgrad_nonfinite_steps"
            )
            self._hook.add(self, observe=self._observe)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if not self.check_finite or self._stopped_nonfinite:
            return
        loss = (logs or {}).get("loss")
        bad_loss = loss is not None and not math.isfinite(float(loss))
        bad_gradient = (
            self._nonfinite_steps is not None and int(self._nonfinite_steps.numpy()) > 0
        )
        if bad_loss or bad_gradient:
            what = " and ".join(
                ([f"loss ({float(loss)})"] if bad_loss else [])
                + (["gradient"] if bad_gradient else [])
            )
            self.stopped_batch = batch
            where = f"epoch {self._epoch + 1}, batch {batch + 1}"
            self._stop_nonfinite(f"non-finite {what} at {where}")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._stopped_nonfinite:
            return  # the weights are not finite: they must not become the best
        current = self.get_monitor_value(logs)
        if self.check_finite and not math.isfinite(float(current)):
            self._stop_nonfinite(
                f"non-finite `{self.monitor}` ({float(current)}) at epoch {epoch + 1}"
            )
            return
        super().on_epoch_end(epoch, logs)
        if self.model.stop_training and self.stopped_epoch == epoch:
            self.stop_reason = (
                f"no improvement in `{self.monitor}` for {self.wait} epochs (best "
                f"{float(self.best):.4g} at epoch {self.best_epoch + 1})"
            )
            return
        if self.stopping_threshold is not None and (
            current == self.stopping_threshold
            or self.monitor_op(current, self.stopping_threshold)
        ):
            self._stop(
                epoch,
                f"`{self.monitor}` reached the stopping threshold "
                f"{self.stopping_threshold:.4g} ({float(current):.4g}) at epoch "
                f"{epoch + 1}",
            )
        elif self.divergence_threshold is not None and self.monitor_op(
            self.divergence_threshold, current
        ):
            self._stop(
                epoch,
                f"`{self.monitor}` diverged: {float(current):.4g} is worse than "
                f"divergence_threshold={self.divergence_threshold:.4g} at epoch "
                f"{epoch + 1}",
            )
        elif self.vanishing_patience is not None:
            self._check_vanishing(epoch, logs or {})

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._hook is not None:
            self._hook.remove(self)
            self._hook = None
        if self.stop_reason is not None and self.verbose > 0:
            print(f"EarlyStopping: {self.stop_reason}")
        if (
            self._stopped_nonfinite
            and self.restore_best_weights
            and self.best_weights is None
            and self._initial_weights is not None
        ):
            if self.verbose > 0:
                print(
                    "Restoring model weights from the start of training (no epoch "
                    "completed with finite values)."
                )
            self.model.set_weights(self._initial_weights)
        super().on_train_end(logs)
        self._initial_weights = None

    def get_monitor_value(self, logs: dict | None) -> Any:
        """The monitored value; raises (Keras only warns) when it is not in `logs`."""
        logs = logs or {}
        if self.monitor not in logs:
            raise ValueError(
                f"EarlyStopping monitors `{self.monitor}`, which is not in the logs. "
                f"Available: {', '.join(logs) or 'nothing'}. Pick one of those as "
                "`monitor` (for `val_*`, pass validation data to `fit`)."
            )
        return logs[self.monitor]

    # -- internals ---------------------------------------------------------------------

    def _observe(self, context: StepContext) -> None:
        bad = tf.logical_not(gradients_finite(context.gradients))
        self._nonfinite_steps.assign_add(tf.cast(bad, tf.int64))

    def _stop(self, epoch: int, reason: str) -> None:
        self.stopped_epoch = epoch
        self.stop_reason = reason
        self.model.stop_training = True

    def _stop_nonfinite(self, reason: str) -> None:
        self._stopped_nonfinite = True
        self._stop(self._epoch, reason)

    def _check_vanishing(self, epoch: int, logs: dict) -> None:
        candidates = (
            [self.vanishing_monitor] if self.vanishing_monitor else _VANISHING_KEYS
        )
        key = next((name for name in candidates if name in logs), None)
        if key is None:
            raise ValueError(
                f"`vanishing_patience` needs {' or '.join(map(repr, candidates))} in "
                f"the logs, which hold: {', '.join(logs) or 'nothing'}. Put a "
                "kgrad.GradientHealthMonitor or kgrad.GradientNormLogger before "
                "EarlyStopping in `callbacks`, or set `vanishing_monitor` to a key "
                "that is there."
            )
        ratio = float(logs[key])
        vanishing = math.isfinite(ratio) and ratio < self.vanishing_threshold
        self._vanishing_wait = self._vanishing_wait + 1 if vanishing else 0
        if self._vanishing_wait >= self.vanishing_patience:
            self._stop(
                epoch,
                f"vanishing gradients: `{key}` below "
                f"{self.vanishing_threshold:.3g} for {self._vanishing_wait} epochs "
                f"({ratio:.3g} at epoch {epoch + 1})",
            )
