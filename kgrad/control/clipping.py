"""`GradientClipping`: clip the real gradients inside the training step."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal, get_args

import keras
import numpy as np
import tensorflow as tf

from kgrad.callbacks.base import KgradCallback, check_positive_int, check_trainable
from kgrad.capture.step_hook import StepContext, StepHook
from kgrad.capture.variables import track_variables
from kgrad.control import clipping_functions as clip
from kgrad.control.arguments import check_number
from kgrad.control.norm_history import NormHistory

ClipMode = Literal["global_norm", "layer_norm", "value", "autoclip", "agc"]
CLIP_MODES: tuple[str, ...] = get_args(ClipMode)

# The threshold of each mode when none is given: a norm of 1 for the norm and value
# modes, λ = 0.01 for AGC (Brock et al. 2021).
_DEFAULT_THRESHOLD = {"global_norm": 1.0, "layer_norm": 1.0, "value": 1.0, "agc": 0.01}
_OPTIMIZER_CLIP_OPTIONS = ("clipnorm", "clipvalue", "global_clipnorm")


def _check_threshold(value: Any, mode: str) -> float:
    label = "threshold (λ in agc mode)" if mode == "agc" else "threshold"
    return check_number(value, "threshold", greater_than=0, label=label)


def _check_percentile(value: Any) -> float:
    return check_number(value, "percentile", greater_than=0, at_most=100)


class GradientClipping(KgradCallback):
    """Clips the gradients of the real training step, with a threshold that can change.

    The clipping runs inside the compiled train function, on the gradients the
    optimizer receives (after loss-scale unscaling, summed over replicas), through the
    same `StepHook` as `GradientNormLogger`: a logger attached together with this
    callback records both the pre-clip and the post-clip norms. The threshold lives in
    a variable, so `clipping.threshold = 0.5` takes effect at the next step without a
    retrace (the optimizer's `clipnorm` is frozen when the step is traced).

    Modes:

    - `global_norm`: g ← g·min(1, c/‖g‖) over all gradients together.
    - `layer_norm`: the same rule per layer.
    - `value`: every entry clipped to [−c, c].
    - `autoclip`: `global_norm` with c the `percentile`-th percentile of the global
      norms seen so far (the current step included; the last `history_size` steps).
    - `agc`: adaptive, unit-wise: unit i is rescaled to λ·max(‖W_i‖, ε) when
      ‖G_i‖/max(‖W_i‖, ε) > λ; the final layer is left out by default.

    Cost: `global_norm` costs about what the optimizer's own `global_clipnorm`
    does. `agc` computes two unit-wise norms per variable (weights and gradients),
    each variable on its own as soon as its gradient exists, so its clipping and
    update overlap the rest of the backward pass: on the benchmark model (a small
    CPU-bound step) it costs about what `global_clipnorm` does (within 1–2%).

    At the end of each epoch `clip/fraction` (the fraction of the epoch's steps in
    which anything was clipped) and `clip/threshold` (the current threshold; for
    `autoclip` the last computed one) go into `logs`.

    Args:
        mode: One of `"global_norm"`, `"layer_norm"`, `"value"`, `"autoclip"`,
            `"agc"`. Defaults to `"global_norm"`.
        threshold: The norm c (`global_norm`, `layer_norm`), the bound c (`value`),
            or λ (`agc`); must be > 0. Not used by `autoclip`. Defaults to `None`:
            `1.0`, or `0.01` for `agc`.
        percentile: `autoclip` only: the percentile p in (0, 100]. Defaults to
            `10.0`, the paper's choice.
        history_size: `autoclip` only: how many recent global norms the percentile
            is taken over. Defaults to `1000`.
        epsilon: `agc` only: ε, the smallest weight norm a unit is measured
            against. Defaults to `1e-3`.
        exclude_final_layer: `agc` only: leave the last layer (by forward depth)
            unclipped, as the paper does. Defaults to `True`.
        verbose: `1` prints the clipped fraction after each epoch. Defaults to `0`.

    Raises:
        ValueError: for an unknown `mode` or an out-of-range value; in
            `on_train_begin` when the optimizer clips too (`clipnorm`, `clipvalue`
            or `global_clipnorm`) or the model is not compiled.
        RuntimeError: at the first epoch end when the model's `train_step` never
            handed its gradients to `model.optimizer.apply`.

    References:
        Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent
        neural networks" (clipping by norm).
        Seetharaman, Wichern, Pardo & Le Roux 2020, "AutoClip: Adaptive Gradient
        Clipping for Source Separation Networks".
        Brock, De, Smith & Simonyan 2021, "High-Performance Large-Scale Image
        Recognition Without Normalization" (AGC).

    Example:

    >>> clipping = kgrad.GradientClipping("agc", threshold=0.01)
    >>> model.fit(x, y, epochs=5, callbacks=[clipping])  # doctest: +SKIP
    >>> clipping.clipped_fraction  # doctest: +SKIP
    0.12
    """

    _transient = (
        "_model",
        "_hook",
        "_threshold_variable",
        "_percentile_variable",
        "_history",
        "_current_threshold",
        "_clipped_steps",
        "_step_counter",
    )

    def __init__(
        self,
        mode: ClipMode = "global_norm",
        threshold: float | None = None,
        percentile: float = 10.0,
        history_size: int = 1000,
        epsilon: float = 1e-3,
        exclude_final_layer: bool = True,
        verbose: int = 0,
    ):
        super().__init__()
        if mode not in CLIP_MODES:
            raise ValueError(
                f"`mode` must be one of {', '.join(CLIP_MODES)}. "
                f"Received: mode={mode!r}"
            )
        self.mode = mode
        if mode == "autoclip" and threshold is not None:
            raise ValueError(
                "`autoclip` computes its threshold from `percentile` of the recorded "
                "global norms; leave `threshold` unset. "
                f"Received: threshold={threshold!r}"
            )
        self._threshold = (
            None
            if mode == "autoclip"
            else _check_threshold(
                _DEFAULT_THRESHOLD[mode] if threshold is None else threshold, mode
            )
        )
        self._percentile = _check_percentile(percentile)
        self.history_size = check_positive_int(history_size, "history_size")
        self.epsilon = check_number(epsilon, "epsilon", greater_than=0)
        self.exclude_final_layer = bool(exclude_final_layer)
        self.verbose = verbose
        for name in self._transient:  # the run-time state, made in `on_train_begin`
            setattr(self, name, None)

    # -- settable thresholds -----------------------------------------------------------

    @property
    def threshold(self) -> float | None:
        """The current threshold (for `autoclip`: the last computed one, or `None`)."""
        if self.mode == "autoclip":
            if self._current_threshold is None:
                return None
            return float(self._current_threshold.numpy())
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        if self.mode == "autoclip":
            raise ValueError(
                "`autoclip` computes its threshold from the recorded norms; set "
                f"`percentile` instead. Received: threshold={value!r}"
            )
        self._threshold = _check_threshold(value, self.mode)
        if self._threshold_variable is not None:
            self._threshold_variable.assign(self._threshold)

    @property
    def percentile(self) -> float:
        """`autoclip`'s percentile p; settable during training without a retrace."""
        return self._percentile

    @percentile.setter
    def percentile(self, value: float) -> None:
        self._percentile = _check_percentile(value)
        if self._percentile_variable is not None:
            self._percentile_variable.assign(self._percentile)

    # -- results -----------------------------------------------------------------------

    @property
    def clipped_fraction(self) -> float:
        """The fraction of steps of the last `fit()` in which anything was clipped.

        NaN before any step ran.
        """
        if self._clipped_steps is None:
            return float("nan")
        seen = int(self._step_counter.numpy()) - self._first_step
        return int(self._clipped_steps.numpy()) / seen if seen else float("nan")

    def history(self) -> np.ndarray:
        """`autoclip`'s recorded global norms, oldest first (at most `history_size`).

        Non-finite norms are not recorded. Empty for the other modes or before
        training.
        """
        if self._history is None:
            return np.zeros((0,), np.float32)
        return self._history.to_numpy()

    # -- callback hooks ----------------------------------------------------------------

    def on_train_begin(self, logs: dict | None = None) -> None:
        model = self.model
        check_trainable(model)
        self._check_optimizer(model.optimizer)
        tracked = track_variables(model)
        self._groups: dict[int, int] = {}  # id(variable) -> layer depth
        for item in tracked:
            self._groups[id(item.variable)] = item.depth
        final_depth = max(item.depth for item in tracked)
        self._final_layer = {
            id(item.variable) for item in tracked if item.depth == final_depth
        }
        hook = StepHook.attach(model)
        self._hook = hook
        self._threshold_variable = hook.make_variable(
            self._threshold or 0.0, tf.float32, "kgrad_clip_threshold"
        )
        self._percentile_variable = hook.make_variable(
            self._percentile, tf.float32, "kgrad_clip_percentile"
        )
        if self.mode == "autoclip":
            self._current_threshold = hook.make_variable(
                float("nan"), tf.float32, "kgrad_clip_current"
            )
            self._history = NormHistory(hook, self.history_size)
        self._clipped_steps = hook.make_variable(0, tf.int64, "kgrad_clipped_steps")
        self._checked_hook = False
        hook.add(self, transform=self._transform)
        # The hook counts the steps already: the clipped fraction needs no counter
        # of its own in the traced step.
        self._step_counter = hook.step
        self._first_step = int(hook.step.numpy())
        self._epoch_start = (0, self._first_step)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = (
            int(self._clipped_steps.numpy()),
            int(self._step_counter.numpy()),
        )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self._checked_hook:
            self._checked_hook = True
            if not self._hook.traced:
                raise RuntimeError(
                    f"GradientClipping could not reach the gradients of model "
                    f"{self.model.name!r}: its `train_step` never called "
                    "`model.optimizer.apply`/`apply_gradients`, so nothing was "
                    "clipped. "
                    "Clip inside your `train_step` instead."
                )
        clipped = int(self._clipped_steps.numpy()) - self._epoch_start[0]
        seen = int(self._step_counter.numpy()) - self._epoch_start[1]
        fraction = clipped / seen if seen else float("nan")
        threshold = self.threshold
        if logs is not None:
            logs["clip/fraction"] = fraction
            logs["clip/threshold"] = float("nan") if threshold is None else threshold
        if self.verbose:
            print(
                f"GradientClipping ({self.mode}) epoch {epoch + 1}: clipped "
                f"{clipped} of {seen} steps, threshold {threshold:.4g}"
            )

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._hook is not None:
            self._hook.remove(self)
            self._hook = None

    # -- internals ---------------------------------------------------------------------

    def _check_optimizer(self, optimizer: keras.optimizers.Optimizer) -> None:
        for candidate in (optimizer, getattr(optimizer, "inner_optimizer", None)):
            for option in _OPTIMIZER_CLIP_OPTIONS:
                value = getattr(candidate, option, None)
                if value:
                    raise ValueError(
                        f"The optimizer already clips its gradients ({option}="
                        f"{value}) and GradientClipping(mode={self.mode!r}) would "
                        f"clip them again. Keep one: remove `{option}` from the "
                        "optimizer, or drop GradientClipping from the callbacks."
                    )

    def _transform(self, context: StepContext, gradients: list[Any]) -> list[Any]:
        mode = self.mode
        threshold = self._threshold_variable.read_value()
        if mode == "global_norm":
            clipped, _, hit = clip.clip_by_global_norm(gradients, threshold)
        elif mode == "layer_norm":
            groups: dict[int, list[int]] = defaultdict(list)
            for index, variable in enumerate(context.variables):
                groups[self._groups.get(id(variable), -1 - index)].append(index)
            clipped, hit = clip.clip_by_group_norm(
                gradients, list(groups.values()), threshold
            )
        elif mode == "value":
            clipped, hit = clip.clip_by_value(gradients, threshold)
        elif mode == "autoclip":
            threshold, norm = self._autoclip_threshold(gradients)
            clipped, _, hit = clip.clip_by_global_norm(gradients, threshold, norm)
        else:
            skip = [
                self.exclude_final_layer and id(variable) in self._final_layer
                for variable in context.variables
            ]
            clipped, hit = clip.adaptive_clip(
                gradients,
                [variable.value for variable in context.variables],
                threshold,
                self.epsilon,
                skip,
                fused=not self.model.jit_compile,  # traced with the step: its setting
            )
        self._clipped_steps.assign_add(tf.cast(hit, tf.int64))
        return clipped

    def _autoclip_threshold(
        self, gradients: list[Any]
    ) -> tuple[tf.Tensor, tf.Tensor]:
        norm = clip.gradients_global_norm(gradients)
        threshold = self._history.record_and_percentile(
            norm, self._percentile_variable.read_value()
        )
        self._current_threshold.assign(threshold)
        return threshold, norm
