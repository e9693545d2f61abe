"""The unit statistics of one activation site, accumulated over probe batches.

Which ReLU-family units fired for some example (and which units of the null model
would have, on the same inputs), the fraction of saturated sigmoid/tanh outputs, the
mean bias of the dead units: the row of `Report.units` for one site.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from kgrad.diagnosis.activations import ActivationSite
from kgrad.diagnosis.fixes import DEAD_PRONE
from kgrad.diagnosis.null_units import null_active_units, null_units_layer
from kgrad.diagnosis.saturation import DERIVATIVE_THRESHOLD, derivative_from_outputs


class SiteStats:
    """Accumulates the unit statistics of one activation site over batches.

    Args:
        site: The `ActivationSite`.
        seed: The seed of the null model's random units.
        prefix: Prepended to the site's and its kernel layer's names in the
            result: the qualified name of the sub-model it belongs to, with a
            trailing `/` (`"encoder/"`). Defaults to `""`.
    """

    def __init__(self, site: ActivationSite, seed: int, prefix: str = ""):
        self.site, self.prefix = site, prefix  # prefix: the qualified sub-model name
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

    def add(self, output: Any, kernel_input: Any) -> None:
        flat = ops.reshape(output, (-1, output.shape[-1]))
        if self.site.activation in DEAD_PRONE:
            active = ops.convert_to_numpy(ops.any(ops.not_equal(flat, 0), axis=0))
            self.active = active if self.active is None else self.active | active
            if self.null is not None and kernel_input is not None:
                null_active = null_active_units(self.null, kernel_input)
                previous = self.null_active
                self.null_active = (
                    null_active if previous is None else previous | null_active
                )
        else:
            outputs = ops.convert_to_numpy(flat)
            derivative = derivative_from_outputs(outputs, self.site.activation)
            self.saturated += int(np.count_nonzero(derivative < DERIVATIVE_THRESHOLD))
            self.total += int(derivative.size)

    def result(self) -> dict[str, Any]:
        site = self.site
        row: dict[str, Any] = {
            "site": self.prefix + site.name,
            "layer": None if site.owner is None else self.prefix + site.owner,
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
