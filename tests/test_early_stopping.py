"""kgrad.EarlyStopping: non-finite stops at the batch, thresholds, vanishing, reasons."""

import copy

import keras
import keras_tuner
import numpy as np
import pytest

import kgrad
from custom_models import FEATURES, Regressor, make_gan
from kgrad.capture.step_hook import StepContext, StepHook

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

BATCH = 8


def _data(n=32, nan_row=None, zero_row=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    if nan_row is not None:
        y[nan_row] = np.nan
    if zero_row is not None:
        x[zero_row] = 0.0
    return x, y


def _model(learning_rate=0.01):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.SGD(learning_rate), loss="mse")
    return model


def _fit(model, callbacks, x, y, epochs=3, **kwargs):
    return model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
                     callbacks=callbacks, **kwargs)


class Recorder(keras.callbacks.Callback):
    """Batch losses, and the weights at each epoch end."""

    def on_train_begin(self, logs=None):
        self.batch_losses, self.epoch_weights = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.batch_losses.append(logs["loss"])

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_weights.append(self.model.get_weights())


# -- non-finite values in real fits ----------------------------------------------------


def test_nan_loss_stops_at_that_batch_and_restores_the_start_weights():
    x, y = _data(nan_row=2 * BATCH + 1)  # the third batch of the first epoch
    model = _model()
    start = model.get_weights()
    recorder = Recorder()
    stopper = kgrad.EarlyStopping(monitor="loss", restore_best_weights=True)
    history = _fit(model, [recorder, stopper], x, y, epochs=5)
    assert len(recorder.batch_losses) == 3  # the third batch was the last one run
    assert stopper.stop_reason == "non-finite loss (nan) and gradient at epoch 1, batch 3"
    assert (stopper.stopped_epoch, stopper.stopped_batch) == (0, 2)
    assert len(history.history["loss"]) == 1
    for restored, initial in zip(model.get_weights(), start):
        np.testing.assert_array_equal(restored, initial)


def test_divergence_to_nan_restores_the_best_finite_epoch():
    from test_clipping import _exploding_data, _exploding_model

    x, y = _exploding_data()
    recorder = Recorder()
    stopper = kgrad.EarlyStopping(monitor="loss", patience=10, restore_best_weights=True)
    model = _exploding_model()
    history = model.fit(x, y, batch_size=32, epochs=8, shuffle=False, verbose=0,
                        callbacks=[recorder, stopper])
    losses = np.asarray(recorder.batch_losses)
    first_bad = int(np.argmax(~np.isfinite(losses)))
    assert not np.isfinite(losses[first_bad]) and len(losses) == first_bad + 1
    assert stopper.stop_reason.startswith("non-finite loss")
    assert stopper.stopped_epoch * 8 + stopper.stopped_batch == first_bad
    epoch_losses = history.history["loss"][: stopper.stopped_epoch]
    best = int(np.nanargmin(epoch_losses))
    assert stopper.best_epoch == best
    for restored, best_weights in zip(model.get_weights(), recorder.epoch_weights[best]):
        np.testing.assert_array_equal(restored, best_weights)
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_keras_early_stopping_burns_its_patience_where_kgrad_stops():
    x, y = _data(nan_row=1)
    history = _fit(_model(), [keras.callbacks.EarlyStopping("loss", patience=2)], x, y,
                   epochs=5)
    assert len(history.history["loss"]) == 3  # three epochs of NaN
    stopper = kgrad.EarlyStopping("loss", patience=2)
    history = _fit(_model(), [stopper], x, y, epochs=5)
    assert len(history.history["loss"]) == 1 and stopper.stopped_batch == 0


class SqrtAbs(keras.layers.Layer):
    """sqrt(|x|): finite at 0, but its gradient there is not."""

    def call(self, inputs):
        return keras.ops.sqrt(keras.ops.abs(inputs))


def test_a_non_finite_gradient_with_a_finite_loss_stops_too():
    # First batch, while the first layer's bias is still zero: its output there is 0.
    x, y = _data(zero_row=3)
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(2, kernel_initializer="ones"),
        SqrtAbs(),
        keras.layers.Dense(1),
    ])
    model.compile(keras.optimizers.SGD(0.01), loss="mse")
    recorder = Recorder()
    stopper = kgrad.EarlyStopping(monitor="loss")
    _fit(model, [recorder, stopper], x, y)
    assert len(recorder.batch_losses) == 1 and np.isfinite(recorder.batch_losses).all()
    assert stopper.stop_reason == "non-finite gradient at epoch 1, batch 1"


