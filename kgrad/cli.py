"""The `kgrad` command: `kgrad diagnose MODEL.keras`, `kgrad report LOG.csv`.

`kgrad --help` and `kgrad --version` import neither TensorFlow nor the plugins; a
subcommand imports what it needs when it runs. TensorFlow's C++ log lines (`failed call
to cuInit`, `Could not find cuda drivers`) are filtered out unless `--verbose` is
given; an explicit `TF_CPP_MIN_LOG_LEVEL` is kept.

Subcommands are registered in `SUBCOMMANDS`, one entry each: a help line, a function
that adds the subcommand's arguments to its parser, and a function that runs it and
returns the exit status. Other installed packages add subcommands through the
`kgrad.commands` entry-point group, each entry naming a `(help, add_arguments, run)`
triple: `zoo` registers `kgrad demo` that way (`zoo.demo:COMMAND`), so `kgrad` never
imports `zoo` by name.

Bad input (a missing or unloadable file, a malformed data file, a report folder that
already holds a report) ends with a one-line message on stderr and exit status 2,
without a traceback.

`diagnose` and `report` write next to their input (`grads.csv` -> `grads-report/`) or
to `--out`, and refuse to overwrite files of another report there without `--force`.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

EXIT_BAD_INPUT = 2
# TensorFlow's C++ logging: 3 hides its info, warning and error lines (the error-level
# `failed call to cuInit` on a machine without a GPU included).
QUIET_TF_LOG_LEVEL = "3"
# A line of TensorFlow's C++ logging (`I0000 00:00:1796.86 123 cudart_stub.cc:31] ...`),
# or absl's note that such lines go to stderr before its logging is set up.
TF_LOG_LINE = re.compile(
    r"^([IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called)"
)
# Files that mark a folder as holding a report (of `kgrad diagnose`, `report`, `demo`).
REPORT_FILES = (
    "gradient_profile.png",
    "gradient_heatmap.png",
    "gradient_heatmaps.png",
    "unit_health.png",
    "summary.md",
)


class CliError(Exception):
    """Bad input: reported on one line, exit status 2."""


class Subcommand(NamedTuple):
    """One `kgrad` subcommand: its help, its arguments, and what it runs."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def default_out(path: str) -> str:
    """The report folder beside an input file: `logs/grads.csv` -> `logs/grads-report`."""
    return os.path.splitext(path)[0] + "-report"


def check_out(path: str | os.PathLike, force: bool) -> str:
    """Returns `path`, or raises `CliError` if it holds a report and not `force`.

    Args:
        path: The report folder about to be written.
        force: Whether overwriting the files of a report there is allowed.

    Returns:
        `path` as a string.

    Raises:
        CliError: if `path` holds any of `REPORT_FILES` and `force` is false.
    """
    path = os.fspath(path)
    if os.path.isdir(path) and not force:
        taken = [name for name in REPORT_FILES if os.path.exists(os.path.join(path, name))]
        if taken:
            raise CliError(
                f"{path} already holds a report ({', '.join(taken)}); pass --force to "
                "overwrite it, or --out to write elsewhere"
            )
    return path


