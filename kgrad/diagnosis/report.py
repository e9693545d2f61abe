"""`Report`: the findings of a diagnosis, the per-layer table behind them, a summary."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from kgrad.diagnosis.findings import SEVERITIES, Finding

# Columns of the per-layer table shown by `str(report)`, with their headers.
_SHOWN = {
    "depth": "depth",
    "layer": "layer",
    "activation": "act",
    "grad_norm": "grad",
    "bias_grad_norm": "bias grad",
    "activation_grad_norm": "output grad",
    "weight_scale": "σ_w²",
    "dead_fraction": "dead",
    "saturated_fraction": "saturated",
}
_MAX_ROWS = 24


def merge_unit_columns(layers: pd.DataFrame, units: pd.DataFrame) -> pd.DataFrame:
    """Adds `units`, `dead_units`, `dead_fraction`, `saturated_fraction` to `layers`.

    Args:
        layers: One row per layer (`layer` column).
        units: One row per activation site (`layer` names the kernel layer it
            activates; sites without one are left out).

    Returns:
        `layers` with the unit columns (NaN for layers without a site).
    """
    layers = layers.copy()
    owned = units.dropna(subset=["layer"]).drop_duplicates("layer").set_index("layer")
    for column in ("units", "dead_units", "saturated_fraction"):
        if len(owned) and column in owned:
            layers[column] = layers["layer"].map(owned[column]).astype(float)
        else:
            layers[column] = float("nan")
    layers["dead_fraction"] = layers["dead_units"] / layers["units"]
    return layers


class Report:
    """The result of `kgrad.diagnose` (or of a monitor or a saved log).

    Attributes:
        findings: The problems found, most severe first.
        layers: One row per layer with trainable weights, in depth order: `layer`,
            `depth`, `grad_norm`, `kernel_grad_norm`, `bias_grad_norm`,
            `activation_grad_norm`, `weight_norm`, `weight_scale`, `grad_to_weight`,
            `activation`, `units`, `dead_units`, `dead_fraction`,
            `saturated_fraction` (NaN where a statistic does not apply or is
            unavailable).
        units: One row per activation site (ReLU-family, sigmoid, tanh): `site`,
            `layer`, `activation`, `units`, `dead_units`, `null_silent_fraction`,
            `null_units` (the null-model units it was estimated from),
            `dead_bias_mean`, `saturated_fraction`.
        decay: The geometric-mean ratio per layer of the backpropagated signal
            (below 1: it shrinks towards the input).
        first_to_last: The first layer's signal over the last layer's.
        profile_kind: Which measurement the profile uses (`"activation"`,
            `"bias"`, `"kernel"` or `"total"`).
        profile: The profile itself: `layer`, `depth`, `position`, `norm`.
        notes: Statistics that were unavailable, and why.
        description: How the numbers were obtained (one line).
    """

    def __init__(
        self,
        findings: list[Finding],
        layers: pd.DataFrame,
        *,
        decay: float,
        first_to_last: float,
        profile_kind: str,
        profile: pd.DataFrame,
        units: pd.DataFrame | None = None,
        notes: list[str] | None = None,
        description: str = "",
    ):
        rank = {severity: i for i, severity in enumerate(SEVERITIES)}
        self.findings = sorted(findings, key=lambda f: -rank[f.severity])
        self.layers = layers
        self.units = units if units is not None else pd.DataFrame()
        self.decay = decay
        self.first_to_last = first_to_last
        self.profile_kind = profile_kind
        self.profile = profile
        self.notes = list(notes or [])
        self.description = description

    def by_kind(self, kind: str) -> list[Finding]:
        """The findings of one kind (`"vanishing"`, `"dead_units"`, ...)."""
        return [finding for finding in self.findings if finding.kind == kind]

    @property
    def kinds(self) -> set[str]:
        """The kinds of problem found."""
        return {finding.kind for finding in self.findings}

    def plot(self, kind: str = "auto"):
        """The gradient profile across depth and, when known, the unit health.

        Args:
            kind: The profile measurement, see `kgrad.plots.plot_gradient_profile`.
                Defaults to `"auto"`.

        Returns:
            A matplotlib `Figure`.
        """
        from kgrad.plots.report_figure import plot_report

        return plot_report(self.layers, kind=kind)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain Python values (findings, layers as records, ratios)."""
        return {
            "findings": [finding.to_dict() for finding in self.findings],
            "layers": self.layers.to_dict(orient="records"),
            "decay": self.decay,
            "first_to_last": self.first_to_last,
            "profile_kind": self.profile_kind,
            "notes": list(self.notes),
        }

    def __repr__(self) -> str:
        return (
            f"<Report: {len(self.layers)} layers, decay {self.decay:.3g}/layer, "
            f"findings {sorted(self.kinds) or 'none'}>"
        )

    def __str__(self) -> str:
        lines = ["kgrad gradient-health report"]
        if self.description:
            lines.append(self.description)
        ratio = "n/a" if math.isnan(self.decay) else f"{self.decay:.3g}x per layer"
        lines.append(
            f"Backpropagated signal ({self.profile_kind} gradients, "
            f"{len(self.profile)} layers): {ratio}, first/last {self.first_to_last:.3g}"
        )
        lines.append("")
        if self.findings:
            lines.append(f"Findings ({len(self.findings)}):")
            for finding in self.findings:
                lines.append(f"  {finding.summary()}")
                for fix in finding.fixes:
                    lines.append(f"      fix: {fix}")
        else:
            lines.append("Findings: none. Gradients flow and units are alive.")
        lines.append("")
        shown = [column for column in _SHOWN if column in self.layers]
        table = self.layers[shown].rename(columns=_SHOWN)
        if len(table) > _MAX_ROWS:
            half = _MAX_ROWS // 2
            table = pd.concat([table.head(half), table.tail(half)])
        lines.append(
            table.to_string(
                index=False, float_format=lambda value: f"{value:.3g}", na_rep="-"
            )
        )
        if len(self.layers) > _MAX_ROWS:
            lines.append(f"({len(self.layers) - _MAX_ROWS} middle layers not shown)")
        for note in self.notes:
            lines.append(f"Note: {note}")
        return "\n".join(lines)
