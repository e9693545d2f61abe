"""The diagnosis detectors as pure functions: thresholds, evidence, fixes."""

import numpy as np
import pandas as pd
import pytest

from kgrad.diagnosis import fixes
from kgrad.diagnosis.dead_units import (
    active_units,
    consecutive_silence,
    detect_dead_units,
    silence_bound,
)
from kgrad.diagnosis.exploding import detect_exploding, detect_spikes, spike_ratios
from kgrad.diagnosis.findings import Finding, FindingLog, layer_span
from kgrad.diagnosis.fixes import NetworkContext, fixes_for
from kgrad.diagnosis.non_finite import detect_non_finite
from kgrad.diagnosis.profile import choose_signal, frame_profile
from kgrad.diagnosis.saturation import (
    SIGMOID_SATURATION_INPUT,
    TANH_SATURATION_INPUT,
    derivative_from_outputs,
    detect_saturation,
    saturated_count,
)
from kgrad.diagnosis.stalled import detect_stalled, stalled_beyond_trend, update_ratios
from kgrad.diagnosis.unit_health import SiteInfo, UnitHealth
from kgrad.diagnosis.vanishing import detect_vanishing

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

LAYERS = [f"dense_{i}" for i in range(20)]


def geometric(ratio, n=20):
    """A profile (input first) whose signal changes by `ratio` per layer backwards."""
    return ratio ** np.arange(n - 1, -1, -1, dtype=np.float64)


# -- vanishing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ratio, flagged",
    [
        (0.236, True),  # sigmoid + Glorot (REFERENCES.md, trap 1)
        (0.707, True),  # ReLU + Glorot: 1/sqrt(2) per layer (trap 2)
        (0.93, False),  # tanh + Glorot at depth 20
        (1.0, False),  # ReLU + He
        (1.21, False),  # batch norm grows towards the input (trap 3)
    ],
)
def test_vanishing_thresholds_follow_theory(ratio, flagged):
    finding = detect_vanishing(geometric(ratio), LAYERS)
    assert (finding is not None) == flagged
    if flagged:
        assert finding.evidence["per_layer_ratio"] == pytest.approx(ratio)
        assert finding.evidence["first_to_last"] == pytest.approx(ratio**19)


def test_no_single_layer_drops_tenfold_yet_sigmoid_vanishes():
    profile = geometric(0.236)
    assert (profile[1:] / profile[:-1]).max() < 10  # the naive 10x rule sees nothing
    finding = detect_vanishing(profile, LAYERS)
    assert finding.severity == "critical"
    # The layers named are those getting less than 1% of the last layer's signal.
    assert finding.layers == [n for n, v in zip(LAYERS, profile) if v < 1e-2]


def test_short_net_with_mild_decay_is_not_vanishing():
    # 0.7 per layer over 5 layers: the first layer still gets 24% of the signal.
    assert detect_vanishing(geometric(0.7, 5), LAYERS[:5]) is None
    assert detect_vanishing([1.0, 2.0], ["a", "b"]) is None  # too short to judge


# -- exploding ------------------------------------------------------------------------


@pytest.mark.parametrize("ratio, flagged", [(1.21, False), (1.45, False), (2.5, True)])
def test_growth_threshold_leaves_batch_norm_alone(ratio, flagged):
    finding = detect_exploding(geometric(ratio), LAYERS)
    assert (finding is not None) == flagged
    if flagged:
        assert finding.evidence["signal"] == "depth_growth"
        assert finding.severity == "critical"  # 2.5**19 ~ 3.6e7


def test_spike_ratio_is_norm_over_rolling_median_of_the_steps_before():
    norms = [1.0, 2.0, 3.0] * 4 + [40.0]
    ratios = spike_ratios(norms, window=12, min_history=10)
    assert np.isnan(ratios[:10]).all()
    assert ratios[-1] == pytest.approx(40.0 / 2.0)  # median of 1,2,3 x4 is 2


def test_detect_spikes_names_the_first_spike_and_counts_them():
    norms = np.ones(30)
    norms[[15, 25]] = [50.0, 30.0]
    steps = np.arange(100, 130)
    finding = detect_spikes(norms, steps, factor=10, window=10)
    assert finding.kind == "exploding" and finding.step == 115
    assert finding.evidence["spikes"] == 2
    assert finding.evidence["max_ratio_to_median"] == pytest.approx(50.0)
    # Incremental use: steps before `first_index` are history only.
    assert detect_spikes(norms, steps, factor=10, window=10, first_index=20).step == 125
    assert detect_spikes(norms, steps, factor=100, window=10) is None


# -- non-finite -----------------------------------------------------------------------


