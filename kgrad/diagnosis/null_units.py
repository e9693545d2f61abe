"""The null model of dead units: fresh random units reading the same inputs.

The fraction of zero-bias units with random Gaussian weights that are silent on the
probe inputs of a layer is what the geometry of those inputs explains (see
`kgrad.diagnosis.dead_units`).
"""

from __future__ import annotations

import functools
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
    """Zero-bias units with Gaussian weights over the last axis, applied on the host.

    The null model of a `Dense` layer: a matrix product in NumPy, with no Keras layer
    to build and no eager call (each costs milliseconds, and the monitor asks for the
    null fractions every epoch).

    Args:
        seed: The seed of the random weights.
        units: How many random units.
    """

    def __init__(self, seed: int, units: int):
        self.seed, self.units = seed, units

    def __call__(self, inputs: Any) -> np.ndarray:
        values = np.asarray(keras.ops.convert_to_numpy(inputs), np.float32)
        values = values.reshape(-1, values.shape[-1])
        return values @ _gaussian_kernel(self.seed, values.shape[-1], self.units)


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

    Args:
        null_layer: What `null_units_layer` returned.
        kernel_input: A batch of the kernel layer's input.

    Returns:
        A boolean array with one entry per null unit.
    """
    outputs = keras.ops.convert_to_numpy(null_layer(kernel_input))
    return np.any(outputs.reshape(-1, outputs.shape[-1]) > 0, axis=0)
