"""One pass over a probe set: gradients per variable and layer output, unit statistics.

This is the engine of `diagnose`: it runs the model batch by batch under a
`tf.GradientTape`, through a functional sub-model when the model has a graph (or
through the user's `loss_fn`, recording the outputs of the layers it calls), and
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

from kgrad.capture.variables import (
    TrackedVariable,
    ordered_layers,
    track_variables,
    walk_layers,
)
from kgrad.diagnosis.activations import activation_sites, has_kernel
from kgrad.diagnosis.graph import (
    CallRecorder,
    LayerReader,
    functional_reason,
    layer_output,
)
from kgrad.diagnosis.null_units import null_active_units, null_units_layer
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
        activation_grad_norms: Per kernel layer (top level; every nested one, by
            qualified name, through a `loss_fn`): the norm of the gradient with
            respect to its output over every example (and over every call of it).
        units: One dict per activation site: `site`, `layer` (the kernel layer it
            activates, if any), `activation`, `units`, `dead_units`,
            `null_silent_fraction`, `null_units`, `dead_bias_mean`,
            `saturated_fraction`.
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
        self.reset()
        self.null = (
            null_units_layer(site.kernel_layer, seed)
            if site.kernel_input is not None
            and not site.normalized
            and site.activation in DEAD_PRONE
            else None
        )

    def reset(self) -> None:
        self.active = None
        self.null_active = None
        self.saturated = 0
        self.total = 0

    def add(self, output: tf.Tensor, kernel_input: Any) -> None:
        flat = tf.reshape(output, [-1, output.shape[-1]])
        if self.site.activation in DEAD_PRONE:
            active = tf.reduce_any(tf.not_equal(flat, 0), axis=0).numpy()
            self.active = active if self.active is None else self.active | active
            if self.null is not None and kernel_input is not None:
                null_active = null_active_units(self.null, kernel_input)
                previous = self.null_active
                self.null_active = (
                    null_active if previous is None else previous | null_active
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
            "null_units": np.nan,
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
                row["null_units"] = len(self.null_active)
            bias = getattr(site.kernel_layer, "bias", None)
            if dead.any() and bias is not None and not site.normalized:
                values = keras.ops.convert_to_numpy(bias)[dead]
                row["dead_bias_mean"] = float(np.mean(values))
        if self.total:
            row["saturated_fraction"] = self.saturated / self.total
        return row


def restoring(model: keras.Model) -> Callable[[], None]:
    """A function that puts the model's non-trainable variables back as they are now."""
    saved = [(v, keras.ops.convert_to_numpy(v)) for v in model.non_trainable_variables]

    def restore() -> None:
        for variable, value in saved:
            variable.assign(value)

    return restore


# The initial loss scale of `LossScaleOptimizer`: it keeps small float16 gradients
# (below ~6e-8) from underflowing to zero, as training under mixed precision does.
FLOAT16_LOSS_SCALE = 2.0**15


def _computes_in_float16(model: keras.Model) -> bool:
    return any(
        getattr(layer, "compute_dtype", None) == "float16"
        for layer in model._flatten_layers(include_self=True, recursive=True)
    )