def _out_dir(path: str) -> str:
    """Creates the report folder `path` (checked with `check_out` beforehand)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise CliError(
            f"cannot create the output folder {path!r}: {error.strerror}"
        ) from None
    return path


def _add_out_args(parser: argparse.ArgumentParser, beside: str) -> None:
    parser.add_argument(
        "--out",
        default=None,
        help=f"folder for the plots (default: beside the {beside}, "
        f"`NAME.{'csv' if beside == 'log' else 'keras'}` -> `NAME-report/`)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite the plots of a report already in the folder",
    )


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
    _add_out_args(parser, "model")
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

    out = check_out(args.out or default_out(args.model), args.force)
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
    _out_dir(out)
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
    _add_out_args(parser, "log")


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

    out = check_out(args.out or default_out(args.log), args.force)
    frame = load_log(args.log)
    print(diagnose_records(frame))
    _out_dir(out)
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


def _literal_help(entry: Any) -> str | None:
    """The help line of a plugin's `(help, add_arguments, run)` triple, read from its
    source without importing it (its package may import TensorFlow), or `None`."""
    module, _, attribute = entry.value.partition(":")
    top, _, rest = module.partition(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level spec runs no package code
        folders = list(spec.submodule_search_locations or []) if spec else []
        path = (
            os.path.join(folders[0], *rest.split(".")) + ".py"
            if rest and folders
            else spec.origin
        )
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
    except (ImportError, OSError, SyntaxError, ValueError, AttributeError, TypeError):
        return None
    for node in tree.body:
        targets = getattr(node, "targets", [getattr(node, "target", None)])
        if any(getattr(target, "id", None) == attribute for target in targets):
            value = getattr(node, "value", None)
            if isinstance(value, ast.Tuple) and value.elts:
                first = value.elts[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    return first.value
    return None


def plugin_subcommands(load: str | None = None) -> dict[str, Subcommand]:
    """Subcommands that installed packages declare in the `kgrad.commands` group.

    Args:
        load: The one subcommand to import (the one being run). The others get a
            stand-in whose help line is read from their source, so that `kgrad
            --help` imports no plugin. Defaults to `None`: import none.

    Returns:
        The subcommands by name.
    """
    from importlib.metadata import entry_points

    found = {}
    for entry in entry_points(group="kgrad.commands"):
        if entry.name in SUBCOMMANDS:
            continue
        if entry.name == load:
            found[entry.name] = Subcommand(*entry.load())
        else:
            help_line = _literal_help(entry) or f"(from {entry.value})"
            found[entry.name] = Subcommand(help_line, lambda parser: None, None)
    return found


def _verbosity_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show TensorFlow's C++ log lines (hidden by default)",
    )


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `kgrad` argument parser, with one subparser per subcommand.

    Args:
        command: The subcommand about to run: the only plugin subcommand whose
            module is imported. Defaults to `None`.

    Returns:
        The parser.
    """
    from kgrad import __version__

    parser = argparse.ArgumentParser(
        prog="kgrad", description="Gradient-health diagnostics for Keras models."
    )
    parser.add_argument(
        "--version", action="version", version=f"kgrad {__version__}"
    )
    _verbosity_args(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, sub_command in {**plugin_subcommands(command), **SUBCOMMANDS}.items():
        sub = subparsers.add_parser(
            name, help=sub_command.help, description=sub_command.help
        )
        sub_command.add_arguments(sub)
        _verbosity_args(sub)
        sub.set_defaults(run=sub_command.run)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in `argv` (its first argument that is not an option)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def quiet_tensorflow(argv: Sequence[str]) -> None:
    """Hides TensorFlow's C++ log lines unless `argv` asks for `--verbose`.

    Must run before TensorFlow is imported. An explicit `TF_CPP_MIN_LOG_LEVEL` in the
    environment is kept either way.
    """
    if "--verbose" in argv or "-v" in argv:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_TF_LOG_LEVEL)


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow and finds its devices with its C++ log lines filtered out.

    TensorFlow 2.18+ writes some lines through absl before its own log level applies
    (`Could not find cuda drivers`), so `TF_CPP_MIN_LOG_LEVEL` alone does not hide them:
    stderr is captured at the file-descriptor level for the import, and every line
    that is not a C++ log line (a Python warning, say) is written back.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        except ImportError:  # the subcommand reports what is missing
            pass
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        lines = captured.read().decode("utf-8", "replace").splitlines()
    kept = [line for line in lines if not TF_LOG_LINE.match(line)]
    if kept:
        print("\n".join(kept), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `kgrad` with `argv` (default: the command line); returns the exit status.

    Example:

    >>> main(["report", "grads.csv", "--out", "plots"])  # doctest: +SKIP
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    if command is None and "--version" in argv:  # without reading the entry points
        from kgrad import __version__

        print(f"kgrad {__version__}")
        return 0
    quiet_tensorflow(argv)
    helping = "--help" in argv or "-h" in argv
    # A plugin command (`demo`) is imported to build its parser, `--help` included,
    # and its module imports Keras and TensorFlow: quietly, then, as for a run.
    if command is not None and (not helping or command not in SUBCOMMANDS):
        if "--verbose" not in argv and "-v" not in argv:
            import_tensorflow_quietly()
    parser = build_parser(command)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a usage error already printed
        return int(exit_.code or 0)
    try:
        return args.run(args)
    except CliError as error:
        print(f"kgrad {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
