"""GradientClipping and its pure clipping functions: exact numbers, real fits, bad input.

The tests run on TensorFlow, JAX and torch; those of TensorFlow's own features (sparse
`tf.IndexedSlices` gradients, `tf.distribute`) say so in their marker. On every
backend the applied gradient of each step (`-Δw / lr` under SGD) is checked against
the clipped gradient of the same loss at the same weights by the backend's own
autodiff (`tests/autodiff.py`: `tf.GradientTape`, `jax.grad`, `torch.autograd`),
with the step compiled (`tf.function` with XLA, `jax.jit`, `torch.compile`) and not.
"""

import copy
import zipfile

import autodiff
import h5py
import keras
import numpy as np
import pytest

import kgrad
from kgrad.control import clipping_functions as clip

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

BATCH = 32
SPARSE = "tf.IndexedSlices: sparse gradients exist on TensorFlow only"


# -- an exploding setup ----------------------------------------------------------------


def _exploding_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    w = rng.normal(size=(8, 1))
    y = (np.tanh(x @ w) + 0.1 * rng.normal(size=(256, 1))).astype("float32")
    return x, y


def _exploding_model(learning_rate=0.3, **optimizer_kwargs):
    """A deep tanh MLP with a too-high SGD learning rate: its loss reaches inf/NaN."""
    layers = [keras.Input((8,))]
    for i in range(8):
        init = keras.initializers.RandomNormal(stddev=0.5, seed=i)
        layers.append(keras.layers.Dense(16, activation="tanh", kernel_initializer=init))
    init = keras.initializers.RandomNormal(stddev=0.5, seed=99)
    layers.append(keras.layers.Dense(1, kernel_initializer=init, name="out"))
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.SGD(learning_rate, **optimizer_kwargs), loss="mse")
    return model


def _fit(model, callbacks, epochs=6, x=None, y=None):
    if x is None:
        x, y = _exploding_data()
    return model.fit(
        x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
        callbacks=callbacks,
    )


def test_the_setup_explodes_without_clipping():
    losses = _fit(_exploding_model(), []).history["loss"]
    assert not np.isfinite(losses[-1])
    assert losses[2] > 100 * losses[0]


# An entry bound of 1 still lets every weight move by lr = 0.3 per step: too much here.
_THRESHOLDS = {"value": 0.1}


@pytest.mark.parametrize("mode", [
    mode if mode == "global_norm" else pytest.param(mode, marks=pytest.mark.slow_on(
        "torch", reason="an eager torch fit of 20-30 s each on 2 CPU cores; global_norm's "
        "runs by default, and every mode's exactness on torch is tested above"))
    for mode in kgrad.control.CLIP_MODES
])
def test_every_mode_trains_the_exploding_setup(mode):
    # What must hold whatever the float order of the machine, on three orders of the
    # data (the unclipped run diverges on each, see the test above): every loss stays
    # finite and far from the divergence, clipping acted, and a norm bound hands the
    # optimizer no larger norm. The loss trajectory itself is not asserted: autoclip's
    # path (15.1 -> 5.9 -> 8.7 on one machine, 15.1 -> 16.9 -> 9.8 on another) depends
    # on the order of float sums.
    # One model and one pair of callbacks serve the three runs (one trace, not three):
    # each run starts from the same initial weights and step count as a fresh model.
    x, y = _exploding_data()
    model = _exploding_model()
    initial_weights = model.get_weights()
    clipping = kgrad.GradientClipping(mode, threshold=_THRESHOLDS.get(mode))
    logger = kgrad.GradientNormLogger(weight_norms=False)
    for order in range(3):
        permutation = np.random.default_rng(order).permutation(len(x))
        model.set_weights(initial_weights)
        model.optimizer.iterations.assign(0)
        losses = _fit(
            model, [clipping, logger], epochs=4, x=x[permutation], y=y[permutation],
        ).history["loss"]
        assert np.isfinite(losses).all(), (order, losses)
        assert max(losses) < 10 * losses[0], (order, losses)
        assert 0.0 < clipping.clipped_fraction <= 1.0
        clipped = logger.records.clipped_global_norms
        assert np.isfinite(clipped).all()
        if mode == "global_norm":
            assert clipped.max() <= clipping.threshold * (1 + 1e-5)
        if mode == "layer_norm":  # 9 layers, each at most the threshold
            assert clipped.max() <= clipping.threshold * 3 * (1 + 1e-5)


# -- pure functions ---------------------------------------------------------------------