def test_non_finite_names_step_and_the_layer_where_it_entered_backprop():
    norms = np.ones((6, 4))
    norms[4, :3] = [np.nan, np.inf, np.nan]  # step 14: layers a, b, c non-finite
    norms[5, :] = np.nan
    finding = detect_non_finite(norms, ["a", "b", "c", "d"], np.arange(10, 16))
    assert finding.step == 14 and finding.severity == "critical"
    assert finding.layers == ["a", "b", "c"]
    assert finding.evidence["origin_layer"] == "c"  # nearest the output
    assert finding.evidence["nan"] and finding.evidence["inf"]
    assert detect_non_finite(np.ones((3, 4)), ["a", "b", "c", "d"]) is None


# -- dead units -----------------------------------------------------------------------


def test_active_units_reduce_over_examples_and_positions():
    outputs = np.zeros((5, 3, 4))
    outputs[2, 1, 0] = 0.5
    outputs[0, 0, 3] = 2.0
    assert active_units(outputs).tolist() == [True, False, False, True]


def test_silence_bound_is_three_binomial_sigmas_plus_one():
    assert silence_bound(128, 0.0) == 1.0
    assert silence_bound(100, 0.2) == pytest.approx(20 + 3 * 4 + 1)


def test_silence_bound_widens_with_an_estimated_null_fraction():
    # p estimated as (k + 1/2)/(n + 1), and the estimate's variance units*p(1-p)*units/n.
    p = (0.25 * 256 + 0.5) / 257
    expected = 128 * p + 3 * np.sqrt(128 * p * (1 - p) * 1.5) + 1
    assert silence_bound(128, 0.25, null_units=256) == pytest.approx(expected)
    assert silence_bound(128, 0.25, null_units=np.nan) == silence_bound(128, 0.25)
    # More null units, a tighter bound; no null unit silent is not "p = 0".
    assert silence_bound(128, 0.0, 4096) < silence_bound(128, 0.0, 256)
    assert silence_bound(128, 0.0, 256) > 3 > silence_bound(128, 0.0)


def test_silence_a_few_hundred_null_units_missed_is_not_death():
    # Measured in a 20-layer, 128-wide He-initialized ReLU net at initialization
    # (monitor, 256 null units): 2 of 128 units silent where no null unit was (8,192
    # null units put p at 0.031), and 23 where 9% were (11.5%). Six units of 32 with
    # a bias of -10 are dead.
    table = pd.DataFrame(
        {
            "layer": ["early", "deep", "biased"],
            "units": [128, 128, 32],
            "dead_units": [2, 23, 6],
            "null_silent_fraction": [0.0, 0.09, 0.0],
            "null_units": [256, 256, 256],
            "examples": [256, 256, 256],
        }
    )
    assert detect_dead_units(table).evidence["dead_units"] == {"biased": 6}
    # Taken as exact, the same fractions flagged the first two as well.
    exact = table.drop(columns="null_units")
    assert list(detect_dead_units(exact).evidence["dead_units"]) == [
        "early",
        "deep",
        "biased",
    ]


def test_consecutive_silence_resets_when_a_unit_fires():
    counts = None
    for silent in ([True, True], [True, False], [True, True]):
        counts = consecutive_silence(counts, np.array(silent))
    assert counts.tolist() == [3, 1]


def test_dead_units_beyond_chance_only():
    table = pd.DataFrame(
        {
            "layer": ["deep", "shallow"],
            "units": [128, 64],
            "dead_units": [30, 12],
            # Deep layer: 25% of random units are silent too (correlated inputs).
            "null_silent_fraction": [0.25, 0.0],
            "examples": [512, 512],
            "dead_bias_mean": [np.nan, -10.0],
        }
    )
    finding = detect_dead_units(table)
    assert finding.layers == ["shallow"]
    assert finding.evidence["dead_units"] == {"shallow": 12}
    assert finding.evidence["negative_bias"] is True
    assert finding.fixes[0] == fixes.FIX_ZERO_BIAS


def test_dead_units_need_enough_examples():
    table = pd.DataFrame(
        {"layer": ["d"], "units": [8], "dead_units": [8], "examples": [10]}
    )
    assert detect_dead_units(table) is None


# -- saturation -----------------------------------------------------------------------


