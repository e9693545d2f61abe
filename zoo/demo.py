"""`kgrad demo`: vanishing gradients happen, then disappear, on real data, in a minute.

The experiment of the guides, on scikit-learn's bundled digits (no download): one deep
MLP trained four times with one knob changed each time,

- **plain sigmoid** (Glorot init): σ′ ≤ 1/4 shrinks the gradient ~4x per layer, so
  the first layers barely learn;
- **ReLU + He**: the same net with ReLU and He init, whose backward gain is 1;
- **batch norm**: the sigmoid net with batch normalization before each activation
  (Ioffe & Szegedy 2015);
- **residual**: the sigmoid net with pre-activation skip connections (He et al. 2016).

Every run is logged with `kgrad.GradientNormLogger` and diagnosed at initialization
with `kgrad.diagnose`. The report folder holds the per-layer gradient profile of the
four models overlaid, their gradient-flow heatmaps, the accuracy curves, the CSV logs,
a results table and `summary.md`, which embeds the plots.

The demo is registered as the `demo` subcommand of the `kgrad` command line through the
`kgrad.commands` entry point, so `kgrad` itself never imports `zoo`.

References:
    Glorot & Bengio 2010; He et al. 2015; He et al. 2016; Ioffe & Szegedy 2015;
    Nielsen, *Neural Networks and Deep Learning*, ch. 5.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

import keras
import numpy as np
import pandas as pd

import kgrad
from kgrad import cli
from zoo import datasets
from zoo.builders.mlp import build_mlp

# label -> (file-name slug, build_mlp arguments): one knob changed per model.
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain sigmoid": ("plain_sigmoid", {"block": "plain", "activation": "sigmoid"}),
    "ReLU + He": ("relu_he", {"block": "plain", "activation": "relu"}),
    "batch norm": ("batchnorm", {"block": "batchnorm", "activation": "sigmoid"}),
    "residual": (
        "residual",
        {"block": "residual", "activation": "sigmoid", "preactivation": True},
    ),
}

FILES = (
    "results.csv",
    "history.csv",
    "gradient_profile.png",
    "gradient_heatmaps.png",
    "accuracy.png",
    "summary.md",
)


# The one definition of the table's gradient columns, the profile plot and its legend.
MEASURE_NOTE = (
    "`decay_per_layer`: the per-layer factor of the backpropagated signal (the norm of "
    "each kernel layer's output gradient, `kgrad.diagnose` at initialization on 512 "
    "training examples): the geometric mean of the ratio between consecutive layers, "
    "`report.decay`, as in the legend of the profile plot; below 1 it shrinks towards "
    "the input. `first_to_last`: the first layer's signal over the last one's, "
    "`report.first_to_last`."
)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """The size of the experiment.

    Attributes:
        depth: Hidden layers per model. Defaults to `15`.
        width: Units per hidden layer. Defaults to `32`.
        epochs: Training epochs per model. Defaults to `30`.
        batch_size: Defaults to `64`.
        learning_rate: SGD learning rate (momentum 0.9). Defaults to `0.01`.
        train_examples: Use only this many training examples (`None`: all 1,437).
        seed: Seed of the initial weights and of the data order. Defaults to `1`.
    """

    depth: int = 15
    width: int = 32
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 0.01
    train_examples: int | None = None
    seed: int = 1

    @classmethod
    def quick(cls) -> "DemoSettings":
        """A run of seconds, for tests: same depth, two epochs on 512 examples."""
        return cls(epochs=2, train_examples=512)


class _Progress(keras.callbacks.Callback):
    """One line per epoch: which model, which epoch, loss and accuracy, elapsed."""

    def __init__(self, label: str, position: str, started: float):
        super().__init__()
        self.label, self.position, self.started = label, position, started

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        print(
            f"[{self.position}] {self.label:<14} epoch {epoch + 1:>2}/"
            f"{self.params['epochs']}  loss {logs.get('loss', float('nan')):.3f}  "
            f"val_accuracy {logs.get('val_accuracy', float('nan')):.3f}  "
            f"({time.perf_counter() - self.started:.0f} s)",
            flush=True,
        )


def initial_report(
    slug: str, arguments: dict[str, Any], data: datasets.Dataset, settings: DemoSettings
) -> tuple[keras.Model, kgrad.Report, Any, Any]:
    """Builds one model of the demo and diagnoses it at initialization.

    Returns:
        The compiled model, its `kgrad.diagnose` report (on the first 512 training
        examples) and the training inputs and labels.
    """
    keras.utils.set_random_seed(settings.seed)
    model = build_mlp(
        data.input_shape,
        data.num_classes,
        depth=settings.depth,
        width=settings.width,
        name=slug,
        **arguments,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(settings.learning_rate, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    x_train, y_train = data.x_train, data.y_train
    if settings.train_examples is not None:
        x_train, y_train = x_train[: settings.train_examples], y_train[: settings.train_examples]
    return model, kgrad.diagnose(model, x_train[:512], y_train[:512]), x_train, y_train


def _train_one(
    label: str,
    slug: str,
    arguments: dict[str, Any],
    data: datasets.Dataset,
    settings: DemoSettings,
    out: str,
    progress: keras.callbacks.Callback | None,
) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame, kgrad.Report]:
    model, report, x_train, y_train = initial_report(slug, arguments, data, settings)
    logger = kgrad.GradientNormLogger(csv_path=os.path.join(out, "logs", f"{slug}.csv"))
    callbacks: list[keras.callbacks.Callback] = [logger]
    if progress is not None:
        callbacks.append(progress)
    history = model.fit(
        x_train,
        y_train,
        validation_data=(data.x_test, data.y_test),
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        verbose=0,
        callbacks=callbacks,
    )
    frame = logger.to_dataframe()
    curves = pd.DataFrame(history.history).rename_axis("epoch").reset_index()
    curves.insert(0, "model", label)
    row = {
        "model": label,
        "train_accuracy": history.history["accuracy"][-1],
        "val_accuracy": history.history["val_accuracy"][-1],
        "val_loss": history.history["val_loss"][-1],
        "decay_per_layer": report.decay,
        "first_to_last": report.first_to_last,
        "findings": "; ".join(
            f"{finding.severity}: {finding.kind}" for finding in report.findings
        )
        or "none",
    }
    frame.insert(0, "model", label)
    return row, frame, curves, report


def profile_figure(reports: dict[str, kgrad.Report]) -> Any:
    """The four models' backpropagated signal at initialization, one measure for all.

    Each line is `report.layers` drawn with activation gradients (the measure of
    `kgrad.diagnose`), so its legend's per-layer factor is `report.decay`, printed
    with `kgrad.plots.profile.format_factor` as in the results table and `summary.md`.
    """
    from kgrad import plots

    figure = plots.plot_gradient_profile(
        {label: report.layers for label, report in reports.items()}, kind="activation"
    )
    figure.axes[0].set_title(
        "Backpropagated signal across depth, at initialization (kgrad.diagnose)"
    )
    return figure


def heatmap_figure(frames: dict[str, pd.DataFrame]) -> Any:
    """The gradient flow of each training run, one measure and one colour scale."""
    import matplotlib.pyplot as plt

    from kgrad import plots
    from kgrad.plots.profile import common_kind

    kind = common_kind(frames)
    values = pd.concat(frame.grad_norm for frame in frames.values()).to_numpy()
    values = values[np.isfinite(values) & (values > 0)]
    color_range = (float(values.min()), float(values.max())) if values.size else None
    figure, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    for ax, (label, frame) in zip(axes.flat, frames.items()):
        plots.plot_gradient_heatmap(frame, ax=ax, kind=kind, color_range=color_range)
        ax.set_title(f"{label}: {kind}-gradient norm")
    figure.suptitle("Gradient flow during training (one colour scale for all four)")
    return figure


def _write_plots(
    reports: dict[str, kgrad.Report], frames: dict[str, pd.DataFrame],
    curves: pd.DataFrame, out: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure = profile_figure(reports)
    figure.savefig(os.path.join(out, "gradient_profile.png"), dpi=110, bbox_inches="tight")
    plt.close(figure)

    figure = heatmap_figure(frames)
    figure.savefig(os.path.join(out, "gradient_heatmaps.png"), dpi=110)
    plt.close(figure)

    figure, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for label, group in curves.groupby("model", sort=False):
        line = ax.plot(group.epoch + 1, group.val_accuracy, label=f"{label} (validation)")
        ax.plot(group.epoch + 1, group.accuracy, ls="--", color=line[0].get_color())
    ax.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1),
           title="Accuracy on digits (dashed: training)")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.savefig(os.path.join(out, "accuracy.png"), dpi=110)
    plt.close(figure)


def finding_lines(report: kgrad.Report) -> list[str]:
    """The findings of `report` as `print(report)` shows them: summary, then fixes."""
    lines = []
    for finding in report.findings:
        lines.append(finding.summary())
        lines.extend(f"    fix: {fix}" for fix in finding.fixes)
    return lines or ["no finding"]


def _write_summary(
    results: pd.DataFrame, reports: dict[str, kgrad.Report], settings: DemoSettings,
    seconds: float, out: str,
) -> None:
    from kgrad.plots.profile import format_factor

    table = results.copy()
    for column in ("train_accuracy", "val_accuracy", "val_loss"):
        table[column] = table[column].map("{:.3f}".format)
    table["decay_per_layer"] = table["decay_per_layer"].map(format_factor)
    table["first_to_last"] = table["first_to_last"].map("{:.2g}".format)
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "---|" * len(table.columns)
    rows = ["| " + " | ".join(map(str, r)) + " |" for r in table.itertuples(index=False)]
    lines = [
        "# kgrad demo: vanishing gradients and their fixes",
        "",
        f"Digits (scikit-learn, offline), {settings.depth} hidden layers of "
        f"{settings.width} units, SGD lr {settings.learning_rate} momentum 0.9, batch "
        f"{settings.batch_size}, {settings.epochs} epochs; {seconds:.0f} s in all.",
        "",
        f"{MEASURE_NOTE}",
        "",
        header,
        rule,
        *rows,
        "",
        "## The backpropagated signal across depth, at initialization",
        "",
        "![gradient profile](gradient_profile.png)",
        "",
        "## Gradient flow over training",
        "",
        "![gradient heatmaps](gradient_heatmaps.png)",
        "",
        "## Accuracy",
        "",
        "![accuracy](accuracy.png)",
        "",
        "Batch norm's validation accuracy lags its training accuracy until the moving "
        "statistics (momentum 0.99) settle.",
        "",
        "## Findings at initialization (`kgrad.diagnose`)",
        "",
    ]
    for label, report in reports.items():
        lines.append(f"### {label}")
        lines.append("")
        lines.extend(["```", *finding_lines(report), "```", ""])
    lines.append("The per-step logs are in `logs/` (one CSV per model).")
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def run_demo(
    out: str | os.PathLike = "kgrad-report",
    *,
    quick: bool = False,
    settings: DemoSettings | None = None,
    verbose: int = 1,
) -> pd.DataFrame:
    """Trains the four models and writes the report folder.

    Args:
        out: The report folder (created; existing files are overwritten, logs are
            appended). Defaults to `"kgrad-report"`.
        quick: A run of seconds (`DemoSettings.quick()`), for tests. Defaults to
            `False`.
        settings: The experiment's size; overrides `quick`. Defaults to `None`.
        verbose: `1` prints a progress line per epoch and the results table.
            Defaults to `1`.

    Returns:
        The results table: one row per model with `model`, `train_accuracy`,
        `val_accuracy`, `val_loss`, `first_to_last`, `decay_per_layer`, `findings`.

    Raises:
        ValueError: if `out` cannot be written.

    Example:

    >>> table = run_demo("report", quick=True)  # doctest: +SKIP
    """
    from kgrad.records.paths import check_writable_dir

    out = check_writable_dir(out, "out")
    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    data = datasets.load("digits", seed=settings.seed)
    started = time.perf_counter()
    rows, frames, curves, reports = [], {}, [], {}
    for number, (label, (slug, arguments)) in enumerate(MODELS.items(), start=1):
        progress = _Progress(label, f"{number}/{len(MODELS)}", started) if verbose else None
        row, frame, curve, reports[label] = _train_one(
            label, slug, arguments, data, settings, out, progress
        )
        rows.append(row)
        frames[label] = frame
        curves.append(curve)
    results = pd.DataFrame(rows)
    history = pd.concat(curves, ignore_index=True)
    results.to_csv(os.path.join(out, "results.csv"), index=False)
    history.to_csv(os.path.join(out, "history.csv"), index=False)
    _write_plots(reports, frames, history, out)
    seconds = time.perf_counter() - started
    _write_summary(results, reports, settings, seconds, out)
    if verbose:
        with pd.option_context("display.width", 120, "display.max_colwidth", 60):
            print()
            print(results_text(results))
        print()
        print(where_text(out, seconds))
    return results


def where_text(out: str | os.PathLike, seconds: float) -> str:
    """Two lines: the path of the results table and of the report folder."""
    folder = os.path.abspath(out)
    return (
        f"Results table: {os.path.join(folder, 'results.csv')}\n"
        f"Report written to {folder}{os.sep} in {seconds:.0f} s (open summary.md)."
    )


def results_text(results: pd.DataFrame) -> str:
    """The results table as printed: the per-layer factor as in the plot's legend."""
    from kgrad.plots.profile import format_factor

    return results.to_string(
        index=False,
        formatters={"decay_per_layer": format_factor},
        float_format=lambda v: f"{v:.3g}",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `kgrad demo` options to `parser`."""
    parser.add_argument("--out", default="kgrad-report", help="report folder (default: kgrad-report)")
    parser.add_argument("--quick", action="store_true", help="a run of seconds (for tests)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per model (default 30)")
    parser.add_argument("--depth", type=int, default=None, help="hidden layers (default 15)")
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress lines or table; only where the table and report are",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into a folder that holds another report (one of `kgrad diagnose` "
        "or `kgrad report`); a previous demo report there is always remade",
    )


def run(args: argparse.Namespace) -> int:
    """Runs `kgrad demo` from parsed arguments; returns the exit code."""
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    overrides = {k: v for k, v in (("epochs", args.epochs), ("depth", args.depth)) if v is not None}
    for name, value in overrides.items():
        if value < 1:
            print(f"kgrad demo: --{name} must be a positive integer. Received: {value}",
                  file=sys.stderr)
            return 2
    settings = dataclasses.replace(settings, **overrides)
    if not os.path.exists(os.path.join(args.out, "results.csv")):  # not a demo report
        cli.check_out(args.out, args.force)
    started = time.perf_counter()
    run_demo(args.out, settings=settings, verbose=0 if args.quiet else 1)
    if args.quiet:
        print(where_text(args.out, time.perf_counter() - started))
    return 0


COMMAND = (
    "Train a deep sigmoid MLP and its three fixes on digits and write a report",
    add_arguments,
    run,
)
