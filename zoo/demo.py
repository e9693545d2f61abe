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


def _train_one(
    label: str,
    slug: str,
    arguments: dict[str, Any],
    data: datasets.Dataset,
    settings: DemoSettings,
    out: str,
    progress: keras.callbacks.Callback | None,
) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame, list[str]]:
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
    report = kgrad.diagnose(model, x_train[:512], y_train[:512])
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
    findings = [f"{finding.severity}: {finding.kind}" for finding in report.findings]
    first_epoch = logger.records.first_to_last()[logger.records.epochs == 0]
    row = {
        "model": label,
        "train_accuracy": history.history["accuracy"][-1],
        "val_accuracy": history.history["val_accuracy"][-1],
        "val_loss": history.history["val_loss"][-1],
        "first_to_last": float(np.nanmedian(first_epoch)),
        "decay_per_layer": report.decay,
        "findings": "; ".join(findings) or "none",
    }
    frame.insert(0, "model", label)
    return row, frame, curves, [str(finding) for finding in report.findings]


def _write_plots(frames: dict[str, pd.DataFrame], curves: pd.DataFrame, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from kgrad import plots

    first_epoch = {label: frame[frame.epoch == 0] for label, frame in frames.items()}
    figure = plots.plot_gradient_profile(first_epoch)
    figure.savefig(os.path.join(out, "gradient_profile.png"), dpi=110, bbox_inches="tight")
    plt.close(figure)

    figure, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    for ax, (label, frame) in zip(axes.flat, frames.items()):
        plots.plot_gradient_heatmap(frame, ax=ax)
        ax.set_title(label)
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


def _write_summary(
    results: pd.DataFrame, findings: dict[str, list[str]], settings: DemoSettings,
    seconds: float, out: str,
) -> None:
    table = results.copy()
    for column in ("train_accuracy", "val_accuracy", "val_loss"):
        table[column] = table[column].map("{:.3f}".format)
    for column in ("first_to_last", "decay_per_layer"):
        table[column] = table[column].map("{:.2g}".format)
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
        "`first_to_last`: median over the first epoch of the first layer's gradient "
        "norm over the last layer's (bias norms, the backpropagated signal). "
        "`decay_per_layer`: `kgrad.diagnose` at initialization.",
        "",
        header,
        rule,
        *rows,
        "",
        "## Gradient profile across depth (first epoch)",
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
    for label, texts in findings.items():
        lines.append(f"### {label}")
        lines.append("")
        lines.extend(["```", *(texts or ["no finding"]), "```", ""])
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
    rows, frames, curves, findings = [], {}, [], {}
    for number, (label, (slug, arguments)) in enumerate(MODELS.items(), start=1):
        progress = _Progress(label, f"{number}/{len(MODELS)}", started) if verbose else None
        row, frame, curve, texts = _train_one(
            label, slug, arguments, data, settings, out, progress
        )
        rows.append(row)
        frames[label] = frame
        curves.append(curve)
        findings[label] = texts
    results = pd.DataFrame(rows)
    history = pd.concat(curves, ignore_index=True)
    results.to_csv(os.path.join(out, "results.csv"), index=False)
    history.to_csv(os.path.join(out, "history.csv"), index=False)
    _write_plots(frames, history, out)
    seconds = time.perf_counter() - started
    _write_summary(results, findings, settings, seconds, out)
    if verbose:
        with pd.option_context("display.width", 120, "display.max_colwidth", 60):
            print()
            print(results.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        print(f"\nReport written to {os.path.abspath(out)}/ in {seconds:.0f} s "
              f"(open summary.md).")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `kgrad demo` options to `parser`."""
    parser.add_argument("--out", default="kgrad-report", help="report folder (default: kgrad-report)")
    parser.add_argument("--quick", action="store_true", help="a run of seconds (for tests)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per model (default 30)")
    parser.add_argument("--depth", type=int, default=None, help="hidden layers (default 15)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


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
    run_demo(args.out, settings=settings, verbose=0 if args.quiet else 1)
    return 0


COMMAND = (
    "Train a deep sigmoid MLP and its three fixes on digits and write a report",
    add_arguments,
    run,
)
