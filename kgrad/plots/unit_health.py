"""Dead and saturated fractions per layer."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from kgrad.diagnosis.saturation import SATURATED_FRACTION_THRESHOLD
from kgrad.plots._axes import figure_and_axes


def plot_unit_health(layers: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Bars of the dead fraction (ReLU family) and saturated fraction (sigmoid/tanh).

    Args:
        layers: A per-layer frame with `layer` and `dead_fraction` and/or
            `saturated_fraction` columns (`Report.layers`).
        ax: The axes to draw on. Defaults to `None`: a new figure.

    Returns:
        The matplotlib `Figure`; it says so in the axes when no unit statistic is
        known (for example for a subclassed model).

    Example:

    >>> fig = plot_unit_health(kgrad.diagnose(model, x).layers)  # doctest: +SKIP
    """
    figure, ax = figure_and_axes(ax, (7.0, 3.5))
    columns = [
        (column, label, color)
        for column, label, color in (
            ("dead_fraction", "dead (ReLU)", "tab:red"),
            ("saturated_fraction", "saturated (σ′ or tanh′ < 0.01)", "tab:orange"),
        )
        if column in layers and layers[column].notna().any()
    ]
    ax.set_title("Unit health per layer")
    if not columns:
        ax.text(
            0.5,
            0.5,
            "no unit statistics available",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_axis_off()
        return figure
    measured = layers[np.logical_or.reduce([layers[c].notna() for c, _, _ in columns])]
    positions = np.arange(len(measured))
    width = 0.8 / len(columns)
    for index, (column, label, color) in enumerate(columns):
        ax.bar(
            positions + (index - (len(columns) - 1) / 2) * width,
            measured[column].fillna(0.0),
            width,
            label=label,
            color=color,
        )
    if any(column == "saturated_fraction" for column, _, _ in columns):
        ax.axhline(
            SATURATED_FRACTION_THRESHOLD,
            color="tab:orange",
            linestyle=":",
            linewidth=1,
            label="saturation flagged above",
        )
    ax.set_xticks(
        positions,
        measured["layer"].astype(str),
        rotation=60,
        ha="right",
        fontsize="x-small",
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of units")
    ax.legend(fontsize="small")
    return figure
