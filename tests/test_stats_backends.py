"""The in-step norms on every backend, compiled as the backend compiles a train step
(`tf.function` with XLA, `jax.jit`; eager on torch): overflow-free, non-finite only for
non-finite entries, exact against NumPy in float64."""

import keras
import numpy as np
import pytest
from keras import ops

from kgrad import stats

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

BACKEND = keras.backend.backend()


def _compiled(function):
    if BACKEND == "jax":
        import jax

        return jax.jit(function)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(function, jit_compile=True, autograph=False)
    return function


def _norms(values):
    traced = _compiled(lambda *tensors: stats.safe_norms(list(tensors)))
    return np.asarray(ops.convert_to_numpy(traced(*[ops.convert_to_tensor(v) for v in values])))


def _float64_norm(value):
    return np.linalg.norm(np.asarray(value, np.float64).reshape(-1))


def test_norms_past_the_float32_square_range_stay_finite():
    rng = np.random.default_rng(0)
    # Entries ~1e19-1e20: their squares overflow float32, the norm (~1e21) does not.
    big = (rng.uniform(0.5, 1.0, (128, 128)) * 1e20).astype(np.float32)
    ordinary = rng.normal(size=(64, 32)).astype(np.float32)
    tiny = np.full(10, 1e-18, np.float32)

    got = _norms([ordinary, big, tiny])

    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, [_float64_norm(v) for v in (ordinary, big, tiny)],
                               rtol=1e-5)
    single = float(ops.convert_to_numpy(stats.safe_norm(ops.convert_to_tensor(big))))
    assert single == pytest.approx(_float64_norm(big), rel=1e-5)


def test_inf_and_nan_entries_give_inf_and_nan_and_spare_the_others():
    ones = np.ones((4, 5), np.float32)
    with_inf, with_nan = ones.copy(), ones.copy()
    with_inf[1, 2], with_nan[3, 0] = -np.inf, np.nan

    got = _norms([ones, with_inf, with_nan])

    assert got[0] == pytest.approx(np.sqrt(20.0)) and got[1] == np.inf and np.isnan(got[2])
    assert _norms([np.full(100, 1e38, np.float32)])[0] == np.inf  # beyond float32


@pytest.mark.parametrize("scale", [1e-12, 1.0, 3.0e4, 1e18], ids=lambda s: f"scale={s:g}")
def test_ordinary_tensors_match_numpy(scale):
    rng = np.random.default_rng(1)
    values = [(scale * rng.normal(size=shape)).astype(np.float32)
              for shape in [(), (7,), (64, 128), (3, 3, 16, 8)]]
    np.testing.assert_allclose(_norms(values), [_float64_norm(v) for v in values],
                               rtol=1e-5)


def test_zero_tensors_have_norm_zero_and_no_tensors_give_an_empty_vector():
    assert list(_norms([np.zeros((3, 4), np.float32), np.zeros((0, 4), np.float32)])) == [0, 0]
    assert tuple(ops.shape(stats.safe_norms([]))) == (0,)


def test_norms_with_absent_gradients_and_the_global_norm():
    value = np.array([[3.0, 4.0], [0.0, 12.0]], np.float32)
    got = ops.convert_to_numpy(
        stats.norms([ops.convert_to_tensor(value), None, ops.convert_to_tensor([6.0, 8.0])])
    )
    np.testing.assert_allclose(got, [13.0, np.nan, 10.0])

    def global_norm(values):
        return float(ops.convert_to_numpy(stats.global_norm(ops.convert_to_tensor(
            np.asarray(values, np.float32)))))

    assert global_norm([3e20, 4e20, 0.0]) == pytest.approx(5e20, rel=1e-6)
    assert global_norm([3.0, 4.0]) == pytest.approx(5.0)
    assert global_norm([3.0, np.inf]) == np.inf
    assert np.isnan(global_norm([3.0, np.nan]))
    assert global_norm(np.zeros((0,))) == 0.0
