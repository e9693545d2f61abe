"""Vanishing gradients: the backpropagated signal shrinks layer after layer.

The verdict rests on two numbers of the δ profile (see `kgrad.diagnosis.profile`), never
on one pair of layers:

- the geometric-mean ratio per layer, which estimates the mean-field gain √χ of the
  backward pass (Schoenholz et al. 2017): about 0.236 for sigmoid with Glorot init,
  1/√2 ≈ 0.707 for ReLU with Glorot init, ≈ 1 for ReLU with He init, a little under 1
  for tanh with Glorot init at moderate depth;
- the cumulative first-to-last ratio: how much of the signal at the last layer reaches
  the first one.

Both must cross their threshold. The per-layer threshold, 0.8 (χ = 0.64), sits between
the ordered-phase nets above (sigmoid 0.236, ReLU + Glorot 0.707) and healthy ones
(tanh + Glorot ≈ 0.93 at depth 20, ReLU + He 1.0): the decay is systematic, not a
fluctuation. The cumulative threshold, 1e-2, means the first layer learns at least a
hundred times more slowly than the last (0.8²⁰ ≈ 0.012), so a short net with mild decay
is not flagged. A single layer shrinking the signal 10x is neither necessary (sigmoid
nets vanish at 4.2x per layer) nor sufficient.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kgrad.diagnosis.findings import Finding, layer_span
from kgrad.diagnosis.fixes import NetworkContext, fixes_for
from kgrad.diagnosis.profile import DepthTrend

PER_LAYER_THRESHOLD = 0.8
CUMULATIVE_THRESHOLD = 1e-2
# Below this the first layer gets under 1/10,000 of the last layer's signal: critical.
CRITICAL_CUMULATIVE = 1e-4


def detect_vanishing(
    profile: Sequence[float] | np.ndarray,
    layers: Sequence[str],
    *,
    source: str = "",
    context: NetworkContext | None = None,
    per_layer_threshold: float = PER_LAYER_THRESHOLD,
    cumulative_threshold: float = CUMULATIVE_THRESHOLD,
    per_layer_ratio: float | None = None,
    first_to_last: float | None = None,
    step: int | None = None,
) -> Finding | None:
    """Flags a δ profile that decays across depth.

    Args:
        profile: Norms of the backpropagated signal per layer, index 0 nearest the
            input (a single step, or a median over steps).
        layers: The layer names of `profile`.
        source: Which measurement `profile` holds (`"activation"`, `"bias"`, ...),
            quoted in the evidence. Defaults to `""`.
        context: The network's activations and initializers, to choose the fixes.
            Defaults to `None`.
        per_layer_threshold: Flag when the per-layer ratio is below this. Defaults
            to `0.8`.
        cumulative_threshold: ... and the first-to-last ratio is below this.
            Defaults to `1e-2`.
        per_layer_ratio: The per-layer ratio if already computed (for example the
            median over steps). Defaults to `None`: computed from `profile`.
        first_to_last: The first-to-last ratio if already computed. Defaults to
            `None`: computed from `profile`.
        step: The training step, if any. Defaults to `None`.

    Returns:
        A `Finding` of kind `"vanishing"`, or `None` when the profile is healthy or
        has fewer than three layers.

    References:
        Glorot & Bengio 2010; He et al. 2015; Schoenholz et al. 2017, "Deep
        Information Propagation".

    Example:

    >>> profile = 0.236 ** np.arange(19, -1, -1)
    >>> detect_vanishing(profile, [f"dense_{i}" for i in range(20)]).severity
    'critical'
    """
    trend = DepthTrend.of(profile, per_layer_ratio, first_to_last)
    if trend is None or not (
        trend.per_layer_ratio < per_layer_threshold
        and trend.first_to_last < cumulative_threshold
    ):
        return None
    concerned = trend.layers_where(layers, below=cumulative_threshold)
    evidence = trend.evidence(
        source,
        signal="depth_decay",
        per_layer_threshold=per_layer_threshold,
        cumulative_threshold=cumulative_threshold,
    )
    return Finding(
        kind="vanishing",
        severity="critical" if trend.first_to_last < CRITICAL_CUMULATIVE else "warning",
        layers=concerned,
        evidence=evidence,
        fixes=fixes_for("vanishing", concerned, context, evidence),
        step=step,
        message=(
            f"the backpropagated signal shrinks {trend.per_layer_ratio:.3g}x per "
            f"layer; the first layer receives {trend.first_to_last:.2g} of the last's "
            f"({layer_span(concerned)} get less than {cumulative_threshold:g} of it)"
        ),
    )
