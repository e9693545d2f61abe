"""GradientHealthMonitor: detectors during fit, warned once, values in logs."""

import contextlib
import copy
import warnings

import keras
import numpy as np
import pytest

import kgrad
from kgrad.callbacks.gradient_health_monitor import GradientHealthWarning

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

HEALTH_KEYS = {
    "health/decay",
    "health/first_to_last",
    "health/dead_fraction",
    "health/saturated_fraction",
    "health/findings",
}


def _data(n=256, features=16, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, features)).astype("float32"),
        rng.standard_normal((n, 1)).astype("float32"),
    )


def _compiled(model, learning_rate=0.01):
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss="mse")
    return model


def _dead_net(dead=6, width=32):
    bias = np.zeros(width, "float32")
    bias[:dead] = -10.0
    return _compiled(
        keras.Sequential(
            [
                keras.Input((16,)),
                keras.layers.Dense(
                    width, activation="relu", kernel_initializer="he_normal", name="d0"
                ),
                keras.layers.Dense(
                    width,
                    activation="relu",
                    kernel_initializer="he_normal",
                    name="d1",
                    bias_initializer=keras.initializers.Constant(bias),
                ),
                keras.layers.Dense(1, name="out"),
            ]
        )
    )


def _sigmoid_net(depth=12, width=32):
    layers = [keras.Input((16,))]
    layers += [keras.layers.Dense(width, activation="sigmoid") for _ in range(depth)]
    return _compiled(keras.Sequential(layers + [keras.layers.Dense(1)]))


class Synchronous(keras.callbacks.Callback):
    """Overrides a batch hook, so Keras dispatches batch callbacks synchronously."""

    def on_train_batch_end(self, batch, logs=None):
        pass


