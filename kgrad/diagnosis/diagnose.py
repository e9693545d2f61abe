"""`diagnose`: a gradient-health report of a model on a probe set, with no training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from kgrad import stats
from kgrad.callbacks.base import check_positive_int
from kgrad.capture.probe import check_probe_data
from kgrad.diagnosis.activations import network_context
from kgrad.diagnosis.dead_units import MIN_EXAMPLES, detect_dead_units
from kgrad.diagnosis.exploding import detect_exploding
from kgrad.diagnosis.findings import Finding
from kgrad.diagnosis.measure import Measurements, measure
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


def _objective(
    model: keras.Model, y: Any, loss: Any, examples: int, seed: int
) -> Callable[[Any, int, int], tf.Tensor]:
    if y is None:
        # The mean-field setting: a fixed Gaussian cotangent at the outputs, so the
        # backward pass measures the network, not a loss at one point of training.
        rng = np.random.default_rng(seed)
        cotangents: dict[int, np.ndarray] = {}

        def random_cotangent(y_pred: Any, start: int, stop: int) -> tf.Tensor:
            total = 0.0
            for index, output in enumerate(keras.tree.flatten(y_pred)):
                if index not in cotangents:
                    cotangents[index] = rng.standard_normal(
                        (examples, *output.shape[1:])
                    ).astype(np.float32)
                direction = tf.cast(cotangents[index][start:stop], output.dtype)
                total += tf.reduce_sum(tf.cast(output * direction, tf.float32))
            return total / examples

        return random_cotangent
    weight = 1.0 / examples
    if loss is not None:
        loss_function = keras.losses.get(loss)

        def given_loss(y_pred: Any, start: int, stop: int) -> tf.Tensor:
            y_batch = keras.tree.map_structure(lambda v: v[start:stop], y)
            value = keras.ops.mean(loss_function(y_batch, y_pred))
            return tf.cast(value, tf.float32) * (stop - start) * weight

        return given_loss
    if getattr(model, "loss", None) is None:
        raise ValueError(
            f"`y` was given but model {model.name!r} has no loss to compare it with. "
            "Compile the model (`model.compile(loss=...)`) or pass `loss=`, for "
            'example `diagnose(model, x, y, loss="mse")`; or leave `y=None` to '
            "backpropagate a random Gaussian signal."
        )

    def compiled_loss(y_pred: Any, start: int, stop: int) -> tf.Tensor:
        y_batch = keras.tree.map_structure(lambda v: v[start:stop], y)
        value = model.compute_loss(x=None, y=y_batch, y_pred=y_pred, training=False)
        return tf.cast(value, tf.float32) * (stop - start) * weight

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
    batch_size: int = 256,
    training: bool = True,
    seed: int = 0,
) -> Report:
    """Diagnoses the gradient health of a model on a probe set, without training it.

    Works on a fresh (untrained) model and on a trained one. The probe set goes
    through the model in batches under a `tf.GradientTape`, and the report holds:

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

    Args:
        model: A Keras model (built, or buildable by calling it on `x`).
        x: Probe inputs, examples on the first axis. Use many examples (hundreds):
            dead units are judged over all of them.
        y: Targets for the loss. Defaults to `None`: a random Gaussian cotangent.
        loss: A loss (name, `Loss` or function) to use instead of the compiled one.
            Defaults to `None`.
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
        ValueError: if `x` is empty, `x` does not fit the model, `x` and `y` hold
            different numbers of examples, `batch_size` is not a positive integer,
            or `y` is given with no loss to use.

    References:
        Glorot & Bengio 2010; He et al. 2015; Schoenholz et al. 2017; Yang et al.
        2019; Lu et al. 2019.

    Example:

    >>> report = kgrad.diagnose(model, x_train[:512])  # doctest: +SKIP
    >>> print(report)  # doctest: +SKIP
    """
    check_positive_int(batch_size, "batch_size")
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
    head = keras.tree.map_structure(lambda value: value[: min(batch_size, examples)], x)
    check_probe_data(model, (head, None), argument="x")
    context = network_context(model)
    objective = _objective(model, y, loss, examples, seed)
    measured = measure(
        model,
        x,
        examples,
        objective,
        batch_size=batch_size,
        training=training,
        seed=seed,
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
    description = (
        f"{len(layers)} layers with weights, {examples} probe examples, "
        f"training={training}, "
        + ("random Gaussian cotangent at the outputs" if y is None else "loss on y")
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
