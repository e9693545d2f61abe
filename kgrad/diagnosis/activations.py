"""Reading what each layer outputs, through a functional sub-model of the model.

Dead-unit and saturation statistics, activation gradients and the null model of dead
units all need the tensors between layers. A Functional or Sequential model exposes them
(the inputs and outputs of each layer's node in the graph); a subclassed model computes them inside `call`, out of
reach, so those statistics are unavailable for it (its gradient statistics still work).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from kgrad.capture.variables import _ordered_layers, _walk
from kgrad.diagnosis.fixes import DEAD_PRONE, SATURATING, NetworkContext

# Layers a site looks through when it searches the kernel layer it belongs to.
_PASS_THROUGH = ("Dropout", "GaussianNoise", "GaussianDropout", "SpatialDropout")
# Fresh random units of the null model of dead units, per layer.
NULL_UNITS = 512


@dataclasses.dataclass
class ActivationSite:
    """A layer whose output is a ReLU-family, sigmoid or tanh activation.

    Attributes:
        layer: The Keras layer producing the activation (a `Dense` with a fused
            activation, or an `Activation`/`ReLU` layer).
        activation: The activation's name (`"relu"`, `"sigmoid"`, ...).
        owner: The name of the kernel layer whose output it activates, or `None`
            (for example after an `Add`).
        kernel_layer: That kernel layer, or `None`.
        normalized: Whether a normalization layer sits between the kernel layer and
            the activation (it centres every unit, so silence is not geometric).
        output: The symbolic output of the site in the model's graph.
        kernel_input: The symbolic input of the kernel layer, or `None`.
    """

    layer: keras.Layer
    activation: str
    owner: str | None
    kernel_layer: keras.Layer | None
    normalized: bool
    output: Any = dataclasses.field(default=None, repr=False)
    kernel_input: Any = dataclasses.field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def units(self) -> int:
        return int(self.output.shape[-1])


def activation_name(layer: keras.Layer) -> str | None:
    """The name of the activation a layer applies, or `None` if it applies none."""
    kind = type(layer).__name__
    if kind == "ReLU":
        if getattr(layer, "negative_slope", 0.0):
            return "leaky_relu"
        return "relu6" if getattr(layer, "max_value", None) == 6 else "relu"
    if kind in ("LeakyReLU", "PReLU"):
        return "leaky_relu"
    if kind == "ELU":
        return "elu"
    function = getattr(layer, "activation", None)
    if function is None or not callable(function):
        return None
    return getattr(function, "__name__", None)


def has_kernel(layer: keras.Layer) -> bool:
    """Whether the layer owns a trainable weight matrix (Dense, Conv, ...)."""
    return any(
        variable.name.endswith("kernel") for variable in layer.trainable_variables
    )


def functional_reason(model: keras.Model) -> str | None:
    """Why the layer outputs of `model` cannot be read, or `None` if they can."""
    try:
        inputs = model.inputs
        outputs = model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs:
        return (
            f"model {model.name!r} ({type(model).__name__}) is subclassed, with no "
            "functional graph: its layer outputs exist only inside `call`, so dead-unit "
            "and saturation statistics and activation gradients are unavailable. "
            "Gradient statistics (per-layer gradient and weight norms, vanishing, "
            "exploding, stalled) still work. Build the model with the functional API or "
            "`keras.Sequential` to get the activation statistics."
        )
    return None


def _node(model: keras.Model, layer: keras.Layer) -> Any:
    """The node of `layer` that belongs to the graph of `model`.

    A layer may have several nodes: a deserialized `Sequential` rebuilds its graph
    once per added layer, and only the last graph connects to `model.outputs`.
    """
    graph = getattr(model, "_functional", None) or model
    keys = getattr(graph, "_nodes", None)
    nodes = list(getattr(layer, "_inbound_nodes", []))
    if keys is None:
        return nodes[-1] if nodes else None
    # Functional graphs key their nodes by operation identity and node index.
    matches = [n for i, n in enumerate(nodes) if f"{id(layer)}_ib-{i}" in keys]
    return matches[0] if len(matches) == 1 else None


def layer_output(model: keras.Model, layer: keras.Layer) -> Any:
    """The symbolic output of `layer` in `model`'s graph (`None` if ambiguous)."""
    node = _node(model, layer)
    tensors = [] if node is None else list(node.output_tensors)
    return tensors[0] if len(tensors) == 1 else None


def layer_input(model: keras.Model, layer: keras.Layer) -> Any:
    """The symbolic input of `layer` in `model`'s graph (`None` if several)."""
    node = _node(model, layer)
    tensors = [] if node is None else list(node.input_tensors)
    return tensors[0] if len(tensors) == 1 else None


def _inbound(model: keras.Model, layer: keras.Layer) -> keras.Layer | None:
    tensor = layer_input(model, layer)
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history.operation


def _site(model: keras.Model, layer: keras.Layer, activation: str) -> ActivationSite:
    output = layer_output(model, layer)
    if has_kernel(layer):
        return ActivationSite(
            layer, activation, layer.name, layer, False, output, layer_input(model, layer)
        )
    normalized = False
    inbound = _inbound(model, layer)
    while inbound is not None and not has_kernel(inbound):
        kind = type(inbound).__name__
        if kind.endswith("Normalization") and inbound.trainable_variables:
            normalized = True
        elif not (kind.startswith(_PASS_THROUGH) or activation_name(inbound) == "linear"):
            inbound = None
            break
        inbound = _inbound(model, inbound)
    if inbound is None or isinstance(inbound, keras.layers.InputLayer):
        return ActivationSite(layer, activation, None, None, normalized, output)
    return ActivationSite(
        layer, activation, inbound.name, inbound, normalized, output,
        layer_input(model, inbound),
    )


