"""`kgrad demo --quick` writes every promised file and shows the sigmoid net vanishing."""

import os
import subprocess
import sys

import pandas as pd

from zoo import demo


def test_quick_demo_writes_the_report_and_separates_the_models(tmp_path):
    results = demo.run_demo(tmp_path, quick=True, verbose=0)
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
    assert "vanishing" in results.set_index("model").findings["plain sigmoid"]
    assert pd.read_csv(tmp_path / "results.csv").shape[0] == 4


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

    bad = subprocess.run(
        [sys.executable, "-m", "kgrad", "demo", "--epochs", "0"],
        capture_output=True, text=True, timeout=600,
    )
    assert bad.returncode == 2
    assert "--epochs must be a positive integer. Received: 0" in bad.stderr
