"""The remedies for each finding, chosen from what the network is made of.

A fix only helps when it fits the cause: He initialization is right for ReLU layers and
wrong for sigmoid ones (whose gain is capped by σ′ ≤ 1/4 whatever the initializer), and
clipping tames explosions but does nothing for vanishing. `fixes_for` picks the remedies
from the kind of finding, the activations of the layers concerned and the evidence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from kgrad.diagnosis.findings import FINDING_KINDS

# Activations for which He initialization (Var[W] = 2/fan_in) is the matching choice.
RELU_LIKE = frozenset({"relu", "relu6", "leaky_relu", "elu", "gelu", "silu", "swish"})
# Activations whose units can die: zero output and zero derivative for negative inputs.
DEAD_PRONE = frozenset({"relu", "relu6"})
SATURATING = frozenset({"sigmoid", "tanh"})


@dataclasses.dataclass
class NetworkContext:
    """What the fixes need to know about the network.

    Attributes:
        activations: The activation applied after each layer (`"relu"`, `"sigmoid"`,
            `"linear"`, ...), fused or in a following `Activation` layer.
        initializers: The class name of each layer's kernel initializer.
        weight_scale: σ_w² = fan_in·Var[W] of each layer's kernel: 1 for Glorot on a
            square layer, 2 for He.
        he_initialized: The layers whose kernels have He initialization
            (`HeNormal`, `HeUniform` or the same `VarianceScaling`).
        normalized: Whether the network has normalization layers
            (`BatchNormalization`, `LayerNormalization`, `GroupNormalization`, ...).
        residual: Whether the network has skip connections (a merge of a block's
            input and output: `Add`, `x + f(x)`, `Concatenate`).
        attention_scores: The query and key projections of attention layers,
            which the stalled detector does not compare with other layers.
    """

    activations: dict[str, str] = dataclasses.field(default_factory=dict)
    initializers: dict[str, str] = dataclasses.field(default_factory=dict)
    weight_scale: dict[str, float] = dataclasses.field(default_factory=dict)
    he_initialized: set[str] = dataclasses.field(default_factory=set)
    normalized: bool = False
    residual: bool = False
    attention_scores: set[str] = dataclasses.field(default_factory=set)

    def activations_of(self, layers: Sequence[str]) -> set[str]:
        """The activations used by `layers` (all layers when `layers` is empty)."""
        names = layers or list(self.activations)
        return {self.activations[name] for name in names if name in self.activations}

    def lacks_he(self, layers: Sequence[str]) -> bool:
        """Whether some ReLU-family layer among `layers` (all layers when empty) has
        no He initialization (a layer of unknown initializer counts as lacking it)."""
        names = layers or list(self.activations)
        relu_layers = [n for n in names if self.activations.get(n) in RELU_LIKE]
        return any(
            name not in self.he_initialized
            and not self.initializers.get(name, "").startswith("He")
            for name in relu_layers or names
        )


# The texts, named so that tests and callers can refer to them.
FIX_RELU_HE = (
    'Initialize the ReLU layers with He init, `kernel_initializer="he_normal"` '
    "(Var[W] = 2/fan_in keeps the backpropagated signal constant; Glorot init loses "
    "1/√2 per ReLU layer)."
)
FIX_REPLACE_SIGMOID = (
    "Replace sigmoid in the hidden layers with ReLU or GELU: σ′ ≤ 1/4 caps the gain of "
    "every sigmoid layer near σ_w/4, whatever the initializer. Keep sigmoid only on "
    "the output layer."
)
FIX_TANH_SCALE = (
    "Give the tanh layers Glorot or orthogonal initialization "
    '(`kernel_initializer="glorot_uniform"` or `"orthogonal"`), so that '
    "σ_w² = fan_in·Var[W] ≈ 1 and tanh′(0) = 1 passes the signal at gain ≈ 1."
)
FIX_BATCH_NORM = (
    "Add `BatchNormalization` between the layers (before the activation): it "
    "re-centres and rescales every layer (Ioffe & Szegedy 2015)."
)
FIX_RESIDUAL = (
    "Add skip connections (`keras.layers.Add`) around blocks of layers, so the signal "
    "has a path of gain 1 through the depth (He et al. 2016)."
)
FIX_CLIP = (
    'Clip the gradients: `kgrad.GradientClipping(mode="global_norm", '
    "threshold=1.0)` or the optimizer's own `global_clipnorm=1.0` "
    "(Pascanu et al. 2013)."
)
FIX_LOWER_LR = "Lower the learning rate (by 3-10x)."
FIX_WARMUP = (
    "Warm the learning rate up over the first epochs: `kgrad.LearningRateWarmup("
    "warmup_epochs=5)` (Goyal et al. 2017)."
)
FIX_LEAKY = (
    "Use LeakyReLU, ELU or GELU, which pass a gradient for negative inputs, so a unit "
    "pushed below zero can recover."
)
FIX_ZERO_BIAS = (
    'Start the biases at zero (`bias_initializer="zeros"`) and look for what drives '
    "them negative: the dead units have negative biases."
)
FIX_STANDARDIZE_INPUTS = (
    "Standardize the inputs (`keras.layers.Normalization` adapted on the training "
    "data), so the first pre-activations stay in the non-saturated range."
)
FIX_CHECK_DATA = (
    "Check the data for NaN and inf values (`np.isfinite(x).all()`, the same for `y`)."
)
FIX_LOGITS = (
    "Compute the loss from logits (`from_logits=True`, no sigmoid/softmax before a "
    "log), which stays finite where probabilities round to 0 or 1."
)
FIX_LOSS_SCALE = (
    "Under mixed precision, keep the loss scaling of `LossScaleOptimizer` (the Keras "
    "default) so float16 gradients neither overflow nor underflow."
)
FIX_STALLED_TRAINABLE = (
    "Check that the layer is meant to learn: its optimizer state, learning-rate "
    "multipliers and weight decay (a strong decay holds weights in place)."
)
FIX_ADAPTIVE_OPTIMIZER = (
    "Use an optimizer with per-parameter step sizes (Adam), whose updates do not "
    "shrink with the gradient scale of a layer."
)


def _scale_text(layers: Sequence[str], context: NetworkContext) -> str:
    scales = [
        context.weight_scale[name] for name in layers if name in context.weight_scale
    ]
    if not scales:
        return ""
    return f" (here σ_w² = fan_in·Var[W] is up to {max(scales):.3g})"


def _init_scale_fix(layers: Sequence[str], context: NetworkContext) -> str:
    activations = context.activations_of(layers)
    advice = []
    if activations & SATURATING:
        advice.append("`glorot_uniform` for sigmoid/tanh layers")
    if activations & RELU_LIKE and context.lacks_he(layers):
        advice.append("`he_normal` for ReLU-family layers")
    elif activations & RELU_LIKE and not advice:
        # He already: the scale that explodes is not the one the weights started at.
        return (
            "The ReLU layers already start at He's scale (σ_w² = 2)"
            f"{_scale_text(layers, context)}: the weights grew during training; "
            "lower the learning rate or clip the gradients."
        )
    if not advice:
        advice.append("Glorot init (`glorot_uniform`, the Keras default)")
    return (
        "Reduce the initial weight scale towards σ_w² = fan_in·Var[W] ≈ 1-2"
        f"{_scale_text(layers, context)}: use {' and '.join(advice)}."
    )


def _architecture_fixes(context: NetworkContext) -> list[str]:
    fixes = []
    if not context.normalized:
        fixes.append(FIX_BATCH_NORM)
    if not context.residual:
        fixes.append(FIX_RESIDUAL)
    return fixes


def fixes_for(
    kind: str,
    layers: Sequence[str],
    context: NetworkContext | None = None,
    evidence: Mapping[str, Any] | None = None,
) -> list[str]:
    """The remedies that fit a finding, most specific first.

    Args:
        kind: The finding's kind (see `Finding.kind`).
        layers: The layers concerned.
        context: What the network is made of. Defaults to `None`: unknown, so only
            remedies that hold for any activation are given.
        evidence: The finding's evidence (for example `negative_bias` for dead units,
            `signal` for an explosion). Defaults to `None`.

    Returns:
        A list of remedies as sentences. He initialization is suggested only for
        ReLU-family layers, never for sigmoid or tanh ones, and not where they
        already have it; batch norm not where the network is normalized already,
        skip connections not where it has them.

    Raises:
        ValueError: for an unknown `kind`.

    Example:

    >>> context = NetworkContext(activations={"dense": "sigmoid"})
    >>> fixes_for("vanishing", ["dense"], context)[0] == FIX_REPLACE_SIGMOID
    True
    """
    context = context or NetworkContext()
    evidence = evidence or {}
    activations = context.activations_of(layers)
    fixes: list[str] = []
    if kind == "vanishing":
        if "sigmoid" in activations:
            fixes.append(FIX_REPLACE_SIGMOID)
        if "tanh" in activations:
            fixes.append(FIX_TANH_SCALE)
        if activations & RELU_LIKE and context.lacks_he(layers):
            fixes.append(FIX_RELU_HE)
        fixes += _architecture_fixes(context)
    elif kind == "exploding":
        fixes += [FIX_CLIP, FIX_LOWER_LR, FIX_WARMUP]
        if evidence.get("signal") != "norm_spike":
            fixes.insert(0, _init_scale_fix(layers, context))
        if not context.normalized:
            fixes.append(FIX_BATCH_NORM)
    elif kind == "non_finite":
        fixes += [FIX_CHECK_DATA, FIX_LOGITS, FIX_LOWER_LR, FIX_CLIP, FIX_LOSS_SCALE]
    elif kind == "dead_units":
        if evidence.get("negative_bias"):
            fixes.append(FIX_ZERO_BIAS)
        fixes += [FIX_LOWER_LR, FIX_LEAKY]
        if context.lacks_he(layers):
            fixes.append(FIX_RELU_HE)
    elif kind == "saturation":
        fixes.append(_init_scale_fix(layers, context))
        fixes.append(FIX_STANDARDIZE_INPUTS)
        if not context.normalized:
            fixes.append(FIX_BATCH_NORM)
        if "sigmoid" in activations:
            fixes.append(FIX_REPLACE_SIGMOID)
        fixes.append(FIX_LOWER_LR)
    elif kind == "stalled":
        fixes += [FIX_STALLED_TRAINABLE, FIX_ADAPTIVE_OPTIMIZER]
        fixes += _architecture_fixes(context)
    else:
        raise ValueError(
            f"`kind` must be one of {list(FINDING_KINDS)}. Received: kind={kind!r}"
        )
    return fixes
