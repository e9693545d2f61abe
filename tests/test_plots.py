"""Plots read DataFrames and draw the numbers they hold."""

import matplotlib

matplotlib.use("Agg")

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import kgrad  # noqa: E402
from kgrad import plots  # noqa: E402

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _layers_frame(ratio, n=6, dead=None, saturated=None):
    norms = ratio ** np.arange(n - 1, -1, -1.0)
    return pd.DataFrame(
        {
            "layer": [f"dense_{i}" for i in range(n)],
            "depth": np.arange(n),
            "grad_norm": norms * 3,
            "kernel_grad_norm": norms * 2,
            "bias_grad_norm": norms,
            "activation_grad_norm": norms / 2,
            "dead_fraction": dead if dead is not None else np.nan,
            "saturated_fraction": saturated if saturated is not None else np.nan,
        }
    )


@pytest.fixture(scope="module")
def logger_frame():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 4)).astype("float32"), rng.standard_normal((64, 1))
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="sigmoid", name="a"),
            keras.layers.Dense(8, activation="sigmoid", name="b"),
            keras.layers.Dense(1, name="c"),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    frames = []
    for _ in range(2):
        logger = kgrad.GradientNormLogger()
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[logger], verbose=0)
        frames.append(logger.to_dataframe())
    return pd.concat(frames, ignore_index=True)


def test_profile_overlays_models_on_a_log_axis():
    frames = {"sigmoid": _layers_frame(0.25), "relu": _layers_frame(1.0)}
    figure = plots.plot_gradient_profile(frames)
    (ax,) = figure.axes
    assert ax.get_yscale() == "log"
    assert [line.get_label() for line in ax.lines] == [
        "sigmoid (0.25x per layer)",
        "relu (1x per layer)",
    ]
    # "auto" picks the activation gradients, the measurement that follows δ.
    np.testing.assert_allclose(
        ax.lines[0].get_ydata(), frames["sigmoid"]["activation_grad_norm"]
    )
    bias = plots.plot_gradient_profile(frames, kind="bias").axes[0]
    np.testing.assert_allclose(
        bias.lines[0].get_ydata(), frames["sigmoid"]["bias_grad_norm"]
    )
    assert bias.get_ylabel() == "‖∂L/∂b‖: bias-gradient norm"
    assert ax.get_ylabel() == "‖∂L/∂(layer output)‖: activation-gradient norm"


def test_profile_draws_every_model_with_one_measure():
    # a frame without activation gradients (a logger's) beside one with them: "auto"
    # would pick activation for one and bias for the other; both get bias
    with_activation = _layers_frame(0.25)
    without = _layers_frame(0.5).drop(columns="activation_grad_norm")
    ax = plots.plot_gradient_profile({"a": with_activation, "b": without}).axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), with_activation.bias_grad_norm)
    np.testing.assert_allclose(ax.lines[1].get_ydata(), without.bias_grad_norm)
    assert ax.get_ylabel() == "‖∂L/∂b‖: bias-gradient norm"
    # no bias in one of them (batch norm): the kernel norms, for both
    no_bias = _layers_frame(1.0).drop(columns=["activation_grad_norm"])
    no_bias["bias_grad_norm"] = np.nan
    ax = plots.plot_gradient_profile({"a": with_activation, "bn": no_bias}).axes[0]
    assert ax.get_ylabel() == "‖∂L/∂W‖: kernel-gradient norm"
    np.testing.assert_allclose(ax.lines[1].get_ydata(), no_bias.kernel_grad_norm)


def test_the_legend_factor_is_the_reports_decay():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((16,))]
        + [keras.layers.Dense(16, activation="sigmoid") for _ in range(6)]
        + [keras.layers.Dense(3)]
    )
    report = kgrad.diagnose(model, np.random.default_rng(0).normal(size=(128, 16)))
    ax = plots.plot_gradient_profile({"sigmoid": report.layers}).axes[0]
    factor = plots.profile.format_factor(report.decay)
    assert ax.lines[0].get_label() == f"sigmoid ({factor}x per layer)"
    assert 0.15 < report.decay < 0.35  # σ′ ≤ 1/4 with Glorot: ~0.24