def test_derivative_from_outputs_matches_the_guides():
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    assert derivative_from_outputs(sigmoid(0.0), "sigmoid") == pytest.approx(0.25)
    assert derivative_from_outputs(sigmoid(5.0), "sigmoid") == pytest.approx(
        0.0066481, rel=1e-4
    )
    assert derivative_from_outputs(np.tanh(3.0), "tanh") == pytest.approx(
        0.00987, rel=1e-3
    )
    # The 0.01 thresholds sit at |x| = 4.585 (sigmoid) and 2.993 (tanh).
    for x, name, function in (
        (SIGMOID_SATURATION_INPUT, "sigmoid", sigmoid),
        (TANH_SATURATION_INPUT, "tanh", np.tanh),
    ):
        assert derivative_from_outputs(function(x), name) == pytest.approx(
            0.01, abs=2e-5
        )
    with pytest.raises(ValueError, match="activation.*relu"):
        derivative_from_outputs(np.zeros(2), "relu")


def test_saturated_count_and_detector():
    x = np.array([-6.0, -3.0, 0.0, 3.5, 5.0])
    assert saturated_count(np.tanh(x), "tanh") == (4, 5)  # |x| > 2.993
    table = pd.DataFrame(
        {
            "layer": ["a", "b"],
            "activation": ["tanh", "sigmoid"],
            "saturated_fraction": [0.6, 0.1],
        }
    )
    finding = detect_saturation(table)
    assert finding.layers == ["a"] and finding.severity == "critical"
    assert finding.evidence["saturated_fraction"] == {"a": 0.6}


# -- stalled --------------------------------------------------------------------------


def test_update_ratios_and_stalled_layers():
    ratios = update_ratios(
        {"a": 1e-5, "b": 0.02, "c": 0.03}, {"a": 1.0, "b": 2.0, "c": 3.0}, 10
    )
    assert ratios == pytest.approx({"a": 1e-6, "b": 1e-3, "c": 1e-3})
    finding = detect_stalled(ratios)
    assert finding.layers == ["a"]
    assert finding.evidence["median_ratio"] == pytest.approx(1e-3)
    assert detect_stalled(ratios, exclude={"a"}) is None
    assert detect_stalled({"a": 1.0, "b": 1e-9}) is None  # too few layers for a median


def test_stalled_is_left_to_a_trend_across_depth():
    ratios = {"a": 1e-9, "b": 1e-3, "c": 1e-3}
    vanishing = detect_vanishing(geometric(0.2, 3) * [1e-6, 1, 1], ["a", "b", "c"])
    assert vanishing is not None and "a" in vanishing.layers
    assert stalled_beyond_trend(ratios, [vanishing]) is None
    assert stalled_beyond_trend(ratios, []).layers == ["a"]


# -- fixes and findings ---------------------------------------------------------------


def test_he_init_is_suggested_for_relu_and_never_for_sigmoid():
    relu = NetworkContext(
        activations={"d0": "relu", "d1": "relu"},
        initializers={"d0": "GlorotUniform", "d1": "GlorotUniform"},
    )
    sigmoid = NetworkContext(
        activations={"d0": "sigmoid", "d1": "sigmoid"},
        initializers={"d0": "GlorotUniform", "d1": "GlorotUniform"},
    )
    assert fixes_for("vanishing", ["d0"], relu)[0] == fixes.FIX_RELU_HE
    for kind in ("vanishing", "exploding", "saturation", "stalled", "non_finite"):
        text = " ".join(fixes_for(kind, ["d0"], sigmoid))
        assert "He init" not in text and "he_normal" not in text, kind
    assert fixes_for("vanishing", ["d0"], sigmoid)[0] == fixes.FIX_REPLACE_SIGMOID
    # Already He-initialized: no point suggesting it again.
    he = NetworkContext(activations={"d0": "relu"}, initializers={"d0": "HeNormal"})
    assert fixes.FIX_RELU_HE not in fixes_for("vanishing", ["d0"], he)


def test_exploding_fix_quotes_the_weight_scale_and_spikes_skip_init_advice():
    context = NetworkContext(activations={"d": "tanh"}, weight_scale={"d": 128.0})
    depth = fixes_for("exploding", ["d"], context, {"signal": "depth_growth"})
    assert "128" in depth[0] and "glorot_uniform" in depth[0]
    spike = fixes_for("exploding", [], context, {"signal": "norm_spike"})
    assert spike[0] == fixes.FIX_CLIP
    assert fixes.FIX_BATCH_NORM not in fixes_for(
        "exploding", ["d"], NetworkContext(normalized=True)
    )


def test_fixes_reject_unknown_kind():
    with pytest.raises(
        ValueError, match="`kind` must be one of .*Received: kind='slow'"
    ):
        fixes_for("slow", [])


