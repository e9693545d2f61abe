"""`EarlyStopping`: Keras's, plus stops on non-finite values, divergence, vanishing."""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import keras
import numpy as np
from keras import ops

from kgrad import backend
from kgrad.callbacks.base import KgradCallback, check_positive_int
from kgrad.capture.optimizers import model_optimizers
from kgrad.capture.step_hook import StepContext, StepHook
from kgrad.control.arguments import check_number


def gradients_finite(gradients: Sequence[Any]) -> Any:
    """Whether every entry of every gradient is finite (a scalar bool tensor).

    `None` gradients are skipped; sparse gradients (`tf.IndexedSlices`) are checked
    on their values. A backend with a faster check of its own (torch: one
    `torch._foreach_norm` for every tensor) uses it.
    """
    operations = backend.current()
    entries = [operations.entries(g) for g in gradients if g is not None]
    fast = getattr(operations, "all_finite", None)
    if fast is not None:
        return fast(entries)
    checks = [ops.all(ops.isfinite(value)) for value in entries]
    if not checks:
        return ops.convert_to_tensor(True)
    return ops.all(ops.stack(checks))


def _all_finite(value: Any) -> bool:
    """Whether a logged value (a float, or an array such as `F1Score`'s) is finite."""
    return bool(np.all(np.isfinite(np.asarray(value, dtype=np.float64))))


def _format(value: Any) -> str:
    """A logged value for a message: `0.5`, or `[0.5 0.7]` for an array."""
    array = np.asarray(value, dtype=np.float64)
    if array.size == 1:
        return f"{array.item():.4g}"
    return np.array2string(array, precision=4)


def _written_by_callbacks(key: str) -> bool:
    """Whether `key` is one that callbacks, not the model, put into the epoch logs.

    kgrad's callbacks write namespaced keys (`grad_norm/global`, `health/decay`);
    Keras's learning-rate callbacks write `learning_rate`.
    """
    return "/" in key or key == "learning_rate"


@dataclasses.dataclass(eq=False)
class _FiniteFlags:
    """Per optimizer, how many steps had a non-finite gradient (a state variable of
    the step each, written in that optimizer's calls)."""

    hook: StepHook
    names: list[str]
    counts: dict[str, Any]


# Where the first-to-last ratio comes from, best first: the diagnosis detectors'
# profile (GradientHealthMonitor), then the logger's bias/total norms.
_VANISHING_KEYS = ["health/first_to_last", "grad_norm/first_to_last"]


