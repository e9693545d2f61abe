"""Exploding gradients: growth across depth, and spikes of the global norm over time.

Across depth, the δ profile (see `kgrad.diagnosis.profile`) is flagged when it grows
towards the input by more than 1.5x per layer (geometric mean) *and* by more than 100x
from the last layer to the first. Healthy batch-normalized ReLU nets grow √(π/(π−1)) ≈
1.21x per layer at initialization (Yang et al. 2019): 1.5 is well above that, and 1.21¹⁹
≈ 37 stays under the cumulative threshold. Nets in the chaotic phase (χ > 1, Schoenholz
et al. 2017), such as tanh with N(0, 1) weights (√χ ≈ 2.5 at width 128), cross both.

Over time, a logged step whose global gradient norm exceeds `factor` times the median of
the preceding `window` logged steps is a spike: the sudden jumps that precede a
divergence, which a profile across depth does not show.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kgrad.diagnosis.findings import Finding, layer_span
from kgrad.diagnosis.fixes import NetworkContext, fixes_for
from kgrad.diagnosis.profile import DepthTrend

GROWTH_PER_LAYER_THRESHOLD = 1.5
GROWTH_CUMULATIVE_THRESHOLD = 1e2
CRITICAL_GROWTH = 1e4
SPIKE_FACTOR = 10.0
SPIKE_WINDOW = 50
# A median over fewer steps than this is too noisy to call anything a spike.
SPIKE_MIN_HISTORY = 10


def detect_exploding(
    profile: Sequence[float] | np.ndarray,
    layers: Sequence[str],
    *,
    source: str = "",
    context: NetworkContext | None = None,
    per_layer_threshold: float = GROWTH_PER_LAYER_THRESHOLD,
    cumulative_threshold: float = GROWTH_CUMULATIVE_THRESHOLD,
    per_layer_ratio: float | None = None,
    first_to_last: float | None = None,
    step: int | None = None,
) -> Finding | None:
    """Flags a δ profile that grows towards the input.

    Args:
        profile: Norms of the backpropagated signal per layer, index 0 nearest the
            input.
        layers: The layer names of `profile`.
        source: Which measurement `profile` holds, quoted in the evidence. Defaults
            to `""`.
        context: The network's activations and weight scales, to choose the fixes.
            Defaults to `None`.
        per_layer_threshold: Flag when the per-layer ratio exceeds this. Defaults to
            `1.5`.
        cumulative_threshold: ... and the first-to-last ratio exceeds this. Defaults
            to `100`.
        per_layer_ratio: The per-layer ratio if already computed. Defaults to `None`.
        first_to_last: The first-to-last ratio if already computed. Defaults to
            `None`.
        step: The training step, if any. Defaults to `None`.

    Returns:
        A `Finding` of kind `"exploding"` (evidence `signal="depth_growth"`), or
        `None`.

    References:
        Schoenholz et al. 2017, "Deep Information Propagation"; Yang et al. 2019,
        "A Mean Field Theory of Batch Normalization".

    Example:

    >>> profile = 2.5 ** np.arange(19, -1, -1)
    >>> detect_exploding(profile, [f"dense_{i}" for i in range(20)]).kind
    'exploding'
    """
    trend = DepthTrend.of(profile, per_layer_ratio, first_to_last)
    if trend is None or not (
        trend.per_layer_ratio > per_layer_threshold
        and trend.first_to_last > cumulative_threshold
    ):
        return None
    concerned = trend.layers_where(layers, above=cumulative_threshold)
    evidence = trend.evidence(source, signal="depth_growth")
    if context is not None:
        scales = [context.weight_scale[n] for n in layers if n in context.weight_scale]
        if scales:
            evidence["max_weight_scale"] = float(max(scales))
    return Finding(
        kind="exploding",
        severity="critical" if trend.first_to_last > CRITICAL_GROWTH else "warning",
        layers=concerned,
        evidence=evidence,
        fixes=fixes_for("exploding", concerned, context, evidence),
        step=step,
        message=(
            f"the backpropagated signal grows {trend.per_layer_ratio:.3g}x per layer "
            f"towards the input; the first layer receives "
            f"{trend.first_to_last:.3g}x the last layer's ({layer_span(concerned)} "
            f"above {cumulative_threshold:g}x)"
        ),
    )


def spike_ratios(
    global_norms: Sequence[float] | np.ndarray,
    window: int = SPIKE_WINDOW,
    min_history: int = SPIKE_MIN_HISTORY,
) -> np.ndarray:
    """Each norm divided by the median of the finite norms of the `window` before it.

    Args:
        global_norms: Global gradient norms of consecutive logged steps.
        window: How many preceding steps the rolling median covers. Defaults to `50`.
        min_history: Steps with fewer finite predecessors get NaN. Defaults to `10`.

    Returns:
        An array of the same length; NaN where the ratio is undefined.

    Example:

    >>> spike_ratios([1.0] * 10 + [30.0], window=10)[-1].item()
    30.0
    """
    norms = np.asarray(global_norms, dtype=np.float64)
    out = np.full(norms.shape, np.nan)
    for index in range(norms.size):
        history = norms[max(0, index - window) : index]
        history = history[np.isfinite(history)]
        if history.size >= min_history:
            median = np.median(history)
            if median > 0:
                out[index] = norms[index] / median
    return out


def detect_spikes(
    global_norms: Sequence[float] | np.ndarray,
    steps: Sequence[int] | np.ndarray,
    *,
    factor: float = SPIKE_FACTOR,
    window: int = SPIKE_WINDOW,
    first_index: int = 0,
    context: NetworkContext | None = None,
) -> Finding | None:
    """Flags logged steps whose global norm jumps above `factor` x the rolling median.

    Args:
        global_norms: Global gradient norms of consecutive logged steps.
        steps: Their step indices.
        factor: A spike exceeds the rolling median by more than this. Defaults to
            `10.0`.
        window: The length of the rolling median, in logged steps. Defaults to `50`.
        first_index: Only steps from this index on are judged; the ones before serve
            as history (for incremental use). Defaults to `0`.
        context: The network, to choose the fixes. Defaults to `None`.

    Returns:
        A `Finding` of kind `"exploding"` (evidence `signal="norm_spike"`) about the
        first spike, with the count and the largest ratio; or `None`.

    References:
        Pascanu et al. 2013, "On the difficulty of training recurrent neural
        networks" (gradient norm spikes and clipping).
    """
    ratios = spike_ratios(global_norms, window)[first_index:]
    steps = np.asarray(steps)[first_index:]
    spikes = np.flatnonzero(ratios > factor)
    if spikes.size == 0:
        return None
    first = int(spikes[0])
    evidence = {
        "signal": "norm_spike",
        "first_step": int(steps[first]),
        "spikes": int(spikes.size),
        "max_ratio_to_median": float(np.max(ratios[spikes])),
        "factor": factor,
        "window": window,
    }
    return Finding(
        kind="exploding",
        severity="warning",
        layers=[],
        evidence=evidence,
        fixes=fixes_for("exploding", [], context, evidence),
        step=int(steps[first]),
        message=(
            f"the global gradient norm jumped {ratios[first]:.3g}x above its rolling "
            f"median at step {int(steps[first])} ({spikes.size} spike(s) above "
            f"{factor:g}x)"
        ),
    )
