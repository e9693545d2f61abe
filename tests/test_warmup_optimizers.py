"""LearningRateWarmup on every optimizer the step uses: a GAN's two, `optimizers=`, models
built by their first batch, schedules among several optimizers.

The GAN's `train_step` uses `tf.GradientTape` (keras-io's pattern): TensorFlow only.
"""

import keras
import numpy as np
import pytest
from custom_models import FEATURES, Regressor, make_gan

import kgrad

pytestmark = pytest.mark.backends(
    "tensorflow", reason="the GAN's train_step uses tf.GradientTape (keras-io's pattern)"
)

BATCH, STEPS_PER_EPOCH = 4, 3
D_RATE, G_RATE, DEFAULT_RATE = 0.02, 0.01, 0.001  # RMSprop's default for compile()


def _real():
    rng = np.random.default_rng(0)
    return rng.normal(size=(BATCH * STEPS_PER_EPOCH, FEATURES)).astype("float32")


class RatesRecorder(keras.callbacks.Callback):
    """Each optimizer's rate as each step runs with it, and the batch logs."""

    def __init__(self, names):
        super().__init__()
        self.names = names

    def on_train_begin(self, logs=None):
        self.used = {name: [] for name in self.names}
        self.logged = []

    def on_train_batch_begin(self, batch, logs=None):
        for name in self.names:
            rate = getattr(self.model, name).learning_rate
            self.used[name].append(float(keras.ops.convert_to_numpy(rate)))

    def on_train_batch_end(self, batch, logs=None):
        self.logged.append(dict(logs))


def _fit(model, callbacks, epochs=2, names=("optimizer", "d_optimizer", "g_optimizer")):
    recorder = RatesRecorder(list(names))
    history = model.fit(_real(), batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
                        callbacks=callbacks + [recorder])
    return recorder, history


def _linear(target, steps, total=4, factor=0.25):
    return [target * (factor + (1 - factor) * min(t / total, 1.0)) for t in range(steps)]


def test_a_gan_warms_each_optimizer_from_its_own_target():
    gan = make_gan(D_RATE, G_RATE)
    warmup = kgrad.LearningRateWarmup(warmup_steps=4, start_factor=0.25)
    recorder, history = _fit(gan, [warmup])
    steps = 2 * STEPS_PER_EPOCH
    np.testing.assert_allclose(recorder.used["d_optimizer"], _linear(D_RATE, steps),
                               rtol=1e-6)
    np.testing.assert_allclose(recorder.used["g_optimizer"], _linear(G_RATE, steps),
                               rtol=1e-6)
    # 0.005, 0.00875, 0.0125, 0.01625, then exactly the target from step 4 on.
    assert recorder.used["d_optimizer"][:2] == pytest.approx([0.005, 0.00875])
    assert recorder.used["d_optimizer"][4:] == [np.float32(D_RATE)] * 2
    assert recorder.used["g_optimizer"][4:] == [np.float32(G_RATE)] * 2
    # The default optimizer that compile() made: set with the others for the first
    # step (which did not use it), then back at its rate and never touched again.
    assert recorder.used["optimizer"][1:] == [np.float32(DEFAULT_RATE)] * (steps - 1)
    assert float(gan.optimizer.learning_rate.numpy()) == np.float32(DEFAULT_RATE)
    assert int(gan.optimizer.iterations.numpy()) == 0
    assert int(gan.d_optimizer.iterations.numpy()) == steps
    # Logs: one key per warmed optimizer, none for the unused default.
    assert set(recorder.logged[0]) == {"d_loss", "g_loss", "learning_rate/d_optimizer",
                                       "learning_rate/g_optimizer"}
    np.testing.assert_allclose(
        [logs["learning_rate/g_optimizer"] for logs in recorder.logged],
        _linear(G_RATE, steps), rtol=1e-6,
    )
    np.testing.assert_allclose(history.history["learning_rate/d_optimizer"],
                               [_linear(D_RATE, 3)[2], D_RATE], rtol=1e-6)


def test_optimizers_chooses_which_are_warmed():
    gan = make_gan(D_RATE, G_RATE)
    warmup = kgrad.LearningRateWarmup(warmup_steps=4, start_factor=0.25,
                                      optimizers="g_optimizer")
    recorder, _ = _fit(gan, [warmup])
    np.testing.assert_allclose(recorder.used["g_optimizer"], _linear(G_RATE, 6), rtol=1e-6)
    assert recorder.used["d_optimizer"] == [np.float32(D_RATE)] * 6
    assert recorder.used["optimizer"] == [np.float32(DEFAULT_RATE)] * 6