def test_a_plot_with_nothing_to_show_says_so(logger_frame):
    empty = _layers_frame(1.0)
    empty[["grad_norm", "kernel_grad_norm", "bias_grad_norm", "activation_grad_norm"]] = (
        np.nan
    )
    ax = plots.plot_gradient_profile({"nan": empty}).axes[0]
    assert [t.get_text() for t in ax.texts] == [
        "no finite, positive gradient norm to draw"
    ]
    nan_frame = logger_frame.assign(grad_norm=np.nan)
    ax = plots.plot_gradient_heatmap(nan_frame).axes[0]
    assert [t.get_text() for t in ax.texts] == [
        "no finite, positive gradient norm to draw"
    ]


def test_profile_of_a_logger_frame_draws_one_line_per_run(logger_frame):
    ax = plots.plot_gradient_profile(logger_frame).axes[0]
    assert len(ax.lines) == 2
    first_run = logger_frame[logger_frame.run == logger_frame.run.iloc[0]]
    bias = (
        first_run[first_run.kind == "bias"]
        .groupby("layer", observed=True)
        .grad_norm.median()
    )
    np.testing.assert_allclose(
        ax.lines[0].get_ydata(), bias[["a", "b", "c"]].to_numpy(), rtol=1e-6
    )


def test_heatmap_is_layers_by_steps_of_the_last_run(logger_frame):
    figure = plots.plot_gradient_heatmap(logger_frame)
    image = figure.axes[0].images[0]
    last = logger_frame[logger_frame.run == logger_frame.run.iloc[-1]]
    steps = sorted(last.step.unique())
    assert image.get_array().shape == (3, len(steps))  # layers x steps
    bias = (
        last[(last.kind == "bias") & (last.layer == "a")].sort_values("step").grad_norm
    )
    np.testing.assert_allclose(image.get_array()[0], bias.to_numpy(), rtol=1e-6)
    first = logger_frame.run.iloc[0]
    assert (
        first
        in plots.plot_gradient_heatmap(logger_frame, run=first).axes[0].get_title()
    )
    with pytest.raises(ValueError, match="No run 'nope'"):
        plots.plot_gradient_heatmap(logger_frame, run="nope")
    shared = plots.plot_gradient_heatmap(logger_frame, color_range=(1e-6, 10.0))
    image = shared.axes[0].images[0]
    assert (image.norm.vmin, image.norm.vmax) == (1e-6, 10.0)
    with pytest.raises(ValueError, match=r"Received: color_range=\(1.0, 0.5\)"):
        plots.plot_gradient_heatmap(logger_frame, color_range=(1.0, 0.5))
    with pytest.raises(ValueError, match="must be a GradientNormLogger frame"):
        plots.plot_gradient_heatmap(_layers_frame(0.5))


def test_unit_health_bars_hold_the_fractions():
    frame = _layers_frame(
        1.0, n=3, dead=[0.0, 0.25, np.nan], saturated=[np.nan, np.nan, 0.5]
    )
    ax = plots.plot_unit_health(frame).axes[0]
    heights = [patch.get_height() for patch in ax.patches]
    assert heights == [0.0, 0.25, 0.0, 0.0, 0.0, 0.5]  # dead bars, then saturated bars
    empty = plots.plot_unit_health(_layers_frame(1.0)).axes[0]
    assert empty.texts[0].get_text() == "no unit statistics available"


def test_activation_curves_mark_the_guides_numbers(tmp_path):
    figure = plots.plot_activation_curves()
    sigmoid_ax, tanh_ax = figure.axes[:2]
    marked = {
        (round(float(line.get_xdata()[0]), 3), round(float(line.get_ydata()[0]), 5))
        for line in sigmoid_ax.lines
        if len(line.get_xdata()) == 1
    }
    assert marked == {(0.0, 0.25), (5.0, 0.99331), (5.0, 0.00665)}  # σ′(5) on σ′
    assert "σ′(5) = 0.0066481" in [text.get_text() for text in sigmoid_ax.texts]
    spans = [patch.get_x() for patch in tanh_ax.patches]
    assert pytest.approx(2.993) in spans
    path = tmp_path / "curves.png"
    figure.savefig(path)
    assert path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="`axes` must hold two axes"):
        plots.plot_activation_curves(axes=[sigmoid_ax])


def test_bad_kind_is_named():
    with pytest.raises(ValueError, match="`kind` must be one of"):
        plots.plot_gradient_profile(_layers_frame(1.0), kind="weights")
