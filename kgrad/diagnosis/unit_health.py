"""Unit health over time: dead units across probes in a row, saturation, update ratios.

`UnitHealth` folds the successive results of `UnitProbe` into the tables the detectors
read. It holds plain values only (no model), so a monitor keeping it survives
`copy.deepcopy` and can report after training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd

from kgrad.diagnosis.dead_units import consecutive_silence
from kgrad.diagnosis.stalled import update_ratios

UNIT_COLUMNS = [
    "site",
    "layer",
    "activation",
    "units",
    "dead_units",
    "saturated_fraction",
]


@dataclasses.dataclass(frozen=True)
class SiteInfo:
    """An activation site described by plain values."""

    site: str
    layer: str | None
    activation: str
    units: int


class UnitHealth:
    """Accumulates probe results: silent streaks per unit, saturation, update ratios.

    Args:
        sites: The activation sites probed, in the probe's order.
        layers: The layers whose weight movement is probed.
        dead_after_probes: Probes in a row a unit must be silent to count as dead.
        first_step: The step before which the first weight copy was taken.
            Defaults to `0`.

    Example:

    >>> health = UnitHealth([SiteInfo("dense", "dense", "relu", 2)], ["dense"], 2)
    >>> for step in (0, 10):
    ...     _ = health.add(step, [np.array([True, False])], [None], [0.1], [1.0])
    >>> health.table().dead_units.tolist()
    [1]
    """

    def __init__(
        self,
        sites: Sequence[SiteInfo],
        layers: Sequence[str],
        dead_after_probes: int,
        first_step: int = 0,
    ):
        self.sites = list(sites)
        self.layers = list(layers)
        self.dead_after_probes = dead_after_probes
        self.silent_counts: list[np.ndarray | None] = [None] * len(self.sites)
        self.saturated: list[float | None] = [None] * len(self.sites)
        self.update_ratios: dict[str, float] = {}
        self.weight_norms: dict[str, float] = {}  # ‖w‖ per layer at the last probe
        self.probes = 0
        # The weights were first copied before `first_step` ran.
        self.last_step = first_step - 1
        self._interval: dict[str, list[float]] = {}

    def add(
        self,
        step: int,
        active: Sequence[np.ndarray | None],
        saturated: Sequence[float | None],
        delta_norms: Sequence[float],
        weight_norms: Sequence[float],
    ) -> dict[str, float]:
        """Folds in one probe taken after `step`.

        Args:
            step: The step the probe followed.
            active: Per site, which units fired (ReLU family) or `None`.
            saturated: Per site, the saturated fraction (sigmoid/tanh) or `None`.
            delta_norms: ‖w − w_prev‖ per layer since the previous probe.
            weight_norms: ‖w‖ per layer.

        Returns:
            The update-to-weight ratio per layer and step of this probe.
        """
        for index, (units, fraction) in enumerate(zip(active, saturated)):
            if units is not None:
                self.silent_counts[index] = consecutive_silence(
                    self.silent_counts[index], ~np.asarray(units, dtype=bool)
                )
            if fraction is not None:
                self.saturated[index] = float(fraction)
        self.weight_norms = {
            layer: float(norm) for layer, norm in zip(self.layers, weight_norms)
        }
        ratios = update_ratios(
            dict(zip(self.layers, delta_norms)),
            self.weight_norms,
            max(1, step - self.last_step),
        )
        for layer, value in ratios.items():
            self._interval.setdefault(layer, []).append(value)
        self.last_step = step
        self.probes += 1
        return ratios

    def close_interval(self) -> bool:
        """Sets `update_ratios` to the median per layer over the probes since the
        last call. Returns whether any probe came in that interval."""
        if not self._interval:
            return False
        self.update_ratios = {
            layer: float(np.median(values)) for layer, values in self._interval.items()
        }
        self._interval = {}
        return True

    def dead_masks(self) -> list[np.ndarray | None]:
        """Per site, which units are dead now (`None` for sigmoid/tanh sites)."""
        return [
            None if counts is None else counts >= self.dead_after_probes
            for counts in self.silent_counts
        ]

    def table(self) -> pd.DataFrame:
        """One row per site: `site, layer, activation, units, dead_units,
        saturated_fraction` (NaN where not measured)."""
        rows = []
        for info, counts, saturated in zip(
            self.sites, self.silent_counts, self.saturated
        ):
            dead = (
                np.nan
                if counts is None
                else int(np.sum(counts >= self.dead_after_probes))
            )
            rows.append(
                [
                    info.site,
                    info.layer,
                    info.activation,
                    info.units,
                    dead,
                    np.nan if saturated is None else saturated,
                ]
            )
        return pd.DataFrame(rows, columns=UNIT_COLUMNS)

    def health_values(self) -> dict[str, float]:
        """The dead fraction over all ReLU units and the mean saturated fraction."""
        counts = [c for c in self.silent_counts if c is not None]
        saturated = [f for f in self.saturated if f is not None and not np.isnan(f)]
        return {
            "dead_fraction": (
                float(
                    sum(int(np.sum(c >= self.dead_after_probes)) for c in counts)
                    / sum(c.size for c in counts)
                )
                if counts
                else float("nan")
            ),
            "saturated_fraction": (
                float(np.mean(saturated)) if saturated else float("nan")
            ),
        }
