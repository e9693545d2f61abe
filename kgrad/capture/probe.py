"""Gradients on a fixed probe batch, with `tf.GradientTape`.

The fallback for models whose training step cannot be hooked, and the way to compare
runs on the same inputs. It costs an extra forward and backward pass per probe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

ProbeData = tuple[Any, ...]


def _first_dimension(value: Any) -> int | None:
    leaves = keras.tree.flatten(value)
    if not leaves:
        return None
    shape = getattr(leaves[0], "shape", None)
    return None if shape is None or len(shape) == 0 else int(shape[0])


def check_probe_data(
    model: keras.Model, probe_data: Sequence[Any], argument: str = "probe_data"
) -> ProbeData:
    """Validates a probe batch against `model` with one forward pass.

    Args:
        model: A built Keras model.
        probe_data: `(x, y)` or `(x, y, sample_weight)`.
        argument: The argument name to quote in errors. Defaults to `"probe_data"`.

    Returns:
        `(x, y, sample_weight)` with `sample_weight` possibly `None`.

    Raises:
        ValueError: if the tuple is malformed, the batch sizes disagree, or the model
            cannot be called on `x`.
    """
    if not isinstance(probe_data, (tuple, list)) or len(probe_data) not in (2, 3):
        raise ValueError(
            f"`{argument}` must be a tuple `(x, y)` or `(x, y, sample_weight)`. "
            f"Received: {argument} of type {type(probe_data).__name__}"
        )
    x, y, *rest = probe_data
    sample_weight = rest[0] if rest else None
    sizes = {
        name: _first_dimension(value)
        for name, value in (("x", x), ("y", y), ("sample_weight", sample_weight))
        if value is not None
    }
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"The parts of `{argument}` must have the same number of examples. "
            f"Received: {sizes}"
        )
    if sizes.get("x") == 0:
        raise ValueError(f"`{argument}` is empty: give at least one example.")
    try:
        model(x, training=False)
    except Exception as error:  # Keras raises several types for bad shapes
        expected = [tuple(t.shape) for t in getattr(model, "inputs", None) or []]
        received = keras.tree.map_structure(
            lambda value: tuple(np.shape(value)), x
        )
        raise ValueError(
            f"`{argument}` does not fit model {model.name!r}: calling the model on "
            f"x of shape {received} failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). "
            + (f"The model expects inputs of shape {expected}. " if expected else "")
            + "Pass a batch shaped like the training data."
        ) from error
    return x, y, sample_weight


def probe_gradients(
    model: keras.Model,
    x: Any,
    y: Any = None,
    sample_weight: Any = None,
    training: bool = False,
) -> tuple[tf.Tensor, list[Any]]:
    """The loss and its gradients with respect to `model.trainable_variables`.

    The loss is the compiled loss (with regularization terms), as in the training
    step but without loss scaling. Call inside a `tf.function` for speed.

    Args:
        model: A compiled Keras model.
        x: Inputs.
        y: Targets. Defaults to `None`.
        sample_weight: Per-example weights. Defaults to `None`.
        training: The `training` flag of the forward pass. `False` keeps dropout off
            and batch-norm statistics frozen, so probes are comparable across steps.
            Defaults to `False`.

    Returns:
        `(loss, gradients)`, gradients aligned with `model.trainable_variables`.
    """
    with tf.GradientTape() as tape:
        y_pred = model(x, training=training)
        loss = model.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
    return loss, tape.gradient(loss, model.trainable_variables)
