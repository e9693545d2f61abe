"""The null model of dead units: fresh random units reading the same inputs.

The fraction of zero-bias units with random Gaussian weights that are silent on the
probe inputs of a layer is what the geometry of those inputs explains (see
`kgrad.diagnosis.dead_units`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

# Fresh random units of the null model, per layer.
NULL_UNITS = 512


def has_null_model(kernel_layer: keras.Layer) -> bool:
    """Whether `null_units_layer` can wire null units like `kernel_layer`."""
    return _width_key(kernel_layer.get_config()) is not None


def _width_key(config: dict) -> str | None:
    return "units" if "units" in config else "filters" if "filters" in config else None


class GaussianUnits:
    """Zero-bias units with Gaussian weights over the last axis: one matrix product.

    The null model of a `Dense` layer, with no Keras layer to build and no layer call
    (each costs milliseconds, and the monitor asks for the null fractions every
    epoch). The product runs with `keras.ops` where the inputs are: a host NumPy
    product there would run on BLAS threads that contend with the backend's own
    (measured on JAX, 2 cores: 15 ms per probe layer, against 0.2 ms).

    Args:
        seed: The seed of the random weights.
        units: How many random units.
    """

    def __init__(self, seed: int, units: int):
        self.seed, self.units = seed, units

    def __call__(self, inputs: Any) -> Any:
        values = keras.ops.cast(inputs, "float32")
        values = keras.ops.reshape(values, (-1, values.shape[-1]))
        return keras.ops.matmul(
            values, _gaussian_kernel(self.seed, values.shape[-1], self.units)
        )


@functools.lru_cache(maxsize=32)
def _gaussian_kernel(seed: int, inputs: int, units: int) -> np.ndarray:
    # The weights a seeded `Dense` null layer would get (same draw, same seed); every
    # layer of the same input width shares them, so they are drawn once.
    initializer = keras.initializers.RandomNormal(seed=seed)
    kernel = keras.ops.convert_to_numpy(initializer((inputs, units)))
    kernel = kernel.astype(np.float32)
    kernel.flags.writeable = False
    return kernel


def null_units_layer(
    kernel_layer: keras.Layer, seed: int = 0, units: int = NULL_UNITS
) -> keras.Layer | GaussianUnits | None:
    """Fresh zero-bias units with N(0, 1) weights, wired like `kernel_layer`.

    They read the same input as the kernel layer (same strides and padding for a
    convolution); the fraction of them silent on the probe set is what the geometry of
    that input explains (see `kgrad.diagnosis.dead_units`).

    Args:
        kernel_layer: A `Dense` or convolution layer.
        seed: The seed of the random weights. Defaults to `0`.
        units: How many random units. Defaults to `512`.

    Returns:
        `GaussianUnits` for a `Dense` layer; for another layer an unbuilt layer of
        its type with `units` units; `None` when the layer's type has neither `units`
        nor `filters`.
    """
    if type(kernel_layer) is keras.layers.Dense:
        return GaussianUnits(seed, units)
    config = kernel_layer.get_config()
    key = _width_key(config)
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


def null_active_units(
    null_layer: keras.Layer | GaussianUnits, kernel_input: Any
) -> np.ndarray:
    """Which null-model units fire (output > 0) for at least one example or position.

    Computed where the inputs are; only the answer, one boolean per unit, comes to
    the host.

    Args:
        null_layer: What `null_units_layer` returned.
        kernel_input: A batch of the kernel layer's input.

    Returns:
        A boolean array with one entry per null unit.
    """
    outputs = null_layer(kernel_input)
    outputs = keras.ops.reshape(outputs, (-1, outputs.shape[-1]))
    return keras.ops.convert_to_numpy(keras.ops.any(outputs > 0, axis=0))


def null_active_units_of_layers(
    null_layers: Sequence[keras.Layer | GaussianUnits], kernel_inputs: Sequence[Any]
) -> list[np.ndarray]:
    """`null_active_units` of each null layer on its input, computed together.

    The Dense null models of one seed and width whose inputs have one shape take one
    batched matrix product between them (a few operations in all, instead of a few
    per layer: the monitor asks for every layer with dead units at once); the others
    are computed one by one.

    Args:
        null_layers: What `null_units_layer` returned, per layer.
        kernel_inputs: The input of each, in the same order.

    Returns:
        Per layer, a boolean array with one entry per null unit.
    """
    results: list[np.ndarray | None] = [None] * len(null_layers)
    groups: dict[tuple, list[int]] = {}
    for position, (layer, inputs) in enumerate(zip(null_layers, kernel_inputs)):
        if isinstance(layer, GaussianUnits):
            key = (layer.seed, layer.units, tuple(inputs.shape))
            groups.setdefault(key, []).append(position)
        else:
            results[position] = null_active_units(layer, inputs)
    for (seed, units, shape), positions in groups.items():
        stacked = keras.ops.stack([kernel_inputs[p] for p in positions])
        stacked = keras.ops.reshape(
            keras.ops.cast(stacked, "float32"), (len(positions), -1, shape[-1])
        )
        outputs = keras.ops.matmul(stacked, _gaussian_kernel(seed, shape[-1], units))
        active = keras.ops.convert_to_numpy(keras.ops.any(outputs > 0, axis=1))
        for position, row in zip(positions, active):
            results[position] = row
    return results
