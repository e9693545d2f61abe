"""The built-in model variants, sized for `zoo.datasets.load("digits")`.

MLPs take the 64 digit features (`as_images=False`); CNNs take 8×8×1 images
(`as_images=True`). All have 10 softmax outputs, ReLU activations and the `"auto"`
initializer (He normal). Override any builder argument through `zoo.create_model`, e.g.
`create_model("mlp_plain", depth=20, activation="sigmoid")` for the textbook vanishing case.
"""

from __future__ import annotations

from typing import Any

from zoo.builders.cnn import build_cnn
from zoo.builders.mlp import build_mlp
from zoo.registry import register_model

_MLP_DIGITS: dict[str, Any] = {
    "input_shape": (64,),
    "num_classes": 10,
    "depth": 4,
    "width": 32,
    "activation": "relu",
}
_CNN_DIGITS: dict[str, Any] = {
    "input_shape": (8, 8, 1),
    "num_classes": 10,
    "filters": (16, 32),
    "blocks_per_stage": 2,
    "activation": "relu",
}


@register_model(build_mlp)
def mlp_plain() -> dict[str, Any]:
    """Plain MLP: 4 blocks of Dense(32) → ReLU."""
    return dict(_MLP_DIGITS, block="plain")


@register_model(build_mlp)
def mlp_residual() -> dict[str, Any]:
    """Residual MLP: 4 blocks of Dense(32) → add → ReLU, projection in block 1."""
    return dict(_MLP_DIGITS, block="residual")


@register_model(build_mlp)
def mlp_bn() -> dict[str, Any]:
    """Batch-norm MLP: 4 blocks of Dense(32) → BN → ReLU."""
    return dict(_MLP_DIGITS, block="batchnorm")


@register_model(build_mlp)
def mlp_residual_bn() -> dict[str, Any]:
    """Residual batch-norm MLP: 4 post-activation blocks Dense(32) → BN → add → ReLU."""
    return dict(_MLP_DIGITS, block="residual_bn")


@register_model(build_mlp)
def mlp_residual_bn_preact() -> dict[str, Any]:
    """Pre-activation residual MLP: 4 blocks BN → ReLU → Dense(32) → add, then BN → ReLU."""
    return dict(_MLP_DIGITS, block="residual_bn", preactivation=True)


@register_model(build_cnn)
def cnn_plain() -> dict[str, Any]:
    """Plain CNN: 2 stages × 2 blocks of Conv3×3 → ReLU, 16 then 32 filters."""
    return dict(_CNN_DIGITS, block="plain")


@register_model(build_cnn)
def cnn_residual() -> dict[str, Any]:
    """Residual CNN: 2 stages × 2 blocks of Conv3×3 → add → ReLU, 16 then 32 filters."""
    return dict(_CNN_DIGITS, block="residual")


@register_model(build_cnn)
def cnn_bn() -> dict[str, Any]:
    """Batch-norm CNN: 2 stages × 2 blocks of Conv3×3 → BN → ReLU, 16 then 32 filters."""
    return dict(_CNN_DIGITS, block="batchnorm")


@register_model(build_cnn)
def cnn_residual_bn() -> dict[str, Any]:
    """Residual batch-norm CNN: 2 stages × 2 blocks of Conv3×3 → BN → add → ReLU."""
    return dict(_CNN_DIGITS, block="residual_bn")


@register_model(build_cnn)
def cnn_residual_bn_preact() -> dict[str, Any]:
    """Pre-activation residual CNN: 2 stages × 2 blocks BN → ReLU → Conv3×3 → add."""
    return dict(_CNN_DIGITS, block="residual_bn", preactivation=True)
