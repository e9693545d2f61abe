"""The per-layer gradient profile across depth, several models overlaid."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kgrad import stats
from kgrad.diagnosis.profile import (
    PROFILE_KINDS,
    ProfileKind,
    check_profile_kind,
    frame_profile,
    records_profile,
)
from kgrad.plots._axes import figure_and_axes
from kgrad.records.gradient_records import GradientRecords


# The axis label of each measurement: what exactly is drawn.
MEASURE_LABELS = {
    "activation": "‖∂L/∂(layer output)‖: activation-gradient norm",
    "bias": "‖∂L/∂b‖: bias-gradient norm",
    "kernel": "‖∂L/∂W‖: kernel-gradient norm",
    "total": "gradient norm of all the layer's variables",
}


def format_factor(ratio: float) -> str:
    """The per-layer factor as every plot and table prints it: `0.241`, `1.02`."""
    return f"{ratio:.3g}"


def common_kind(
    frames: Mapping[str, pd.DataFrame], kind: ProfileKind = "auto"
) -> str:
    """The one measurement that every frame's profile can be drawn with.

    `"auto"` picks, for each frame, the measurement that follows δ best (see
    `kgrad.diagnosis.profile`); when the frames would get different ones, the first
    of `"activation"`, `"bias"`, `"kernel"`, `"total"` that every frame has for every
    profiled layer is used, so that their heights compare.

    Args:
        frames: Per-layer frames (`Report.layers`) or logger frames, by name.
        kind: An explicit kind is returned as it is. Defaults to `"auto"`.

    Returns:
        The measurement.
    """
    check_profile_kind(kind)
    if kind != "auto":
        return kind
    chosen = {profile_of(frame, "auto")[1] for frame in frames.values()}
    if len(chosen) == 1:
        return chosen.pop()
    for candidate in PROFILE_KINDS[1:]:
        profiles = [profile_of(frame, candidate) for frame in frames.values()]
        if all(
            used == candidate and bool(np.isfinite(profile["norm"]).all())
            and bool((profile["norm"] > 0).all())
            for profile, used in profiles
        ):
            return candidate
    return "total"


def note_nothing_to_show(ax: Axes, message: str) -> None:
    """Writes `message` in the middle of an axes that has nothing to draw."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)


def profile_of(
    frame: pd.DataFrame, kind: ProfileKind = "auto"
) -> tuple[pd.DataFrame, str]:
    """The δ profile (`layer`, `depth`, `position`, `norm`) of a DataFrame.

    Args:
        frame: A per-layer frame (`Report.layers`), or a tidy frame of a
            `GradientNormLogger` (one run; the median over its steps is taken).
        kind: See `plot_gradient_profile`. Defaults to `"auto"`.

    Returns:
        The profile and the measurement used.
    """
    if "variable" not in frame:
        return frame_profile(frame, kind)
    records = GradientRecords.from_dataframe(frame)
    layers, norms, used = records_profile(records, kind)
    depth = {info.layer: info.depth for info in records.variables}
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a layer that is NaN throughout
        median = (
            np.nanmedian(norms, axis=0) if len(norms) else np.full(len(layers), np.nan)
        )
    return (
        pd.DataFrame(
            {
                "layer": layers,
                "depth": [depth[name] for name in layers],
                "position": np.arange(len(layers)),
                "norm": median,
            }
        ),
        used,
    )


def split_runs(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """A logger frame split into one frame per run (file order); others unchanged."""
    if "run" not in frame or "variable" not in frame:
        return {"": frame}
    runs = list(dict.fromkeys(frame["run"].astype(str)))
    return {run: frame[frame["run"].astype(str) == run] for run in runs}


def plot_gradient_profile(
    profiles: Mapping[str, pd.DataFrame] | pd.DataFrame,
    ax: Axes | None = None,
    kind: ProfileKind = "auto",
) -> Figure:
    """Gradient norm of each layer across depth, on a log axis, one line per model.

    The picture that tells architectures apart at a glance: a sigmoid MLP falls by
    orders of magnitude from the output to the input, a He-initialized ReLU net stays
    flat, a batch-normalized one rises gently towards the input. Every line is drawn
    with one measurement (`common_kind`), named on the y axis, so their heights
    compare; the legend gives each line's per-layer factor, the geometric-mean ratio
    `stats.per_layer_ratio` of its norms (for `Report.layers` drawn with activation
    gradients, exactly `Report.decay`). An axes with nothing finite to draw says so.

    Args:
        profiles: A DataFrame, or several by name (one line each). Each is a
            per-layer frame (`Report.layers`) or a `GradientNormLogger` frame (the
            median over its steps; a frame with several runs gives one line per run).
        ax: The axes to draw on. Defaults to `None`: a new figure.
        kind: The measurement: `"auto"` (activation gradients where known, else bias
            gradients, else kernel gradients with normalization, else total; see
            `kgrad.diagnosis.profile`; one for all lines, see `common_kind`),
            `"activation"`, `"bias"`, `"kernel"` or `"total"`. Defaults to `"auto"`.

    Returns:
        The matplotlib `Figure`.

    Raises:
        ValueError: for an unknown `kind` or no profile to draw.

    Example:

    >>> frames = {"sigmoid": sigmoid.layers, "relu": relu.layers}  # doctest: +SKIP
    >>> fig = plot_gradient_profile(frames)  # doctest: +SKIP
    >>> fig.savefig("profile.png")  # doctest: +SKIP
    """
    check_profile_kind(kind)
    if isinstance(profiles, pd.DataFrame):
        profiles = split_runs(profiles)
    if not profiles:
        raise ValueError("`profiles` is empty: give at least one DataFrame to draw.")
    figure, ax = figure_and_axes(ax, (7.0, 4.5))
    kind = common_kind(profiles, kind)
    kinds, drawn = set(), 0
    for name, frame in profiles.items():
        profile, used = profile_of(frame, kind)
        kinds.add(used)
        norms = profile["norm"].to_numpy()
        drawn += int(np.sum(np.isfinite(norms) & (norms > 0)))
        ratio = stats.per_layer_ratio(norms)
        label = f"{name} " if name else ""
        label += f"({format_factor(ratio)}x per layer)" if np.isfinite(ratio) else ""
        ax.plot(
            profile["position"],
            profile["norm"],
            marker="o",
            markersize=3,
            label=label.strip() or None,
        )
    if drawn:
        ax.set_yscale("log")
    else:
        note_nothing_to_show(ax, "no finite, positive gradient norm to draw")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (0 = nearest the input)")
    ax.set_ylabel(" / ".join(MEASURE_LABELS[used] for used in sorted(kinds)))
    ax.set_title("Backpropagated gradient across depth")
    ax.grid(True, which="major", alpha=0.3)
    if any(
        line.get_label() and not line.get_label().startswith("_") for line in ax.lines
    ):
        ax.legend(fontsize="small")
    return figure
