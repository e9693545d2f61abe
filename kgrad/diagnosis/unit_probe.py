"""A cheap periodic probe during training: unit activity and how far the weights moved.

Called every `probe_every_n_steps` steps by `GradientHealthMonitor`, it (a) passes a
fixed probe batch through a functional sub-model, returning which ReLU-family units
fired and the saturated fraction of each sigmoid/tanh site, and (b) measures
‖w − w_prev‖ and ‖w‖ per layer against a host copy of the weights taken at the previous
probe. The activation statistics stay tensors until `decode` reads them (at the end of
the epoch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kgrad.capture.variables import TrackedVariable
from kgrad.diagnosis.activations import activation_sites
from kgrad.diagnosis.graph import LayerReader
from kgrad.diagnosis.null_units import null_active_units, null_units_layer
from kgrad.diagnosis.fixes import DEAD_PRONE
from kgrad.diagnosis.saturation import DERIVATIVE_THRESHOLD
from kgrad.diagnosis.unit_health import SiteInfo

# Fewer null units than `diagnose` uses: computed once per epoch during training, and
# 256 units pin the null fraction to about ±0.03.
PROBE_NULL_UNITS = 256
# Probes run eagerly before the forward pass is compiled (tracing costs ~a dozen).
EAGER_PROBES = 16


class UnitProbe:
    """Unit activity on a probe batch, and weight movement since the last probe.

    Args:
        model: The model being trained.
        tracked: The tracked variables (grouped into layers for the update ratios).
        x: Probe inputs, or `None` to measure weight movement only (also when the
            model has no functional graph: pass `x=None` then).

    Example:

    >>> tracked = kgrad.track_variables(model)  # doctest: +SKIP
    >>> probe = UnitProbe(model, tracked, x_probe)  # doctest: +SKIP
    >>> result = probe()  # doctest: +SKIP
    >>> active, saturated, deltas, weights = probe.decode(result)  # doctest: +SKIP
    """

    def __init__(
        self, model: keras.Model, tracked: Sequence[TrackedVariable], x: Any = None
    ):
        self.layers = list(dict.fromkeys(item.layer for item in tracked))
        self._groups = [
            [item.variable for item in tracked if item.layer == layer]
            for layer in self.layers
        ]
        self.sites = activation_sites(model) if x is not None else []
        # The null model of dead units reads each ReLU site's kernel input; the probe
        # returns those inputs too, and keeps the last ones for the null fractions.
        self._null_layers = {
            index: null_units_layer(site.kernel_layer, units=PROBE_NULL_UNITS)
            for index, site in enumerate(self.sites)
            if site.activation in DEAD_PRONE
            and site.kernel_input is not None
            and not site.normalized
        }
        self._null_layers = {
            i: n for i, n in self._null_layers.items() if n is not None
        }
        self._reader = (
            LayerReader(
                model,
                [site.output for site in self.sites]
                + [self.sites[i].kernel_input for i in self._null_layers],
            )
            if self.sites
            else None
        )
        self._previous = [[self._read(v) for v in group] for group in self._groups]
        self._x = (
            None if x is None else keras.tree.map_structure(tf.convert_to_tensor, x)
        )
        self._kernel_inputs: dict[int, tf.Tensor] = {}
        self._calls = 0
        self._null_cache: dict[int, tuple[bytes, float]] = {}

    @staticmethod
    def _read(variable: Any) -> np.ndarray:
        return keras.ops.convert_to_numpy(variable).astype(np.float32)

    def __call__(self) -> tuple[list[tf.Tensor], np.ndarray, np.ndarray]:
        """Runs the probe.

        The forward pass runs eagerly for the first probes (compiling it costs as
        much as a dozen eager passes, more than all the probes of a short run), and
        compiled from then on. The weights are compared on the host, in one read per
        variable.

        Returns:
            The activation statistics per site (tensors, read at `decode`), and the
            weight-change and weight norms per layer since the previous probe.
        """
        parts = []
        if self._reader is not None:
            self._calls += 1
            if self._calls == EAGER_PROBES + 1:
                self._reader = tf.function(self._reader)
            outputs, _ = self._reader(self._x, training=False)
            self._kernel_inputs = dict(
                zip(self._null_layers, outputs[len(self.sites) :])
            )
            for site, output in zip(self.sites, outputs):
                flat = tf.cast(tf.reshape(output, [-1, output.shape[-1]]), tf.float32)
                if site.activation in DEAD_PRONE:
                    parts.append(tf.reduce_any(flat != 0, axis=0))
                else:
                    derivative = (
                        flat * (1.0 - flat)
                        if site.activation == "sigmoid"
                        else 1.0 - flat**2
                    )
                    parts.append(
                        tf.reduce_mean(
                            tf.cast(derivative < DERIVATIVE_THRESHOLD, tf.float32)
                        )
                    )
        deltas, weights = [], []
        for index, group in enumerate(self._groups):
            values = [self._read(variable) for variable in group]
            deltas.append(
                np.sqrt(
                    sum(
                        np.sum(np.square(v - p))
                        for v, p in zip(values, self._previous[index])
                    )
                )
            )
            weights.append(np.sqrt(sum(np.sum(np.square(v)) for v in values)))
            self._previous[index] = values
        return parts, np.array(deltas), np.array(weights)

    @property
    def site_infos(self) -> list[SiteInfo]:
        """The probed sites, described by plain values."""
        return [
            SiteInfo(site.name, site.owner, site.activation, site.units)
            for site in self.sites
        ]

    def null_silent_fractions(self, dead: Sequence[np.ndarray | None]) -> list[float]:
        """Per site, the fraction of null-model units silent on the last probe's inputs.

        Fresh zero-bias random units reading each ReLU site's kernel input (see
        `kgrad.diagnosis.dead_units`): what the geometry of the inputs explains. 0
        after a normalization layer (it centres every unit); NaN where unknown
        (sigmoid/tanh sites, no kernel layer). Computed only for sites with dead
        units, and again only when their set of dead units changes.

        Args:
            dead: Per site, the boolean mask of dead units, or `None`.
        """
        fractions = [
            0.0 if site.normalized and site.activation in DEAD_PRONE else float("nan")
            for site in self.sites
        ]
        for index, layer in self._null_layers.items():
            mask = dead[index]
            if mask is None or not mask.any() or index not in self._kernel_inputs:
                continue
            key = np.packbits(mask).tobytes()
            if self._null_cache.get(index, (None,))[0] != key:
                silent = ~null_active_units(layer, self._kernel_inputs[index])
                self._null_cache[index] = (key, float(np.mean(silent)))
            fractions[index] = self._null_cache[index][1]
        return fractions

    def dead_bias_means(self, dead: Sequence[np.ndarray | None]) -> list[float]:
        """The mean bias of the dead units of each site (NaN where unknown).

        Args:
            dead: Per site, the boolean mask of dead units, or `None`.
        """
        means = []
        for site, mask in zip(self.sites, dead):
            bias = getattr(site.kernel_layer, "bias", None)
            if mask is None or not mask.any() or bias is None or site.normalized:
                means.append(float("nan"))
            else:
                means.append(float(np.mean(keras.ops.convert_to_numpy(bias)[mask])))
        return means

    def decode(
        self, result: tuple[list[tf.Tensor], np.ndarray, np.ndarray]
    ) -> tuple[list[np.ndarray | None], list[float | None], np.ndarray, np.ndarray]:
        """Unpacks a probe result.

        Returns:
            Per site: the boolean activity of each unit (ReLU family) or `None`; per
            site: the saturated fraction (sigmoid/tanh) or `None`; the weight-change
            norms per layer; the weight norms per layer.
        """
        parts, deltas, weights = result
        active, saturated = [], []
        for site, part in zip(self.sites, parts):
            value = np.asarray(part)
            dead_prone = site.activation in DEAD_PRONE
            active.append(value.astype(bool) if dead_prone else None)
            saturated.append(None if dead_prone else float(value))
        return active, saturated, deltas, weights