def _tensor(value):
    return keras.ops.convert_to_tensor(np.asarray(value, "float32"))


def test_global_norm_clip_matches_hand_numbers_and_is_idempotent():
    grads = [_tensor([[3.0, 0.0], [0.0, 4.0]]), None, _tensor([12.0])]
    clipped, norm, hit = clip.clip_by_global_norm(grads, 6.5)
    assert float(norm) == pytest.approx(13.0)
    assert bool(hit)
    assert clipped[1] is None
    np.testing.assert_allclose(clipped[0], [[1.5, 0.0], [0.0, 2.0]], rtol=1e-6)
    np.testing.assert_allclose(clipped[2], [6.0], rtol=1e-6)
    assert float(clip.gradients_global_norm(clipped)) <= 6.5 * (1 + 1e-6)
    twice, _, _ = clip.clip_by_global_norm(clipped, 6.5)
    for once, again in zip(clipped, twice):
        if once is not None:
            np.testing.assert_allclose(again, once, rtol=1e-6)
    under, _, hit = clip.clip_by_global_norm(grads, 20.0)
    assert not bool(hit)
    np.testing.assert_array_equal(under[0], grads[0])  # untouched, bit for bit


@pytest.mark.backends("tensorflow", reason=SPARSE)
def test_global_norm_clip_scales_sparse_values():
    import tensorflow as tf

    sparse = tf.IndexedSlices(
        tf.constant([[3.0, 4.0]]), tf.constant([1], tf.int64), tf.constant([3, 2], tf.int64)
    )
    clipped, norm, _ = clip.clip_by_global_norm([sparse], 1.0)
    assert isinstance(clipped[0], tf.IndexedSlices)
    assert float(norm) == pytest.approx(5.0)
    np.testing.assert_allclose(clipped[0].values, [[0.6, 0.8]], rtol=1e-6)


def test_group_norm_clips_each_group_on_its_own():
    grads = [_tensor([3.0]), _tensor([4.0]), _tensor([0.5]), None]
    clipped, hit = clip.clip_by_group_norm(grads, [[0, 1], [2, 3]], 1.0)
    assert bool(hit)
    np.testing.assert_allclose([float(clipped[0][0]), float(clipped[1][0])], [0.6, 0.8])
    np.testing.assert_array_equal(clipped[2], grads[2])
    assert clipped[3] is None


def test_value_clip_bounds_every_entry():
    dense, hit = clip.clip_by_value([_tensor([-3.0, 0.25, 2.0]), None], 1.0)
    assert bool(hit) and dense[1] is None
    np.testing.assert_array_equal(dense[0], [-1.0, 0.25, 1.0])
    under, hit = clip.clip_by_value([_tensor([-0.5, 0.25])], 1.0)
    assert not bool(hit)
    np.testing.assert_array_equal(under[0], [-0.5, 0.25])


@pytest.mark.backends("tensorflow", reason=SPARSE)
def test_value_clip_sums_repeated_sparse_rows_first():
    import tensorflow as tf

    sparse = tf.IndexedSlices(
        tf.constant([[0.75], [0.75], [-0.5]]),
        tf.constant([2, 2, 0], tf.int64),
        tf.constant([4, 1], tf.int64),
    )
    clipped, hit = clip.clip_by_value([sparse], 1.0)
    assert bool(hit)  # row 2 sums to 1.5, although no single slice exceeds 1
    np.testing.assert_array_equal(
        tf.convert_to_tensor(clipped[0]).numpy().ravel(), [-0.5, 0.0, 1.0, 0.0]
    )


@pytest.mark.parametrize("q", [0.5, 10.0, 37.5, 50.0, 90.0, 100.0])
@pytest.mark.parametrize("count", [1, 2, 7, 20])
def test_percentile_matches_numpy_linear(q, count):
    values = np.random.default_rng(count).lognormal(size=20).astype("float32")
    got = float(clip.percentile(_tensor(values), count, q))
    np.testing.assert_allclose(got, np.percentile(values[:count], q), rtol=1e-6)


def test_unitwise_norm_follows_keras_kernel_layouts():
    dense = np.arange(6, dtype="float32").reshape(3, 2)  # (in, out)
    np.testing.assert_allclose(
        clip.unitwise_norm(_tensor(dense)), [np.linalg.norm(dense, axis=0)], rtol=1e-6
    )
    conv = np.random.default_rng(0).normal(size=(3, 3, 2, 4)).astype("float32")  # HWIO
    expected = np.sqrt((conv**2).sum(axis=(0, 1, 2)))
    got = clip.unitwise_norm(_tensor(conv))
    assert tuple(got.shape) == (1, 1, 1, 4)
    np.testing.assert_allclose(np.ravel(got), expected, rtol=1e-6)
    np.testing.assert_array_equal(clip.unitwise_norm(_tensor([-2.0, 3.0])), [2.0, 3.0])