@pytest.mark.parametrize("jit_compile", [False, True], ids=["eager", "compiled"])
def test_a_non_finite_gradient_stops_at_that_batch_compiled_or_not(jit_compile):
    """With `jit_compile=True` (XLA on TensorFlow, `torch.compile` on torch) too: a
    gradient that is inf in the third batch only stops there."""
    x, y = _data(zero_row=2 * BATCH + 1)
    x[: 2 * BATCH] += 1.0  # no zero before the third batch
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(2, kernel_initializer="ones", bias_initializer="zeros"),
        SqrtAbs(),
        keras.layers.Dense(1),
    ])
    model.compile(keras.optimizers.SGD(0.0), loss="mse", jit_compile=jit_compile)
    recorder = Recorder()
    stopper = kgrad.EarlyStopping(monitor="loss")
    _fit(model, [recorder, stopper], x, y)
    assert stopper.stop_reason == "non-finite gradient at epoch 1, batch 3"
    assert len(recorder.batch_losses) == 3 and np.isfinite(recorder.batch_losses).all()


def test_verbose_prints_the_reason(capsys):
    x, y = _data(nan_row=0)
    _fit(_model(), [kgrad.EarlyStopping("loss", verbose=1, restore_best_weights=True)],
         x, y)
    out = capsys.readouterr().out
    assert "EarlyStopping: non-finite loss (nan) and gradient at epoch 1, batch 1" in out
    assert "start of training" in out


def test_check_finite_off_keeps_async_dispatch():
    assert kgrad.EarlyStopping(check_finite=False).async_safe
    assert not kgrad.EarlyStopping().async_safe


# -- epoch-end logic with fake logs ------------------------------------------------------


def _driven(**kwargs):
    stopper = kgrad.EarlyStopping(check_finite=kwargs.pop("check_finite", False), **kwargs)
    model = _model()
    stopper.set_model(model)
    stopper.on_train_begin()
    return stopper, model


def _run_epochs(stopper, model, logs_per_epoch):
    for epoch, logs in enumerate(logs_per_epoch):
        stopper.on_epoch_begin(epoch)
        stopper.on_epoch_end(epoch, dict(logs))
        if model.stop_training:
            return epoch
    return None


def test_stopping_threshold_stops_once_reached():
    stopper, model = _driven(monitor="loss", stopping_threshold=0.5, patience=10)
    assert _run_epochs(stopper, model, [{"loss": v} for v in [2.0, 0.7, 0.5, 0.1]]) == 2
    assert stopper.stop_reason == (
        "`loss` reached the stopping threshold 0.5 (0.5) at epoch 3"
    )


def test_divergence_threshold_respects_the_mode():
    stopper, model = _driven(monitor="accuracy", mode="max", divergence_threshold=0.2,
                             patience=10)
    assert _run_epochs(stopper, model, [{"accuracy": v} for v in [0.5, 0.3, 0.1]]) == 2
    assert "diverged: 0.1 is worse than divergence_threshold=0.2" in stopper.stop_reason


def test_patience_stop_keeps_the_keras_behaviour_and_says_so():
    stopper, model = _driven(monitor="loss", patience=2)
    assert _run_epochs(stopper, model, [{"loss": v} for v in [1.0, 0.5, 0.6, 0.7]]) == 3
    assert stopper.stop_reason == (
        "no improvement in `loss` for 2 epochs (best 0.5 at epoch 2)"
    )


def test_non_finite_monitored_value_stops_and_is_never_the_best():
    stopper, model = _driven(monitor="val_loss", check_finite=True, patience=5)
    logs = [{"val_loss": 1.0}, {"val_loss": 0.8}, {"val_loss": float("inf")}]
    assert _run_epochs(stopper, model, logs) == 2
    assert stopper.best == pytest.approx(0.8)
    assert stopper.stop_reason == "non-finite `val_loss` (inf) at epoch 3"
    stopper.on_train_end()


