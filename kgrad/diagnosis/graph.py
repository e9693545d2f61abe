"""Reading the tensors between layers, through a functional sub-model of the model.

Dead-unit and saturation statistics, activation gradients and the null model of dead
units all need the tensors between layers. A Functional or Sequential model exposes them
(the inputs and outputs of each layer's node in its graph); a subclassed model computes
them inside `call`, out of reach, so those statistics are unavailable for it (its
gradient statistics still work).

When the layers are called inside a user's function instead (`diagnose(...,
loss_fn=...)`, for models without a `call()` of their own), `CallRecorder` reads their
outputs by wrapping each layer's `call` for the length of a block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras

# `transform(layer_index, call_index, output)`: what a recorded call returns instead.
Transform = Callable[[int, int, Any], Any]


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
            "functional graph: its layer outputs exist only inside `call`, so "
            "dead-unit and saturation statistics and activation gradients are "
            "unavailable. Gradient statistics (per-layer gradient and weight norms, "
            "vanishing, exploding, stalled) still work. Build the model with the "
            "functional API or `keras.Sequential` to get the activation statistics."
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


class LayerReader:
    """One forward pass that returns the tensors between layers and the predictions.

    Args:
        model: A Functional or Sequential model.
        tensors: Symbolic tensors of `model` to return (layer outputs or inputs).

    Example:

    >>> first = layer_output(model, model.layers[0])  # doctest: +SKIP
    >>> reader = LayerReader(model, [first])  # doctest: +SKIP
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


class CallRecorder:
    """Records what some layers receive and return each time they are called.

    For forward passes that run through a user's function (a `loss_fn` calling the
    sub-models of a GAN or a VAE), where no functional graph of the whole
    computation exists, and for the outputs of the layers whose gradients `diagnose`
    takes. Each layer's `call` is wrapped on the instance for the length of
    `recording()` and restored afterwards. Only calls with one tensor output are
    recorded (not the symbolic ones of a model being built), as `(first input,
    output)`; a layer called several times records every call. The backend's
    `probe_gradients` differentiates the loss with respect to these outputs.

    Args:
        layers: The layers to watch.

    Example:

    >>> recorder = CallRecorder([model.encoder.layers[1]])  # doctest: +SKIP
    >>> with recorder.recording() as calls:  # doctest: +SKIP
    ...     loss = loss_fn(model, x)
    >>> [output for _, output in calls[0]]  # doctest: +SKIP
    """

    def __init__(self, layers: Sequence[keras.Layer]):
        self.layers = list(layers)

    @staticmethod
    def _wrapped(
        call: Any,
        calls: list[tuple[Any, Any]],
        slot: int,
        transform: Transform | None,
    ) -> Any:
        def recording_call(*args: Any, **kwargs: Any) -> Any:
            output = call(*args, **kwargs)
            if keras.ops.is_tensor(output):
                if transform is not None:
                    output = transform(slot, len(calls), output)
                given = args[0] if args else None
                calls.append((given if keras.ops.is_tensor(given) else None, output))
            return output

        return recording_call

    @contextlib.contextmanager
    def recording(
        self, transform: Transform | None = None
    ) -> Iterator[list[list[tuple[Any, Any]]]]:
        """Records the calls made in the block: per layer, `(input, output)` pairs.

        Args:
            transform: `transform(layer_index, call_index, output)` returns what the
                call returns instead of `output` (and what is recorded): JAX's
                `probe_gradients` adds a zero there to differentiate the output.
                Defaults to `None`, the output as it is.
        """
        calls: list[list[tuple[Any, Any]]] = [[] for _ in self.layers]
        # `object.__setattr__`: a layer's own `__setattr__` tracks what it is given.
        saved = [layer.__dict__.get("call") for layer in self.layers]
        for slot, (layer, outputs) in enumerate(zip(self.layers, calls)):
            wrapped = self._wrapped(layer.call, outputs, slot, transform)
            object.__setattr__(layer, "call", wrapped)
        try:
            yield calls
        finally:
            for layer, previous in zip(self.layers, saved):
                if previous is None:
                    object.__delattr__(layer, "call")
                else:
                    object.__setattr__(layer, "call", previous)