@pytest.mark.parametrize("fused", [True, False])  # EuclideanNorm, or XLA's ops
def test_agc_leaves_small_units_untouched_and_rescales_the_others_exactly(fused):
    weight = np.array([[3.0, 0.0, 1.0], [4.0, 0.0, 0.0]], "float32")  # ‖W_i‖ = 5, 0, 1
    # ‖G_i‖ = 0.05, 1, ~0.5
    grad = np.array([[0.03, 1.0, 0.005], [0.04, 0.0, 0.5]], "float32")
    bias_w, bias_g = np.array([2.0, 0.0], "float32"), np.array([0.01, -0.5], "float32")
    clipped, hit = clip.adaptive_clip(
        [_tensor(grad), _tensor(bias_g)],
        [_tensor(weight), _tensor(bias_w)],
        ratio=0.02,
        epsilon=1e-3,
        fused=fused,
    )
    assert bool(hit)
    clipped_kernel = keras.ops.convert_to_numpy(clipped[0])
    # unit 0: 0.05 / 5 = 0.01 ≤ 0.02: untouched
    np.testing.assert_array_equal(clipped_kernel[:, 0], grad[:, 0])
    # unit 1: zero weights count as ε: rescaled to norm 0.02 · 1e-3
    np.testing.assert_allclose(np.linalg.norm(clipped_kernel[:, 1]), 2e-5, rtol=1e-5)
    np.testing.assert_allclose(clipped_kernel[:, 1] / np.linalg.norm(clipped_kernel[:, 1]),
                               [1.0, 0.0], atol=1e-6)
    # unit 2: rescaled to norm 0.02 · 1, direction kept
    scale = 0.02 / np.linalg.norm(grad[:, 2])
    np.testing.assert_allclose(clipped_kernel[:, 2], grad[:, 2] * scale, rtol=1e-5)
    # bias, elementwise: 0.01/2 = 0.005 kept; -0.5 against ε → -0.02·1e-3
    np.testing.assert_allclose(clipped[1], [0.01, -2e-5], rtol=1e-5)
    skipped, _ = clip.adaptive_clip(
        [_tensor(grad)], [_tensor(weight)], 0.02, skip=[True]
    )
    np.testing.assert_array_equal(skipped[0], grad)


def test_agc_on_tensors_of_one_shape_equals_agc_on_each_alone():
    rng = np.random.default_rng(1)
    weights = [_tensor(rng.normal(size=(4, 3))) for _ in range(3)]
    grads = [_tensor(rng.normal(size=(4, 3)) * s) for s in (0.01, 1, 10)]
    together, _ = clip.adaptive_clip(grads, weights, 0.1)
    for grad, weight, clipped in zip(grads, weights, together):
        (alone,), _ = clip.adaptive_clip([grad], [weight], 0.1)
        np.testing.assert_allclose(clipped, alone, rtol=1e-6)
    np.testing.assert_array_equal(together[0], grads[0])  # all its units under λ


def test_agc_handles_conv_kernels_and_scalars():
    rng = np.random.default_rng(2)
    conv_w = rng.normal(size=(2, 2, 3, 4)).astype("float32")
    conv_g = (rng.normal(size=(2, 2, 3, 4)) * [0.01, 1.0, 0.01, 5.0]).astype("float32")
    clipped, _ = clip.adaptive_clip(
        [_tensor(conv_g), _tensor(1.0)], [_tensor(conv_w), _tensor(2.0)], 0.1
    )
    w_norm = np.sqrt((conv_w**2).sum(axis=(0, 1, 2)))
    g_norm = np.sqrt((conv_g**2).sum(axis=(0, 1, 2)))
    expected = conv_g * np.minimum(1.0, 0.1 * w_norm / g_norm)
    np.testing.assert_allclose(clipped[0], expected, rtol=1e-5)
    assert float(clipped[1]) == pytest.approx(0.2)  # |g| = 1 > 0.1 · |w| = 0.2


