"""`LearningRateWarmup`: warm the learning rate of every optimizer the step uses."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from typing import Any

import keras
import numpy as np

from kgrad import backend
from kgrad.callbacks.base import KgradCallback, check_positive_int
from kgrad.capture.optimizers import (
    check_optimizer_names,
    model_optimizers,
    select_optimizers,
)
from kgrad.control.arguments import check_number
from kgrad.control.warmup_schedule import (
    WarmupShape,
    check_warmup_arguments,
    warmup_curve,
)


def _host_value(model: keras.Model | None, variable: Any) -> Any:
    """A variable's current value between steps (on JAX, from the step's state)."""
    if model is not None and isinstance(variable, keras.Variable):
        return backend.current().host_value(model, variable)
    return keras.ops.convert_to_numpy(variable)


def _current_learning_rate(
    optimizer: keras.optimizers.Optimizer, model: keras.Model | None = None
) -> float:
    rate = getattr(optimizer, "_learning_rate", None)
    if not isinstance(rate, keras.Variable):
        rate = optimizer.learning_rate
    return float(_host_value(model, rate))


def _iterations(optimizer: keras.optimizers.Optimizer, model: keras.Model | None = None) -> int:
    return int(_host_value(model, optimizer.iterations))


def _schedule_of(optimizer: keras.optimizers.Optimizer) -> object | None:
    """The optimizer's learning-rate schedule (which cannot be set), or `None`."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    rate = getattr(inner, "_learning_rate", None)
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule) or (
        callable(rate) and not isinstance(rate, keras.Variable)
    ):
        return rate
    return None


def _schedule_error(schedules: dict[str, object]) -> TypeError:
    names = ", ".join(
        f"{name} ({type(rate).__name__})" for name, rate in schedules.items()
    )
    return TypeError(
        "LearningRateWarmup sets `optimizer.learning_rate` at every step, but the "
        f"learning rate of {names} is a schedule, which cannot be set. Wrap the "
        "schedule instead: `learning_rate=kgrad.WarmupSchedule(schedule, "
        "warmup_steps=...)`, and drop LearningRateWarmup (or leave that optimizer out "
        "of `optimizers=`)."
    )


def log_key(name: str) -> str:
    """The logs key of an optimizer's rate: `learning_rate` for `model.optimizer`."""
    return "learning_rate" if name == "optimizer" else f"learning_rate/{name}"


