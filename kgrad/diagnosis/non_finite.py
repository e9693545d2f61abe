"""Non-finite gradients: the first step with a NaN or inf, and where it entered.

Backpropagation runs from the output to the input, and once a non-finite value enters
δ it spreads to every layer below. At the first step with a non-finite gradient, the
non-finite layer nearest the output is therefore where it entered the backward pass:
that is the layer this detector names first (`origin_layer`). When the forward pass
already produced a non-finite output, the first such layer in forward order is named
too: the problem started there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kgrad.diagnosis.findings import Finding, layer_span
from kgrad.diagnosis.fixes import NetworkContext, fixes_for


def detect_non_finite(
    layer_norms: np.ndarray,
    layers: Sequence[str],
    steps: Sequence[int] | np.ndarray | None = None,
    *,
    weight_norms: np.ndarray | None = None,
    first_non_finite_output: str | None = None,
    context: NetworkContext | None = None,
) -> Finding | None:
    """Flags the first step whose gradient holds NaN or inf values.

    Args:
        layer_norms: Gradient norms `(n_steps, n_layers)` (or `(n_layers,)` for one
            step), layers in depth order. The norm of a tensor with a NaN or inf is
            itself non-finite; NaN entries for variables without a gradient must be
            removed first.
        layers: The layer names of the columns.
        steps: The step of each row. Defaults to `None`: no step (a probe).
        weight_norms: Weight norms of the same shape, to tell whether the weights
            themselves are already non-finite. Defaults to `None`.
        first_non_finite_output: The first layer, in forward order, whose output was
            non-finite (known to `diagnose`). Defaults to `None`.
        context: The network, to choose the fixes. Defaults to `None`.

    Returns:
        A critical `Finding` of kind `"non_finite"` whose `layers` are the non-finite
        layers at that step in depth order and whose evidence names `origin_layer`
        (the non-finite layer nearest the output) and `step`; or `None`.

    Example:

    >>> norms = np.array([[1.0, 1.0, 1.0], [np.nan, np.inf, 2.0]])
    >>> detect_non_finite(norms, ["a", "b", "c"], [10, 11]).evidence["origin_layer"]
    'b'
    """
    norms = np.atleast_2d(np.asarray(layer_norms, dtype=np.float64))
    bad_rows = np.flatnonzero(~np.isfinite(norms).all(axis=1))
    if bad_rows.size == 0 and first_non_finite_output is None:
        return None
    row = int(bad_rows[0]) if bad_rows.size else 0
    bad = [name for name, value in zip(layers, norms[row]) if not np.isfinite(value)]
    step = None if steps is None else int(np.asarray(steps)[row])
    evidence: dict = {
        "step": step,
        "origin_layer": bad[-1] if bad else None,
        "non_finite_layers": len(bad),
        "nan": bool(np.isnan(norms[row]).any()),
        "inf": bool(np.isinf(norms[row]).any()),
    }
    if first_non_finite_output is not None:
        evidence["first_non_finite_output"] = first_non_finite_output
    if weight_norms is not None:
        weights = np.atleast_2d(np.asarray(weight_norms, dtype=np.float64))
        evidence["weights_non_finite"] = bool(not np.isfinite(weights[row]).all())
    where = f" at step {step}" if step is not None else ""
    origin = f"; it entered the backward pass at {bad[-1]}" if bad else ""
    forward = (
        f"; the forward pass was first non-finite at {first_non_finite_output}"
        if first_non_finite_output
        else ""
    )
    return Finding(
        kind="non_finite",
        severity="critical",
        layers=bad or [first_non_finite_output],
        evidence=evidence,
        fixes=fixes_for("non_finite", bad, context, evidence),
        step=step,
        message=(
            f"non-finite gradients{where} in {layer_span(bad) if bad else 'no layer'}"
            f"{origin}{forward}"
        ),
    )
