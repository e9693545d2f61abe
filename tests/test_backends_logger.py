"""GradientNormLogger on every supported backend: norms of the real step, exactly.

The reference needs no backend's autodiff: with plain SGD on the full batch, one
step moves each weight by `lr * gradient`, so `|w_before - w_after| / lr` is the
norm of the gradient of that step. Weights are read at epoch ends (one step per
epoch), where every backend has written its state back to the variables. The first
step is also checked against the backend's own autodiff of the same loss at the same
weights: `jax.grad` on JAX, `torch.autograd` on torch (with `jit_compile` off and on:
on, Keras runs the step under `torch.compile`).
"""

import os

import keras
import numpy as np
import pandas as pd
import pytest
from keras import ops

import kgrad
from kgrad import backend

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

LR = 0.05
FEATURES = 6


def _data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    return x, y


def _functional():
    return keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(5, activation="tanh", name="dense_a"),
            keras.layers.Dense(4, activation="relu", name="dense_b"),
            keras.layers.Dense(1, name="dense_out"),
        ]
    )


def _sequential_without_input():
    return keras.Sequential(
        [
            keras.layers.Dense(5, activation="tanh", name="dense_a"),
            keras.layers.Dense(1, name="dense_out"),
        ]
    )


class SubclassedRegressor(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(5, activation="tanh", name="hidden")
        self.out = keras.layers.Dense(1, name="out")

    def call(self, x):
        return self.out(self.hidden(x))


BUILDERS = {
    "functional": _functional,
    "sequential_without_input": _sequential_without_input,
    "subclassed": SubclassedRegressor,
}


class _Weights(keras.callbacks.Callback):
    """The weights at the start and at each epoch's end (one step per epoch).

    A model that Keras builds in its first step (on TensorFlow: subclassed,
    `Sequential` without `Input`) has no weights at the start: its snapshots begin
    after step 0, and `first_step` says so.
    """

    def __init__(self):
        super().__init__()
        self.snapshots = []
        self.first_step = 0

    def _keep(self):
        self.snapshots.append([np.array(v.numpy()) for v in self.model.trainable_variables])

    def on_train_begin(self, logs=None):
        if self.model.trainable_variables:
            self._keep()
        else:
            self.first_step = 1

    def on_epoch_end(self, epoch, logs=None):
        self._keep()


def _reference(snapshots, model):
    """{(layer, kind): [gradient norm per step]} and [weight norm per step] from the
    weight snapshots of full-batch SGD steps."""
    tracked = kgrad.track_variables(model)
    grads, weights = {}, {}
    for before, after in zip(snapshots, snapshots[1:]):
        for item in tracked:
            key = (item.layer, item.name)
            step = (before[item.index] - after[item.index]) / LR
            grads.setdefault(key, []).append(float(np.linalg.norm(step)))
            weights.setdefault(key, []).append(float(np.linalg.norm(before[item.index])))
    return grads, weights


def _fit(model, callbacks, epochs=3, x=None, y=None):
    if x is None:
        x, y = _data()
    weights = _Weights()
    model.fit(
        x, y, batch_size=len(x), epochs=epochs, shuffle=False, verbose=0,
        callbacks=[weights, *callbacks],
    )
    _fit.first_step = weights.first_step
    return weights.snapshots


def _compiled(builder, jit_compile="auto"):
    model = BUILDERS[builder]()
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", jit_compile=jit_compile)
    return model


def _assert_matches(frame, model, snapshots, steps):
    """The rows of `steps` equal the reference (which starts at the first step with
    weights before it); `steps` are the steps the reference covers."""
    grads, weights = _reference(snapshots, model)
    frame = frame[frame["step"] >= steps[0]]
    for (layer, kind), norms in grads.items():
        rows = frame[(frame["layer"] == layer) & (frame["kind"] == kind)]
        np.testing.assert_array_equal(rows["step"].to_numpy(), steps)
        np.testing.assert_allclose(
            rows["grad_norm"].to_numpy(), np.asarray(norms)[steps - steps[0]],
            rtol=2e-4, atol=1e-6,
        )
        np.testing.assert_allclose(
            rows["weight_norm"].to_numpy(), np.asarray(weights[(layer, kind)])[steps - steps[0]],
            rtol=1e-5,
        )


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_norms_equal_the_step_that_sgd_took(builder):
    model = _compiled(builder)
    logger = kgrad.GradientNormLogger()
    snapshots = _fit(model, [logger])
    first = _fit.first_step
    frame = logger.to_dataframe()
    assert set(frame["optimizer"]) == {"optimizer"}
    assert sorted(set(frame["step"])) == [0, 1, 2]
    _assert_matches(frame, model, snapshots, np.arange(first, 3))
    # The global norm is that of all the step's gradients.
    grads, _ = _reference(snapshots, model)
    expected = np.sqrt(sum(np.square(v) for v in grads.values()))
    per_step = frame[frame["step"] >= first].groupby("step")["global_norm"].first().to_numpy()
    np.testing.assert_allclose(per_step, expected, rtol=2e-4)


def test_every_n_steps_records_the_multiples():
    model = _compiled("functional")
    logger = kgrad.GradientNormLogger(every_n_steps=2)
    snapshots = _fit(model, [logger], epochs=5)
    frame = logger.to_dataframe()
    grads, _ = _reference(snapshots, model)
    kernel = frame[(frame["layer"] == "dense_a") & (frame["kind"] == "kernel")]
    np.testing.assert_array_equal(kernel["step"].to_numpy(), [0, 2, 4])
    np.testing.assert_allclose(
        kernel["grad_norm"].to_numpy(),
        np.asarray(grads[("dense_a", "kernel")])[[0, 2, 4]],
        rtol=2e-4,
    )


def test_fit_after_fit_and_loggers_taking_turns():
    """A second logger, then the first again: each fit records its own steps (on JAX
    the train functions of the two must not share a trace)."""
    model = _compiled("functional")
    first, second = kgrad.GradientNormLogger(), kgrad.GradientNormLogger(every_n_steps=2)
    _fit(model, [first], epochs=2)
    snapshots = _fit(model, [second], epochs=2)
    assert sorted(set(second.to_dataframe()["step"])) == [2]
    snapshots = _fit(model, [first], epochs=2)
    frame = first.to_dataframe()
    _assert_matches(frame, model, snapshots, np.arange(4, 6))
    plain = _fit(model, [], epochs=1)
    assert len(plain) == 2  # a plain fit after them trains as usual


def test_state_is_left_as_it_was():
    """kgrad's step state lives in the optimizer only during `fit`: saving after it
    writes what a plain model writes, and the saved model loads and predicts alike."""
    model = _compiled("functional")
    _fit(model, [], epochs=1)
    names_before = [v.path for v in model.optimizer.variables]
    _fit(model, [kgrad.GradientNormLogger()], epochs=2)
    assert [v.path for v in model.optimizer.variables] == names_before
    path = os.path.join(os.environ.get("PYTEST_TMP", "/tmp"), f"kgrad_{os.getpid()}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    os.remove(path)
    x, _ = _data()
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)


def test_logs_and_records_carry_the_norms():
    model = _compiled("functional")
    logger = kgrad.GradientNormLogger()
    x, y = _data()
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[logger])
    frame = logger.to_dataframe()
    assert isinstance(frame, pd.DataFrame)
    assert sorted(set(frame["step"])) == list(range(6))  # 3 batches x 2 epochs
    assert np.isfinite(history.history["grad_norm/global"]).all()
    means = frame.groupby("epoch")["global_norm"].mean().to_numpy()
    # The epoch's logged global norm is the mean over its steps' global norms.
    per_step = frame.groupby(["epoch", "step"])["global_norm"].first()
    np.testing.assert_allclose(
        history.history["grad_norm/global"], per_step.groupby("epoch").mean(), rtol=1e-5
    )
    assert means.shape == (2,)


