"""`kgrad demo --quick` writes every promised file and shows the sigmoid net vanishing."""

import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from kgrad.plots.profile import format_factor  # noqa: E402
from zoo import demo  # noqa: E402

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo.run_demo(out, quick=True, verbose=0)


def test_quick_demo_writes_the_report_and_separates_the_models(quick_report):
    tmp_path, results = quick_report
    for name in demo.FILES:
        assert (tmp_path / name).stat().st_size > 0, name
    for slug, _ in demo.MODELS.values():
        log = pd.read_csv(tmp_path / "logs" / f"{slug}.csv")
        assert {"step", "layer", "grad_norm"} <= set(log.columns) and len(log) > 0
    summary = (tmp_path / "summary.md").read_text()
    for picture in ("gradient_profile.png", "gradient_heatmaps.png", "accuracy.png"):
        assert f"]({picture})" in summary

    ratios = results.set_index("model").first_to_last
    others = ratios.drop("plain sigmoid")
    # the sigmoid net's first layer gets a vanishing share of the gradient
    assert ratios["plain sigmoid"] < 1e-6
    assert (others > 1e-2).all() and ratios["plain sigmoid"] < 1e-4 * others.min()
    decay = results.set_index("model").decay_per_layer
    assert abs(decay["plain sigmoid"] - 0.236) < 0.03  # the mean-field value
    # first_to_last and the per-layer factor are one measurement: the factor to the
    # power of the layers between first and last (15 hidden + head; the residual net
    # has its input projection too) is the ratio
    steps = np.log(ratios) / np.log(decay)
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-6)
    assert (np.round(steps) >= 15).all()
    assert "vanishing" in results.set_index("model").findings["plain sigmoid"]
    assert pd.read_csv(tmp_path / "results.csv").shape[0] == 4


def test_one_factor_per_model_in_table_legend_and_summary(quick_report):
    out, results = quick_report
    settings = demo.DemoSettings.quick()
    data = demo.datasets.load("digits", seed=settings.seed)
    reports = {  # the demo's reports again: same seed, same model, same examples
        label: demo.initial_report(slug, arguments, data, settings)[1]
        for label, (slug, arguments) in demo.MODELS.items()
    }
    figure = demo.profile_figure(reports)
    (ax,) = figure.axes
    assert ax.get_ylabel() == "‖∂L/∂(layer output)‖: activation-gradient norm"
    summary = (out / "summary.md").read_text()
    table = demo.results_text(results)
    for line, (label, report) in zip(ax.lines, reports.items()):
        factor = format_factor(report.decay)
        assert factor == format_factor(results.set_index("model").decay_per_layer[label])
        assert line.get_label() == f"{label} ({factor}x per layer)"
        assert f"| {label} |" in summary and f"| {factor} |" in summary
        assert f" {factor} " in table
        np.testing.assert_allclose(line.get_ydata(), report.profile["norm"])


def test_summary_shows_findings_as_text_and_heatmaps_share_a_scale(quick_report):
    out, _ = quick_report
    summary = (out / "summary.md").read_text()
    assert "Finding(" not in summary and "evidence=" not in summary
    assert "[critical] vanishing: the backpropagated signal shrinks" in summary
    assert "    fix: Replace sigmoid" in summary
    frames = {
        label: pd.read_csv(out / "logs" / f"{slug}.csv")
        for label, (slug, _) in demo.MODELS.items()
    }
    figure = demo.heatmap_figure(frames)
    scales = {(im.norm.vmin, im.norm.vmax) for ax in figure.axes for im in ax.images}
    assert len(scales) == 1
    assert all("kernel-gradient norm" in ax.get_title() for ax in figure.axes if ax.images)


@pytest.mark.backends(
    "tensorflow", reason="the same code as `run_demo`, tested on each backend above"
)
def test_demo_command_line(tmp_path):
    out = tmp_path / "report"
    completed = subprocess.run(
        [sys.executable, "-m", "kgrad", "demo", "--quick", "--quiet", "--epochs", "1",
         "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert (out / "summary.md").exists()
    # --quiet still says where the table and the report are
    lines = completed.stdout.splitlines()
    assert lines[0] == f"Results table: {out / 'results.csv'}"
    assert lines[1].startswith(f"Report written to {out}{os.sep} in ")

    other = tmp_path / "grads-report"  # a `kgrad report` folder is not the demo's
    other.mkdir()
    (other / "gradient_profile.png").write_bytes(b"kgrad report's picture")
    bad = subprocess.run(
        [sys.executable, "-m", "kgrad", "demo", "--out", str(other)],
        capture_output=True, text=True, timeout=600,
    )
    assert bad.returncode == 2
    assert f"{other} already holds a report (gradient_profile.png)" in bad.stderr
    assert (other / "gradient_profile.png").read_bytes() == b"kgrad report's picture"

    bad = subprocess.run(
        [sys.executable, "-m", "kgrad", "demo", "--epochs", "0"],
        capture_output=True, text=True, timeout=600,
    )
    assert bad.returncode == 2
    assert "--epochs must be a positive integer. Received: 0" in bad.stderr
