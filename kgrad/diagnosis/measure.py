"""One pass over a probe set: gradients per variable and per layer output, unit statistics.

This is the engine of `diagnose`: it runs the model batch by batch under a
`tf.GradientTape`, through a functional sub-model when the model has a graph, and
accumulates what the detectors need. Non-trainable state touched by a `training=True`
pass (batch-norm moving statistics, dropout seeds) is restored afterwards, so a trained
model is left exactly as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kgrad.capture.variables import TrackedVariable, _ordered_layers, track_variables
from kgrad.diagnosis.activations import (
    LayerReader,
    activation_sites,
    functional_reason,
    has_kernel,
    layer_output,
    null_active_units,
    null_units_layer,
)
from kgrad.diagnosis.fixes import DEAD_PRONE
from kgrad.diagnosis.saturation import DERIVATIVE_THRESHOLD, derivative_from_outputs

Objective = Callable[[Any, Any, int, int], tf.Tensor]


@dataclasses.dataclass
class Measurements:
    """What one pass over the probe set measured.

    Attributes:
        tracked: The trainable variables, in depth order.
        grad_norms: The norm of each tracked variable's gradient over the probe set
            (NaN or inf when the gradient holds such values, NaN without gradient).
        has_gradient: Whether each tracked variable received a gradient.
        weight_norms: The norm of each tracked variable.
        activation_grad_norms: Per kernel layer (top level): the norm of the gradient
            with respect to its output over every example.
        units: One dict per activation site: `site`, `layer` (the kernel layer it
            activates, if any), `activation`, `units`, `dead_units`,
            `null_silent_fraction`, `dead_bias_mean`, `saturated_fraction`.
        first_non_finite_output: The first layer, in forward order, with a
            non-finite output; `None` if all were finite (or could not be read).
        examples: The number of probe examples.
        notes: What could not be measured, and why.
    """

    tracked: list[TrackedVariable]
    grad_norms: np.ndarray
    has_gradient: np.ndarray
    weight_norms: np.ndarray
    activation_grad_norms: dict[str, float]
    units: list[dict[str, Any]]
    first_non_finite_output: str | None
    examples: int
    notes: list[str]


def _dense(gradient: Any) -> np.ndarray | None:
    if gradient is None:
        return None
    return tf.cast(tf.convert_to_tensor(gradient), tf.float64).numpy()


class _SiteStats:
    """Accumulates the unit statistics of one activation site over batches."""

    def __init__(self, site, seed: int):
        self.site = site
        self.active = None
        self.null_active = None
        self.saturated = 0
        self.total = 0
        self.null = (
            null_units_layer(site.kernel_layer, seed)
            if site.kernel_input is not None
            and not site.normalized
            and site.activation in DEAD_PRONE
            else None
        )

    def add(self, output: tf.Tensor, kernel_input: Any) -> None:
        flat = tf.reshape(output, [-1, output.shape[-1]])
        if self.site.activation in DEAD_PRONE:
            active = tf.reduce_any(tf.not_equal(flat, 0), axis=0).numpy()
            self.active = active if self.active is None else self.active | active
            if self.null is not None and kernel_input is not None:
                null_active = null_active_units(self.null, kernel_input)
                self.null_active = (
                    null_active if self.null_active is None else self.null_active | null_active
                )
        else:
            derivative = derivative_from_outputs(flat.numpy(), self.site.activation)
            self.saturated += int(np.count_nonzero(derivative < DERIVATIVE_THRESHOLD))
            self.total += int(derivative.size)

    def result(self) -> dict[str, Any]:
        site = self.site
        row: dict[str, Any] = {
            "site": site.name,
            "layer": site.owner,
            "activation": site.activation,
            "units": site.units,
            "dead_units": np.nan,
            "null_silent_fraction": np.nan,
            "dead_bias_mean": np.nan,
            "saturated_fraction": np.nan,
        }
        if self.active is not None:
            dead = ~self.active
            row["dead_units"] = int(dead.sum())
            if site.normalized:
                row["null_silent_fraction"] = 0.0  # normalization centres every unit
            elif self.null_active is not None:
                row["null_silent_fraction"] = float(np.mean(~self.null_active))
            bias = getattr(site.kernel_layer, "bias", None)
            if dead.any() and bias is not None and not site.normalized:
                row["dead_bias_mean"] = float(np.mean(keras.ops.convert_to_numpy(bias)[dead]))
        if self.total:
            row["saturated_fraction"] = self.saturated / self.total
        return row


def _restoring(model: keras.Model) -> Callable[[], None]:
    saved = [(v, keras.ops.convert_to_numpy(v)) for v in model.non_trainable_variables]

    def restore() -> None:
        for variable, value in saved:
            variable.assign(value)

    return restore


def measure(
    model: keras.Model,
    x: Any,
    examples: int,
    objective: Objective,
    *,
    batch_size: int,
    training: bool,
    seed: int,
) -> Measurements:
    """Runs the probe set through `model` and accumulates the statistics.

    Args:
        model: A built Keras model.
        x: The probe inputs (already validated).
        examples: The number of examples in `x`.
        objective: `objective(y_pred, start, stop)` returns the scalar whose gradient
            is taken for the examples `start:stop`, already weighted so that the sum
            over batches is the loss of the whole probe set.
        batch_size: Examples per forward pass.
        training: The `training` flag of the forward passes.
        seed: The seed of the null model's random units.

    Returns:
        The `Measurements`.
    """
    tracked = track_variables(model)
    variables = [item.variable for item in tracked]
    notes: list[str] = []
    reason = functional_reason(model)
    sites, kernel_layers, reader = [], [], None
    if reason is None:
        sites = activation_sites(model)
        kernel_layers = [
            layer
            for layer in _ordered_layers(model)
            if has_kernel(layer) and layer_output(model, layer) is not None
        ]
        stats_of = [_SiteStats(site, seed) for site in sites]
        tensors = [site.output for site in sites]
        tensors += [
            site.kernel_input if stat.null is not None else site.output
            for stat, site in zip(stats_of, sites)
        ]
        tensors += [layer_output(model, layer) for layer in kernel_layers]
        reader = LayerReader(model, tensors)
    else:
        notes.append(reason)
        stats_of = []

    grad_sums: list[np.ndarray | None] = [None] * len(variables)
    squares = np.full(len(kernel_layers), np.nan)  # NaN: no gradient reached it
    first_non_finite = None
    order = {layer.name: i for i, layer in enumerate(_ordered_layers(model))}
    restore = _restoring(model)
    try:
        for start in range(0, examples, batch_size):
            stop = min(start + batch_size, examples)
            xb = keras.tree.map_structure(lambda value: value[start:stop], x)
            with tf.GradientTape() as tape:
                if reader is None:
                    y_pred, read = model(xb, training=training), []
                else:
                    read, y_pred = reader(xb, training=training)
                loss = objective(y_pred, start, stop)
            outputs = read[2 * len(sites) :]
            gradients = tape.gradient(loss, variables + outputs)
            for index, gradient in enumerate(gradients[: len(variables)]):
                dense = _dense(gradient)
                if dense is not None:
                    grad_sums[index] = dense if grad_sums[index] is None else grad_sums[index] + dense
            for index, gradient in enumerate(gradients[len(variables) :]):
                if gradient is not None:
                    squares[index] = np.nan_to_num(squares[index]) + float(tf.reduce_sum(tf.square(tf.cast(gradient, tf.float64))))
            for stat, output, kernel_input in zip(
                stats_of, read[: len(sites)], read[len(sites) : 2 * len(sites)]
            ):
                stat.add(output, kernel_input if stat.null is not None else None)
            for layer, output in zip(
                [site.layer for site in sites] + kernel_layers,
                read[: len(sites)] + outputs,
            ):
                if not bool(tf.reduce_all(tf.math.is_finite(tf.cast(output, tf.float32)))):
                    if first_non_finite is None or order[layer.name] < order[first_non_finite]:
                        first_non_finite = layer.name
    finally:
        restore()

    grad_norms = np.array(
        [np.nan if total is None else float(np.sqrt(np.sum(np.square(total)))) for total in grad_sums]
    )
    weight_norms = np.array(
        [float(np.linalg.norm(keras.ops.convert_to_numpy(v).astype(np.float64))) for v in variables]
    )
    return Measurements(
        tracked=tracked,
        grad_norms=grad_norms,
        has_gradient=np.array([total is not None for total in grad_sums], dtype=bool),
        weight_norms=weight_norms,
        activation_grad_norms={
            layer.name: float(np.sqrt(value)) for layer, value in zip(kernel_layers, squares)
        },
        units=[stat.result() for stat in stats_of],
        first_non_finite_output=first_non_finite,
        examples=examples,
        notes=notes,
    )
