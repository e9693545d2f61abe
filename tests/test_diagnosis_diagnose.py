"""`diagnose` on concrete models: dead units, NaN, bad input, subclassed models."""

import keras
import numpy as np
import pytest

import autodiff
import kgrad
from kgrad.diagnosis import fixes

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")


def _x(n=256, features=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, features)).astype("float32")


def _relu_net_with_dead_units(dead=12, width=64):
    bias = np.zeros(width, "float32")
    bias[:dead] = -10.0  # pre-activations are ~N(0, 2): these units never fire
    return keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(
                width, activation="relu", kernel_initializer="he_normal", name="d0"
            ),
            keras.layers.Dense(
                width,
                activation="relu",
                kernel_initializer="he_normal",
                bias_initializer=keras.initializers.Constant(bias),
                name="d1",
            ),
            keras.layers.Dense(
                width, activation="relu", kernel_initializer="he_normal", name="d2"
            ),
            keras.layers.Dense(1, name="out"),
        ]
    )


def test_dead_units_are_counted_exactly_and_blamed_on_the_bias():
    report = kgrad.diagnose(_relu_net_with_dead_units(dead=12), _x(512))
    (dead,) = report.by_kind("dead_units")
    assert dead.layers == ["d1"]
    assert dead.evidence["dead_units"] == {"d1": 12}
    assert dead.evidence["expected_silent"] == {"d1": 0.0}  # shallow: no correlation
    assert dead.evidence["dead_bias_mean"] == pytest.approx(-10.0)
    assert dead.fixes[0] == fixes.FIX_ZERO_BIAS
    assert fixes.FIX_RELU_HE not in dead.fixes  # already He-initialized
    row = report.layers.set_index("layer").loc["d1"]
    assert row["dead_units"] == 12 and row["dead_fraction"] == pytest.approx(12 / 64)
    # The null fraction was estimated from 512 random units (the bound's width).
    assert report.units.set_index("site").loc["d1", "null_units"] == 512


class SqrtOfSquare(keras.layers.Layer):
    """sqrt(x²) = |x|, except at x = 0 exactly, where backprop gives inf · 0 = NaN."""

    def call(self, inputs):
        return keras.ops.sqrt(keras.ops.square(inputs))


def _nan_net():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh", name="d0"),
            keras.layers.Dense(8, name="d1"),
            SqrtOfSquare(name="sqrt"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    return model


def _silence_unit(model, unit=0):
    dense = model.get_layer("d1")
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in (dense.kernel, dense.bias))
    kernel[:, unit], bias[unit] = 0.0, 0.0  # that pre-activation is exactly 0
    dense.kernel.assign(kernel)
    dense.bias.assign(bias)


def test_nan_gradient_names_the_layer_where_it_entered_backprop():
    model = _nan_net()
    assert "non_finite" not in kgrad.diagnose(model, _x(64, 4)).kinds
    _silence_unit(model)
    report = kgrad.diagnose(model, _x(64, 4))
    (non_finite,) = report.by_kind("non_finite")
    assert non_finite.evidence["origin_layer"] == "d1"
    assert non_finite.layers == ["d0", "d1"]  # `out` sits above the sqrt: finite
    assert "first_non_finite_output" not in non_finite.evidence  # forward was finite
    assert report.findings == [non_finite]  # no profile verdicts on NaN


def test_non_finite_forward_pass_names_the_first_layer():
    model = _relu_net_with_dead_units(dead=0)
    kernel = keras.ops.convert_to_numpy(model.get_layer("d1").kernel)
    kernel[0, 0] = np.inf
    model.get_layer("d1").kernel.assign(kernel)
    (non_finite,) = kgrad.diagnose(model, _x(64)).by_kind("non_finite")
    assert non_finite.evidence["first_non_finite_output"] == "d1"


def test_loss_gradients_equal_a_full_batch_gradient_tape():
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(8, activation="tanh", name="a"),
            keras.layers.Dense(1, name="b"),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    x, y = _x(100), _x(100, 1, seed=3)
    report = kgrad.diagnose(model, x, y, batch_size=32, training=False)
    # By hand with the backend's autodiff (tape or jax.grad), all 100 examples at once.
    _, grads = autodiff.variable_gradients(
        lambda: keras.ops.mean(keras.losses.mean_squared_error(y, model(x))),
        model.trainable_variables,
    )
    by_layer = report.layers.set_index("layer")
    for layer in ("a", "b"):
        kernel, bias = [
            g
            for v, g in zip(model.trainable_variables, grads)
            if v.path.split("/")[-2] == layer
        ]
        assert by_layer.loc[layer, "kernel_grad_norm"] == pytest.approx(
            autodiff.norm(kernel), rel=1e-5
        )
        assert by_layer.loc[layer, "bias_grad_norm"] == pytest.approx(
            autodiff.norm(bias), rel=1e-5
        )
    # The activation gradient of `a`: of the loss as a function of a's output.
    hidden = model.get_layer("a")(x)
    (of_hidden,) = autodiff.gradients(
        lambda h: keras.ops.mean(
            keras.losses.mean_squared_error(y, model.get_layer("b")(h))
        ),
        hidden,
    )
    assert by_layer.loc["a", "activation_grad_norm"] == pytest.approx(
        autodiff.norm(of_hidden), rel=1e-5
    )
    given = kgrad.diagnose(model, x, y, loss="mse", batch_size=32, training=False)
    assert given.layers["grad_norm"].tolist() == pytest.approx(
        report.layers["grad_norm"].tolist()
    )


