"""Gradients on a fixed probe batch, differentiated by the backend's autodiff.

The fallback for models whose training step cannot be hooked, and the way to compare
runs on the same inputs. It costs an extra forward and backward pass per probe.

A model may have no forward pass of its own: keras-io's GAN and VAE subclass
`keras.Model`, write their own `train_step` and no `call()`, and hold the sub-models
that do the work (`self.generator`, `self.encoder`, ...). Such a model is probed
through `loss_fn(model, batch)`, the scalar its training step differentiates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

from kgrad import backend

ProbeData = tuple[Any, ...]
LossFunction = Callable[[keras.Model, Any], Any]

# The backends whose module differentiates a probe loss (`probe_gradients`,
# `gradient_function`, `UnitStatistics`): elsewhere the probes say so before any step.
PROBE_BACKENDS = ("tensorflow", "jax", "torch")


def _first_dimension(value: Any) -> int | None:
    leaves = keras.tree.flatten(value)
    if not leaves:
        return None
    shape = getattr(leaves[0], "shape", None)
    return None if shape is None or len(shape) == 0 else int(shape[0])


def has_forward_pass(model: keras.Layer) -> bool:
    """Whether `model` defines a forward pass: a `call()` of its own class.

    `keras.Model.call` raises `NotImplementedError`; Functional and Sequential models
    and every subclass that writes `call` override it.

    Args:
        model: A Keras model or layer.

    Returns:
        `False` when the class's `call` is the one of `keras.Model` or `keras.Layer`.

    Example:

    >>> class GAN(keras.Model):
    ...     def train_step(self, data):
    ...         return {}
    >>> has_forward_pass(GAN()), has_forward_pass(keras.Sequential())
    (False, True)
    """
    call = getattr(type(model), "call", None)
    return call is not None and call not in (keras.Model.call, keras.Layer.call)


def sub_models(model: keras.Layer) -> list[tuple[str, keras.Layer]]:
    """The layers that `model` holds as public attributes, models first.

    Args:
        model: A Keras model, typically one without a forward pass of its own.

    Returns:
        `(attribute, layer)` pairs: `[("generator", ...), ("discriminator", ...)]`
        for keras-io's GAN.
    """
    # On torch a layer is a `torch.nn.Module`, which keeps the modules it is given
    # in `_modules`, not in the instance's own attributes.
    attributes = {**vars(model), **vars(model).get("_modules", {})}
    held = [
        (name, value)
        for name, value in attributes.items()
        if not name.startswith("_") and isinstance(value, keras.Layer)
    ]
    return [item for item in held if isinstance(item[1], keras.Model)] + [
        item for item in held if not isinstance(item[1], keras.Model)
    ]


def _inputs_text(layer: keras.Layer) -> str:
    try:
        inputs = layer.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        return type(layer).__name__
    shapes = ", ".join(str(tuple(tensor.shape)) for tensor in inputs)
    return f"{type(layer).__name__}, inputs {shapes}"


def no_forward_pass_message(model: keras.Layer, argument: str = "x") -> str:
    """Why `model` cannot be called on `argument`, its sub-models, and what to do.

    Args:
        model: A model without a `call()` (see `has_forward_pass`).
        argument: The argument that holds the data, to quote. Defaults to `"x"`.

    Returns:
        The message: the cause (no `call()`), the sub-models by attribute name and
        the two remedies (diagnose a sub-model, or pass `loss_fn=`).
    """
    held = sub_models(model)
    example = held[0][0] if held else "encoder"
    listed = (
        "Its sub-models: "
        + ", ".join(f"`{name}` ({_inputs_text(layer)})" for name, layer in held)
        + ". "
        if held
        else "It holds no sub-model as an attribute. "
    )
    return (
        f"model {model.name!r} ({type(model).__name__}) has no `call()`: it has no "
        f"forward pass of its own (its `train_step` calls its sub-models), so "
        f"`{argument}` cannot be passed through it. The data is not the problem. "
        + listed
        + f"Either diagnose a sub-model on its own inputs, for example "
        f"`kgrad.diagnose(model.{example}, inputs)`, or pass `loss_fn=`, a "
        "function `loss_fn(model, batch)` that returns the scalar loss your "
        "`train_step` differentiates."
    )


def check_forward_pass(model: keras.Layer, argument: str = "x") -> None:
    """Raises the `no_forward_pass_message` if `model` has no `call()`.

    The monitor's activation probes and every probe without a `loss_fn` need one.

    Args:
        model: A Keras model.
        argument: The argument that holds the data, to quote. Defaults to `"x"`.

    Raises:
        ValueError: if `model` has no forward pass of its own.
    """
    if not has_forward_pass(model):
        raise ValueError(no_forward_pass_message(model, argument))


def check_loss_fn(loss_fn: Any) -> None:
    """Raises unless `loss_fn` is `None` or a callable.

    Raises:
        TypeError: if `loss_fn` is not callable.
    """
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(
            "`loss_fn` must be a callable `loss_fn(model, batch)` that returns a "
            f"scalar loss. Received: loss_fn of type {type(loss_fn).__name__}"
        )


class _LossFnResultError(ValueError):
    """`loss_fn` returned something other than a floating-point scalar."""


def call_loss_fn(loss_fn: LossFunction, model: keras.Model, batch: Any) -> Any:
    """`loss_fn(model, batch)` as a scalar float tensor, checked.

    Args:
        loss_fn: The user's loss function.
        model: The model it is given.
        batch: The batch it is given (as `train_step` receives its `data`).

    Returns:
        The loss, a scalar tensor.

    Raises:
        ValueError: if the result is not a scalar.
    """
    # Backend tensors, as `fit` gives `train_step` (on torch, a NumPy array minus a
    # tensor that requires grad fails: NumPy asks the tensor for its values).
    batch = keras.tree.map_structure(
        lambda item: item if item is None else keras.ops.convert_to_tensor(item), batch
    )
    value = keras.ops.convert_to_tensor(loss_fn(model, batch))
    if len(value.shape) != 0:
        raise _LossFnResultError(
            "`loss_fn` must return a scalar (reduce the per-example losses, for "
            "example with `keras.ops.mean`). Received: a value of shape "
            f"{tuple(value.shape)}"
        )
    dtype = keras.backend.standardize_dtype(value.dtype)
    if "float" not in dtype:
        raise _LossFnResultError(
            "`loss_fn` must return a floating-point scalar. Received: dtype "
            f"{dtype}"
        )
    return value


def check_probe_data(
    model: keras.Model,
    probe_data: Sequence[Any],
    argument: str = "probe_data",
    *,
    loss_fn: LossFunction | None = None,
) -> ProbeData:
    """Validates a probe batch against `model` with one forward pass.

    Args:
        model: A built Keras model.
        probe_data: `(x, y)` or `(x, y, sample_weight)`.
        argument: The argument name to quote in errors. Defaults to `"probe_data"`.
        loss_fn: `loss_fn(model, batch)`, the scalar to differentiate instead of the
            compiled loss (for models without a `call()`); it is called once on
            the batch, packed as `fit` packs it (`x`, or `(x, y)`, or
            `(x, y, sample_weight)`). Defaults to `None`.

    Returns:
        `(x, y, sample_weight)` with `sample_weight` possibly `None`.

    Raises:
        ValueError: if the tuple is malformed, the batch sizes disagree, the model
            has no forward pass and no `loss_fn` is given, the model cannot be
            called on `x`, or `loss_fn` does not return a scalar.
        TypeError: if `loss_fn` is not callable.
    """
    check_loss_fn(loss_fn)
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
    if loss_fn is not None:
        try:
            call_loss_fn(loss_fn, model, pack_batch(x, y, sample_weight))
        except _LossFnResultError:
            raise
        except Exception as error:  # the user's code: say where it failed
            first_line = str(error).splitlines()[0] if str(error) else ""
            raise ValueError(
                f"`loss_fn(model, batch)` failed on a batch of `{argument}` "
                f"({type(error).__name__}: {first_line}). "
                "It receives the model and the batch as `train_step` receives its "
                "data: `x`, or `(x, y)` when targets are given."
            ) from error
        return x, y, sample_weight
    check_forward_pass(model, argument)
    try:
        model(x, training=False)
    except NotImplementedError as error:  # a `call` that says it has none
        raise ValueError(no_forward_pass_message(model, argument)) from error
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


def pack_batch(x: Any, y: Any = None, sample_weight: Any = None) -> Any:
    """The batch as `train_step` receives it: `x`, `(x, y)` or `(x, y, sw)`."""
    return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)


def probe_loss(
    model: keras.Model,
    x: Any,
    y: Any = None,
    sample_weight: Any = None,
    training: bool = False,
    *,
    loss_fn: LossFunction | None = None,
) -> Callable[[], Any]:
    """`() -> loss` on the batch, written with Keras calls (see `probe_gradients`)."""

    def loss() -> Any:
        if loss_fn is not None:
            return call_loss_fn(loss_fn, model, pack_batch(x, y, sample_weight))
        y_pred = model(x, training=training)
        return model.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )

    return loss


def probe_gradients(
    model: keras.Model,
    x: Any,
    y: Any = None,
    sample_weight: Any = None,
    training: bool = False,
    *,
    loss_fn: LossFunction | None = None,
) -> tuple[Any, list[Any]]:
    """The loss and its gradients with respect to `model.trainable_variables`.

    The loss is the compiled loss (with regularization terms), as in the training
    step but without loss scaling; or `loss_fn(model, batch)`, for a model whose
    `train_step` computes its own loss (keras-io's GAN and VAE have no `call()`).
    The backend differentiates it: `tf.GradientTape` on TensorFlow (call inside a
    `tf.function` for speed), `jax.grad` at the current weights on JAX,
    `torch.autograd.grad` on torch.

    Args:
        model: A compiled Keras model (any model with `loss_fn`).
        x: Inputs.
        y: Targets. Defaults to `None`.
        sample_weight: Per-example weights. Defaults to `None`.
        training: The `training` flag of the forward pass. `False` keeps dropout off
            and batch-norm statistics frozen, so probes are comparable across steps.
            Not used with `loss_fn`, which calls the layers as it chooses.
            Defaults to `False`.
        loss_fn: `loss_fn(model, batch) -> scalar`, differentiated instead of the
            compiled loss; `batch` is `x`, `(x, y)` or `(x, y, sample_weight)`, as
            `fit` packs the data for `train_step`. Defaults to `None`.

    Returns:
        `(loss, gradients)`, gradients aligned with `model.trainable_variables`
        (`None` for a variable the loss does not depend on). On JAX and torch a
        training-mode pass leaves the non-trainable state (batch-norm statistics)
        unchanged.

    Example:

    >>> def vae_loss(model, batch):  # doctest: +SKIP
    ...     z_mean, z_log_var = model.encoder(batch)
    ...     return keras.ops.mean(keras.ops.square(model.decoder(z_mean) - batch))
    >>> loss, grads = probe_gradients(vae, x_batch, loss_fn=vae_loss)  # doctest: +SKIP
    """
    backend.require("probe_gradients", PROBE_BACKENDS)
    loss = probe_loss(model, x, y, sample_weight, training, loss_fn=loss_fn)
    value, _, gradients, _ = backend.current().probe_gradients(
        model, lambda: (loss(), None), model.trainable_variables
    )
    return value, gradients
