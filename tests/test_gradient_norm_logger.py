"""GradientNormLogger: captured norms equal hand-computed GradientTape norms."""

import contextlib
import copy
import glob
import os

import keras
import numpy as np
import pandas as pd
import pytest

import autodiff
import kgrad

# Unmarked tests run on both; those needing TensorFlow's own machinery say so.
pytestmark = pytest.mark.backends("tensorflow", "jax")

BATCH = 16


def _data(n=32, features=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    return x, y


def _mlp(features=6, name="mlp"):
    return keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(5, activation="tanh", name="dense_a"),
            keras.layers.Dense(4, activation="relu", name="dense_b"),
            keras.layers.Dense(1, name="dense_out"),
        ],
        name=name,
    )


def _compile(model, **kwargs):
    # lr=0 keeps the weights fixed, so every step's gradient can be recomputed by hand.
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", **kwargs)
    return model


def _hand_norms(model, x, y, sample_weight=None):
    """{(layer, variable): [norm per batch]} by the backend's autodiff at the current
    weights (`tf.GradientTape`, `jax.grad`)."""
    out = {}
    n = len(keras.tree.flatten(x)[0])
    for start in range(0, n, BATCH):
        xb = keras.tree.map_structure(lambda a: a[start : start + BATCH], x)
        yb = y[start : start + BATCH]
        sw = None if sample_weight is None else sample_weight[start : start + BATCH]
        _, grads = autodiff.variable_gradients(
            lambda: model.compute_loss(
                x=xb, y=yb, y_pred=model(xb, training=True), sample_weight=sw
            ),
            model.trainable_variables,
        )
        for item in kgrad.track_variables(model):
            out.setdefault((item.layer, item.name), []).append(
                autodiff.norm(grads[item.index])
            )
    return out


def _captured(logger):
    frame = logger.to_dataframe()
    return {
        key: group.sort_values("step").grad_norm.tolist()
        for key, group in frame.groupby(["layer", "variable"], observed=True)
    }


def _assert_matches_hand(model, x, y, fit_kwargs=None, sample_weight=None, rtol=1e-5):
    expected = _hand_norms(model, x, y, sample_weight)
    logger = kgrad.GradientNormLogger()
    model.fit(
        x,
        y,
        sample_weight=sample_weight,
        batch_size=BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[logger],
        **(fit_kwargs or {}),
    )
    captured = _captured(logger)
    assert set(captured) == set(expected)
    for key, norms in expected.items():
        np.testing.assert_allclose(captured[key], norms, rtol=rtol, err_msg=str(key))
    return logger


@pytest.mark.parametrize("jit_compile", [False, True])
def test_sequential_matches_gradient_tape(jit_compile):
    x, y = _data()
    model = _compile(_mlp(), jit_compile=jit_compile)
    logger = _assert_matches_hand(model, x, y)
    frame = logger.to_dataframe()
    assert list(frame.columns)[:8] == [
        "run", "step", "epoch", "layer", "depth", "variable", "kind", "grad_norm"
    ]
    assert frame.step.unique().tolist() == [0, 1]
    by_layer = frame.drop_duplicates("layer").set_index("layer").depth.to_dict()
    assert by_layer == {"dense_a": 0, "dense_b": 1, "dense_out": 2}
    assert set(frame.kind) == {"kernel", "bias"}
    # the weight norm is the norm of the weights at the step
    kernel = model.get_layer("dense_a").kernel.numpy()
    row = frame[(frame.layer == "dense_a") & (frame.variable == "kernel")].iloc[0]
    assert row.weight_norm == pytest.approx(np.linalg.norm(kernel), rel=1e-6)
    # the global norm combines every variable of the step
    step0 = frame[frame.step == 0]
    assert step0.global_norm.iloc[0] == pytest.approx(
        np.sqrt((step0.grad_norm**2).sum()), rel=1e-5
    )