def test_dead_units_over_probes_in_a_row_with_exact_count():
    x, y = _data()
    monitor = kgrad.GradientHealthMonitor(
        probe_data=(x, y),
        probe_every_n_steps=2,
        dead_after_probes=3,
        verbose=0,
        max_judge_share=None,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = _dead_net(dead=6).fit(
            x, y, batch_size=32, epochs=2, callbacks=[monitor], verbose=0
        )
    dead = [f for f in monitor.findings if f.kind == "dead_units"]
    assert dead and all(f.evidence["dead_units"] == {"d1": 6} for f in dead)
    # Judged at each epoch end, as of the epoch's last probe (steps 0, 2, 4, 6 | ...).
    assert [f.step for f in dead] == [6, 14]
    assert dead[0].evidence["negative_bias"] is True
    # 256 probe examples, 128 a probe: three probes in a row saw all of them.
    assert dead[0].evidence["criterion"] == "3 probes in a row of 128 examples each"
    # Dead units get no gradient: their biases are still the -10 they started at.
    units = monitor.report().units.set_index("site")
    assert units.loc["d1", "dead_bias_mean"] == pytest.approx(-10.0)
    # The null fraction and how many null units estimated it (for the bound).
    assert units.loc["d1", "null_silent_fraction"] < 0.05
    assert units.loc["d1", "null_units"] == 256
    # No estimate, no count: both NaN together at every site.
    assert (units["null_units"].isna() == units["null_silent_fraction"].isna()).all()
    # Announced once although found at both epoch ends.
    announced = [w for w in caught if issubclass(w.category, GradientHealthWarning)]
    assert sum("dead_units" in str(w.message) for w in announced) == 1
    assert HEALTH_KEYS <= set(history.history)
    assert history.history["health/dead_fraction"][-1] == pytest.approx(6 / 64)
    assert np.isnan(history.history["health/saturated_fraction"][-1])  # no sigmoid
    assert "grad_norm/global" in history.history  # from the monitor's own logger


def test_silent_units_of_a_healthy_deep_relu_net_are_not_dead():
    # Trap 3: deep He-initialized ReLU units are silent on correlated inputs; the
    # null model explains them, so persistence alone does not make them dead.
    x, y = _data(256, 64)
    layers = [keras.Input((64,))] + [
        keras.layers.Dense(64, activation="relu", kernel_initializer="he_normal")
        for _ in range(16)
    ]
    model = _compiled(keras.Sequential(layers + [keras.layers.Dense(1)]), 1e-4)
    monitor = kgrad.GradientHealthMonitor(
        probe_data=x, probe_every_n_steps=1, verbose=0
    )
    model.fit(x, y, batch_size=64, epochs=1, callbacks=[monitor], verbose=0)
    assert monitor.unit_health.table()["dead_units"].sum() > 10  # silent for 4 probes
    assert not [f for f in monitor.findings if f.kind == "dead_units"]


def test_vanishing_during_fit_is_found_and_announced_once(capsys):
    x, y = _data()
    monitor = kgrad.GradientHealthMonitor(verbose=1, max_judge_share=None)
    history = _sigmoid_net().fit(
        x, y, batch_size=32, epochs=3, callbacks=[monitor], verbose=0
    )
    vanishing = [f for f in monitor.findings if f.kind == "vanishing"]
    assert len(vanishing) == 3  # one per epoch end, each with its step
    assert [f.step for f in vanishing] == [7, 15, 23]
    assert capsys.readouterr().out.count("vanishing") == 1
    decay = history.history["health/decay"]
    assert all(0.15 < value < 0.35 for value in decay)  # sigmoid: ~0.236 per layer
    assert history.history["health/first_to_last"][0] == pytest.approx(
        history.history["grad_norm/first_to_last"][0]
    )
    report = monitor.report()
    assert "vanishing" in report.kinds
    assert report.layers["activation"].iloc[0] == "sigmoid"


class FakeClock:
    """Stands in for the `time` module: time moves only when a test says so."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class Tick(keras.callbacks.Callback):
    """Each epoch takes `seconds` of the fake clock (listed before the monitor)."""

    def __init__(self, clock, seconds):
        super().__init__()
        self.clock, self.seconds = clock, seconds

    def on_epoch_end(self, epoch, logs=None):
        self.clock.now += self.seconds


def _slow_diagnosis(monkeypatch, monitor, seconds):
    """Each diagnosis of `monitor` takes `seconds` of a fake clock; returns it."""
    from kgrad.callbacks import gradient_health_monitor as module

    clock = FakeClock()
    monkeypatch.setattr(module, "time", clock)
    run = monitor._run_detectors

    def slow():
        clock.now += seconds
        return run()

    monkeypatch.setattr(monitor, "_run_detectors", slow)
    return clock


def test_diagnosis_keeps_to_its_share_of_training_time(monkeypatch):
    x, y = _data()
    # A 1 s diagnosis after 0.01 s epochs: over 2% of the time, so after the first
    # epoch it waits; the end of training judges what was left, with its own step.
    monitor = kgrad.GradientHealthMonitor(verbose=0, max_judge_share=0.02)
    clock = _slow_diagnosis(monkeypatch, monitor, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientHealthWarning)
        history = _sigmoid_net().fit(
            x, y, batch_size=32, epochs=3, callbacks=[Tick(clock, 0.01), monitor],
            verbose=0,
        )
    vanishing = [f for f in monitor.findings if f.kind == "vanishing"]
    assert [f.step for f in vanishing] == [7, 23]
    assert history.history["health/findings"] == [1.0, 0.0, 0.0]
    decay = history.history["health/decay"]
    assert decay[1] == decay[0] == decay[2]  # the last diagnosis's values, repeated

    # 50 s epochs: 2% of them is the 1 s diagnosis, so every epoch is judged.
    monitor = kgrad.GradientHealthMonitor(verbose=0, max_judge_share=0.02)
    clock = _slow_diagnosis(monkeypatch, monitor, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientHealthWarning)
        _sigmoid_net().fit(
            x, y, batch_size=32, epochs=3, callbacks=[Tick(clock, 50.0), monitor],
            verbose=0,
        )
    assert [f.step for f in monitor.findings if f.kind == "vanishing"] == [7, 15, 23]


def test_non_finite_gradients_are_judged_at_once_whatever_the_budget(monkeypatch):
    class PoisonSecondEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                kernel = keras.ops.convert_to_numpy(self.model.layers[0].kernel)
                kernel[0, 0] = np.nan
                self.model.layers[0].kernel.assign(kernel)

    x, y = _data()
    monitor = kgrad.GradientHealthMonitor(verbose=0, max_judge_share=0.02)
    clock = _slow_diagnosis(monkeypatch, monitor, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = _sigmoid_net().fit(
            x, y, batch_size=32, epochs=3,
            callbacks=[PoisonSecondEpoch(), Tick(clock, 0.01), monitor], verbose=0,
        )
    non_finite = [f for f in monitor.findings if f.kind == "non_finite"]
    assert non_finite[0].step == 8  # the second epoch's first step
    # judged at the second epoch's end, not left to the end of training
    assert history.history["health/findings"][1] >= 1


class SqrtOfSquare(keras.layers.Layer):
    """sqrt(x²) = |x|, except at x = 0 exactly, where backprop gives inf · 0 = NaN."""

    def call(self, inputs):
        return keras.ops.sqrt(keras.ops.square(inputs))


def test_first_non_finite_step_and_layer_during_fit():
    class SilenceAtStep(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 3:
                dense = self.model.get_layer("d1")
                kernel = keras.ops.convert_to_numpy(dense.kernel)
                bias = keras.ops.convert_to_numpy(dense.bias)
                kernel[:, 0], bias[0] = 0.0, 0.0
                dense.kernel.assign(kernel)
                dense.bias.assign(bias)

    model = _compiled(
        keras.Sequential(
            [
                keras.Input((16,)),
                keras.layers.Dense(8, activation="tanh", name="d0"),
                keras.layers.Dense(8, name="d1"),
                SqrtOfSquare(name="sqrt"),
                keras.layers.Dense(1, name="out"),
            ]
        )
    )
    x, y = _data(256)
    monitor = kgrad.GradientHealthMonitor(verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(
            x,
            y,
            batch_size=32,
            epochs=1,
            callbacks=[SilenceAtStep(), monitor],
            verbose=0,
        )
    (non_finite,) = [f for f in monitor.findings if f.kind == "non_finite"]
    assert non_finite.step == 3
    assert non_finite.evidence["origin_layer"] == "d1"
    assert non_finite.layers == ["d0", "d1"]


def test_update_ratio_is_the_sgd_step_over_the_weight_norm():
    # Plain SGD moves w by lr·g, so ‖Δw‖/‖w‖ per step is lr·‖g‖/‖w‖, with ‖g‖ and
    # ‖w‖ from the logger's records of the same steps.
    x, y = _data()
    model = _sigmoid_net(depth=3)
    logger = kgrad.GradientNormLogger()
    monitor = kgrad.GradientHealthMonitor(
        logger=logger, probe_every_n_steps=1, verbose=0
    )
    model.fit(
        x,
        y,
        batch_size=32,
        epochs=1,
        callbacks=[logger, monitor, Synchronous()],
        verbose=0,
    )
    records = logger.records
    for layer in records.layers:
        columns = [i for i, v in enumerate(records.variables) if v.layer == layer]
        grads = np.sqrt((records.grad_norms[:, columns].astype(float) ** 2).sum(axis=1))
        weights = np.sqrt(
            (records.weight_norms[:, columns].astype(float) ** 2).sum(axis=1)
        )
        expected = np.median(0.01 * grads / weights)
        assert monitor.unit_health.update_ratios[layer] == pytest.approx(
            expected, rel=0.02
        )


@pytest.mark.filterwarnings(
    "ignore::kgrad.callbacks.gradient_health_monitor.GradientHealthWarning"
)
def test_survives_deepcopy_before_and_after_fit():
    x, y = _data()
    monitor = kgrad.GradientHealthMonitor(
        probe_data=x, probe_every_n_steps=2, verbose=0
    )
    fresh = copy.deepcopy(monitor)
    _dead_net().fit(x, y, batch_size=32, epochs=1, callbacks=[monitor], verbose=0)
    trained = copy.deepcopy(monitor)
    assert trained.findings and trained.report().findings
    for clone in (fresh, trained):
        keras.backend.clear_session()
        _dead_net().fit(x, y, batch_size=32, epochs=1, callbacks=[clone], verbose=0)
        assert any(f.kind == "dead_units" for f in clone.findings)


def test_subclassed_model_warns_which_statistics_are_unavailable():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(8, activation="relu")
            self.out = keras.layers.Dense(1)

        def call(self, inputs):
            return self.out(self.hidden(inputs))

    x, y = _data(64)
    model = _compiled(Net())
    model(x[:2])
    monitor = kgrad.GradientHealthMonitor(probe_data=x, verbose=0)
    with pytest.warns(
        GradientHealthWarning, match="dead-unit and saturation statistics"
    ):
        model.fit(x, y, batch_size=32, epochs=1, callbacks=[monitor], verbose=0)
    report = monitor.report()
    assert report.layers["grad_norm"].notna().all()  # gradients still recorded
    assert any("subclassed" in note for note in report.notes)


def test_external_logger_must_come_first():
    x, y = _data(64)
    logger = kgrad.GradientNormLogger()
    monitor = kgrad.GradientHealthMonitor(logger=logger, verbose=0)
    with pytest.raises(ValueError, match=r"placed before the monitor"):
        _dead_net().fit(x, y, epochs=1, callbacks=[monitor, logger], verbose=0)


def test_probe_data_that_does_not_fit_fails_before_training():
    x, y = _data(64)
    monitor = kgrad.GradientHealthMonitor(probe_data=np.zeros((8, 3), "float32"))
    with pytest.raises(ValueError, match="`probe_data` does not fit model"):
        _dead_net().fit(x, y, epochs=1, callbacks=[monitor], verbose=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"probe_every_n_steps": 0},
            "`probe_every_n_steps` must be a positive integer. "
            "Received: probe_every_n_steps=0",
        ),
        ({"dead_after_probes": 1.5}, "`dead_after_probes` must be a positive integer"),
        (
            {"probe_batch_size": 0},
            "`probe_batch_size` must be a positive integer. Received: "
            "probe_batch_size=0",
        ),
        ({"spike_factor": 1.0}, "`spike_factor` must be a number greater than 1"),
        (
            {"max_judge_share": 0},
            r"`max_judge_share` must be a number in \(0, 1\] .* or `None` \(judge "
            r"every epoch\). Received: max_judge_share=0",
        ),
        ({"logger": "yes"}, "`logger` must be a `kgrad.GradientNormLogger`"),
        (
            {"logger": kgrad.GradientNormLogger(), "every_n_steps": 5},
            "set them on that logger",
        ),
        ({"probe_data": np.zeros((0, 4))}, "`probe_data` is empty"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kgrad.GradientHealthMonitor(**kwargs)


def test_report_before_training_raises():
    with pytest.raises(RuntimeError, match="nothing to report yet"):
        kgrad.GradientHealthMonitor().report()


@pytest.mark.parametrize(
    "replicas",
    [
        1,
        pytest.param(
            2,
            marks=pytest.mark.backends(
                "tensorflow", reason="a tf.distribute.MirroredStrategy"
            ),
        ),
    ],
)
def test_probe_statistics_match_numpy(replicas, strategy_of):
    # The probe computes everything on the device, in one compiled call (raw reads of
    # plain variables, the public path for mirrored ones): it must give the
    # host-computed unit activity and norms, probe after probe.
    from kgrad.diagnosis.unit_probe import UnitProbe

    x, _ = _data(64)
    scope = strategy_of(replicas).scope() if replicas > 1 else contextlib.nullcontext()
    with scope:
        model = _dead_net(dead=3, width=8)
    probe = UnitProbe(model, kgrad.track_variables(model), x)
    rng = np.random.default_rng(1)
    previous = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    for _ in range(3):
        for variable in model.trainable_variables:
            step = rng.standard_normal(variable.shape).astype("float32") * 0.01
            variable.assign(keras.ops.convert_to_numpy(variable) + step)
        active, saturated, deltas, weights = probe.decode(probe())
        current = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
        expected_deltas = [
            np.sqrt(sum(np.sum((current[i] - previous[i]) ** 2) for i in pair))
            for pair in ((0, 1), (2, 3), (4, 5))
        ]
        expected_weights = [
            np.sqrt(sum(np.sum(current[i] ** 2) for i in pair))
            for pair in ((0, 1), (2, 3), (4, 5))
        ]
        np.testing.assert_allclose(deltas, expected_deltas, rtol=1e-5)
        np.testing.assert_allclose(weights, expected_weights, rtol=1e-5)
        previous = current
        hidden = np.maximum(x @ current[0] + current[1], 0)
        hidden2 = np.maximum(hidden @ current[2] + current[3], 0)
        np.testing.assert_array_equal(active[0], (hidden > 0).any(axis=0))
        np.testing.assert_array_equal(active[1], (hidden2 > 0).any(axis=0))
        assert saturated == [None, None]
    assert not active[1][:3].any()  # the units with bias -10 stay silent


def test_probes_take_the_probe_set_a_batch_at_a_time_in_turn():
    # Unit j fires on example j only, so each probe's activity names the examples it
    # saw. Ten examples, four a probe: the last batch wraps around to the first ones.
    from kgrad.diagnosis.unit_probe import UnitProbe

    eye = np.eye(10, dtype="float32")
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(10, activation="relu", name="d0"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.get_layer("d0").set_weights([eye, np.full(10, -0.5, "float32")])
    probe = UnitProbe(model, kgrad.track_variables(model), eye, batch_size=4, window=2)
    assert probe.batch_count == 3
    seen = [np.flatnonzero(probe.decode(probe())[0][0]).tolist() for _ in range(4)]
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 8, 9], [0, 1, 2, 3]]
    # The null model of dead units reads the examples of the last two probes.
    np.testing.assert_array_equal(
        probe.null_inputs(0), np.concatenate([eye[[8, 9, 0, 1]], eye[:4]])
    )


@pytest.mark.backends("tensorflow", reason="Grappler's rewrites are TensorFlow's")
def test_probe_calls_skip_graph_rewrites_and_restore_the_options():
    import tensorflow as tf
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context

    from kgrad.backend.tensorflow import plain_function_calls

    def rewrites_disabled():
        serialized = context.context().function_call_options.config_proto_serialized
        config = config_pb2.ConfigProto.FromString(serialized)
        return config.graph_options.rewrite_options.disable_meta_optimizer

    before = context.context().function_call_options
    assert not rewrites_disabled()
    with pytest.raises(RuntimeError, match="inside"):
        with plain_function_calls():
            assert rewrites_disabled()
            assert tf.function(lambda v: 2.0 * v)(tf.constant(3.0)).numpy() == 6.0
            raise RuntimeError("inside")
    assert context.context().function_call_options is before
    assert not rewrites_disabled()


def test_own_logger_leaves_weight_norms_to_the_probes():
    # The monitor's own logger skips the per-step weight norms (half its cost); the
    # report's per-layer weight norms are the last probe's, exact.
    x, y = _data(64)
    model = _dead_net(dead=0, width=8)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    monitor = kgrad.GradientHealthMonitor(probe_data=x, probe_every_n_steps=1, verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    frame = monitor.records.to_dataframe()
    assert frame["weight_norm"].isna().all() and frame["grad_norm"].notna().all()
    layers = monitor.report().layers.set_index("layer")
    for layer in model.layers:
        expected = np.sqrt(
            sum(np.sum(keras.ops.convert_to_numpy(w) ** 2) for w in layer.weights)
        )
        # The last probe ran after the last step.
        assert layers.loc[layer.name, "weight_norm"] == pytest.approx(expected, rel=1e-5)
        assert layers.loc[layer.name, "grad_to_weight"] == pytest.approx(
            layers.loc[layer.name, "grad_norm"] / expected
        )


@pytest.mark.backends(
    "tensorflow",
    "jax",
    reason="Keras's torch trainer runs one step per execution "
    "(steps_per_execution must be 1 there)",
)
def test_probes_with_steps_per_execution_follow_the_steps_that_ran():
    # Batch hooks come every 4 steps: a probe runs before each execution (after the
    # previous one's last step) and at the epoch end, labelled with that step.
    x, y = _data()
    model = _dead_net(dead=6)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", steps_per_execution=4)
    monitor = kgrad.GradientHealthMonitor(
        probe_data=x, probe_every_n_steps=2, dead_after_probes=2, verbose=0
    )
    model.fit(x, y, batch_size=32, epochs=1, callbacks=[monitor], verbose=0)
    assert monitor.unit_health.probes == 2  # after steps 3 and 7 of 0..7
    dead = [f for f in monitor.findings if f.kind == "dead_units"]
    assert [f.step for f in dead] == [7]
    assert dead[0].evidence["dead_units"] == {"d1": 6}


@pytest.mark.parametrize("jit_compile", [True, False])  # XLA, jax.jit, torch.compile
def test_a_probe_in_the_middle_of_an_epoch_reads_the_weights_of_that_step(jit_compile):
    # One probe, after step 0 of four (the next due one would be after step 999): its
    # weight norms and movement are those of the weights after exactly one SGD step,
    # not of the epoch's start or end (on JAX the variables hold neither mid-epoch:
    # the probe reads the state the last step returned).
    x, y = _data(64)
    model = _dead_net(dead=0, width=8)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=jit_compile)
    initial = model.get_weights()
    monitor = kgrad.GradientHealthMonitor(
        probe_data=x, probe_every_n_steps=1000, verbose=0, max_judge_share=None
    )
    model.fit(
        x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor]
    )
    assert monitor.unit_health.probes == 1
    once = _dead_net(dead=0, width=8)
    once.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    once.set_weights(initial)
    once.fit(x[:16], y[:16], batch_size=16, epochs=1, shuffle=False, verbose=0)
    after, final = once.get_weights(), model.get_weights()
    for layer, pair in zip(["d0", "d1", "out"], ((0, 1), (2, 3), (4, 5))):
        norm = np.sqrt(sum(np.sum(after[i].astype(float) ** 2) for i in pair))
        moved = np.sqrt(
            sum(np.sum((after[i] - initial[i]).astype(float) ** 2) for i in pair)
        )
        moved_by_fit = np.sqrt(
            sum(np.sum((final[i] - initial[i]).astype(float) ** 2) for i in pair)
        )
        assert moved_by_fit > 1.2 * moved  # the epoch's end is told apart
        assert monitor.unit_health.weight_norms[layer] == pytest.approx(norm, rel=1e-5)
        assert monitor.unit_health.update_ratios[layer] == pytest.approx(
            moved / norm, rel=1e-4
        )


def _refit(model, x, y, monitor):
    model.fit(x, y, batch_size=16, verbose=0, callbacks=[monitor])
    return monitor.report().units.set_index("site")["dead_units"]


def _layer_norm(weights, pair):
    return np.sqrt(sum(np.sum(weights[i].astype(float) ** 2) for i in pair))


def test_a_second_fit_probes_the_new_weights_with_the_same_probe():
    # The probe is kept for the model; `set_weights` between fits is seen by the
    # next fit's first probe (weight norms, movement from the new weights, units the
    # new biases silence). Another model gets a probe of its own.
    x, y = _data(64)
    model = _dead_net(dead=0, width=8)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")  # weights stay
    monitor = kgrad.GradientHealthMonitor(
        probe_data=x, dead_after_probes=1, verbose=0, max_judge_share=None
    )
    assert _refit(model, x, y, monitor)["d1"] == 0
    probe = monitor._kept_probe
    weights = [w * 2.0 for w in model.get_weights()]
    weights[3][:3] = -100.0  # three units of d1 never fire now
    model.set_weights(weights)
    assert _refit(model, x, y, monitor)["d1"] == 3
    assert monitor._kept_probe is probe
    for layer, pair in zip(["d0", "d1", "out"], ((0, 1), (2, 3), (4, 5))):
        norm = _layer_norm(weights, pair)
        assert monitor.unit_health.weight_norms[layer] == pytest.approx(norm, rel=1e-5)
        assert monitor.unit_health.update_ratios[layer] == 0.0  # since the new ones
    monitor.probe_data = np.zeros((8, 3), "float32")  # checked again
    with pytest.raises(ValueError, match="`probe_data` does not fit model"):
        _refit(model, x, y, monitor)
    monitor.probe_data = x
    other = _dead_net(dead=0, width=8)
    other.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    _refit(other, x, y, monitor)
    assert monitor._kept_probe is not probe
    assert monitor.unit_health.weight_norms["d0"] == pytest.approx(
        _layer_norm(other.get_weights(), (0, 1)), rel=1e-5
    )


@pytest.mark.backends(
    "tensorflow",
    "jax",
    reason="the probe is compiled there (tf.function, jax.jit); torch runs it eagerly",
)
def test_a_second_fit_traces_the_probe_again_only_for_new_shapes_or_models(
    monkeypatch,
):
    from kgrad.diagnosis.unit_probe import UnitProbe

    traces = []
    forward = UnitProbe._statistics

    def counted(self, x):  # runs only while the backend traces the probe
        traces.append(self)
        return forward(self, x)

    monkeypatch.setattr(UnitProbe, "_statistics", counted)
    x, y = _data(64)
    model = _dead_net(dead=0, width=8)
    monitor = kgrad.GradientHealthMonitor(probe_data=x, verbose=0)
    _refit(model, x, y, monitor)
    model.set_weights([w * 2.0 for w in model.get_weights()])
    _refit(model, x, y, monitor)
    assert len(traces) == 1
    monitor.probe_data = x[:48]  # another batch shape
    _refit(model, x, y, monitor)
    assert len(traces) == 2 and traces[1] is traces[0]
    _refit(_dead_net(dead=0, width=8), x, y, monitor)
    assert len(traces) == 3 and traces[2] is not traces[0]


def test_null_units_are_those_numpy_finds_on_the_probe_inputs():
    # The null model runs with keras.ops where the inputs are, several layers in one
    # batched product; the units it finds firing are those of the host NumPy product
    # of the same seeded kernel, on ReLU inputs with exact zeros (whole examples,
    # whole features), on one tiny positive product, and on the kernel inputs the
    # monitor's probes kept.
    from kgrad.diagnosis import null_units

    rng = np.random.default_rng(3)
    relu = np.maximum(rng.standard_normal((96, 32)).astype("float32"), 0)
    relu[:10] = 0.0
    relu[:, :5] = 0.0
    tiny = np.zeros((96, 32), "float32")
    tiny[0, 7] = 1e-30
    x, y = _data()
    monitor = kgrad.GradientHealthMonitor(
        probe_data=x, probe_every_n_steps=2, verbose=0, max_judge_share=None
    )
    _dead_net(dead=6).fit(x, y, batch_size=32, callbacks=[monitor], verbose=0)
    probe = monitor._kept_probe
    kept = [probe.null_inputs(index) for index in probe._null_sites]
    assert len(kept) == 2  # d0 and d1
    inputs = [relu, tiny, relu[:1], *kept, relu[::-1]]
    for units in (256, 512):
        layer = null_units.null_units_layer(keras.layers.Dense(8), seed=0, units=units)
        expected = []
        for values in inputs:
            values = keras.ops.convert_to_numpy(values)
            kernel = null_units._gaussian_kernel(0, values.shape[-1], units)
            expected.append(np.any(values @ kernel > 0, axis=0))
        alone = [null_units.null_active_units(layer, values) for values in inputs]
        together = null_units.null_active_units_of_layers([layer] * 6, inputs)
        for found in (alone, together):
            for row, wanted in zip(found, expected):
                assert row.dtype == bool and row.shape == (units,)
                np.testing.assert_array_equal(row, wanted)
        tiny_row = null_units._gaussian_kernel(0, 32, units)[7]
        assert expected[1].sum() == (tiny_row > 0).sum()  # the tiny one counts
    # The monitor's null fraction is the silent share of those units at d1.
    silent = ~null_units.null_active_units(
        null_units.GaussianUnits(0, 256), probe.null_inputs(probe._null_sites[1])
    )
    units = monitor.report().units.set_index("site")
    assert units.loc["d1", "null_silent_fraction"] == pytest.approx(np.mean(silent))
