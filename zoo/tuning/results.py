"""`tuner_results`: a keras-tuner search as a pandas DataFrame, one row per trial.

keras-tuner only prints its results. Its project directory holds everything needed:
`<directory>/<project_name>/oracle.json` (the search space) and one `trial_<id>/trial.json`
per trial (hyperparameter values, metrics, status, score); zoo's hypermodels add
`trial_<id>/zoo_trial.json` (per-epoch history and the reason of a divergence). A live
tuner is read from memory, the same way, so a finished search and a directory reloaded
after a crash give the same table.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from zoo.tuning import trial_health

LEADING_COLUMNS: tuple[str, ...] = ("trial_id", "status", "score", "best_step")
TRAILING_COLUMNS: tuple[str, ...] = (
    *trial_health.HEALTH_METRICS,
    "diverged",
    "reason",
)
HISTORY_COLUMNS: tuple[str, ...] = ("trial_id", "execution", "epoch", "metric", "value")


def tuner_results(
    tuner_or_directory: Any,
    *,
    project_name: str | None = None,
    history: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """The trials of a keras-tuner search as a DataFrame, sorted by trial id.

    Columns, in order: `trial_id, status, score, best_step`; one column per
    hyperparameter of the space (in declaration order, then any that appeared later, such
    as Hyperband's `tuner/epochs`), NaN where a trial does not use it (inactive
    conditional hyperparameters); `grad_first_to_last, grad_decay_per_layer, vanishing,
    exploding` (NaN for trials not trained by a zoo hypermodel); `diverged` (0/1) and
    `reason`: why a trial diverged, or the last line of the error of a failed trial, else
    None.

    Args:
        tuner_or_directory: A keras-tuner `Tuner` (finished, running or reloaded with
            `overwrite=False`), a project directory (the one holding `oracle.json`), or
            the tuner's `directory` together with `project_name`.
        project_name: The project inside a `directory`. Defaults to `None`: the path is
            the project itself, or a directory holding exactly one project.
        history: Also return the per-epoch history of every run in long form. Defaults
            to `False`.

    Returns:
        The trials DataFrame; with `history=True` a tuple `(trials, history)` where
        `history` has the columns `trial_id, execution, epoch, metric, value` (one row per
        run of a trial, epoch and metric, from zoo's `zoo_trial.json` files).

    Raises:
        ValueError: If the path is not a keras-tuner project (no `oracle.json` and no
            `trial_*/trial.json`), or holds several projects and no `project_name`.

    Example:

    >>> frame = tuner_results("searches", project_name="digits")  # doctest: +SKIP
    >>> frame.groupby("block").score.max()  # doctest: +SKIP
    """
    if hasattr(tuner_or_directory, "oracle") and hasattr(tuner_or_directory, "project_dir"):
        tuner = tuner_or_directory
        project = str(tuner.project_dir)
        if hasattr(tuner.oracle, "trials"):  # a worker's oracle is a gRPC client
            states = [trial.get_state() for trial in tuner.oracle.trials.values()]
            space = tuner.oracle.get_space().get_config()["space"]
        else:
            states, space = _read_project(project)
    else:
        project = _project_directory(os.fspath(tuner_or_directory), project_name)
        states, space = _read_project(project)

    states = sorted(states, key=lambda state: _sort_key(state["trial_id"]))
    hp_names = _hyperparameter_names(space, states)
    rows, long_rows = [], []
    for state in states:
        trial_dir = os.path.join(project, f"trial_{state['trial_id']}")
        extra = trial_health.read_trial_file(trial_dir)
        rows.append(_trial_row(state, hp_names, extra))
        if history and extra:
            long_rows.extend(_history_rows(state["trial_id"], extra))
    columns = [*LEADING_COLUMNS, *hp_names, *TRAILING_COLUMNS]
    trials = pd.DataFrame(rows, columns=columns)
    if not history:
        return trials
    return trials, pd.DataFrame(long_rows, columns=list(HISTORY_COLUMNS))


def _project_directory(path: str, project_name: str | None) -> str:
    if project_name is not None:
        path = os.path.join(path, project_name)
    if _is_project(path):
        return path
    candidates = (
        sorted(d for d in glob.glob(os.path.join(path, "*")) if _is_project(d))
        if project_name is None and os.path.isdir(path)
        else []
    )
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        names = ", ".join(os.path.basename(d) for d in candidates)
        raise ValueError(
            f"{path!r} holds several keras-tuner projects ({names}); pass "
            "`project_name=` to choose one."
        )
    raise ValueError(
        f"{path!r} is not a keras-tuner project: it has no `oracle.json` and no "
        "`trial_*/trial.json`. A project is the folder `<directory>/<project_name>` that "
        "a tuner writes; pass that folder, or the tuner's `directory` with "
        "`project_name=`."
    )


def _is_project(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "oracle.json")) or bool(
        glob.glob(os.path.join(path, "trial_*", "trial.json"))
    )


def _read_project(project: str) -> tuple[list[dict], list[dict]]:
    states = []
    for path in glob.glob(os.path.join(project, "trial_*", "trial.json")):
        with open(path) as stream:
            states.append(json.load(stream))
    space = []
    oracle_path = os.path.join(project, "oracle.json")
    if os.path.isfile(oracle_path):
        with open(oracle_path) as stream:
            space = json.load(stream).get("hyperparameters", {}).get("space", [])
    return states, space


def _sort_key(trial_id: str) -> tuple[int, int | str]:
    return (0, int(trial_id)) if str(trial_id).isdigit() else (1, str(trial_id))


def _hyperparameter_names(space: list[dict], states: list[dict]) -> list[str]:
    names: dict[str, None] = {}
    for entry in space:
        names.setdefault(entry["config"]["name"], None)
    for state in states:
        for entry in state["hyperparameters"]["space"]:
            names.setdefault(entry["config"]["name"], None)
        for name in state["hyperparameters"]["values"]:
            names.setdefault(name, None)
    return list(names)


def _last_value(metrics: Mapping[str, Any], name: str) -> float:
    """The last reported value of a trial metric (the mean over executions), or NaN."""
    observations = metrics.get(name, {}).get("observations", [])
    if not observations:
        return float("nan")
    return float(np.mean(observations[-1]["value"]))


def _trial_row(state: dict, hp_names: list[str], extra: dict | None) -> dict[str, Any]:
    metrics = (state.get("metrics") or {}).get("metrics", {})
    values = state["hyperparameters"]["values"]
    row: dict[str, Any] = {
        "trial_id": state["trial_id"],
        "status": state["status"],
        "score": np.nan if state.get("score") is None else float(state["score"]),
        "best_step": state.get("best_step"),
    }
    row.update({name: values.get(name, np.nan) for name in hp_names})
    row.update({name: _last_value(metrics, name) for name in trial_health.HEALTH_METRICS})
    diverged = _last_value(metrics, "diverged")
    row["diverged"] = diverged
    row["reason"] = _reason(state, metrics, extra, diverged)
    return row


def _reason(state: dict, metrics: Mapping, extra: dict | None, diverged: float) -> str | None:
    if diverged == 1.0:
        reasons = [run["reason"] for run in (extra or {}).get("executions", []) if run["reason"]]
        if reasons:
            return reasons[-1]
        return trial_health.reason_from_codes(
            _last_value(metrics, "divergence_cause"), _last_value(metrics, "divergence_epoch")
        )
    message = state.get("message")
    if message:
        lines = [line for line in message.strip().splitlines() if line.strip()]
        return lines[-1] if lines else None
    return None


def _history_rows(trial_id: str, extra: dict) -> list[dict[str, Any]]:
    rows = []
    for execution, run in enumerate(extra.get("executions", [])):
        for metric, values in run["history"].items():
            for epoch, value in zip(run["epochs"], values):
                rows.append({"trial_id": trial_id, "execution": execution, "epoch": epoch,
                             "metric": metric, "value": value})
    return rows