def test_functional_multi_input_and_steps_per_execution():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(48, 3)).astype("float32")
    b = rng.normal(size=(48, 4)).astype("float32")
    y = rng.normal(size=(48, 2)).astype("float32")
    in_a, in_b = keras.Input((3,), name="a"), keras.Input((4,), name="b")
    merged = keras.layers.Concatenate()(
        [keras.layers.Dense(5, name="branch_a")(in_a), keras.layers.Dense(5, name="branch_b")(in_b)]
    )
    out = keras.layers.Dense(2, name="head")(keras.layers.Activation("tanh")(merged))
    model = _compile(keras.Model([in_a, in_b], out), steps_per_execution=2)
    logger = _assert_matches_hand(model, [a, b], y)
    assert logger.to_dataframe().step.unique().tolist() == [0, 1, 2]
    depth = logger.to_dataframe().groupby("layer", observed=True).depth.first()
    assert depth["head"] > max(depth["branch_a"], depth["branch_b"])


class SubclassedNet(keras.Model):
    def __init__(self):
        super().__init__()
        self.first = keras.layers.Dense(5, activation="tanh")
        self.second = keras.layers.Dense(1)

    def call(self, inputs):
        return self.second(self.first(inputs))


def test_subclassed_and_nested_models():
    x, y = _data()
    sub = SubclassedNet()
    sub(x[:1])
    _assert_matches_hand(_compile(sub), x, y)

    inner = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(3, activation="tanh", name="inner_dense")],
        name="inner",
    )
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(1, name="top")(
        inner(keras.layers.Dense(5, name="stem")(inputs))
    )
    nested = _compile(keras.Model(inputs, outputs))
    logger = _assert_matches_hand(nested, x, y)
    layers = logger.to_dataframe().drop_duplicates("layer")
    assert layers.layer.tolist() == ["stem", "inner/inner_dense", "top"]


def test_tf_data_and_sample_weights():
    x, y = _data()
    weights = np.linspace(0.1, 2.0, len(x)).astype("float32")
    model = _compile(_mlp())
    _assert_matches_hand(model, x, y, sample_weight=weights)

    expected = _hand_norms(model, x, y)
    import tensorflow as tf  # tf.data feeds every backend

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    logger = kgrad.GradientNormLogger()
    model.fit(dataset, epochs=1, verbose=0, callbacks=[logger])
    for key, norms in expected.items():
        np.testing.assert_allclose(_captured(logger)[key], norms, rtol=1e-5)


def test_embedding_sparse_gradients():
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 7, size=(32, 5))  # repeated ids in a batch
    y = rng.normal(size=(32, 1)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(7, 3, name="embed"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1, name="out"),
        ]
    )
    logger = _assert_matches_hand(_compile(model), tokens, y)
    kinds = logger.to_dataframe().groupby("layer", observed=True).kind.first()
    assert kinds["embed"] == "kernel"


def test_frozen_layers_are_not_reported():
    x, y = _data()
    model = _mlp()
    model.get_layer("dense_b").trainable = False
    logger = _assert_matches_hand(_compile(model), x, y)
    assert "dense_b" not in set(logger.to_dataframe().layer)


def test_layer_patterns_select_layers():
    x, y = _data()
    model = _compile(_mlp())
    expected = _hand_norms(model, x, y)
    logger = kgrad.GradientNormLogger(layers=["dense_a", "dense_o*"])
    model.fit(
        x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[logger]
    )
    frame = logger.to_dataframe()
    assert sorted(set(frame.layer)) == ["dense_a", "dense_out"]
    assert frame.depth.max() == 2  # depth stays the position in the whole model
    # the global norm still covers every variable of the step, dense_b's included
    hand_global = np.sqrt(np.sum([np.square(v) for v in expected.values()], axis=0))
    logged_global = frame.drop_duplicates("step").sort_values("step").global_norm
    np.testing.assert_allclose(logged_global, hand_global, rtol=1e-5)
    squares = frame.groupby("step").grad_norm.apply(lambda g: np.sum(g**2))
    tracked_only = np.sqrt(squares)
    assert np.all(logged_global.to_numpy() > tracked_only.to_numpy() * (1 + 1e-6))


