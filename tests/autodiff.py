"""Reference gradients by each backend's own autodiff, for tests to compare with.

Written by hand, apart from kgrad: `tf.GradientTape` on TensorFlow, `jax.grad` on JAX
(with the variables mapped to traced values in a `keras.StatelessScope`, as
`model.stateless_call` does).
"""

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

BACKEND = keras.backend.backend()


def gradients(function: Callable[..., Any], *values: Any) -> list[np.ndarray]:
    """The gradients of the scalar `function(*values)` with respect to `values`."""
    values = [keras.ops.convert_to_tensor(value) for value in values]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(values)
            loss = function(*values)
        found = tape.gradient(loss, values)
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
    else:
        import jax

        def pure(values):
            with keras.StatelessScope(list(zip(variables, values))):
                return function()

        loss, found = jax.value_and_grad(pure)([v.value for v in variables])
    return float(loss), [keras.ops.convert_to_numpy(g) for g in found]


def norm(value: Any) -> float:
    """The L2 norm of a tensor, in float64."""
    return float(np.linalg.norm(np.asarray(keras.ops.convert_to_numpy(value), np.float64)))