def test_vanishing_patience_counts_consecutive_epochs():
    stopper, model = _driven(monitor="loss", patience=10, vanishing_patience=2,
                             vanishing_threshold=1e-4)
    ratios = [1e-5, 0.1, 1e-6, float("nan"), 1e-6, 1e-7, 1e-8]
    logs = [{"loss": 1.0 - 0.1 * i, "grad_norm/first_to_last": r}
            for i, r in enumerate(ratios)]
    assert _run_epochs(stopper, model, logs) == 5
    assert stopper.stop_reason.startswith(
        "vanishing gradients: `grad_norm/first_to_last` below 0.0001 for 2 epochs"
    )


def test_vanishing_prefers_the_health_monitor_ratio():
    stopper, model = _driven(monitor="loss", patience=10, vanishing_patience=1)
    logs = {"loss": 1.0, "health/first_to_last": 1e-6, "grad_norm/first_to_last": 0.5}
    assert _run_epochs(stopper, model, [logs]) == 0
    assert "`health/first_to_last` below" in stopper.stop_reason
    stopper, model = _driven(monitor="loss", patience=10, vanishing_patience=1,
                             vanishing_monitor="grad_norm/first_to_last")
    assert _run_epochs(stopper, model, [logs]) is None


def test_missing_keys_are_errors_that_list_the_logs():
    stopper, model = _driven()
    with pytest.raises(ValueError, match=r"`val_loss`.*Available: loss, mae"):
        stopper.on_epoch_end(0, {"loss": 1.0, "mae": 2.0})
    stopper, model = _driven(monitor="loss", vanishing_patience=1)
    with pytest.raises(
        ValueError, match=r"'health/first_to_last' or 'grad_norm/first_to_last'.*hold: loss"
    ):
        stopper.on_epoch_end(0, {"loss": 1.0})
    stopper, model = _driven(monitor="loss", vanishing_patience=1, vanishing_monitor="r")
    with pytest.raises(ValueError, match=r"needs 'r' in the logs"):
        stopper.on_epoch_end(0, {"loss": 1.0})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "lowest"}, "auto, min, max.*mode='lowest'"),
        ({"patience": -1}, "patience=-1"),
        ({"vanishing_patience": 0}, "vanishing_patience=0"),
        ({"divergence_threshold": "high"}, "divergence_threshold='high'"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kgrad.EarlyStopping(**kwargs)


# -- wiring with the logger, deep copies and keras-tuner ---------------------------------


def test_vanishing_stop_with_the_logger_on_a_deep_sigmoid_net():
    layers = [keras.Input((3,))]
    layers += [keras.layers.Dense(8, activation="sigmoid") for _ in range(12)]
    model = keras.Sequential(layers + [keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), loss="mse")
    x, y = _data()
    stopper = kgrad.EarlyStopping("loss", patience=50, vanishing_patience=2)
    history = _fit(model, [kgrad.GradientNormLogger(), stopper], x, y, epochs=10)
    assert len(history.history["loss"]) == 2
    assert max(history.history["grad_norm/first_to_last"]) < 1e-4
    assert stopper.stop_reason.startswith("vanishing gradients")


def test_deepcopy_before_and_after_fit_trains_and_resets():
    x, y = _data(nan_row=BATCH)
    stopper = kgrad.EarlyStopping("loss", restore_best_weights=True)
    before = copy.deepcopy(stopper)
    _fit(_model(), [stopper], x, y)
    after = copy.deepcopy(stopper)
    assert after.model is None and after.stop_reason == stopper.stop_reason
    for copied in (before, after):
        _fit(_model(), [copied], x, y)
        assert copied.stop_reason == (
            "non-finite loss (nan) and gradient at epoch 1, batch 2"
        )
    clean_x, clean_y = _data()
    _fit(_model(), [after], clean_x, clean_y, epochs=2)
    assert after.stop_reason is None  # per-run state was reset


def test_all_control_callbacks_compose_with_the_logger_and_keras_tuner(tmp_path):
    x, y = _data(n=64)

    def build(hp):
        model = keras.Sequential([
            keras.Input((3,)),
            keras.layers.Dense(hp.Choice("units", [4, 8]), activation="tanh"),
            keras.layers.Dense(1),
        ])
        model.compile(keras.optimizers.SGD(0.05), loss="mse")
        return model

    logger = kgrad.GradientNormLogger()
    callbacks = [
        logger,
        kgrad.GradientClipping("agc", threshold=0.05),
        kgrad.LearningRateWarmup(warmup_steps=4),
        kgrad.EarlyStopping("val_loss", patience=1, restore_best_weights=True),
    ]
    tuner = keras_tuner.RandomSearch(
        build, objective="val_loss", max_trials=2, seed=1, directory=tmp_path,
        project_name="control",
    )
    tuner.search(x, y, validation_split=0.25, epochs=3, batch_size=BATCH, verbose=0,
                 callbacks=callbacks)
    trials = list(tuner.oracle.trials.values())
    assert len(trials) == 2
    assert all(t.status == "COMPLETED" for t in trials)
    assert all(np.isfinite(t.score) for t in trials)
    assert logger.records is None  # the tuner trained deep copies, not the original


# -- monitors that the model does not log --------------------------------------------------


class BatchCounter(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


def _compiled_with_mae():
    model = _model()
    model.compile(keras.optimizers.SGD(0.01), loss="mse", metrics=["mae"])
    return model


@pytest.mark.parametrize("check_finite", [True, False])
def test_a_training_metric_that_is_not_logged_fails_after_the_first_batch(check_finite):
    x, y = _data()
    model = _compiled_with_mae()
    counter = BatchCounter()
    stopper = kgrad.EarlyStopping(monitor="accuracy", check_finite=check_finite)
    with pytest.raises(ValueError, match=(
        r"monitors `accuracy`, which the model does not log: the logs of the first "
        r"batch hold loss, mae\..*Received: monitor='accuracy'")):
        _fit(model, [counter, stopper], x, y)
    if check_finite:  # synchronous batch hooks: the very first batch
        assert counter.batches == 1
    assert counter.batches < len(x) // BATCH  # before the first epoch ends
    assert not StepHook.attach(model).installed  # unhooked
    _fit(model, [], x, y, epochs=1)  # and the model trains on


def test_a_validation_metric_is_checked_at_the_first_epoch_end():
    x, y = _data()
    counter = BatchCounter()
    with pytest.raises(ValueError, match=(
        r"`val_loss`, which is not in the logs. Available: loss, mae.*validation data")):
        _fit(_compiled_with_mae(), [counter, kgrad.EarlyStopping()], x, y)
    assert counter.batches == len(x) // BATCH


def test_keys_that_callbacks_write_at_the_epoch_end_are_waited_for():
    x, y = _data()
    stopper = kgrad.EarlyStopping(monitor="grad_norm/global", mode="min", patience=5)
    history = _fit(_model(), [kgrad.GradientNormLogger(), stopper], x, y, epochs=2)
    assert stopper.best == pytest.approx(min(history.history["grad_norm/global"]))


@pytest.mark.parametrize("monitor", [None, "", 3])
def test_monitor_must_be_a_name(monitor):
    with pytest.raises(ValueError, match=rf"`monitor` must be the name.*monitor={monitor!r}"):
        kgrad.EarlyStopping(monitor=monitor)


def test_one_element_arrays_are_compared_and_reported():
    # F1Score logs an array of one element per class.
    stopper, model = _driven(monitor="f1", mode="max", check_finite=True)
    assert _run_epochs(stopper, model, [{"f1": np.array([0.5])}, {"f1": np.array([0.4])}]) == 1
    assert stopper.stop_reason == "no improvement in `f1` for 1 epochs (best 0.5 at epoch 1)"
    stopper, model = _driven(monitor="f1", mode="max", check_finite=True)
    assert _run_epochs(stopper, model, [{"f1": np.array([np.nan])}]) == 0
    assert stopper.stop_reason == "non-finite `f1` (nan) at epoch 1"


# -- every optimizer of the step, and models built by their first batch --------------------


def _zero_row_discriminator():
    """sqrt(|x·W|) with no bias: a zero input row makes the kernel's gradient 0/0."""
    return keras.Sequential([
        keras.Input((FEATURES,)),
        keras.layers.Dense(2, use_bias=False, kernel_initializer="ones"),
        SqrtAbs(),
        keras.layers.Dense(1),
    ], name="discriminator")


@pytest.mark.backends("tensorflow", reason="the GAN's train_step is written for TensorFlow")
def test_a_gan_stop_names_the_optimizer_whose_gradient_was_not_finite():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(4 * BATCH, FEATURES)).astype("float32")
    real[2 * BATCH + 1] = 0.0  # the third batch
    gan = make_gan(discriminator=_zero_row_discriminator())
    counter = BatchCounter()
    stopper = kgrad.EarlyStopping(monitor="d_loss")
    gan.fit(real, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
            callbacks=[counter, stopper])
    # The generator stepped first, on finite gradients; the discriminator did not.
    assert stopper.stop_reason == "non-finite gradient (d_optimizer) at epoch 1, batch 3"
    assert counter.batches == 3


def test_the_reason_names_each_optimizer_at_fault():
    stopper = kgrad.EarlyStopping(monitor="d_loss")
    stopper.set_model(make_gan())
    stopper.on_train_begin()
    for name in ("g_optimizer", "d_optimizer"):
        stopper._observe(StepContext(
            variables=[], gradients=[keras.ops.convert_to_tensor([np.inf])], applied=[], step=None,
            strategy=None, optimizer_name=name))
    stopper.on_epoch_begin(1)
    stopper.on_train_batch_end(2, {"d_loss": 0.5, "g_loss": 0.7})
    assert stopper.stop_reason == (
        "non-finite gradient (d_optimizer, g_optimizer) at epoch 2, batch 3"
    )
    stopper.on_train_end()


class WeightsAfterFirstBatch(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 0 and not hasattr(self, "weights"):
            self.weights = self.model.get_weights()


@pytest.mark.backends(
    "tensorflow", reason="on JAX and torch, Keras builds the model before its first step"
)
@pytest.mark.parametrize("build", ["subclassed", "sequential_without_input"])
def test_models_built_by_their_first_batch(build):
    def make():
        model = Regressor() if build == "subclassed" else keras.Sequential(
            [keras.layers.Dense(4), keras.layers.Dense(1)]
        )
        model.compile(keras.optimizers.SGD(0.01), loss="mse")
        return model

    x, y = _data()
    history = _fit(make(), [kgrad.EarlyStopping("loss")], x, y)  # the defaults
    assert len(history.history["loss"]) == 3
    # A NaN in the third batch: the weights restored are those after the first batch,
    # the first the model had (it had none before its first step).
    x, y = _data(nan_row=2 * BATCH)
    model = make()
    first = WeightsAfterFirstBatch()
    stopper = kgrad.EarlyStopping("loss", restore_best_weights=True)
    _fit(model, [first, stopper], x, y)
    assert stopper.stop_reason == "non-finite loss (nan) and gradient at epoch 1, batch 3"
    for restored, expected in zip(model.get_weights(), first.weights, strict=True):
        np.testing.assert_array_equal(restored, expected)


@pytest.mark.backends(
    "tensorflow", reason="on JAX and torch, Keras builds the model before its first step"
)
def test_a_nan_in_the_first_batch_of_an_unbuilt_model_keeps_the_weights(capsys):
    model = keras.Sequential([keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), loss="mse")
    x, y = _data(nan_row=0)
    stopper = kgrad.EarlyStopping("loss", restore_best_weights=True, verbose=1)
    _fit(model, [stopper], x, y)
    assert stopper.stopped_batch == 0
    assert "the model had no weights before it to restore" in capsys.readouterr().out


def test_a_second_fit_reuses_the_traced_step():
    class TrainFunction(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.function = self.model.train_function

    x, y = _data()
    model = _model()
    stopper, seen = kgrad.EarlyStopping("loss"), TrainFunction()
    _fit(model, [stopper, seen], x, y, epochs=1)
    first = seen.function
    _fit(model, [stopper, seen], x, y, epochs=1)
    assert seen.function is first


def test_epochs_without_validation_under_validation_freq_are_waited_for():
    # Keras's own class trains this (it warns at the epochs that do not validate).
    x, y = _data()
    stopper = kgrad.EarlyStopping(monitor="val_loss", patience=1)
    with pytest.warns(UserWarning, match="no validation metrics"):
        history = _model().fit(
            x, y, validation_split=0.25, validation_freq=2, epochs=4, verbose=0,
            callbacks=[stopper],
        )
    assert len(history.history["val_loss"]) >= 1
    assert stopper.best == pytest.approx(min(history.history["val_loss"]))
