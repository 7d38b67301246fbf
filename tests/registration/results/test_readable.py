"""The result in words: verdict evidence and the transform in human terms (readable.py)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from disa.registration.results.readable import describe_transform, verdict_evidence, verdict_line
from disa.registration.transform.parametric import rotation_matrix


def _matrix(linear: np.ndarray, centre: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """4x4 of T(x) = linear (x - c) + c + t."""
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = centre + translation - linear @ centre
    return m


def test_a_rigid_transform_reads_as_itks_euler_angles_about_the_stated_centre() -> None:
    """The sample's truth: an ITK Euler3D (ZYX) of 12, -8, 15 degrees about the fixed centre
    and (25, -18, 30) mm comes back as exactly those numbers."""
    centre = np.array([0.5, 19.0, 21.75])
    truth = sitk.Euler3DTransform()
    truth.SetComputeZYX(True)
    truth.SetCenter(tuple(centre))
    truth.SetRotation(*np.deg2rad([12.0, -8.0, 15.0]))
    truth.SetTranslation((25.0, -18.0, 30.0))
    linear = np.asarray(truth.GetMatrix()).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = np.asarray(truth.TransformPoint((0.0, 0.0, 0.0)))
    out = describe_transform(matrix, centre, "rigid")
    np.testing.assert_allclose(out["rotation_deg"], [12.0, -8.0, 15.0], atol=1e-3)
    np.testing.assert_allclose(out["translation_mm"], [25.0, -18.0, 30.0], atol=1e-3)
    np.testing.assert_allclose(out["centre_mm"], centre)
    assert out["translation_length_mm"] == pytest.approx(np.linalg.norm([25, -18, 30]), abs=1e-3)
    assert "fixed -> moving" in out["direction"] and "Rz Ry Rx" in out["rotation_convention"]
    assert "scale" not in out
    # the angle of the one rotation: 0 for the identity, 90 for a quarter turn
    assert describe_transform(np.eye(4), centre, "rigid")["rotation_angle_deg"] == 0.0
    quarter = _matrix(rotation_matrix(np.deg2rad([0.0, 0.0, 90.0])), centre, np.zeros(3))
    assert describe_transform(quarter, centre, "rigid")["rotation_angle_deg"] == pytest.approx(90)


def test_an_affine_is_decomposed_into_rotation_scale_and_shear() -> None:
    rotation = rotation_matrix(np.deg2rad([5.0, -3.0, 20.0]))
    upper = np.array([[1.1, 0.1 * 1.1, -0.05 * 1.1], [0.0, 0.9, 0.2 * 0.9], [0.0, 0.0, 1.05]])
    centre = np.array([10.0, -4.0, 7.0])
    out = describe_transform(_matrix(rotation @ upper, centre, np.array([1.0, 2.0, 3.0])),
                             centre, "affine")
    np.testing.assert_allclose(out["rotation_deg"], [5.0, -3.0, 20.0], atol=1e-3)
    np.testing.assert_allclose(out["scale"], [1.1, 0.9, 1.05], atol=1e-4)
    np.testing.assert_allclose(out["shear"], [0.1, -0.05, 0.2], atol=1e-4)
    np.testing.assert_allclose(out["translation_mm"], [1.0, 2.0, 3.0], atol=1e-4)
    assert out["reflection"] is False
    mirrored = describe_transform(_matrix(rotation @ np.diag([-1.0, 1.0, 1.0]), centre,
                                          np.zeros(3)), centre, "affine")
    assert mirrored["reflection"] is True and mirrored["scale"][0] == pytest.approx(-1.0)
    # a deformable run's affine part is decomposed too (its mode is not "affine")
    assert "scale" in describe_transform(_matrix(rotation @ upper, centre, np.zeros(3)),
                                         centre, "deformable")


def test_the_verdict_line_carries_the_evidence_every_view_shows() -> None:
    summary = {"verdict": "likely", "agreeing_solutions": 8, "refined_solutions": 8,
               "match_quality": 0.9064, "overlap": 0.998, "ambiguous": False}
    evidence = verdict_evidence(summary)
    assert evidence == ("8 of 8 refined solutions agree, match quality 0.91 (0 chance, "
                        "1 perfect), overlap 100%")
    assert verdict_line(summary) == f"LIKELY: {evidence}"
    assert "another pose scores almost as well" in verdict_evidence(
        {**summary, "ambiguous": True})
    assert verdict_line({**summary, "verdict_evidence": "given"}) == "LIKELY: given"
    assert verdict_line({}) == ""
