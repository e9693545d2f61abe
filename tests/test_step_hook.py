"""The step hook wherever Keras trains: models built by their first batch, custom steps
with several optimizers (GAN, VAE), and fit after fit without a new trace.

Each custom `train_step` is written the way its backend's guide writes it: with
`tf.GradientTape` and `optimizer.apply_gradients` on TensorFlow; on JAX stateless
(Keras's "customizing what happens in fit() with JAX"): `jax.value_and_grad` of the
loss at the step's values, each optimizer's `stateless_apply`, the new state returned;
on torch as in "customizing what happens in fit() with PyTorch": `self.zero_grad()`,
the forward pass, `loss.backward()`, the gradients from `v.value.grad`, and
`optimizer.apply` under `torch.no_grad()`. Reference gradients come from each
backend's own autodiff (`autodiff`).
"""

import keras
import numpy as np
import pytest

import autodiff
import kgrad
from test_gradient_norm_logger import _data  # the shared test data
from test_gradient_norm_logger import _hand_norms

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

BATCH = 16


class SubclassedNet(keras.Model):
    """The guide's workflow: layers in `__init__`, a `call`, no `Input`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(5, activation="tanh", name="hidden")
        self.out = keras.layers.Dense(1, name="out")

    def call(self, x):
        return self.out(self.hidden(x))


def _input_less_sequential():
    return keras.Sequential(
        [
            keras.layers.Dense(5, activation="relu", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ]
    )


def _count_traces(model):
    """`traces()`: how many times the step has been traced so far. On TensorFlow and
    JAX the Python of `model.train_step` runs only while tracing (counted); under
    `torch.compile`, dynamo's count of the graphs it made (a Python counter in the
    step would itself make dynamo recompile)."""
    if keras.backend.backend() == "torch":
        from torch._dynamo.utils import counters

        return lambda: counters["stats"]["unique_graphs"]
    calls = []
    train_step = model.train_step

    def counting(data):
        calls.append(1)
        return train_step(data)

    model.train_step = counting
    return lambda: len(calls)


@pytest.mark.parametrize("make", [SubclassedNet, _input_less_sequential])
def test_unbuilt_models_with_every_callback_at_once(make):
    x, y = _data()
    model = make()
    # lr 0: the weights stay where they are, so every step can be recomputed by hand.
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    assert not model.built
    logger = kgrad.GradientNormLogger()
    callbacks = [
        logger,
        kgrad.GradientHealthMonitor(probe_data=x, probe_every_n_steps=1, verbose=0),
        kgrad.GradientClipping("global_norm", threshold=1e6),
        kgrad.EarlyStopping(monitor="loss", patience=5),
        kgrad.LearningRateWarmup(warmup_steps=2),
    ]
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
    frame = logger.to_dataframe()
    expected = _hand_norms(model, x, y)
    assert len(frame) == 2 * 2 * 4  # 2 epochs x 2 steps x 4 variables
    for (layer, variable), norms in expected.items():
        rows = frame[(frame.layer == layer) & (frame.variable == variable)]
        np.testing.assert_allclose(rows.grad_norm, norms * 2, rtol=1e-5)
    assert set(frame.optimizer) == {"optimizer"}


@pytest.mark.parametrize("make", [SubclassedNet, _input_less_sequential])
def test_unbuilt_model_with_a_filter_that_matches_nothing_fails_at_the_first_step(make):
    x, y = _data()
    model = make()
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match=r"layers=\['nothing\*'\]"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[kgrad.GradientNormLogger(layers="nothing*")])


def _fit_twice_then_plain(model, callbacks, x, y):
    traces = _count_traces(model)
    counts = []
    for kgrad_fit in (True, True, False, False, True):
        model.fit(
            x, y, batch_size=BATCH, epochs=2, verbose=0,
            callbacks=callbacks if kgrad_fit else None,
        )
        counts.append(traces())
    return counts


def test_fit_after_fit_traces_nothing_new():
    x, y = _data()
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)]
    )
    # Compiled on every backend (on torch `"auto"` is eager, with nothing to retrace).
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)  # plain, traced once
    logger = kgrad.GradientNormLogger()
    clipping = kgrad.GradientClipping("agc")
    counts = _fit_twice_then_plain(model, [logger, clipping], x, y)
    traced = counts[0]
    # The first fit with kgrad traces; the second, the plain ones after it (the plain
    # function traced before) and a kgrad fit after those trace nothing new.
    assert counts == [traced] * 5, counts
    # ... and the reused function still records every step of each fit.
    assert len(logger.records) == 2 * 2


def test_a_new_compile_gets_a_new_trace_with_the_new_optimizer():
    x, y = _data()
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    logger = kgrad.GradientNormLogger()
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[logger])
    model.compile(optimizer=keras.optimizers.Adam(0.0), loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[logger])
    expected = _hand_norms(model, x, y)
    frame = logger.to_dataframe()
    rows = frame[frame.variable == "kernel"]
    np.testing.assert_allclose(rows.grad_norm, expected[("dense", "kernel")], rtol=1e-5)
    assert int(model.optimizer.iterations.numpy()) == 2


# -- a GAN: a custom step with two optimizers --------------------------------------------


class TwoOptimizerGAN(keras.Model):
    """keras-io's GAN pattern, deterministic: `compile(d_optimizer=, g_optimizer=)`,
    a `train_step` calling both optimizers, no `call()` (the step is the backend's:
    `TapeGAN`, `StatelessGAN`, `BackwardGAN`)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.generator = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(6, activation="tanh", name="g_dense"),
             keras.layers.Dense(6, name="g_out")],
            name="generator",
        )
        self.discriminator = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(5, activation="relu", name="d_dense"),
             keras.layers.Dense(1, name="d_out")],
            name="discriminator",
        )

    def compile(self, d_optimizer, g_optimizer):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer

    def losses_of(self, real, latent):
        fake = self.generator(latent)
        real_score = self.discriminator(real)
        fake_score = self.discriminator(fake)
        d_loss = keras.ops.mean(keras.ops.softplus(-real_score)) + keras.ops.mean(
            keras.ops.softplus(fake_score)
        )
        g_loss = keras.ops.mean(keras.ops.softplus(-fake_score))
        return d_loss, g_loss

    def parts(self):
        """(optimizer name, sub-model, index of its loss in `losses_of`), in step order."""
        return (("d_optimizer", self.discriminator, 0), ("g_optimizer", self.generator, 1))


