"""kgrad under `keras.distribution.DataParallel` on JAX: the norms of the global batch.

Two host devices need `XLA_FLAGS=--xla_force_host_platform_device_count=2` before JAX
starts, so the runs happen in a fresh process: the same model and data are trained once
on one device and once data-parallel over two, and the recorded norms must agree (the
jitted step's gradients are those of the whole batch whatever the sharding).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.backends("jax", reason="keras.distribution is JAX's")

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, keras, numpy as np
    import kgrad

    def run(distribution):
        keras.backend.clear_session()  # resets the distribution too: set it after
        keras.distribution.set_distribution(distribution)
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 8)).astype("float32")
        y = rng.normal(size=(64, 1)).astype("float32")
        model = keras.Sequential([
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(1),
        ])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        logger = kgrad.GradientNormLogger()
        stopper = kgrad.EarlyStopping(monitor="loss", patience=5)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                  callbacks=[logger, stopper])
        kernel = model.trainable_variables[0].value
        return {
            "norms": logger.records.grad_norms.tolist(),
            "global": logger.records.global_norms.tolist(),
            "kernel_devices": len(kernel.sharding.device_set),
            "weights": [float(np.sum(np.abs(w))) for w in model.get_weights()],
            "variables": len(model.optimizer.variables),
        }

    single = run(None)
    devices = keras.distribution.list_devices()
    parallel = run(keras.distribution.DataParallel(devices=devices))
    json.dump({"devices": len(devices), "single": single, "parallel": parallel},
              sys.stdout)
    """
)


def test_data_parallel_norms_equal_the_single_device_run():
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    single, parallel = result["single"], result["parallel"]
    assert result["devices"] == 2
    assert parallel["kernel_devices"] == 2  # the weights live on both devices
    assert single["kernel_devices"] == 1
    norms = np.asarray(parallel["norms"])
    assert norms.shape == (8, 4) and np.all(np.isfinite(norms)) and np.all(norms > 0)
    np.testing.assert_allclose(norms, single["norms"], rtol=1e-5)
    np.testing.assert_allclose(parallel["global"], single["global"], rtol=1e-5)
    # The same training happened, and kgrad's state left the optimizer as it was.
    np.testing.assert_allclose(parallel["weights"], single["weights"], rtol=1e-5)
    assert parallel["variables"] == single["variables"]