def activation_sites(model: keras.Model, every: bool = False) -> list[ActivationSite]:
    """The layers of a functional model that apply an activation, in forward order.

    Args:
        model: A Functional or Sequential model (top-level layers are searched).
        every: Include every activation; otherwise only ReLU-family (dead-prone),
            sigmoid and tanh ones. Defaults to `False`.

    Returns:
        The sites; empty for a subclassed model.
    """
    if functional_reason(model) is not None:
        return []
    sites = []
    for layer in _ordered_layers(model):
        activation = activation_name(layer)
        if activation is None or activation == "linear":
            continue
        if every or activation in DEAD_PRONE or activation in SATURATING:
            site = _site(model, layer, activation)
            if site.output is not None:  # a layer shared by several calls is skipped
                sites.append(site)
    return sites


def weight_scale(kernel: Any) -> float:
    """σ_w² = fan_in·Var[W] of a kernel whose last axis holds the units.

    Example:

    >>> round(weight_scale(np.random.default_rng(0).normal(size=(400, 300))), 1)
    400.0
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    fan_in = int(np.prod(kernel.shape[:-1])) if kernel.ndim > 1 else 1
    with np.errstate(invalid="ignore"):  # a non-finite kernel has a NaN scale
        return float(fan_in * np.var(kernel))


def network_context(model: keras.Model) -> NetworkContext:
    """What the fixes need to know: activations, initializers, weight scales, ...

    Args:
        model: A built Keras model.

    Returns:
        A `NetworkContext` keyed by qualified layer names (as in `track_variables`).
    """
    walked: list[tuple[str, keras.Layer]] = []
    for layer in _ordered_layers(model):
        _walk(layer, "", walked)
    context = NetworkContext()
    for qualified, layer in walked:
        kind = type(layer).__name__
        if kind.endswith("Normalization") and layer.trainable_variables:
            context.normalized = True
        if kind == "Add":
            context.residual = True
        activation = activation_name(layer)
        if has_kernel(layer):
            context.initializers[qualified] = type(
                getattr(layer, "kernel_initializer", None)
            ).__name__
            kernel = getattr(layer, "kernel", None)
            if kernel is not None:
                context.weight_scale[qualified] = weight_scale(keras.ops.convert_to_numpy(kernel))
            if activation and activation != "linear":
                context.activations[qualified] = activation
    for site in activation_sites(model, every=True):
        if site.owner is not None and site.owner not in context.activations:
            context.activations[site.owner] = site.activation
    return context


def null_units_layer(
    kernel_layer: keras.Layer, seed: int = 0, units: int = NULL_UNITS
) -> keras.Layer | None:
    """Fresh zero-bias units with N(0, 1) weights, wired like `kernel_layer`.

    They read the same input as the kernel layer (same strides and padding for a
    convolution); the fraction of them silent on the probe set is what the geometry of
    that input explains (see `kgrad.diagnosis.dead_units`).

    Args:
        kernel_layer: A `Dense` or convolution layer.
        seed: The seed of the random weights. Defaults to `0`.
        units: How many random units. Defaults to `512`.

    Returns:
        An unbuilt layer with `units` units, or `None` when the layer's type has
        neither `units` nor `filters`.
    """
    config = kernel_layer.get_config()
    key = "units" if "units" in config else "filters" if "filters" in config else None
    if key is None:
        return None
    config.pop("name", None)
    config.update(
        {
            key: units,
            "use_bias": False,
            "activation": "linear",
            "kernel_initializer": keras.initializers.RandomNormal(seed=seed),
            "kernel_regularizer": None,
            "kernel_constraint": None,
        }
    )
    if "groups" in config:
        config["groups"] = 1
    return type(kernel_layer).from_config(config)


def null_active_units(null_layer: keras.Layer, kernel_input: Any) -> np.ndarray:
    """Which null-model units fire (output > 0) for at least one example or position.

    Args:
        null_layer: A layer from `null_units_layer`.
        kernel_input: A batch of the kernel layer's input.

    Returns:
        A boolean array of shape `(NULL_UNITS,)`.
    """
    outputs = keras.ops.convert_to_numpy(null_layer(kernel_input))
    return np.any(outputs.reshape(-1, outputs.shape[-1]) > 0, axis=0)


class LayerReader:
    """One forward pass that returns the tensors between layers and the predictions.

    Args:
        model: A Functional or Sequential model.
        tensors: Symbolic tensors of `model` to return (layer outputs or inputs).

    Example:

    >>> reader = LayerReader(model, [layer_output(model, model.layers[0])])  # doctest: +SKIP
    >>> (first_output,), y_pred = reader(x)  # doctest: +SKIP
    """

    def __init__(self, model: keras.Model, tensors: Sequence[Any]):
        inputs = model.inputs
        outputs = keras.tree.flatten(model.outputs)
        self._structure = model.outputs
        self._count = len(tensors)
        self._model = keras.Model(
            inputs[0] if len(inputs) == 1 else inputs, list(tensors) + outputs
        )

    def __call__(self, x: Any, training: bool = False) -> tuple[list[Any], Any]:
        results = self._model(x, training=training)
        results = list(results) if isinstance(results, (list, tuple)) else [results]
        y_pred = results[self._count :]
        y_pred = keras.tree.pack_sequence_as(self._structure, y_pred)
        if isinstance(y_pred, list) and len(y_pred) == 1:
            y_pred = y_pred[0]
        return results[: self._count], y_pred
