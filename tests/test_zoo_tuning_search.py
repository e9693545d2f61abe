"""Real keras-tuner searches on digits with zoo's hypermodels, and their results table."""

from __future__ import annotations

import gc
import math

import keras
import keras_tuner
import numpy as np
import pandas as pd
import pytest

import kgrad
import zoo
from zoo.tuning import results as results_module

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

SEED = 7  # keras-tuner silently replaces seed=0 by a random seed
N_TRAIN = 256


@pytest.fixture(scope="module", autouse=True)
def _cheap_full_collections():
    # keras-tuner runs two full garbage collections before every trial (0.3-0.7 s each
    # once TensorFlow is loaded, most of a small trial). Frozen, the objects that exist
    # now are skipped by them; what the trials leave behind is still collected.
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def digits():
    data = zoo.datasets.load("digits")
    return data.x_train[:N_TRAIN], data.y_train[:N_TRAIN], data.x_test[:128], data.y_test[:128]


class StepsSpy(keras.callbacks.Callback):
    """Notes the steps per epoch of every trial (keras-tuner deep-copies the callback)."""

    seen: list[int] = []

    def on_train_begin(self, logs=None):
        StepsSpy.seen.append(self.params["steps"])


def _search(tuner, digits, callbacks=(), **kwargs):
    x, y, x_val, y_val = digits
    StepsSpy.seen = []
    tuner.search(x, y, validation_data=(x_val, y_val), verbose=0,
                 callbacks=[StepsSpy(), *callbacks], **kwargs)
    return zoo.tuner_results(tuner)


def _check_batch_sizes_were_used(frame):
    assert StepsSpy.seen == [math.ceil(N_TRAIN / b) for b in frame.batch_size]


def test_random_search_samples_batch_size_from_trial_0_and_ignores_search_batch_size(
    digits, tmp_path
):
    hypermodel = zoo.HyperMLP((64,), 10, depth=(1, 2), width=8, block=["plain", "residual"],
                              activation="relu", learning_rate=1e-2, batch_size=[16, 64, 256])
    # Two trials suffice with this seed: trial 0 takes 256 and trial 1 64 (a third
    # repeats trial 1).
    tuner = keras_tuner.RandomSearch(hypermodel, "val_accuracy", max_trials=2, seed=SEED,
                                     directory=tmp_path, project_name="random")

    with pytest.warns(UserWarning, match="`batch_size=999` passed to `search"):
        frame = _search(tuner, digits, epochs=2, batch_size=999)

    assert list(frame.trial_id) == ["0", "1"]
    assert (frame.status == "COMPLETED").all() and frame.score.between(0, 1).all()
    assert frame.batch_size[0] != 16  # trial 0 sampled it; it did not take the default
    assert frame.batch_size.nunique() > 1
    _check_batch_sizes_were_used(frame)
    assert frame.diverged.eq(0.0).all()
    assert frame.grad_first_to_last.notna().all() and frame.grad_decay_per_layer.gt(0).all()


def test_grid_search_walks_every_combination(digits, tmp_path):
    hypermodel = zoo.HyperMLP((64,), 10, depth=1, width=8, block=["plain", "batchnorm"],
                              activation="relu", kernel_initializer="auto", dropout=0.0,
                              learning_rate=1e-2, batch_size=[32, 128])
    tuner = keras_tuner.GridSearch(hypermodel, "val_loss", directory=tmp_path, seed=SEED)

    # A logger given to search() is deep-copied per trial and used instead of a new one.
    frame = _search(tuner, digits, epochs=1, callbacks=[kgrad.GradientNormLogger()])

    assert len(frame) == 4 and frame.grad_decay_per_layer.notna().all()
    assert set(zip(frame.block, frame.batch_size)) == {
        ("plain", 32), ("plain", 128), ("batchnorm", 32), ("batchnorm", 128)
    }
    _check_batch_sizes_were_used(frame)


def test_hyperband_varies_batch_size_and_records_its_own_hyperparameters(digits, tmp_path):
    hypermodel = zoo.HyperMLP((64,), 10, depth=1, width=8, learning_rate=1e-2,
                              block="plain", activation="relu", batch_size=[16, 64, 256])
    tuner = keras_tuner.Hyperband(hypermodel, "val_accuracy", max_epochs=2, factor=2,
                                  hyperband_iterations=1, seed=SEED, directory=tmp_path)

    frame = _search(tuner, digits)

    assert len(frame) >= 3 and (frame.status == "COMPLETED").all()
    assert {"tuner/epochs", "tuner/initial_epoch", "tuner/bracket", "tuner/round"} <= set(
        frame.columns
    )
    assert frame.batch_size.nunique() > 1
    _check_batch_sizes_were_used(frame)


