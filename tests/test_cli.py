"""The `kgrad` command, end to end on saved models and logger CSVs."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import kgrad
from kgrad import cli


def _sigmoid_model(depth=10, width=16):
    layers = [keras.Input((8,))]
    layers += [keras.layers.Dense(width, activation="sigmoid") for _ in range(depth)]
    model = keras.Sequential(layers + [keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


@pytest.fixture
def saved_model(tmp_path):
    path = tmp_path / "sigmoid.keras"
    _sigmoid_model().save(path)
    return str(path)


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_diagnose_prints_the_report_and_writes_the_plots(saved_model, tmp_path, capsys):
    out_dir = tmp_path / "plots"
    code, out, err = _run(
        ["diagnose", saved_model, "--out", out_dir, "--samples", 256], capsys
    )
    assert code == 0, err
    assert "256 probe examples" in out and "random Gaussian cotangent" in out
    assert "[critical] vanishing" in out  # 10 sigmoid layers: ~0.236 per layer
    for name in ("gradient_profile.png", "unit_health.png"):
        assert (out_dir / name).stat().st_size > 5_000


def test_diagnose_with_data_uses_the_compiled_loss(saved_model, tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "probe.npz"
    np.savez(data, x=rng.standard_normal((300, 8)), y=rng.standard_normal((300, 1)))
    code, out, err = _run(
        ["diagnose", saved_model, "--data", data, "--out", tmp_path], capsys
    )
    assert code == 0, err
    assert "300 probe examples" in out and "loss on y" in out


def test_report_draws_a_logger_csv(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 8)).astype("float32"), rng.standard_normal((64, 1))
    csv = tmp_path / "grads.csv"
    model = _sigmoid_model()
    for _ in range(2):  # two runs appended to the same CSV
        logger = kgrad.GradientNormLogger(csv_path=csv)
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[logger], verbose=0)
    code, out, err = _run(["report", csv, "--out", tmp_path / "r"], capsys)
    assert code == 0, err
    assert "From 8 logged steps" in out and "vanishing" in out
    for name in ("gradient_profile.png", "gradient_heatmap.png"):
        assert (tmp_path / "r" / name).exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["diagnose", "{tmp}/missing.keras"], "model file not found"),
        (["diagnose", "{tmp}/broken.keras"], "could not load the model"),
        (["diagnose", "{tmp}/notes.txt"], "is not a saved Keras model"),
        (["diagnose", "{model}", "--data", "{tmp}/no_x.npz"], "has no array named `x`"),
        (
            ["diagnose", "{model}", "--data", "{tmp}/wrong.npz"],
            "`x` does not fit model",
        ),
        (["diagnose", "{model}", "--data", "{tmp}/notes.txt"], "could not read"),
        (["report", "{tmp}/missing.csv"], "log file not found"),
        (["report", "{tmp}/other.csv"], "is not a GradientNormLogger CSV"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(
    argv, message, saved_model, tmp_path, capsys
):
    (tmp_path / "broken.keras").write_text("not a zip")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    np.savez(tmp_path / "no_x.npz", inputs=np.zeros((4, 8)))
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 3), "float32"))
    argv = [a.format(tmp=tmp_path, model=saved_model) for a in argv]
    code, out, err = _run(argv, capsys)
    assert code == cli.EXIT_BAD_INPUT
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_usage_errors_and_help(capsys):
    assert cli.main(["--help"]) == 0
    assert "diagnose" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_a_new_subcommand_is_one_table_entry(monkeypatch, capsys):
    def add_args(parser):
        parser.add_argument("--name", default="world")

    def run(args):
        print(f"hello {args.name}")
        return 0

    monkeypatch.setitem(
        cli.SUBCOMMANDS, "hello", cli.Subcommand("say hello", add_args, run)
    )
    assert cli.main(["hello", "--name", "kgrad"]) == 0
    assert capsys.readouterr().out == "hello kgrad\n"


def test_python_dash_m_kgrad(saved_model, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kgrad",
            "diagnose",
            saved_model,
            "--out",
            str(tmp_path),
            "--samples",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kgrad gradient-health report" in result.stdout
    assert (tmp_path / "gradient_profile.png").exists()
