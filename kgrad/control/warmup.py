"""`LearningRateWarmup`: warm the optimizer's learning rate up, batch by batch."""

from __future__ import annotations

import keras
import numpy as np

from kgrad.callbacks.base import KgradCallback, check_positive_int
from kgrad.control.arguments import check_number
from kgrad.control.warmup_schedule import (
    WarmupShape,
    check_warmup_arguments,
    warmup_curve,
)


def _current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class LearningRateWarmup(KgradCallback):
    """Raises the learning rate from a start to the target over the first steps.

    At the beginning of each of the first T steps of a `fit()` call (T =
    `warmup_steps`, or `warmup_epochs` × the steps per epoch) the callback sets
    `optimizer.learning_rate` to `warmup_curve(t/T, start, target, shape)`:

    - linear: lr_t = start + (target − start)·t/T
    - cosine: lr_t = start + (target − start)·(1 − cos(π·t/T))/2
    - exponential: lr_t = start·(target/start)^(t/T)

    Then it hands over: step T runs at exactly `target`, and the callback never
    touches the learning rate again, so a `ReduceLROnPlateau` or
    `LearningRateScheduler` later in training changes it as usual. During the
    warm-up this callback owns the rate (the others' changes are overwritten at the
    next step); when another callback changed the rate at the very end of the
    warm-up (an epoch end), its value is kept instead of the target. List this
    callback before `ReduceLROnPlateau` so that it sees the target.

    The warm-up counts steps from the start of each `fit()` call. With
    `steps_per_execution` > 1 the rate is set once per execution, from its first
    step. `learning_rate` goes into the batch and epoch logs.

    For an optimizer built with a `LearningRateSchedule` (whose rate cannot be set),
    use `kgrad.WarmupSchedule` instead.

    Args:
        warmup_steps: T in steps (> 0). Defaults to `None`.
        warmup_epochs: T in epochs (> 0), converted with the steps per epoch.
            Defaults to `None`. Give exactly one of the two.
        start_learning_rate: The rate at step 0. Defaults to `None`.
        start_factor: The rate at step 0 as a fraction of the target. Defaults to
            `None`. With neither given the warm-up starts at `0.0` (not allowed for
            `exponential`, which needs a start > 0).
        target_learning_rate: The rate at the end of the warm-up. Defaults to
            `None`: the optimizer's rate when training begins.
        shape: `"linear"`, `"cosine"` or `"exponential"`. Defaults to `"linear"`.
        verbose: `1` prints a line at the hand-over. Defaults to `0`.

    Raises:
        ValueError: for `warmup_steps`/`warmup_epochs` ≤ 0, both or neither given, a
            bad start or shape; in `on_train_begin`, `warmup_epochs` with an epoch
            length Keras does not know.
        TypeError: in `on_train_begin`, when the optimizer's learning rate is a
            schedule.

    References:
        Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in
        1 Hour" (linear warm-up over 5 epochs).

    Example:

    >>> warmup = kgrad.LearningRateWarmup(warmup_epochs=5, start_factor=0.1)
    >>> model.fit(x, y, epochs=30, callbacks=[warmup])  # doctest: +SKIP
    """

    def __init__(
        self,
        warmup_steps: int | None = None,
        warmup_epochs: int | None = None,
        start_learning_rate: float | None = None,
        start_factor: float | None = None,
        target_learning_rate: float | None = None,
        shape: WarmupShape = "linear",
        verbose: int = 0,
    ):
        super().__init__()
        if (warmup_steps is None) == (warmup_epochs is None):
            raise ValueError(
                "Pass exactly one of `warmup_steps` and `warmup_epochs`. Received: "
                f"warmup_steps={warmup_steps!r}, warmup_epochs={warmup_epochs!r}"
            )
        check_positive_int(warmup_steps, "warmup_steps", allow_none=True)
        check_positive_int(warmup_epochs, "warmup_epochs", allow_none=True)
        check_warmup_arguments(shape, start_learning_rate, start_factor)
        check_number(
            target_learning_rate,
            "target_learning_rate",
            greater_than=0,
            allow_none=True,
        )
        self.warmup_steps = warmup_steps
        self.warmup_epochs = warmup_epochs
        self.start_learning_rate = start_learning_rate
        self.start_factor = start_factor
        self.target_learning_rate = target_learning_rate
        self.shape = shape
        self.verbose = verbose
        # The batch hook computes the logged rate on the host (or reads it once the
        # warm-up is over): safe to run asynchronously.
        self.async_safe = True

    def learning_rate_at(self, step: int) -> float:
        """The warm-up rate of step `step` of the current `fit()` (after it began)."""
        fraction = min(step / self._total_steps, 1.0)
        return warmup_curve(fraction, self._start, self._target, self.shape)

    # -- callback hooks ----------------------------------------------------------------

    def on_train_begin(self, logs: dict | None = None) -> None:
        optimizer = self.model.optimizer
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        schedule = getattr(inner, "_learning_rate", None)
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule) or (
            callable(schedule) and not isinstance(schedule, keras.Variable)
        ):
            raise TypeError(
                "LearningRateWarmup sets `optimizer.learning_rate` at every step, but "
                f"this optimizer's learning rate is a schedule "
                f"({type(schedule).__name__}), which cannot be set. Wrap the schedule "
                "instead: `learning_rate=kgrad.WarmupSchedule(schedule, "
                "warmup_steps=...)`, and drop LearningRateWarmup."
            )
        if self.warmup_steps is not None:
            self._total_steps = self.warmup_steps
        else:
            steps_per_epoch = (self.params or {}).get("steps")
            if not steps_per_epoch:
                raise ValueError(
                    "`warmup_epochs` needs the number of steps per epoch, which Keras "
                    "does not know for this data (a dataset of unknown length). Pass "
                    "`steps_per_epoch` to `fit`, or use `warmup_steps`. Received: "
                    f"warmup_epochs={self.warmup_epochs}"
                )
            self._total_steps = self.warmup_epochs * steps_per_epoch
        self._target = (
            float(self.target_learning_rate)
            if self.target_learning_rate is not None
            else _current_learning_rate(optimizer)
        )
        if self.start_factor is not None:
            self._start = self.start_factor * self._target
        else:
            self._start = float(self.start_learning_rate or 0.0)
        self._epoch_first_step = 0
        self._batches_done = 0
        self._last_set: float | None = None
        self._handed_over = False

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self._handed_over:
            return
        step = self._epoch_first_step + batch
        if step < self._total_steps:
            self._last_set = self.learning_rate_at(step)
            self.model.optimizer.learning_rate = self._last_set
        else:
            self._hand_over()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._batches_done = batch + 1
        if logs is None:
            return
        step = self._epoch_first_step + batch
        if step < self._total_steps:
            logs["learning_rate"] = self.learning_rate_at(step)
        else:
            logs["learning_rate"] = _current_learning_rate(self.model.optimizer)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_first_step += self._batches_done
        self._batches_done = 0
        # Hand over before the next epoch begins, so that a LearningRateScheduler's
        # `on_epoch_begin` already starts from the target.
        if not self._handed_over and self._epoch_first_step >= self._total_steps:
            self._hand_over()
        if logs is not None:
            logs["learning_rate"] = _current_learning_rate(self.model.optimizer)

    # -- internals ---------------------------------------------------------------------

    def _hand_over(self) -> None:
        self._handed_over = True
        optimizer = self.model.optimizer
        current = _current_learning_rate(optimizer)
        # A rate that differs from the last warm-up value was set by another
        # callback after the warm-up ended: keep it.
        untouched = self._last_set is None or np.float32(current) == np.float32(
            self._last_set
        )
        if untouched:
            optimizer.learning_rate = self._target
        if self.verbose:
            final = self._target if untouched else current
            print(
                f"LearningRateWarmup: warm-up over after {self._total_steps} steps; "
                f"learning rate {final:.4g}"
            )
