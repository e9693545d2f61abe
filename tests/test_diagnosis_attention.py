"""No false "stalled" on attention at initialization; stalled layers still are."""

import keras
import numpy as np
import pytest

import kgrad
from kgrad.diagnosis.activations import attention_score_layers, network_context
from kgrad.capture.variables import walk_layers
from kgrad.diagnosis.fixes import NetworkContext
from kgrad.diagnosis.stalled import STALLED_FACTOR, detect_stalled

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")


def _transformer_block(dead_branch=False):
    """A fresh transformer block: embedding dim 16, 2 heads, sequence 8."""
    tokens = keras.Input((8,), dtype="int32")
    x = keras.layers.Embedding(50, 16, name="embedding")(tokens)
    attended = keras.layers.MultiHeadAttention(2, 8, name="mha")(x, x)
    x = keras.layers.LayerNormalization()(keras.layers.Add()([x, attended]))
    hidden = keras.layers.Dense(32, activation="relu", name="ffn_hidden")(x)
    merged = [x, keras.layers.Dense(16, name="ffn_out")(hidden)]
    if dead_branch:
        # Every input of this ReLU is negative: no gradient reaches the layer,
        # while the rest of the block gets its gradient past it.
        dead = keras.layers.Dense(
            16,
            activation="relu",
            bias_initializer=keras.initializers.Constant(-100.0),
            name="dead",
        )(x)
        merged.append(keras.layers.Dense(16, name="after_dead")(dead))
    x = keras.layers.LayerNormalization()(keras.layers.Add()(merged))
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(tokens, keras.layers.Dense(4, name="head")(x))


def _tokens(seed=0):
    return np.random.default_rng(seed).integers(0, 50, (256, 8))


@pytest.mark.parametrize("seed", [0, 1])
def test_fresh_attention_is_not_stalled(seed):
    keras.utils.set_random_seed(seed)
    model = _transformer_block()
    report = kgrad.diagnose(model, _tokens(seed))
    ratios = report.layers.set_index("layer")["grad_to_weight"]
    median = ratios.drop(["mha/query", "mha/key"]).median()
    # The query and key gradients are far below the rest, by construction ...
    assert ratios["mha/query"] < STALLED_FACTOR * median
    assert ratios["mha/key"] < STALLED_FACTOR * median
    # ... and that is not called stalled.
    assert "stalled" not in report.kinds
    assert network_context(model).attention_scores == {"mha/query", "mha/key"}


def test_a_really_stalled_layer_next_to_attention_is_still_flagged():
    model = _transformer_block(dead_branch=True)
    report = kgrad.diagnose(model, _tokens())
    (stalled,) = report.by_kind("stalled")
    assert stalled.layers == ["dead"]
    assert stalled.evidence["ratio"]["dead"] == 0.0


def test_attention_scores_are_found_in_nested_models():
    inner = _transformer_block()
    tokens = keras.Input((8,), dtype="int32")
    outer = keras.Model(tokens, inner(tokens))
    assert attention_score_layers(walk_layers(outer)) == [
        f"{inner.name}/mha/query",
        f"{inner.name}/mha/key",
    ]


def test_attention_scores_are_judged_by_their_own_movement():
    context = NetworkContext(attention_scores={"mha/query", "mha/key"})
    ratios = {
        "embedding": 1e-3,
        "mha/query": 1e-8,  # second order small, yet moving
        "mha/key": 1e-9,
        "mha/value": 2e-3,
        "ffn": 1e-3,
    }
    assert detect_stalled(ratios, context=context) is None
    # Without the context they would be flagged against the other layers.
    assert detect_stalled(ratios).layers == ["mha/query", "mha/key"]
    # Weights that did not move at all (learning rate 0) are stalled all the same.
    frozen = detect_stalled({**ratios, "mha/query": 0.0}, context=context)
    assert frozen.layers == ["mha/query"]
    # An ordinary layer as slow as the query is flagged.
    slow = detect_stalled({**ratios, "ffn": 1e-8}, context=context)
    assert slow.layers == ["ffn"]
    # The median is that of the layers compared: tiny query/key ratios do not
    # drag it down.
    assert slow.evidence["median_ratio"] == pytest.approx(1e-3)


def test_the_monitor_does_not_call_slow_attention_scores_stalled():
    # Plain SGD: the query and key updates are as small as their gradients.
    model = _transformer_block()
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _tokens(), np.random.default_rng(1).integers(0, 4, 256)
    monitor = kgrad.GradientHealthMonitor(
        probe_data=x[:128], probe_every_n_steps=4, max_judge_share=None
    )
    model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[monitor])
    ratios = monitor.unit_health.update_ratios
    others = [v for k, v in ratios.items() if k not in ("mha/query", "mha/key")]
    assert ratios["mha/key"] < STALLED_FACTOR * np.median(others)
    assert "stalled" not in {finding.kind for finding in monitor.findings}
