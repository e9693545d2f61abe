"""LearningRateWarmup and WarmupSchedule: the trajectory, the hand-over, composition."""

import copy
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import kgrad

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

BATCH, STEPS_PER_EPOCH, TARGET = 8, 4, 0.1


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * STEPS_PER_EPOCH, 3)).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


def _model(learning_rate=TARGET):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(learning_rate), loss="mse")
    return model


def _expected(shape, t, total, start, target):
    """The formulas of the docstring, written out again with NumPy."""
    if t >= total:
        return target
    if shape == "linear":
        return start + (target - start) * t / total
    if shape == "cosine":
        return start + (target - start) * (1 - np.cos(np.pi * t / total)) / 2
    return start * (target / start) ** (t / total)


class RateRecorder(keras.callbacks.Callback):
    """The learning rate each step runs with, and the one its batch logs report."""

    def on_train_begin(self, logs=None):
        self.used, self.logged = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.used.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))

    def on_train_batch_end(self, batch, logs=None):
        self.logged.append(logs.get("learning_rate"))


def _fit(model, callbacks, epochs):
    x, y = _data()
    recorder = RateRecorder()
    history = model.fit(
        x, y, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=callbacks + [recorder]
    )
    return recorder, history


@pytest.mark.parametrize(
    "shape, start",
    [("linear", None), ("cosine", None), ("exponential", 0.001), ("linear", 0.02)],
)
def test_trajectory_matches_the_formula_at_every_step_then_hands_over(shape, start):
    total = 6  # not a multiple of the 4 steps per epoch: the hand-over is mid-epoch
    warmup = kgrad.LearningRateWarmup(
        warmup_steps=total, start_learning_rate=start, shape=shape
    )
    recorder, _ = _fit(_model(), [warmup], epochs=3)
    expected = [_expected(shape, t, total, start or 0.0, TARGET) for t in range(12)]
    np.testing.assert_allclose(recorder.used, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(recorder.logged, expected, rtol=1e-6, atol=1e-9)
    assert recorder.used[total] == np.float32(TARGET)  # exactly the target
    assert recorder.used[0] == pytest.approx(start or 0.0)


def test_warmup_epochs_start_factor_and_epoch_logs():
    warmup = kgrad.LearningRateWarmup(
        warmup_epochs=2, start_factor=0.1, target_learning_rate=0.2, shape="cosine"
    )
    recorder, history = _fit(_model(learning_rate=0.5), [warmup], epochs=3)
    total = 2 * STEPS_PER_EPOCH
    expected = [_expected("cosine", t, total, 0.02, 0.2) for t in range(12)]
    np.testing.assert_allclose(recorder.used, expected, rtol=1e-6)
    # The epoch logs hold the rate at the end of each epoch (handed over after 2).
    np.testing.assert_allclose(
        history.history["learning_rate"], [expected[3], 0.2, 0.2], rtol=1e-6
    )


@pytest.mark.parametrize("warmup_first", [True, False])
def test_reduce_lr_on_plateau_changes_stick_after_the_hand_over(warmup_first):
    warmup = kgrad.LearningRateWarmup(warmup_epochs=2, start_factor=0.5)
    # min_delta so large that every epoch after the first is a plateau: halve the
    # rate at the end of epochs 2, 3 and 4.
    reduce = keras.callbacks.ReduceLROnPlateau("loss", factor=0.5, patience=0,
                                               min_delta=1e9, cooldown=0)
    callbacks = [warmup, reduce] if warmup_first else [reduce, warmup]
    recorder, _ = _fit(_model(), callbacks, epochs=4)
    per_epoch = np.reshape(recorder.used, (4, STEPS_PER_EPOCH))
    warm = [_expected("linear", t, 8, 0.05, TARGET) for t in range(8)]
    np.testing.assert_allclose(per_epoch[:2].ravel(), warm, rtol=1e-6)
    # Listed first, the warm-up hands over before the reduction, which then halves
    # the target; listed after, it keeps the reduction made to its last value.
    handed_over = TARGET if warmup_first else warm[-1]
    np.testing.assert_allclose(per_epoch[2], handed_over / 2, rtol=1e-6)
    np.testing.assert_allclose(per_epoch[3], handed_over / 4, rtol=1e-6)


@pytest.mark.parametrize("scheduler_first", [False, True])
def test_learning_rate_scheduler_starts_from_the_target(scheduler_first):
    seen = []

    def schedule(epoch, rate):
        seen.append(rate)
        return rate * 0.5 if epoch >= 2 else rate

    warmup = kgrad.LearningRateWarmup(warmup_epochs=2)
    scheduler = keras.callbacks.LearningRateScheduler(schedule)
    callbacks = [scheduler, warmup] if scheduler_first else [warmup, scheduler]
    recorder, _ = _fit(_model(), callbacks, epochs=4)
    per_epoch = np.reshape(recorder.used, (4, STEPS_PER_EPOCH))
    assert seen[2] == pytest.approx(TARGET)  # the scheduler sees the target
    np.testing.assert_allclose(per_epoch[2], TARGET / 2, rtol=1e-6)
    np.testing.assert_allclose(per_epoch[3], TARGET / 4, rtol=1e-6)


def test_each_fit_warms_up_again_and_deepcopies_train():
    warmup = kgrad.LearningRateWarmup(warmup_steps=3, start_factor=0.5)
    before = copy.deepcopy(warmup)
    model = _model()
    first, _ = _fit(model, [warmup], epochs=1)
    second, _ = _fit(model, [warmup], epochs=1)
    assert first.used == second.used
    after = copy.deepcopy(warmup)
    assert after.model is None
    for copied in (before, after):
        recorder, _ = _fit(_model(), [copied], epochs=1)
        np.testing.assert_allclose(recorder.used, first.used, rtol=1e-6)


def test_a_schedule_optimizer_points_to_warmup_schedule():
    model = _model()
    decay = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    model.compile(keras.optimizers.SGD(decay), loss="mse")
    with pytest.raises(TypeError, match=r"ExponentialDecay.*kgrad\.WarmupSchedule"):
        _fit(model, [kgrad.LearningRateWarmup(warmup_steps=2)], epochs=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"warmup_steps": 0}, r"`warmup_steps` must be a positive integer.*=0"),
        ({"warmup_steps": -3}, r"warmup_steps=-3"),
        ({"warmup_steps": 2.5}, r"warmup_steps=2.5"),
        ({"warmup_epochs": 0}, r"`warmup_epochs` must be a positive integer"),
        ({"warmup_steps": 2, "warmup_epochs": 1}, "exactly one of"),
        ({}, "exactly one of"),
        ({"warmup_steps": 2, "shape": "step"}, "linear, cosine, exponential"),
        ({"warmup_steps": 2, "shape": "exponential"}, "start > 0"),
        ({"warmup_steps": 2, "shape": "exponential", "start_factor": 0.0},
         r"`start_factor` must be a number in \(0, 1\]. Received: start_factor=0.0"),
        ({"warmup_steps": 2, "start_factor": 1.5},
         r"`start_factor` must be a number in \(0, 1\]. Received: start_factor=1.5"),
        ({"warmup_steps": 2, "start_factor": -0.1}, r"\(0, 1\].*start_factor=-0.1"),
        ({"warmup_steps": 2, "shape": "exponential", "start_learning_rate": 0.0},
         r"exponential.*`start_learning_rate` must be > 0.*start_learning_rate=0.0"),
        ({"warmup_steps": 2, "start_learning_rate": -1.0}, r"≥ 0.*start_learning_rate=-1"),
        ({"warmup_steps": 2, "optimizers": []},
         r"`optimizers` must be the name of an optimizer.*Received: optimizers=\[\]"),
        ({"warmup_steps": 2, "optimizers": ["g_optimizer", 3]}, r"optimizers=\['g_opt"),
        ({"warmup_steps": 2, "start_factor": 0.1, "start_learning_rate": 0.1}, "not both"),
        ({"warmup_steps": 2, "target_learning_rate": 0.0}, "target_learning_rate=0.0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kgrad.LearningRateWarmup(**kwargs)


def test_warmup_epochs_needs_a_known_epoch_length():
    x, y = _data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    dataset = dataset.filter(lambda a, b: True)  # unknown cardinality
    with pytest.raises(ValueError, match="steps_per_epoch"):
        _model().fit(dataset, epochs=1, verbose=0, shuffle=False,
                     callbacks=[kgrad.LearningRateWarmup(warmup_epochs=1)])


# -- WarmupSchedule -----------------------------------------------------------------------


def test_schedule_warms_up_then_follows_the_offset_base():
    base = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    schedule = kgrad.WarmupSchedule(base, warmup_steps=4, start_factor=0.1, shape="cosine")
    got = [float(schedule(step)) for step in range(10)]
    warm = [_expected("cosine", t, 4, 0.01, 0.1) for t in range(4)]
    after = [0.1 * 0.5 ** ((step - 4) / 10) for step in range(4, 10)]
    np.testing.assert_allclose(got, warm + after, rtol=1e-6)
    constant = kgrad.WarmupSchedule(0.3, warmup_steps=3, start_learning_rate=0.03,
                                    shape="exponential")
    np.testing.assert_allclose(
        [float(constant(step)) for step in range(5)],
        [0.03 * 10 ** (t / 3) for t in range(3)] + [0.3, 0.3],
        rtol=1e-6,
    )


def test_schedule_drives_the_optimizer_during_fit():
    schedule = kgrad.WarmupSchedule(TARGET, warmup_steps=8)
    model = _model(learning_rate=schedule)
    recorder, _ = _fit(model, [], epochs=3)
    np.testing.assert_allclose(
        recorder.used,
        [_expected("linear", t, 8, 0.0, TARGET) for t in range(12)],
        rtol=1e-6,
        atol=1e-9,
    )


class WeightSteps(keras.callbacks.Callback):
    """The kernel after every step (read at batch ends), and before the first."""

    def on_train_begin(self, logs=None):
        self.kernels = [np.array(self.model.layers[0].kernel.numpy())]

    def on_train_batch_end(self, batch, logs=None):
        self.kernels.append(np.array(self.model.layers[0].kernel.numpy()))


_COMPILED = pytest.mark.backends("torch", reason="torch.compile of the step")
_SLOW = pytest.mark.slow_on("torch", reason="torch.compile traces Keras's step for 40-100 s on 2 CPU cores; one compiled case per feature runs by default")


@pytest.mark.parametrize("how,jit_compile", [
    ("callback", "auto"),
    ("schedule", "auto"),
    pytest.param("callback", True, marks=_COMPILED, id="callback-True"),
    pytest.param("schedule", True, marks=[_COMPILED, _SLOW], id="schedule-True"),
])
def test_the_step_applies_the_warmup_rate(how, jit_compile):
    """What SGD applied: |dw| / |g| of each step (g as the logger records it) is the
    warmup rate of that step, with the callback and with the schedule."""
    total = 6
    if how == "callback":
        model, callbacks = _model(), [kgrad.LearningRateWarmup(warmup_steps=total)]
    else:
        model, callbacks = _model(kgrad.WarmupSchedule(TARGET, warmup_steps=total)), []
    model.compile(model.optimizer, loss="mse", jit_compile=jit_compile)
    logger, weights = kgrad.GradientNormLogger(), WeightSteps()
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
              callbacks=[logger, *callbacks, weights])
    frame = logger.to_dataframe()
    grads = frame[frame["kind"] == "kernel"].sort_values("step")["grad_norm"].to_numpy()
    moved = [np.linalg.norm(b - a) for a, b in zip(weights.kernels, weights.kernels[1:])]
    expected = [_expected("linear", t, total, 0.0, TARGET) for t in range(8)]
    np.testing.assert_allclose(np.asarray(moved) / grads, expected, rtol=1e-4, atol=1e-7)


