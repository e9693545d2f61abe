"""Models without a forward pass of their own (keras-io's VAE and GAN): `loss_fn`,
the message that names the real cause, and bad arguments of `diagnose`."""

import keras
import numpy as np
import pytest

import autodiff
import kgrad
from kgrad.capture.probe import (
    check_probe_data,
    has_forward_pass,
    probe_gradients,
    sub_models,
)

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")


def _x(n=64, features=6, seed=0):
    return np.random.default_rng(seed).standard_normal((n, features)).astype("float32")


class VAE(keras.Model):
    """keras-io's VAE in miniature: sub-models, its own `train_step`, no `call()`."""

    def __init__(self, dead=0, decoder_scale=None):
        super().__init__(name="vae")
        inputs = keras.Input((6,))
        bias = np.zeros(8, "float32")
        bias[:dead] = -10.0  # pre-activations are ~N(0, 1): these units never fire
        hidden = keras.layers.Dense(
            8,
            activation="relu",
            bias_initializer=keras.initializers.Constant(bias),
            name="enc_hidden",
        )(inputs)
        z_mean = keras.layers.Dense(2, name="z_mean")(hidden)
        z_log_var = keras.layers.Dense(2, name="z_log_var")(hidden)
        self.encoder = keras.Model(inputs, [z_mean, z_log_var], name="encoder")
        z = keras.Input((2,))
        decoded = keras.layers.Dense(
            8,
            activation="tanh",
            kernel_initializer=(
                "glorot_uniform"
                if decoder_scale is None
                else keras.initializers.RandomNormal(stddev=decoder_scale)
            ),
            name="dec_hidden",
        )(z)
        decoded = keras.layers.Dense(6, name="dec_out")(decoded)
        self.decoder = keras.Model(z, decoded, name="decoder")

    def train_step(self, data):
        return {}


def vae_loss(vae, batch):
    z_mean, z_log_var = vae.encoder(batch)
    reconstruction = keras.ops.mean(keras.ops.square(vae.decoder(z_mean) - batch))
    kl = -0.5 * keras.ops.mean(
        1 + z_log_var - keras.ops.square(z_mean) - keras.ops.exp(z_log_var)
    )
    return reconstruction + kl


class GAN(keras.Model):
    """keras-io's GAN in miniature."""

    def __init__(self):
        super().__init__(name="gan")
        self.generator = keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(6, name="g_out")], name="generator"
        )
        self.discriminator = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(4, activation="tanh", name="d_hidden"),
                keras.layers.Dense(1, name="d_out"),
            ],
            name="discriminator",
        )

    def train_step(self, data):
        return {}


def gan_loss(gan, batch):
    """The discriminator's loss: `discriminator` is called twice, on real and fake."""
    noise = keras.ops.ones((keras.ops.shape(batch)[0], 3)) * 0.5
    real = gan.discriminator(batch)
    fake = gan.discriminator(gan.generator(noise))
    return keras.ops.mean(keras.ops.softplus(-real)) + keras.ops.mean(
        keras.ops.softplus(fake)
    )


def _layer(model, qualified):
    outer, inner = qualified.split("/")
    return getattr(model, outer).get_layer(inner)