@pytest.mark.backends("tensorflow", "jax", "torch")
def test_mixed_float16_norms_are_unscaled():
    x, y = _data()
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = _mlp()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    expected = _hand_norms(model, x, y)
    logger = kgrad.GradientNormLogger()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[logger])
    captured = _captured(logger)
    for key, norms in expected.items():
        # float16 compute: close to the float32 norms, and nowhere near x 32768
        np.testing.assert_allclose(captured[key], norms, rtol=2e-2, err_msg=str(key))


@pytest.mark.backends("tensorflow", reason="a tf.distribute.MirroredStrategy")
def test_mirrored_strategy_reports_the_aggregated_gradient(strategy_of):
    x, y = _data(n=32)
    single = _compile(_mlp())
    weights = single.get_weights()
    expected = _hand_norms(single, x, y)

    with strategy_of(2).scope():
        model = _compile(_mlp())
        model.set_weights(weights)
    logger = kgrad.GradientNormLogger()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[logger])
    captured = _captured(logger)
    for key, norms in expected.items():
        np.testing.assert_allclose(captured[key], norms, rtol=1e-4, err_msg=str(key))


def test_non_finite_gradients_are_recorded_not_raised():
    x, y = _data()
    y[3] = np.nan  # a NaN loss in the first batch only
    model = _compile(_mlp())
    logger = kgrad.GradientNormLogger()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[logger])
    frame = logger.to_dataframe()
    assert frame[frame.step == 0].grad_norm.isna().all()
    assert frame[frame.step == 0].global_norm.isna().all()
    assert np.isfinite(frame[frame.step == 0].weight_norm).all()
    assert len(frame) == 2 * 6  # training went on


def test_every_n_steps_and_epoch_logs():
    x, y = _data(n=64)
    model = _compile(_mlp())
    logger = kgrad.GradientNormLogger(every_n_steps=3)
    history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[logger])
    frame = logger.to_dataframe()
    assert frame.step.unique().tolist() == [0, 3, 6]
    assert frame.groupby("step").epoch.first().tolist() == [0, 0, 1]
    epoch0 = frame[frame.epoch == 0].drop_duplicates("step").global_norm.mean()
    assert history.history["grad_norm/global"][0] == pytest.approx(epoch0, rel=1e-6)
    ratios = logger.records.first_to_last()
    assert history.history["grad_norm/first_to_last"][1] == pytest.approx(ratios[-1])


class _WeightsBeforeEachStep(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.norms = []

    def on_train_batch_begin(self, batch, logs=None):
        self.norms.append(
            {
                (item.layer, item.name): float(np.linalg.norm(item.variable.numpy()))
                for item in kgrad.track_variables(self.model)
            }
        )


@pytest.mark.parametrize(
    "replicas, jit_compile",
    [
        (1, False),
        pytest.param(
            2,
            False,
            marks=pytest.mark.backends("tensorflow", reason="a MirroredStrategy"),
        ),
        (1, True),
    ],
)
def test_every_n_steps_records_the_logged_steps_exactly(
    replicas, jit_compile, strategy_of
):
    # Steps that are not logged take no branch (one replica) or write the scratch row
    # (two replicas); the logged ones hold the gradients and the weights of the step.
    x, y = _data(n=96)
    single = _compile(_mlp())
    expected = _hand_norms(single, x, y)  # lr=0: the same weights at every step
    scope = strategy_of(replicas).scope() if replicas > 1 else contextlib.nullcontext()
    with scope:
        model = _compile(_mlp(), jit_compile=jit_compile)
        model.set_weights(single.get_weights())
    logger = kgrad.GradientNormLogger(every_n_steps=2)
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[logger])
    frame = logger.to_dataframe()
    assert frame.step.unique().tolist() == [0, 2, 4, 6, 8, 10]
    for (layer, name), group in frame.groupby(["layer", "variable"], observed=True):
        group = group.sort_values("step")
        hand = [expected[(layer, name)][step % 6] for step in group.step]
        np.testing.assert_allclose(group.grad_norm, hand, rtol=1e-4)
        weight = single.get_layer(layer).weights[0 if name == "kernel" else 1]
        np.testing.assert_allclose(group.weight_norm, np.linalg.norm(weight), rtol=1e-5)


