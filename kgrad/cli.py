"""The `kgrad` command: `kgrad diagnose MODEL.keras`, `kgrad report LOG.csv`.

Subcommands are registered in `SUBCOMMANDS`, one entry each: a help line, a function
that adds the subcommand's arguments to its parser, and a function that runs it and
returns the exit status. Other installed packages add subcommands through the
`kgrad.commands` entry-point group, each entry naming a `(help, add_arguments, run)`
triple: `zoo` registers `kgrad demo` that way (`zoo.demo:COMMAND`), so `kgrad` never
imports `zoo` by name.

Bad input (a missing or unloadable file, a malformed data file) ends with a one-line
message on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

EXIT_BAD_INPUT = 2
DEFAULT_OUT = "kgrad-report"


class CliError(Exception):
    """Bad input: reported on one line, exit status 2."""


class Subcommand(NamedTuple):
    """One `kgrad` subcommand: its help, its arguments, and what it runs."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _out_dir(path: str) -> str:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise CliError(
            f"cannot create the output folder {path!r}: {error.strerror}"
        ) from None
    return path


def _save(figure: Any, out: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out, name)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# -- kgrad diagnose -------------------------------------------------------------------


def add_diagnose_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a saved Keras model (.keras)")
    parser.add_argument(
        "--data",
        help="an .npz file with an array `x` (and optionally `y`); default: random "
        "normal inputs of the model's input shape",
    )
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=f"folder for the plots (default: {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=512,
        help="random inputs to draw when no --data is given (default: 512)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def load_model(path: str) -> Any:
    """Loads a `.keras` model, or raises `CliError` saying why it cannot."""
    import keras

    if not os.path.exists(path):
        raise CliError(f"model file not found: {path}")
    if os.path.isdir(path) or not path.endswith((".keras", ".h5", ".hdf5")):
        raise CliError(
            f"{path} is not a saved Keras model: give a `.keras` file "
            '(`model.save("model.keras")`)'
        )
    try:
        return keras.saving.load_model(path)
    except Exception as error:  # zip, JSON, deserialization errors of all kinds
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CliError(
            f"could not load the model {path}: {type(error).__name__}: {first}"
        ) from None


def load_data(path: str) -> tuple[Any, Any]:
    """Reads `x` (and `y` if present) from an `.npz` file, or raises `CliError`."""
    import numpy as np

    if not os.path.exists(path):
        raise CliError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            if "x" not in names:
                raise CliError(
                    f"{path} has no array named `x` (arrays: {names or 'none'}); save "
                    "it with `np.savez(path, x=x, y=y)`"
                )
            return archive["x"], archive["y"] if "y" in names else None
    except CliError:
        raise
    except Exception as error:
        raise CliError(
            f"could not read {path} as an .npz file: {type(error).__name__}: {error}"
        ) from None


def random_inputs(model: Any, samples: int, seed: int) -> Any:
    """Standard normal inputs of the model's input shape(s)."""
    import numpy as np

    if samples < 1:
        raise CliError(f"--samples must be a positive integer, received {samples}")
    try:
        inputs = model.inputs
    except AttributeError:
        inputs = None
    if not inputs:
        raise CliError(
            "the model has no declared input shape (subclassed); give inputs "
            "with --data"
        )
    rng = np.random.default_rng(seed)
    arrays = []
    for tensor in inputs:
        shape = tuple(tensor.shape[1:])
        if any(size is None for size in shape) or "int" in str(tensor.dtype):
            raise CliError(
                f"cannot draw random inputs for input {tensor.name!r} of shape "
                f"{tuple(tensor.shape)} and dtype {tensor.dtype}; give inputs with "
                "--data"
            )
        arrays.append(rng.standard_normal((samples, *shape)).astype(str(tensor.dtype)))
    return arrays[0] if len(arrays) == 1 else arrays