@pytest.mark.backends("tensorflow", reason=SPARSE)
def test_agc_makes_sparse_gradients_dense():
    import tensorflow as tf

    sparse = tf.IndexedSlices(
        tf.constant([[1.0, 0.0, 0.0]]), tf.constant([4], tf.int64),
        tf.constant([5, 3], tf.int64),
    )
    clipped, _ = clip.adaptive_clip([sparse], [tf.constant(np.ones((5, 3), "float32"))], 0.1)
    dense = clipped[0].numpy()  # column 0 of the table has norm √5
    np.testing.assert_allclose(dense[4], [0.1 * np.sqrt(5), 0.0, 0.0], rtol=1e-6)
    assert np.count_nonzero(dense) == 1


# -- the callback in real fits ----------------------------------------------------------


def _clipped_global(logger):
    return np.asarray(logger.records.clipped_global_norms)


def test_logger_shows_pre_clip_above_and_post_clip_at_most_the_threshold():
    logger = kgrad.GradientNormLogger()
    clipping = kgrad.GradientClipping("global_norm", threshold=1.0)
    history = _fit(_exploding_model(), [logger, clipping], epochs=2).history
    pre, post = np.asarray(logger.records.global_norms), _clipped_global(logger)
    assert (pre > 1.0).any()
    assert (post <= 1.0 + 1e-5).all()
    np.testing.assert_allclose(post, np.minimum(pre, 1.0), rtol=1e-5)
    # The fraction of clipped steps is that of steps whose pre-clip norm exceeded 1.
    assert clipping.clipped_fraction == pytest.approx(np.mean(pre > 1.0))
    per_epoch = np.mean((pre > 1.0).reshape(2, -1), axis=1)
    np.testing.assert_allclose(history["clip/fraction"], per_epoch)
    assert history["clip/threshold"] == [1.0, 1.0]


def test_logger_every_n_steps_records_pre_and_post_clip_norms():
    logger = kgrad.GradientNormLogger(every_n_steps=2)
    clipping = kgrad.GradientClipping("global_norm", threshold=1.0)
    _fit(_exploding_model(), [logger, clipping], epochs=2)
    pre, post = np.asarray(logger.records.global_norms), _clipped_global(logger)
    assert np.unique(logger.records.steps % 2).tolist() == [0]
    assert (pre > 1.0).any()
    np.testing.assert_allclose(post, np.minimum(pre, 1.0), rtol=1e-5)
    per_variable = logger.to_dataframe()
    assert (per_variable.clipped_grad_norm <= per_variable.grad_norm + 1e-6).all()


class CountingClipping(kgrad.GradientClipping):
    """Counts the traces of its transform: its Python runs only while tracing."""

    traces = 0

    def _transform(self, context, gradients):
        self.traces += 1
        return super()._transform(context, gradients)


