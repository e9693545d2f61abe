"""Sigmoid and tanh with their derivatives, marked with the numbers from the guides."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from kgrad.diagnosis.saturation import (
    DERIVATIVE_THRESHOLD,
    SIGMOID_SATURATION_INPUT,
    TANH_SATURATION_INPUT,
)
from kgrad.plots._axes import new_figure


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def plot_activation_curves(axes: Sequence[Axes] | None = None) -> Figure:
    """Sigmoid, tanh and their derivatives, with the saturation thresholds.

    Left: σ and σ′, marking σ′(0) = 0.25 (the most a sigmoid layer passes back),
    σ(5) = 0.99331 on σ, σ′(5) = 0.0066481 on σ′ (what a layer pushed to x = 5 passes
    back) and the region |x| > 4.585 where σ′ < 0.01. Right: tanh and tanh′,
    marking tanh′(0) = 1 and |x| > 2.993 where tanh′ < 0.01.

    Args:
        axes: Two axes to draw on. Defaults to `None`: a new figure.

    Returns:
        The matplotlib `Figure`.

    Raises:
        ValueError: if `axes` does not hold exactly two axes.

    Example:

    >>> plot_activation_curves().savefig("activations.png")  # doctest: +SKIP
    """
    if axes is None:
        figure = new_figure((10.0, 3.8))
        axes = figure.subplots(1, 2)
    elif len(axes) != 2:
        raise ValueError(
            f"`axes` must hold two axes (sigmoid, tanh). Received {len(axes)} axes."
        )
    figure = axes[0].figure
    x = np.linspace(-8.0, 8.0, 801)
    sigmoid = _sigmoid(x)
    curves = (
        ("sigmoid", sigmoid, sigmoid * (1 - sigmoid), SIGMOID_SATURATION_INPUT, "σ"),
        ("tanh", np.tanh(x), 1 - np.tanh(x) ** 2, TANH_SATURATION_INPUT, "tanh"),
    )
    for ax, (name, value, derivative, threshold, symbol) in zip(axes, curves):
        ax.plot(x, value, label=f"{symbol}(x)", color="tab:blue")
        ax.plot(x, derivative, label=f"{symbol}′(x)", color="tab:red")
        for side in (-1, 1):
            ax.axvspan(
                side * threshold,
                side * 8.0,
                color="tab:orange",
                alpha=0.12,
                label=(
                    f"{symbol}′ < {DERIVATIVE_THRESHOLD} (|x| > {threshold})"
                    if side == 1
                    else None
                ),
            )
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xlim(-8, 8)
        ax.set_xlabel("x")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
    sigmoid_ax, tanh_ax = axes
    sigmoid_ax.plot([0], [0.25], "o", color="tab:red")
    sigmoid_ax.annotate("σ′(0) = 0.25", (0, 0.25), (1.0, 0.33), fontsize="small")
    sigmoid_ax.plot([5], [_sigmoid(5.0)], "o", color="tab:blue")
    sigmoid_ax.annotate(
        "σ(5) = 0.99331", (5, _sigmoid(5.0)), (1.6, 0.85), fontsize="small"
    )
    slope_at_5 = _sigmoid(5.0) * (1 - _sigmoid(5.0))
    sigmoid_ax.plot([5], [slope_at_5], "o", color="tab:red")
    sigmoid_ax.annotate(
        "σ′(5) = 0.0066481",
        (5, slope_at_5),
        (1.6, 0.12),
        fontsize="small",
        arrowprops={"arrowstyle": "-", "color": "tab:red", "linewidth": 0.8},
    )
    tanh_ax.plot([0], [1.0], "o", color="tab:red")
    tanh_ax.annotate("tanh′(0) = 1", (0, 1.0), (0.6, 1.05), fontsize="small")
    tanh_ax.set_ylim(-1.1, 1.25)
    for ax in axes:
        ax.legend(fontsize="x-small", loc="upper left")
    return figure
