"""Multilayer perceptrons with plain, residual and batch-norm blocks.

A model of depth `d` has exactly `d` hidden Dense layers, `block1_dense` … `block{d}_dense`,
then the head::

    input → [flatten] → block1 → … → block{d} → [final_bn → final_act] → head_dense → head_act

`flatten` is there when `input_shape` has more than one axis; `final_*` only for
`preactivation=True`. The layers inside each block are listed in `zoo.builders._blocks`.
A residual block whose width differs from its input's gets a bias-free Dense projection
`block{k}_proj` on the shortcut; this includes block 1 whenever `width[0]` differs from the
number of input features, so no separate stem is needed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import keras

from zoo.builders import _blocks
from zoo.builders import _checks


def build_mlp(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    depth: int | None = None,
    width: int | Sequence[int] = 32,
    block: _checks.Block = "plain",
    activation: str = "relu",
    kernel_initializer: _checks.InitializerLike = "auto",
    dropout: float = 0.0,
    l2: float = 0.0,
    preactivation: bool = False,
    output_activation: str | None = "softmax",
    name: str | None = None,
) -> keras.Model:
    """Builds a classifier MLP from `depth` blocks of one type.

    Args:
        input_shape: Shape of one example without the batch axis: `(features,)`, or an image
            shape such as `(8, 8, 1)`, which is flattened first.
        num_classes: Number of output units, >= 1.
        depth: Number of hidden blocks, >= 1 (one Dense layer each). Defaults to
            `len(width)` when `width` is a list, else to `4`.
        width: Units per block: one int for all blocks, or a list with one entry per block
            (a pyramid such as `[128, 64, 32]`). Defaults to `32`.
        block: `"plain"` (Dense → activation), `"batchnorm"` (Dense → BN → activation),
            `"residual"` or `"residual_bn"` (the same with an identity or projection
            shortcut added before the activation). Defaults to `"plain"`.
        activation: Hidden activation, any `keras.activations` name, e.g. `"sigmoid"`,
            `"tanh"`, `"relu"`, `"leaky_relu"`, `"elu"`, `"selu"`, `"gelu"`. Defaults to
            `"relu"`.
        kernel_initializer: `"auto"` (see `zoo.default_initializer`: He for the ReLU family,
            LeCun for SELU, Glorot otherwise; the head gets Glorot), any
            `keras.initializers` name, or an `Initializer` instance. Defaults to `"auto"`.
        dropout: Dropout rate after each block (on the residual branch for pre-activation
            blocks), in [0, 1). Defaults to `0.0` (no Dropout layers).
        l2: L2 penalty on every kernel, >= 0. Defaults to `0.0` (no regularizer).
        preactivation: For residual blocks only: BN → activation → Dense → add, with a
            clean identity path (He et al. 2016b), instead of the original post-activation
            Dense → BN → add → activation. Defaults to `False`.
        output_activation: Activation of the head, any Keras name, or None for logits.
            Defaults to `"softmax"`.
        name: Model name. Defaults to `"mlp_{block}"`.

    Returns:
        An uncompiled `keras.Model` whose input layer is named `input`.

    Raises:
        ValueError: If `depth` < 1, an entry of `width` is < 1, `width` is a list whose
            length differs from `depth`, `block`, `activation`, `kernel_initializer` or
            `output_activation` is unknown, `preactivation=True` with a non-residual
            block, or `input_shape`, `num_classes`, `dropout` or `l2` is out of range.

    Example:

    >>> model = build_mlp((64,), 10, depth=3, width=[64, 32, 16], block="residual_bn")
    >>> [layer.name for layer in model.layers[:6]]
    ['input', 'block1_dense', 'block1_bn', 'block1_add', 'block1_act', 'block2_dense']

    References:
        He et al. 2016, "Deep Residual Learning for Image Recognition".
        He et al. 2016, "Identity Mappings in Deep Residual Networks".
    """
    input_shape = _checks.check_input_shape(input_shape)
    if depth is None:
        depth = len(width) if isinstance(width, Sequence) and width else 4
    depth = _checks.check_int(depth, "depth")
    widths = _checks.check_int_list(width, "width", length=depth)
    settings = _blocks.model_settings(
        family="mlp",
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
    if len(input_shape) > 1:
        x = keras.layers.Flatten(name="flatten")(x)
    features = math.prod(input_shape)
    for index, units in enumerate(widths, start=1):
        x = _blocks.apply_block(
            x,
            index=index,
            settings=settings,
            make_layer=functools.partial(keras.layers.Dense, units),
            layer_suffix="dense",
            make_projection=(
                functools.partial(keras.layers.Dense, units) if units != features else None
            ),
        )
        features = units
    return _blocks.finish_model(inputs, x, settings)