def test_threshold_changes_mid_training_without_a_retrace():
    clipping = CountingClipping("global_norm", threshold=1.0)
    functions = []

    class Lower(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            functions.append(self.model.train_function)

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                clipping.threshold = 0.25

    logger = kgrad.GradientNormLogger()
    _fit(_exploding_model(), [logger, clipping, Lower()], epochs=2)
    traces_after_first_epoch = clipping.traces
    assert traces_after_first_epoch >= 1
    assert functions[0] is functions[1]
    post = _clipped_global(logger).reshape(2, -1)
    assert (post[0] > 0.25 + 1e-3).any() and (post[0] <= 1.0 + 1e-5).all()
    assert (post[1] <= 0.25 + 1e-5).all()
    assert clipping.traces == traces_after_first_epoch


def test_autoclip_threshold_is_the_percentile_of_the_recorded_history():
    logger = kgrad.GradientNormLogger()
    clipping = kgrad.GradientClipping("autoclip", percentile=25.0, history_size=5)
    _fit(_exploding_model(), [logger, clipping], epochs=2)
    pre, post = np.asarray(logger.records.global_norms), _clipped_global(logger)
    for step in range(len(pre)):
        window = pre[max(0, step - 4) : step + 1]
        expected = min(pre[step], np.percentile(window, 25.0))
        np.testing.assert_allclose(post[step], expected, rtol=1e-5, err_msg=str(step))
    np.testing.assert_allclose(clipping.history(), pre[-5:], rtol=1e-6)
    assert clipping.threshold == pytest.approx(np.percentile(clipping.history(), 25.0))
    clipping.percentile = 50.0  # settable; the threshold itself is computed
    with pytest.raises(ValueError, match="percentile"):
        clipping.threshold = 1.0


@pytest.mark.parametrize("exclude_final_layer", [True, False])
def test_agc_excludes_the_final_layer_by_default(exclude_final_layer):
    logger = kgrad.GradientNormLogger()
    clipping = kgrad.GradientClipping(
        "agc", threshold=0.01, exclude_final_layer=exclude_final_layer
    )
    _fit(_exploding_model(), [logger, clipping], epochs=1)
    frame = logger.to_dataframe()
    final = frame[frame.layer == "out"]
    hidden = frame[frame.layer != "out"]
    assert (hidden.clipped_grad_norm < hidden.grad_norm * (1 - 1e-4)).any()
    unchanged = np.isclose(final.clipped_grad_norm, final.grad_norm, rtol=1e-6)
    assert unchanged.all() == exclude_final_layer


def test_layer_norm_bounds_every_layer():
    logger = kgrad.GradientNormLogger()
    _fit(_exploding_model(), [logger, kgrad.GradientClipping("layer_norm", 0.5)], epochs=1)
    frame = logger.to_dataframe()
    frame["pre"], frame["post"] = frame.grad_norm**2, frame.clipped_grad_norm**2
    per_layer = np.sqrt(frame.groupby(["step", "layer"])[["pre", "post"]].sum())
    assert (per_layer.pre > 0.5).any()
    assert (per_layer.post <= 0.5 * (1 + 1e-5)).all()
    np.testing.assert_allclose(per_layer.post, np.minimum(per_layer.pre, 0.5), rtol=1e-5)


class StepWeights(keras.callbacks.Callback):
    """Records the trainable weights before and after each step (on JAX, reading
    `self.model` writes the step's state back to the variables first)."""

    def on_train_begin(self, logs=None):
        self.before, self.after = [], []

    def _weights(self):
        return [np.array(v.numpy()) for v in self.model.trainable_variables]

    def on_train_batch_begin(self, batch, logs=None):
        self.before.append(self._weights())

    def on_train_batch_end(self, batch, logs=None):
        self.after.append(self._weights())

    def applied(self, learning_rate):
        """Per step, the gradient SGD applied to each variable: -Δw / lr."""
        return [
            [(b - a) / learning_rate for a, b in zip(after, before)]
            for before, after in zip(self.before, self.after)
        ]


def _norm(arrays):
    return float(np.sqrt(sum(np.sum(np.square(a, dtype=np.float64)) for a in arrays)))


def _layer_of(model):
    """The index of the layer of each trainable variable, in `trainable_variables`
    order."""
    owner = {
        id(v): i for i, layer in enumerate(model.layers) for v in layer.trainable_variables
    }
    return [owner[id(v)] for v in model.trainable_variables]


def _per_layer(arrays, layer_of):
    groups = {}
    for array, layer in zip(arrays, layer_of):
        groups.setdefault(layer, []).append(array)
    return list(groups.values())


@pytest.mark.backends(
    "tensorflow",
    "jax",
    reason="on torch, test_every_mode_applies_the_clipped_autodiff_gradient compiles "
    "every mode (torch.compile, ~30 s each on this CPU) and checks its numbers",
)
@pytest.mark.parametrize("mode", kgrad.control.CLIP_MODES)
def test_every_mode_compiles_with_xla(mode):
    # The applied update is read from the weights, not from a GradientNormLogger: the
    # logger's statistics triple the XLA compile, and it has its own XLA test.
    model = _exploding_model()
    model.compile(keras.optimizers.SGD(0.3), loss="mse", jit_compile=True)
    clipping = kgrad.GradientClipping(mode, threshold=_THRESHOLDS.get(mode))
    weights = StepWeights()
    losses = _fit(model, [clipping, weights], epochs=2).history["loss"]
    assert np.isfinite(losses).all()
    assert 0.0 < clipping.clipped_fraction <= 1.0
    steps = weights.applied(1.0)  # -Δw: lr × the applied gradient
    assert len(steps) == 2 * 256 // BATCH
    bound = 0.3 * (clipping.threshold if mode != "autoclip" else np.inf) * (1 + 1e-4)
    layer_of = _layer_of(model)
    if mode == "global_norm":
        assert max(_norm(step) for step in steps) <= bound
    if mode == "layer_norm":
        assert max(_norm(layer) for s in steps for layer in _per_layer(s, layer_of)) <= bound
    if mode == "value":
        assert max(np.abs(u).max() for step in steps for u in step) <= bound


# -- the applied gradient equals the clipped gradient of the backend's autodiff --------


def _reference_gradients(model, weights, x, y):
    """The gradients of the model's mean squared error at `weights` on `(x, y)`, by
    the backend's own autodiff."""
    y = keras.ops.convert_to_tensor(y)
    return autodiff.model_gradients(
        model, weights, lambda y_pred: keras.ops.mean(keras.ops.square(y_pred - y)), x
    )


def _scaled(gradients, threshold):
    norm = _norm(gradients)
    return [g * min(1.0, threshold / norm) for g in gradients]


def _unit_norms(value):
    if value.ndim <= 1:
        return np.abs(value)
    return np.sqrt(np.square(value).sum(axis=tuple(range(value.ndim - 1))))


def _expected_clip(mode, gradients, weights, layer_of, threshold, norms_so_far):
    """What GradientClipping must hand SGD, in NumPy (its defaults otherwise)."""
    if mode == "global_norm":
        return _scaled(gradients, threshold)
    if mode == "layer_norm":
        return [g for layer in _per_layer(gradients, layer_of) for g in _scaled(layer, threshold)]
    if mode == "value":
        return [np.clip(g, -threshold, threshold) for g in gradients]
    if mode == "autoclip":  # the 10th percentile of the global norms, this one included
        return _scaled(gradients, np.percentile(norms_so_far, 10.0))
    final = max(layer_of)
    clipped = []
    for g, w, layer in zip(gradients, weights, layer_of):
        if layer == final:  # exclude_final_layer=True
            clipped.append(g)
            continue
        limit = np.maximum(_unit_norms(w), 1e-3) * threshold
        clipped.append(g * np.minimum(1.0, limit / np.maximum(_unit_norms(g), 1e-6)))
    return clipped


def _check_applied(model, recorder, x, y, mode, thresholds, learning_rate, batch):
    """Every step applied the clipped reference gradient at its weights (-Δw / lr
    under SGD)."""
    layer_of = _layer_of(model)
    norms_so_far = []
    applied = recorder.applied(learning_rate)
    assert len(applied) == len(thresholds)
    for step, (weights, got, threshold) in enumerate(
        zip(recorder.before, applied, thresholds)
    ):
        start = (step * batch) % len(x)
        window = slice(start, start + batch)
        gradients = _reference_gradients(model, weights, x[window], y[window])
        norms_so_far.append(_norm(gradients))
        expected = _expected_clip(mode, gradients, weights, layer_of, threshold, norms_so_far)
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6, err_msg=f"step {step}")
        if mode == "global_norm":
            assert _norm(got) <= threshold * (1 + 1e-3)
        if mode == "value":
            assert max(np.abs(g).max() for g in got) <= threshold * (1 + 1e-3)
    return norms_so_far


