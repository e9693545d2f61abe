"""Gradient health and divergence of a trial, driven with fake histories and records."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from keras_tuner import Objective

from kgrad.records.gradient_records import GradientRecords, VariableInfo
from zoo.tuning import trial_health

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

NAN, INF = float("nan"), float("inf")


def _records(profiles, epochs) -> GradientRecords:
    """Bias and kernel norms of plain Dense layers; the bias norms carry `profiles`."""
    profiles = np.asarray(profiles, dtype=np.float64)
    n_layers = profiles.shape[1]
    infos = []
    for depth in range(n_layers):
        infos += [VariableInfo(f"dense_{depth}", depth, "kernel", "kernel"),
                  VariableInfo(f"dense_{depth}", depth, "bias", "bias")]
    grads = np.repeat(profiles, 2, axis=1)  # the kernel norms follow (not used: bias wins)
    records = GradientRecords(infos, run="r")
    records.append(step=np.arange(len(profiles)), epoch=epochs, grad_norm=grads,
                   weight_norm=np.ones_like(grads),
                   global_norm=np.sqrt(2 * (profiles**2).sum(axis=1)))
    return records


def test_sigmoid_like_profile_is_vanishing_with_its_per_layer_ratio():
    sigmoid = 0.236 ** np.arange(9, -1, -1)  # ten layers, 0.236 per layer
    flat = np.ones(10)
    # The first epoch is flat; only the final epoch's median profile counts.
    records = _records([flat, flat, sigmoid, sigmoid * 2, sigmoid * 0.5], [0, 0, 1, 1, 1])

    health = trial_health.gradient_health(records)

    assert health["grad_decay_per_layer"] == pytest.approx(0.236)
    assert health["grad_first_to_last"] == pytest.approx(0.236**9)
    assert (health["vanishing"], health["exploding"]) == (1.0, 0.0)


def test_growing_profile_is_exploding_and_a_flat_one_is_healthy():
    growing = 2.0 ** np.arange(9, -1, -1)
    health = trial_health.gradient_health(_records([growing], [0]))
    assert health["grad_decay_per_layer"] == pytest.approx(2.0)
    assert (health["vanishing"], health["exploding"]) == (0.0, 1.0)

    health = trial_health.gradient_health(_records([np.full(10, 0.3)], [0]))
    assert health == {"grad_first_to_last": pytest.approx(1.0),
                      "grad_decay_per_layer": pytest.approx(1.0),
                      "vanishing": 0.0, "exploding": 0.0}


def test_health_is_nan_without_records():
    assert all(np.isnan(v) for v in trial_health.gradient_health(None).values())


@pytest.mark.parametrize(
    "history, norms, expected",
    [
        ({"loss": [2.0, 1.0], "val_loss": [2.0, 1.5]}, [1.0, 1.0], None),
        ({"loss": [2.0, NAN], "val_loss": [2.0, NAN]}, [1.0, 1.0], (1, 1, "loss", "nan")),
        ({"loss": [2.0, 1.0], "val_loss": [INF, NAN]}, [1.0, 1.0], (2, 0, "val_loss", "inf")),
        # The gradients go first within an epoch: they make the loss follow.
        ({"loss": [2.0, NAN]}, [1.0, INF], (3, 1, "global gradient norm", "inf")),
        # A NaN first-to-last ratio of the logger is not a divergence.
        ({"loss": [2.0, 1.0], "grad_norm/first_to_last": [NAN, NAN]}, [1.0, 1.0], None),
    ],
)
def test_find_divergence(history, norms, expected):
    records = _records(np.ones((2, 3)), [0, 1])
    records._chunks[0].global_norm[:] = norms

    found = trial_health.find_divergence(history, [0, 1], records)

    if expected is None:
        assert found is None
    else:
        cause, epoch, what, value = expected
        assert (found.cause, found.epoch, found.what, str(found.value)) == expected
        assert found.reason == f"{what} became {value} in epoch {epoch + 1}"
        assert found.metrics() == {"diverged": 1.0, "divergence_cause": float(cause),
                                   "divergence_epoch": float(epoch)}


def test_worst_metrics_follow_the_objective_then_the_name():
    worst = trial_health.worst_metrics(
        ["val_accuracy", "val_loss", "accuracy", "custom"], {"custom": "max"}
    )
    assert worst == {"val_accuracy": 0.0, "val_loss": 1e9, "accuracy": 0.0, "custom": 0.0}
    assert trial_health.reason_from_codes(2.0, 0.0) == (
        "a validation metric became non-finite in epoch 1"
    )


def _history(values: dict) -> keras.callbacks.History:
    history = keras.callbacks.History()
    history.history = {k: list(v) for k, v in values.items()}
    history.epoch = list(range(len(next(iter(values.values())))))
    return history


def test_summarize_run_scores_a_diverged_run_worst_and_writes_the_reason(tmp_path):
    history = _history({"loss": [2.0, NAN], "accuracy": [0.3, 0.1],
                        "val_loss": [2.0, NAN], "val_accuracy": [0.4, 0.1]})
    records = _records(np.ones((2, 3)), [0, 1])

    result = trial_health.summarize_run(
        history, records, str(tmp_path), Objective("val_accuracy", "max")
    )

    assert result["val_accuracy"] == 0.0 and result["val_loss"] == 1e9
    assert (result["diverged"], result["divergence_cause"], result["divergence_epoch"]) == (
        1.0, 1.0, 1.0
    )
    saved = json.loads((tmp_path / trial_health.TRIAL_FILE).read_text())
    assert saved["executions"][0]["reason"] == "loss became nan in epoch 2"
    assert saved["executions"][0]["epochs"] == [0, 1]


def test_summarize_run_adds_health_columns_to_a_healthy_history(tmp_path):
    history = _history({"loss": [2.0, 1.0], "val_loss": [2.0, 1.5]})
    records = _records([0.5 ** np.arange(4, -1, -1)] * 2, [0, 1])

    result = trial_health.summarize_run(
        history, records, str(tmp_path), Objective("val_loss", "min")
    )
    trial_health.summarize_run(_history({"loss": [3.0]}), None, str(tmp_path), None)

    assert result is history
    assert result.history["grad_decay_per_layer"] == [pytest.approx(0.5)] * 2
    assert result.history["diverged"] == [0.0, 0.0]
    saved = json.loads((tmp_path / trial_health.TRIAL_FILE).read_text())
    assert [run["reason"] for run in saved["executions"]] == [None, None]  # two runs kept