class EarlyStopping(keras.callbacks.EarlyStopping, KgradCallback):
    """`keras.callbacks.EarlyStopping` that also stops on NaN, divergence and vanishing.

    A drop-in for Keras's class: every option works as there, on models built up
    front or by their first batch, with metrics logged as arrays (`F1Score`), and
    driven by hand on a model that has no optimizer (then nothing is checked in the
    step). On top of it:

    - `check_finite`: stop at the first batch whose loss or gradient is not finite
      (the running loss of `logs["loss"]`, and a flag written inside the real
      training step for each optimizer the model holds: a GAN's `d_optimizer` and
      `g_optimizer` alike), not after burning the patience on NaN epochs. With
      several optimizers the reason names the ones at fault: "non-finite gradient
      (d_optimizer) at epoch 2, batch 3". A non-finite monitored value at an epoch
      end stops too, and is never taken as the best.
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
      training when no epoch had completed (for a model that Keras builds in its
      first step, the weights after the first batch: it had none before).

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
        ValueError: for a `monitor` that is not a name, an unknown `mode` or a bad
            number; after the first batch, when the monitored training metric is
            not in its logs; at the first epoch end when a `val_*` monitor, or a key
            that callbacks write at epoch ends (`grad_norm/...`, `health/...`,
            `learning_rate`), or with `vanishing_patience` the vanishing ratio, is
            not in the logs. The messages list the keys that are.

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
        "_flags",
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
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(
                "`monitor` must be the name of a quantity in the logs, such as "
                f"'val_loss', 'loss' or 'val_accuracy'. Received: monitor={monitor!r}"
            )
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
        self.stop_reason: str | None = None
        self.stopped_batch: int | None = None
        self._stopped_nonfinite = False
        self._monitor_checked = False
        self._epoch = 0
        self._hook: StepHook | None = None
        self._flags: _FiniteFlags | None = None
        self._initial_weights = None
        self._initial_weights_pending = False

    @property
    def async_safe(self) -> bool:
        """Whether Keras may run the batch hooks on a worker thread.

        Without the finite check the batch hook reads nothing but its `logs`; with
        it, it reads a variable of the step (one scalar read per step).
        """
        return not self.check_finite

    # -- callback hooks ----------------------------------------------------------------

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        self.stop_reason = None
        self.stopped_batch = None
        self._stopped_nonfinite = False
        self._monitor_checked = False
        self._validates_sometimes = _fit_validates_sometimes()
        self._vanishing_wait = 0
        self._epoch = 0
        self._initial_weights = None
        # A model that Keras builds in its first step has no weights yet: its
        # fallback weights are taken after the first (finite) batch instead.
        self._initial_weights_pending = self.check_finite and self.restore_best_weights
        if self._initial_weights_pending and getattr(self.model, "built", True):
            self._initial_weights = self.model.get_weights()
            self._initial_weights_pending = False
        self._attach()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        if not self._monitor_checked:
            self._monitor_checked = True
            self._check_monitor_logged(logs)
        if not self.check_finite or self._stopped_nonfinite:
            return
        loss = logs.get("loss")
        bad_loss = loss is not None and not _all_finite(loss)
        bad_optimizers = self._nonfinite_optimizers()
        if bad_loss or bad_optimizers is not None:
            gradient = "gradient"
            if bad_optimizers:
                gradient += f" ({', '.join(bad_optimizers)})"
            what = " and ".join(
                ([f"loss ({_format(loss)})"] if bad_loss else [])
                + ([gradient] if bad_optimizers is not None else [])
            )
            self.stopped_batch = batch
            where = f"epoch {self._epoch + 1}, batch {batch + 1}"
            self._stop_nonfinite(f"non-finite {what} at {where}")
        elif self._initial_weights_pending:
            self._initial_weights = self.model.get_weights()
            self._initial_weights_pending = False

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._stopped_nonfinite:
            return  # the weights are not finite: they must not become the best
        if self._validates_sometimes and _validation_skipped(self.monitor, logs):
            # `fit(validation_freq=k)` validates every k-th epoch only: as Keras's
            # own class, wait for an epoch that has the validation metrics.
            warnings.warn(
                f"EarlyStopping: epoch {epoch + 1} has no validation metrics (with "
                f"`validation_freq` > 1); `{self.monitor}` is judged at the epochs "
                "that validate.",
                stacklevel=2,
            )
            return
        current = self.get_monitor_value(logs)
        if self.check_finite and not _all_finite(current):
            self._stop_nonfinite(
                f"non-finite `{self.monitor}` ({_format(current)}) at epoch {epoch + 1}"
            )
            return
        stopped_before = self.stopped_epoch
        super().on_epoch_end(epoch, logs)
        # A model that was never compiled or fitted has no `stop_training` yet.
        stopping = getattr(self.model, "stop_training", False)
        if stopping and self.stopped_epoch != stopped_before:
            self.stop_reason = (
                f"no improvement in `{self.monitor}` for {self.wait} epochs (best "
                f"{_format(self.best)} at epoch {self.best_epoch + 1})"
            )
            return
        if self.stopping_threshold is not None and self._at_least_as_good(
            current, self.stopping_threshold
        ):
            self._stop(
                epoch,
                f"`{self.monitor}` reached the stopping threshold "
                f"{self.stopping_threshold:.4g} ({_format(current)}) at epoch "
                f"{epoch + 1}",
            )
        elif self.divergence_threshold is not None and self._better(
            self.divergence_threshold, current
        ):
            self._stop(
                epoch,
                f"`{self.monitor}` diverged: {_format(current)} is worse than "
                f"divergence_threshold={self.divergence_threshold:.4g} at epoch "
                f"{epoch + 1}",
            )
        elif self.vanishing_patience is not None:
            self._check_vanishing(epoch, logs or {})

    def on_train_end(self, logs: dict | None = None) -> None:
        self._detach()
        if self.stop_reason is not None and self.verbose > 0:
            print(f"EarlyStopping: {self.stop_reason}")
        if (
            self._stopped_nonfinite
            and self.restore_best_weights
            and self.best_weights is None
        ):
            self._restore_fallback_weights()
        super().on_train_end(logs)
        self._initial_weights = None

    def get_monitor_value(self, logs: dict | None) -> Any:
        """The monitored value; raises (Keras only warns) when it is not in `logs`."""
        logs = logs or {}
        if self.monitor not in logs:
            self._fail(
                f"EarlyStopping monitors `{self.monitor}`, which is not in the logs. "
                f"Available: {', '.join(logs) or 'nothing'}. Pick one of those as "
                "`monitor` (for `val_*`, pass validation data to `fit`). Received: "
                f"monitor={self.monitor!r}"
            )
        return logs[self.monitor]

    # -- internals ---------------------------------------------------------------------

    def _check_monitor_logged(self, logs: dict) -> None:
        """A training metric must be in the first batch's logs (`val_*` wait for the
        epoch end, and so do the keys that callbacks write there)."""
        if (
            self.monitor in logs
            or self.monitor.startswith("val_")
            or _written_by_callbacks(self.monitor)
        ):
            return
        self._fail(
            f"EarlyStopping monitors `{self.monitor}`, which the model does not log: "
            f"the logs of the first batch hold {', '.join(logs) or 'nothing'}. Pick "
            "one of those as `monitor`, or add the metric to `model.compile(metrics="
            f"[...])`. Received: monitor={self.monitor!r}"
        )

    def _attach(self) -> None:
        """Hooks the step of every optimizer the model holds; nothing without one.

        A model that was never compiled (the callback driven by hand) has no step to
        check. Under a `LossScaleOptimizer` non-finite gradients are routine.
        """
        if not self.check_finite:
            return
        optimizers = model_optimizers(self.model)
        checked = [
            name
            for name, optimizer in optimizers.items()
            if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        ]
        if not checked:
            return
        hook = StepHook.attach(self.model)
        flags = self._flags
        if flags is None or flags.hook is not hook or flags.names != checked:
            counts = {
                name: hook.make_variable(
                    0, hook.backend.INDEX_DTYPE, "kgrad_nonfinite_steps", optimizer=name
                )
                for name in checked
            }
            flags = _FiniteFlags(hook, checked, counts)
        else:
            for count in flags.counts.values():
                count.assign(0)
        self._flags = flags
        self._name_optimizers = len(optimizers) > 1
        self._hook = hook
        # The same flags (state) on the same hook reuse the step traced before.
        hook.add(self, observe=self._observe, optimizers=checked, state=flags)

    def _detach(self) -> None:
        if self._hook is not None:
            self._hook.remove(self)
            self._hook = None

    def _fail(self, message: str) -> None:
        """Raises a ValueError, first unhooking the step (fit does not end here)."""
        self._detach()
        raise ValueError(message)

    def _observe(self, context: StepContext) -> None:
        count = self._flags.counts.get(getattr(context, "optimizer_name", "optimizer"))
        if count is None:
            return
        bad = ops.logical_not(gradients_finite(context.gradients))
        self._hook.increment(count, ops.cast(bad, self._hook.backend.INDEX_DTYPE))

    def _nonfinite_optimizers(self) -> list[str] | None:
        """`None` when every gradient so far was finite, else the optimizers whose
        gradients were not (named only when the model holds several)."""
        if self._hook is None:
            return None
        hook = self._hook
        counts = [
            int(hook.backend.host_value(hook.model, self._flags.counts[name]))
            for name in self._flags.names
        ]
        if not any(counts):
            return None
        if not self._name_optimizers:
            return []
        return [name for name, count in zip(self._flags.names, counts) if count > 0]

    def _restore_fallback_weights(self) -> None:
        if self._initial_weights is None:
            if self.verbose > 0:
                print(
                    "Keeping the model weights: the first batch was not finite, and "
                    "the model had no weights before it to restore."
                )
            return
        if self.verbose > 0:
            print(
                "Restoring model weights from the start of training (no epoch "
                "completed with finite values)."
            )
        self.model.set_weights(self._initial_weights)

    def _better(self, value: Any, reference: Any) -> bool:
        better = self.monitor_op(value, reference)
        return bool(np.all(keras.ops.convert_to_numpy(better)))

    def _at_least_as_good(self, value: Any, reference: Any) -> bool:
        return bool(np.all(np.asarray(value) == reference)) or self._better(
            value, reference
        )

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
            self._fail(
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


def _fit_validates_sometimes() -> bool:
    """Whether the `fit()` that is starting validates, but not at every epoch
    (`validation_freq` other than 1): then some epochs end without `val_*` logs.

    Callbacks are not told `validation_freq`; it is read from the calling `fit`'s
    arguments. Outside `fit` (hooks driven by hand) this is `False`.
    """
    frame = inspect.currentframe()
    for _ in range(40):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            return False
        names = frame.f_locals
        if frame.f_code.co_name == "fit" and "validation_freq" in names:
            validates = names.get("validation_data") is not None or bool(
                names.get("validation_split")
            )
            return validates and names.get("validation_freq") != 1
    return False


def _validation_skipped(monitor: str, logs: dict | None) -> bool:
    """Whether `logs` are those of an epoch that did not validate, for a `val_*`
    monitor: no `val_*` key at all, though earlier epochs (or later) may have them.

    A `val_*` monitor absent from logs that do hold other validation metrics is a
    wrong name, and still an error.
    """
    if not monitor.startswith("val_") or logs is None or monitor in logs:
        return False
    return not any(key.startswith("val_") for key in logs)