def test_finding_log_keeps_everything_and_tells_news():
    log = FindingLog()
    news = [
        log.add(
            Finding("vanishing", "critical", ["a", "b"], {"signal": "depth_decay"}, [])
        ),
        log.add(
            Finding(
                "vanishing", "critical", ["a", "b", "c"], {"signal": "depth_decay"}, []
            )
        ),
        log.add(Finding("dead_units", "warning", ["d1"], {}, [])),
        log.add(Finding("dead_units", "warning", ["d1"], {}, [])),
        log.add(Finding("dead_units", "warning", ["d1", "d2"], {}, [])),  # d2 is new
        log.add(Finding("exploding", "warning", [], {"signal": "norm_spike"}, [])),
        log.add(Finding("exploding", "warning", ["a"], {"signal": "depth_growth"}, [])),
    ]
    assert news == [True, False, True, False, True, True, True]
    assert len(log.findings) == 7


def test_finding_key_summary_and_dict():
    finding = Finding(
        "dead_units", "warning", ["d1"], {"dead_units": {"d1": 3}}, [], 7, "m"
    )
    assert finding.key == ("dead_units", ("d1",))
    assert finding.summary() == "[warning] dead_units at step 7: m"
    assert finding.to_dict()["evidence"] == {"dead_units": {"d1": 3}}
    assert layer_span([]) == "the whole network"
    assert layer_span(["a", "b", "c", "d"]) == "a … d (4 layers)"


# -- profile choice and unit health over time -----------------------------------------


def test_profile_prefers_activation_then_bias_then_kernel_with_normalization():
    assert (
        choose_signal(has_activation=True, all_biased=True, normalized=True)
        == "activation"
    )
    assert (
        choose_signal(has_activation=False, all_biased=True, normalized=False) == "bias"
    )
    assert (
        choose_signal(has_activation=False, all_biased=True, normalized=True)
        == "kernel"
    )
    assert (
        choose_signal(has_activation=False, all_biased=False, normalized=False)
        == "total"
    )
    frame = pd.DataFrame(
        {
            "layer": ["d0", "bn", "d1"],
            "depth": [0, 1, 2],
            "grad_norm": [3.0, 1.0, 4.0],
            "kernel_grad_norm": [2.0, np.nan, 3.0],
            "bias_grad_norm": [1e-9, np.nan, 1.0],
        }
    )
    profile, kind = frame_profile(frame)  # a normalization layer is inferred
    assert kind == "kernel"
    assert profile["layer"].tolist() == ["d0", "d1"]
    assert profile["norm"].tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match="`kind` must be one of"):
        frame_profile(frame, kind="weights")


def test_unit_health_counts_dead_after_probes_in_a_row():
    health = UnitHealth(
        [SiteInfo("d", "d", "relu", 3), SiteInfo("s", "s", "sigmoid", 2)], ["d", "s"], 2
    )
    for step, active, saturated in (
        (0, [1, 0, 0], 0.1),
        (10, [1, 0, 1], 0.2),
        (20, [1, 0, 0], 0.3),
    ):
        ratios = health.add(
            step,
            [np.array(active, bool), None],
            [None, saturated],
            [0.2, 0.4],
            [2.0, 4.0],
        )
    assert ratios == pytest.approx({"d": 0.01, "s": 0.01})  # 0.2 / 2.0 / 10 steps
    assert health.close_interval() and not health.close_interval()
    assert health.update_ratios["d"] == pytest.approx(
        np.median([0.2 / 2.0, 0.01, 0.01])
    )
    table = health.table()
    assert table.dead_units.tolist()[0] == 1  # unit 1 silent 3x; unit 2 fired at 10
    assert table.saturated_fraction.tolist()[1] == pytest.approx(0.3)
    assert health.health_values() == pytest.approx(
        {"dead_fraction": 1 / 3, "saturated_fraction": 0.3}
    )


def test_gradient_findings_judge_only_new_steps_with_spike_history():
    from kgrad.diagnosis.from_records import gradient_findings
    from kgrad.records.gradient_records import GradientRecords, VariableInfo

    variables = [VariableInfo(f"d{i}", i, "bias", "bias") for i in range(3)]
    records = GradientRecords(variables, run="r")
    norms = np.ones((120, 3))
    norms[110] *= 40.0  # a spike among the new steps
    norms[:100] *= [1e-4, 1e-2, 1.0]  # vanishing, then healed
    records.append(
        step=np.arange(120),
        epoch=0,
        grad_norm=norms,
        weight_norm=np.ones((120, 3)),
        global_norm=np.sqrt((norms**2).sum(axis=1)),
    )
    old, _ = gradient_findings(records, start=0)
    assert "vanishing" in {f.kind for f in old}
    new, summary = gradient_findings(records, start=100, spike_window=50)
    assert [f.evidence["signal"] for f in new] == ["norm_spike"]
    assert new[0].step == 110
    assert summary.decay == pytest.approx(1.0)
