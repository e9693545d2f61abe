"""Gradient-flow heatmap: norm per layer (rows) and logged step (columns)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from kgrad.diagnosis.profile import ProfileKind, check_profile_kind, records_profile
from kgrad.plots._axes import figure_and_axes
from kgrad.plots.profile import MEASURE_LABELS, note_nothing_to_show, split_runs
from kgrad.records.gradient_records import GradientRecords

_MAX_LABELLED_LAYERS = 30


def plot_gradient_heatmap(
    frame: pd.DataFrame,
    ax: Axes | None = None,
    kind: ProfileKind = "auto",
    run: str | None = None,
    color_range: tuple[float, float] | None = None,
) -> Figure:
    """Gradient norms as an image, layers (input at the bottom) by logged steps.

    Vanishing shows as a dark band at the bottom, an explosion as a bright one, a
    divergence as the steps where the image turns white (NaN).

    Args:
        frame: A tidy `GradientNormLogger` frame (`to_dataframe()` or its CSV).
        ax: The axes to draw on. Defaults to `None`: a new figure.
        kind: The measurement per layer, see `plot_gradient_profile`. Defaults to
            `"auto"`.
        run: The run to draw when the frame holds several. Defaults to `None`: the
            last run.
        color_range: The norms at the ends of the (logarithmic) colour scale, to
            give several heatmaps one scale. Defaults to `None`: this frame's
            smallest and largest finite norm.

    Returns:
        The matplotlib `Figure`.

    Raises:
        ValueError: if the frame is not a logger frame, is empty, has no run
            named `run`, or `color_range` is not two positive increasing numbers.

    Example:

    >>> fig = plot_gradient_heatmap(logger.to_dataframe())  # doctest: +SKIP
    """
    check_profile_kind(kind)
    if color_range is not None and not (
        len(color_range) == 2 and 0 < color_range[0] < color_range[1]
    ):
        raise ValueError(
            "`color_range` must be two norms 0 < low < high. Received: "
            f"color_range={color_range!r}"
        )
    if "variable" not in frame or "step" not in frame:
        raise ValueError(
            "`frame` must be a GradientNormLogger frame (`to_dataframe()` or its "
            "CSV), with `step` and `variable` columns. Received columns: "
            f"{list(frame.columns)}"
        )
    runs = split_runs(frame)
    if run is None:
        run = list(runs)[-1]
    if run not in runs:
        raise ValueError(f"No run {run!r} in `frame`. Runs: {list(runs)}")
    if len(runs[run]) == 0:
        raise ValueError("`frame` is empty: there is nothing to draw.")
    records = GradientRecords.from_dataframe(runs[run])
    layers, norms, used = records_profile(records, kind)
    figure, ax = figure_and_axes(ax, (8.0, 0.6 + 0.22 * max(len(layers), 8)))
    values = np.where(np.isfinite(norms) & (norms > 0), norms, np.nan).T
    finite = values[np.isfinite(values)]
    if color_range is not None:
        norm = LogNorm(*color_range)
    else:
        norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size else None
    steps = records.steps
    extent = (float(steps[0]) - 0.5, float(steps[-1]) + 0.5, -0.5, len(layers) - 0.5)
    image = ax.imshow(
        values,
        aspect="auto",
        origin="lower",
        norm=norm,
        cmap="magma",
        interpolation="nearest",
        extent=extent,
    )
    if len(layers) <= _MAX_LABELLED_LAYERS:
        ax.set_yticks(range(len(layers)), layers, fontsize="small")
    ax.set_xlabel("step")
    ax.set_ylabel("layer (input at the bottom)")
    title = f"Gradient flow ({used} gradient norm)"
    ax.set_title(title + (f", run {run}" if len(runs) > 1 else ""))
    if not finite.size:
        note_nothing_to_show(ax, "no finite, positive gradient norm to draw")
    figure.colorbar(image, ax=ax, label=MEASURE_LABELS[used])
    return figure
