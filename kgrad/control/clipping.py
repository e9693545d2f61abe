"""`GradientClipping`: clip the real gradients inside the training step."""

from __future__ import annotations
import warnings
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Literal, get_args

import keras
import numpy as np
from keras import ops

from kgrad.callbacks.base import KgradCallback, check_positive_int, check_trainable
from kgrad.capture.optimizers import (
    check_optimizer_names,
    model_optimizers,
    select_optimizers,
)
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

    Backends: TensorFlow (with XLA, `tf.distribute` and mixed precision) and JAX,
    where the variables are optimizer state while the hook is installed (they
    travel in the jitted step's returned state and leave saved models unchanged); a
    threshold set in the middle of a JAX epoch first writes the step's state back
    to the model, so the next step uses it. Each clipped optimizer has variables of
    its own, and in `autoclip` a history of its own gradient norms.

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
        optimizers: The optimizers whose gradients are clipped, by the model
            attribute that holds them (`["g_optimizer"]`). Defaults to `None`: every
            optimizer the training step calls (a GAN's `d_optimizer` and
            `g_optimizer`, each clipped on its own gradients).

    Raises:
        ValueError: for an unknown `mode` or an out-of-range value; in
            `on_train_begin` when an optimizer clips too (`clipnorm`, `clipvalue`
            or `global_clipnorm`), the model is not compiled or `optimizers` names
            an optimizer the model does not hold.
        RuntimeError: after the first step when the model's `train_step` called
            none of the optimizers to clip (a warning when it called only some).

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

    _transient = ("_model", "_hook", "_state")

    def __init__(
        self,
        mode: ClipMode = "global_norm",
        threshold: float | None = None,
        percentile: float = 10.0,
        history_size: int = 1000,
        epsilon: float = 1e-3,
        exclude_final_layer: bool = True,
        verbose: int = 0,
        optimizers: str | Sequence[str] | None = None,
    ):
        super().__init__()
        self.optimizers = check_optimizer_names(optimizers)
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
        """The current threshold (for `autoclip`: the last computed one, or `None`;
        with several clipped optimizers, that of the first one the step calls)."""
        if self.mode == "autoclip":
            if self._state is None:
                return None
            return float(self._state.host_value(self._state.main().current_threshold))
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        if self.mode == "autoclip":
            raise ValueError(
                "`autoclip` computes its threshold from the recorded norms; set "
                f"`percentile` instead. Received: threshold={value!r}"
            )
        self._threshold = _check_threshold(value, self.mode)
        if self._state is not None:
            self._state.assign("threshold", self._threshold)

    @property
    def percentile(self) -> float:
        """`autoclip`'s percentile p; settable during training without a retrace."""
        return self._percentile

    @percentile.setter
    def percentile(self, value: float) -> None:
        self._percentile = _check_percentile(value)
        if self._state is not None:
            self._state.assign("percentile", self._percentile)

    # -- results -----------------------------------------------------------------------

    @property
    def clipped_fraction(self) -> float:
        """The fraction of steps of the last `fit()` in which anything was clipped.

        NaN before any step ran.
        """
        if self._state is None:
            return float("nan")
        seen = self._state.steps_seen() - self._first_step
        return self._state.clipped_steps() / seen if seen else float("nan")

    def history(self, optimizer: str | None = None) -> np.ndarray:
        """`autoclip`'s recorded global norms, oldest first (at most `history_size`).

        Non-finite norms are not recorded. Each clipped optimizer keeps its own
        history (its gradients have their own scale).

        Args:
            optimizer: The optimizer whose history to return, by the model
                attribute that holds it. Defaults to `None`: the first clipped
                optimizer that the step calls.

        Returns:
            A float32 vector; empty for the other modes or before training.
        """
        if self._state is None or self.mode != "autoclip":
            return np.zeros((0,), np.float32)
        part = self._state.main() if optimizer is None else self._state.parts[optimizer]
        return part.history.to_numpy()

    # -- callback hooks ----------------------------------------------------------------

    def on_train_begin(self, logs: dict | None = None) -> None:
        model = self.model
        check_trainable(model)
        self._selected = list(select_optimizers(model, self.optimizers))
        for name, optimizer in model_optimizers(model).items():
            if name in self._selected:
                self._check_optimizer(optimizer)
        hook = StepHook.attach(model)
        state = self._state
        if state is None or not state.serves(hook, self._selected):
            # Kept across `fit()` calls: the train function traced with these
            # variables is then reused.
            state = _ClipState(hook, self.mode, self.history_size, self._selected)
            self._state = state
        self._hook = hook
        state.reset(self._threshold or 0.0, self._percentile)
        self._checked_hook = False
        hook.add(
            self,
            transform=self._transform,
            optimizers=self._selected,
            state=state,
        )
        self._first_step = state.steps_seen()
        self._epoch_start = (0, self._first_step)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = (self._state.clipped_steps(), self._state.steps_seen())

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if not self._checked_hook:
            self._checked_hook = True
            self._check_hooked()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self._checked_hook:
            self._checked_hook = True
            self._check_hooked()
        clipped = self._state.clipped_steps() - self._epoch_start[0]
        seen = self._state.steps_seen() - self._epoch_start[1]
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

    def _check_hooked(self) -> None:
        used = self._hook.traced_optimizers
        clipped = [name for name in self._selected if name in used]
        if not clipped:
            raise RuntimeError(
                self._hook.unused_message(
                    "GradientClipping",
                    "Otherwise clip inside your `train_step`.",
                )
                if not used
                else (
                    f"GradientClipping clips `optimizers={self._selected}`, but the "
                    f"training step of model {self.model.name!r} calls only "
                    f"{sorted(used)}: nothing was clipped. Name those in "
                    "`optimizers=` (or leave it unset to clip every one)."
                )
            )
        unused = [name for name in self._selected if name not in used]
        if unused and self.optimizers is not None:
            warnings.warn(
                f"GradientClipping: the training step never calls {unused} of "
                f"`optimizers={self.optimizers}`; only {clipped} are clipped.",
                stacklevel=2,
            )

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

    def _depths(self, context: StepContext) -> tuple[dict[int, int], set[int]]:
        """Layer depth of each variable of the step, and the final layer's variables
        (the model is built when the step is traced). The hook's model, not
        `self.model`: on JAX that property writes the step state back to the model,
        which must not happen inside a step."""
        tracked = track_variables(self._state.hook.model)
        updated = {id(variable) for variable in context.variables}
        depth = {id(t.variable): t.depth for t in tracked if id(t.variable) in updated}
        final = max(depth.values(), default=-1)
        return depth, {key for key, value in depth.items() if value == final}

    def _transform(self, context: StepContext, gradients: list[Any]) -> list[Any]:
        mode = self.mode
        hook = self._state.hook
        part = self._state.parts[context.optimizer_name]
        threshold = hook.read(part.threshold)
        if mode == "global_norm":
            clipped, _, hit = clip.clip_by_global_norm(gradients, threshold)
        elif mode == "layer_norm":
            depth, _ = self._depths(context)
            groups: dict[int, list[int]] = defaultdict(list)
            for index, variable in enumerate(context.variables):
                groups[depth.get(id(variable), -1 - index)].append(index)
            clipped, hit = clip.clip_by_group_norm(
                gradients, list(groups.values()), threshold
            )
        elif mode == "value":
            clipped, hit = clip.clip_by_value(gradients, threshold)
        elif mode == "autoclip":
            norm = clip.gradients_global_norm(gradients)
            percentile = hook.read(part.percentile)
            threshold = part.history.record_and_percentile(norm, percentile)
            part.current_threshold.assign(threshold)
            clipped, _, hit = clip.clip_by_global_norm(gradients, threshold, norm)
        else:
            _, final_layer = self._depths(context)
            skip = [
                self.exclude_final_layer and id(variable) in final_layer
                for variable in context.variables
            ]
            clipped, hit = clip.adaptive_clip(
                gradients,
                [variable.value for variable in context.variables],
                threshold,
                self.epsilon,
                skip,
                fused=not hook.model.jit_compile,  # traced with the step: its setting
            )
        hook.increment(part.clipped_steps, ops.cast(hit, hook.backend.INDEX_DTYPE))
        return clipped


class _OptimizerClipState:
    """The variables that the calls of one optimizer read and write in the step (on
    JAX that optimizer's state: its stateless `apply` carries no other variable)."""

    def __init__(self, hook: StepHook, mode: str, history_size: int, optimizer: str):
        def make(value: Any, dtype: str, name: str) -> Any:
            return hook.make_variable(value, dtype, name, optimizer=optimizer)

        self.threshold = make(0.0, "float32", "kgrad_clip_threshold")
        self.percentile = make(0.0, "float32", "kgrad_clip_percentile")
        self.current_threshold = self.history = None
        if mode == "autoclip":
            self.current_threshold = make(float("nan"), "float32", "kgrad_clip_current")
            self.history = NormHistory(hook, history_size, optimizer=optimizer)
        self.clipped_steps = make(0, hook.backend.INDEX_DTYPE, "kgrad_clipped_steps")


class _ClipState:
    """What `GradientClipping` writes in the step, per clipped optimizer, kept across
    `fit()` calls; read and set on the host through the backend (on JAX the values
    of the middle of an epoch live in the step's returned state)."""

    def __init__(
        self, hook: StepHook, mode: str, history_size: int, optimizers: Sequence[str]
    ):
        self.hook = hook
        self._optimizers = {name: hook.optimizers[name] for name in optimizers}
        self.parts = {
            name: _OptimizerClipState(hook, mode, history_size, name)
            for name in optimizers
        }

    def serves(self, hook: StepHook, optimizers: Sequence[str]) -> bool:
        """Whether these variables belong to `hook` and these very optimizers (a new
        `compile()` replaces them)."""
        return (
            hook is self.hook
            and list(optimizers) == list(self._optimizers)
            and all(hook.optimizers.get(k) is v for k, v in self._optimizers.items())
        )

    def reset(self, threshold: float, percentile: float) -> None:
        """Sets the thresholds and empties the counts and histories (before a fit)."""
        for part in self.parts.values():
            part.threshold.assign(threshold)
            part.percentile.assign(percentile)
            part.clipped_steps.assign(0)
            if part.history is not None:  # each `fit()` starts its own history
                part.history.reset()
                part.current_threshold.assign(float("nan"))

    def assign(self, name: str, value: float) -> None:
        """Sets the variable `name` of every optimizer, for the next step to use."""
        backend, model = self.hook.backend, self.hook.model
        for part in self.parts.values():
            backend.host_assign(model, getattr(part, name), value)

    def host_value(self, variable: Any) -> np.ndarray:
        return np.asarray(self.hook.backend.host_value(self.hook.model, variable))

    def main(self) -> _OptimizerClipState:
        """The state of the first clipped optimizer that the step calls."""
        used = self.hook.traced_optimizers
        return next(
            (part for name, part in self.parts.items() if name in used),
            next(iter(self.parts.values())),
        )

    def clipped_steps(self) -> int:
        """Calls of the clipped optimizers so far in which something was clipped."""
        return sum(int(self.host_value(p.clipped_steps)) for p in self.parts.values())

    def steps_seen(self) -> int:
        """Calls of the clipped optimizers so far (the hook counts them)."""
        return sum(
            int(self.host_value(self.hook.step_variable(name))) for name in self.parts
        )
