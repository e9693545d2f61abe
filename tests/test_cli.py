"""The `kgrad` command, end to end on saved models and logger CSVs."""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import kgrad
from kgrad import cli

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")


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


@pytest.fixture
def logger_csv(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 8)).astype("float32"), rng.standard_normal((64, 1))
    csv = tmp_path / "grads.csv"
    model = _sigmoid_model()
    for _ in range(2):  # two runs appended to the same CSV
        logger = kgrad.GradientNormLogger(csv_path=csv)
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[logger], verbose=0)
    return csv


def test_report_draws_a_logger_csv(logger_csv, tmp_path, capsys):
    code, out, err = _run(["report", logger_csv, "--out", tmp_path / "r"], capsys)
    assert code == 0, err
    assert "From 8 logged steps" in out and "vanishing" in out
    for name in ("gradient_profile.png", "gradient_heatmap.png"):
        assert (tmp_path / "r" / name).exists()


def test_report_writes_beside_its_csv_and_never_over_another_report(
    logger_csv, tmp_path, capsys
):
    code, out, err = _run(["report", logger_csv], capsys)
    assert code == 0, err
    beside = tmp_path / "grads-report"
    assert (beside / "gradient_heatmap.png").stat().st_size > 5_000
    assert f"Wrote {beside / 'gradient_profile.png'}" in out

    # a second report into the same folder, or into the demo's: refused, untouched
    demo = tmp_path / "kgrad-report"
    demo.mkdir()
    (demo / "summary.md").write_text("# kgrad demo\n")
    (demo / "gradient_profile.png").write_bytes(b"the demo's picture")
    for folder, taken in ((beside, "gradient_profile.png, gradient_heatmap.png"),
                          (demo, "gradient_profile.png, summary.md")):
        before = (folder / "gradient_profile.png").read_bytes()
        code, out, err = _run(["report", logger_csv, "--out", folder], capsys)
        assert code == cli.EXIT_BAD_INPUT and out == ""
        assert err == (
            f"kgrad report: error: {folder} already holds a report ({taken}); pass "
            "--force to overwrite it, or --out to write elsewhere\n"
        )
        assert (folder / "gradient_profile.png").read_bytes() == before
    code, _, err = _run(["report", logger_csv, "--out", demo, "--force"], capsys)
    assert code == 0, err
    assert (demo / "gradient_profile.png").read_bytes() != b"the demo's picture"
    assert (demo / "summary.md").read_text() == "# kgrad demo\n"  # not ours to touch


def test_diagnose_refuses_a_folder_with_a_report_before_loading(
    saved_model, tmp_path, capsys
):
    (tmp_path / "sigmoid-report").mkdir()
    (tmp_path / "sigmoid-report" / "unit_health.png").write_bytes(b"old")
    code, _, err = _run(["diagnose", saved_model], capsys)  # default: beside the model
    assert code == cli.EXIT_BAD_INPUT
    assert "sigmoid-report already holds a report (unit_health.png)" in err


def test_version_and_help_answer_without_tensorflow():
    script = (
        "import sys\n"
        "from kgrad import cli\n"
        "assert cli.main(['--version']) == 0\n"
        "assert cli.main(['--help']) == 0\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'zoo') if m in sys.modules]\n"
        "print('imported:', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"kgrad {kgrad.__version__}" == "kgrad 0.1.0"
    assert lines[-1] == "imported: []"
    # the demo's help line is read from zoo/demo.py without importing zoo
    assert "demo" in result.stdout and "Train a deep sigmoid MLP" in result.stdout


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


def _run_without_tf_log_level(*args):
    """`python -m kgrad ARGS` with TensorFlow's log level unset; asserts it succeeded
    and wrote no TensorFlow C++ log line; returns its stdout."""
    result = subprocess.run(
        [sys.executable, "-m", "kgrad", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert not re.search(r"^[IWEF]\d{4} |absl::InitializeLog", result.stderr, re.M), (
        result.stderr[-2000:]
    )
    return result.stdout


def test_a_plugin_commands_help_is_quiet():
    """`kgrad demo --help` imports the demo (and TensorFlow) to build its parser."""
    assert "usage: kgrad demo" in _run_without_tf_log_level("demo", "--help")


def test_python_dash_m_kgrad_is_quiet_unless_verbose(saved_model, tmp_path):
    out = _run_without_tf_log_level(
        "diagnose", saved_model, "--out", str(tmp_path), "--samples", "64"
    )
    assert "kgrad gradient-health report" in out
    assert (tmp_path / "gradient_profile.png").exists()


def test_tensorflow_log_lines_are_recognised():
    lines = [
        "WARNING: All log messages before absl::InitializeLog() is called are written "
        "to STDERR",
        "I0000 00:00:1796161481.857781   30958 cudart_stub.cc:31] Could not find cuda "
        "drivers on your machine, GPU will not be used.",
        "E0000 00:00:1796161481.857781   30958 cuda_executor.cc:1228] failed call to "
        "cuInit: INTERNAL: CUDA error",
    ]
    assert all(cli.TF_LOG_LINE.match(line) for line in lines)
    kept = ["UserWarning: Protobuf gencode version 5.28.3 is older", "I0000 happened"]
    assert not any(cli.TF_LOG_LINE.match(line) for line in kept)


def test_quiet_tensorflow_sets_the_log_level_unless_verbose(monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    cli.quiet_tensorflow(["diagnose", "m.keras", "--verbose"])
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    cli.quiet_tensorflow(["diagnose", "m.keras"])
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")  # the user's own choice is kept
    cli.quiet_tensorflow(["report", "grads.csv"])
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"
