"""Saturated sigmoid and tanh units: derivative below 0.01, almost no gradient passes.

The derivative is computed from the outputs, σ′ = y(1 − y) and tanh′ = 1 − y², so it
works for activations fused into `Dense(activation=...)` and for separate `Activation`
layers alike. σ′ < 0.01 when |x| > 4.585 and tanh′ < 0.01 when |x| > 2.993.

Saturation is reported apart from vanishing: a sigmoid net with Glorot init has almost
no saturated unit while its gradients vanish (σ′ ≤ 1/4 is the cause), and a tanh net
with N(0, 1) weights is saturated while its gradients explode (REFERENCES.md, trap 3).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kgrad.diagnosis.findings import Finding, layer_span
from kgrad.diagnosis.fixes import NetworkContext, fixes_for

DERIVATIVE_THRESHOLD = 0.01
# |x| beyond which the derivative is below 0.01: σ′(4.585) = tanh′(2.993) = 0.01.
SIGMOID_SATURATION_INPUT = 4.585
TANH_SATURATION_INPUT = 2.993
# A layer is flagged when more than this fraction of its unit activations saturate,
# critical beyond the second: a quarter of the paths pass (almost) no gradient.
SATURATED_FRACTION_THRESHOLD = 0.25
CRITICAL_SATURATED_FRACTION = 0.5

SATURATING_ACTIVATIONS = ("sigmoid", "tanh")


def derivative_from_outputs(outputs: np.ndarray, activation: str) -> np.ndarray:
    """The activation's derivative at each unit, from its outputs.

    Args:
        outputs: Outputs of a sigmoid or tanh.
        activation: `"sigmoid"` or `"tanh"`.

    Returns:
        σ′ = y(1 − y) or tanh′ = 1 − y², elementwise.

    Raises:
        ValueError: for another activation.

    Example:

    >>> float(derivative_from_outputs(np.array(0.5), "sigmoid"))
    0.25
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    if activation == "sigmoid":
        return outputs * (1.0 - outputs)
    if activation == "tanh":
        return 1.0 - outputs**2
    raise ValueError(
        f"`activation` must be one of {list(SATURATING_ACTIVATIONS)}. "
        f"Received: activation={activation!r}"
    )


def saturated_count(outputs: np.ndarray, activation: str) -> tuple[int, int]:
    """How many unit activations have a derivative below 0.01, and out of how many.

    Args:
        outputs: Outputs of a sigmoid or tanh layer (any shape).
        activation: `"sigmoid"` or `"tanh"`.

    Returns:
        `(saturated, total)` counts over every example, position and unit.
    """
    derivative = derivative_from_outputs(outputs, activation)
    return int(np.count_nonzero(derivative < DERIVATIVE_THRESHOLD)), int(
        derivative.size
    )


def detect_saturation(
    table: pd.DataFrame,
    *,
    context: NetworkContext | None = None,
    threshold: float = SATURATED_FRACTION_THRESHOLD,
    step: int | None = None,
) -> Finding | None:
    """Flags sigmoid/tanh layers where many activations have a derivative below 0.01.

    Args:
        table: One row per sigmoid/tanh layer with `layer`, `activation` and
            `saturated_fraction` (the fraction of unit activations over the probe
            examples whose derivative is below 0.01).
        context: The network, to choose the fixes. Defaults to `None`.
        threshold: Flag layers whose saturated fraction exceeds this. Defaults to
            `0.25`.
        step: The training step, if any. Defaults to `None`.

    Returns:
        A `Finding` of kind `"saturation"` whose evidence holds `saturated_fraction`
        per flagged layer; or `None`.

    Example:

    >>> table = pd.DataFrame({"layer": ["dense"], "activation": ["tanh"],
    ...                       "saturated_fraction": [0.8]})
    >>> detect_saturation(table).severity
    'critical'
    """
    flagged = {
        str(row.layer): float(row.saturated_fraction)
        for row in table.itertuples(index=False)
        if row.saturated_fraction > threshold
    }
    if not flagged:
        return None
    layers = list(flagged)
    worst = max(flagged.values())
    evidence = {
        "saturated_fraction": flagged,
        "threshold": threshold,
        "derivative_threshold": DERIVATIVE_THRESHOLD,
    }
    return Finding(
        kind="saturation",
        severity="critical" if worst > CRITICAL_SATURATED_FRACTION else "warning",
        layers=layers,
        evidence=evidence,
        fixes=fixes_for("saturation", layers, context, evidence),
        step=step,
        message=(
            f"up to {worst:.0%} of the sigmoid/tanh activations in "
            f"{layer_span(layers)} have a derivative below {DERIVATIVE_THRESHOLD} "
            f"(|x| > {SIGMOID_SATURATION_INPUT} for sigmoid, > "
            f"{TANH_SATURATION_INPUT} for tanh)"
        ),
    )
