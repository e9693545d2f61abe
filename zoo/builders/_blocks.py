"""Block assembly shared by the MLP and CNN builders.

A builder hands each block a *layer factory* (a `functools.partial` of `keras.layers.Dense` or
`keras.layers.Conv2D` with the sizes filled in) and, when the shortcut must change width or
resolution, a projection factory. This module decides everything else: the order of the
layers, their names, initializers, regularizers and where batch norm, the residual `Add` and
dropout go. Block `k` (1-based) is laid out as follows, `[...]` marking optional layers
(`bn` only in batch-norm blocks, `dropout` only when `dropout > 0`, `proj` only when the
shortcut changes width or resolution)::

    plain:        block{k}_dense → block{k}_act → [block{k}_dropout]
    batchnorm:    block{k}_dense → block{k}_bn → block{k}_act → [block{k}_dropout]
    residual, residual_bn (post-activation, the default):
                  block{k}_dense → [block{k}_bn] → block{k}_add → block{k}_act
                  → [block{k}_dropout]
    residual, residual_bn with preactivation=True:
                  [block{k}_bn] → block{k}_act → block{k}_dense → [block{k}_dropout]
                  → block{k}_add;  after the last block: [final_bn] → final_act

where `block{k}_add` sums the branch and the shortcut, which is the block's input or
`block{k}_proj(input)`. The CNN's layers end in `_conv` where the MLP's end in `_dense`.
The head is `head_dense` (the logits, `num_classes` units) followed by `head_act`, an
`Activation` in float32 so that the outputs stay float32 under a mixed-precision policy.

Dense and conv layers followed by batch norm have no bias (the norm's beta takes its place);
projections never have one (the branch's bias or beta already adds one). Every kernel,
projections and head included, gets the same L2 penalty.

References:
    He et al. 2016, "Deep Residual Learning for Image Recognition" (post-activation blocks,
    projection shortcuts).
    He et al. 2016, "Identity Mappings in Deep Residual Networks" (pre-activation blocks).
    Ioffe & Szegedy 2015, "Batch Normalization".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras

from zoo.builders import _checks

LayerFactory = Callable[..., keras.layers.Layer]


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """The checked settings that every block and the head of one model share."""

    name: str
    num_classes: int
    output_activation: str | None
    block: str
    activation: str
    kernel_initializer: _checks.InitializerLike
    head_initializer: _checks.InitializerLike
    l2: float
    dropout: float
    preactivation: bool

    @property
    def residual(self) -> bool:
        return self.block in _checks.RESIDUAL_BLOCKS

    @property
    def batchnorm(self) -> bool:
        return self.block in _checks.BATCHNORM_BLOCKS


def model_settings(
    *,
    family: str,
    num_classes: Any,
    block: Any,
    activation: Any,
    kernel_initializer: Any,
    dropout: Any,
    l2: Any,
    preactivation: Any,
    output_activation: Any,
    name: Any,
) -> ModelSettings:
    """Checks the arguments every builder shares and resolves `kernel_initializer="auto"`.

    With `"auto"` the hidden layers and projections get `default_initializer(activation)`
    and the head gets `glorot_uniform` (it feeds the output activation, not `activation`);
    an explicit initializer is used everywhere. The default name is `"{family}_{block}"`.
    """
    num_classes = _checks.check_int(num_classes, "num_classes")
    block = _checks.check_block(block, bool(preactivation))
    activation = _checks.check_activation(activation)
    kernel_initializer = _checks.check_initializer(kernel_initializer)
    head_initializer = kernel_initializer
    if isinstance(kernel_initializer, str) and kernel_initializer == "auto":
        kernel_initializer = _checks.default_initializer(activation)
        head_initializer = "glorot_uniform"
    return ModelSettings(
        name=_checks.check_name(name, f"{family}_{block}"),
        num_classes=num_classes,
        output_activation=_checks.check_output_activation(output_activation, num_classes),
        block=block,
        activation=activation,
        kernel_initializer=kernel_initializer,
        head_initializer=head_initializer,
        l2=_checks.check_l2(l2),
        dropout=_checks.check_dropout(dropout),
        preactivation=bool(preactivation),
    )


def _kernel_args(settings: ModelSettings, initializer: Any) -> dict[str, Any]:
    if isinstance(initializer, keras.initializers.Initializer):
        # A fresh copy per layer: one shared instance would hand every layer its state.
        initializer = initializer.__class__.from_config(initializer.get_config())
    regularizer = keras.regularizers.L2(settings.l2) if settings.l2 > 0 else None
    return {"kernel_initializer": initializer, "kernel_regularizer": regularizer}


def _activation(settings: ModelSettings, name: str) -> keras.layers.Layer:
    return keras.layers.Activation(settings.activation, name=name)


def apply_block(
    x: Any,
    *,
    index: int,
    settings: ModelSettings,
    make_layer: LayerFactory,
    layer_suffix: str,
    make_projection: LayerFactory | None,
) -> Any:
    """Applies block `index` (1-based) to `x` and returns its output tensor.

    Args:
        x: The block's input tensor.
        index: The block number, used in the layer names `block{index}_*`.
        settings: The checked settings from `model_settings`.
        make_layer: Builds the block's Dense or Conv2D layer from `name`, `use_bias`,
            `kernel_initializer` and `kernel_regularizer`.
        layer_suffix: `"dense"` or `"conv"`, the suffix of that layer's name.
        make_projection: Builds the shortcut projection from the same keyword arguments,
            or None when the shortcut keeps its shape. Ignored by non-residual blocks.

    Returns:
        The output tensor of the block.
    """
    prefix = f"block{index}"
    kernel_args = _kernel_args(settings, settings.kernel_initializer)
    main = make_layer(
        name=f"{prefix}_{layer_suffix}", use_bias=not settings.batchnorm, **kernel_args
    )
    norm = keras.layers.BatchNormalization(name=f"{prefix}_bn") if settings.batchnorm else None
    dropout = (
        keras.layers.Dropout(settings.dropout, name=f"{prefix}_dropout")
        if settings.dropout > 0
        else None
    )
    if not settings.residual:
        y = main(x)
        if norm is not None:
            y = norm(y)
        y = _activation(settings, f"{prefix}_act")(y)
        return dropout(y) if dropout is not None else y

    shortcut = x
    if make_projection is not None:
        shortcut = make_projection(
            name=f"{prefix}_proj",
            use_bias=False,
            **_kernel_args(settings, settings.kernel_initializer),
        )(x)
    add = keras.layers.Add(name=f"{prefix}_add")
    if settings.preactivation:
        y = norm(x) if norm is not None else x
        y = main(_activation(settings, f"{prefix}_act")(y))
        if dropout is not None:
            y = dropout(y)
        return add([y, shortcut])
    y = main(x)
    if norm is not None:
        y = norm(y)
    y = _activation(settings, f"{prefix}_act")(add([y, shortcut]))
    return dropout(y) if dropout is not None else y


def finish_model(
    inputs: Any,
    x: Any,
    settings: ModelSettings,
    pooling: keras.layers.Layer | None = None,
) -> keras.Model:
    """Closes the stack of blocks `x` and returns the model from `inputs` to the head.

    A pre-activation stack gets `[final_bn] → final_act` first (its last block ends in an
    `Add`); then come `pooling` (the CNN's `global_pool`) if given, `head_dense` (the
    logits) and `head_act`, in float32.
    """
    if settings.preactivation:
        if settings.batchnorm:
            x = keras.layers.BatchNormalization(name="final_bn")(x)
        x = _activation(settings, "final_act")(x)
    if pooling is not None:
        x = pooling(x)
    logits = keras.layers.Dense(
        settings.num_classes,
        name="head_dense",
        **_kernel_args(settings, settings.head_initializer),
    )(x)
    outputs = keras.layers.Activation(
        settings.output_activation or "linear", dtype="float32", name="head_act"
    )(logits)
    return keras.Model(inputs, outputs, name=settings.name)
