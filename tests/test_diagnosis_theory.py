"""`diagnose` held against signal-propagation theory at initialization.

Mean field (REFERENCES.md; Schoenholz et al. 2017): with σ_w² = fan_in·Var[W], zero
biases and z ~ N(0, 1), the pre-activation variance follows q_{l+1} = σ_w²·E[φ(√q_l z)²]
and the backpropagated signal changes by √χ_l per layer, χ_l = σ_w²·E[φ′(√q_l z)²].
The expectations are computed here by Gauss–Hermite quadrature, not copied as
constants.
"""

import math

import keras
import numpy as np
import pytest

import kgrad
from kgrad.diagnosis import fixes

# Theory does not depend on the backend: each one's autodiff must land on it.
pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

WIDTH, DEPTH, EXAMPLES = 128, 20, 256
SEEDS = (0, 1, 2)
NODES, WEIGHTS = np.polynomial.hermite_e.hermegauss(120)
WEIGHTS = WEIGHTS / math.sqrt(2 * math.pi)  # expectations over N(0, 1)


def gaussian_mean(function, variance):
    return float(np.sum(WEIGHTS * function(math.sqrt(variance) * NODES)))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def mean_field_ratio(activation, derivative, sigma_w2=1.0, q_input=1.0, depth=DEPTH):
    """Geometric-mean ratio per layer of ‖∂L/∂a_l‖ across `depth` identical layers."""
    q = sigma_w2 * q_input  # the first layer's pre-activation variance
    log_gain = 0.0
    for layer in range(depth):
        chi = sigma_w2 * gaussian_mean(lambda h: derivative(h) ** 2, q)
        if layer > 0:  # the gap from layer l-1's output to layer l's
            log_gain += 0.5 * math.log(chi)
        q = sigma_w2 * gaussian_mean(lambda h: activation(h) ** 2, q)
    return math.exp(log_gain / (depth - 1))


def mlp(activation, initializer, depth=DEPTH, batch_norm=False, bias=None):
    layers = [keras.Input((WIDTH,))]
    for _ in range(depth):
        if batch_norm:
            layers += [
                keras.layers.Dense(WIDTH, kernel_initializer=initializer),
                keras.layers.BatchNormalization(),
                keras.layers.Activation(activation),
            ]
        else:
            layers.append(
                keras.layers.Dense(
                    WIDTH, activation=activation, kernel_initializer=initializer
                )
            )
    return keras.Sequential(layers)


def reports(activation, initializer, **kwargs):
    out = []
    for seed in SEEDS:
        keras.utils.set_random_seed(seed)
        model = mlp(activation, initializer, **kwargs)
        x = (
            np.random.default_rng(seed)
            .standard_normal((EXAMPLES, WIDTH))
            .astype("float32")
        )
        out.append(kgrad.diagnose(model, x, seed=seed))
    return out


def median(values):
    return float(np.median(values))


def test_sigmoid_glorot_vanishes_at_the_mean_field_rate():
    found = reports("sigmoid", "glorot_uniform")
    # Glorot on square layers: Var[W] = 2/(n+n) = 1/n, so σ_w² = 1.
    theory = mean_field_ratio(sigmoid, lambda h: sigmoid(h) * (1 - sigmoid(h)))
    assert theory == pytest.approx(0.236, abs=0.002)  # REFERENCES.md, trap 1
    measured = median([report.decay for report in found])
    # Finite width (Hanin 2018) moves the log-norm of the signal by about
    # sqrt(depth/width) ≈ 0.4 over the whole depth, i.e. ~2% on the per-layer ratio
    # of one seed; the median of three is well inside 2%, which also rules out the
    # rule of thumb σ_w/4 = 0.25 (6% away).
    assert measured == pytest.approx(theory, rel=0.02)
    for report in found:
        assert report.profile_kind == "activation"
        vanishing = report.by_kind("vanishing")
        assert len(vanishing) == 1 and vanishing[0].severity == "critical"
        # σ′ ≤ 1/4 is the cause, not saturation (trap 3): almost nothing saturates.
        assert report.layers["saturated_fraction"].max() < 0.01
        assert "saturation" not in report.kinds
        # The fix fits the evidence: replace sigmoid; never He init for sigmoid.
        advice = " ".join(vanishing[0].fixes)
        assert vanishing[0].fixes[0] == fixes.FIX_REPLACE_SIGMOID
        assert "he_normal" not in advice and "He init" not in advice


