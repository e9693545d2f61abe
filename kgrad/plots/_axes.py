"""New figures come from pyplot, so notebooks show them and scripts can `plt.show()`."""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.figure import Figure


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A new pyplot figure with constrained layout."""
    import matplotlib.pyplot as plt  # the backend is chosen on first use, not import

    return plt.figure(figsize=figsize, layout="constrained")


def figure_and_axes(
    ax: Axes | None, figsize: tuple[float, float]
) -> tuple[Figure, Axes]:
    """`ax` and its figure, or a new figure with one axes of size `figsize`."""
    if ax is not None:
        return ax.figure, ax
    figure = new_figure(figsize)
    return figure, figure.add_subplot()
