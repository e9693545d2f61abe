"""Findings and a report from recorded gradient norms (a logger, a monitor, a CSV).

Records hold norms per variable and step, with no activations: the gradient detectors
(vanishing, exploding, non-finite, spikes, stalled) run on them; unit statistics come
from elsewhere (the monitor's probes) when available.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Mapping

import numpy as np
import pandas as pd

from kgrad import stats
from kgrad.diagnosis.dead_units import detect_dead_units
from kgrad.diagnosis.exploding import (
    SPIKE_FACTOR,
    SPIKE_WINDOW,
    detect_exploding,
    detect_spikes,
)
from kgrad.diagnosis.findings import Finding
from kgrad.diagnosis.fixes import NetworkContext
from kgrad.diagnosis.non_finite import detect_non_finite
from kgrad.diagnosis.profile import median_profile_ratios, records_profile
from kgrad.diagnosis.report import Report, merge_unit_columns
from kgrad.diagnosis.saturation import detect_saturation
from kgrad.diagnosis.stalled import stalled_beyond_trend
from kgrad.diagnosis.vanishing import detect_vanishing
from kgrad.records.gradient_records import GradientRecords


@contextlib.contextmanager
def _all_nan_is_fine() -> Iterator[None]:
    # Medians over columns that are NaN at every step (no such variable) are NaN.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def layer_table(records: GradientRecords, rows: slice = slice(None)) -> pd.DataFrame:
    """Median per-layer norms over logged steps: the `Report.layers` of records.

    Args:
        records: Gradient norms from `GradientNormLogger`.
        rows: The logged steps to summarise. Defaults to all.

    Returns:
        One row per layer: `layer`, `depth`, `grad_norm`, `kernel_grad_norm`,
        `bias_grad_norm`, `weight_norm`, `grad_to_weight` (medians over steps).
    """
    depth = {info.layer: info.depth for info in records.variables}
    table: dict = {"layer": records.layers, "depth": [depth[n] for n in records.layers]}
    weights = records.weight_norms[rows].astype(np.float64)
    with _all_nan_is_fine():
        for kind, column in (
            ("total", "grad_norm"),
            ("kernel", "kernel_grad_norm"),
            ("bias", "bias_grad_norm"),
        ):
            norms = records.layer_norms(kind)[1][rows]
            table[column] = np.nanmedian(norms, axis=0) if len(norms) else np.nan
        table["weight_norm"] = [
            (
                np.nanmedian(
                    stats.combine_norms(
                        weights[
                            :,
                            [
                                i
                                for i, v in enumerate(records.variables)
                                if v.layer == name
                            ],
                        ],
                        axis=1,
                    )
                )
                if len(weights)
                else np.nan
            )
            for name in records.layers
        ]
        frame = pd.DataFrame(table)
        frame["grad_to_weight"] = frame["grad_norm"] / frame["weight_norm"]
    return frame


def _non_finite_layer_norms(records: GradientRecords) -> np.ndarray:
    """Per-layer norms in which variables that never get a gradient count as finite.

    The logger records NaN for a variable without a gradient. The global norm covers
    only variables with one, so a column that is NaN at a step whose global norm is
    finite belongs to such a variable.
    """
    _, norms = records.layer_norms("total")
    finite_steps = np.isfinite(records.global_norms)
    gradient_less = np.isnan(norms[finite_steps]).any(axis=0)
    return np.where(gradient_less, 0.0, norms)


def _rows_from(records: GradientRecords, first: int) -> GradientRecords:
    """The logged steps from row `first` on, as records of their own."""
    rows = slice(first, None)
    clipped = records.clipped_grad_norms
    clipped_global = records.clipped_global_norms
    tail = GradientRecords(records.variables, run=records.run)
    tail.append(
        step=records.steps[rows],
        epoch=records.epochs[rows],
        grad_norm=records.grad_norms[rows],
        weight_norm=records.weight_norms[rows],
        global_norm=records.global_norms[rows],
        clipped_grad_norm=None if clipped is None else clipped[rows],
        clipped_global_norm=None if clipped_global is None else clipped_global[rows],
    )
    return tail


def _may_spike(global_norms: np.ndarray, start: int, factor: float) -> bool:
    """Whether any norm from row `start` on could be a spike: above `factor` x the
    smallest finite norm of all the rows (the rolling medians are no smaller).

    A cheap test that spares the rolling medians of `detect_spikes` in a healthy run.
    """
    norms = np.asarray(global_norms, dtype=np.float64)
    finite = norms[np.isfinite(norms)]
    if finite.size == 0 or norms.size <= start:
        return False
    return bool(np.any(norms[start:] > factor * finite.min()))


@dataclasses.dataclass
class GradientSummary:
    """The backpropagated-signal profile of some logged steps."""

    layers: list[str]
    profile: np.ndarray  # median over steps, per layer
    kind: str
    decay: float
    first_to_last: float


def gradient_findings(
    records: GradientRecords,
    context: NetworkContext | None = None,
    *,
    start: int = 0,
    spike_factor: float = SPIKE_FACTOR,
    spike_window: int = SPIKE_WINDOW,
) -> tuple[list[Finding], GradientSummary]:
    """Runs the gradient detectors on the logged steps from index `start` on.

    Vanishing and growth are judged on the median profile of those steps (finite
    rows only); non-finite gradients at the first step that has them; spikes against
    a rolling median that also looks at the steps before `start`.

    Args:
        records: Gradient norms from `GradientNormLogger`.
        context: The network, to choose the fixes. Defaults to `None`.
        start: The first logged step (row index) to judge. Defaults to `0`.
        spike_factor: See `detect_spikes`. Defaults to `10.0`.
        spike_window: See `detect_spikes`. Defaults to `50`.

    Returns:
        The findings and the profile summary of the judged steps.
    """
    first = max(0, start - spike_window)  # the spikes' history is all that is needed
    if first:
        records, start = _rows_from(records, first), start - first
    steps = records.steps
    findings: list[Finding] = []
    layers, profiles, kind = records_profile(records)
    profiles = profiles[start:]
    finite_rows = np.isfinite(profiles).all(axis=1)
    decay, first_to_last = median_profile_ratios(profiles[finite_rows])
    with _all_nan_is_fine():
        median = (
            np.nanmedian(profiles[finite_rows], axis=0)
            if finite_rows.any()
            else np.full(len(layers), np.nan)
        )
    last_step = int(steps[-1]) if len(steps) else None
    for detect in (detect_vanishing, detect_exploding):
        finding = detect(
            median,
            layers,
            source=kind,
            context=context,
            per_layer_ratio=decay,
            first_to_last=first_to_last,
            step=last_step,
        )
        if finding is not None:
            findings.append(finding)
    non_finite = detect_non_finite(
        _non_finite_layer_norms(records)[start:],
        records.layers,
        steps[start:],
        context=context,
    )
    if non_finite is not None:
        findings.append(non_finite)
    spike = (
        detect_spikes(
            records.global_norms,
            steps,
            factor=spike_factor,
            window=spike_window,
            first_index=start,
            context=context,
        )
        if _may_spike(records.global_norms, start, spike_factor)
        else None
    )
    if spike is not None:
        findings.append(spike)
    return findings, GradientSummary(layers, median, kind, decay, first_to_last)


def unit_findings(
    units: pd.DataFrame,
    context: NetworkContext | None = None,
    *,
    step: int | None = None,
    criterion: str = "probe set",
) -> list[Finding]:
    """Dead-unit and saturation findings from a table of activation sites.

    Args:
        units: One row per site with `dead_units` and/or `saturated_fraction` (NaN
            where not measured); see `detect_dead_units` and `detect_saturation`.
        context: The network, to choose the fixes. Defaults to `None`.
        step: The training step, if any. Defaults to `None`.
        criterion: How dead units were established. Defaults to `"probe set"`.

    Returns:
        The findings (zero, one or two).
    """
    # Boolean masks rather than `dropna`: this runs at every epoch end of a monitor.
    dead = units[units["dead_units"].notna()]
    saturated = units[units["saturated_fraction"].notna()]
    findings = [
        (
            detect_dead_units(dead, context=context, step=step, criterion=criterion)
            if len(dead)
            else None
        ),
        (
            detect_saturation(saturated, context=context, step=step)
            if len(saturated)
            else None
        ),
    ]
    return [finding for finding in findings if finding is not None]


def diagnose_records(
    records: GradientRecords | pd.DataFrame,
    context: NetworkContext | None = None,
    *,
    units: pd.DataFrame | None = None,
    update_ratios: Mapping[str, float] | None = None,
    weight_norms: Mapping[str, float] | None = None,
    dead_criterion: str = "probe set",
    notes: list[str] | None = None,
) -> Report:
    """A `Report` from recorded gradient norms, with no model and no training.

    Args:
        records: `GradientRecords`, or a DataFrame from `GradientNormLogger`
            (`to_dataframe()` or its CSV).
        context: The network, to choose the fixes. Defaults to `None`.
        units: Unit statistics per activation site (dead units over several probes,
            saturated fractions), as the monitor measures them. Defaults to `None`.
        update_ratios: ‖Δw‖/‖w‖ per layer and step, for stalled layers; defaults to
            `None`, using the gradient-to-weight ratio instead.
        weight_norms: ‖w‖ per layer, for the layers whose records hold no weight
            norms (the monitor's logger leaves them to its probes). Defaults to
            `None`.
        dead_criterion: How dead units in `units` were established, for the
            message. Defaults to `"probe set"`.
        notes: Notes to carry into the report. Defaults to `None`.

    Returns:
        The `Report`.

    Example:

    >>> report = diagnose_records(pd.read_csv("grads.csv"))  # doctest: +SKIP
    """
    if isinstance(records, pd.DataFrame):
        records = GradientRecords.from_dataframe(records)
    findings, summary = gradient_findings(records, context)
    table = layer_table(records)
    if weight_norms:
        missing = table["weight_norm"].isna()
        table.loc[missing, "weight_norm"] = table.loc[missing, "layer"].map(weight_norms)
        table["grad_to_weight"] = table["grad_norm"] / table["weight_norm"]
    measure = "update-to-weight" if update_ratios is not None else "gradient-to-weight"
    ratios = (
        update_ratios
        if update_ratios is not None
        else dict(zip(table["layer"], table["grad_to_weight"]))
    )
    stalled = stalled_beyond_trend(ratios, findings, measure=measure, context=context)
    if stalled is not None:
        findings.append(stalled)
    if context is not None:
        table["activation"] = table["layer"].map(context.activations).fillna("")
    if units is not None and len(units):
        table = merge_unit_columns(table, units)
        findings += unit_findings(units, context, criterion=dead_criterion)
    position = {name: i for i, name in enumerate(summary.layers)}
    profile = pd.DataFrame(
        {
            "layer": summary.layers,
            "depth": [
                int(table.set_index("layer").loc[n, "depth"]) for n in summary.layers
            ],
            "position": [position[n] for n in summary.layers],
            "norm": summary.profile,
        }
    )
    return Report(
        findings,
        table,
        decay=summary.decay,
        first_to_last=summary.first_to_last,
        profile_kind=summary.kind,
        profile=profile,
        units=units,
        notes=notes,
        description=(
            f"From {len(records)} logged steps of run(s) {records.run or '-'} "
            "(medians over steps)."
        ),
    )
