"""Keras's own EarlyStopping behaviours, asserted of `keras.callbacks.EarlyStopping` and
of `kgrad.EarlyStopping` alike: kgrad's class is a drop-in.

The cases follow what Keras documents and tests (`keras/src/callbacks/
early_stopping_test.py`): the direction inferred from the metric, `patience`,
`min_delta`, `mode`, `baseline`, `restore_best_weights`, `start_from_epoch`, reuse across
`fit` calls, a metric whose value is an array (`F1Score`), models that Keras builds on
their first batch, and the callback driven by hand on a model that was never compiled.
kgrad's class runs with its default `check_finite=True` throughout.
"""

import keras
import numpy as np
import pytest

import kgrad

pytestmark = pytest.mark.backends("tensorflow", "jax")

CLASSES = [keras.callbacks.EarlyStopping, kgrad.EarlyStopping]
IDS = ["keras", "kgrad"]

@pytest.fixture(params=CLASSES, ids=IDS)
def stopping(request):
    return request.param


def _two_dense(built):
    layers = [keras.layers.Dense(1, activation="relu"), keras.layers.Dense(1, activation="relu")]
    return keras.Sequential(([keras.Input((5,))] if built else []) + layers)


def _data(n=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 5)).astype("float32"), rng.random((n, 1)).astype("float32")


# -- real fits ---------------------------------------------------------------------------

MODE_CASES = [
    ("max", "val_mse", "max"),
    ("min", "val_loss", "min"),
    ("auto", "val_mse", "min"),
    ("auto", "loss", "min"),
    ("auto", "acc", "max"),
    ("auto", "val_accuracy", "max"),
    ("auto", "hinge", "min"),
    ("auto", "f1_score", "max"),
]


@pytest.mark.parametrize("built", [True, False], ids=["input", "first_batch"])
def test_the_direction_follows_the_mode_or_the_metric(stopping, built):
    x, y = _data()
    x_val, y_val = _data(seed=1)
    model = _two_dense(built)
    model.compile(
        loss="mae",
        optimizer="adam",
        metrics=["mse", "acc", "accuracy", "hinge", keras.metrics.F1Score(name="f1_score")],
    )
    # One fit for every case (one trace, not eight): each stopper reads the same logs,
    # and each infers its direction at the first epoch end, as it does alone.
    stoppers = [stopping(patience=0, monitor=monitor, mode=mode)
                for mode, monitor, _ in MODE_CASES]
    history = model.fit(x, y, batch_size=5, validation_data=(x_val, y_val),
                        callbacks=stoppers, epochs=2, verbose=0)
    assert len(history.epoch) == 2  # patience=0 stops no earlier than epoch 1
    for stopper, (mode, monitor, direction) in zip(stoppers, MODE_CASES):
        expected = keras.ops.greater if direction == "max" else keras.ops.less
        assert stopper.monitor_op == expected, monitor
        values = np.asarray(history.history[monitor], dtype=np.float64).reshape(2, -1)
        best = values.max() if direction == "max" else values.min()
        assert np.asarray(stopper.best, dtype=np.float64).item() == pytest.approx(best)
    # F1Score logs a one-element array on newer Keras (a scalar on 3.8), not a
    # float: it is compared all the same.
    assert np.asarray(history.history["f1_score"][0]).size == 1


def test_an_unknown_monitor_is_an_error(stopping):
    x, y = _data()
    model = _two_dense(built=True)
    model.compile(loss="mae", optimizer="adam", metrics=["mse"])
    with pytest.raises(ValueError, match="unknown"):
        model.fit(x, y, batch_size=5, validation_data=_data(seed=1), epochs=2,
                  verbose=0, callbacks=[stopping(patience=0, monitor="unknown")])


@pytest.mark.parametrize("built", [True, False], ids=["input", "first_batch"])
def test_reuse_across_fit_calls_starts_afresh(stopping, built):
    rng = np.random.default_rng(0)
    data = rng.random((100, 1)).astype("float32")
    labels = (data > 0.5).astype("float32")
    model = keras.Sequential(
        ([keras.Input((1,))] if built else [])
        + [keras.layers.Dense(1, activation="relu"), keras.layers.Dense(1, activation="relu")]
    )
    model.compile(optimizer="sgd", loss="mae", metrics=["mse"])
    patience = 3
    stopper = stopping(monitor="mse", patience=patience)
    for _ in range(2):
        history = model.fit(data, labels, callbacks=[stopper], verbose=0, epochs=20)
        assert len(history.epoch) >= patience + 1
        assert stopper.best == pytest.approx(min(history.history["mse"]))


@pytest.mark.backends(
    "tensorflow",
    reason="Keras's own EarlyStopping stops an epoch later on JAX (4 epochs), kgrad's "
    "with it: the count asserted is TensorFlow's",
)
def test_baseline_that_is_never_beaten_stops_after_patience(stopping):
    x, y = _data()
    model = _two_dense(built=True)
    model.compile(optimizer="sgd", loss="mae", metrics=["mse"])
    patience = 3
    stopper = stopping(monitor="mse", patience=patience, baseline=-1.0)  # mse ≥ 0
    history = model.fit(x, y, callbacks=[stopper], verbose=0, epochs=20)
    # The wait is never reset: training stops at the end of epoch `patience`.
    assert len(history.epoch) == patience
    assert stopper.stopped_epoch == patience - 1


@pytest.mark.parametrize("patience", [0, 3])
def test_start_from_epoch_delays_the_count(stopping, patience):
    x, y = _data()
    model = _two_dense(built=True)
    model.compile(optimizer="sgd", loss="mae", metrics=["mse"])
    start_from_epoch = 2
    stopper = stopping(monitor="mse", patience=patience, start_from_epoch=start_from_epoch)
    history = model.fit(x, y, callbacks=[stopper], verbose=0, epochs=20)
    assert len(history.epoch) >= patience + start_from_epoch


