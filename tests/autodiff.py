"""Reference gradients by each backend's own autodiff, for tests to compare with.

Written by hand, apart from kgrad: `tf.GradientTape` on TensorFlow, `jax.grad` on JAX
and `torch.autograd.grad` on torch (with the variables mapped to traced values, or to
fresh leaf tensors that require grad, in a `keras.StatelessScope`, as
`model.stateless_call` does).
"""

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

BACKEND = keras.backend.backend()


def _torch_leaves(values: Sequence[Any]) -> list[Any]:
    """Copies of `values` that torch differentiates with respect to."""
    return [value.detach().clone().requires_grad_(True) for value in values]


def _torch_gradients(loss: Any, leaves: Sequence[Any]) -> list[Any]:
    import torch

    found = torch.autograd.grad(loss, list(leaves), allow_unused=True)
    return [
        torch.zeros_like(leaf) if g is None else g.detach() for leaf, g in zip(leaves, found)
    ]


def gradients(function: Callable[..., Any], *values: Any) -> list[np.ndarray]:
    """The gradients of the scalar `function(*values)` with respect to `values`."""
    values = [keras.ops.convert_to_tensor(value) for value in values]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(values)
            loss = function(*values)
        found = tape.gradient(loss, values)
    elif BACKEND == "torch":
        leaves = _torch_leaves(values)
        found = _torch_gradients(function(*leaves), leaves)
    else:
        import jax

        found = jax.grad(lambda args: function(*args))(values)
    return [keras.ops.convert_to_numpy(g) for g in found]


def variable_gradients(
    function: Callable[[], Any], variables: Sequence[keras.Variable]
) -> tuple[float, list[np.ndarray]]:
    """The scalar `function()` and its gradients with respect to `variables`."""
    variables = list(variables)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = function()
        found = tape.gradient(loss, variables)
    elif BACKEND == "torch":
        leaves = _torch_leaves([v.value for v in variables])
        with keras.StatelessScope(list(zip(variables, leaves))):
            loss = function()
        found = _torch_gradients(loss, leaves)
        loss = loss.detach()
    else:
        import jax

        def pure(values):
            with keras.StatelessScope(list(zip(variables, values))):
                return function()

        loss, found = jax.value_and_grad(pure)([v.value for v in variables])
    return float(loss), [keras.ops.convert_to_numpy(g) for g in found]


def model_gradients(
    model: keras.Model, weights: Sequence[Any], loss: Callable[[Any], Any], x: Any
) -> list[np.ndarray]:
    """The gradients of `loss(model(x))` with respect to the model's trainable
    variables, at `weights` (arrays in `trainable_variables` order), in training mode
    (`model.stateless_call` at those weights)."""
    non_trainable = [v.value for v in model.non_trainable_variables]

    def function(*trainable: Any) -> Any:
        y_pred, _ = model.stateless_call(list(trainable), non_trainable, x, training=True)
        return loss(y_pred)

    return gradients(function, *weights)


def norm(value: Any) -> float:
    """The L2 norm of a tensor, in float64."""
    return float(np.linalg.norm(np.asarray(keras.ops.convert_to_numpy(value), np.float64)))