def test_target_learning_rate_is_every_optimizer_target():
    gan = make_gan(D_RATE, G_RATE)
    warmup = kgrad.LearningRateWarmup(warmup_steps=2, start_learning_rate=0.001,
                                      target_learning_rate=0.005)
    recorder, _ = _fit(gan, [warmup], epochs=1)
    for name in ("d_optimizer", "g_optimizer"):
        np.testing.assert_allclose(recorder.used[name], [0.001, 0.003, 0.005], rtol=1e-6)
    # The unused default goes back to its own rate, not to the common target.
    assert float(gan.optimizer.learning_rate.numpy()) == np.float32(DEFAULT_RATE)


def test_an_optimizer_named_but_unused_is_warned_about():
    gan = make_gan(D_RATE, G_RATE)
    warmup = kgrad.LearningRateWarmup(warmup_steps=4, start_factor=0.25,
                                      optimizers=["optimizer", "d_optimizer"])
    with pytest.warns(UserWarning, match=(
        r"optimizers=\['optimizer', 'd_optimizer'\]` names optimizer, which the "
        r"training step did not use in its first batch.*The step used: d_optimizer, "
        r"g_optimizer")):
        recorder, _ = _fit(gan, [warmup], epochs=1)
    np.testing.assert_allclose(recorder.used["optimizer"], _linear(DEFAULT_RATE, 3),
                               rtol=1e-6)  # warmed all the same, as asked


def test_unknown_optimizer_names_are_an_error_that_lists_the_model_optimizers():
    gan = make_gan()
    warmup = kgrad.LearningRateWarmup(warmup_steps=2, optimizers=["c_optimizer"])
    with pytest.raises(ValueError, match=(
        r"`optimizers` names optimizers that model 'gan' does not hold. Received: "
        r"optimizers=\['c_optimizer'\]. Optimizers of this model: optimizer, "
        r"d_optimizer, g_optimizer")):
        _fit(gan, [warmup], epochs=1)
    assert float(gan.d_optimizer.learning_rate.numpy()) == np.float32(0.02)


def test_a_model_without_optimizer_is_an_error():
    warmup = kgrad.LearningRateWarmup(warmup_steps=2)
    warmup.set_model(keras.Sequential([keras.layers.Dense(1)]))
    with pytest.raises(ValueError, match="holds no Keras optimizer"):
        warmup.on_train_begin()


def test_schedules_among_several_optimizers():
    decay = keras.optimizers.schedules.ExponentialDecay(0.02, 10, 0.5)
    # Named: an error before training.
    gan = make_gan()
    gan.d_optimizer = keras.optimizers.SGD(decay)
    with pytest.raises(TypeError, match=r"d_optimizer \(ExponentialDecay\).*WarmupSchedule"):
        _fit(gan, [kgrad.LearningRateWarmup(warmup_steps=2, optimizers="d_optimizer")])
    # Chosen by the step: an error after the first batch, which showed it in use.
    gan = make_gan()
    gan.d_optimizer = keras.optimizers.SGD(decay)
    with pytest.raises(TypeError, match=r"d_optimizer \(ExponentialDecay\)"):
        _fit(gan, [kgrad.LearningRateWarmup(warmup_steps=2)])
    # An unused default with a schedule is no concern of the warm-up.
    gan = make_gan(D_RATE, G_RATE)
    gan.optimizer = keras.optimizers.SGD(decay)
    recorder, _ = _fit(gan, [kgrad.LearningRateWarmup(warmup_steps=2, start_factor=0.5)],
                       epochs=1, names=("d_optimizer",))
    np.testing.assert_allclose(recorder.used["d_optimizer"], [0.01, 0.015, 0.02], rtol=1e-6)


def test_learning_rate_at_names_the_optimizer_when_there_are_several():
    gan = make_gan(D_RATE, G_RATE)
    warmup = kgrad.LearningRateWarmup(warmup_steps=4, start_factor=0.25)
    _fit(gan, [warmup], epochs=1)
    assert warmup.learning_rate_at(2, "g_optimizer") == pytest.approx(0.00625)
    with pytest.raises(ValueError, match=r"d_optimizer, g_optimizer. Received: optimizer=None"):
        warmup.learning_rate_at(2)


@pytest.mark.parametrize("build", ["subclassed", "sequential_without_input"])
def test_models_built_by_their_first_batch(build):
    model = Regressor() if build == "subclassed" else keras.Sequential(
        [keras.layers.Dense(2), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.SGD(0.1), loss="mse")
    x = _real()
    recorder = RatesRecorder(["optimizer"])
    model.fit(x, x[:, :1], batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
              callbacks=[kgrad.LearningRateWarmup(warmup_steps=4, start_factor=0.25),
                         recorder])
    np.testing.assert_allclose(recorder.used["optimizer"], _linear(0.1, 6), rtol=1e-6)
    assert recorder.logged[0]["learning_rate"] == pytest.approx(0.025)


def test_not_async_safe():
    # Its batch-end hook reads optimizer state: never on Keras's worker thread.
    assert kgrad.LearningRateWarmup(warmup_steps=2).async_safe is False
