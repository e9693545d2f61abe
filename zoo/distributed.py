"""Distributed keras-tuner search on one machine: a chief and N workers on loopback.

keras-tuner distributes a search with its own engine: the same script runs in every
process, and environment variables tell each one its role. The chief (`KERASTUNER_TUNER_ID
=chief`) serves the oracle over gRPC at `KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT` and
blocks in `search()`; each worker (`tuner0`, `tuner1`, ...) asks it for trials, trains them
and reports back. `launch` (or `python -m zoo.distributed`) starts them all, prefixes and
streams their output (`[chief] ...`, `[tuner0] ...`), waits for every worker and then the
chief, and returns `zoo.tuner_results` of the project. On Ctrl-C, a timeout or a process
exiting with an error it stops every process it started (each in its own process group:
SIGTERM, then SIGKILL after `grace` seconds) and raises.

The script contract:

- build a keras-tuner tuner with a fixed `directory` and `project_name` and call
  `search()`; the launcher exports `ZOO_TUNER_DIRECTORY` (and `ZOO_TUNER_PROJECT`) when
  `launch` gets `directory` (and `project_name`), for the script to use;
- do not pass `overwrite=True`: every process builds the tuner, and a later one would
  wipe the files of the others;
- give the tuner a nonzero `seed` if the search must be reproducible.

`zoo/examples/distributed_digits.py` is such a script. keras-tuner's chief polls every
20 s before it leaves `search()`; once every worker has exited cleanly, every trial has
ended and the oracle has saved it, so the launcher waits `chief_grace` seconds for the chief
and then stops it (not an error).

Several machines: run the same script on every machine, with the chief's address:

    # machine A (the chief, reachable at 10.0.0.1):
    KERASTUNER_TUNER_ID=chief KERASTUNER_ORACLE_IP=0.0.0.0 \\
        KERASTUNER_ORACLE_PORT=8000 python search.py
    # machines B, C, ... (one unique tuner id per worker process):
    KERASTUNER_TUNER_ID=tuner0 KERASTUNER_ORACLE_IP=10.0.0.1 \\
        KERASTUNER_ORACLE_PORT=8000 python search.py

Open the port on the chief's firewall. Trial metrics reach the chief over gRPC, but each
worker writes checkpoints and `zoo_trial.json` (history, divergence reason) to its own
`directory`: put `directory` on a shared file system to read everything with
`zoo.tuner_results`; otherwise the table lacks only the reasons' details (rebuilt from the
numeric codes) and the histories.

Example:

    python -m zoo.distributed zoo/examples/distributed_digits.py --workers 2 \\
        --directory searches --project-name digits -- --max-trials 6
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

import pandas as pd

from zoo.builders._checks import check_int
from zoo.tuning.results import tuner_results


class LaunchError(RuntimeError):
    """A process of a distributed search failed, or the search timed out."""


@dataclasses.dataclass
class _Child:
    name: str
    process: subprocess.Popen
    tail: collections.deque
    reader: threading.Thread | None = None


def check_port_free(host: str, port: int) -> None:
    """Raises a ValueError naming `port` if something on `host` already uses it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(
                f"`port={port}` is already in use on {host} ({error.strerror}). Pass "
                "another port, or port=None to pick a free one."
            ) from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def launch(
    script: str | os.PathLike,
    *,
    workers: int = 2,
    port: int | None = None,
    host: str = "127.0.0.1",
    args: Sequence[str] = (),
    directory: str | os.PathLike | None = None,
    project_name: str | None = None,
    timeout: float | None = None,
    chief_grace: float = 25.0,
    grace: float = 5.0,
    stream: TextIO | None = None,
) -> pd.DataFrame | None:
    """Runs `script` as a keras-tuner chief and `workers` workers, and returns the results.

    Args:
        script: The search script (see the module docstring for its contract).
        workers: Number of worker processes, >= 1. Defaults to `2`.
        port: The oracle's port. Defaults to `None`: a free port.
        host: The chief's address. Defaults to `"127.0.0.1"`.
        args: Command-line arguments for the script. Defaults to `()`.
        directory: The tuner's `directory`, exported as `ZOO_TUNER_DIRECTORY`, and where
            the results are read. Defaults to `None`: the script decides, and `launch`
            returns None.
        project_name: The tuner's `project_name`, exported as `ZOO_TUNER_PROJECT`.
            Defaults to `None` (the only project in `directory`).
        timeout: Seconds before everything is stopped and `LaunchError` raised. Defaults
            to `None`, no limit.
        chief_grace: Seconds the chief may take to exit after the last worker before the
            launcher stops it. Defaults to `25.0` (keras-tuner's chief polls every 20 s).
        grace: Seconds between SIGTERM and SIGKILL when stopping processes. Defaults to
            `5.0`.
        stream: Where the prefixed output goes. Defaults to `None`: `sys.stdout`.

    Returns:
        `zoo.tuner_results(directory, project_name=project_name)`, or None without
        `directory`.

    Raises:
        ValueError: If `script` is not a file, `workers` < 1 or `port` is in use (before
            anything starts).
        LaunchError: If a process exits with an error (the message names it and quotes
            its last lines) or the search exceeds `timeout`; every process is stopped.
        KeyboardInterrupt: On Ctrl-C, after stopping every process.

    Example:

    >>> frame = launch("zoo/examples/distributed_digits.py", workers=2,
    ...                directory="searches", project_name="digits")  # doctest: +SKIP
    """
    script = os.fspath(script)
    if not os.path.isfile(script):
        raise ValueError(f"`script` must be a Python file. Received: script={script!r} "
                         "(no such file)")
    workers = check_int(workers, "workers", minimum=1)
    if port is None:
        port = free_port(host)
    else:
        check_port_free(host, check_int(port, "port"))
    stream = stream or sys.stdout
    lock = threading.Lock()
    environment = dict(os.environ, KERASTUNER_ORACLE_IP=host,
                       KERASTUNER_ORACLE_PORT=str(port), PYTHONUNBUFFERED="1")
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if directory is not None:
        environment["ZOO_TUNER_DIRECTORY"] = os.fspath(directory)
    if project_name is not None:
        environment["ZOO_TUNER_PROJECT"] = project_name

    children: list[_Child] = []
    try:
        for name in ["chief"] + [f"tuner{index}" for index in range(workers)]:
            children.append(_start(name, script, args, environment, stream, lock))
        _wait(children, timeout, chief_grace, grace, stream, lock)
    except BaseException as error:
        stopped = _stop(children, grace)
        if stopped:
            _say(stream, lock, f"[launcher] stopped {', '.join(stopped)}")
        if isinstance(error, KeyboardInterrupt):
            _say(stream, lock, "[launcher] interrupted")
        raise
    finally:
        for child in children:
            if child.reader is not None:
                child.reader.join(timeout=grace)
    if directory is None:
        return None
    return tuner_results(directory, project_name=project_name)