def test_tanh_glorot_is_healthy_and_near_theory():
    found = reports("tanh", "glorot_uniform")
    theory = mean_field_ratio(np.tanh, lambda h: 1 - np.tanh(h) ** 2)
    assert 0.9 < theory < 1.0  # q shrinks with depth, so χ creeps up towards 1
    assert median([r.decay for r in found]) == pytest.approx(theory, rel=0.02)
    for report in found:
        assert report.findings == [], [f.summary() for f in report.findings]


def test_relu_he_is_healthy_although_deep_units_are_silent_at_init():
    found = reports("relu", "he_normal")
    # ReLU with He init: χ = 2 · E[1{h>0}] = 1 exactly.
    assert median([r.decay for r in found]) == pytest.approx(1.0, abs=0.05)
    for report in found:
        assert report.findings == [], [f.summary() for f in report.findings]
    # Trap 3: the inputs of deep layers are correlated, so some units are silent for
    # every probe example; the null model explains them and no death is reported.
    silent = sum(int(r.units["dead_units"].sum()) for r in found)
    expected = sum(
        float((r.units["null_silent_fraction"] * r.units["units"]).sum()) for r in found
    )
    assert silent > 50
    assert silent == pytest.approx(expected, rel=0.3)


def test_relu_glorot_vanishes_and_the_fix_is_he_init():
    found = reports("relu", "glorot_uniform")
    # ReLU: χ = σ_w²/2, so 1/√2 per layer with Glorot (trap 2).
    assert median([r.decay for r in found]) == pytest.approx(1 / math.sqrt(2), rel=0.05)
    for report in found:
        (vanishing,) = report.by_kind("vanishing")
        assert vanishing.fixes[0] == fixes.FIX_RELU_HE


def test_batch_norm_relu_grows_gently_and_is_not_exploding():
    found = reports("relu", "glorot_uniform", batch_norm=True)
    # Yang et al. 2019: sqrt(pi / (pi - 1)) ≈ 1.21 per layer towards the input, in the
    # limit of infinite width and batch; a batch of 256 lands a few percent below.
    theory = math.sqrt(math.pi / (math.pi - 1))
    assert median([r.decay for r in found]) == pytest.approx(theory, rel=0.06)
    for report in found:
        assert "exploding" not in report.kinds
        assert report.findings == [], [f.summary() for f in report.findings]


def test_tanh_with_unit_normal_weights_explodes_and_saturates():
    found = reports("tanh", keras.initializers.RandomNormal(stddev=1.0))
    sigma_w2 = float(WIDTH)  # fan_in · Var[W] = 128 · 1
    q = 1.0
    for _ in range(DEPTH):  # the forward recursion settles within a layer or two
        q = sigma_w2 * gaussian_mean(lambda h: np.tanh(h) ** 2, q)
    # tanh′ < 0.01 where |h| > 2.993, with h ~ N(0, q).
    expected_saturated = math.erfc(2.993 / math.sqrt(2 * q))
    for report in found:
        (exploding,) = report.by_kind("exploding")
        assert exploding.evidence["per_layer_ratio"] > 2.0
        assert exploding.evidence["max_weight_scale"] == pytest.approx(
            sigma_w2, rel=0.05
        )
        assert "glorot_uniform" in exploding.fixes[0]
        (saturation,) = report.by_kind("saturation")
        deep = report.layers["saturated_fraction"].iloc[5:]
        assert deep.median() == pytest.approx(expected_saturated, abs=0.02)
        assert saturation.severity == "critical"
