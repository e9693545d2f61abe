"""The null model of dead units: fresh random units reading the same inputs.

The fraction of zero-bias units with random Gaussian weights that are silent on the
probe inputs of a layer is what the geometry of those inputs explains (see
`kgrad.diagnosis.dead_units`).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

# Fresh random units of the null model, per layer.
NULL_UNITS = 512


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