def test_vae_loss_fn_records_every_sub_model_layer_as_a_hand_gradient_tape():
    vae, x = VAE(), _x()
    report = kgrad.diagnose(vae, x, loss_fn=vae_loss, batch_size=16)  # 4 batches
    names = [
        "encoder/enc_hidden",
        "encoder/z_mean",
        "encoder/z_log_var",
        "decoder/dec_hidden",
        "decoder/dec_out",
    ]
    by_layer = report.layers.set_index("layer")
    assert by_layer.index.tolist() == names
    # By hand: the same loss on all 64 examples at once, layer by layer, with the
    # backend's autodiff: each layer output's gradient is that of the loss as a
    # function of that output.
    layers = {name: _layer(vae, name) for name in names}
    # A tensor, as `fit` hands `train_step` (on torch a NumPy array minus a tensor
    # that requires grad fails).
    target = keras.ops.convert_to_tensor(x)

    def kl(z_mean, z_log_var):
        return -0.5 * keras.ops.mean(
            1 + z_log_var - keras.ops.square(z_mean) - keras.ops.exp(z_log_var)
        )

    def from_decoded(decoded):
        out = layers["decoder/dec_out"](decoded)
        return keras.ops.mean(keras.ops.square(out - target))

    def from_latent(z_mean, z_log_var):
        return from_decoded(layers["decoder/dec_hidden"](z_mean)) + kl(z_mean, z_log_var)

    def from_hidden(hidden):
        z_mean = layers["encoder/z_mean"](hidden)
        return from_latent(z_mean, layers["encoder/z_log_var"](hidden))

    hidden = layers["encoder/enc_hidden"](x)
    z_mean = layers["encoder/z_mean"](hidden)
    z_log_var = layers["encoder/z_log_var"](hidden)
    decoded = layers["decoder/dec_hidden"](z_mean)
    out = layers["decoder/dec_out"](decoded)
    (of_hidden,) = autodiff.gradients(from_hidden, hidden)
    of_mean, of_log_var = autodiff.gradients(from_latent, z_mean, z_log_var)
    (of_decoded,) = autodiff.gradients(from_decoded, decoded)
    (of_out,) = autodiff.gradients(
        lambda o: keras.ops.mean(keras.ops.square(o - target)), out
    )
    outputs = [of_hidden, of_mean, of_log_var, of_decoded, of_out]
    kernels = [layers[name].kernel for name in names]
    _, kernel_gradients = autodiff.variable_gradients(
        lambda: from_hidden(layers["encoder/enc_hidden"](x)), kernels
    )
    for index, name in enumerate(names):
        assert by_layer.loc[name, "activation_grad_norm"] == pytest.approx(
            autodiff.norm(outputs[index]), rel=1e-5
        )
        assert by_layer.loc[name, "kernel_grad_norm"] == pytest.approx(
            autodiff.norm(kernel_gradients[index]), rel=1e-5
        )
    assert by_layer["activation_grad_norm"].gt(0).all()
    assert report.units["site"].tolist() == [
        "encoder/enc_hidden",
        "decoder/dec_hidden",
    ]
    assert report.notes == []
    # The wrappers that recorded the calls are gone again.
    assert all("call" not in vars(layer) for layer in layers.values())


def test_units_of_the_functional_sub_models_are_measured_through_loss_fn():
    vae, x = VAE(dead=3, decoder_scale=4.0), _x(256)
    report = kgrad.diagnose(vae, x, loss_fn=vae_loss, batch_size=64)
    units = report.units.set_index("site")
    assert units.loc["encoder/enc_hidden", "layer"] == "encoder/enc_hidden"
    assert units.loc["encoder/enc_hidden", "dead_units"] == 3
    # By hand: tanh′ = 1 − tanh² below 0.01 on the decoder's input, z_mean.
    z_mean, _ = vae.encoder(x)
    hidden = keras.ops.convert_to_numpy(vae.decoder.get_layer("dec_hidden")(z_mean))
    saturated = float(np.mean(1.0 - hidden**2 < 0.01))
    assert 0.05 < saturated < 0.95
    assert units.loc["decoder/dec_hidden", "saturated_fraction"] == pytest.approx(
        saturated
    )
    # The same counts as diagnosing the encoder on its own inputs.
    alone = kgrad.diagnose(vae.encoder, x).units.set_index("site")
    assert alone.loc["enc_hidden", "dead_units"] == 3
    (dead,) = report.by_kind("dead_units")
    assert dead.layers == ["encoder/enc_hidden"]
    assert report.layers.set_index("layer").loc["encoder/enc_hidden", "dead_units"] == 3


def test_a_layer_called_twice_counts_both_calls():
    gan, x = GAN(), _x()
    report = kgrad.diagnose(gan, x, loss_fn=gan_loss)
    d_hidden = gan.discriminator.get_layer("d_hidden")
    g_out = gan.generator.get_layer("g_out")
    d_out = gan.discriminator.get_layer("d_out")
    real_hidden = d_hidden(x)
    fake_hidden = d_hidden(g_out(keras.ops.ones((64, 3)) * 0.5))
    real_grad, fake_grad = autodiff.gradients(
        lambda real, fake: keras.ops.mean(keras.ops.softplus(-d_out(real)))
        + keras.ops.mean(keras.ops.softplus(d_out(fake))),
        real_hidden,
        fake_hidden,
    )
    both = np.sqrt(np.sum(real_grad**2) + np.sum(fake_grad**2))
    by_layer = report.layers.set_index("layer")
    assert by_layer.loc["discriminator/d_hidden", "activation_grad_norm"] == (
        pytest.approx(both, rel=1e-5)
    )
    assert both > 1.01 * autodiff.norm(real_grad)  # the second call counted