def _assert_first_step_recorded(model, x, y, expected):
    """A logger's norms of a one-step fit equal `expected` (by trainable variable)."""
    logger = kgrad.GradientNormLogger()
    _fit(model, [logger], epochs=1, x=x, y=y)
    frame = logger.to_dataframe()
    tracked = kgrad.track_variables(model)
    got = [
        float(frame[(frame["layer"] == t.layer) & (frame["kind"] == t.name)]["grad_norm"].iloc[0])
        for t in tracked
    ]
    np.testing.assert_allclose(got, [expected[t.index] for t in tracked], rtol=1e-5)


@pytest.mark.backends("jax")
def test_first_step_equals_jax_grad():
    """On JAX: the recorded norms of step 0 equal `jax.grad` of the same loss."""
    import jax

    model = _compiled("functional")
    x, y = _data()
    values = [v.value for v in model.trainable_variables]

    def loss(trainable):
        y_pred, _ = model.stateless_call(trainable, [v.value for v in model.non_trainable_variables], x)
        return ops.mean(ops.square(y_pred - y))

    expected = [float(np.linalg.norm(g)) for g in jax.grad(loss)(values)]
    _assert_first_step_recorded(model, x, y, expected)


def _torch_autograd_norms(model, x, y):
    """The gradient norm of each trainable variable, by `torch.autograd` of the MSE
    loss at the model's current weights."""
    import torch

    parameters = [v.value for v in model.trainable_variables]
    y_pred = model(x)
    loss = torch.mean(torch.square(y_pred - torch.as_tensor(y)))
    return [float(torch.linalg.vector_norm(g)) for g in torch.autograd.grad(loss, parameters)]


TORCH_COMPILE = pytest.mark.parametrize(
    "jit_compile", [False, True], ids=["eager", "torch.compile"]
)