def test_training_pass_leaves_batch_norm_statistics_untouched():
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Dense(1),
        ]
    )
    before = [
        keras.ops.convert_to_numpy(v).copy() for v in model.non_trainable_variables
    ]
    kgrad.diagnose(model, _x(128) + 3.0)
    after = [keras.ops.convert_to_numpy(v) for v in model.non_trainable_variables]
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old, new)


def test_a_model_loaded_from_disk_reads_its_own_graph(tmp_path):
    model = keras.Sequential(
        [keras.Input((16,))]
        + [keras.layers.Dense(16, activation="sigmoid") for _ in range(6)]
    )
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    expected = kgrad.diagnose(model, _x()).layers["activation_grad_norm"]
    measured = kgrad.diagnose(loaded, _x()).layers["activation_grad_norm"]
    assert measured.tolist() == pytest.approx(expected.tolist(), rel=1e-5)


class DeepSubclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.blocks = [keras.layers.Dense(32, activation="sigmoid") for _ in range(10)]
        self.head = keras.layers.Dense(1)

    def call(self, inputs):
        for block in self.blocks:
            inputs = block(inputs)
        return self.head(inputs)


def test_subclassed_model_keeps_gradient_statistics_and_says_what_is_missing():
    model = DeepSubclassed()
    model(_x(2))
    report = kgrad.diagnose(model, _x())
    assert any(
        "subclassed" in note
        and "dead-unit and saturation statistics" in note
        and "Gradient statistics" in note
        for note in report.notes
    )
    assert report.layers["activation_grad_norm"].isna().all()
    assert report.layers["dead_fraction"].isna().all()
    assert report.profile_kind == "bias"  # bias gradients follow δ
    assert report.decay < 0.35  # ~0.236 per sigmoid layer, plus the unequal ends
    assert "vanishing" in report.kinds
    assert "Note:" in str(report)


@pytest.mark.parametrize(
    "x, y, kwargs, message",
    [
        (np.zeros((0, 16), "float32"), None, {}, "`x` is empty"),
        (
            _x(8, 5),
            None,
            {},
            r"`x` does not fit model .*expects inputs of shape \[\(None, 16\)\]",
        ),
        (_x(8), _x(7, 1), {}, "`x` and `y` must hold the same number of examples"),
        (_x(8), None, {"batch_size": 0}, "`batch_size` must be a positive integer"),
        (_x(8), _x(8, 1), {}, "has no loss"),
        (3.0, None, {}, "`x` must be an array"),
    ],
)
def test_bad_input_is_named(x, y, kwargs, message):
    model = _relu_net_with_dead_units(dead=0)
    with pytest.raises(ValueError, match=message):
        kgrad.diagnose(model, x, y, **kwargs)


def test_report_text_dict_and_plot():
    import matplotlib
    import matplotlib.pyplot

    matplotlib.use("Agg")
    report = kgrad.diagnose(_relu_net_with_dead_units(dead=12), _x(512))
    text = str(report)
    assert "dead_units" in text and "fix:" in text and "d1" in text
    assert repr(report).startswith("<Report: 4 layers")
    as_dict = report.to_dict()
    assert as_dict["findings"][0]["kind"] == "dead_units"
    assert len(as_dict["layers"]) == 4
    figure = report.plot()
    assert len(figure.axes) == 2  # profile and unit health
    matplotlib.pyplot.close(figure)


def test_mixed_precision_gradients_do_not_underflow():
    def sigmoid_net():
        layers = [keras.Input((16,))]
        layers += [keras.layers.Dense(64, activation="sigmoid") for _ in range(14)]
        return keras.Sequential(layers + [keras.layers.Dense(1, dtype="float32")])

    full = sigmoid_net()
    expected = kgrad.diagnose(full, _x())
    keras.mixed_precision.set_global_policy("mixed_float16")
    half = sigmoid_net()
    half.set_weights(full.get_weights())
    # 0.24**14 ≈ 2e-9 is far below float16's smallest step (6e-8): without a loss
    # scale the first layers' gradients would be exactly zero.
    report = kgrad.diagnose(half, _x())
    assert report.kinds == expected.kinds == {"vanishing"}
    assert report.decay == pytest.approx(expected.decay, rel=0.05)
