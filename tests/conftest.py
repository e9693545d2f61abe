"""Test configuration shared by every test module.

The suite runs on Keras's TensorFlow backend by default, on JAX with
`KERAS_BACKEND=jax` and on torch with `KERAS_BACKEND=torch`. A test module or test
states the backends it runs on with `@pytest.mark.backends("tensorflow", "jax",
"torch")`; one without the mark is TensorFlow-only for now (its feature is not ported
yet, see `kgrad.backend.SUPPORT`) and is skipped on the other backends, saying so.

Under TensorFlow, two logical CPU devices are configured before TensorFlow
initialises, so that the `MirroredStrategy` tests can run on a machine without
accelerators.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()

if BACKEND == "tensorflow":
    import tensorflow as tf  # noqa: E402

    _cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
        )
    except RuntimeError:  # already initialised by another plugin
        pass


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "backends(*names, reason=None): the Keras backends the test runs on "
        "(unmarked: tensorflow only)",
    )
    config.addinivalue_line(
        "markers",
        "slow_on(*names, reason): left out of the default run on those backends, to "
        "keep CI within its budget (KGRAD_TEST_FULL=1 runs it)",
    )


def pytest_collection_modifyitems(config, items):
    full = os.environ.get("KGRAD_TEST_FULL") == "1"
    for item in items:
        slow = item.get_closest_marker("slow_on")
        if slow and BACKEND in slow.args and not full:
            item.add_marker(pytest.mark.skip(
                reason=f"slow on {BACKEND} ({slow.kwargs.get('reason', '')}): "
                "KGRAD_TEST_FULL=1 runs it"
            ))
    if os.environ.get("KGRAD_TEST_EVERY_BACKEND") == "1":
        return  # to find what works on a backend before its tests are marked
    for item in items:
        marker = item.get_closest_marker("backends")
        backends = marker.args if marker else ("tensorflow",)
        if BACKEND not in backends:
            reason = (
                f"runs on {', '.join(backends)}; this run uses the {BACKEND} backend"
                if marker
                else f"TensorFlow-only: not ported to the {BACKEND} backend yet"
            )
            if marker and marker.kwargs.get("reason"):
                reason += f" ({marker.kwargs['reason']})"
            item.add_marker(pytest.mark.skip(reason=reason))


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

    def make(replicas: int):
        if replicas == 1:
            return tf.distribute.get_strategy()
        strategy = tf.distribute.MirroredStrategy(
            ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
        assert strategy.num_replicas_in_sync == replicas
        return strategy

    return make