def test_every_n_steps_weight_norms_are_those_before_the_update():
    x, y = _data(n=64)
    model = _mlp()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = _WeightsBeforeEachStep()
    logger = kgrad.GradientNormLogger(every_n_steps=3)
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[before, logger])
    frame = logger.to_dataframe()
    assert frame.step.unique().tolist() == [0, 3, 6]
    for row in frame.itertuples():
        expected = before.norms[row.step][(row.layer, row.variable)]
        assert row.weight_norm == pytest.approx(expected, rel=1e-5)


def test_weight_norms_can_be_left_out():
    model = _compile(_mlp())
    x, y = _data()
    expected = _hand_norms(model, x, y)
    logger = kgrad.GradientNormLogger(weight_norms=False)
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[logger])
    for key, norms in _captured(logger).items():
        np.testing.assert_allclose(norms, expected[key], rtol=1e-5, err_msg=str(key))
    assert logger.to_dataframe()["weight_norm"].isna().all()


def test_first_to_last_uses_bias_norms():
    records = kgrad.GradientRecords(
        [
            kgrad.records.VariableInfo("a", 0, "kernel", "kernel"),
            kgrad.records.VariableInfo("a", 0, "bias", "bias"),
            kgrad.records.VariableInfo("b", 1, "kernel", "kernel"),
            kgrad.records.VariableInfo("b", 1, "bias", "bias"),
        ]
    )
    records.append(
        step=[0], epoch=[0], grad_norm=[[3.0, 0.01, 4.0, 1.0]],
        weight_norm=[[1, 1, 1, 1]], global_norm=[5.0],
    )
    assert records.first_to_last()[0] == pytest.approx(0.01)
    _, total = records.layer_norms("total")
    np.testing.assert_allclose(total[0], [np.hypot(3, 0.01), np.hypot(4, 1)])


def test_several_fits_and_deepcopy():
    x, y = _data()
    model = _compile(_mlp())
    logger = kgrad.GradientNormLogger()
    fresh_copy = copy.deepcopy(logger)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[logger])
    first_run = logger.run_id
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[logger])
    assert logger.run_id != first_run
    assert logger.to_dataframe().step.unique().tolist() == [2, 3]  # steps continue
    used_copy = copy.deepcopy(logger)
    for clone in (fresh_copy, used_copy):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[clone])
        assert len(clone.to_dataframe()) == 2 * 6
    # without the logger, fit runs the optimizer's own apply again
    assert "apply" not in vars(model.optimizer)


@pytest.mark.backends("tensorflow", "jax", "torch")
def test_probe_mode_matches_gradient_tape_on_probe_batch():
    x, y = _data()
    model = _compile(_mlp())
    probe_x, probe_y = x[:8], y[:8]
    _, grads = autodiff.variable_gradients(
        lambda: model.compute_loss(x=probe_x, y=probe_y, y_pred=model(probe_x)),
        model.trainable_variables,
    )
    logger = kgrad.GradientNormLogger(probe_data=(probe_x, probe_y), every_n_steps=2)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[logger])
    frame = logger.to_dataframe()
    assert frame.step.unique().tolist() == [0, 2, 4, 6]
    kernel = frame[(frame.layer == "dense_a") & (frame.variable == "kernel")]
    np.testing.assert_allclose(kernel.grad_norm, np.linalg.norm(grads[0]), rtol=1e-5)