def test_probe_gradients_with_loss_fn_equal_a_hand_gradient_tape():
    vae, x = VAE(), _x(16)
    loss, gradients = probe_gradients(vae, x, loss_fn=vae_loss)
    expected_loss, expected = autodiff.variable_gradients(
        lambda: vae_loss(vae, keras.ops.convert_to_tensor(x)), vae.trainable_variables
    )
    assert float(loss) == pytest.approx(expected_loss, rel=1e-6)
    assert len(gradients) == len(vae.trainable_variables) == 10
    for got, want in zip(gradients, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    # With targets, `loss_fn` receives `(x, y)` as `train_step` receives its data.
    seen = []
    y = _x(16, seed=1)
    loss, _ = probe_gradients(vae, x, y, loss_fn=_recording_paired_loss(seen))
    assert isinstance(seen[0], tuple) and len(seen[0]) == 2
    tensors = tuple(keras.ops.convert_to_tensor(value) for value in (x, y))
    expected_loss = _recording_paired_loss([])(vae, tensors)
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-6)


def _recording_paired_loss(seen):
    def paired_loss(model, batch):
        seen.append(batch)
        inputs, targets = batch
        z_mean, _ = model.encoder(inputs)
        return keras.ops.mean(keras.ops.square(model.decoder(z_mean) - targets))

    return paired_loss


@pytest.mark.backends("tensorflow", reason="tf.function traces the probe into a graph")
def test_probe_gradients_with_loss_fn_run_inside_a_tf_function():
    import tensorflow as tf

    vae, x, y = VAE(), _x(16), _x(16, seed=1)
    seen = []
    compiled = tf.function(
        lambda: probe_gradients(vae, x, y, loss_fn=_recording_paired_loss(seen))
    )
    loss, _ = compiled()
    assert isinstance(seen[0], tuple) and len(seen[0]) == 2
    tensors = tuple(keras.ops.convert_to_tensor(value) for value in (x, y))
    expected_loss = _recording_paired_loss([])(vae, tensors)
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-6)


@pytest.mark.parametrize("model_class", [GAN, VAE])
def test_no_call_says_so_and_lists_the_sub_models(model_class):
    model = model_class()
    assert not has_forward_pass(model)
    names = [name for name, _ in sub_models(model)]
    assert names == (
        ["generator", "discriminator"] if model_class is GAN else ["encoder", "decoder"]
    )
    pattern = rf"model '{model.name}' \({model_class.__name__}\) has no `call\(\)`"
    for attempt in (
        lambda: kgrad.diagnose(model, _x()),
        lambda: check_probe_data(model, (_x(), None)),
    ):
        with pytest.raises(ValueError, match=pattern) as raised:
            attempt()
        message = str(raised.value)
        assert f"`{names[0]}`" in message and f"`{names[1]}`" in message
        assert f"kgrad.diagnose(model.{names[0]}" in message
        assert "loss_fn=" in message
        assert "shaped like the training data" not in message


def test_gan_message_matches_generator():
    with pytest.raises(ValueError, match="generator"):
        kgrad.diagnose(GAN(), _x())


def test_a_call_that_raises_not_implemented_gets_the_same_message():
    class Stub(keras.Model):
        def __init__(self):
            super().__init__(name="stub")
            self.body = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])

        def call(self, inputs):
            raise NotImplementedError("no forward pass")

    with pytest.raises(ValueError, match=r"has no `call\(\)`.*`body`"):
        check_probe_data(Stub(), (_x(), None), "probe_data")


def test_has_forward_pass_for_models_users_write():
    class WithCall(keras.Model):
        def call(self, inputs):
            return inputs

    assert has_forward_pass(WithCall())
    assert has_forward_pass(keras.Sequential([keras.layers.Dense(2)]))
    inputs = keras.Input((3,))
    assert has_forward_pass(keras.Model(inputs, keras.layers.Dense(2)(inputs)))
    assert not has_forward_pass(GAN())


