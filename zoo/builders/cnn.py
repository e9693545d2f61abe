"""Convolutional classifiers with plain, residual and batch-norm blocks, in stages.

Stage `s` has `blocks_per_stage[s]` blocks of `filters[s]` channels; blocks are numbered
through all stages, so a model with `blocks_per_stage=(2, 2)` has `block1` … `block4`::

    input → block1 … (stage 1) → [stage2_down] → … (stage 2) → … → [final_bn → final_act]
          → global_pool → head_dense → head_act

Every stage after the first halves the resolution at its start (rounding up): with
`downsampling="maxpool"` or `"avgpool"` through a 2×2 pooling layer `stage{s}_down`; with
`"stride"` through stride 2 in the first block's `block{k}_conv` (and its projection);
`"none"` keeps the resolution. Convolutions use `"same"` padding. A residual block whose
shortcut changes channels or resolution gets a bias-free 1×1 `block{k}_proj` conv on the
shortcut, block 1 included when `filters[0]` differs from the input's channels, so no
separate stem is needed. The layers inside each block are listed in `zoo.builders._blocks`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import keras

from zoo.builders import _blocks
from zoo.builders import _checks

Downsampling = Literal["maxpool", "avgpool", "stride", "none"]
Pooling = Literal["avg", "max"]

_DOWNSAMPLING = ("maxpool", "avgpool", "stride", "none")
_POOLING = ("avg", "max")


def build_cnn(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    filters: int | Sequence[int] = (16, 32),
    blocks_per_stage: int | Sequence[int] = 1,
    kernel_size: int = 3,
    downsampling: Downsampling = "maxpool",
    pooling: Pooling = "avg",
    block: _checks.Block = "plain",
    activation: str = "relu",
    kernel_initializer: _checks.InitializerLike = "auto",
    dropout: float = 0.0,
    l2: float = 0.0,
    preactivation: bool = False,
    output_activation: str | None = "softmax",
    name: str | None = None,
) -> keras.Model:
    """Builds a classifier CNN from stages of conv blocks of one type.

    Args:
        input_shape: Shape of one image without the batch axis, `(height, width,
            channels)`, e.g. `(8, 8, 1)` for `zoo.datasets.load("digits", as_images=True)`.
        num_classes: Number of output units, >= 1.
        filters: Channels per stage: one int (a single stage) or a list, one entry per
            stage. Defaults to `(16, 32)`.
        blocks_per_stage: Conv blocks per stage: one int for every stage or a list with one
            entry per stage. Defaults to `1`.
        kernel_size: Side of the square conv kernels, >= 1. Defaults to `3`.
        downsampling: How each stage after the first halves the resolution: `"maxpool"`,
            `"avgpool"`, `"stride"` or `"none"`. Defaults to `"maxpool"`.
        pooling: The global pooling before the head, `"avg"` or `"max"`. Defaults to
            `"avg"`.
        block: `"plain"` (conv → activation), `"batchnorm"` (conv → BN → activation),
            `"residual"` or `"residual_bn"` (the same with an identity or projection
            shortcut added before the activation). Defaults to `"plain"`.
        activation: Hidden activation, any `keras.activations` name. Defaults to `"relu"`.
        kernel_initializer: `"auto"` (see `zoo.default_initializer`), any
            `keras.initializers` name, or an `Initializer` instance. Defaults to `"auto"`.
        dropout: Dropout rate after each block, in [0, 1). Defaults to `0.0`.
        l2: L2 penalty on every kernel, >= 0. Defaults to `0.0`.
        preactivation: For residual blocks only: BN → activation → conv → add (He et al.
            2016b) instead of conv → BN → add → activation. Defaults to `False`.
        output_activation: Activation of the head, any Keras name, or None for logits.
            Defaults to `"softmax"`.
        name: Model name. Defaults to `"cnn_{block}"`.

    Returns:
        An uncompiled `keras.Model` whose input layer is named `input`.

    Raises:
        ValueError: If `input_shape` is not `(height, width, channels)`; an entry of
            `filters` or `blocks_per_stage` is < 1 or their lengths differ; `kernel_size`
            < 1; `downsampling`, `pooling`, `block`, `activation`, `kernel_initializer` or
            `output_activation` is unknown; `preactivation=True` with a non-residual block;
            or `num_classes`, `dropout` or `l2` is out of range.

    Example:

    >>> model = build_cnn((8, 8, 1), 10, filters=(8, 16), block="residual")
    >>> [layer.name for layer in model.layers if layer.name.startswith("block2")]
    ['block2_conv', 'block2_proj', 'block2_add', 'block2_act']

    References:
        He et al. 2016, "Deep Residual Learning for Image Recognition".
    """
    input_shape = _checks.check_input_shape(input_shape, rank=3)
    stage_filters = _checks.check_int_list(filters, "filters")
    stage_blocks = _checks.check_int_list(
        blocks_per_stage, "blocks_per_stage", length=len(stage_filters), length_name="stages"
    )
    kernel_size = _checks.check_int(kernel_size, "kernel_size")
    downsampling = _checks.check_choice(downsampling, "downsampling", _DOWNSAMPLING)
    pooling = _checks.check_choice(pooling, "pooling", _POOLING)
    settings = _blocks.model_settings(
        family="cnn",
        num_classes=num_classes,
        block=block,
        activation=activation,
        kernel_initializer=kernel_initializer,
        dropout=dropout,
        l2=l2,
        preactivation=preactivation,
        output_activation=output_activation,
        name=name,
    )

    inputs = keras.Input(shape=input_shape, name="input")
    x = inputs
    channels = input_shape[-1]
    index = 0
    for stage, (stage_channels, num_blocks) in enumerate(zip(stage_filters, stage_blocks), 1):
        strides = 1
        if stage > 1 and downsampling in ("maxpool", "avgpool"):
            pool = keras.layers.MaxPooling2D if downsampling == "maxpool" else (
                keras.layers.AveragePooling2D
            )
            x = pool(2, padding="same", name=f"stage{stage}_down")(x)
        elif stage > 1 and downsampling == "stride":
            strides = 2
        for _ in range(num_blocks):
            index += 1
            needs_projection = stage_channels != channels or strides != 1
            x = _blocks.apply_block(
                x,
                index=index,
                settings=settings,
                make_layer=functools.partial(
                    keras.layers.Conv2D,
                    stage_channels,
                    kernel_size,
                    strides=strides,
                    padding="same",
                ),
                layer_suffix="conv",
                make_projection=(
                    functools.partial(keras.layers.Conv2D, stage_channels, 1, strides=strides)
                    if needs_projection
                    else None
                ),
            )
            channels, strides = stage_channels, 1
    global_pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else (
        keras.layers.GlobalMaxPooling2D
    )
    return _blocks.finish_model(inputs, x, settings, pooling=global_pool(name="global_pool"))
