"""The distributed launcher: a real chief + 2 workers search, crashes, Ctrl-C, bad input."""

from __future__ import annotations

import io
import json
import os
import re
import runpy
import signal
import socket
import sys
import textwrap
import threading
import time

import pytest

import zoo.examples.distributed_digits as example
from zoo import distributed

# A stand-in search script: records its pid, then sleeps; the role named in argv[1]
# exits with code 3 once every process has started.
FAKE_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    role, folder, expected = os.environ["KERASTUNER_TUNER_ID"], sys.argv[2], int(sys.argv[3])
    with open(os.path.join(folder, role), "w") as stream:
        stream.write(str(os.getpid()))
    print(f"{role} started", flush=True)
    while len(os.listdir(folder)) < expected:
        time.sleep(0.05)
    if role == sys.argv[1]:
        print("something went wrong", flush=True)
        sys.exit(3)
    time.sleep(120)
    """
)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_search.py"
    script.write_text(FAKE_SCRIPT)
    folder = tmp_path / "pids"
    folder.mkdir()
    return script, folder


def _pids(folder) -> dict[str, int]:
    return {name: int((folder / name).read_text()) for name in os.listdir(folder)}


def test_chief_and_two_workers_finish_every_trial_once_and_leave_nothing(tmp_path):
    output = io.StringIO()

    frame = distributed.launch(
        example.__file__, workers=2, directory=tmp_path, project_name="digits",
        args=["--max-trials", "3"], chief_grace=1.0, stream=output, timeout=240,
    )

    log = output.getvalue()
    # Three trials for two workers: at least one worker asks the chief for a second one.
    assert len(frame) == 3 and frame.trial_id.is_unique
    assert (frame.status == "COMPLETED").all() and frame.score.notna().all()
    runs = {}
    for trial_id in frame.trial_id:
        saved = json.loads((tmp_path / "digits" / f"trial_{trial_id}" / "zoo_trial.json")
                           .read_text())
        assert len(saved["executions"]) == 1  # each trial ran once
        runs[trial_id] = saved["executions"][0]["tuner_id"]
    assert set(runs.values()) <= {"tuner0", "tuner1"}  # the chief trains nothing
    oracle = json.loads((tmp_path / "digits" / "oracle.json").read_text())
    assert set(oracle["run_times"].values()) == {1}
    assert log.count("finished a trial") == 3
    pids = [int(pid) for pid in re.findall(r"ready \(pid (\d+)\)", log)]
    assert re.findall(r"^\[(\w+)\] \1 ready", log, re.M) and len(pids) == 3
    assert all(_gone(pid) for pid in pids)


def test_a_crashing_worker_stops_every_process(fake):
    script, folder = fake
    output = io.StringIO()

    with pytest.raises(distributed.LaunchError,
                       match=r"tuner1 exited with code 3; stopping chief, tuner0"):
        distributed.launch(script, workers=2, args=["tuner1", str(folder), "3"],
                           stream=output, grace=2.0)

    assert set(_pids(folder)) == {"chief", "tuner0", "tuner1"}
    assert all(_gone(pid) for pid in _pids(folder).values())
    assert "[tuner1] something went wrong" in output.getvalue()
    assert "[launcher] stopped chief, tuner0" in output.getvalue()


@pytest.fixture
def ctrl_c_raises():
    # Python ignores SIGINT when started in the background (`(python ... &)`): restore
    # Ctrl-C as an interactive session has it, for this test only.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_stops_every_process(fake, ctrl_c_raises):
    script, folder = fake

    def interrupt_once_all_started():
        while len(os.listdir(folder)) < 2:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_all_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        distributed.launch(script, workers=1, args=["nobody", str(folder), "2"],
                           stream=io.StringIO(), grace=2.0)

    assert all(_gone(pid) for pid in _pids(folder).values())


@pytest.mark.filterwarnings("ignore:'zoo.distributed' found in sys.modules:RuntimeWarning")
def test_module_entry_point_reports_a_crash_with_exit_code_1(fake, monkeypatch, capsys):
    # The module run as `__main__`, as `python -m zoo.distributed` does, but in this
    # process: a new interpreter would spend seconds importing TensorFlow (via `zoo`).
    script, folder = fake
    monkeypatch.setattr(sys, "argv", ["zoo.distributed", str(script), "--workers", "1",
                                      "--", "chief", str(folder), "2"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("zoo.distributed", run_name="__main__", alter_sys=True)
    assert exited.value.code == 1
    captured = capsys.readouterr()
    assert "error: chief exited with code 3" in captured.err
    assert "[tuner0] tuner0 started" in captured.out
    assert all(_gone(pid) for pid in _pids(folder).values())


def test_bad_input_fails_before_anything_starts(fake):
    script, _ = fake
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=rf"`port={port}` is already in use on 127\.0\.0\.1"):
            distributed.launch(script, port=port)
    workers_rule = r"`workers` must be an integer >= 1\. Received: workers=0"
    with pytest.raises(ValueError, match=workers_rule):
        distributed.launch(script, workers=0)
    with pytest.raises(ValueError, match=r"`script` must be a Python file"):
        distributed.launch("no_such_script.py")
    with pytest.raises(SystemExit):
        distributed.main(["no_such_script.py"])
