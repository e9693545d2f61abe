"""Which layers apply which activation, and what the fixes need to know of a network.

An activation site is a layer whose output is a ReLU-family, sigmoid or tanh
activation: fused into a kernel layer (`Dense(activation="relu")`) or a separate
`Activation`/`ReLU` layer, traced back through normalization and dropout to the kernel
layer it activates. Sites are found in the functional graph (`kgrad.diagnosis.graph`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np

from kgrad.capture.variables import ordered_layers, walk_layers
from kgrad.diagnosis.fixes import DEAD_PRONE, SATURATING, NetworkContext
from kgrad.diagnosis.graph import functional_reason, layer_input, layer_output

# Layers a site looks through when it searches the kernel layer it belongs to.
_PASS_THROUGH = ("Dropout", "GaussianNoise", "GaussianDropout", "SpatialDropout")


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


def _inbound(model: keras.Model, layer: keras.Layer) -> keras.Layer | None:
    tensor = layer_input(model, layer)
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history.operation


def _site(model: keras.Model, layer: keras.Layer, activation: str) -> ActivationSite:
    output = layer_output(model, layer)
    if has_kernel(layer):
        return ActivationSite(
            layer,
            activation,
            layer.name,
            layer,
            False,
            output,
            layer_input(model, layer),
        )
    normalized = False
    inbound = _inbound(model, layer)
    while inbound is not None and not has_kernel(inbound):
        kind = type(inbound).__name__
        if kind.endswith("Normalization") and inbound.trainable_variables:
            normalized = True
        elif not (
            kind.startswith(_PASS_THROUGH) or activation_name(inbound) == "linear"
        ):
            inbound = None
            break
        inbound = _inbound(model, inbound)
    if inbound is None or isinstance(inbound, keras.layers.InputLayer):
        return ActivationSite(layer, activation, None, None, normalized, output)
    return ActivationSite(
        layer,
        activation,
        inbound.name,
        inbound,
        normalized,
        output,
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
    for layer in ordered_layers(model):
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

    >>> kernel = np.random.default_rng(0).normal(scale=0.05, size=(400, 300))
    >>> round(weight_scale(kernel), 1)  # 400 * 0.05**2
    1.0
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    fan_in = int(np.prod(kernel.shape[:-1])) if kernel.ndim > 1 else 1
    with np.errstate(invalid="ignore"):  # a non-finite kernel has a NaN scale
        return float(fan_in * np.var(kernel))


# Merges that give the signal a path of gain 1 when one input is an ancestor of the
# other: `x + f(x)` (He et al. 2016) or `concat([x, f(x)])` (DenseNet).
_SKIP_MERGES = frozenset({"Add", "Average", "Concatenate"})


def _producer(tensor: Any) -> tuple[Any, Any] | None:
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None
    operation, node_index = history.operation, history.node_index
    nodes = getattr(operation, "_inbound_nodes", [])
    return (operation, nodes[node_index]) if node_index < len(nodes) else None


def _ancestors(tensor: Any) -> set[int]:
    """The ids of every tensor `tensor` is computed from, itself included."""
    seen: set[int] = set()
    stack = [tensor]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        produced = _producer(current)
        if produced is not None:
            stack.extend(produced[1].input_tensors)
    return seen


def _is_skip(node: Any) -> bool:
    """Whether a merge node adds (or concatenates) a tensor to one computed from it."""
    inputs = keras.tree.flatten(node.input_tensors)
    return any(
        id(earlier) in _ancestors(later)
        for i, earlier in enumerate(inputs)
        for later in inputs[:i] + inputs[i + 1 :]
    )


def has_skip_connection(model: keras.Layer) -> bool:
    """Whether `model` holds a skip connection: a merge of a tensor with one
    computed from it (`Add()([x, f(x)])`, `x + f(x)`, `Concatenate()([x, f(x)])`).

    In a functional graph (nested ones included) the merge must join a block's input
    and output: an `Add` of two parallel branches is no skip. A subclassed model's
    graph is out of reach; an `Add` layer among its layers counts.

    Args:
        model: A Keras model.

    Returns:
        `True` if a skip connection was found.

    Example:

    >>> inputs = keras.Input((4,))
    >>> hidden = keras.layers.Dense(4)(inputs)
    >>> has_skip_connection(keras.Model(inputs, keras.layers.Add()([inputs, hidden])))
    True
    """
    for _, layer in [("", model)] + walk_layers(model):
        if isinstance(layer, keras.Model) and functional_reason(layer) is None:
            graph = getattr(layer, "_functional", None) or layer  # a Sequential's
            for operation in getattr(graph, "operations", []):
                if type(operation).__name__ not in _SKIP_MERGES:
                    continue
                nodes = getattr(operation, "_inbound_nodes", [])
                if any(_is_skip(node) for node in nodes):
                    return True
        elif type(layer).__name__ == "Add" and not layer._inbound_nodes:
            return True  # called inside a subclassed `call`, out of reach
    return False


def he_initialized(initializer: Any) -> bool:
    """Whether a kernel initializer is He's: Var[W] = 2/fan_in.

    `HeNormal`, `HeUniform`, and a `VarianceScaling` with `scale=2` and
    `mode="fan_in"` (what they are).

    Example:

    >>> he_initialized(keras.initializers.VarianceScaling(2.0, "fan_in"))
    True
    """
    if type(initializer).__name__.startswith("He"):
        return True
    return (
        isinstance(initializer, keras.initializers.VarianceScaling)
        and np.isclose(initializer.scale, 2.0)
        and initializer.mode == "fan_in"
    )


def attention_score_layers(walked: list[tuple[str, keras.Layer]]) -> list[str]:
    """The qualified names of the query and key projections of attention layers.

    Their products make the attention logits; see `kgrad.diagnosis.stalled` for
    why their gradients are small at initialization.

    Args:
        walked: `walk_layers(model)`.

    Returns:
        The names, for example `["mha/query", "mha/key"]`.
    """
    names = {id(layer): qualified for qualified, layer in walked}
    found = []
    for _, layer in walked:
        if isinstance(layer, keras.layers.MultiHeadAttention) or (
            type(layer).__name__ == "GroupedQueryAttention"
        ):
            for attribute in ("_query_dense", "_key_dense"):
                projection = getattr(layer, attribute, None)
                if projection is not None and id(projection) in names:
                    found.append(names[id(projection)])
    return found


def network_context(model: keras.Model) -> NetworkContext:
    """What the fixes need to know: activations, initializers, weight scales, ...

    Args:
        model: A built Keras model.

    Returns:
        A `NetworkContext` keyed by qualified layer names (as in `track_variables`).
    """
    walked = walk_layers(model)
    context = NetworkContext(
        residual=has_skip_connection(model),
        attention_scores=set(attention_score_layers(walked)),
    )
    for qualified, layer in walked:
        kind = type(layer).__name__
        if kind.endswith("Normalization") and layer.trainable_variables:
            context.normalized = True
        activation = activation_name(layer)
        if has_kernel(layer):
            initializer = getattr(layer, "kernel_initializer", None)
            context.initializers[qualified] = type(initializer).__name__
            if he_initialized(initializer):
                context.he_initialized.add(qualified)
            kernel = getattr(layer, "kernel", None)
            if kernel is not None:
                context.weight_scale[qualified] = weight_scale(
                    keras.ops.convert_to_numpy(kernel)
                )
            if activation and activation != "linear":
                context.activations[qualified] = activation
    for site in activation_sites(model, every=True):
        if site.owner is not None and site.owner not in context.activations:
            context.activations[site.owner] = site.activation
    return context
