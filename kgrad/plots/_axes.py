"""Figures without pyplot: no global state, safe in scripts, threads and notebooks."""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.figure import Figure


def figure_and_axes(
    ax: Axes | None, figsize: tuple[float, float]
) -> tuple[Figure, Axes]:
    """`ax` and its figure, or a new figure with one axes of size `figsize`."""
    if ax is not None:
        return ax.figure, ax
    figure = Figure(figsize=figsize, layout="constrained")
    return figure, figure.add_subplot()
