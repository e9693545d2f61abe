"""The small base class shared by kgrad's callbacks."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import keras

from kgrad.capture.optimizers import model_optimizers
from kgrad.capture.step_hook import model_is_built


def check_positive_int(value: Any, argument: str, allow_none: bool = False) -> Any:
    """Returns `value` if it is a positive integer, else raises a ValueError naming it."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`{argument}` must be a positive integer. Received: {argument}={value!r}"
        )
    return value


def check_trainable(model: keras.Model) -> None:
    """Raises a clear ValueError when `model` cannot be trained by `fit`.

    A model that Keras builds on its first batch (subclassed, `Sequential` without
    `Input`) has no variables yet: its weights are judged once it is built.
    """
    if not model_optimizers(model) or not getattr(model, "compiled", True):
        raise ValueError(
            f"Model {model.name!r} is not compiled. Call `model.compile(optimizer=..., "
            "loss=...)` before `fit`."
        )
    if model_is_built(model) and not model.trainable_variables:
        raise ValueError(
            f"Model {model.name!r} has no trainable weights: there is no gradient to "
            "record. Unfreeze at least one layer (`layer.trainable = True`)."
        )


class KgradCallback(keras.callbacks.Callback):
    """A Keras callback whose run-time state is dropped by `copy.deepcopy`.

    keras-tuner deep-copies the callbacks given to `search()` for every trial. The
    attributes named in `_transient` (the model, device variables, hooks) belong to one
    `fit()` call: a copy starts without them, and `on_train_begin` rebuilds them.
    """

    _transient: ClassVar[tuple[str, ...]] = ("_model",)

    def __deepcopy__(self, memo: dict[int, Any]) -> "KgradCallback":
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        transient = set(KgradCallback._transient) | set(self._transient)
        for name, value in self.__dict__.items():
            setattr(clone, name, None if name in transient else copy.deepcopy(value, memo))
        return clone
