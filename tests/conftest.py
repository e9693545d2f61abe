"""Test configuration shared by every test module.

Two logical CPU devices are configured before TensorFlow initialises, so that the
`MirroredStrategy` tests can run on a machine without accelerators.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
except RuntimeError:  # already initialised by another plugin
    pass

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    # free_memory=False skips a full garbage collection (~0.3 s a test once TF is loaded).
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(0)
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def strategy_of():
    """`strategy_of(replicas)`: the default strategy for 1, else a `MirroredStrategy`
    over the two logical CPUs.

    Not the default collective all-reduce: TensorFlow reuses collective keys across
    MirroredStrategy instances in one process, so a second strategy whose model has
    another size fails (plain Keras too) after any other mirrored test.
    """

    def make(replicas: int) -> tf.distribute.Strategy:
        if replicas == 1:
            return tf.distribute.get_strategy()
        strategy = tf.distribute.MirroredStrategy(
            ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
        assert strategy.num_replicas_in_sync == replicas
        return strategy

    return make
