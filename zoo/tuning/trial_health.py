"""Gradient health and divergence of one trial, as numbers a keras-tuner trial can store.

keras-tuner keeps only numeric metrics per trial, so every verdict is a float:

| metric                 | meaning                                                        |
| ---------------------- | -------------------------------------------------------------- |
| `grad_first_to_last`   | first / last layer gradient norm of the δ profile over the    |
|                        | final epoch (median over its logged steps)                     |
| `grad_decay_per_layer` | the geometric-mean ratio per layer of that profile            |
| `vanishing`            | 1.0 when kgrad's vanishing detector flags the profile         |
| `exploding`            | 1.0 when kgrad's exploding detector flags growth or spikes    |
| `diverged`             | 1.0 when a loss, a metric or the gradient norm became NaN/inf |
| `divergence_cause`     | 0 none, 1 a training metric, 2 a validation metric, 3 the     |
|                        | gradients                                                      |
| `divergence_epoch`     | the 0-based epoch it happened in (-1 when it did not)         |

The reason in words goes to `TRIAL_FILE` in the trial directory, with the per-epoch history;
`reason_from_codes` rebuilds a shorter one from the numbers alone (a worker on another
machine writes the file on its own disk).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np

from kgrad.diagnosis import gradient_findings
from kgrad.records.gradient_records import GradientRecords

TRIAL_FILE = "zoo_trial.json"
"""The file each trial directory gets: `{"executions": [{"epochs", "history", "reason",
"tuner_id"}]}`, one entry per `fit()` call of the trial."""

DIVERGED_LOSS = 1e9
"""The score a diverged trial gets for an objective that is minimized."""

DIVERGED_MAXIMIZED = 0.0
"""The score a diverged trial gets for an objective that is maximized (accuracy-like)."""

HEALTH_METRICS: tuple[str, ...] = (
    "grad_first_to_last",
    "grad_decay_per_layer",
    "vanishing",
    "exploding",
)
DIVERGENCE_METRICS: tuple[str, ...] = ("diverged", "divergence_cause", "divergence_epoch")

_CAUSES = {1: "a training metric", 2: "a validation metric", 3: "the gradient norm"}
# Epoch logs of kgrad's logger: a NaN ratio there means no layer had a gradient, not a
# divergence; the gradients are judged from the records instead.
_LOGGER_PREFIX = "grad_norm/"


@dataclasses.dataclass(frozen=True)
class Divergence:
    """Where a run first became non-finite.

    Attributes:
        cause: 1 a training metric (loss), 2 a validation metric, 3 the gradient norm.
        epoch: The 0-based epoch.
        what: The metric's name, or `"global gradient norm"`.
        value: The non-finite value (`nan`, `inf` or `-inf`).
    """

    cause: int
    epoch: int
    what: str
    value: float

    @property
    def reason(self) -> str:
        """The divergence in words, e.g. `"loss became nan in epoch 3"`."""
        return f"{self.what} became {self.value} in epoch {self.epoch + 1}"

    def metrics(self) -> dict[str, float]:
        """`diverged`, `divergence_cause` and `divergence_epoch` as floats."""
        return {"diverged": 1.0, "divergence_cause": float(self.cause),
                "divergence_epoch": float(self.epoch)}


NOT_DIVERGED: dict[str, float] = {"diverged": 0.0, "divergence_cause": 0.0,
                                  "divergence_epoch": -1.0}


def find_divergence(
    history: Mapping[str, Sequence[float]],
    epochs: Sequence[int],
    records: GradientRecords | None = None,
) -> Divergence | None:
    """Finds the first epoch in which a run's metrics or gradients became NaN or inf.

    Within that epoch the gradients are named first (they cause the loss to follow),
    then training metrics, then validation metrics.

    Args:
        history: `History.history`: metric name → one value per epoch.
        epochs: The epoch index of each entry (`History.epoch`).
        records: The run's gradient records, if a `kgrad.GradientNormLogger` ran.
            Defaults to `None`.

    Returns:
        The `Divergence`, or None when everything stayed finite.

    Example:

    >>> find_divergence({"loss": [2.3, float("nan")]}, [0, 1]).reason
    'loss became nan in epoch 2'
    """
    # (epoch, priority, cause, what, value); the gradients come first within an epoch.
    found: list[tuple[int, int, int, str, float]] = []
    for name, values in history.items():
        if name.startswith(_LOGGER_PREFIX):
            continue
        cause = 2 if name.startswith("val_") else 1
        for epoch, value in zip(epochs, values):
            if not math.isfinite(float(value)):
                found.append((epoch, cause, cause, name, float(value)))
                break
    if records is not None and len(records):
        norms = records.global_norms
        bad = np.flatnonzero(~np.isfinite(norms))
        if bad.size:
            epoch = int(records.epochs[bad[0]])
            found.append((epoch, 0, 3, "global gradient norm", float(norms[bad[0]])))
    if not found:
        return None
    epoch, _, cause, what, value = min(found, key=lambda item: item[:2])
    return Divergence(cause=cause, epoch=epoch, what=what, value=value)


def reason_from_codes(cause: float, epoch: float) -> str:
    """The divergence reason rebuilt from the `divergence_*` metrics of a trial.

    Example:

    >>> reason_from_codes(1.0, 2.0)
    'a training metric became non-finite in epoch 3'
    """
    what = _CAUSES.get(int(cause), "a value")
    return f"{what} became non-finite in epoch {int(epoch) + 1}"


def gradient_health(records: GradientRecords | None) -> dict[str, float]:
    """The gradient-health metrics of a run from its `GradientNormLogger` records.

    kgrad's `gradient_findings` judges the logged steps of the final epoch: the profile
    is the per-layer δ signal it picks (bias norms, or kernel norms in normalized nets),
    `grad_decay_per_layer` and `grad_first_to_last` are the medians over those steps of
    the per-layer and first-to-last ratios, and the flags are its verdicts: `vanishing`
    when the profile decays (< 0.8 per layer and < 1e-2 first-to-last), `exploding` when
    it grows (> 1.5 per layer and > 100 first-to-last) or the global norm spikes.

    Args:
        records: The records, or None when nothing was logged.

    Returns:
        `grad_first_to_last`, `grad_decay_per_layer`, `vanishing`, `exploding`; NaN where
        undefined (no records, fewer than two layers, no finite step).

    References:
        Schoenholz et al. 2017, "Deep Information Propagation" (the per-layer gain).
    """
    health = dict.fromkeys(HEALTH_METRICS, float("nan"))
    if records is None or len(records) == 0:
        return health
    final_epoch_start = int(np.argmax(records.epochs == records.epochs.max()))
    findings, summary = gradient_findings(records, start=final_epoch_start)
    health["grad_first_to_last"] = summary.first_to_last
    health["grad_decay_per_layer"] = summary.decay
    if np.isfinite(summary.decay):  # else there is nothing to judge
        kinds = {finding.kind for finding in findings}
        health["vanishing"] = float("vanishing" in kinds)
        health["exploding"] = float("exploding" in kinds)
    return health


def summarize_run(
    history: keras.callbacks.History,
    records: GradientRecords | None,
    trial_dir: str | None = None,
    objective: Any = None,
    tuner_id: str | None = None,
) -> keras.callbacks.History | dict[str, float]:
    """What `fit` returns to keras-tuner for one run, and the trial file it writes.

    Args:
        history: The `History` of the run.
        records: The `GradientRecords` of the run's logger, or None.
        trial_dir: The trial directory to write `TRIAL_FILE` into. Defaults to `None`
            (outside a search: nothing written).
        objective: The tuner's objective, for the direction of the worst score.
            Defaults to `None` (directions inferred from the metric names).
        tuner_id: The id of the tuner process that ran it (`chief`, `tuner0`, ...), kept
            in the trial file. Defaults to `None`.

    Returns:
        The `History` with constant health columns, or a dict of worst metrics for a
        diverged run.
    """
    # keras-tuner warns on all-NaN metrics; a metric left out reads as NaN in the results.
    health = {k: v for k, v in gradient_health(records).items() if not math.isnan(v)}
    divergence = find_divergence(history.history, history.epoch, records)
    if trial_dir is not None:
        append_execution(trial_dir, {
            "epochs": list(history.epoch),
            "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
            "reason": None if divergence is None else divergence.reason,
            "tuner_id": tuner_id,
        })
    if divergence is None:
        for name, value in {**health, **NOT_DIVERGED}.items():
            history.history[name] = [value] * len(history.epoch)
        return history
    directions = dict(getattr(objective, "name_to_direction", None) or {})
    if objective is not None and not directions:
        directions[objective.name] = objective.direction
    names = [k for k in history.history if not k.startswith(_LOGGER_PREFIX)]
    names += [k for k in directions if k not in names and k != "default_objective"]
    worst = worst_metrics(names, directions)
    return {**worst, **health, **divergence.metrics()}


def worst_metrics(
    names: Sequence[str], directions: Mapping[str, str]
) -> dict[str, float]:
    """The worst finite value of each metric, for the score of a diverged trial.

    Args:
        names: Metric names.
        directions: `"min"` or `"max"` of the names the objective knows; the others are
            inferred by keras-tuner from the name (`accuracy` → max), defaulting to min.

    Returns:
        `DIVERGED_MAXIMIZED` (0.0) for maximized metrics, `DIVERGED_LOSS` (1e9) for the
        others.
    """
    from keras_tuner.engine.metrics_tracking import infer_metric_direction

    worst = {}
    for name in names:
        direction = directions.get(name) or infer_metric_direction(name) or "min"
        worst[name] = DIVERGED_MAXIMIZED if direction == "max" else DIVERGED_LOSS
    return worst


class StopOnDivergence(keras.callbacks.Callback):
    """Stops `fit` at the end of an epoch whose loss is NaN or inf.

    Unlike `keras.callbacks.TerminateOnNaN` it checks once per epoch, so Keras keeps
    its asynchronous batch dispatch; a diverged run wastes at most the rest of an
    epoch.
    """

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        values = [v for k, v in (logs or {}).items() if not k.startswith(_LOGGER_PREFIX)]
        if any(not math.isfinite(float(value)) for value in values):
            self.model.stop_training = True


def append_execution(trial_dir: str, execution: Mapping[str, Any]) -> None:
    """Appends one `fit()` call's history and reason to the trial's `TRIAL_FILE`."""
    path = os.path.join(trial_dir, TRIAL_FILE)
    content = read_trial_file(trial_dir) or {"executions": []}
    content["executions"].append(dict(execution))
    with open(path + ".tmp", "w") as stream:
        json.dump(content, stream)
    os.replace(path + ".tmp", path)


def read_trial_file(trial_dir: str) -> dict[str, Any] | None:
    """The content of `TRIAL_FILE` in a trial directory, or None when there is none."""
    path = os.path.join(trial_dir, TRIAL_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as stream:
        return json.load(stream)