class _Pass:
    """One walk over the probe set, batch by batch, under a gradient tape."""

    def __init__(
        self, model, x, examples, objective, batch_size, training, seed, calls_model
    ):
        self.model, self.x, self.examples = model, x, examples
        self.objective, self.batch_size, self.training = objective, batch_size, training
        self.tracked = track_variables(model)
        self.variables = [item.variable for item in self.tracked]
        self.notes: list[str] = []
        self.sites, self.kernel_layers, self.stats, self.reader = [], [], [], None
        self.kernel_names: list[str] = []
        self.recorder: CallRecorder | None = None
        if not calls_model:
            self._watch_calls(model)
            return
        reason = functional_reason(model)
        if reason is not None:
            self.notes.append(reason)
            return
        self.sites = activation_sites(model)
        self.kernel_layers = [
            layer
            for layer in ordered_layers(model)
            if has_kernel(layer) and layer_output(model, layer) is not None
        ]
        self.stats = [_SiteStats(site, seed) for site in self.sites]
        tensors = [site.output for site in self.sites]
        tensors += [
            site.kernel_input if stat.null is not None else site.output
            for stat, site in zip(self.stats, self.sites)
        ]
        tensors += [layer_output(model, layer) for layer in self.kernel_layers]
        self.reader = LayerReader(model, tensors)
        self._order = {layer.name: i for i, layer in enumerate(ordered_layers(model))}
        self.kernel_names = [layer.name for layer in self.kernel_layers]

    def _watch_calls(self, model: keras.Model) -> None:
        """Records the outputs of every kernel layer, nested ones included, as the
        objective (a `loss_fn`) calls them."""
        walked = {}
        for qualified, layer in walk_layers(model):
            if has_kernel(layer) and id(layer) not in walked:
                walked[id(layer)] = (qualified, layer)
        self.kernel_names = [qualified for qualified, _ in walked.values()]
        self.kernel_layers = [layer for _, layer in walked.values()]
        self.recorder = CallRecorder(self.kernel_layers)
        self._order = {name: i for i, name in enumerate(self.kernel_names)}
        self.notes.append(
            f"Through `loss_fn`, model {model.name!r} is measured by the gradients of "
            "its variables and of the outputs of the kernel layers the function "
            "calls; dead-unit and saturation statistics are not measured (diagnose "
            "a functional sub-model on its own inputs for them)."
        )

    def _forward(
        self, xb: Any, start: int, stop: int
    ) -> tuple[list[Any], list[Any], list[int], tf.Tensor]:
        """The objective on one batch, with the tensors read on the way: the site
        tensors, the kernel-layer outputs, the kernel layer of each, the loss."""
        if self.recorder is not None:
            with self.recorder.recording() as calls:
                loss = self.objective(None, start, stop)
            owners = [index for index, outputs in enumerate(calls) for _ in outputs]
            return [], [output for outputs in calls for output in outputs], owners, loss
        if self.reader is None:
            y_pred, read = self.model(xb, training=self.training), []
        else:
            read, y_pred = self.reader(xb, training=self.training)
        count = len(self.sites)
        outputs = read[2 * count :]
        loss = self.objective(y_pred, start, stop)
        return read[: 2 * count], outputs, list(range(len(outputs))), loss

    def run(self, scale: float) -> None:
        """Accumulates gradients of `scale` x the objective, divided back by `scale`."""
        count = len(self.sites)
        self.grad_sums: list[np.ndarray | None] = [None] * len(self.variables)
        self.squares = np.full(len(self.kernel_layers), np.nan)  # NaN: no gradient
        self.first_non_finite: str | None = None
        for stat in self.stats:
            stat.reset()
        for start in range(0, self.examples, self.batch_size):
            stop = min(start + self.batch_size, self.examples)
            xb = keras.tree.map_structure(lambda value: value[start:stop], self.x)
            with tf.GradientTape() as tape:
                read, outputs, owners, loss = self._forward(xb, start, stop)
                loss = loss * scale
            gradients = tape.gradient(loss, self.variables + outputs)
            for index, gradient in enumerate(gradients[: len(self.variables)]):
                dense = _dense(gradient)
                if dense is not None:
                    total = self.grad_sums[index]
                    dense /= scale
                    self.grad_sums[index] = dense if total is None else total + dense
            for index, gradient in zip(owners, gradients[len(self.variables) :]):
                if gradient is not None:
                    square = tf.reduce_sum(tf.square(tf.cast(gradient, tf.float64)))
                    previous = np.nan_to_num(self.squares[index])
                    self.squares[index] = previous + float(square) / scale**2
            for stat, output, kernel_input in zip(
                self.stats, read[:count], read[count : 2 * count]
            ):
                stat.add(output, kernel_input if stat.null is not None else None)
            names = [site.layer.name for site in self.sites]
            names += [self.kernel_names[index] for index in owners]
            for name, output in zip(names, read[:count] + outputs):
                self._check_finite(name, output)

    def _check_finite(self, name: str, output: tf.Tensor) -> None:
        if bool(tf.reduce_all(tf.math.is_finite(tf.cast(output, tf.float32)))):
            return
        first = self.first_non_finite
        if first is None or self._order[name] < self._order[first]:
            self.first_non_finite = name

    def gradients_finite(self) -> bool:
        return all(np.isfinite(g).all() for g in self.grad_sums if g is not None)


def measure(
    model: keras.Model,
    x: Any,
    examples: int,
    objective: Objective,
    *,
    batch_size: int,
    training: bool,
    seed: int,
    calls_model: bool = True,
) -> Measurements:
    """Runs the probe set through `model` and accumulates the statistics.

    Under float16 mixed precision the objective is scaled as `LossScaleOptimizer`
    scales the loss, so that small gradients do not underflow; if the scale
    overflows, the pass is repeated unscaled.

    Args:
        model: A built Keras model.
        x: The probe inputs (already validated).
        examples: The number of examples in `x`.
        objective: `objective(y_pred, start, stop)` returns the scalar whose gradient
            is taken for the examples `start:stop`, already weighted so that the sum
            over batches is the loss of the whole probe set.
        calls_model: `False` when the objective calls the layers itself (a
            `loss_fn`; it receives `y_pred=None`): the outputs of the kernel
            layers are then recorded as it calls them. Defaults to `True`.
        batch_size: Examples per forward pass.
        training: The `training` flag of the forward passes.
        seed: The seed of the null model's random units.

    Returns:
        The `Measurements`.
    """
    walk = _Pass(
        model, x, examples, objective, batch_size, training, seed, calls_model
    )
    scale = FLOAT16_LOSS_SCALE if _computes_in_float16(model) else 1.0
    restore = restoring(model)
    try:
        walk.run(scale)
        if scale != 1.0 and not walk.gradients_finite():
            walk.run(1.0)  # tell a real non-finite gradient from a scale overflow
    finally:
        restore()
    return Measurements(
        tracked=walk.tracked,
        grad_norms=np.array(
            [
                np.nan if g is None else np.sqrt(np.sum(np.square(g)))
                for g in walk.grad_sums
            ]
        ),
        has_gradient=np.array([g is not None for g in walk.grad_sums], dtype=bool),
        weight_norms=np.array(
            [
                np.linalg.norm(keras.ops.convert_to_numpy(v).astype(np.float64))
                for v in walk.variables
            ]
        ),
        activation_grad_norms={
            name: float(np.sqrt(value))
            for name, value in zip(walk.kernel_names, walk.squares)
        },
        units=[stat.result() for stat in walk.stats],
        first_non_finite_output=walk.first_non_finite,
        examples=examples,
        notes=walk.notes,
    )