def _say(stream: TextIO, lock: threading.Lock, line: str) -> None:
    with lock:
        stream.write(line.rstrip("\n") + "\n")
        stream.flush()


def _start(name, script, args, environment, stream, lock) -> _Child:
    process = subprocess.Popen(
        [sys.executable, script, *args],
        env=dict(environment, KERASTUNER_TUNER_ID=name),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,  # its own process group, stopped as a whole
    )
    child = _Child(name, process, collections.deque(maxlen=15))

    def forward() -> None:
        for line in process.stdout:
            child.tail.append(line.rstrip("\n"))
            _say(stream, lock, f"[{name}] {line}")

    child.reader = threading.Thread(target=forward, name=f"zoo-{name}", daemon=True)
    child.reader.start()
    return child


def _failure(child: _Child, others: list[_Child], what: str) -> LaunchError:
    tail = "\n".join(f"    {line}" for line in child.tail)
    return LaunchError(
        f"{child.name} {what}; stopping {', '.join(c.name for c in others) or 'nothing'}. "
        f"Its last lines:\n{tail}"
    )


def _wait(children, timeout, chief_grace, grace, stream, lock) -> None:
    chief, workers = children[0], children[1:]
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        for child in children:
            code = child.process.poll()
            if code not in (None, 0):
                others = [c for c in children if c is not child and c.process.poll() is None]
                raise _failure(child, others, f"exited with code {code}")
        if all(worker.process.poll() == 0 for worker in workers):
            break
        if deadline is not None and time.monotonic() > deadline:
            raise LaunchError(f"The search did not finish within timeout={timeout} s.")
        time.sleep(0.2)
    try:
        code = chief.process.wait(timeout=chief_grace)
    except subprocess.TimeoutExpired:
        _say(stream, lock, "[launcher] every worker is done; stopping the chief")
        _stop([chief], grace)
        return
    if code != 0:
        raise _failure(chief, [], f"exited with code {code}")


def _stop(children: list[_Child], grace: float) -> list[str]:
    """SIGTERM to each live child's process group, SIGKILL after `grace`; their names."""
    alive = [child for child in children if child.process.poll() is None]
    for child in alive:
        _signal_group(child.process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in alive:
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(child.process, signal.SIGKILL)
            child.process.wait()
    return [child.name for child in alive]


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m zoo.distributed SCRIPT.py --workers N [--port P] [-- script args]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, script_args = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m zoo.distributed",
        description="Run a keras-tuner search script as a chief and N workers on this "
        "machine.",
    )
    parser.add_argument("script", help="the search script")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--port", type=int, default=None, help="oracle port (a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="oracle address (127.0.0.1)")
    parser.add_argument("--directory", default=None, help="the tuner's directory")
    parser.add_argument("--project-name", default=None, help="the tuner's project name")
    parser.add_argument("--timeout", type=float, default=None, help="seconds (no limit)")
    options = parser.parse_args(argv)
    try:
        frame = launch(options.script, workers=options.workers, port=options.port,
                       host=options.host, args=script_args, directory=options.directory,
                       project_name=options.project_name, timeout=options.timeout)
    except ValueError as error:
        parser.error(str(error))
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if frame is not None:
        print(frame.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
