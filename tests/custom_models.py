"""Models written the way users write them, shared by the warm-up and early-stopping
tests: a subclassed model built by its first batch, and a small GAN in the keras-io
pattern.

The GAN's `compile(d_optimizer=..., g_optimizer=...)` calls `super().compile()` (which
leaves an unused default `model.optimizer`, RMSprop), and `train_step` calls
`self.g_optimizer.apply_gradients(...)`, then `self.d_optimizer.apply_gradients(...)`.
There is no `call()`. The step is TensorFlow's (`tf.GradientTape`), like keras-io's.
"""

import keras
import tensorflow as tf

FEATURES, LATENT = 3, 2


class TwoOptimizerGAN(keras.Model):
    """The generator steps first, then the discriminator, on the same batch."""

    def __init__(self, discriminator=None, **kwargs):
        super().__init__(**kwargs)
        self.generator = keras.Sequential(
            [keras.Input((LATENT,)), keras.layers.Dense(FEATURES, name="g_out")],
            name="generator",
        )
        self.discriminator = discriminator or keras.Sequential(
            [keras.Input((FEATURES,)), keras.layers.Dense(1, name="d_out")],
            name="discriminator",
        )

    def compile(self, d_optimizer, g_optimizer):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer

    def train_step(self, real):
        # Deterministic "noise", never zero, so that a test controls what the
        # discriminator sees through the real rows alone.
        latent = 1.0 + keras.ops.abs(real[:, :LATENT])
        with tf.GradientTape() as tape:
            fake_score = self.discriminator(self.generator(latent))
            g_loss = keras.ops.mean(keras.ops.softplus(-fake_score))
        g_vars = self.generator.trainable_variables
        self.g_optimizer.apply_gradients(zip(tape.gradient(g_loss, g_vars), g_vars))
        with tf.GradientTape() as tape:
            real_score = self.discriminator(real)
            fake_score = self.discriminator(self.generator(latent))
            d_loss = keras.ops.mean(keras.ops.softplus(-real_score)) + keras.ops.mean(
                keras.ops.softplus(fake_score)
            )
        d_vars = self.discriminator.trainable_variables
        self.d_optimizer.apply_gradients(zip(tape.gradient(d_loss, d_vars), d_vars))
        return {"d_loss": d_loss, "g_loss": g_loss}


def make_gan(d_rate=0.02, g_rate=0.01, discriminator=None):
    gan = TwoOptimizerGAN(discriminator=discriminator, name="gan")
    gan.compile(
        d_optimizer=keras.optimizers.SGD(d_rate), g_optimizer=keras.optimizers.SGD(g_rate)
    )
    return gan


class Regressor(keras.Model):
    """A subclassed model: Keras builds it (and its optimizer) in the first step."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(4)
        self.out = keras.layers.Dense(1)

    def call(self, inputs):
        return self.out(self.hidden(inputs))
