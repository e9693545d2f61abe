"""One pass over a probe set: gradients per variable and layer output, unit statistics.

This is the engine of `diagnose`: it runs the model batch by batch through the
backend's `probe_gradients` (`tf.GradientTape` on TensorFlow, `jax.grad` over a
stateless call on JAX), through a functional sub-model when the model has a graph (or
through the user's `loss_fn`), recording the outputs of the kernel layers it calls,
and accumulates what the detectors need. Non-trainable state touched by a `training=True`
pass (batch-norm moving statistics, dropout seeds) is restored afterwards, so a trained
model is left exactly as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from kgrad import backend
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
from kgrad.diagnosis.site_stats import SiteStats

Objective = Callable[[Any, int, int], Any]


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
    dense = backend.current().dense(gradient)
    return keras.ops.convert_to_numpy(dense).astype(np.float64)


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
    """One walk over the probe set, batch by batch, through `probe_gradients`."""

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
        # Where the recorder's calls of each kernel layer are.
        self._kernel_slots: list[int] = []
        self._watched_calls = not calls_model  # the sites come from recorded calls
        if not calls_model:
            self._watch_calls(model, seed)
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
        self.stats = [SiteStats(site, seed) for site in self.sites]
        tensors = [site.output for site in self.sites]
        tensors += [
            site.kernel_input if stat.null is not None else site.output
            for stat, site in zip(self.stats, self.sites)
        ]
        self.reader = LayerReader(model, tensors)
        # The kernel layers' outputs are differentiated where they are made.
        self.recorder = CallRecorder(self.kernel_layers)
        self._kernel_slots = list(range(len(self.kernel_layers)))
        self._order = {layer.name: i for i, layer in enumerate(ordered_layers(model))}
        self.kernel_names = [layer.name for layer in self.kernel_layers]

    def _watch_calls(self, model: keras.Model, seed: int) -> None:
        """Records, as the objective (a `loss_fn`) calls them, the outputs of every
        kernel layer, nested ones included, and the activation sites of the
        functional models among them (the sub-models of a GAN or a VAE)."""
        walked: dict[int, tuple[str, keras.Layer]] = {}
        for qualified, layer in [("", model)] + walk_layers(model):
            walked.setdefault(id(layer), (qualified, layer))
        kernels = [item for item in walked.values() if has_kernel(item[1])]
        self.kernel_names = [qualified for qualified, _ in kernels]
        self.kernel_layers = [layer for _, layer in kernels]
        self._order = {name: i for i, (name, _) in enumerate(walked.values())}
        for qualified, layer in walked.values():
            if isinstance(layer, keras.Model) and functional_reason(layer) is None:
                prefix = f"{qualified}/" if qualified else ""
                for site in activation_sites(layer):
                    self.sites.append(site)
                    self.stats.append(SiteStats(site, seed, prefix))
        watched = self.kernel_layers + [site.layer for site in self.sites]
        watched += [site.kernel_layer for site in self.sites if site.kernel_layer]
        self._watched = list({id(layer): layer for layer in watched}.values())
        self._slot = {id(layer): i for i, layer in enumerate(self._watched)}
        self.recorder = CallRecorder(self._watched)
        self._kernel_slots = [self._slot[id(layer)] for layer in self.kernel_layers]
        if not self.sites:
            self.notes.append(
                f"Through `loss_fn`, model {model.name!r} is measured by the "
                "gradients of its variables and of the outputs of the kernel layers "
                "the function calls. Dead-unit and saturation statistics come from "
                "the activations of functional sub-models; it has none."
            )

    def _recorded_sites(
        self, calls: list[list[tuple[Any, Any, Any]]]
    ) -> tuple[list[list[Any]], list[list[Any]]]:
        """Per site, one entry per call: its output, and its kernel layer's input
        (`None` where the null model needs none or the calls do not pair up)."""
        outputs, inputs = [], []
        for stat, site in zip(self.stats, self.sites):
            made = [call[1] for call in calls[self._slot[id(site.layer)]]]
            read = (
                [call[0] for call in calls[self._slot[id(site.kernel_layer)]]]
                if stat.null is not None
                else []
            )
            outputs.append(made)
            inputs.append(read if len(read) == len(made) else [None] * len(made))
        return outputs, inputs

    def _forward(self, xb: Any, start: int, stop: int) -> tuple[Any, Any]:
        """The objective on one batch, and what the reader read on the way.

        Returns:
            The loss, and per site its outputs and its kernel inputs (one per call;
            `None` when the sites come from the recorded calls).
        """
        if self._watched_calls:
            return self.objective(None, start, stop), None
        if self.reader is None:
            return self.objective(self.model(xb, training=self.training), start, stop), None
        read, y_pred = self.reader(xb, training=self.training)
        count = len(self.sites)
        site_outputs = [[output] for output in read[:count]]
        kernel_inputs = [[given] for given in read[count:]]
        return self.objective(y_pred, start, stop), (site_outputs, kernel_inputs)

    def run(self, scale: float) -> None:
        """Accumulates gradients of `scale` x the objective, divided back by `scale`."""
        self.grad_sums: list[np.ndarray | None] = [None] * len(self.variables)
        self.squares = np.full(len(self.kernel_layers), np.nan)  # NaN: no gradient
        self.first_non_finite: str | None = None
        for stat in self.stats:
            stat.reset()
        for start in range(0, self.examples, self.batch_size):
            stop = min(start + self.batch_size, self.examples)
            xb = keras.tree.map_structure(lambda value: value[start:stop], self.x)

            def scaled(xb: Any = xb, start: int = start, stop: int = stop) -> tuple:
                loss, read = self._forward(xb, start, stop)
                return loss * scale, read

            _, read, gradients, calls = backend.current().probe_gradients(
                self.model, scaled, self.variables, self.recorder
            )
            if read is None:
                site_outputs, kernel_inputs = self._recorded_sites(calls)
            else:
                site_outputs, kernel_inputs = read
            made = [calls[slot] for slot in self._kernel_slots]
            owners = [index for index, made_calls in enumerate(made) for _ in made_calls]
            outputs = [call[1] for made_calls in made for call in made_calls]
            output_gradients = [call[2] for made_calls in made for call in made_calls]
            for index, gradient in enumerate(gradients):
                dense = _dense(gradient)
                if dense is not None:
                    total = self.grad_sums[index]
                    dense /= scale
                    self.grad_sums[index] = dense if total is None else total + dense
            for index, gradient in zip(owners, output_gradients):
                if gradient is not None:
                    square = np.sum(np.square(_dense(gradient)))
                    previous = np.nan_to_num(self.squares[index])
                    self.squares[index] = previous + float(square) / scale**2
            names = []
            for stat, made_sites, given in zip(self.stats, site_outputs, kernel_inputs):
                for output, kernel_input in zip(made_sites, given):
                    stat.add(output, kernel_input if stat.null is not None else None)
                    names.append(stat.prefix + stat.site.name)
            names += [self.kernel_names[index] for index in owners]
            site_tensors = [output for made_sites in site_outputs for output in made_sites]
            for name, output in zip(names, site_tensors + outputs):
                self._check_finite(name, output)

    def _check_finite(self, name: str, output: Any) -> None:
        if bool(keras.ops.all(keras.ops.isfinite(keras.ops.cast(output, "float32")))):
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