_STEP_THRESHOLDS = {"global_norm": 1.0, "layer_norm": 0.5, "value": 0.1, "agc": 0.01}


def _compiled_or_eager(mode: str) -> list:
    # On torch one compiled mode runs by default (global_norm's); the others with
    # KGRAD_TEST_FULL=1: each compiled case traces a step with torch.compile anew.
    slow = () if mode == "global_norm" else pytest.mark.slow_on("torch", reason="torch.compile traces Keras's step for 40-100 s on 2 CPU cores; one compiled case per feature runs by default")
    return [pytest.param(mode, True, id=f"{mode}-True", marks=slow),
            pytest.param(mode, False, id=f"{mode}-False")]


@pytest.mark.parametrize(  # compiled, or step by step
    "mode,jit_compile",
    [case for mode in kgrad.control.CLIP_MODES for case in _compiled_or_eager(mode)],
)
def test_every_mode_applies_the_clipped_autodiff_gradient(mode, jit_compile):
    x, y = _exploding_data()
    lr, batch = 0.1, 64
    model = _exploding_model(learning_rate=lr)
    model.compile(keras.optimizers.SGD(lr), loss="mse", jit_compile=jit_compile)
    clipping = kgrad.GradientClipping(mode, threshold=_STEP_THRESHOLDS.get(mode))
    recorder = StepWeights()
    model.fit(x, y, batch_size=batch, epochs=2, shuffle=False, verbose=0,
              callbacks=[clipping, recorder])
    steps = 2 * len(x) // batch
    threshold = _STEP_THRESHOLDS.get(mode)
    norms = _check_applied(model, recorder, x, y, mode, [threshold] * steps, lr, batch)
    assert clipping.clipped_fraction > 0.0
    if mode == "autoclip":
        np.testing.assert_allclose(clipping.history(), norms, rtol=1e-4)
        assert clipping.threshold == pytest.approx(np.percentile(norms, 10.0), rel=1e-4)
    if mode in ("global_norm", "autoclip"):  # clipped: exactly the steps above c
        limits = [threshold] * steps if mode == "global_norm" else [
            np.percentile(norms[: i + 1], 10.0) for i in range(steps)
        ]
        expected = np.mean([n > c * (1 + 1e-6) for n, c in zip(norms, limits)])
        assert clipping.clipped_fraction == pytest.approx(expected)