@pytest.mark.backends("tensorflow", "jax", "torch")
def test_probe_mode_follows_the_weights_step_by_step():
    # lr > 0: each probe, after step s, holds the gradient of the probe loss and the
    # weight norms at the weights after step s (on JAX: the state that step returned,
    # not the variables, which hold the epoch's start until it ends).
    x, y = _data()
    model = _mlp()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    twin = _mlp()
    twin.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    twin.set_weights(model.get_weights())
    probe_x, probe_y = x[:8], y[:8]
    logger = kgrad.GradientNormLogger(probe_data=(probe_x, probe_y))
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[logger])
    gradient_norms, weight_norms = [], []
    for start in range(0, len(x), 4):
        twin.train_on_batch(x[start : start + 4], y[start : start + 4])
        _, grads = autodiff.variable_gradients(
            lambda: twin.compute_loss(
                x=probe_x, y=probe_y, y_pred=twin(probe_x, training=False)
            ),
            twin.trainable_variables,
        )
        gradient_norms.append(autodiff.norm(grads[0]))
        weight_norms.append(autodiff.norm(twin.trainable_variables[0]))
    frame = logger.to_dataframe()
    kernel = frame[(frame.layer == "dense_a") & (frame.variable == "kernel")]
    kernel = kernel.sort_values("step")
    assert kernel.step.tolist() == list(range(8))
    assert gradient_norms[-1] != pytest.approx(gradient_norms[0], rel=1e-3)
    np.testing.assert_allclose(kernel.grad_norm, gradient_norms, rtol=1e-4)
    np.testing.assert_allclose(kernel.weight_norm, weight_norms, rtol=1e-5)
    assert (frame.optimizer == "probe").all()


