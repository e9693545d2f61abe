"""Tests for `zoo.build_mlp` and `zoo.build_cnn`.

`expected_param_counts` is the closed-form parameter count of a zoo model, written from the
documented block structure rather than from the builders; `test_zoo_registry.py` reuses it.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import keras
import numpy as np
import pytest

import zoo

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

# --- closed-form parameter counts -------------------------------------------------------


def _block_params(
    fan_in: int, units: int, kernel_area: int, block: str, preactivation: bool
) -> tuple[int, int]:
    """Returns (trainable, non-trainable) parameters of one block.

    Dense/conv: kernel_area * fan_in * units weights, plus `units` biases unless batch norm
    follows. BN: gamma and beta trainable, moving mean and variance not, over the block's
    input (pre-activation) or output (post-activation). A residual block adds a bias-free
    1x1 projection when the width changes.
    """
    batchnorm = block in ("batchnorm", "residual_bn")
    residual = block in ("residual", "residual_bn")
    trainable = kernel_area * fan_in * units + (0 if batchnorm else units)
    non_trainable = 0
    if batchnorm:
        normalized = fan_in if preactivation else units
        trainable += 2 * normalized
        non_trainable += 2 * normalized
    if residual and fan_in != units:
        trainable += fan_in * units
    return trainable, non_trainable


def _mlp_counts(args: dict[str, Any]) -> tuple[int, int]:
    fan_in = math.prod(args["input_shape"])
    width = args["width"]
    widths = list(width) if isinstance(width, (list, tuple)) else [width] * args["depth"]
    trainable = non_trainable = 0
    for units in widths:
        t, n = _block_params(fan_in, units, 1, args["block"], args["preactivation"])
        trainable, non_trainable, fan_in = trainable + t, non_trainable + n, units
    return _add_final_and_head(trainable, non_trainable, fan_in, args)


def _cnn_counts(args: dict[str, Any]) -> tuple[int, int]:
    channels = args["input_shape"][-1]
    filters = args["filters"]
    filters = list(filters) if isinstance(filters, (list, tuple)) else [filters]
    blocks = args["blocks_per_stage"]
    blocks = list(blocks) if isinstance(blocks, (list, tuple)) else [blocks] * len(filters)
    stride_projection = args["downsampling"] == "stride"
    trainable = non_trainable = 0
    for stage, (units, num_blocks) in enumerate(zip(filters, blocks)):
        for position in range(num_blocks):
            t, n = _block_params(
                channels, units, args["kernel_size"] ** 2, args["block"], args["preactivation"]
            )
            if (
                stride_projection
                and stage > 0
                and position == 0
                and channels == units
                and args["block"] in ("residual", "residual_bn")
            ):
                t += channels * units  # the stride alone forces a projection
            trainable, non_trainable, channels = trainable + t, non_trainable + n, units
    return _add_final_and_head(trainable, non_trainable, channels, args)


def _add_final_and_head(
    trainable: int, non_trainable: int, features: int, args: dict[str, Any]
) -> tuple[int, int]:
    if args["preactivation"] and args["block"] == "residual_bn":
        trainable, non_trainable = trainable + 2 * features, non_trainable + 2 * features
    return trainable + features * args["num_classes"] + args["num_classes"], non_trainable


def _with_defaults(builder: Any, args: dict[str, Any]) -> dict[str, Any]:
    defaults = {
        key: parameter.default
        for key, parameter in inspect.signature(builder).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    return {**defaults, **args}


def expected_param_counts(builder: Any, args: dict[str, Any]) -> tuple[int, int]:
    """Returns (trainable, non-trainable) parameter counts of `builder(**args)`."""
    args = _with_defaults(builder, args)
    if builder is zoo.build_mlp:
        if args["depth"] is None:
            args["depth"] = len(args["width"]) if isinstance(args["width"], list) else 4
        return _mlp_counts(args)
    if builder is zoo.build_cnn:
        return _cnn_counts(args)
    raise AssertionError(f"No parameter formula for {builder!r}")


def param_counts(model: keras.Model) -> tuple[int, int]:
    """Returns (trainable, non-trainable) parameter counts of a built model."""
    return (
        sum(int(np.prod(weight.shape)) for weight in model.trainable_weights),
        sum(int(np.prod(weight.shape)) for weight in model.non_trainable_weights),
    )


def test_formula_matches_a_hand_count():
    # 64 -> 32 (residual_bn: kernel 2048, BN 4*32, projection 2048) -> head 32*10+10.
    trainable, non_trainable = expected_param_counts(
        zoo.build_mlp,
        dict(input_shape=(64,), num_classes=10, depth=1, width=32, block="residual_bn"),
    )
    assert (trainable, non_trainable) == (2048 + 64 + 2048 + 330, 64)


# --- structure --------------------------------------------------------------------------


def _layer_types(model: keras.Model) -> set[type]:
    return {type(layer) for layer in model.layers}


# Each test costs conftest's clear_session, so the cheap axes of a grid are looped over
# inside one test and the block type, the axis that fails together, is parametrized.


@pytest.mark.parametrize("block", zoo.BLOCKS)
def test_mlp_depth_block_grid(block):
    for depth, preactivation in [(1, False), (2, False), (4, False), (3, True)]:
        if preactivation and block not in ("residual", "residual_bn"):
            continue
        # A pyramid whose first width differs from the input forces block 1's projection.
        width = [16 - 2 * k for k in range(depth)]
        args = dict(
            input_shape=(12,),
            num_classes=3,
            depth=depth,
            width=width,
            block=block,
            preactivation=preactivation,
        )
        model = zoo.build_mlp(**args)

        names = [layer.name for layer in model.layers]
        assert [n for n in names if n.endswith("_dense")] == [
            f"block{k}_dense" for k in range(1, depth + 1)
        ] + ["head_dense"], args
        assert names[0] == "input" and names[-1] == "head_act"
        assert param_counts(model) == expected_param_counts(zoo.build_mlp, args), args
        assert model.output_shape == (None, 3)


@pytest.mark.parametrize("block", zoo.BLOCKS)
def test_cnn_stage_block_grid(block):
    for blocks_per_stage in (1, 2):
        for downsampling in ("maxpool", "stride"):
            args = dict(
                input_shape=(8, 8, 2),
                num_classes=4,
                filters=(4, 4),  # equal widths: only the stride can force a projection
                blocks_per_stage=blocks_per_stage,
                block=block,
                downsampling=downsampling,
            )
            model = zoo.build_cnn(**args)

            names = [layer.name for layer in model.layers]
            assert [n for n in names if n.endswith("_conv")] == [
                f"block{k}_conv" for k in range(1, 2 * blocks_per_stage + 1)
            ], args
            assert param_counts(model) == expected_param_counts(zoo.build_cnn, args), args
            stage2_first = model.get_layer(f"block{blocks_per_stage + 1}_conv")
            assert stage2_first.output.shape[1:3] == (4, 4), args
            assert ("stage2_down" in names) == (downsampling == "maxpool"), args
            assert names[-3:] == ["global_pool", "head_dense", "head_act"]


@pytest.mark.parametrize("block", zoo.BLOCKS)
def test_block_types_contain_the_right_layers(block):
    mlp = zoo.build_mlp((6,), 2, depth=2, width=4, block=block)
    cnn = zoo.build_cnn((6, 6, 1), 2, filters=4, block=block)
    for model in (mlp, cnn):
        types = _layer_types(model)
        has_bn = keras.layers.BatchNormalization in types
        has_add = keras.layers.Add in types
        assert has_bn == (block in ("batchnorm", "residual_bn")), model.name
        assert has_add == (block in ("residual", "residual_bn")), model.name
        names = {layer.name for layer in model.layers}
        assert ("block1_bn" in names) == has_bn
        assert ("block1_add" in names) == has_add
        assert "block1_act" in names


def test_residual_block_adds_the_identity_shortcut():
    model = zoo.build_mlp((5,), 2, depth=2, width=5, block="residual")
    block2 = model.get_layer("block2_dense")
    block2.set_weights([np.zeros_like(w) for w in block2.get_weights()])
    probe = keras.Model(
        model.input, [model.get_layer("block1_act").output, model.get_layer("block2_act").output]
    )
    x = np.random.default_rng(0).normal(size=(3, 5)).astype("float32")
    block1_out, block2_out = probe.predict(x, verbose=0)
    # With a zero branch the block is relu(0 + x) = x, since x is already a ReLU output.
    np.testing.assert_allclose(block2_out, block1_out, rtol=1e-6)
    assert "block1_proj" not in {layer.name for layer in model.layers}


def test_image_input_to_mlp_is_flattened():
    model = zoo.build_mlp((8, 8, 1), 10, depth=1, width=8)
    assert model.layers[1].name == "flatten"
    assert model.get_layer("block1_dense").kernel.shape == (64, 8)


def test_preactivation_adds_final_norm_and_activation():
    model = zoo.build_mlp((6,), 2, depth=2, width=4, block="residual_bn", preactivation=True)
    names = [layer.name for layer in model.layers]
    assert names[1:4] == ["block1_bn", "block1_act", "block1_dense"]
    assert names[-4:] == ["final_bn", "final_act", "head_dense", "head_act"]


def test_dropout_and_l2_are_applied_to_every_block():
    model = zoo.build_mlp(
        (6,), 2, depth=3, width=[4, 4, 2], block="residual", dropout=0.25, l2=1e-3
    )
    dropouts = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert [layer.name for layer in dropouts] == [f"block{k}_dropout" for k in (1, 2, 3)]
    assert all(layer.rate == 0.25 for layer in dropouts)
    kernels = [layer for layer in model.layers if hasattr(layer, "kernel_regularizer")]
    assert {layer.name for layer in kernels} >= {"block1_proj", "block3_proj", "head_dense"}
    assert all(layer.kernel_regularizer.l2 == pytest.approx(1e-3) for layer in kernels)
    assert len(model.losses) == len(kernels)


def test_output_is_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = zoo.build_mlp((6,), 3, depth=1, width=4, output_activation=None)
    assert model.get_layer("block1_dense").compute_dtype == "float16"
    assert model.output.dtype == "float32"


def test_default_names_follow_the_block():
    assert zoo.build_mlp((4,), 2, depth=1, block="residual_bn").name == "mlp_residual_bn"
    assert zoo.build_cnn((4, 4, 1), 2, filters=2).name == "cnn_plain"
    assert zoo.build_mlp((4,), 2, depth=1, name="mine").name == "mine"


# --- activations and initializers -------------------------------------------------------

AUTO_INITIALIZERS = [
    ("relu", keras.initializers.HeNormal),
    ("leaky_relu", keras.initializers.HeNormal),
    ("elu", keras.initializers.HeNormal),
    ("gelu", keras.initializers.HeNormal),
    ("sigmoid", keras.initializers.GlorotUniform),
    ("tanh", keras.initializers.GlorotUniform),
    ("selu", keras.initializers.LecunNormal),
]


def test_auto_initializer_matches_activation():
    for activation, initializer_class in AUTO_INITIALIZERS:
        model = zoo.build_mlp(
            (6,), 2, depth=2, width=[4, 3], block="residual", activation=activation
        )
        for name in ["block1_dense", "block1_proj", "block2_dense", "block2_proj"]:
            initializer = model.get_layer(name).kernel_initializer
            assert type(initializer) is initializer_class, (activation, name)
        head_initializer = model.get_layer("head_dense").kernel_initializer
        assert type(head_initializer) is keras.initializers.GlorotUniform
        assert model.get_layer("block2_act").get_config()["activation"] == activation


def test_default_initializer_table():
    assert zoo.default_initializer("relu") == "he_normal"
    assert zoo.default_initializer("sigmoid") == "glorot_uniform"
    assert zoo.default_initializer("selu") == "lecun_normal"
    assert zoo.default_initializer("softplus") == "glorot_uniform"


def test_explicit_initializer_is_used_everywhere():
    model = zoo.build_cnn(
        (6, 6, 1), 2, filters=(2, 4), block="residual", kernel_initializer="orthogonal"
    )
    kernels = [layer for layer in model.layers if hasattr(layer, "kernel_initializer")]
    assert len(kernels) == 5  # 2 convs, 2 projections, head
    for layer in kernels:
        assert isinstance(layer.kernel_initializer, keras.initializers.Orthogonal), layer.name


def test_initializer_instance_is_copied_per_layer():
    initializer = keras.initializers.VarianceScaling(scale=3.0, mode="fan_in")
    model = zoo.build_mlp((6,), 2, depth=2, width=4, kernel_initializer=initializer)
    used = [model.get_layer(name).kernel_initializer for name in ("block1_dense", "block2_dense")]
    assert used[0] is not used[1] and used[0] is not initializer
    assert all(init.scale == 3.0 for init in used)


def test_every_common_activation_round_trips_in_safe_mode(tmp_path):
    x = np.random.default_rng(1).normal(size=(4, 5)).astype("float32")
    for activation in ["sigmoid", "tanh", "leaky_relu", "elu", "selu", "gelu", "swish"]:
        model = zoo.build_mlp((5,), 3, depth=1, width=4, activation=activation)
        path = tmp_path / f"{activation}.keras"
        model.save(path)
        restored = keras.models.load_model(path, safe_mode=True)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(restored(x)), keras.ops.convert_to_numpy(model(x)),
            rtol=1e-6, err_msg=activation
        )


# --- bad input --------------------------------------------------------------------------

BAD_MLP_ARGS = [
    (dict(depth=0), r"`depth` must be an integer >= 1\. Received: depth=0"),
    (dict(depth=2.0), r"`depth` must be an integer >= 1\. Received: depth=2\.0"),
    (dict(width=0), r"`width` must be a positive integer.*Received: width=0"),
    (dict(width=[4, 0]), r"`width`.*Received: width=\[4, 0\]"),
    (dict(depth=3, width=[8, 4]), r"`width` must have one entry per block \(depth=3\).*depth=2"),
    (
        dict(block="dense"),
        r"`block` must be one of 'plain', 'residual', 'batchnorm', 'residual_bn'\. "
        r"Received: block='dense'",
    ),
    (
        dict(activation="relux"),
        r"`activation` must be the name of a Keras activation.*'leaky_relu'.*keras\."
        r"activations\.get.*Received: activation='relux'",
    ),
    (
        dict(kernel_initializer="he_nromal"),
        r"`kernel_initializer` must be 'auto', a `keras\.initializers` name.*Received: "
        r"kernel_initializer='he_nromal'",
    ),
    (dict(dropout=1.0), r"`dropout` must be a float in \[0, 1\)\. Received: dropout=1\.0"),
    (dict(l2=-0.1), r"`l2` must be a float >= 0\. Received: l2=-0\.1"),
    (dict(num_classes=0), r"`num_classes` must be an integer >= 1\. Received: num_classes=0"),
    (dict(num_classes=1), r"num_classes=1 use output_activation='sigmoid' or None"),
    (
        dict(output_activation="softmx"),
        r"`output_activation` must be the name of a Keras activation",
    ),
    (
        dict(preactivation=True),
        r"`preactivation=True` applies only to residual blocks.*block='plain'",
    ),
    (
        dict(input_shape=(0,)),
        r"`input_shape` must be a tuple of positive integers.*Received: "
        r"input_shape=\(0,\)",
    ),
    (dict(name=""), r"`name` must be a non-empty string or None"),
]


def _assert_rejects(builder: Any, base_args: dict[str, Any], table: list) -> None:
    for overrides, message in table:
        with pytest.raises(ValueError, match=message):
            builder(**{**base_args, **overrides})


def test_mlp_rejects_bad_arguments():
    _assert_rejects(zoo.build_mlp, dict(input_shape=(4,), num_classes=2, depth=2), BAD_MLP_ARGS)


BAD_CNN_ARGS = [
    (
        dict(input_shape=(64,)),
        r"`input_shape` must be a tuple of positive integers of rank 3 .*\(height, "
        r"width, channels\)\. Received: input_shape=\(64,\)",
    ),
    (dict(input_shape=(8, 8)), r"rank 3.*Received: input_shape=\(8, 8\)"),
    (
        dict(filters=(4, 8), blocks_per_stage=(1, 1, 1)),
        r"`blocks_per_stage` must have one entry per block \(stages=2\)",
    ),
    (dict(filters=[]), r"`filters` must be a positive integer or a non-empty list"),
    (dict(kernel_size=0), r"`kernel_size` must be an integer >= 1\. Received: kernel_size=0"),
    (
        dict(downsampling="conv"),
        r"`downsampling` must be one of 'maxpool', 'avgpool', 'stride', 'none'\. "
        r"Received: downsampling='conv'",
    ),
    (dict(pooling="sum"), r"`pooling` must be one of 'avg', 'max'"),
    (dict(block="bn"), r"`block` must be one of .*Received: block='bn'"),
]


def test_cnn_rejects_bad_arguments():
    _assert_rejects(zoo.build_cnn, dict(input_shape=(8, 8, 1), num_classes=2), BAD_CNN_ARGS)


def test_default_initializer_rejects_unknown_activation():
    with pytest.raises(ValueError, match=r"Received: activation='rel'"):
        zoo.default_initializer("rel")
