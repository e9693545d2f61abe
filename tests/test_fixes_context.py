"""Fixes that know the model: nothing is suggested that the model already has."""

import keras
import numpy as np
import pytest

import kgrad
from kgrad.diagnosis import fixes
from kgrad.diagnosis.activations import has_skip_connection, network_context
from kgrad.diagnosis.fixes import fixes_for

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")


def _mlp(block=None, initializer="glorot_uniform", depth=4, width=8):
    """A ReLU MLP; `block(x, i)` may wrap each hidden layer (skip, normalization)."""
    inputs = keras.Input((8,))
    x = inputs
    for i in range(depth):
        dense = keras.layers.Dense(
            width, activation="relu", kernel_initializer=initializer, name=f"d{i}"
        )
        x = dense(x) if block is None else block(x, dense, i)
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(x))


def _fixes(model, kind="vanishing"):
    context = network_context(model)
    layers = [f"d{i}" for i in range(4)] + ["out"]
    return fixes_for(kind, layers, context)


def _residual(x, dense, i):
    return keras.layers.Add(name=f"add{i}")([x, dense(x)])


def _residual_operator(x, dense, i):
    return x + dense(x)


def _dense_net(x, dense, i):
    return keras.layers.Concatenate()([x, dense(x)])


def _parallel_branches(x, dense, i):
    # An Add of two branches, neither the block's input: no path of gain 1.
    other = keras.layers.Dense(8, name=f"branch{i}")(x)
    return keras.layers.Add()([dense(x), other])


@pytest.mark.parametrize(
    "block, has_skip",
    [
        (None, False),
        (_residual, True),
        (_residual_operator, True),
        (_dense_net, True),
        (_parallel_branches, False),
    ],
)
def test_skip_connections_are_suggested_only_where_missing(block, has_skip):
    model = _mlp(block)
    assert has_skip_connection(model) == has_skip
    for kind in ("vanishing", "stalled"):
        assert (fixes.FIX_RESIDUAL in _fixes(model, kind)) == (not has_skip)


def test_a_skip_inside_a_nested_or_subclassed_model_counts():
    inner = _mlp(_residual)
    inputs = keras.Input((8,))
    outer = keras.Model(inputs, keras.layers.Dense(1)(inner(inputs)))
    assert has_skip_connection(outer)

    class Residual(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(8, activation="relu")
            self.add = keras.layers.Add()
            self.head = keras.layers.Dense(1)

        def call(self, x):
            return self.head(self.add([x, self.dense(x)]))

    subclassed = Residual()
    subclassed(np.zeros((2, 8), "float32"))
    assert has_skip_connection(subclassed)
    assert fixes.FIX_RESIDUAL not in fixes_for(
        "vanishing", [], network_context(subclassed)
    )


def _normalized(kind):
    def block(x, dense, i):
        x = dense(x)
        if kind == "batch":
            return keras.layers.BatchNormalization()(x)
        if kind == "layer":
            return keras.layers.LayerNormalization()(x)
        return keras.layers.GroupNormalization(groups=2)(x)

    return block


@pytest.mark.parametrize("kind", ["batch", "layer", "group"])
def test_batch_norm_is_not_suggested_to_a_normalized_model(kind):
    plain, normalized = _mlp(), _mlp(_normalized(kind))
    for finding in ("vanishing", "exploding", "saturation", "stalled"):
        assert fixes.FIX_BATCH_NORM in _fixes(plain, finding)
        assert fixes.FIX_BATCH_NORM not in _fixes(normalized, finding)


def test_input_normalization_is_not_batch_norm():
    inputs = keras.Input((8,))
    standardize = keras.layers.Normalization()
    standardize.adapt(np.random.default_rng(0).standard_normal((32, 8)))
    x = keras.layers.Dense(8, activation="relu", name="d0")(standardize(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(x))
    assert fixes.FIX_BATCH_NORM in _fixes(model)


@pytest.mark.parametrize(
    "initializer, is_he",
    [
        ("glorot_uniform", False),
        ("he_normal", True),
        ("he_uniform", True),
        (keras.initializers.VarianceScaling(2.0, "fan_in", "truncated_normal"), True),
        (keras.initializers.VarianceScaling(1.0, "fan_in"), False),  # LeCun
    ],
)
def test_he_init_is_suggested_only_where_missing(initializer, is_he):
    model = _mlp(initializer=initializer)
    for kind in ("vanishing", "dead_units"):
        assert (fixes.FIX_RELU_HE in _fixes(model, kind)) == (not is_he)


def test_he_is_judged_on_the_relu_layers_not_the_linear_output():
    # The linear output layer keeps Glorot init: that is no reason to suggest He.
    model = _mlp(initializer="he_normal")
    context = network_context(model)
    assert context.initializers["out"] == "GlorotUniform"
    assert fixes.FIX_RELU_HE not in fixes_for("vanishing", [], context)
    mixed = network_context(_mlp(initializer="he_normal"))
    mixed.he_initialized.discard("d2")
    mixed.initializers["d2"] = "GlorotUniform"
    assert fixes.FIX_RELU_HE in fixes_for("vanishing", [], mixed)


def test_diagnose_of_a_deep_sigmoid_net_suggests_what_it_lacks_only():
    def sigmoid_net(block):
        inputs = keras.Input((16,))
        x = keras.layers.Dense(32, activation="sigmoid")(inputs)
        for _ in range(10):
            x = block(x)
        return keras.Model(inputs, keras.layers.Dense(1)(x))

    x = np.random.default_rng(0).standard_normal((256, 16)).astype("float32")
    plain = kgrad.diagnose(
        sigmoid_net(lambda x: keras.layers.Dense(32, activation="sigmoid")(x)), x
    )
    (vanishing,) = plain.by_kind("vanishing")
    assert fixes.FIX_RESIDUAL in vanishing.fixes
    assert fixes.FIX_BATCH_NORM in vanishing.fixes
    normalized = kgrad.diagnose(
        sigmoid_net(
            lambda x: keras.layers.Activation("sigmoid")(
                keras.layers.LayerNormalization()(keras.layers.Dense(32)(x))
            )
        ),
        x,
    )
    # Layer norm does not lift sigmoid's σ′ ≤ 1/4: it still vanishes, and the fixes
    # are the ones it lacks.
    (vanishing,) = normalized.by_kind("vanishing")
    assert fixes.FIX_BATCH_NORM not in vanishing.fixes
    assert fixes.FIX_RESIDUAL in vanishing.fixes
    assert vanishing.fixes[0] == fixes.FIX_REPLACE_SIGMOID


@pytest.mark.parametrize("initializer, is_he", [("glorot_uniform", False), ("he_normal", True)])
def test_exploding_advice_names_he_only_where_it_is_missing(initializer, is_he):
    first = _fixes(_mlp(initializer=initializer), "exploding")[0]
    assert ("`he_normal`" in first) == (not is_he)
    assert ("already start at He's scale" in first) == is_he