def _latent(real):
    return real[:, :4] * 0.5  # deterministic "noise", so steps can be redone


class TapeGAN(TwoOptimizerGAN):
    def train_step(self, data):
        import tensorflow as tf

        real = data
        losses = {}
        for name, sub, index in self.parts():
            with tf.GradientTape() as tape:
                losses[name] = self.losses_of(real, _latent(real))[index]
            variables = sub.trainable_variables
            grads = tape.gradient(losses[name], variables)
            getattr(self, name).apply_gradients(zip(grads, variables))
        return {"d_loss": losses["d_optimizer"], "g_loss": losses["g_optimizer"]}


def _backward(loss, variables):
    """`loss.backward()` from zeroed gradients: the gradients of `variables`, as
    Keras's PyTorch guide reads them (`v.value.grad`)."""
    loss.backward()
    return [v.value.grad for v in variables]


class BackwardGAN(TwoOptimizerGAN):
    def compile(self, d_optimizer, g_optimizer):
        super().compile(d_optimizer, g_optimizer)
        self.built = True  # no `call()` for Keras to build the model with

    def train_step(self, data):
        import torch

        real = data
        losses = {}
        for name, sub, index in self.parts():
            self.zero_grad()
            losses[name] = self.losses_of(real, _latent(real))[index]
            variables = sub.trainable_weights
            grads = _backward(losses[name], variables)
            with torch.no_grad():
                getattr(self, name).apply(grads, variables)
        return {"d_loss": losses["d_optimizer"], "g_loss": losses["g_optimizer"]}


