"""A result in words: the verdict's evidence and the transform in human terms.

One formatter for every place a result is shown (result.json, the job JSON,
`disa register`'s summary line, qa.png's title, the web page), so they all say
the same thing with the same numbers. The verdict itself is decided in
verdict.py; nothing here changes it.

The transform T maps a point x of the fixed image to the corresponding point
T(x) = A x + b of the moving image (LPS mm, the convention of transform.tfm).
It is described about a stated centre c (the fixed image's centre):

    T(x) = R S (x - c) + c + t

with R a rotation (Euler angles in degrees, R = Rz Ry Rx: about the LPS x
axis first, then y, then z, fixed axes; ITK's Euler3DTransform with
ComputeZYX), S an upper-triangular matrix holding the scale factors on its
diagonal and the shears above it (S = I for a rigid transform), and t = T(c) -
c the translation of the centre in mm. A has det < 0 (a mirror) only for an
affine result; then `reflection` is true and R S holds it in S's first scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from disa.registration.transform.parametric import euler_from_matrix

#: Colours of the verdicts (RGB): the web page, qa.png's title bar.
VERDICT_COLOURS = {"likely": (21, 128, 61), "uncertain": (180, 83, 9),
                   "failed": (185, 28, 28)}

EULER_CONVENTION = ("R = Rz Ry Rx: rotations about the LPS x, y and z axes (fixed axes, "
                    "x first), as ITK's Euler3DTransform with ComputeZYX")
DIRECTION = ("fixed -> moving: a point x of the fixed image corresponds to the point "
             "T(x) of the moving image (LPS mm)")


def verdict_evidence(summary: Mapping[str, Any]) -> str:
    """The evidence behind the verdict, in one line with the numbers every view shows.

    `summary` holds result.json's fields (agreeing_solutions, refined_solutions,
    match_quality, overlap, ambiguous); missing ones are left out.
    """
    parts = []
    agreeing, refined = summary.get("agreeing_solutions"), summary.get("refined_solutions")
    if isinstance(refined, int) and isinstance(agreeing, int) and refined > 1:
        parts.append(f"{agreeing} of {refined} refined solutions agree")
    elif refined == 1:
        parts.append("a single refined solution")
    quality = summary.get("match_quality")
    if isinstance(quality, (int, float)):
        parts.append(f"match quality {quality:.2f} (0 chance, 1 perfect)")
    overlap = summary.get("overlap")
    if isinstance(overlap, (int, float)):
        parts.append(f"overlap {overlap:.0%}")
    if summary.get("ambiguous"):
        parts.append("another pose scores almost as well")
    return ", ".join(parts)


def verdict_line(summary: Mapping[str, Any]) -> str:
    """`VERDICT: evidence` (the verdict in capitals), or '' for a result without a verdict."""
    verdict = summary.get("verdict")
    if not verdict:
        return ""
    evidence = summary.get("verdict_evidence") or verdict_evidence(summary)
    return f"{str(verdict).upper()}: {evidence}" if evidence else str(verdict).upper()


def describe_transform(matrix: Sequence[Sequence[float]] | np.ndarray,
                       centre: Sequence[float] | np.ndarray, mode: str) -> dict[str, Any]:
    """The 4x4 fixed -> moving matrix in human terms (module docstring), JSON-ready.

    Keys: direction, centre_mm, rotation_deg (x, y, z), rotation_convention,
    rotation_angle_deg (the angle of the single rotation R), translation_mm
    (T(c) - c) and its length translation_length_mm; for affine results also
    scale (x, y, z), shear (xy, xz, yz: S's off-diagonal terms over its
    diagonal) and reflection; so do results of other modes whose linear part is not a
    rotation (a deformable run after an affine stage).
    """
    m = np.asarray(matrix, dtype=np.float64).reshape(4, 4)
    c = np.asarray(centre, dtype=np.float64).reshape(3)
    a = m[:3, :3]
    translation = a @ c + m[:3, 3] - c
    rotation, upper = _rotation_and_upper(a)
    angles = np.degrees(euler_from_matrix(rotation))
    cos_angle = np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0)
    out: dict[str, Any] = {
        "direction": DIRECTION,
        "centre_mm": _rounded(c, 3),
        "centre": "the fixed image's centre",
        "rotation_deg": _rounded(angles, 4),
        "rotation_convention": EULER_CONVENTION,
        "rotation_angle_deg": round(float(np.degrees(np.arccos(cos_angle))), 4),
        "translation_mm": _rounded(translation, 4),
        "translation_length_mm": round(float(np.linalg.norm(translation)), 4),
    }
    if mode == "affine" or not np.allclose(a.T @ a, np.eye(3), atol=1e-6):
        scale = np.diag(upper)
        out["scale"] = _rounded(scale, 5)
        out["shear"] = _rounded([upper[0, 1] / scale[0], upper[0, 2] / scale[0],
                                 upper[1, 2] / scale[1]], 5)
        out["reflection"] = bool(np.linalg.det(a) < 0)
    return out


def _rotation_and_upper(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A = R U with R a rotation and U upper triangular with a positive diagonal (except
    a mirror's: U[0, 0] < 0 when det A < 0), by QR."""
    q, u = np.linalg.qr(a)
    signs = np.sign(np.diag(u))
    signs[signs == 0] = 1.0
    q, u = q * signs, signs[:, None] * u  # Q D, D U with D = diag(signs): U's diagonal > 0
    if np.linalg.det(q) < 0:  # a mirror: keep R a rotation, put the sign into the x scale
        flip = np.diag([-1.0, 1.0, 1.0])
        q, u = q @ flip, flip @ u
    return q, u


def _rounded(values: Sequence[float] | np.ndarray, digits: int) -> list[float]:
    return [round(float(v), digits) + 0.0 for v in np.asarray(values).ravel()]