class CustomLoopNet(keras.Model):
    """A train_step that updates weights without the model's optimizer."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)

    def call(self, inputs):
        return self.dense(inputs)

    def train_step(self, data):
        import tensorflow as tf

        x, y = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self(x) - y))
        for var, grad in zip(self.trainable_variables, tape.gradient(loss, self.trainable_variables)):
            var.assign_sub(0.01 * grad)
        return {"loss": loss}


@pytest.mark.backends("tensorflow", reason="the custom train_step uses tf.GradientTape")
def test_unhookable_train_step_points_to_probe_mode():
    x, y = _data()
    model = CustomLoopNet()
    model(x[:1])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(RuntimeError, match="probe_data"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
                  callbacks=[kgrad.GradientNormLogger()])
    logger = kgrad.GradientNormLogger(probe_data=(x, y))
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[logger])
    assert len(logger.to_dataframe()) == 2 * 2


def test_csv_appends_across_runs_and_survives_a_crash(tmp_path):
    x, y = _data()
    path = tmp_path / "logs" / "grads.csv"
    model = _compile(_mlp())
    logger = kgrad.GradientNormLogger(csv_path=path)
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[logger])

    class Crash(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0, callbacks=[logger, Crash()])
    table = pd.read_csv(path)
    assert table.run.nunique() == 2
    first, second = table.run.unique()
    assert len(table[table.run == first]) == 2 * 2 * 6
    assert len(table[table.run == second]) == 2 * 6  # epoch 0 flushed before the crash
    pd.testing.assert_frame_equal(
        table[table.run == first].reset_index(drop=True)[["step", "grad_norm"]],
        kgrad.GradientRecords.from_dataframe(table[table.run == first])
        .to_dataframe()[["step", "grad_norm"]],
        check_dtype=False,
        rtol=1e-6,
    )


@pytest.mark.backends("tensorflow", "jax", "torch")
def test_tensorboard_scalars_and_histograms(tmp_path):
    x, y = _data()
    model = _compile(_mlp())
    logger = kgrad.GradientNormLogger(
        tensorboard_dir=tmp_path / "tb", histogram_every_n_steps=2
    )
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[logger])
    import tensorflow as tf  # to read the event files

    tags = set()
    for path in glob.glob(os.path.join(tmp_path, "tb", "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    assert {"grad_norm/global", "grad_norm/first_to_last", "grad_norm/dense_a/kernel"} <= tags
    assert "grad/dense_a/kernel" in tags


@pytest.mark.backends("tensorflow", "jax", "torch")
@pytest.mark.parametrize("jit_compile", [  # XLA, jax.jit, torch.compile
    pytest.param(True, marks=pytest.mark.slow_on("torch", reason="torch.compile traces Keras's step for 40-100 s on 2 CPU cores; one compiled case per feature runs by default")), False
])
def test_histograms_hold_the_gradient_of_their_step(jit_compile, tmp_path, monkeypatch):
    from kgrad.records.tensorboard_sink import TensorBoardSink

    written = []
    monkeypatch.setattr(
        TensorBoardSink, "write_histograms", lambda self, step, values: written.append(
            (step, dict(values))
        ),
    )
    x, y = _data()  # 2 steps per epoch; lr=0: every step at the same weights
    model = _compile(_mlp(), jit_compile=jit_compile)
    logger = kgrad.GradientNormLogger(
        tensorboard_dir=tmp_path / "tb", histogram_every_n_steps=3
    )
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
              callbacks=[logger])
    # The copy kept by each epoch's end: step 0 (batch 0), then step 3 (batch 1).
    assert [step for step, _ in written] == [0, 3]
    for (step, values), start in zip(written, (0, BATCH)):
        xb, yb = x[start : start + BATCH], y[start : start + BATCH]
        _, grads = autodiff.variable_gradients(
            lambda: model.compute_loss(x=xb, y=yb, y_pred=model(xb, training=True)),
            model.trainable_variables,
        )
        for item in kgrad.track_variables(model):
            np.testing.assert_allclose(
                values[f"{item.layer}/{item.name}"], grads[item.index],
                rtol=1e-5, atol=1e-7, err_msg=f"step {step}",
            )


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_every_n_steps_must_be_positive_int(value):
    with pytest.raises(ValueError, match=r"every_n_steps.*Received: every_n_steps="):
        kgrad.GradientNormLogger(every_n_steps=value)


def test_bad_input_is_rejected_before_training(tmp_path):
    x, y = _data()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="csv_path"):
        kgrad.GradientNormLogger(csv_path=blocker / "sub" / "log.csv")
    with pytest.raises(ValueError, match="tensorboard_dir"):
        kgrad.GradientNormLogger(tensorboard_dir=blocker / "tb")
    with pytest.raises(ValueError, match="probe_data"):
        kgrad.GradientNormLogger(probe_data=x)

    model = _compile(_mlp())
    with pytest.raises(ValueError, match=r"No layer .*dense_9\*.*dense_a, dense_b, dense_out"):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[kgrad.GradientNormLogger(layers=["dense_9*"])])
    with pytest.raises(ValueError, match=r"probe_data.*does not fit"):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[kgrad.GradientNormLogger(probe_data=(x[:, :3], y[:, :3]))])
    assert model.optimizer.iterations.numpy() == 0  # nothing trained

    uncompiled = _mlp()
    logger = kgrad.GradientNormLogger()
    logger.set_model(uncompiled)
    with pytest.raises(ValueError, match="not compiled"):
        logger.on_train_begin()

    frozen = _mlp()
    frozen.trainable = False
    _compile(frozen)
    logger.set_model(frozen)
    with pytest.raises(ValueError, match="no trainable weights"):
        logger.on_train_begin()


def test_records_memory_for_100k_steps_of_a_50_layer_model():
    infos = [
        kgrad.records.VariableInfo(f"dense_{d}", d, name, name)
        for d in range(50)
        for name in ("kernel", "bias")
    ]
    records = kgrad.GradientRecords(infos)
    rows = 1000
    for chunk in range(100):
        records.append(
            step=np.arange(chunk * rows, (chunk + 1) * rows),
            epoch=chunk,
            grad_norm=np.ones((rows, 100), np.float32),
            weight_norm=np.ones((rows, 100), np.float32),
            global_norm=np.ones(rows, np.float32),
        )
    assert len(records) == 100_000
    assert records.nbytes <= 200 * 2**20