class OptimizerStates(keras.optimizers.Optimizer):
    """`model.optimizer` of a JAX step with optimizers of its own.

    Keras's JAX trainer carries `model.optimizer.variables`, and no other optimizer's,
    through its jitted step; this optimizer's variables are also those of the
    optimizers it holds (as a `LossScaleOptimizer`'s are its inner optimizer's), so
    that their state travels in the step's state too. It is never called itself.
    """

    def __init__(self, optimizers):
        super().__init__(learning_rate=0.0, name="optimizer_states")
        self.held = list(optimizers)

    @property
    def variables(self):
        return self._variables + [v for held in self.held for v in held.variables]

    def split(self, values):
        """`values` of `variables` as [own values, values of each held optimizer]."""
        sizes = [len(self._variables)] + [len(held.variables) for held in self.held]
        bounds = np.cumsum([0] + sizes)
        return [list(values[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


class StatelessGAN(TwoOptimizerGAN):
    def compile(self, d_optimizer, g_optimizer):
        super().compile(d_optimizer, g_optimizer)
        for name, sub, _ in self.parts():
            getattr(self, name).build(sub.trainable_variables)
        self.optimizer = OptimizerStates([d_optimizer, g_optimizer])
        self.built = True  # no `call()` for Keras to build the model with

    def train_step(self, state, data):
        import jax

        trainable, non_trainable, optimizer_values, metrics_values = state
        own, *held = self.optimizer.split(optimizer_values)
        real = data
        positions = {id(v): i for i, v in enumerate(self.trainable_variables)}
        trainable = list(trainable)
        losses, new_held = {}, []
        for (name, sub, index), values in zip(self.parts(), held):

            def loss(trainable_values, index=index):
                mapping = list(zip(self.trainable_variables, trainable_values))
                mapping += list(zip(self.non_trainable_variables, non_trainable))
                with keras.StatelessScope(state_mapping=mapping):
                    return self.losses_of(real, _latent(real))[index]

            losses[name], grads = jax.value_and_grad(loss)(trainable)
            mine = [positions[id(v)] for v in sub.trainable_variables]
            updated, values = getattr(self, name).stateless_apply(
                values, [grads[i] for i in mine], [trainable[i] for i in mine]
            )
            new_held.append(values)
            for i, value in zip(mine, updated):
                trainable[i] = value
        optimizer_values = own + [v for values in new_held for v in values]
        logs = {"d_loss": losses["d_optimizer"], "g_loss": losses["g_optimizer"]}
        return logs, (trainable, non_trainable, optimizer_values, metrics_values)


def _gan_hand_norms(gan, real):
    """Per optimizer, {(layer, variable): [norm per batch]} and [global norm per batch]."""
    out = {"d_optimizer": ({}, []), "g_optimizer": ({}, [])}
    for start in range(0, len(real), BATCH):
        batch = real[start : start + BATCH]
        for name, sub, index in gan.parts():
            _, grads = autodiff.variable_gradients(
                lambda: gan.losses_of(batch, _latent(batch))[index], sub.trainable_variables
            )
            per_variable, global_norms = out[name]
            for variable, grad in zip(sub.trainable_variables, grads):
                layer = f"{sub.name}/{variable.path.split('/')[-2]}"
                per_variable.setdefault((layer, variable.name), []).append(
                    autodiff.norm(grad)
                )
            global_norms.append(float(np.sqrt(sum(autodiff.norm(g) ** 2 for g in grads))))
    return out


def _backend_model(tape_class, stateless_class, backward_class, name):
    """The model whose `train_step` is written for this run's backend."""
    classes = {"tensorflow": tape_class, "jax": stateless_class, "torch": backward_class}
    return classes[autodiff.BACKEND](name=name)


def _gan(learning_rate=0.0, jit_compile=None):
    gan = _backend_model(TapeGAN, StatelessGAN, BackwardGAN, "gan")
    gan.compile(
        d_optimizer=keras.optimizers.SGD(learning_rate),
        g_optimizer=keras.optimizers.SGD(learning_rate),
    )
    if jit_compile is not None:  # the keras-io `compile` takes the optimizers only
        gan.jit_compile = jit_compile
    return gan


# jit_compile=True: XLA on TensorFlow, jax.jit, torch.compile (on torch "auto" is eager).
@pytest.mark.parametrize("jit_compile", [False, True])
def test_gan_records_per_optimizer_equal_hand_gradients(jit_compile):
    real, _ = _data()
    gan = _gan(jit_compile=jit_compile)
    traces = _count_traces(gan)
    before = traces()
    logger = kgrad.GradientNormLogger()
    gan.fit(real, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[logger])
    frame = logger.to_dataframe()
    assert set(frame.optimizer) == {"d_optimizer", "g_optimizer"}
    assert set(logger.records_by_optimizer) == {"d_optimizer", "g_optimizer"}
    expected = _gan_hand_norms(gan, real)
    for name, (per_variable, global_norms) in expected.items():
        part = frame[frame.optimizer == name]
        for (layer, variable), norms in per_variable.items():
            rows = part[(part.layer == layer) & (part.variable == variable)]
            np.testing.assert_allclose(rows.grad_norm, norms * 2, rtol=1e-5)
        globals_ = part.drop_duplicates("step").global_norm
        np.testing.assert_allclose(globals_, global_norms * 2, rtol=1e-5)
    # The default optimizer that compile() made is never called: nothing of it.
    assert int(gan.optimizer.iterations.numpy()) == 0
    if keras.backend.backend() == "torch":  # the step ran compiled, or eagerly
        assert (traces() > before) == jit_compile


@pytest.mark.backends(
    "tensorflow",
    "jax",
    reason="on torch an optimizer not built before fit (the PyTorch guide's GAN) gets a "
    "norm buffer over every tracked variable of the model, made before the first step "
    "(STATE_BEFORE_STEP): g_optimizer's records carry the discriminator's variables "
    "with NaN norms, and d_optimizer's the generator's",
)
def test_gan_records_of_each_optimizer_hold_only_the_variables_it_updates():
    real, _ = _data()
    gan = _gan()
    logger = kgrad.GradientNormLogger()
    gan.fit(real, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[logger])
    frame = logger.to_dataframe()
    for name, sub, _ in gan.parts():
        part = frame[frame.optimizer == name]
        # Layers keep their sub-model path.
        assert set(part.layer.astype(str)) == {f"{sub.name}/{layer.name}" for layer in sub.layers}
        assert part.grad_norm.notna().all()


def test_gan_clipping_acts_on_both_optimizers_and_the_logger_sees_it():
    real, _ = _data()
    gan = _gan()
    expected = _gan_hand_norms(gan, real)
    threshold = 0.5 * min(min(norms) for _, norms in expected.values())
    logger = kgrad.GradientNormLogger()
    clipping = kgrad.GradientClipping("global_norm", threshold=threshold)
    gan.fit(real, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
            callbacks=[logger, clipping])
    frame = logger.to_dataframe()
    for name, (_, global_norms) in expected.items():
        part = frame[frame.optimizer == name]
        np.testing.assert_allclose(part.drop_duplicates("step").global_norm, global_norms, rtol=1e-5)
        # Each optimizer's global norm is clipped to the threshold on its own.
        clipped = part.groupby("step").clipped_grad_norm.apply(lambda g: np.sqrt((g**2).sum()))
        np.testing.assert_allclose(clipped, threshold, rtol=1e-4)
    assert clipping.clipped_fraction == 1.0


def test_gan_clipping_of_one_optimizer_leaves_the_other_alone():
    real, _ = _data()
    gan = _gan()
    expected = _gan_hand_norms(gan, real)
    logger = kgrad.GradientNormLogger()
    clipping = kgrad.GradientClipping("global_norm", threshold=1e-3, optimizers="g_optimizer")
    gan.fit(real, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
            callbacks=[logger, clipping])
    frame = logger.to_dataframe()
    g = frame[frame.optimizer == "g_optimizer"].groupby("step").clipped_grad_norm
    np.testing.assert_allclose(g.apply(lambda v: np.sqrt((v**2).sum())), 1e-3, rtol=1e-4)
    d = frame[frame.optimizer == "d_optimizer"]
    np.testing.assert_allclose(d.clipped_grad_norm, d.grad_norm)
    np.testing.assert_allclose(d.drop_duplicates("step").global_norm, expected["d_optimizer"][1], rtol=1e-5)


def test_clipping_an_optimizer_the_step_never_calls_says_so_after_the_first_step():
    real, _ = _data()
    gan = _gan()
    clipping = kgrad.GradientClipping("global_norm", optimizers=["optimizer"])
    with pytest.raises(RuntimeError, match=r"calls only \['d_optimizer', 'g_optimizer'\]"):
        gan.fit(real, batch_size=BATCH, epochs=1, verbose=0, callbacks=[clipping])


def test_clipping_rejects_an_optimizer_the_model_does_not_hold():
    real, _ = _data()
    gan = _gan()
    clipping = kgrad.GradientClipping("global_norm", optimizers=["e_optimizer"])
    with pytest.raises(ValueError, match="e_optimizer.*d_optimizer, g_optimizer"):
        gan.fit(real, batch_size=BATCH, epochs=1, verbose=0, callbacks=[clipping])


def test_gan_monitor_judges_each_optimizer_on_its_own():
    real, _ = _data()
    gan = _gan()
    monitor = kgrad.GradientHealthMonitor(verbose=0)
    gan.fit(real, batch_size=BATCH, epochs=2, verbose=0, callbacks=[monitor])
    assert set(monitor.records_by_optimizer) == {"d_optimizer", "g_optimizer"}
    for name in ("d_optimizer", "g_optimizer"):
        assert len(monitor.records_by_optimizer[name]) == 4
        assert monitor.report(optimizer=name).layers is not None
    with pytest.raises(ValueError, match="optimizer='optimizer'"):
        monitor.report(optimizer="optimizer")


def test_gan_early_stopping_reads_each_optimizer_mid_epoch():
    real, _ = _data(n=4 * BATCH)
    real[BATCH + 3, 5] = np.nan  # the second batch: the discriminator's loss, then all
    gan = _gan()
    stopper = kgrad.EarlyStopping(monitor="d_loss", mode="min")
    gan.fit(real, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[stopper])
    assert stopper.stop_reason == (
        "non-finite gradient (d_optimizer, g_optimizer) at epoch 1, batch 2"
    )
    assert int(gan.d_optimizer.iterations.numpy()) == 2


# -- a VAE: its own step, one optimizer, no call() ---------------------------------------


class TinyVAE(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encoder = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(4, activation="relu", name="enc"),
             keras.layers.Dense(4, name="stats")],
            name="encoder",
        )
        self.decoder = keras.Sequential(
            [keras.Input((2,)), keras.layers.Dense(6, name="dec")], name="decoder"
        )

    def loss_of(self, x):
        stats = self.encoder(x)
        mean, log_var = stats[:, :2], stats[:, 2:]
        z = mean  # the posterior mean: deterministic, so steps can be redone
        reconstruction = self.decoder(z)
        kl = -0.5 * keras.ops.mean(1 + log_var - mean**2 - keras.ops.exp(log_var))
        return keras.ops.mean((x - reconstruction) ** 2) + kl


class TapeVAE(TinyVAE):
    def train_step(self, data):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = self.loss_of(data)
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        return {"loss": loss}


class StatelessVAE(TinyVAE):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.built = True  # no `call()` for Keras to build the model with

    def train_step(self, state, data):
        import jax

        trainable, non_trainable, optimizer_values, metrics_values = state

        def loss(trainable_values):
            mapping = list(zip(self.trainable_variables, trainable_values))
            mapping += list(zip(self.non_trainable_variables, non_trainable))
            with keras.StatelessScope(state_mapping=mapping):
                return self.loss_of(data)

        loss_value, grads = jax.value_and_grad(loss)(trainable)
        trainable, optimizer_values = self.optimizer.stateless_apply(
            optimizer_values, grads, trainable
        )
        state = (trainable, non_trainable, optimizer_values, metrics_values)
        return {"loss": loss_value}, state


class BackwardVAE(TinyVAE):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.built = True  # no `call()` for Keras to build the model with

    def train_step(self, data):
        import torch

        self.zero_grad()
        loss = self.loss_of(data)
        grads = _backward(loss, self.trainable_weights)
        with torch.no_grad():
            self.optimizer.apply(grads, self.trainable_weights)
        return {"loss": loss}


def test_vae_with_its_own_step_records_exact_norms():
    x, _ = _data()
    vae = _backend_model(TapeVAE, StatelessVAE, BackwardVAE, "vae")
    vae.compile(optimizer=keras.optimizers.Adam(0.0))
    logger = kgrad.GradientNormLogger()
    vae.fit(x, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[logger])
    frame = logger.to_dataframe()
    assert {"encoder/enc", "encoder/stats", "decoder/dec"} == set(frame.layer.astype(str))
    steps = sorted(set(frame.step))
    assert len(steps) == 2
    for start, step in zip(range(0, len(x), BATCH), steps):
        _, grads = autodiff.variable_gradients(
            lambda: vae.loss_of(keras.ops.convert_to_tensor(x[start : start + BATCH])),
            vae.trainable_variables,
        )
        np.testing.assert_allclose(
            frame[frame.step == step].global_norm.iloc[0],
            np.sqrt(sum(autodiff.norm(g) ** 2 for g in grads)),
            rtol=1e-5,
        )


class NoOptimizerStep(keras.Model):
    """A step that updates its weights by hand: no Keras optimizer is called."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)


class TapeNoOptimizerStep(NoOptimizerStep):
    def train_step(self, data):
        import tensorflow as tf

        x, y = data
        with tf.GradientTape() as tape:
            loss = keras.ops.mean((self(x) - y) ** 2)
        for variable, grad in zip(self.trainable_variables, tape.gradient(loss, self.trainable_variables)):
            variable.assign_sub(0.01 * grad)
        return {"loss": loss}


class StatelessNoOptimizerStep(NoOptimizerStep):
    def train_step(self, state, data):
        import jax

        trainable, non_trainable, optimizer_values, metrics_values = state
        x, y = data

        def loss(trainable_values):
            y_pred, _ = self.stateless_call(trainable_values, non_trainable, x)
            return keras.ops.mean((y_pred - y) ** 2)

        loss_value, grads = jax.value_and_grad(loss)(trainable)
        trainable = [value - 0.01 * grad for value, grad in zip(trainable, grads)]
        state = (trainable, non_trainable, optimizer_values, metrics_values)
        return {"loss": loss_value}, state


class BackwardNoOptimizerStep(NoOptimizerStep):
    def train_step(self, data):
        import torch

        x, y = data
        self.zero_grad()
        loss = keras.ops.mean((self(x) - y) ** 2)
        grads = _backward(loss, self.trainable_weights)
        with torch.no_grad():
            for variable, grad in zip(self.trainable_weights, grads):
                variable.assign_sub(0.01 * grad)
        return {"loss": loss}


def _by_hand():
    model = _backend_model(
        TapeNoOptimizerStep, StatelessNoOptimizerStep, BackwardNoOptimizerStep, "by_hand"
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


def test_a_step_without_a_keras_optimizer_gets_advice_that_works():
    x, y = _data()
    model = _by_hand()
    with pytest.raises(RuntimeError, match="called none of the Keras optimizers") as error:
        model.fit(x, y, epochs=1, verbose=0, callbacks=[kgrad.GradientNormLogger()])
    assert "probe_data=" in str(error.value)
    # The advice works: probe mode records the gradients of the same model.
    logger = kgrad.GradientNormLogger(probe_data=(x[:BATCH], y[:BATCH]))
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[logger])
    assert len(logger.records) == 2 and np.isfinite(logger.records.grad_norms).all()


def test_an_unbuilt_model_is_judged_frozen_once_built():
    x, y = _data()
    model = _input_less_sequential()
    for layer in model.layers:
        layer.trainable = False
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="has no trainable weights"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[kgrad.GradientNormLogger()])


def test_the_monitor_names_itself_and_its_remedy_for_a_step_without_optimizer():
    x, y = _data()
    model = _by_hand()
    monitor = kgrad.GradientHealthMonitor(verbose=0)
    with pytest.raises(RuntimeError, match="^GradientHealthMonitor could not reach.*loss_fn="):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[monitor])


def test_probe_mode_with_loss_fn_on_a_model_without_call():
    real, _ = _data()
    gan = _gan()

    def d_loss(model, batch):
        return model.losses_of(batch, _latent(batch))[0]

    logger = kgrad.GradientNormLogger(probe_data=real[:BATCH], loss_fn=d_loss)
    gan.fit(real, batch_size=BATCH, epochs=1, verbose=0, callbacks=[logger])
    frame = logger.to_dataframe()
    assert set(frame.optimizer) == {"probe"} and len(logger.records) == 2
    _, grads = autodiff.variable_gradients(
        lambda: d_loss(gan, real[:BATCH]), gan.discriminator.trainable_variables
    )
    kernel = frame[(frame.layer == "discriminator/d_dense") & (frame.variable == "kernel")]
    # lr 0: both probes see the same weights, so the same gradient.
    np.testing.assert_allclose(kernel.grad_norm, [autodiff.norm(grads[0])] * 2, rtol=1e-5)
    # The generator's layers get the discriminator loss's gradient through the fakes.
    assert (frame[frame.layer.astype(str).str.startswith("generator")].grad_norm > 0).all()


def test_loss_fn_needs_probe_data():
    with pytest.raises(ValueError, match="probe_data=None"):
        kgrad.GradientNormLogger(loss_fn=lambda model, batch: 0.0)
    with pytest.raises(TypeError, match="loss_fn"):
        kgrad.GradientNormLogger(probe_data=np.zeros((2, 3)), loss_fn="mse")


def test_a_vanishing_generator_is_news_after_a_vanishing_discriminator():
    from kgrad.diagnosis.findings import Finding, FindingLog

    log = FindingLog()

    def vanishing(optimizer, layers):
        return Finding("vanishing", "critical", layers, {"optimizer": optimizer}, [])

    assert log.add(vanishing("d_optimizer", ["discriminator/d_dense"]))
    assert not log.add(vanishing("d_optimizer", ["discriminator/d_out"]))
    assert log.add(vanishing("g_optimizer", ["generator/g_dense"]))
    assert not log.add(vanishing("g_optimizer", ["generator/g_out"]))


def test_a_norm_of_1e21_is_recorded_finite_and_a_real_inf_at_its_step():
    # loss = mean(x @ w): the kernel's gradient is the batch's mean input.
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=lambda y, p: keras.ops.mean(p))
    x = np.full((3, 4), 1e21, np.float32)  # each squared entry overflows float32
    x[2] = np.inf
    logger = kgrad.GradientNormLogger()
    model.fit(x, np.zeros((3, 1), np.float32), batch_size=1, shuffle=False, verbose=0,
              callbacks=[logger])
    norms = logger.to_dataframe().grad_norm.to_numpy()
    np.testing.assert_allclose(norms[:2], 2e21, rtol=1e-5)  # ||(1e21,)*4|| = 2e21
    assert np.isposinf(norms[2])
    np.testing.assert_allclose(logger.records.global_norms[:2], 2e21, rtol=1e-5)
