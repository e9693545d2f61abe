"""Stalled layers: weights that barely move while the rest of the net trains.

The measure is the update-to-weight ratio ‖Δw‖/‖w‖ per layer and per step, the
quantity practitioners watch to see whether a layer learns (a healthy net keeps it
within an order of magnitude or so across layers). During training
(`GradientHealthMonitor`) Δw is the actual change of the weights between two probes.
Without training (`diagnose`) the gradient-to-weight ratio ‖g‖/‖w‖ stands in for it:
plain SGD's update is the learning rate times the gradient, and the learning rate
cancels when layers are compared.

A layer is stalled when its ratio is more than `factor` (default 100) times below the
median over layers. Layers whose slowness a vanishing finding already explains are left
to that finding.

The query and key projections of an attention layer are not compared with the other
layers. While the attention is near uniform (at initialization) their gradients are of
higher order in the scale ε of the attention's inputs: the logits s = q·kᵀ/√d are O(ε²),
∂L/∂s_ij = p_ij (g_i·v_j − Σ_k p_ik g_i·v_k) is O(ε), so the value kernel's gradient
Σ xᵀ p g is O(ε) while the query kernel's xᵀ (∂L/∂s) k/√d (and the key kernel's) is
O(ε³), about ε² of the others: an embedding's ±0.05 uniform initialization gives
ε ≈ 0.03 (measured on a fresh 16-dimensional, 2-head block: query 5e-3 and key 2e-4 of
the median ratio). That smallness does not keep them from learning: as q and k grow
the attention sharpens and their gradients with it. They are judged against their own
movement instead: stalled only when their ratio is exactly zero (no gradient reaches
them, or their weights did not move at all between two probes).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

from kgrad.diagnosis.findings import Finding, layer_span
from kgrad.diagnosis.fixes import NetworkContext, fixes_for

STALLED_FACTOR = 1e-2
# The median of fewer layers says nothing about "the rest of the net".
MIN_LAYERS = 3


def update_ratios(
    delta_norms: Mapping[str, float], weight_norms: Mapping[str, float], steps: int = 1
) -> dict[str, float]:
    """The update-to-weight ratio ‖Δw‖/‖w‖ per layer and per step.

    Args:
        delta_norms: ‖w_t − w_{t−steps}‖ per layer.
        weight_norms: ‖w_t‖ per layer.
        steps: The number of steps between the two weight snapshots. Defaults to `1`.

    Returns:
        The ratio per layer, divided by `steps`; NaN where ‖w‖ is zero.

    Example:

    >>> update_ratios({"dense": 0.02}, {"dense": 2.0}, steps=10)
    {'dense': 0.001}
    """
    out = {}
    for layer, delta in delta_norms.items():
        weight = weight_norms.get(layer, float("nan"))
        out[layer] = float(delta) / float(weight) / steps if weight else float("nan")
    return out


def detect_stalled(
    ratios: Mapping[str, float],
    *,
    factor: float = STALLED_FACTOR,
    exclude: Collection[str] = (),
    measure: str = "update-to-weight",
    context: NetworkContext | None = None,
    step: int | None = None,
) -> Finding | None:
    """Flags layers whose update-to-weight ratio is far below the other layers'.

    Args:
        ratios: The ratio per layer (depth order).
        factor: Flag ratios below `factor` x the median over layers. Defaults to
            `1e-2`.
        exclude: Layers left out of the verdict (for example those a vanishing
            finding already names); they still count in the median. Defaults to `()`.
            The attention query/key projections of `context` are left out of the
            median, and flagged only when their ratio is zero (see above).
        measure: What the ratios are, for the message (`"update-to-weight"` or
            `"gradient-to-weight"`). Defaults to `"update-to-weight"`.
        context: The network, to choose the fixes. Defaults to `None`.
        step: The training step, if any. Defaults to `None`.

    Returns:
        A `Finding` of kind `"stalled"` with the ratio of each flagged layer and the
        median; or `None`.

    Example:

    >>> detect_stalled({"a": 1e-6, "b": 1e-3, "c": 2e-3}).layers
    ['a']
    """
    values = {k: float(v) for k, v in ratios.items() if np.isfinite(v) and v >= 0}
    scores = context.attention_scores if context is not None else set()
    compared = [value for layer, value in values.items() if layer not in scores]
    if len(compared) < MIN_LAYERS:
        return None
    median = float(np.median(compared))
    if median <= 0:
        return None
    flagged = {
        layer: value
        for layer, value in values.items()
        if layer not in exclude
        and (value == 0 if layer in scores else value < factor * median)
    }
    if not flagged:
        return None
    layers = list(flagged)
    evidence = {
        "ratio": flagged,
        "median_ratio": median,
        "factor": factor,
        "measure": measure,
    }
    return Finding(
        kind="stalled",
        severity="warning",
        layers=layers,
        evidence=evidence,
        fixes=fixes_for("stalled", layers, context, evidence),
        step=step,
        message=(
            f"the {measure} ratio of {layer_span(layers)} is below {factor:g}x the "
            f"median over layers ({median:.3g}): these weights barely move"
        ),
    )


def stalled_beyond_trend(
    ratios: Mapping[str, float],
    findings: Sequence[Finding],
    *,
    measure: str = "update-to-weight",
    context: NetworkContext | None = None,
    step: int | None = None,
) -> Finding | None:
    """`detect_stalled`, leaving out what a trend across depth already explains.

    Layers named by a vanishing finding are excluded; when the signal grows across
    depth (an exploding finding), the spread of ratios is the explosion itself and
    nothing is flagged.

    Args:
        ratios: The update- (or gradient-) to-weight ratio per layer.
        findings: The findings already made on the same steps.
        measure: See `detect_stalled`. Defaults to `"update-to-weight"`.
        context: The network, to choose the fixes. Defaults to `None`.
        step: The training step, if any. Defaults to `None`.

    Returns:
        A `Finding` of kind `"stalled"`, or `None`.
    """
    if any(
        f.kind == "exploding" and f.evidence.get("signal") == "depth_growth"
        for f in findings
    ):
        return None
    vanishing = {layer for f in findings if f.kind == "vanishing" for layer in f.layers}
    return detect_stalled(
        ratios, exclude=vanishing, measure=measure, context=context, step=step
    )
