"""Tests of the symmetric int8 descriptor codes (numpy only)."""

from __future__ import annotations

import numpy as np

from disa.model.codes import INT8_SCALE, clip_to_unit_ball, decode_int8, encode_int8


def _unit_ball_vectors(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(n, 16)).astype(np.float32)
    # Norms spread over (0, 1]: inside the ball and on the sphere.
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return d * rng.uniform(0.05, 1.0, size=(n, 1)).astype(np.float32)


def test_clip_to_unit_ball() -> None:
    d = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], dtype=np.float32)
    out = clip_to_unit_ball(d, axis=-1)
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]], rtol=1e-6)
    assert out.dtype == np.float32
    # Channels-first arrays: the axis argument picks the vector axis.
    np.testing.assert_allclose(clip_to_unit_ball(d.T, axis=0), out.T, rtol=1e-6)


def test_encode_is_symmetric_round_and_clipped() -> None:
    x = np.array([-1.5, -1.0, -0.5 / 127, 0.0, 0.4 / 127, 0.6 / 127, 1.0, 2.0], dtype=np.float32)
    q = encode_int8(x)
    assert q.dtype == np.int8
    assert q.tolist() == [-127, -127, 0, 0, 0, 1, 127, 127]
    assert INT8_SCALE == 1 / 127
    np.testing.assert_array_equal(encode_int8(-x), -encode_int8(x))


def test_round_trip_error_is_half_a_step() -> None:
    d = _unit_ball_vectors(10_000)
    back = decode_int8(encode_int8(d))
    assert back.dtype == np.float32
    assert np.abs(back - d).max() <= 0.5 / 127 + 1e-7


def test_dot_products_of_codes_match_float_within_0_01() -> None:
    a, b = _unit_ball_vectors(20_000, seed=1), _unit_ball_vectors(20_000, seed=2)
    exact = np.einsum("nc,nc->n", a, b)
    coded = np.einsum("nc,nc->n", decode_int8(encode_int8(a)), decode_int8(encode_int8(b)))
    error = np.abs(coded - exact)
    # Rounding errors are uniform in +-1/254 per component and independent, so
    # the error of a dot product of unit vectors has a standard deviation of
    # at most sqrt(2) / (127 sqrt(12)) = 0.0032: the bulk stays far inside
    # 0.01, and only a ~4-sigma tail of 20k pairs may touch it. The hard
    # worst case is (|a|_1 + |b|_1) / 254 <= 2 * 4 / 254.
    assert np.sqrt(np.mean(error**2)) < 0.003
    assert np.quantile(error, 0.999) < 0.01
    assert error.max() < 8 / 254
    # Integer dot products scaled once give the same numbers (what int kernels do).
    qa, qb = encode_int8(a).astype(np.int32), encode_int8(b).astype(np.int32)
    np.testing.assert_allclose((qa * qb).sum(1) * INT8_SCALE**2, coded, atol=1e-6)


def test_codes_are_reproducible() -> None:
    d = _unit_ball_vectors(1000, seed=3)
    np.testing.assert_array_equal(encode_int8(d), encode_int8(d.copy()))
    np.testing.assert_array_equal(decode_int8(encode_int8(d)), decode_int8(encode_int8(d)))
