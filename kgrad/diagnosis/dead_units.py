"""Dead ReLU units: zero output, hence zero gradient, for every input.

A unit that outputs zero for one batch is not dead. In a deep ReLU net at
initialization the inputs of a layer become correlated with depth, and many units are
silent for every example of a batch, or even of a large probe set, by geometry alone
(REFERENCES.md, trap 3): in a 20-layer, 128-wide He-initialized net, 20-40 units of the
last layers are silent on 512 Gaussian inputs. Two tests tell real death from that:

- over a probe set (`diagnose`): compare the silent units with a null model, fresh
  zero-bias units with random Gaussian weights reading the same layer input. The
  fraction p of null units silent on the same examples is what geometry explains; more
  silent units than the binomial bound units·p + 3·√(units·p·(1−p)) + 1 are dead;
- over time (`GradientHealthMonitor`): a unit silent for every example in several
  probes in a row, while the rest of the net trains, is dead.

References:
    Lu et al. 2019, "Dying ReLU and Initialization: Theory and Numerical Examples".
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kgrad.diagnosis.findings import Finding, layer_span
from kgrad.diagnosis.fixes import NetworkContext, fixes_for

# Fewer probe examples than this say little about "every input".
MIN_EXAMPLES = 32
DEAD_AFTER_PROBES = 3
# A layer with more dead units than this fraction is critical.
CRITICAL_DEAD_FRACTION = 0.5


def active_units(outputs: np.ndarray) -> np.ndarray:
    """Which units (last axis) are non-zero for at least one example or position.

    Args:
        outputs: Layer outputs, units on the last axis.

    Returns:
        A boolean array of shape `(units,)`.
    """
    outputs = np.asarray(outputs)
    return np.any(outputs.reshape(-1, outputs.shape[-1]) != 0, axis=0)


def silence_bound(
    units: int, null_fraction: float, null_units: float | None = None
) -> float:
    """The most silent units a layer may have by chance, given the null fraction.

    The layer's silent units are a binomial draw with the null model's probability p.
    When p is itself estimated from `null_units` random units, its estimate is
    uncertain too: p is taken as (k + ½)/(n + 1) for k silent of n null units (never
    exactly 0: a few hundred null units often miss a rare silence that 128 real units
    show), and the variance of the difference gains the estimate's share, units·p(1−p)
    · units/n. Without this, a 20-layer, 128-wide He-initialized ReLU net was flagged
    during training at initialization (256 null units, learning rate 1e-4) in 2 of 6
    seeds; with it, in none of 10 (measured).

    Args:
        units: The layer's number of units.
        null_fraction: The fraction of null-model units silent on the same inputs.
        null_units: How many null-model units `null_fraction` was estimated from, or
            `None` (or NaN) when it is exact (0 after a normalization layer).
            Defaults to `None`.

    Returns:
        units·p + 3·√(units·p·(1−p)·(1 + units/n)) + 1 (three standard deviations,
        plus one for small counts); with an exact p, units·p + 3·√(units·p·(1−p)) + 1.

    Example:

    >>> silence_bound(128, 0.0)
    1.0
    >>> round(silence_bound(128, 0.0, null_units=256), 2)
    3.08
    """
    p = float(np.clip(null_fraction, 0.0, 1.0))
    variance = units * p * (1.0 - p)
    if null_units is not None and null_units == null_units:
        p = (p * null_units + 0.5) / (null_units + 1.0)
        variance = units * p * (1.0 - p) * (1.0 + units / null_units)
    return float(units * p + 3.0 * np.sqrt(variance) + 1.0)


def consecutive_silence(previous: np.ndarray | None, silent: np.ndarray) -> np.ndarray:
    """Counts, per unit, the probes in a row for which the unit was silent.

    Args:
        previous: The counts after the previous probe, or `None` at the first one.
        silent: Whether each unit was silent for every example of this probe.

    Returns:
        The updated counts: `previous + 1` where silent, `0` elsewhere.

    Example:

    >>> consecutive_silence(np.array([2, 1]), np.array([True, False])).tolist()
    [3, 0]
    """
    silent = np.asarray(silent, dtype=bool)
    previous = np.zeros(silent.shape, np.int64) if previous is None else previous
    return np.where(silent, previous + 1, 0)


def detect_dead_units(
    table: pd.DataFrame,
    *,
    context: NetworkContext | None = None,
    step: int | None = None,
    criterion: str = "probe set",
) -> Finding | None:
    """Flags layers with more dead units than chance explains.

    Args:
        table: One row per ReLU-family layer with `layer`, `units`, `dead_units` and
            optionally `null_silent_fraction` (the null model's silent fraction; NaN
            or absent when dead units were established over time), `null_units`
            (how many null units estimated it; NaN or absent when it is exact),
            `examples` and `dead_bias_mean` (the mean bias of the dead units).
        context: The network, to choose the fixes. Defaults to `None`.
        step: The training step, if any. Defaults to `None`.
        criterion: How death was established, for the message (`"probe set"` or
            `"3 probes in a row"`). Defaults to `"probe set"`.

    Returns:
        A `Finding` of kind `"dead_units"` whose evidence holds `dead_units` (per
        layer), `expected_silent` (per layer, from the null model) and
        `dead_fraction`; or `None`.

    Example:

    >>> table = pd.DataFrame({"layer": ["dense"], "units": [64], "dead_units": [16],
    ...                       "null_silent_fraction": [0.0], "examples": [512]})
    >>> detect_dead_units(table).evidence["dead_units"]
    {'dense': 16}
    """
    flagged, expected, fractions, biases = {}, {}, {}, []
    used_null = False
    for row in table.itertuples(index=False):
        examples = getattr(row, "examples", MIN_EXAMPLES)
        if row.dead_units <= 0 or (examples == examples and examples < MIN_EXAMPLES):
            continue
        null = getattr(row, "null_silent_fraction", float("nan"))
        used_null = used_null or null == null
        null = 0.0 if null != null else float(null)  # NaN: death shown over time
        null_units = getattr(row, "null_units", None)
        if row.dead_units <= silence_bound(row.units, null, null_units):
            continue
        flagged[row.layer] = int(row.dead_units)
        expected[row.layer] = round(null * row.units, 1)
        fractions[row.layer] = row.dead_units / row.units
        bias = getattr(row, "dead_bias_mean", float("nan"))
        if bias == bias:
            biases.append(float(bias))
    if not flagged:
        return None
    layers = list(flagged)
    evidence = {
        "dead_units": flagged,
        "expected_silent": expected,
        "dead_fraction": fractions,
        "criterion": criterion,
    }
    if biases:
        evidence["dead_bias_mean"] = float(np.mean(biases))
        evidence["negative_bias"] = bool(np.mean(biases) < 0)
    total = sum(flagged.values())
    explained = (
        f", more than input correlation explains (expected by chance: "
        f"{sum(expected.values()):.3g})"
        if used_null
        else ""
    )
    return Finding(
        kind="dead_units",
        severity=(
            "critical"
            if max(fractions.values()) > CRITICAL_DEAD_FRACTION
            else "warning"
        ),
        layers=layers,
        evidence=evidence,
        fixes=fixes_for("dead_units", layers, context, evidence),
        step=step,
        message=(
            f"{total} ReLU unit(s) in {layer_span(layers)} output zero for every "
            f"example ({criterion}){explained}"
        ),
    )