@pytest.mark.backends("torch", reason="torch.autograd is the reference; jit_compile=True is torch.compile")
@TORCH_COMPILE
def test_first_step_equals_torch_autograd(jit_compile):
    model = _compiled("functional", jit_compile=jit_compile)
    x, y = _data()
    expected = _torch_autograd_norms(model, x, y)
    _assert_first_step_recorded(model, x, y, expected)


@pytest.mark.backends("torch", reason="jit_compile=True is torch.compile there")
@TORCH_COMPILE
def test_compiled_or_eager_torch_steps_record_the_sgd_step(jit_compile):
    """Every step and every second step, a second fit, then a plain fit: the rows
    equal |dw|/lr of each full-batch SGD step, in both torch modes."""
    model = _compiled("functional", jit_compile=jit_compile)
    logger = kgrad.GradientNormLogger()
    snapshots = _fit(model, [logger], epochs=3)
    _assert_matches(logger.to_dataframe(), model, snapshots, np.arange(0, 3))
    every_other = kgrad.GradientNormLogger(every_n_steps=2)
    snapshots = _fit(model, [every_other], epochs=4)
    frame = every_other.to_dataframe()
    assert sorted(set(frame["step"])) == [4, 6]
    grads, _ = _reference(snapshots, model)
    kernel = frame[(frame["layer"] == "dense_a") & (frame["kind"] == "kernel")]
    np.testing.assert_allclose(
        kernel["grad_norm"].to_numpy(), np.asarray(grads[("dense_a", "kernel")])[[1, 3]],
        rtol=2e-4,
    )
    snapshots = _fit(model, [logger], epochs=2)  # the first logger again
    _assert_matches(logger.to_dataframe(), model, snapshots, np.arange(7, 9))
    assert len(_fit(model, [], epochs=1)) == 2  # a plain fit after them trains as usual


@pytest.mark.backends("torch", reason="the torch backend's own reductions")
def test_torch_reductions_are_exact_in_one_pass_and_read_no_value(monkeypatch):
    """Norms finite when only the squares overflow, inf and NaN kept, the finite
    check exact: one fused norm call each (float64 sums), and no value read on the
    host (a device sync per step on an accelerator, a graph break when compiling)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from kgrad.backend import torch as torch_backend

    class CountOps(TorchDispatchMode):
        norms = reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.norms += func is torch.ops.aten._foreach_norm.Scalar
            CountOps.reads += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    def no_read(*args, **kwargs):
        raise AssertionError("a value was read on the host")

    small = [torch.tensor([3.0, 4.0])]
    overflowing = small + [torch.full((100,), 1e20)]
    values = overflowing + [torch.tensor([1.0, float("inf")]), torch.tensor([float("nan")])]
    monkeypatch.setattr(torch.Tensor, "tolist", no_read)
    monkeypatch.setattr(torch.Tensor, "__bool__", no_read)
    with CountOps():
        plain = torch_backend.safe_norms(small)
        norms = torch_backend.safe_norms(values)
        all_finite = torch_backend.all_finite(overflowing)
        some_not = torch_backend.all_finite(values)
    monkeypatch.undo()
    assert CountOps.norms == 4 and CountOps.reads == 0
    got = norms.tolist()
    assert plain.tolist() == [5.0] and got[0] == 5.0
    np.testing.assert_allclose(got[1], 1e21, rtol=1e-6)
    assert np.isinf(got[2]) and np.isnan(got[3])
    assert norms.dtype == torch.float32
    assert bool(all_finite) and not bool(some_not)


def test_overflowing_squares_are_recorded_finite():
    """A gradient whose squares overflow float32 still gets its (finite) norm."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    model.layers[0].kernel.assign(np.array([[1e21]], np.float32))
    x = np.ones((4, 1), np.float32)
    logger = kgrad.GradientNormLogger()
    model.fit(x, np.zeros((4, 1), np.float32), batch_size=4, epochs=1, verbose=0, callbacks=[logger])
    norm = float(logger.to_dataframe()["grad_norm"].iloc[0])
    # d/dw mean((w x)^2) = 2 w x^2 = 2e21: its square (4e42) overflows float32.
    np.testing.assert_allclose(norm, 2e21, rtol=1e-5)


def test_a_feature_outside_its_backends_says_so_with_what_works_here():
    # Every kgrad feature runs on every backend now; `backend.require` stays the
    # way a feature says it does not (checked before any step).
    here = backend.name()
    with pytest.raises(NotImplementedError) as raised:
        backend.require("SomeFeature", backends=("elsewhere",))
    message = str(raised.value)
    assert f"SomeFeature does not support Keras's '{here}' backend yet" in message
    assert backend.SUPPORT[here] in message
    assert "KERAS_BACKEND=tensorflow" in message
    backend.require("SomeFeature", backends=(here,))  # no error where it runs