def _traced_clipping(threshold):
    """A global-norm GradientClipping and `traces()`, how many times the step has been
    traced so far: on TensorFlow and JAX the Python of the transform runs only while
    tracing (counted); under `torch.compile`, dynamo's count of the graphs it made (a
    Python counter read in the step would itself make dynamo recompile)."""
    if keras.backend.backend() == "torch":
        from torch._dynamo.utils import counters

        return kgrad.GradientClipping("global_norm", threshold=threshold), (
            lambda: counters["stats"]["unique_graphs"]
        )
    clipping = CountingClipping("global_norm", threshold=threshold)
    return clipping, lambda: clipping.traces


@pytest.mark.slow_on("torch", reason="torch.compile traces Keras's step for 40-100 s on 2 CPU cores; one compiled case per feature runs by default")
def test_threshold_set_between_fits_and_mid_epoch_needs_no_retrace():
    class LowerAfterStep(keras.callbacks.Callback):
        def __init__(self, step, value):
            super().__init__()
            self.step, self.value = step, value

        def on_train_batch_end(self, batch, logs=None):
            if batch == self.step:
                clipping.threshold = self.value

    x, y = _exploding_data()
    lr, batch = 0.1, 64  # 4 steps per epoch
    model = _exploding_model(learning_rate=lr)
    # Compiled on every backend (on torch `"auto"` is eager, with nothing to retrace).
    model.compile(keras.optimizers.SGD(lr), loss="mse", jit_compile=True)
    clipping, traces = _traced_clipping(1.0)
    recorder = StepWeights()
    fit = dict(batch_size=batch, epochs=1, shuffle=False, verbose=0)
    before = traces()
    model.fit(x, y, callbacks=[clipping, recorder], **fit)
    _check_applied(model, recorder, x, y, "global_norm", [1.0] * 4, lr, batch)
    function, traced = model.train_function, traces()
    assert traced > before

    clipping.threshold = 0.2  # between fits
    # First, so that the recorder's read of the model (a sync of JAX's state) comes
    # after the change: a plain `assign` would be overwritten by it.
    model.fit(x, y, callbacks=[LowerAfterStep(1, 0.05), clipping, recorder], **fit)
    # Steps 0 and 1 at 0.2; set after step 1, 0.05 holds from step 2 on.
    _check_applied(model, recorder, x, y, "global_norm", [0.2, 0.2, 0.05, 0.05], lr, batch)
    assert traces() == traced and model.train_function is function
    assert clipping.threshold == 0.05


def _saved_weights(model, path):
    """The paths of every array in the saved `.keras` file (model and optimizer)."""
    model.save(path)
    names = []
    with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as file:
        with h5py.File(file, "r") as weights:
            weights.visititems(lambda name, item: names.append(name)
                               if isinstance(item, h5py.Dataset) else None)
    return sorted(names)