def run_diagnose(args: argparse.Namespace) -> int:
    from kgrad.diagnosis.diagnose import diagnose
    from kgrad.plots.profile import plot_gradient_profile
    from kgrad.plots.unit_health import plot_unit_health

    model = load_model(args.model)
    if args.data:
        x, y = load_data(args.data)
        if y is not None and not getattr(model, "compiled", False):
            print(
                "kgrad diagnose: the model has no compiled loss; `y` is ignored "
                "(a random Gaussian signal is backpropagated).",
                file=sys.stderr,
            )
            y = None
    else:
        x, y = random_inputs(model, args.samples, args.seed), None
    try:
        report = diagnose(model, x, y, seed=args.seed)
    except ValueError as error:
        raise CliError(str(error).splitlines()[0]) from None
    out = _out_dir(args.out)
    print(report)
    name = os.path.splitext(os.path.basename(args.model))[0]
    paths = [
        _save(
            plot_gradient_profile({name: report.layers}), out, "gradient_profile.png"
        ),
        _save(plot_unit_health(report.layers), out, "unit_health.png"),
    ]
    print("\nWrote " + ", ".join(paths))
    return 0


# -- kgrad report ---------------------------------------------------------------------


def add_report_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", help="a CSV written by GradientNormLogger(csv_path=...)")
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=f"folder for the plots (default: {DEFAULT_OUT})",
    )


def load_log(path: str) -> Any:
    """Reads a logger CSV, or raises `CliError` saying why it cannot."""
    import pandas as pd

    if not os.path.exists(path):
        raise CliError(f"log file not found: {path}")
    try:
        frame = pd.read_csv(path)
    except Exception as error:
        raise CliError(
            f"could not read {path} as a CSV: {type(error).__name__}: {error}"
        ) from None
    missing = [c for c in ("step", "layer", "variable", "grad_norm") if c not in frame]
    if missing or frame.empty:
        raise CliError(
            f"{path} is not a GradientNormLogger CSV (missing columns {missing})"
            if missing
            else f"{path} holds no rows"
        )
    return frame


def run_report(args: argparse.Namespace) -> int:
    from kgrad.diagnosis.from_records import diagnose_records
    from kgrad.plots.heatmap import plot_gradient_heatmap
    from kgrad.plots.profile import plot_gradient_profile

    frame = load_log(args.log)
    print(diagnose_records(frame))
    out = _out_dir(args.out)
    paths = [
        _save(plot_gradient_profile(frame), out, "gradient_profile.png"),
        _save(plot_gradient_heatmap(frame), out, "gradient_heatmap.png"),
    ]
    print("\nWrote " + ", ".join(paths))
    return 0


SUBCOMMANDS: dict[str, Subcommand] = {
    "diagnose": Subcommand(
        "diagnose a saved model: print the gradient-health report, write the plots",
        add_diagnose_args,
        run_diagnose,
    ),
    "report": Subcommand(
        "draw the plots and findings of a saved GradientNormLogger CSV",
        add_report_args,
        run_report,
    ),
}


def plugin_subcommands() -> dict[str, Subcommand]:
    """Subcommands that installed packages declare in the `kgrad.commands` group."""
    from importlib.metadata import entry_points

    found = {}
    for entry in entry_points(group="kgrad.commands"):
        if entry.name not in SUBCOMMANDS:
            found[entry.name] = Subcommand(*entry.load())
    return found


def build_parser() -> argparse.ArgumentParser:
    """The `kgrad` argument parser, with one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="kgrad", description="Gradient-health diagnostics for Keras models."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in {**plugin_subcommands(), **SUBCOMMANDS}.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `kgrad` with `argv` (default: the command line); returns the exit status.

    Example:

    >>> main(["report", "grads.csv", "--out", "plots"])  # doctest: +SKIP
    0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed
        return int(exit_.code or 0)
    try:
        return args.run(args)
    except CliError as error:
        print(f"kgrad {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