@pytest.mark.backends(
    "tensorflow",
    reason="its premise is TensorFlow's numerics: on JAX, SGD at 1e12 leaves these ReLU "
    "nets' losses finite (14.3 and 14.5 in two epochs of a depth-1 net, against NaN on "
    "TensorFlow), so no trial diverges; on torch no trial diverges either",
)
def test_diverging_trials_are_scored_worst_and_do_not_abort_the_search(digits, tmp_path):
    # SGD at 1e12 drives ReLU nets to NaN in the first epoch; sigmoid ones stay finite.
    hypermodel = zoo.HyperMLP((64,), 10, depth=[1, 2], width=8, block="plain",
                              activation=["relu", "sigmoid"], optimizer="sgd",
                              learning_rate=1e12, batch_size=32, dropout=0.0,
                              kernel_initializer="auto")
    tuner = keras_tuner.GridSearch(hypermodel, "val_accuracy", directory=tmp_path,
                                   max_consecutive_failed_trials=1, seed=SEED)

    frame = _search(tuner, digits, epochs=2)

    assert len(frame) == 4 and (frame.status == "COMPLETED").all()
    relu = frame[frame.activation == "relu"]
    sigmoid = frame[frame.activation == "sigmoid"]
    assert relu.diverged.eq(1.0).all() and relu.score.eq(0.0).all()
    assert relu.reason.str.contains(r"became (?:nan|inf|-inf) in epoch 1").all()
    assert sigmoid.diverged.eq(0.0).all() and sigmoid.reason.isna().all()


def test_results_columns_history_and_reload(digits, tmp_path):
    hypermodel = zoo.HyperMLP((64,), 10, depth=(1, 3), width=8, block="plain",
                              learning_rate=1e-2, batch_size=[32, 64])
    tuner = keras_tuner.RandomSearch(hypermodel, "val_accuracy", max_trials=2, seed=SEED,
                                     directory=tmp_path, project_name="digits")
    frame = _search(tuner, digits, epochs=2)

    assert list(frame.columns) == [
        "trial_id", "status", "score", "best_step", "depth", "width", "block", "activation",
        "kernel_initializer", "dropout", "l2", "learning_rate", "batch_size", "optimizer",
        "grad_first_to_last", "grad_decay_per_layer", "vanishing", "exploding",
        "diverged", "reason",
    ]
    assert len(frame) == 2
    best = tuner.oracle.get_best_trials(1)[0]
    assert frame.set_index("trial_id").score[best.trial_id] == frame.score.max()

    reloaded = keras_tuner.RandomSearch(hypermodel, "val_accuracy", max_trials=2, seed=SEED,
                                        directory=tmp_path, project_name="digits",
                                        overwrite=False)
    pd.testing.assert_frame_equal(zoo.tuner_results(reloaded), frame)
    pd.testing.assert_frame_equal(zoo.tuner_results(tmp_path / "digits"), frame)
    trials, history = zoo.tuner_results(tmp_path, history=True)
    pd.testing.assert_frame_equal(trials, frame)
    assert list(history.columns) == ["trial_id", "execution", "epoch", "metric", "value"]
    per_trial = history.groupby("trial_id").size()
    assert (per_trial == 2 * 6).all()  # 2 epochs × (loss, accuracy, val_*, 2 grad_norm/)
    assert set(history.metric) >= {"loss", "val_accuracy", "grad_norm/first_to_last"}


def test_tuner_results_rejects_a_directory_that_is_not_a_project(tmp_path):
    with pytest.raises(ValueError, match=r"is not a keras-tuner project.*oracle\.json"):
        zoo.tuner_results(tmp_path)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "oracle.json").write_text("{}")
    with pytest.raises(ValueError, match=r"several keras-tuner projects \(a, b\).*project_name"):
        zoo.tuner_results(tmp_path)
    assert len(zoo.tuner_results(tmp_path, project_name="a")) == 0


def test_fit_uses_a_given_logger_with_clipping_and_warmup(digits):
    x, y, _, _ = digits
    hypermodel = zoo.HyperMLP((64,), 10, depth=2, width=8, block="plain",
                              learning_rate=1e-2, batch_size=64, clip_threshold=0.05,
                              warmup_epochs=1)
    hp = keras_tuner.HyperParameters()
    hypermodel.declare_hyperparameters(hp)
    logger = kgrad.GradientNormLogger()

    history = hypermodel.fit(hp, hypermodel.build(hp), x, y, epochs=2, verbose=0,
                             callbacks=[logger])

    assert len(logger.records) == 2 * math.ceil(N_TRAIN / 64)
    assert np.all(logger.records.clipped_global_norms <= 0.05 * (1 + 1e-5))
    assert history.history["diverged"] == [0.0, 0.0]
    assert results_module.LEADING_COLUMNS == ("trial_id", "status", "score", "best_step")
