"""Symmetric int8 codes of unit-ball descriptors (numpy only).

Descriptors are divided by max(norm, 1), so every component lies in [-1, 1];
the code q = round(127 x) uses the whole symmetric int8 range with zero exact.
Decoding is q / 127. For 16-d unit-ball vectors the dot product of decoded
codes differs from the float dot product by at most about 16 * (1/254) * 1
(triangle bound); in practice the error is far smaller (rounding errors are
independent and centred), which the tests check.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["INT8_SCALE", "clip_to_unit_ball", "decode_int8", "encode_int8"]

INT8_SCALE = 1.0 / 127.0


def clip_to_unit_ball(d: npt.ArrayLike, axis: int = -1) -> np.ndarray:
    """Divide each vector along `axis` by max(norm, 1) (float32 result).

    Inside the ball the vector is unchanged; outside it is projected onto the
    sphere. The network ends with the same operation; applying it again is a no-op.
    """
    d = np.asarray(d, dtype=np.float32)
    norm = np.sqrt(np.sum(np.square(d, dtype=np.float32), axis=axis, keepdims=True))
    return d / np.maximum(norm, np.float32(1.0))


def encode_int8(d: npt.ArrayLike) -> np.ndarray:
    """int8 code round(127 x), clipped to [-127, 127] (-128 unused: symmetric)."""
    d = np.asarray(d, dtype=np.float32)
    # np.rint rounds half to even: deterministic and unbiased.
    q = np.rint(d * np.float32(127.0))
    return np.clip(q, -127, 127).astype(np.int8)


def decode_int8(q: npt.ArrayLike) -> np.ndarray:
    """float32 value q / 127 of an int8 code."""
    return np.asarray(q, dtype=np.int8).astype(np.float32) * np.float32(INT8_SCALE)
