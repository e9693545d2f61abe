"""A hook into the real training step: the gradients the optimizer actually receives.

Keras callbacks never see gradients: the default `train_step` computes them inside the
compiled train function and hands them straight to `optimizer.apply`. `StepHook` wraps
that one call, on the optimizer instance only, so the unchanged `model.fit` (compiled,
XLA, `steps_per_execution`, distributed) runs observers and transforms on exactly the
gradients of the step, with no extra forward or backward pass.

What observers and transforms see:

- gradients *unscaled* (a `LossScaleOptimizer`'s dynamic scale, or an optimizer's
  `loss_scale_factor`, is divided out first);
- under a `tf.distribute` strategy with several replicas, the *aggregated* gradient (the
  per-replica gradients summed, as the optimizer will sum them);
- on the TensorFlow backend only: the hook is traced into the train function, so the
  model's train function is rebuilt whenever the hook is installed or removed.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

Gradients = list[Any]
Observer = Callable[["StepContext"], None]
Transform = Callable[["StepContext", Gradients], Gradients]

# Kept outside the optimizer so that nothing of the hook is tracked or saved with it.
_HOOKS: "weakref.WeakKeyDictionary[Any, StepHook]" = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class StepContext:
    """What a hook participant sees inside one training step.

    Attributes:
        variables: The trainable variables, aligned with the gradients.
        gradients: The unscaled, replica-aggregated gradients as computed by the step.
        applied: The gradients handed on to the optimizer after every transform
            (the same list as `gradients` when there is no transform).
        step: A scalar int64 tensor: the 0-based index of this training step.
        strategy: The distribution strategy of the model.
    """

    variables: list[keras.Variable]
    gradients: Gradients
    applied: Gradients
    step: tf.Tensor
    strategy: tf.distribute.Strategy


def scale_gradient(gradient: Any, factor: Any) -> Any:
    """Multiplies a dense gradient or `tf.IndexedSlices` by `factor`; `None` stays `None`."""
    if gradient is None:
        return None
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(
            gradient.values * tf.cast(factor, gradient.values.dtype),
            gradient.indices,
            gradient.dense_shape,
        )
    return gradient * tf.cast(factor, gradient.dtype)


class StepHook:
    """Runs observers and transforms on the gradients of the real training step.

    There is at most one hook per optimizer. Callbacks share it: each registers what it
    needs with `add` in `on_train_begin` and unregisters with `remove` in
    `on_train_end`; the hook wraps `optimizer.apply` while anyone is registered and
    restores the optimizer when the last one leaves. Transforms run in `order`; then
    every observer runs on the gradients before and after the transforms.

    Args:
        model: A compiled Keras model (TensorFlow backend).

    Raises:
        ValueError: if the model is not compiled.

    Example:

    >>> hook = StepHook.attach(model)
    >>> hook.add(owner, observe=lambda context: None)
    >>> model.fit(x, y)  # doctest: +SKIP
    >>> hook.remove(owner)
    """

    def __init__(self, model: keras.Model):
        if getattr(model, "optimizer", None) is None:
            raise ValueError(
                f"Model {model.name!r} is not compiled: call `model.compile(optimizer=..., "
                "loss=...)` before training with kgrad callbacks."
            )
        self.model = model
        self.optimizer = model.optimizer
        self.strategy = model.distribute_strategy
        self._observers: dict[int, Observer] = {}
        self._transforms: dict[int, tuple[int, Transform]] = {}
        self._original_apply = None
        self.traced = False
        self.step: tf.Variable | None = None

    @classmethod
    def attach(cls, model: keras.Model) -> "StepHook":
        """Returns the hook of `model.optimizer`, creating it if needed."""
        optimizer = getattr(model, "optimizer", None)
        hook = _HOOKS.get(optimizer) if optimizer is not None else None
        if hook is None or hook.model is not model:
            hook = cls(model)
        return hook

    @property
    def installed(self) -> bool:
        return self._original_apply is not None

    def add(
        self,
        owner: object,
        *,
        observe: Observer | None = None,
        transform: Transform | None = None,
        order: int = 0,
    ) -> None:
        """Registers an observer and/or a transform and (re)installs the hook.

        Args:
            owner: The object registering (usually a callback); the key for `remove`.
            observe: Called inside the traced step with a `StepContext`.
            transform: Called inside the traced step with a `StepContext` and the
                current gradients; returns the gradients to hand on.
            order: Transforms run in increasing `order`. Defaults to `0`.
        """
        if observe is not None:
            self._observers[id(owner)] = observe
        if transform is not None:
            self._transforms[id(owner)] = (order, transform)
        self._install()

    def remove(self, owner: object) -> None:
        """Unregisters `owner`; the optimizer is restored when nobody is left."""
        self._observers.pop(id(owner), None)
        self._transforms.pop(id(owner), None)
        if not self._observers and not self._transforms:
            self._uninstall()
        else:
            self._retrace()

    def make_variable(self, initial_value: Any, dtype: Any, name: str) -> tf.Variable:
        """Creates a non-trainable state variable that the traced step may write.

        Under a distribution strategy the variable is mirrored and written from the
        first replica only (every replica holds the same aggregated values).
        """
        with self.strategy.scope():
            return tf.Variable(
                initial_value,
                dtype=dtype,
                trainable=False,
                name=name,
                synchronization=tf.VariableSynchronization.ON_WRITE,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )

    def when(self, condition: tf.Tensor, function: Callable[[], None]) -> None:
        """Runs `function` in the traced step only when `condition` holds.

        Writes to mirrored variables cannot sit inside a `tf.cond` in a replica
        context, so with several replicas `function` always runs; callers then make
        their writes harmless (for example to a scratch row).
        """
        if self.strategy.num_replicas_in_sync > 1:
            function()
            return
        tf.cond(condition, lambda: (function(), tf.constant(True))[1], lambda: False)

    # -- installation -------------------------------------------------------------

    def _install(self) -> None:
        if self._original_apply is None:
            if not self.optimizer.built:  # builds its state (the loss scale) eagerly
                self.optimizer.build(self.model.trainable_variables)
            self.step = self.make_variable(
                int(self.optimizer.iterations.numpy()), tf.int64, "kgrad_step"
            )
            self._original_apply = self.optimizer.apply
            hook = self

            def apply(grads, trainable_variables=None):
                return hook._apply(grads, trainable_variables)

            self.optimizer.apply = apply
            _HOOKS[self.optimizer] = self
        self._retrace()

    def _uninstall(self) -> None:
        if self._original_apply is not None:
            # The instance attribute shadows the class method; deleting it restores it.
            del self.optimizer.apply
            self._original_apply = None
            _HOOKS.pop(self.optimizer, None)
        self._retrace()

    def _retrace(self) -> None:
        self.traced = False
        # The hook is Python code traced into the train function: rebuild it so the
        # next step sees (or stops seeing) the hook. fit() reads `train_function`
        # afresh at every step, so this is safe from `on_train_begin`.
        if getattr(self.model, "train_function", None) is not None:
            self.model.make_train_function(force=True)

    # -- the traced step -----------------------------------------------------------

    def _loss_scale(self) -> Any:
        optimizer = self.optimizer
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            return optimizer.dynamic_scale
        return getattr(optimizer, "loss_scale_factor", None)

    def _apply(self, grads: Sequence[Any], trainable_variables: Any = None) -> Any:
        self.traced = True
        if trainable_variables is None:
            trainable_variables = self.optimizer._trainable_variables
        variables = list(trainable_variables)
        grads = list(grads)
        scale = self._loss_scale()
        unscaled = grads if scale is None else [scale_gradient(g, 1.0 / scale) for g in grads]

        replicas = self.strategy.num_replicas_in_sync
        replica_context = tf.distribute.get_replica_context()
        if replicas > 1 and replica_context is not None:
            present = [i for i, g in enumerate(unscaled) if g is not None]
            reduced = replica_context.all_reduce(
                tf.distribute.ReduceOp.SUM, [unscaled[i] for i in present]
            )
            aggregated = list(unscaled)
            for i, value in zip(present, reduced):
                aggregated[i] = value
        else:
            aggregated = unscaled

        step = self.step.read_value()
        context = StepContext(
            variables=variables,
            gradients=aggregated,
            applied=aggregated,
            step=step,
            strategy=self.strategy,
        )
        transformed = aggregated
        for _, transform in sorted(self._transforms.values(), key=lambda t: t[0]):
            transformed = transform(context, transformed)
        context.applied = transformed
        for observe in self._observers.values():
            observe(context)

        if transformed is not aggregated:
            # Each replica hands on its share of the transformed aggregate, so that the
            # optimizer's own sum over replicas yields exactly the transformed gradient.
            if scale is None and replicas == 1:
                grads = transformed
            else:
                share = 1.0 / replicas if replicas > 1 else 1.0
                factor = share if scale is None else scale * share
                grads = [scale_gradient(g, factor) for g in transformed]
        result = self._original_apply(grads, trainable_variables)
        self.step.assign_add(1)
        return result