@pytest.mark.parametrize("mode", ["global_norm", "autoclip"])
def test_saved_model_is_unchanged_after_a_fit_with_clipping(mode, tmp_path):
    plain, clipped = _exploding_model(), _exploding_model()
    _fit(plain, [], epochs=1)
    _fit(clipped, [kgrad.GradientClipping(mode), kgrad.GradientNormLogger()], epochs=1)
    assert len(clipped.optimizer.variables) == len(plain.optimizer.variables)
    assert not [v.path for v in clipped.optimizer.variables if "kgrad" in v.path]
    names = _saved_weights(clipped, tmp_path / "clipped.keras")
    assert names == _saved_weights(plain, tmp_path / "plain.keras")
    loaded = keras.models.load_model(tmp_path / "clipped.keras")
    for a, b in zip(loaded.get_weights(), clipped.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.backends(
    "tensorflow",
    "torch",
    reason="on JAX the LossScaleOptimizer's stateless_apply calls its inner optimizer, "
    "not `apply`: the step hook does not see that step yet",
)
def test_clipping_under_mixed_precision_acts_on_unscaled_gradients():
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = _exploding_model()
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    logger = kgrad.GradientNormLogger()
    _fit(model, [logger, kgrad.GradientClipping("global_norm", 1.0)], epochs=1)
    pre, post = np.asarray(logger.records.global_norms), _clipped_global(logger)
    finite = np.isfinite(pre)
    assert (pre[finite] > 1.0).any()
    np.testing.assert_allclose(post[finite], np.minimum(pre[finite], 1.0), rtol=1e-3)
    # Overflowing steps (the first scales are too high) stay non-finite, so that the
    # LossScaleOptimizer still skips them and lowers its scale. (On torch's CPU kernels
    # the first scale overflows no step of this setup.)
    if keras.backend.backend() == "tensorflow":
        assert not finite.all()
    assert not np.isfinite(post[~finite]).any()


@pytest.mark.backends("tensorflow", reason="tf.distribute.MirroredStrategy")
def test_clipping_under_mirrored_strategy_clips_the_aggregated_gradient(strategy_of):
    with strategy_of(2).scope():
        model = _exploding_model()
    logger = kgrad.GradientNormLogger()
    clipping = kgrad.GradientClipping("global_norm", 1.0)
    _fit(model, [logger, clipping], epochs=1)
    pre, post = np.asarray(logger.records.global_norms), _clipped_global(logger)
    assert (pre > 1.0).any()
    np.testing.assert_allclose(post, np.minimum(pre, 1.0), rtol=1e-5)
    assert clipping.clipped_fraction == pytest.approx(np.mean(pre > 1.0))


def test_deepcopy_before_and_after_fit_trains():
    clipping = kgrad.GradientClipping("agc")
    before = copy.deepcopy(clipping)
    _fit(_exploding_model(), [clipping], epochs=1)
    after = copy.deepcopy(clipping)
    assert after.model is None and after._state is None
    for copied in (before, after):
        losses = _fit(_exploding_model(), [copied], epochs=2).history["loss"]
        assert np.isfinite(losses).all()
    assert clipping._hook is None  # removed at train end: the optimizer is restored
    assert "apply" not in vars(_exploding_model().optimizer)


# -- bad input --------------------------------------------------------------------------


def test_bad_arguments_are_rejected_with_the_rule_and_the_value():
    with pytest.raises(ValueError, match="global_norm, layer_norm, value, autoclip, agc"):
        kgrad.GradientClipping("norm")
    with pytest.raises(ValueError, match=r"`threshold` must be a number > 0.*threshold=0"):
        kgrad.GradientClipping("global_norm", threshold=0)
    with pytest.raises(ValueError, match=r"λ.*threshold=-0.01"):
        kgrad.GradientClipping("agc", threshold=-0.01)
    for bad in (0, 100.5, -3):
        with pytest.raises(ValueError, match=rf"\(0, 100\].*percentile={bad}"):
            kgrad.GradientClipping("autoclip", percentile=bad)
    with pytest.raises(ValueError, match="leave `threshold` unset"):
        kgrad.GradientClipping("autoclip", threshold=1.0)
    with pytest.raises(ValueError, match="history_size"):
        kgrad.GradientClipping("autoclip", history_size=0)
    clipping = kgrad.GradientClipping()
    with pytest.raises(ValueError, match="threshold=-1"):
        clipping.threshold = -1


@pytest.mark.parametrize("option", ["clipnorm", "clipvalue", "global_clipnorm"])
def test_optimizer_clipping_is_rejected_before_training(option):
    model = _exploding_model(**{option: 1.0})
    weights = model.get_weights()
    with pytest.raises(ValueError, match=rf"{option}=1.0.*Keep one: remove `{option}`"):
        _fit(model, [kgrad.GradientClipping()], epochs=1)
    for before, now in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, now)  # no step ran


def test_loss_scale_optimizer_inner_clipping_is_rejected():
    model = _exploding_model()
    inner = keras.optimizers.SGD(0.1, global_clipnorm=1.0)
    model.compile(keras.optimizers.LossScaleOptimizer(inner), loss="mse")
    with pytest.raises(ValueError, match="global_clipnorm"):
        _fit(model, [kgrad.GradientClipping()], epochs=1)


@pytest.mark.backends(
    "tensorflow", reason="the custom train_step is written with tf.GradientTape"
)
def test_a_train_step_that_bypasses_the_optimizer_is_reported():
    from test_gradient_norm_logger import CustomLoopNet  # updates without the optimizer

    x, y = _exploding_data()
    model = CustomLoopNet()
    model(x[:1])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(RuntimeError, match="called none of the Keras optimizers"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[kgrad.GradientClipping()])