class LearningRateWarmup(KgradCallback):
    """Raises the learning rate from a start to the target over the first steps.

    At the beginning of each of the first T steps of a `fit()` call (T =
    `warmup_steps`, or `warmup_epochs` × the steps per epoch) the callback sets each
    warmed optimizer's `learning_rate` to `warmup_curve(t/T, start, target, shape)`:

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

    Which optimizers: by default every optimizer that the training step uses, each
    from and to its own rate. A custom `train_step` (the keras-io GAN pattern,
    `compile(d_optimizer=..., g_optimizer=...)`) calls optimizers the model holds as
    attributes while `compile()` leaves an unused default in `model.optimizer`. The
    step's optimizers are learned from the first batch: those whose `iterations`
    moved. The first step runs with every candidate set to its start; after it, the
    rate of an optimizer the step did not use is set back to its value at the start
    of training and left alone from then on. `optimizers=["g_optimizer"]` (names from
    `kgrad.capture.optimizers.model_optimizers`) warms exactly those; one that the
    first batch did not use is warned about and warmed all the same.

    The warm-up counts steps from the start of each `fit()` call. With
    `steps_per_execution` > 1 the rate is set once per execution, from its first
    step. Each warmed optimizer's rate goes into the batch and epoch logs, as
    `learning_rate` for `model.optimizer` and `learning_rate/<name>` for the others.

    For an optimizer built with a `LearningRateSchedule` (whose rate cannot be set),
    use `kgrad.WarmupSchedule` instead.

    Args:
        warmup_steps: T in steps (> 0). Defaults to `None`.
        warmup_epochs: T in epochs (> 0), converted with the steps per epoch.
            Defaults to `None`. Give exactly one of the two.
        start_learning_rate: The rate at step 0, for every warmed optimizer.
            Defaults to `None`.
        start_factor: The rate at step 0 as a fraction of each optimizer's target,
            in (0, 1]. Defaults to `None`. With neither given the warm-up starts at
            `0.0` (not allowed for `exponential`, which needs a start > 0).
        target_learning_rate: The rate at the end of the warm-up, for every warmed
            optimizer. Defaults to `None`: each optimizer's own rate when training
            begins.
        shape: `"linear"`, `"cosine"` or `"exponential"`. Defaults to `"linear"`.
        optimizers: The name, or a list of names, of the model's optimizers to warm
            (`"optimizer"` for `model.optimizer`, `"d_optimizer"`, ...). Defaults
            to `None`: every optimizer the training step uses.
        verbose: `1` prints a line at the hand-over. Defaults to `0`.

    Raises:
        ValueError: for `warmup_steps`/`warmup_epochs` ≤ 0, both or neither given, a
            bad start or shape, a bad `optimizers`; in `on_train_begin`, a model
            that holds none of the optimizers named, or `warmup_epochs` with an
            epoch length Keras does not know.
        TypeError: in `on_train_begin`, when the learning rate of an optimizer to
            warm is a schedule; after the first batch, when the step uses an
            optimizer with a schedule.

    References:
        Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in
        1 Hour" (linear warm-up over 5 epochs).

    Example:

    >>> warmup = kgrad.LearningRateWarmup(warmup_epochs=5, start_factor=0.1)
    >>> model.fit(x, y, epochs=30, callbacks=[warmup])  # doctest: +SKIP
    """

    _transient = (
        "_model",
        "_optimizers",
        "_warmed",
        "_schedules",
        "_iterations_at_start",
    )

    def __init__(
        self,
        warmup_steps: int | None = None,
        warmup_epochs: int | None = None,
        start_learning_rate: float | None = None,
        start_factor: float | None = None,
        target_learning_rate: float | None = None,
        shape: WarmupShape = "linear",
        optimizers: str | Sequence[str] | None = None,
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
        self.optimizers = check_optimizer_names(optimizers)
        self.verbose = verbose
        # Not async-safe: the batch-end hook reads the optimizers' `iterations` after
        # the first batch and their rates after the hand-over, and Keras would run it
        # on a worker thread on JAX and torch, where reading optimizer state syncs
        # (on JAX: reads buffers that the next step donates).
        self.async_safe = False
        self._optimizers: dict[str, keras.optimizers.Optimizer] = {}
        self._warmed: dict[str, keras.optimizers.Optimizer] = {}
        self._schedules: dict[str, object] = {}
        self._iterations_at_start: dict[str, tuple] = {}

    def learning_rate_at(self, step: int, optimizer: str | None = None) -> float:
        """The warm-up rate of step `step` of the current `fit()` (after it began).

        Args:
            step: The 0-based step of this `fit()` call.
            optimizer: The name of a warmed optimizer. Defaults to `None`: the only
                one warmed.

        Raises:
            ValueError: if `optimizer` is not warmed, or is `None` while several are.
        """
        if optimizer is None and len(self._targets) == 1:
            optimizer = next(iter(self._targets))
        if optimizer not in self._targets:
            raise ValueError(
                f"`optimizer` must name one of the warmed optimizers: "
                f"{', '.join(self._targets) or 'none'}. "
                f"Received: optimizer={optimizer!r}"
            )
        fraction = min(step / self._total_steps, 1.0)
        return warmup_curve(
            fraction, self._starts[optimizer], self._targets[optimizer], self.shape
        )

    # -- callback hooks ----------------------------------------------------------------

    def on_train_begin(self, logs: dict | None = None) -> None:
        optimizers = select_optimizers(self.model, self.optimizers)
        schedules = {
            name: _schedule_of(optimizer)
            for name, optimizer in optimizers.items()
            if _schedule_of(optimizer) is not None
        }
        # Named, or the only candidates: an error now. Otherwise only if the first
        # batch shows that the step uses them.
        named_or_all = self.optimizers is not None or len(schedules) == len(optimizers)
        if schedules and named_or_all:
            raise _schedule_error(schedules)
        self._total_steps = self._steps_to_warm()
        self._optimizers = optimizers
        self._schedules = schedules
        self._warmed = {
            name: optimizer
            for name, optimizer in optimizers.items()
            if name not in schedules
        }
        self._initial_rates = {
            name: _current_learning_rate(optimizer)
            for name, optimizer in self._warmed.items()
        }
        self._targets = {
            name: float(self.target_learning_rate)
            if self.target_learning_rate is not None
            else rate
            for name, rate in self._initial_rates.items()
        }
        self._starts = {
            name: self.start_factor * target
            if self.start_factor is not None
            else float(self.start_learning_rate or 0.0)
            for name, target in self._targets.items()
        }
        # Every optimizer of the model, to say which ones the step used.
        self._iterations_at_start = {
            name: (optimizer, _iterations(optimizer))
            for name, optimizer in model_optimizers(self.model).items()
        }
        self._learned = False
        self._epoch_first_step = 0
        self._batches_done = 0
        self._last_set: dict[str, float] = {}
        self._handed_over = False

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self._handed_over:
            return
        step = self._epoch_first_step + batch
        # `self.model`: on JAX it writes the step's state back into the variables,
        # so that the next step takes the rates set here (a no-op elsewhere).
        self.model  # noqa: B018
        if step < self._total_steps:
            for name, optimizer in self._warmed.items():
                self._last_set[name] = self.learning_rate_at(step, name)
                optimizer.learning_rate = self._last_set[name]
        else:
            self._hand_over()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._batches_done = batch + 1
        if not self._learned:
            self._learned = True
            self._keep_the_optimizers_used()
        if logs is None:
            return
        step = self._epoch_first_step + batch
        for name, optimizer in self._warmed.items():
            logs[log_key(name)] = (
                self.learning_rate_at(step, name)
                if step < self._total_steps
                else _current_learning_rate(optimizer, self._model)
            )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_first_step += self._batches_done
        self._batches_done = 0
        # Hand over before the next epoch begins, so that a LearningRateScheduler's
        # `on_epoch_begin` already starts from the target.
        if not self._handed_over and self._epoch_first_step >= self._total_steps:
            self._hand_over()
        if logs is not None:
            for name, optimizer in self._warmed.items():
                logs[log_key(name)] = _current_learning_rate(optimizer)

    # -- internals ---------------------------------------------------------------------

    def _steps_to_warm(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        steps_per_epoch = (self.params or {}).get("steps")
        if not steps_per_epoch:
            raise ValueError(
                "`warmup_epochs` needs the number of steps per epoch, which Keras "
                "does not know for this data (a dataset of unknown length). Pass "
                "`steps_per_epoch` to `fit`, or use `warmup_steps`. Received: "
                f"warmup_epochs={self.warmup_epochs}"
            )
        return self.warmup_epochs * steps_per_epoch

    def _keep_the_optimizers_used(self) -> None:
        """After the first batch: which optimizers the step called (their iterations
        moved). Unused ones are set back and dropped, or, if named, warned about."""
        used = [
            name
            for name, (optimizer, start) in self._iterations_at_start.items()
            if _iterations(optimizer, self._model) != start
        ]
        used_schedules = {
            name: self._schedules[name] for name in used if name in self._schedules
        }
        if used_schedules:
            raise _schedule_error(used_schedules)
        unused = [name for name in self._warmed if name not in used]
        if self.optimizers is not None:
            if unused:
                warnings.warn(
                    f"LearningRateWarmup: `optimizers={self.optimizers!r}` names "
                    f"{', '.join(unused)}, which the training step did not use in its "
                    "first batch (their `iterations` did not move); they are warmed "
                    "up all the same. The step used: "
                    f"{', '.join(used) or 'none of the model optimizers'}.",
                    stacklevel=2,
                )
            return
        for name in unused:
            self._warmed.pop(name).learning_rate = self._initial_rates[name]
            self._last_set.pop(name, None)
        if not self._warmed:
            warnings.warn(
                "LearningRateWarmup warms nothing: the training step used none of the "
                f"optimizers of model {self.model.name!r} "
                f"({', '.join(self._optimizers)}) in its first batch.",
                stacklevel=2,
            )

    def _hand_over(self) -> None:
        self._handed_over = True
        finals = []
        for name, optimizer in self._warmed.items():
            current = _current_learning_rate(optimizer)
            last = self._last_set.get(name)
            # A rate that differs from the last warm-up value was set by another
            # callback after the warm-up ended: keep it.
            untouched = last is None or np.float32(current) == np.float32(last)
            if untouched:
                optimizer.learning_rate = self._targets[name]
            finals.append(f"{name} {self._targets[name] if untouched else current:.4g}")
        if self.verbose:
            print(
                f"LearningRateWarmup: warm-up over after {self._total_steps} steps; "
                f"learning rate {', '.join(finals)}"
            )