def test_schedule_round_trips_through_a_keras_file(tmp_path):
    base = keras.optimizers.schedules.CosineDecay(0.2, decay_steps=20)
    schedule = kgrad.WarmupSchedule(base, warmup_steps=5, start_learning_rate=0.01)
    model = _model(learning_rate=schedule)
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    path = tmp_path / "warm.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    restored = loaded.optimizer._learning_rate
    assert isinstance(restored, kgrad.WarmupSchedule)
    assert isinstance(restored.base, keras.optimizers.schedules.CosineDecay)
    assert restored.get_config() == schedule.get_config()
    steps = [0, 2, 4, 5, 6, 13, 30]
    np.testing.assert_allclose(
        [float(restored(s)) for s in steps], [float(schedule(s)) for s in steps], rtol=1e-7
    )
    float_base = kgrad.WarmupSchedule(0.1, warmup_steps=2, start_factor=0.5)
    copy_ = kgrad.WarmupSchedule.from_config(float_base.get_config())
    assert [float(copy_(s)) for s in range(3)] == [float(float_base(s)) for s in range(3)]


def test_schedule_bad_arguments():
    with pytest.raises(ValueError, match="warmup_steps=0"):
        kgrad.WarmupSchedule(0.1, warmup_steps=0)
    with pytest.raises(ValueError, match="LearningRateSchedule"):
        kgrad.WarmupSchedule("0.1", warmup_steps=2)
    with pytest.raises(ValueError, match="start > 0"):
        kgrad.WarmupSchedule(0.1, warmup_steps=2, shape="exponential")
    with pytest.raises(ValueError, match=r"\(0, 1\]. Received: start_factor=1.5"):
        kgrad.WarmupSchedule(0.1, warmup_steps=2, start_factor=1.5)
    assert math.isclose(
        float(kgrad.WarmupSchedule(0.1, warmup_steps=2)(1)), 0.05, rel_tol=1e-6
    )