def _small_model():
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(1, name="out")])


@pytest.mark.parametrize(
    "make_model, make_x, kwargs, error, message",
    [
        (
            lambda: np.zeros((4, 6)),
            _x,
            {},
            TypeError,
            r"`model` must be a Keras model .* Received: model of type ndarray",
        ),
        (
            _x,
            _small_model,
            {},
            TypeError,
            r"model of type ndarray\. The model comes first",
        ),
        (
            lambda: keras.layers.Dense(2),
            _x,
            {},
            TypeError,
            r"Received: model of type Dense\. Wrap the layer",
        ),
        (
            _small_model,
            _x,
            {"loss_fn": "mse"},
            TypeError,
            r"`loss_fn` must be a callable .* Received: loss_fn of type str",
        ),
        (
            _small_model,
            _x,
            {"loss_fn": vae_loss, "loss": "mse"},
            ValueError,
            r"Pass either `loss` or `loss_fn`, not both.*loss='mse'.*vae_loss",
        ),
        (
            _small_model,
            _x,
            {"loss": "no_such_loss"},
            ValueError,
            r"`loss` must be a Keras loss name.*loss='no_such_loss'",
        ),
        (
            _small_model,
            _x,
            {"training": "yes"},
            TypeError,
            r"`training` must be `True` or `False`.*of type str",
        ),
        (
            _small_model,
            _x,
            {"seed": -1},
            ValueError,
            r"`seed` must be a non-negative integer\. Received: seed=-1",
        ),
        (
            _small_model,
            _x,
            {"loss_fn": lambda model, batch: model(batch)[:, 0]},
            ValueError,
            r"`loss_fn` must return a scalar.*shape \(64,\)",
        ),
        (
            _small_model,
            _x,
            {"loss_fn": lambda model, batch: model.encoder(batch)},
            ValueError,
            r"`loss_fn\(model, batch\)` failed on a batch of `x` \(AttributeError",
        ),
    ],
)
def test_bad_arguments_are_named_before_any_work(
    make_model, make_x, kwargs, error, message
):
    model, x = make_model(), make_x()
    with pytest.raises(error, match=message):
        kgrad.diagnose(model, x, **kwargs)


def test_the_monitors_unit_probe_names_the_sub_models():
    from kgrad.capture.variables import track_variables
    from kgrad.diagnosis.unit_probe import UnitProbe

    gan = GAN()
    tracked = track_variables(gan)
    with pytest.raises(ValueError, match=r"'gan' \(GAN\) has no `call\(\)`.*generator"):
        UnitProbe(gan, tracked, _x())
    weights_only = UnitProbe(gan, tracked, None)  # weight movement needs no forward
    assert weights_only.layers == [
        "generator/g_out",
        "discriminator/d_hidden",
        "discriminator/d_out",
    ]


def test_subclassed_sub_models_keep_gradients_and_say_what_is_missing():
    class Body(keras.Model):
        def __init__(self):
            super().__init__(name="body")
            self.first = keras.layers.Dense(4, activation="relu", name="first")
            self.second = keras.layers.Dense(1, name="second")

        def call(self, inputs):
            return self.second(self.first(inputs))

    class Wrapper(keras.Model):
        def __init__(self):
            super().__init__(name="wrapper")
            self.body = Body()

        def train_step(self, data):
            return {}

    model, x = Wrapper(), _x(32)
    model.body(x[:1])

    def loss_fn(model, batch):
        return keras.ops.mean(keras.ops.square(model.body(batch)))

    report = kgrad.diagnose(model, x, loss_fn=loss_fn)
    hidden = model.body.first(x)
    (of_hidden,) = autodiff.gradients(
        lambda h: keras.ops.mean(keras.ops.square(model.body.second(h))), hidden
    )
    expected = autodiff.norm(of_hidden)
    by_layer = report.layers.set_index("layer")
    assert by_layer.loc["body/first", "activation_grad_norm"] == pytest.approx(
        expected, rel=1e-5
    )
    assert report.units.empty
    (note,) = report.notes
    assert "Dead-unit and saturation statistics" in note and "it has none" in note
