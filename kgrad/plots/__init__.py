"""Plots of gradient health. They read DataFrames only and return matplotlib Figures.

New figures are pyplot figures (shown by notebooks, `plt.show()` in scripts); close
them with `plt.close(figure)` when drawing many in a loop.
"""

from kgrad.plots.activation_curves import plot_activation_curves
from kgrad.plots.heatmap import plot_gradient_heatmap
from kgrad.plots.profile import plot_gradient_profile
from kgrad.plots.report_figure import plot_report
from kgrad.plots.unit_health import plot_unit_health

__all__ = [
    "plot_activation_curves",
    "plot_gradient_heatmap",
    "plot_gradient_profile",
    "plot_report",
    "plot_unit_health",
]
