"""`diagnose`: a gradient-health report of a model on a probe set, with no training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import pandas as pd
from keras import ops

from kgrad import backend, stats
from kgrad.callbacks.base import check_positive_int
from kgrad.capture.probe import (
    PROBE_BACKENDS,
    LossFunction,
    call_loss_fn,
    check_loss_fn,
    check_probe_data,
    pack_batch,
)
from kgrad.diagnosis.activations import network_context
from kgrad.diagnosis.dead_units import MIN_EXAMPLES, detect_dead_units
from kgrad.diagnosis.exploding import detect_exploding
from kgrad.diagnosis.findings import Finding
from kgrad.diagnosis.measure import Measurements, measure, restoring
from kgrad.diagnosis.non_finite import detect_non_finite
from kgrad.diagnosis.profile import frame_profile
from kgrad.diagnosis.report import Report, merge_unit_columns
from kgrad.diagnosis.saturation import detect_saturation
from kgrad.diagnosis.stalled import stalled_beyond_trend
from kgrad.diagnosis.vanishing import detect_vanishing


def _count(value: Any, argument: str) -> int:
    leaves = keras.tree.flatten(value)
    shapes = [np.shape(leaf) for leaf in leaves]
    if not leaves or any(len(shape) == 0 for shape in shapes):
        raise ValueError(
            f"`{argument}` must be an array (or a structure of arrays) with the "
            f"examples on the first axis. Received: {argument} of type "
            f"{type(value).__name__}"
        )
    sizes = {shape[0] for shape in shapes}
    if len(sizes) > 1:
        raise ValueError(
            f"The arrays of `{argument}` must have the same number of examples. "
            f"Received first dimensions {sorted(sizes)}"
        )
    return sizes.pop()


def _check_model(model: Any, x: Any) -> None:
    if isinstance(model, keras.Model):
        return
    if isinstance(model, keras.Layer):
        advice = (
            "Wrap the layer in a model: `keras.Sequential([keras.Input(shape), "
            "layer])`."
        )
    elif isinstance(x, keras.Model):
        advice = "The model comes first: `kgrad.diagnose(model, x)`."
    else:
        advice = "Pass the model first and the probe inputs second: "
        advice += "`kgrad.diagnose(model, x)`."
    raise TypeError(
        "`model` must be a Keras model (`keras.Model`: functional, Sequential or "
        f"subclassed). Received: model of type {type(model).__name__}. {advice}"
    )


def _check_arguments(
    model: Any,
    x: Any,
    loss: Any,
    loss_fn: Any,
    batch_size: Any,
    training: Any,
    seed: Any,
) -> None:
    _check_model(model, x)
    check_positive_int(batch_size, "batch_size")
    check_loss_fn(loss_fn)
    if loss_fn is not None and loss is not None:
        raise ValueError(
            "Pass either `loss` or `loss_fn`, not both: `loss_fn(model, batch)` "
            f"computes the loss itself. Received: loss={loss!r} and loss_fn="
            f"{getattr(loss_fn, '__name__', type(loss_fn).__name__)}"
        )
    if loss is not None:
        try:
            keras.losses.get(loss)
        except (ValueError, TypeError) as error:
            raise ValueError(
                "`loss` must be a Keras loss name, a `keras.losses.Loss` or a "
                f"function `loss(y_true, y_pred)`. Received: loss={loss!r}"
            ) from error
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(
            "`training` must be `True` or `False`. Received: training of type "
            f"{type(training).__name__}"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(
            f"`seed` must be a non-negative integer. Received: seed={seed!r}"
        )


def _loss_fn_objective(
    model: keras.Model, loss_fn: LossFunction, x: Any, y: Any, examples: int
) -> Callable[[Any, int, int], Any]:
    def given_loss_fn(y_pred: Any, start: int, stop: int) -> Any:
        def rows(value: Any) -> Any:
            return value[start:stop]

        y_batch = None if y is None else keras.tree.map_structure(rows, y)
        batch = pack_batch(keras.tree.map_structure(rows, x), y_batch)
        value = call_loss_fn(loss_fn, model, batch)
        return ops.cast(value, "float32") * ((stop - start) / examples)

    return given_loss_fn


def _objective(
    model: keras.Model, y: Any, loss: Any, examples: int, seed: int
) -> Callable[[Any, int, int], Any]:
    if y is None:
        # The mean-field setting: a fixed Gaussian cotangent at the outputs, so the
        # backward pass measures the network, not a loss at one point of training.
        rng = np.random.default_rng(seed)
        cotangents: dict[int, np.ndarray] = {}

        def random_cotangent(y_pred: Any, start: int, stop: int) -> Any:
            total = 0.0
            for index, output in enumerate(keras.tree.flatten(y_pred)):
                if index not in cotangents:
                    cotangents[index] = rng.standard_normal(
                        (examples, *output.shape[1:])
                    ).astype(np.float32)
                direction = ops.cast(cotangents[index][start:stop], output.dtype)
                total += ops.sum(ops.cast(output * direction, "float32"))
            return total / examples

        return random_cotangent
    weight = 1.0 / examples
    if loss is not None:
        loss_function = keras.losses.get(loss)

        def given_loss(y_pred: Any, start: int, stop: int) -> Any:
            y_batch = keras.tree.map_structure(lambda v: v[start:stop], y)
            value = ops.mean(loss_function(y_batch, y_pred))
            return ops.cast(value, "float32") * (stop - start) * weight

        return given_loss
    if getattr(model, "loss", None) is None:
        raise ValueError(
            f"`y` was given but model {model.name!r} has no loss to compare it with. "
            "Compile the model (`model.compile(loss=...)`) or pass `loss=`, for "
            'example `diagnose(model, x, y, loss="mse")`; or leave `y=None` to '
            "backpropagate a random Gaussian signal."
        )

    def compiled_loss(y_pred: Any, start: int, stop: int) -> Any:
        y_batch = keras.tree.map_structure(lambda v: v[start:stop], y)
        value = model.compute_loss(x=None, y=y_batch, y_pred=y_pred, training=False)
        return ops.cast(value, "float32") * (stop - start) * weight

    return compiled_loss


def _layer_frame(measured: Measurements, context) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = []
    for layer in dict.fromkeys(item.layer for item in measured.tracked):
        picked = [i for i, item in enumerate(measured.tracked) if item.layer == layer]
        kinds = [measured.tracked[i].kind for i in picked]

        def combined(kind: str | None) -> float:
            chosen = [
                i
                for i, k in zip(picked, kinds)
                if (kind is None or k == kind) and measured.has_gradient[i]
            ]
            if not chosen:
                return np.nan
            return float(stats.combine_norms(measured.grad_norms[chosen]))

        rows.append(
            {
                "layer": layer,
                "depth": measured.tracked[picked[0]].depth,
                "grad_norm": combined(None),
                "kernel_grad_norm": combined("kernel"),
                "bias_grad_norm": combined("bias"),
                "activation_grad_norm": measured.activation_grad_norms.get(
                    layer, np.nan
                ),
                "weight_norm": float(
                    stats.combine_norms(measured.weight_norms[picked])
                ),
                "weight_scale": context.weight_scale.get(layer, np.nan),
                "activation": context.activations.get(layer, ""),
            }
        )
    layers = pd.DataFrame(rows)
    with np.errstate(all="ignore"):
        layers["grad_to_weight"] = layers["grad_norm"] / layers["weight_norm"]
    units = pd.DataFrame(
        measured.units,
        columns=[
            "site",
            "layer",
            "activation",
            "units",
            "dead_units",
            "null_silent_fraction",
            "null_units",
            "dead_bias_mean",
            "saturated_fraction",
        ],
    )
    units["examples"] = measured.examples
    layers = merge_unit_columns(layers, units)
    return layers, units


def diagnose(
    model: keras.Model,
    x: Any,
    y: Any = None,
    *,
    loss: str | keras.losses.Loss | Callable | None = None,
    loss_fn: LossFunction | None = None,
    batch_size: int = 256,
    training: bool = True,
    seed: int = 0,
) -> Report:
    """Diagnoses the gradient health of a model on a probe set, without training it.

    Works on a fresh (untrained) model and on a trained one. The probe set goes
    through the model in batches (differentiated by the backend: `tf.GradientTape`
    on TensorFlow, `jax.grad` over a stateless call on JAX), and the report holds:

    - the per-layer profile of the backpropagated signal and its decay across depth
      (gradients with respect to each kernel layer's output where the model has a
      functional graph; bias or kernel gradients otherwise, see
      `kgrad.diagnosis.profile`), judged for vanishing and growth;
    - non-finite gradients, and the first layer whose output was non-finite;
    - dead ReLU units (zero for every probe example, beyond what input correlation
      explains) and saturated sigmoid/tanh activations (derivative below 0.01);
    - layers whose gradient-to-weight ratio is far below the others' (stalled).

    With `y=None` a fixed random Gaussian signal is backpropagated from the outputs:
    the mean-field setting, in which the per-layer ratio estimates the backward gain
    √χ of the architecture and its initialization (0.236 for a sigmoid MLP with
    Glorot init). With `y`, the gradient is that of the compiled loss, or of `loss`.

    With `loss_fn`, the gradient is that of `loss_fn(model, batch)`: for models
    whose `train_step` computes its own loss and that have no `call()` (keras-io's
    VAE with `self.encoder`/`self.decoder`, its GAN with `self.generator`/
    `self.discriminator`). The layers are then measured as `loss_fn` calls them,
    through any sub-model: the gradient of every variable and of the output of
    every kernel layer it reaches (over every call of a layer called twice).

    Args:
        model: A Keras model (built, or buildable by calling it on `x`).
        x: Probe inputs, examples on the first axis. Use many examples (hundreds):
            dead units are judged over all of them.
        y: Targets for the loss. Defaults to `None`: a random Gaussian cotangent.
        loss: A loss (name, `Loss` or function) to use instead of the compiled one.
            Defaults to `None`.
        loss_fn: `loss_fn(model, batch) -> scalar`, the loss to differentiate, for a
            model with no forward pass of its own. `batch` holds `batch_size`
            examples of `x` (`(x, y)` when `y` is given, as `fit` hands data to
            `train_step`); the results are weighted by their share of the examples,
            so a `loss_fn` that averages over its batch gives the gradient of its
            average over all of `x`. It chooses its own `training` flags and should
            be deterministic (or seeded) to compare two reports. Defaults to `None`.
        batch_size: Examples per forward pass (batch-norm statistics are those of
            each batch). Defaults to `256`.
        training: The `training` flag of the forward passes. `True` mirrors `fit`
            (batch statistics, dropout on); moving statistics and other
            non-trainable state are restored afterwards. Defaults to `True`.
        seed: Seed of the random cotangent and of the null model of dead units.
            Defaults to `0`.

    Returns:
        A `Report`: `report.findings`, `report.layers`, `report.decay`,
        `print(report)`, `report.plot()`.

    Raises:
        TypeError: if `model` is not a Keras model, `loss_fn` is not callable, or
            `training` is not a bool.
        ValueError: if `x` is empty, `x` does not fit the model, the model has no
            `call()` and no `loss_fn` is given (the message lists its sub-models),
            `x` and `y` hold different numbers of examples, `batch_size` is not a
            positive integer, `seed` is negative, `loss` is unknown or given with
            `loss_fn`, `loss_fn` does not return a scalar, or `y` is given with no
            loss to use.

    References:
        Glorot & Bengio 2010; He et al. 2015; Schoenholz et al. 2017; Yang et al.
        2019; Lu et al. 2019.

    Example:

    >>> report = kgrad.diagnose(model, x_train[:512])  # doctest: +SKIP
    >>> print(report)  # doctest: +SKIP
    >>> def vae_loss(vae, batch):  # a model with no `call()`  # doctest: +SKIP
    ...     z_mean, _ = vae.encoder(batch)
    ...     return keras.ops.mean(keras.ops.square(vae.decoder(z_mean) - batch))
    >>> report = kgrad.diagnose(vae, x_train[:512], loss_fn=vae_loss)  # doctest: +SKIP
    """
    backend.require("diagnose", PROBE_BACKENDS)
    _check_arguments(model, x, loss, loss_fn, batch_size, training, seed)
    examples = _count(x, "x")
    if examples == 0:
        raise ValueError(
            "`x` is empty: diagnose needs probe examples (hundreds, shaped like the "
            "training data). Received: x with 0 examples"
        )
    if y is not None and _count(y, "y") != examples:
        raise ValueError(
            "`x` and `y` must hold the same number of examples. Received: "
            f"{examples} in x, {_count(y, 'y')} in y"
        )
    def head(value: Any) -> Any:
        return value[: min(batch_size, examples)]

    # `loss_fn` is checked with the targets it will receive; the model without.
    head_y = None if loss_fn is None or y is None else keras.tree.map_structure(head, y)
    restore = restoring(model)
    try:
        check_probe_data(
            model,
            (keras.tree.map_structure(head, x), head_y),
            argument="x",
            loss_fn=loss_fn,
        )
    finally:
        restore()  # the check's forward pass changes no state
    context = network_context(model)
    objective = (
        _objective(model, y, loss, examples, seed)
        if loss_fn is None
        else _loss_fn_objective(model, loss_fn, x, y, examples)
    )
    measured = measure(
        model,
        x,
        examples,
        objective,
        batch_size=batch_size,
        training=training,
        seed=seed,
        calls_model=loss_fn is None,
    )
    layers, units = _layer_frame(measured, context)
    profile, kind = frame_profile(layers, normalized=context.normalized)
    decay = stats.per_layer_ratio(profile["norm"].to_numpy())
    first_to_last = stats.first_to_last_ratio(profile["norm"].to_numpy())
    notes = list(measured.notes)
    if examples < MIN_EXAMPLES:
        notes.append(
            f"Dead units need at least {MIN_EXAMPLES} probe examples to be judged; "
            f"received {examples}."
        )
    findings = _findings(measured, layers, units, profile, kind, context)
    if loss_fn is not None:
        gradient_of = "loss_fn"  # which calls the layers with its own training flags
    else:
        gradient_of = f"training={training}, " + (
            "random Gaussian cotangent at the outputs" if y is None else "loss on y"
        )
    description = (
        f"{len(layers)} layers with weights, {examples} probe examples, {gradient_of}"
    )
    return Report(
        findings,
        layers,
        decay=decay,
        first_to_last=first_to_last,
        profile_kind=kind,
        profile=profile,
        units=units,
        notes=notes,
        description=description,
    )


def _findings(measured, layers, units, profile, kind, context) -> list[Finding]:
    findings: list[Finding] = []
    # A layer without any gradient has a NaN norm that is no sign of trouble.
    without_gradient = [
        not any(
            measured.has_gradient[i]
            for i, item in enumerate(measured.tracked)
            if item.layer == layer
        )
        for layer in layers["layer"]
    ]
    non_finite = detect_non_finite(
        np.where(without_gradient, 0.0, layers["grad_norm"].to_numpy()),
        layers["layer"].tolist(),
        first_non_finite_output=measured.first_non_finite_output,
        context=context,
    )
    if non_finite is not None:
        return [non_finite]
    names = profile["layer"].tolist()
    for detect in (detect_vanishing, detect_exploding):
        finding = detect(
            profile["norm"].to_numpy(), names, source=kind, context=context
        )
        if finding is not None:
            findings.append(finding)
    dead = detect_dead_units(units.dropna(subset=["dead_units"]), context=context)
    saturated = detect_saturation(
        units.dropna(subset=["saturated_fraction"]), context=context
    )
    stalled = stalled_beyond_trend(
        dict(zip(layers["layer"], layers["grad_to_weight"])),
        findings,
        measure="gradient-to-weight",
        context=context,
    )
    return findings + [f for f in (dead, saturated, stalled) if f is not None]
