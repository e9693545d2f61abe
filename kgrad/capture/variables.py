"""Which trainable variables belong to which layer, and in which forward order.

A gradient profile across depth only means something when the layers are ordered as the
data flows through them. Functional and Sequential models keep their layers in
topological order; nested models are walked recursively; subclassed models fall back to
the order in which their layers were assigned (which is the forward order in nearly every
model written by hand).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from typing import Literal

import keras

VariableKind = Literal["kernel", "bias", "other"]

_KERNEL_NAMES = (
    "kernel",
    "embeddings",
    "depthwise_kernel",
    "pointwise_kernel",
    "recurrent_kernel",
)


@dataclasses.dataclass(frozen=True)
class TrackedVariable:
    """One trainable variable, with the layer that owns it.

    Attributes:
        name: The variable's short name (`kernel`, `bias`, `gamma`, ...).
        layer: The qualified layer name; nested models are joined with `/`
            (`encoder/dense_1`).
        depth: Forward position of the layer among the layers that own trainable
            variables; 0 is nearest the input.
        kind: `"kernel"`, `"bias"` or `"other"` (batch-norm scale and offset, ...).
        index: Position of the variable in `model.trainable_variables`.
        variable: The Keras variable itself.
    """

    name: str
    layer: str
    depth: int
    kind: VariableKind
    index: int
    variable: keras.Variable = dataclasses.field(repr=False, compare=False)


def variable_kind(name: str) -> VariableKind:
    """Classifies a variable by its name: kernel, bias or other.

    Args:
        name: The variable's short name, for example `"kernel"` or `"bias"`.

    Returns:
        `"kernel"` for weight matrices and embedding tables, `"bias"` for biases,
        `"other"` for everything else (batch-norm `gamma`/`beta`, ...).
    """
    if name in _KERNEL_NAMES or name.endswith("_kernel"):
        return "kernel"
    if name == "bias" or name.endswith("_bias"):
        return "bias"
    return "other"


def ordered_layers(model: keras.Model) -> list[keras.Layer]:
    """The direct sublayers of `model` in forward order (topological for functional)."""
    layers = list(getattr(model, "layers", None) or [])
    if not layers:
        layers = [
            layer
            for layer in model._flatten_layers(include_self=False, recursive=False)
        ]
    return layers


def _walk(layer: keras.Layer, prefix: str, out: list[tuple[str, keras.Layer]]) -> None:
    children = (
        ordered_layers(layer)
        if isinstance(layer, keras.Model)
        else list(layer._flatten_layers(include_self=False, recursive=False))
    )
    qualified = f"{prefix}{layer.name}"
    out.append((qualified, layer))
    for child in children:
        _walk(child, f"{qualified}/", out)


def walk_layers(model: keras.Model) -> list[tuple[str, keras.Layer]]:
    """Every layer of `model`, nested ones included, with its qualified name.

    Args:
        model: A built Keras model.

    Returns:
        `(qualified_name, layer)` pairs in forward order; nested names are joined
        with `/` (`encoder/dense_1`), parents before their children.
    """
    walked: list[tuple[str, keras.Layer]] = []
    for layer in ordered_layers(model):
        _walk(layer, "", walked)
    return walked


def layer_names(model: keras.Model) -> list[str]:
    """Qualified names of every layer of `model`, in forward order.

    Args:
        model: A built Keras model.

    Returns:
        The names, nested models joined with `/`.
    """
    return [name for name, _ in walk_layers(model)]


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    if patterns is None:
        return True
    leaf = name.rsplit("/", 1)[-1]
    return any(
        fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(leaf, pattern)
        for pattern in patterns
    )


def track_variables(
    model: keras.Model, layers: Sequence[str] | None = None
) -> list[TrackedVariable]:
    """Lists the trainable variables of `model` with their layer, kind and depth.

    Each variable is attributed to the innermost layer that created it; the layers are
    ordered by forward depth. Frozen layers own no trainable variable and are left out.

    Args:
        model: A built Keras model.
        layers: Glob patterns over (qualified or short) layer names; only the layers
            that match are tracked. Defaults to `None`, every layer.

    Returns:
        The tracked variables, ordered by depth and then by creation order in the layer.

    Raises:
        ValueError: if the model has no trainable variable, or `layers` matches no
            layer that owns one.

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> [(v.layer, v.kind) for v in track_variables(model)]
    [('dense', 'kernel'), ('dense', 'bias')]
    """
    trainable = list(model.trainable_variables)
    if not trainable:
        raise ValueError(
            f"Model {model.name!r} has no trainable weights, so there is no gradient "
            "to record. Build the model (call it on data or give it an `Input`) and "
            "make sure not every layer is frozen (`layer.trainable = False`)."
        )
    position = {id(variable): index for index, variable in enumerate(trainable)}

    walked = walk_layers(model)

    owner: dict[int, str] = {}
    # Innermost owner wins: later (deeper) entries of the walk overwrite their parents.
    for qualified, layer in walked:
        for variable in layer.trainable_variables:
            if id(variable) in position:
                owner[id(variable)] = qualified

    layer_order: list[str] = []
    for qualified, _ in walked:
        if qualified in owner.values() and qualified not in layer_order:
            layer_order.append(qualified)
    for variable in trainable:  # variables created by the model itself
        if id(variable) not in owner:
            owner[id(variable)] = model.name
            if model.name not in layer_order:
                layer_order.append(model.name)
    depth_of = {name: depth for depth, name in enumerate(layer_order)}

    tracked = [
        TrackedVariable(
            name=variable.name,
            layer=owner[id(variable)],
            depth=depth_of[owner[id(variable)]],
            kind=variable_kind(variable.name),
            index=position[id(variable)],
            variable=variable,
        )
        for variable in trainable
    ]
    tracked.sort(key=lambda item: (item.depth, item.index))
    selected = [item for item in tracked if _matches(item.layer, layers)]
    if not selected:
        raise ValueError(
            f"No layer with trainable weights matches `layers={list(layers or [])}`. "
            f"Layers of this model: {', '.join(layer_names(model))}"
        )
    return selected