# -- driven by hand ----------------------------------------------------------------------


def _drive(stopper, values, monitor="loss", model=None, stop_at=None):
    """Feeds one value per epoch end; returns the number of epochs run."""
    if model is not None:
        stopper.set_model(model)
    stopper.on_train_begin()
    for epoch, value in enumerate(values):
        stopper.on_epoch_end(epoch, {monitor: value})
        if epoch == stop_at:
            stopper.model.stop_training = True  # another callback asks to stop
        if getattr(stopper.model, "stop_training", False):  # unset before compile
            return epoch + 1
    return len(values)


def _compiled_empty():
    model = keras.Sequential()
    model.compile(loss="mse", optimizer="sgd")
    return model


@pytest.mark.parametrize("patience", [0, 1, 2, 3])
def test_patience_counts_epochs_without_improvement(stopping, patience):
    losses = [10.0, 9.0, 8.0, 9.0, 8.9, 8.8, 8.7, 8.6, 8.5]
    stopper = stopping(monitor="loss", patience=patience)
    _drive(stopper, losses, model=_compiled_empty())
    # The best is 8.0 at epoch 2; a patience of 0 still waits for one epoch.
    assert stopper.stopped_epoch == max(patience, 1) + 2
    assert stopper.best == 8.0 and stopper.best_epoch == 2


@pytest.mark.parametrize("min_delta, stopped_epoch", [(0.05, 1), (0.01, 0)])
def test_min_delta_is_the_smallest_improvement(stopping, min_delta, stopped_epoch):
    stopper = stopping(monitor="loss", patience=1, min_delta=min_delta)
    _drive(stopper, [1.0, 0.96, 0.92, 0.95], model=_compiled_empty())
    # 0.04 per epoch is not an improvement of 0.05 (stop at epoch 2, index 1), but is
    # one of 0.01 (stop at the first worse value, index 3).
    assert stopper.stopped_epoch == (1 if stopped_epoch else 3)


def test_mode_max_keeps_the_highest(stopping):
    stopper = stopping(monitor="score", mode="max", patience=1)
    assert _drive(stopper, [0.1, 0.3, 0.2, 0.25], "score", _compiled_empty()) == 3
    assert (stopper.best, stopper.best_epoch, stopper.stopped_epoch) == (0.3, 1, 2)


@pytest.mark.parametrize("patience, stopped_epoch", [(0, 3), (2, 4)])
def test_start_from_epoch_ignores_the_first_epochs(stopping, patience, stopped_epoch):
    # The first two values would be the best, but they are not looked at.
    stopper = stopping(monitor="loss", patience=patience, start_from_epoch=2)
    _drive(stopper, [0.1, 0.2, 5.0, 6.0, 7.0, 8.0, 9.0], model=_compiled_empty())
    assert (stopper.best, stopper.best_epoch) == (5.0, 2)
    assert stopper.stopped_epoch == stopped_epoch


class StandIn:
    """A stand-in model whose weights are the index of the epoch they come from."""

    def __init__(self):
        self.stop_training = False
        self.weights = -1

    def get_weights(self):
        return self.weights

    def set_weights(self, weights):
        self.weights = weights


@pytest.mark.parametrize(
    "losses, kwargs, stop_at, epochs_run",
    [
        ([0.2, 0.15, 0.1, 0.11, 0.12], {"patience": 2}, None, 5),
        # No epoch beats the baseline: train for `patience` epochs, restore the best.
        ([0.9, 0.8, 0.7, 0.71, 0.72, 0.73], {"patience": 5, "baseline": 0.5}, None, 5),
        # Another callback stops training: the best weights are restored all the same.
        ([0.9, 0.8, 0.7, 0.71, 0.72, 0.73], {"patience": 5, "baseline": 0.5}, 3, 4),
    ],
    ids=["patience", "baseline", "stopped_by_another"],
)
def test_restore_best_weights_restores_the_best_epoch(stopping, losses, kwargs, stop_at,
                                                      epochs_run):
    stopper = stopping(monitor="val_loss", restore_best_weights=True, **kwargs)
    model = StandIn()
    stopper.set_model(model)
    stopper.on_train_begin()
    for epoch, loss in enumerate(losses):
        model.weights = epoch
        stopper.on_epoch_end(epoch, {"val_loss": loss})
        if epoch == stop_at:
            model.stop_training = True
        if model.stop_training:
            break
    stopper.on_train_end()
    assert epoch + 1 == epochs_run
    assert model.get_weights() == 2  # the weights of the best epoch, loss 0.1 or 0.7


def test_on_train_begin_resets_every_per_run_state(stopping):
    stopper = stopping(monitor="loss", patience=3)
    stopper.set_model(keras.Sequential())  # never compiled: no optimizer to check
    stopper.on_train_begin()
    stopper.best, stopper.wait, stopper.stopped_epoch = 0.1, 3, 5
    stopper.best_epoch, stopper.best_weights = 5, object()
    stopper.on_train_begin()
    assert stopper.best is None and stopper.best_weights is None
    assert (stopper.wait, stopper.stopped_epoch, stopper.best_epoch) == (0, 0, 0)


def test_driven_by_hand_on_a_model_that_was_never_compiled(stopping):
    model = keras.Sequential([keras.layers.Dense(1)])
    stopper = stopping(monitor="val_loss", patience=0, restore_best_weights=True)
    assert _drive(stopper, [1.0, 2.0, 3.0], "val_loss", model) == 2
    stopper.on_train_end()
    assert (stopper.best, stopper.stopped_epoch) == (1.0, 1)
    assert model.get_weights() == []  # nothing was built, nothing restored
