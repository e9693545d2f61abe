"""A hook into the real training step: the gradients each optimizer actually receives.

Keras callbacks never see gradients: the default `train_step` computes them inside the
compiled train function and hands them straight to `optimizer.apply`; a custom one
(a GAN's) hands them to optimizers of its own (`self.d_optimizer.apply_gradients`).
`StepHook` wraps that call on every Keras optimizer the model holds, on the optimizer
instances only, so the unchanged `model.fit` (compiled, XLA, `steps_per_execution`,
distributed) runs observers and transforms on exactly the gradients of the step, with
no extra forward or backward pass.

What observers and transforms see:

- gradients *unscaled* (a `LossScaleOptimizer`'s dynamic scale, or an optimizer's
  `loss_scale_factor`, is divided out first);
- under a `tf.distribute` strategy with several replicas, the *aggregated* gradient (the
  per-replica gradients summed, as the optimizer will sum them);
- the variables as the step passes them, built: nothing of the model or its optimizers
  is built or read before Keras builds them in the first step, so models that Keras
  builds on their first batch (subclassed, `Sequential` without `Input`) work as they are.

The hook is Python code traced into the train function (on torch it runs at every
step, or inside `torch.compile` with `jit_compile=True`). Every set of participants has
a train function of its own, traced once and kept: a second `fit()` with the same
callbacks, and a plain `fit()` after one with them, reuse what was traced before.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import keras

from kgrad import backend as backends
from kgrad.capture.optimizers import model_optimizers

Gradients = list[Any]
Observer = Callable[["StepContext"], None]
Transform = Callable[["StepContext", Gradients], Gradients]

# The model attribute that holds its hook, set past Keras's attribute tracking so that
# nothing of the hook is tracked or saved with the model.
_HOOK_ATTRIBUTE = "_kgrad_step_hook"

# Serial numbers of participants and their state: ids are reused after garbage
# collection, serials never are.
_SERIALS: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
_COUNTER = itertools.count(1)


def serial(obj: Any) -> int:
    """A number that names `obj` for as long as it lives and is never reused."""
    if obj is None:
        return 0
    number = _SERIALS.get(obj)
    if number is None:
        number = _SERIALS[obj] = next(_COUNTER)
    return number


@dataclasses.dataclass
class StepContext:
    """What a hook participant sees inside one call of an optimizer in the step.

    Attributes:
        variables: The trainable variables the optimizer updates, aligned with the
            gradients.
        gradients: The unscaled, replica-aggregated gradients as computed by the step.
        applied: The gradients handed on to the optimizer after every transform
            (the same list as `gradients` when there is no transform).
        step: A scalar int64 tensor: the 0-based index of this call of the optimizer
            (its training step).
        strategy: The distribution strategy of the model.
        optimizer_name: The model attribute that holds the optimizer (`"optimizer"`
            for `model.optimizer`, `"d_optimizer"`, ...).
    """

    variables: list[keras.Variable]
    gradients: Gradients
    applied: Gradients
    step: Any
    strategy: Any
    optimizer_name: str = "optimizer"


def scale_gradient(gradient: Any, factor: Any) -> Any:
    """Multiplies a gradient (dense, or `tf.IndexedSlices` on TensorFlow) by `factor`;
    `None` stays `None`."""
    return backends.current().scale_gradient(gradient, factor)


def model_is_built(model: keras.Model) -> bool:
    """Whether `model` and every layer in it have their variables (Keras's own test)."""
    return bool(model.built) and all(
        layer.built for layer in model._flatten_layers(include_self=False)
    )


@dataclasses.dataclass
class _Participant:
    observe: Observer | None
    transform: Transform | None
    order: int
    optimizers: frozenset[str] | None
    token: tuple[int, int]

    def wants(self, name: str) -> bool:
        return self.optimizers is None or name in self.optimizers


class StepHook:
    """Runs observers and transforms on the gradients of the real training step.

    There is one hook per model, over every Keras optimizer the model holds
    (`model_optimizers`). Callbacks share it: each registers what it needs with `add`
    in `on_train_begin` and unregisters with `remove` in `on_train_end`; the hook
    wraps each optimizer's `apply` while anyone is registered and restores the
    optimizers when the last one leaves. In each call of an optimizer, transforms run
    in `order`; then every observer runs on the gradients before and after them.

    Each set of participants (and the state they pass to `add`) gets its own train
    function, made when the set first occurs and kept with the hook; `add` and
    `remove` put the matching one into `model.train_function`. A participant whose
    state (the variables its code writes in the step) changes must pass the new
    state to `add`, so that a function traced with the old one is not reused.

    Args:
        model: A compiled Keras model, built or not (TensorFlow, JAX or torch
            backend: see `kgrad.backend`).

    Raises:
        ValueError: if the model holds no Keras optimizer (it is not compiled).
        NotImplementedError: on a Keras backend that the hook does not support yet.

    Example:

    >>> hook = StepHook.attach(model)
    >>> hook.add(owner, observe=lambda context: None)
    >>> model.fit(x, y)  # doctest: +SKIP
    >>> hook.remove(owner)
    """

    def __init__(self, model: keras.Model):
        if not model_optimizers(model):
            raise ValueError(
                f"Model {model.name!r} is not compiled: call `model.compile(optimizer=..., "
                "loss=...)` before training with kgrad callbacks."
            )
        self.backend = backends.current()
        self.model = model
        self.strategy = self.backend.strategy(model)
        self._participants: dict[int, _Participant] = {}
        self._wrapped: dict[str, tuple[keras.optimizers.Optimizer, Any]] = {}
        self._steps: dict[str, Any] = {}
        # The state variables made for each optimizer (JAX tracks them as its state).
        self._made: dict[str, list[Any]] = {}
        self._variants: dict[tuple, Any] = {}
        self._traced: dict[tuple, set[str]] = {}
        self._key: tuple = self._make_key()
        self.optimizers = model_optimizers(model)

    @classmethod
    def attach(cls, model: keras.Model) -> "StepHook":
        """Returns the hook of `model`, creating it if needed."""
        hook = vars(model).get(_HOOK_ATTRIBUTE)
        if hook is None:
            hook = cls(model)
            object.__setattr__(model, _HOOK_ATTRIBUTE, hook)
        return hook

    # -- what the step did ----------------------------------------------------------

    @property
    def installed(self) -> bool:
        return bool(self._wrapped)

    @property
    def traced_optimizers(self) -> set[str]:
        """The optimizers that the train function now in use called when traced."""
        return set(self._traced.get(self._key, ()))

    @property
    def traced(self) -> bool:
        """Whether the train function now in use called any hooked optimizer."""
        return bool(self._traced.get(self._key))

    @property
    def state_before_step(self) -> bool:
        """Whether participants must make their state variables before the first step
        (on JAX, whose step state is fixed when `fit` starts; under a strategy with
        several replicas, where variables cannot be made in a replica context)."""
        return self.backend.STATE_BEFORE_STEP or self.strategy.num_replicas_in_sync > 1

    def step_variable(self, name: str = "optimizer") -> Any:
        """The counter of the calls of optimizer `name` (its training steps)."""
        if name not in self._steps:
            optimizer = self.optimizers[name]
            self._steps[name] = self.make_variable(
                int(optimizer.iterations.numpy()),
                self.backend.INDEX_DTYPE,
                f"kgrad_step_{name}",
                optimizer=name,
            )
        return self._steps[name]

    @property
    def step(self) -> Any:
        """The step counter of `model.optimizer`, or of the only optimizer used."""
        used = sorted(self.traced_optimizers)
        return self.step_variable(used[0] if len(used) == 1 else "optimizer")

    def unused_message(self, callback: str, advice: str) -> str:
        """What to tell a user whose step called none of the model's optimizers.

        Args:
            callback: The callback's name, to start the message with.
            advice: What else works for this callback (a sentence).
        """
        names = ", ".join(f"`model.{name}`" for name in self.optimizers)
        return (
            f"{callback} could not reach the gradients of model {self.model.name!r}: its "
            f"`train_step` called none of the Keras optimizers the model holds "
            f"({names}). kgrad sees the gradients that a Keras optimizer held by the "
            "model applies: call `self.optimizer.apply_gradients(zip(grads, "
            "variables))` in your step (or an optimizer you keep as an attribute, "
            f"such as `self.g_optimizer`). {advice}"
        )

    # -- participants -----------------------------------------------------------------

    def add(
        self,
        owner: object,
        *,
        observe: Observer | None = None,
        transform: Transform | None = None,
        order: int = 0,
        optimizers: Sequence[str] | None = None,
        state: object | None = None,
    ) -> None:
        """Registers an observer and/or a transform and installs the hook.

        Args:
            owner: The object registering (usually a callback); the key for `remove`.
            observe: Called inside the traced step with a `StepContext`.
            transform: Called inside the traced step with a `StepContext` and the
                current gradients; returns the gradients to hand on.
            order: Transforms run in increasing `order`. Defaults to `0`.
            optimizers: Names of the optimizers (see `model_optimizers`) whose calls
                this participant sees. Defaults to `None`, every optimizer.
            state: The object that holds what `observe`/`transform` write in the step
                (their variables). A train function traced with the same owner and
                state is reused. Defaults to `None`: a new state at every `add`
                (a new trace).
        """
        self._refresh()
        self._participants[id(owner)] = _Participant(
            observe,
            transform,
            order,
            None if optimizers is None else frozenset(optimizers),
            (serial(owner), serial(state) if state is not None else next(_COUNTER)),
        )
        for name in self.optimizers:
            self.step_variable(name).assign(
                int(self.optimizers[name].iterations.numpy())
            )
        self._install()
        self._select_function()

    def remove(self, owner: object) -> None:
        """Unregisters `owner`; the optimizers are restored when nobody is left."""
        if self._participants.pop(id(owner), None) is None:
            return
        if not self._participants:
            self._uninstall()
        self._select_function()

    def make_variable(
        self, initial_value: Any, dtype: Any, name: str, optimizer: str = "optimizer"
    ) -> Any:
        """Creates a non-trainable state variable that the traced step may write.

        On TensorFlow a `tf.Variable`, made eagerly even while a step is being traced
        (a model built by its first batch gets its state there); under a distribution
        strategy it is mirrored and written from the first replica only (every replica
        holds the same aggregated values). On JAX an optimizer variable of
        `optimizer`, the one whose calls write it, made before the first step
        (`state_before_step`) and tracked while the hook is installed. On torch a
        plain Keras variable, made before the first step and written in place.

        Args:
            initial_value: The initial value (its shape is the variable's).
            dtype: The dtype (`"float32"`, `"int64"`, ...).
            name: The variable's name.
            optimizer: The name of the optimizer (see `model_optimizers`) in whose
                calls the variable is written. Defaults to `"optimizer"`.
        """
        owner = self.optimizers.get(optimizer) or next(iter(self.optimizers.values()))
        variable = self.backend.make_variable(
            self.strategy, owner, initial_value, dtype, name
        )
        self._made.setdefault(optimizer, []).append(variable)
        if optimizer not in self._wrapped:
            self.backend.untrack(owner, [variable])
        return variable

    def read(self, variable: Any) -> Any:
        """The value of a state variable inside the traced step."""
        return self.backend.read(variable)

    def increment(self, variable: Any, amount: Any = 1) -> None:
        """Adds `amount` to a state variable inside the traced step."""
        self.backend.increment(variable, amount)

    def when(self, condition: Any, function: Callable[[], None]) -> None:
        """Runs `function` in the traced step only when `condition` holds.

        Writes to mirrored variables cannot sit inside a `tf.cond` in a replica
        context, and writes inside a traced JAX branch would leak from its stateless
        scope: there `function` always runs, and callers make their writes harmless
        (for example to a scratch row).
        """
        self.backend.when(self.strategy, condition, function)

    # -- installation -------------------------------------------------------------

    def _refresh(self) -> None:
        """Follows the model's optimizers (a new `compile()` may have replaced them)."""
        current = model_optimizers(self.model)
        if {k: id(v) for k, v in current.items()} != {
            k: id(v) for k, v in self.optimizers.items()
        }:
            self._uninstall()
            self.optimizers = current
            self._steps = {}
            self._variants = {}
            self._traced = {}

    def _make_key(self) -> tuple:
        return tuple(sorted(p.token for p in self._participants.values()))

    def _select_function(self) -> None:
        """Puts the train function of the current participants into the model."""
        model = self.model
        current = getattr(model, "train_function", None)
        known = any(current is function for function in self._variants.values())
        if current is not None and not known:
            # Made by Keras (a first fit, a new `compile()`): what was traced before
            # belongs to another configuration.
            self._variants = {self._key: current}
            self._traced = {self._key: self._traced.get(self._key, set())}
        self._key = self._make_key()
        function = self._variants.get(self._key)
        if function is None and current is not None:
            function = self._variants[self._key] = self.backend.new_train_function(model)
            self._traced[self._key] = set()
        if function is not None:
            model.train_function = function

    def _install(self) -> None:
        for name, optimizer in self.optimizers.items():
            if name in self._wrapped:
                continue
            original = optimizer.apply

            def apply(grads, trainable_variables=None, _name=name, _original=original):
                return self._apply(_name, _original, grads, trainable_variables)

            optimizer.apply = apply
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                # JAX's step calls `stateless_apply`, which this optimizer does not
                # route through `apply`: it calls its inner optimizer's inside a
                # branch on the gradients' finiteness, where state cannot be written.
                original_stateless = optimizer.stateless_apply

                def stateless_apply(
                    optimizer_variables, grads, trainable_variables,
                    _name=name, _original=original_stateless,
                ):
                    return self._stateless_apply(
                        _name, _original, optimizer_variables, grads, trainable_variables
                    )

                optimizer.stateless_apply = stateless_apply
            self._wrapped[name] = (optimizer, original)
            self.backend.track(optimizer, self._made.get(name, []))

    def _uninstall(self) -> None:
        for name, (optimizer, _) in self._wrapped.items():
            # The instance attribute shadows the class method; deleting it restores it.
            for method in ("apply", "stateless_apply"):
                if method in vars(optimizer):
                    delattr(optimizer, method)
            self.backend.untrack(optimizer, self._made.get(name, []))
        self._wrapped = {}

    # -- the traced step -----------------------------------------------------------

    def _loss_scale(self, optimizer: keras.optimizers.Optimizer) -> Any:
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            return optimizer.dynamic_scale
        return getattr(optimizer, "loss_scale_factor", None)

    def _apply(
        self, name: str, original: Any, grads: Sequence[Any], trainable_variables: Any
    ) -> Any:
        optimizer = self.optimizers[name]
        self._traced.setdefault(self._key, set()).add(name)
        grads = list(grads)
        if trainable_variables is None:
            trainable_variables = optimizer._trainable_variables
        variables = list(trainable_variables)
        participants = [p for p in self._participants.values() if p.wants(name)]
        if not participants or not grads:
            return original(grads, trainable_variables)
        if not optimizer.built and isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer
        ):
            # What `apply` itself does first: the loss scale is optimizer state, built
            # from the variables the step passes.
            with keras.name_scope(optimizer.name, caller=optimizer):
                optimizer.build(variables)
            optimizer.built = True
        grads = self._run_participants(name, participants, grads, variables)
        result = original(grads, trainable_variables)
        self.backend.increment(self._steps[name], 1)
        return result

    def _stateless_apply(
        self,
        name: str,
        original: Any,
        optimizer_variables: Sequence[Any],
        grads: Sequence[Any],
        trainable_variables: Sequence[Any],
    ) -> Any:
        """A `LossScaleOptimizer`'s `stateless_apply`: the participants run before
        its branch on finiteness, in a scope over the step's values, and their
        writes go on to it in `optimizer_variables`."""
        optimizer = self.optimizers[name]
        self._traced.setdefault(self._key, set()).add(name)
        grads = list(grads)
        participants = [p for p in self._participants.values() if p.wants(name)]
        if not participants or not grads:
            return original(optimizer_variables, grads, trainable_variables)
        variables = list(optimizer._trainable_variables)
        mapping = list(zip(variables, trainable_variables)) + list(
            zip(optimizer.variables, optimizer_variables)
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            grads = self._run_participants(name, participants, grads, variables)
            self.backend.increment(self._steps[name], 1)
        written = [scope.get_current_value(v) for v in optimizer.variables]
        return original(written, grads, trainable_variables)

    def _run_participants(
        self,
        name: str,
        participants: list[_Participant],
        grads: Gradients,
        variables: list[keras.Variable],
    ) -> Gradients:
        """Runs the transforms and observers on one call's gradients; returns the
        gradients to hand on to the optimizer (scaled and shared as it expects)."""
        optimizer = self.optimizers[name]
        scale = self._loss_scale(optimizer)
        scaled = self.backend.scale_gradient
        unscaled = grads if scale is None else [scaled(g, 1.0 / scale) for g in grads]

        replicas = self.strategy.num_replicas_in_sync
        aggregated = self.backend.aggregate(self.strategy, unscaled)

        step_variable = self._steps[name]
        context = StepContext(
            variables=variables,
            gradients=aggregated,
            applied=aggregated,
            step=self.backend.read(step_variable),
            strategy=self.strategy,
            optimizer_name=name,
        )
        transformed = aggregated
        transforms = [p for p in participants if p.transform is not None]
        for participant in sorted(transforms, key=lambda p: p.order):
            transformed = participant.transform(context, transformed)
        context.applied = transformed
        for participant in participants:
            if participant.observe is not None:
                participant.observe(context)

        if transformed is not aggregated:
            # Each replica hands on its share of the transformed aggregate, so that the
            # optimizer's own sum over replicas yields exactly the transformed gradient.
            if scale is None and replicas == 1:
                grads = transformed
            else:
                share = 1.0 / replicas if replicas > 1 else 1.0
                factor = share if scale is None else scale * share
                grads = [scaled(g, factor) for g in transformed]
        return grads
