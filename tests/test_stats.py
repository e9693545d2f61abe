"""In-graph norms on TensorFlow: overflow-free, non-finite only for non-finite entries,
exact, in `tf.function` graphs with and without XLA, sparse `tf.IndexedSlices` included.

TensorFlow-only: these are TensorFlow's own formulations (`tf.nn.l2_loss`, in
`kgrad/backend/tensorflow.py`); `tests/test_stats_backends.py` holds the same cases for
the `keras.ops` formulation, on every backend.
"""

import numpy as np
import pytest
import tensorflow as tf

from kgrad import stats

SAFE = {
    "safe_norm": stats.safe_norm,
    "safe_norms": lambda value: stats.safe_norms([value])[0],
    "safe_norms_xla": lambda value: stats.safe_norms([value], jit_compile=True)[0],
    "tensor_norm_float64": stats.tensor_norm_float64,
}


def _run(function, value, jit_compile):
    """`function(value)` inside a traced function, as in the train step."""
    traced = tf.function(function, jit_compile=jit_compile, autograph=False)
    return float(traced(tf.constant(value)))


@pytest.fixture(params=[False, True], ids=["graph", "xla"])
def jit_compile(request):
    return request.param


@pytest.mark.parametrize("name", list(SAFE))
def test_a_norm_past_the_float32_square_range_stays_finite(name, jit_compile):
    rng = np.random.default_rng(0)
    # Entries ~1e19-1e20: their squares overflow float32, the norm (~1e21) does not.
    value = (rng.uniform(0.5, 1.0, (128, 128)) * 1e20).astype(np.float32)
    expected = np.linalg.norm(value.astype(np.float64))
    assert 1e21 < expected < 1e22

    got = _run(SAFE[name], value, jit_compile)

    assert np.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-5)
    # The formulation of up to now overflows: that is what this replaces.
    assert np.isinf(_run(lambda v: tf.sqrt(2.0 * stats.half_square(v)), value, False))


@pytest.mark.parametrize("name", list(SAFE))
def test_inf_and_nan_entries_give_inf_and_nan(name, jit_compile):
    value = np.ones((4, 5), np.float32)
    with_inf, with_nan = value.copy(), value.copy()
    with_inf[1, 2], with_nan[3, 0] = -np.inf, np.nan
    assert _run(SAFE[name], with_inf, jit_compile) == np.inf
    assert np.isnan(_run(SAFE[name], with_nan, jit_compile))


@pytest.mark.parametrize("name", list(SAFE))
@pytest.mark.parametrize(
    "scale", [1e-30, 1e-12, 1.0, 3.0e4, 1e18], ids=lambda s: f"scale={s:g}"
)
def test_ordinary_tensors_match_numpy(name, scale, jit_compile):
    rng = np.random.default_rng(1)
    for shape in [(), (7,), (64, 128), (3, 3, 16, 8)]:
        value = (scale * rng.normal(size=shape)).astype(np.float32)
        expected = np.linalg.norm(value.astype(np.float64).reshape(-1))
        got = _run(SAFE[name], value, jit_compile)
        # Entries below ~1e-19 square into float32's subnormals: 1e-30 keeps ~3 digits
        # with the float32 formulations, as the half-square of up to now did.
        tolerance = 1e-3 if scale < 1e-19 and name != "tensor_norm_float64" else 1e-5
        assert got == pytest.approx(expected, rel=tolerance), shape


@pytest.mark.parametrize("name", list(SAFE))
def test_zero_and_empty_tensors_have_norm_zero(name, jit_compile):
    assert _run(SAFE[name], np.zeros((3, 4), np.float32), jit_compile) == 0.0
    assert _run(SAFE[name], np.zeros((0, 4), np.float32), jit_compile) == 0.0


@pytest.mark.parametrize("jit", [False, True])
def test_safe_norms_of_a_step_with_one_overflowing_tensor(jit_compile, jit):
    rng = np.random.default_rng(2)
    values = [
        rng.normal(size=(64, 128)).astype(np.float32),
        np.full(128, 1e20, np.float32),
        1e-18 * np.ones(10, np.float32),
    ]
    expected = [np.linalg.norm(v.astype(np.float64)) for v in values]

    def norms(*tensors):
        return stats.safe_norms(list(tensors), jit_compile=jit)

    traced = tf.function(norms, jit_compile=jit_compile, autograph=False)
    np.testing.assert_allclose(traced(*values).numpy(), expected, rtol=1e-5)
    values[2][3] = np.nan
    got = traced(*values).numpy()
    assert np.isnan(got[2]) and np.isfinite(got[:2]).all()
    assert stats.safe_norms([]).shape == (0,)


def test_a_norm_beyond_float32_is_inf():
    value = np.full(100, 1e38, np.float32)  # norm 1e39 > float32's largest, 3.4e38
    assert _run(stats.safe_norm, value, False) == np.inf


@pytest.mark.parametrize("name", list(SAFE))
def test_sparse_gradients_sum_repeated_rows(name):
    slices = tf.IndexedSlices(
        tf.constant([[1e20, 0.0], [2e20, 0.0], [0.0, 4e20]]),
        tf.constant([0, 0, 5]),
        tf.constant([6, 2]),
    )
    assert float(SAFE[name](slices)) == pytest.approx(5e20, rel=1e-6)


def test_half_square_keeps_its_meaning():
    value = np.array([[3.0, 4.0], [0.0, 12.0]], np.float32)
    assert float(stats.half_square(tf.constant(value))) == pytest.approx(0.5 * 169.0)
    np.testing.assert_allclose(
        stats.norms([tf.constant(value), None, tf.constant([6.0, 8.0])]).numpy(),
        [13.0, np.nan, 10.0],
    )


def test_global_norm_of_large_norms_stays_finite():
    per_tensor = tf.constant([3e20, 4e20, 0.0])
    assert float(stats.global_norm(per_tensor)) == pytest.approx(5e20, rel=1e-6)
    assert float(stats.global_norm(tf.constant([3.0, 4.0]))) == pytest.approx(5.0)
    assert float(stats.global_norm(tf.constant([3.0, np.inf]))) == np.inf
    assert np.isnan(float(stats.global_norm(tf.constant([3.0, np.nan]))))
    assert float(stats.global_norm(tf.zeros((0,)))) == 0.0
