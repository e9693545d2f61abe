"""Which measurement follows the backpropagated signal δ across depth, per layer.

Vanishing and exploding gradients are statements about δ, the gradient of the loss with
respect to each layer's pre-activation, as it travels from the output to the input. What
can be measured depends on the source:

- `activation`: the gradient with respect to each kernel layer's output (read by
  `diagnose` through a functional sub-model) follows δ in every architecture;
- `bias`: a bias gradient is Σ_batch δ, so it follows δ too (REFERENCES.md, trap 2);
  but a bias followed by batch normalization gets no gradient at all;
- `kernel`: the kernel gradient is x_{k-1} ⊗ δ_k. The forward and backward scales cancel
  in it, so in an unnormalized ReLU net it stays flat while δ vanishes (trap 2); with
  normalization layers the forward scale is fixed and it follows δ;
- `total`: all variables of a layer together, the last resort.

Only layers that own a kernel enter the profile, so that a batch-normalized net is
compared layer for layer with a plain one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from kgrad import stats
from kgrad.records.gradient_records import GradientRecords

ProfileKind = Literal["auto", "activation", "bias", "kernel", "total"]
PROFILE_KINDS: tuple[str, ...] = ProfileKind.__args__

# The column of a per-layer frame (`Report.layers`) that holds each measurement.
PROFILE_COLUMNS = {
    "activation": "activation_grad_norm",
    "bias": "bias_grad_norm",
    "kernel": "kernel_grad_norm",
    "total": "grad_norm",
}
_NORMALIZATION_VARIABLES = frozenset({"gamma", "beta", "scale", "offset"})


def check_profile_kind(kind: str) -> str:
    """Returns `kind` if it is a valid profile kind, else raises a ValueError."""
    if kind not in PROFILE_KINDS:
        raise ValueError(
            f"`kind` must be one of {list(PROFILE_KINDS)}. Received: kind={kind!r}"
        )
    return kind


def choose_signal(*, has_activation: bool, all_biased: bool, normalized: bool) -> str:
    """The measurement that follows δ best, given what is available.

    Args:
        has_activation: Activation gradients exist for every kernel layer.
        all_biased: Every kernel layer has a bias.
        normalized: The network has normalization layers (biases before them get no
            gradient, and kernel gradients follow δ).

    Returns:
        `"activation"`, `"bias"`, `"kernel"` or `"total"`.
    """
    if has_activation:
        return "activation"
    if normalized:
        return "kernel"
    if all_biased:
        return "bias"
    return "total"


def is_normalization(variable_names: Sequence[str]) -> bool:
    """Whether a layer with these variables is a normalization layer (γ, β only)."""
    return bool(variable_names) and set(variable_names) <= _NORMALIZATION_VARIABLES


def infer_normalized(frame: pd.DataFrame) -> bool:
    """Whether a per-layer frame has layers with gradients but no kernel (γ/β only)."""
    if "kernel_grad_norm" not in frame or "grad_norm" not in frame:
        return False
    return bool((frame["kernel_grad_norm"].isna() & frame["grad_norm"].notna()).any())


def frame_profile(
    frame: pd.DataFrame, kind: ProfileKind = "auto", normalized: bool | None = None
) -> tuple[pd.DataFrame, str]:
    """The δ profile of a per-layer frame such as `Report.layers`.

    Args:
        frame: One row per layer with `layer`, `depth` and some of the columns
            `activation_grad_norm`, `bias_grad_norm`, `kernel_grad_norm`, `grad_norm`.
        kind: The measurement, or `"auto"` to choose with `choose_signal`.
            Defaults to `"auto"`.
        normalized: Whether the network has normalization layers. Defaults to
            `None`: inferred from the frame (layers with gradients but no kernel).

    Returns:
        A frame with `layer`, `depth`, `position` (0..n-1 among the profiled layers)
        and `norm`, and the kind used.
    """
    check_profile_kind(kind)
    if normalized is None:
        normalized = infer_normalized(frame)
    rows = frame
    if "kernel_grad_norm" in frame and frame["kernel_grad_norm"].notna().any():
        rows = frame[frame["kernel_grad_norm"].notna()]

    def complete(column: str) -> bool:
        return column in rows and bool(rows[column].notna().all()) and len(rows) > 0

    if kind == "auto":
        kind = choose_signal(
            has_activation=complete("activation_grad_norm"),
            all_biased=complete("bias_grad_norm"),
            normalized=normalized,
        )
    column = PROFILE_COLUMNS[kind]
    values = rows[column] if column in rows else pd.Series(np.nan, index=rows.index)
    profile = pd.DataFrame(
        {
            "layer": rows["layer"].astype(str).to_numpy(),
            "depth": rows["depth"].to_numpy(),
            "position": np.arange(len(rows)),
            "norm": values.to_numpy(dtype=np.float64),
        }
    )
    return profile, kind


def records_profile(
    records: GradientRecords, kind: ProfileKind = "auto"
) -> tuple[list[str], np.ndarray, str]:
    """The δ profile of every logged step of some records.

    Args:
        records: Gradient norms from `GradientNormLogger`.
        kind: The measurement (`"activation"` is not recorded and falls back to
            `"auto"`). Defaults to `"auto"`.

    Returns:
        The profiled layer names (kernel layers, in depth order), an array
        `(n_steps, n_layers)` of norms and the kind used.
    """
    check_profile_kind(kind)
    variables_of: dict[str, list[str]] = {}
    kinds_of: dict[str, set[str]] = {}
    for info in records.variables:
        variables_of.setdefault(info.layer, []).append(info.variable)
        kinds_of.setdefault(info.layer, set()).add(info.kind)
    layers = [name for name in records.layers if "kernel" in kinds_of[name]]
    layers = layers or list(records.layers)
    if kind in ("auto", "activation"):
        kind = choose_signal(
            has_activation=False,
            all_biased=all("bias" in kinds_of[name] for name in layers),
            normalized=any(is_normalization(v) for v in variables_of.values()),
        )
    names, norms = records.layer_norms(kind)
    columns = [names.index(name) for name in layers]
    return layers, norms[:, columns], kind


def median_profile_ratios(profiles: np.ndarray) -> tuple[float, float]:
    """The median per-layer ratio and first-to-last ratio over rows of profiles.

    Args:
        profiles: `(n_steps, n_layers)` norms ordered by depth.

    Returns:
        `(per_layer_ratio, first_to_last)`, medians over the rows where they are
        defined; NaN when no row is.
    """
    per_layer, cumulative = [], []
    for row in np.atleast_2d(profiles):
        per_layer.append(stats.per_layer_ratio(row))
        cumulative.append(stats.first_to_last_ratio(row))

    def median(values: list[float]) -> float:
        finite = np.asarray(values, dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        return float(np.median(finite)) if finite.size else float("nan")

    return median(per_layer), median(cumulative)


@dataclasses.dataclass(frozen=True)
class DepthTrend:
    """How a δ profile changes across depth: what vanishing and growth are judged on.

    Attributes:
        per_layer_ratio: The geometric-mean ratio per layer (first/last)^(1/(n−1)).
        first_to_last: The first layer's norm over the last layer's.
        relative: Each layer's norm over the last layer's.
    """

    per_layer_ratio: float
    first_to_last: float
    relative: np.ndarray

    @classmethod
    def of(
        cls,
        profile: Sequence[float] | np.ndarray,
        per_layer_ratio: float | None = None,
        first_to_last: float | None = None,
    ) -> "DepthTrend | None":
        """The trend of `profile` (index 0 nearest the input); `None` under 3 layers.

        `per_layer_ratio` and `first_to_last`, when given (for example medians over
        steps), replace the values computed from `profile`.
        """
        profile = np.asarray(profile, dtype=np.float64)
        if profile.size < 3:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = profile / profile[-1]
        if per_layer_ratio is None:
            per_layer_ratio = stats.per_layer_ratio(profile)
            if profile[0] == 0 < profile[-1]:  # underflowed to zero: total loss
                per_layer_ratio = 0.0
        if first_to_last is None:
            first_to_last = stats.first_to_last_ratio(profile)
        return cls(float(per_layer_ratio), float(first_to_last), relative)

    def layers_where(
        self,
        layers: Sequence[str],
        below: float | None = None,
        above: float | None = None,
    ) -> list[str]:
        """The layers whose relative norm is beyond a bound (else the first layer)."""
        picked = [
            name
            for name, value in zip(layers, self.relative)
            if (below is not None and value < below)
            or (above is not None and value > above)
        ]
        return picked or list(layers[:1])

    def evidence(self, source: str, **extra: Any) -> dict[str, Any]:
        """The numbers behind a verdict on this trend, for a `Finding`."""
        return {
            "per_layer_ratio": float(self.per_layer_ratio),
            "first_to_last": float(self.first_to_last),
            "profile": source,
            "layers_profiled": len(self.relative),
            **extra,
        }
