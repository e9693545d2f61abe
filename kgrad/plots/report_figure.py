"""The figure of a `Report`: the gradient profile and, when known, unit health."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from kgrad.diagnosis.profile import ProfileKind
from kgrad.plots._axes import new_figure
from kgrad.plots.profile import plot_gradient_profile
from kgrad.plots.unit_health import plot_unit_health


def plot_report(
    layers: pd.DataFrame, kind: ProfileKind = "auto", name: str = ""
) -> Figure:
    """The profile across depth, with the unit-health bars beside it when measured.

    Args:
        layers: A per-layer frame (`Report.layers`).
        kind: See `plot_gradient_profile`. Defaults to `"auto"`.
        name: The legend label of the profile. Defaults to `""`.

    Returns:
        The matplotlib `Figure`.
    """
    has_units = any(
        column in layers and layers[column].notna().any()
        for column in ("dead_fraction", "saturated_fraction")
    )
    figure = new_figure((12.0 if has_units else 7.0, 4.5))
    axes = figure.subplots(1, 2 if has_units else 1, squeeze=False)[0]
    plot_gradient_profile({name: layers}, ax=axes[0], kind=kind)
    if has_units:
        plot_unit_health(layers, ax=axes[1])
    return figure
