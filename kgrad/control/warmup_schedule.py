"""Learning-rate warm-up: the curve, and `WarmupSchedule` wrapping any schedule.

The curve is one pure function, shared by the schedule (in-graph, on tensors) and by
the `LearningRateWarmup` callback (on the host, on floats).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, get_args

import keras

from kgrad.callbacks.base import check_positive_int
from kgrad.control.arguments import check_number

WarmupShape = Literal["linear", "cosine", "exponential"]
WARMUP_SHAPES: tuple[str, ...] = get_args(WarmupShape)


def warmup_curve(
    fraction: Any,
    start: Any,
    target: Any,
    shape: WarmupShape = "linear",
    cos: Callable[[Any], Any] = math.cos,
) -> Any:
    """The warm-up learning rate at `fraction` = t/T of the way from start to target.

    - linear: lr_t = start + (target − start)·t/T
    - cosine: lr_t = start + (target − start)·(1 − cos(π·t/T))/2
    - exponential: lr_t = start·(target/start)^(t/T)  (start > 0)

    Every shape gives `start` at t = 0 and `target` at t = T.

    Args:
        fraction: t/T, a float or a tensor in [0, 1].
        start: The learning rate at t = 0.
        target: The learning rate at t = T.
        shape: `"linear"`, `"cosine"` or `"exponential"`. Defaults to `"linear"`.
        cos: The cosine to use: `math.cos` for floats (the default),
            `keras.ops.cos` for tensors.

    Returns:
        The learning rate, a float or a tensor like `fraction`.

    References:
        Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in
        1 Hour" (linear warm-up).

    Example:

    >>> warmup_curve(0.5, 0.0, 0.1)
    0.05
    >>> round(warmup_curve(0.5, 0.001, 0.1, "exponential"), 6)
    0.01
    """
    if shape == "linear":
        return start + (target - start) * fraction
    if shape == "cosine":
        return start + (target - start) * (1.0 - cos(math.pi * fraction)) / 2.0
    if shape == "exponential":
        return start * (target / start) ** fraction
    raise ValueError(
        f"`shape` must be one of {', '.join(WARMUP_SHAPES)}. Received: shape={shape!r}"
    )


def check_warmup_arguments(
    shape: Any, start_learning_rate: Any, start_factor: Any
) -> None:
    """Validates the arguments shared by `WarmupSchedule` and `LearningRateWarmup`.

    Raises:
        ValueError: for an unknown `shape`, both starts given, a negative
            `start_learning_rate`, a `start_factor` outside (0, 1], or an exponential
            warm-up without a start > 0.
    """
    if shape not in WARMUP_SHAPES:
        raise ValueError(
            f"`shape` must be one of {', '.join(WARMUP_SHAPES)}. "
            f"Received: shape={shape!r}"
        )
    if start_learning_rate is not None and start_factor is not None:
        raise ValueError(
            "Pass `start_learning_rate` or `start_factor`, not both. Received: "
            f"start_learning_rate={start_learning_rate!r}, "
            f"start_factor={start_factor!r}"
        )
    # A factor is a fraction of the target: 0 would be no factor at all (omit it, or
    # pass start_learning_rate=0), above 1 a warm-down.
    check_number(
        start_factor, "start_factor", greater_than=0, at_most=1, allow_none=True
    )
    start = check_number(
        start_learning_rate, "start_learning_rate", at_least=0, allow_none=True
    )
    if shape == "exponential" and start == 0:
        raise ValueError(
            "An exponential warm-up multiplies the start, so `start_learning_rate` "
            f"must be > 0. Received: start_learning_rate={start_learning_rate!r}"
        )
    if shape == "exponential" and start_learning_rate is None and start_factor is None:
        raise ValueError(
            "An exponential warm-up needs a start > 0: pass `start_factor` (for "
            "example 0.01) or `start_learning_rate`."
        )


@keras.saving.register_keras_serializable(package="kgrad")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Warms the learning rate up, then hands over to another schedule (or a float).

    For step t < `warmup_steps` = T the rate follows `warmup_curve` from the start
    to the target, the base's rate at its own step 0. From step T on it is
    `base(t − T)`: the base schedule is *offset* by the warm-up, so it starts at
    its beginning when the warm-up ends (a float base is returned as is).

    Serializable (`get_config`/`from_config`, the base schedule included), so a model
    compiled with it round-trips through a `.keras` file with `safe_mode=True`.

    Args:
        base: The learning rate after warm-up: a float or a `LearningRateSchedule`.
        warmup_steps: T, the number of warm-up steps (> 0).
        start_learning_rate: The rate at step 0. Defaults to `None`.
        start_factor: The rate at step 0 as a fraction of the target, in (0, 1].
            Defaults to `None`. With neither given the warm-up starts at `0.0`
            (not allowed for `exponential`, which needs a start > 0).
        shape: `"linear"`, `"cosine"` or `"exponential"`. Defaults to `"linear"`.
        name: The schedule's name. Defaults to `"WarmupSchedule"`.

    Raises:
        ValueError: for `warmup_steps` ≤ 0, an unknown `shape`, a bad start or a
            `base` that is neither a number nor a schedule.

    References:
        Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in
        1 Hour".

    Example:

    >>> base = keras.optimizers.schedules.ExponentialDecay(0.1, 1000, 0.5)
    >>> schedule = WarmupSchedule(base, warmup_steps=500)
    >>> optimizer = keras.optimizers.SGD(learning_rate=schedule)
    >>> float(schedule(250))
    0.05000000074505806
    """

    def __init__(
        self,
        base: float | keras.optimizers.schedules.LearningRateSchedule,
        warmup_steps: int,
        start_learning_rate: float | None = None,
        start_factor: float | None = None,
        shape: WarmupShape = "linear",
        name: str = "WarmupSchedule",
    ):
        super().__init__()
        is_number = isinstance(base, (int, float)) and not isinstance(base, bool)
        if not is_number and not isinstance(
            base, keras.optimizers.schedules.LearningRateSchedule
        ):
            raise ValueError(
                "`base` must be a float learning rate or a "
                "`keras.optimizers.schedules.LearningRateSchedule`. Received: "
                f"base of type {type(base).__name__}"
            )
        self.base = float(base) if is_number else base
        self.warmup_steps = check_positive_int(warmup_steps, "warmup_steps")
        check_warmup_arguments(shape, start_learning_rate, start_factor)
        self.start_learning_rate = start_learning_rate
        self.start_factor = start_factor
        self.shape = shape
        self.name = name

    def _base_rate(self, step: Any) -> Any:
        if isinstance(self.base, float):
            return keras.ops.convert_to_tensor(self.base, "float32")
        return keras.ops.cast(self.base(step), "float32")

    def __call__(self, step: Any) -> Any:
        step = keras.ops.cast(step, "float32")
        warmup_steps = float(self.warmup_steps)
        target = self._base_rate(keras.ops.zeros_like(step))
        if self.start_factor is not None:
            start = target * self.start_factor
        else:
            start = keras.ops.cast(self.start_learning_rate or 0.0, "float32")
        fraction = keras.ops.clip(step / warmup_steps, 0.0, 1.0)
        warming = warmup_curve(fraction, start, target, self.shape, cos=keras.ops.cos)
        after = self._base_rate(keras.ops.maximum(step - warmup_steps, 0.0))
        return keras.ops.where(step < warmup_steps, warming, after)

    def get_config(self) -> dict[str, Any]:
        base = (
            self.base
            if isinstance(self.base, float)
            else keras.optimizers.schedules.serialize(self.base)
        )
        return {
            "base": base,
            "warmup_steps": self.warmup_steps,
            "start_learning_rate": self.start_learning_rate,
            "start_factor": self.start_factor,
            "shape": self.shape,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "WarmupSchedule":
        config = dict(config)
        if isinstance(config["base"], dict):
            config["base"] = keras.optimizers.schedules.deserialize(config["base"])
        return cls(**config)
