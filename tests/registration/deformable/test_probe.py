"""Ultrasound probe compression: the model, its gradient, the probe heuristic, recovery."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from disa.core.errors import InputError
from disa.core.grid import Grid
from disa.registration.deformable.probe import ProbeGeometry, ProbeModel, probe_from_image
from disa.registration.options import RegistrationOptions
from disa.registration.pipeline import register
from disa.registration.similarity.descriptor_map import DescriptorMap
from disa.registration.similarity.objective import PointObjective
from disa.training import phantom as ph

ORIGIN = np.array([-45.0, 0.0, 0.0])  # probe face on the body surface (LPS mm)
AXIS = np.array([1.0, 0.0, 0.0])  # into the body
TRUE_AMPLITUDE, TRUE_DECAY = 8.0, 30.0


def _model(ultrasound: str) -> ProbeModel:
    return ProbeModel(np.array([1.0, -2.0, 3.0]), ProbeGeometry(ORIGIN, AXIS), ultrasound)


@pytest.mark.parametrize("ultrasound", ["moving", "fixed", "moving-matched", "fixed-matched"])
def test_probe_gradient_matches_finite_differences(ultrasound: str) -> None:
    rng = np.random.default_rng(0)
    grid = Grid((18, 20, 22), np.array([-40.0, -45.0, -40.0]), np.full(3, 4.0), np.eye(3))
    data = ndimage.gaussian_filter(rng.normal(size=(*grid.shape, 12)), (1.5, 1.5, 1.5, 0))
    maps = DescriptorMap(np.ascontiguousarray(data.astype(np.float32)), grid)
    model = _model(ultrasound.split("-")[0])
    if ultrasound.endswith("matched"):  # the moving map was resampled with other parameters
        model = model.referenced(np.array([0.02, -0.01, 0.03, 1.0, -2.0, 0.5, 5.0, 35.0]))
    objective = PointObjective(maps, maps, np.ones(grid.shape, np.float32), model, kind="ssd",
                               n_points=1500)
    theta = np.array([0.03, -0.02, 0.04, 1.5, -2.0, 1.0, 6.0, 30.0])
    _, grad = objective.cost_and_grad(theta[None, :])
    scales = model.scales(40.0)
    for k in range(8):
        step = np.zeros(8)
        step[k] = 1e-4 * scales[k]
        plus, minus = objective.cost(theta + step)[0], objective.cost(theta - step)[0]
        numeric = (plus - minus) / (2 * step[k])
        assert numeric == pytest.approx(grad[0, k], rel=3e-3, abs=1e-6 / scales[k])


@pytest.mark.parametrize("ultrasound", ["moving", "fixed"])
def test_matched_model_composes_with_the_inverse_deformation(ultrasound: str) -> None:
    theta = np.array([0.05, -0.03, 0.02, 2.0, -1.0, 3.0, 7.0, 28.0])
    model = _model(ultrasound)
    points = ORIGIN + np.linspace(-5.0, 90.0, 40)[:, None] * AXIS + np.array([0.0, 3.0, -2.0])
    referenced = model.referenced(theta)
    # With the reference equal to theta, the mapping is the rigid part alone.
    np.testing.assert_allclose(referenced.apply(theta, points),
                               ph._apply_affine(model.to_sitk(theta), points), atol=1e-8)
    # The resampled map at the referenced model's point shows what the plain model maps to.
    other = np.array([0.04, -0.02, 0.03, 1.0, -2.0, 2.0, 4.0, 40.0])
    warp = model.regrid_transform(theta, Grid((60, 60, 60), np.full(3, -80.0), np.full(3, 3.0),
                                              np.eye(3)),
                                  Grid((60, 60, 60), np.full(3, -80.0), np.full(3, 3.0),
                                       np.eye(3)))
    inside = referenced.apply(other, points)
    through = np.array([warp.TransformPoint(tuple(p)) for p in inside])
    # (linear interpolation of the sampled field: ~0.1 mm at the profile's kink at the face)
    np.testing.assert_allclose(through, model.apply(other, points), atol=0.2)


def test_compression_pushes_tissue_along_the_axis_and_stays_invertible() -> None:
    model = _model("moving")
    theta = np.concatenate([np.zeros(6), [8.0, 25.0]])
    depths = np.linspace(-10.0, 120.0, 300)
    points = ORIGIN + depths[:, None] * AXIS
    moved = model.apply(theta, points)
    shift = (moved - points) @ AXIS
    assert shift[depths <= 0] == pytest.approx(8.0)
    assert shift[np.argmin(np.abs(depths - 25.0))] == pytest.approx(8.0 / np.e, rel=0.02)
    assert np.all(np.diff(moved @ AXIS) > 0)  # monotonic along the axis: no fold
    # Amplitudes beyond 0.8 L are clamped, so the mapping stays monotonic.
    extreme = model.apply(np.concatenate([np.zeros(6), [60.0, 25.0]]), points)
    assert np.all(np.diff(extreme @ AXIS) > 0)


def _fan(shape_zyx: tuple[int, int, int], narrow_at_start: bool) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape_zyx), indexing="ij")
    depth = y if narrow_at_start else shape_zyx[1] - 1 - y
    radius = 3.0 + 0.45 * depth
    inside = (x - 30) ** 2 + (z - 20) ** 2 <= radius**2
    return np.where(inside, 1.0 + (x + y + z) % 7, 0.0).astype(np.float32)


@pytest.mark.parametrize("narrow_at_start", [True, False])
def test_probe_is_found_at_the_narrow_end_of_the_sector(narrow_at_start: bool) -> None:
    direction = np.asarray(ph.rigid_truth((0.0, 0.0, 30.0), (0.0, 0.0, 0.0)).GetMatrix())
    grid = Grid((40, 50, 60), np.array([10.0, -20.0, 5.0]), np.array([0.5, 0.6, 0.7]),
                direction.reshape(3, 3))
    image = grid.image_like(_fan((40, 50, 60), narrow_at_start))
    probe = probe_from_image(image)
    face_y = 0 if narrow_at_start else 49
    expected_origin = grid.to_physical(np.array([[30.0, face_y, 20.0]]))[0]
    expected_axis = grid.direction[:, 1] * (1 if narrow_at_start else -1)
    np.testing.assert_allclose(probe.origin, expected_origin, atol=1.0)
    np.testing.assert_allclose(probe.axis, expected_axis, atol=1e-9)
    with pytest.raises(InputError):
        probe_from_image(grid.image_like(np.ones((40, 50, 60), np.float32)))


def _invert_along_axis(points: np.ndarray, forward) -> np.ndarray:
    """Points p with p + s(depth(p)) AXIS = q, for a monotonic shift s (Newton on depth)."""
    target = (points - ORIGIN) @ AXIS
    depth = target.copy()
    for _ in range(50):
        f, df = forward(depth)
        depth -= (depth + f - target) / (1.0 + df)
    return points + (depth - target)[:, None] * AXIS


def _compression(sign: float):
    def forward(depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        e = np.exp(-np.maximum(depth, 0.0) / TRUE_DECAY)
        return sign * TRUE_AMPLITUDE * e, np.where(depth > 0, -sign * TRUE_AMPLITUDE * e
                                                   / TRUE_DECAY, 0.0)
    return forward


@pytest.mark.parametrize("ultrasound", ["moving", "fixed"])
def test_rigid_plus_probe_recovers_a_known_compression(ultrasound: str) -> None:
    """Two contrasts of a phantom, one compressed by a probe on the body surface: the joint
    search recovers the pose and the compression (amplitude +-1 mm, decay length +-20 %)."""
    rigid = ph.rigid_truth((3.0, -2.0, 4.0), (4.0, -3.0, 2.0))
    truth_theta = np.concatenate([np.deg2rad([3.0, -2.0, 4.0]), [4.0, -3.0, 2.0],
                                  [TRUE_AMPLITUDE, TRUE_DECAY]])
    model = ProbeModel(np.zeros(3), ProbeGeometry(ORIGIN, AXIS), ultrasound)
    inverse_rigid = rigid.GetInverse()

    def inverse(points: np.ndarray) -> np.ndarray:  # T^-1: moving points -> fixed points
        if ultrasound == "moving":  # T = C(R(x)): undo the compression, then the pose
            return ph._apply_affine(inverse_rigid, _invert_along_axis(points, _compression(1)))
        # T = R(x - u(x)): undo the pose, then invert the decompression x -> x - u(x)
        return _invert_along_axis(ph._apply_affine(inverse_rigid, points), _compression(-1))

    grid = ph.make_grid((56, 56, 56), (2.0, 2.0, 2.0))
    pair = ph.make_pair(rigid, fixed_grid=grid, moving_grid=grid, seed=2, inverse=inverse,
                        anatomy=ph.default_anatomy(scale_mm=45.0))
    # Sanity of the construction: the model's truth maps fixed points where the pair says.
    probe_points = grid.to_physical(np.array([[27.0, 10.0, 27.0], [20.0, 30.0, 35.0]]))
    np.testing.assert_allclose(inverse(model.apply(truth_theta, probe_points)), probe_points,
                               atol=1e-6)
    options = RegistrationOptions(similarity="mind", mode="rigid+probe", init="geometry",
                                  starts=60, rotation_range=10, translation_range=15,
                                  ultrasound=ultrasound, probe_origin=tuple(ORIGIN),
                                  probe_axis=tuple(AXIS))
    result = register(pair.fixed, pair.moving, options)
    assert result.mode == "rigid+probe" and len(result.theta) == 8
    assert abs(result.probe["amplitude_mm"] - TRUE_AMPLITUDE) < 1.0
    assert abs(result.probe["decay_length_mm"] - TRUE_DECAY) < 0.2 * TRUE_DECAY
    check = ph.grid_points(ph.make_grid((7, 7, 7), (8.0, 8.0, 8.0)))
    error = np.linalg.norm(model.apply(result.theta, check) - model.apply(truth_theta, check),
                           axis=1)
    assert error.mean() < 1.0
    # The written mapping (transform.h5 content) is the model's mapping.
    full = result.field_transform
    mapped = np.array([full.TransformPoint(tuple(p)) for p in check])
    np.testing.assert_allclose(mapped, model.apply(result.theta, check), atol=0.1)
    assert result.deformation["negative_jacobian_fraction"] == 0.0
    assert isinstance(result.transform, sitk.Euler3DTransform)


def test_cli_passes_probe_options() -> None:
    from disa.cli import _options_from_args, build_parser

    args = build_parser().parse_args([
        "register", "f.nii.gz", "m.nii.gz", "-o", "out", "--mode", "rigid+probe",
        "--ultrasound", "fixed", "--probe-origin", "1", "2.5", "-3", "--probe-axis", "0", "0",
        "-2"])
    options = _options_from_args(args)
    assert options.mode == "rigid+probe" and options.ultrasound == "fixed"
    assert options.probe_origin == (1.0, 2.5, -3.0) and options.probe_axis == (0.0, 0.0, -2.0)


def test_options_override_the_heuristic_one_by_one() -> None:
    from disa.registration.deformable.probe import resolve_probe

    grid = Grid((40, 50, 60), np.zeros(3), np.full(3, 0.5), np.eye(3))
    image = grid.image_like(_fan((40, 50, 60), True))
    both = resolve_probe((1.0, 2.0, 3.0), (0.0, 0.0, 2.0), image)
    assert both.source == "options" and np.allclose(both.axis, [0, 0, 1])
    origin_only = resolve_probe((1.0, 2.0, 3.0), None, image)
    assert origin_only.source == "options+image"
    np.testing.assert_allclose(origin_only.origin, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(origin_only.axis, [0.0, 1.0, 0.0])


def test_probe_geometry_is_checked_against_the_ultrasound_image() -> None:
    """An origin far outside the ultrasound image, an axis pointing out of it or a huge axis
    vector used to run silently (a meaningless or rigid fit); each is now a one-line error."""
    from disa.registration.deformable.probe import resolve_probe

    direction = np.asarray(ph.rigid_truth((0.0, 0.0, 30.0), (0.0, 0.0, 0.0)).GetMatrix())
    grid = Grid((20, 25, 30), np.array([10.0, -20.0, 5.0]), np.array([1.0, 1.2, 1.5]),
                direction.reshape(3, 3))
    image = grid.image_like(np.zeros(grid.shape, np.float32))
    face = grid.to_physical(np.array([[15.0, 0.0, 10.0]]))[0]
    into = grid.direction[:, 1]
    ok = resolve_probe(tuple(face), tuple(into), image)
    np.testing.assert_allclose(ok.axis, into, atol=1e-12)
    # Up to ORIGIN_MARGIN_MM above the first row (the skin line of a cropped image) is fine.
    resolve_probe(tuple(face - 8.0 * into), tuple(into), image)
    huge = resolve_probe(tuple(face), tuple(1e300 * into), image)  # |axis| overflows
    np.testing.assert_allclose(huge.axis, into, atol=1e-12)
    for origin, axis, words in [
            (face + np.array([1000.0, 0.0, 0.0]), into, "outside the ultrasound image"),
            (face - 30.0 * into, into, "outside the ultrasound image"),
            (face, -into, "must point from the probe into the body"),
            (face, np.zeros(3), "non-zero vector"),
            (face, np.array([np.nan, 0.0, 1.0]), "finite"),
            (np.array([np.inf, 0.0, 0.0]), into, "finite")]:
        with pytest.raises(InputError, match=words) as error:
            resolve_probe(tuple(origin), tuple(axis), image)
        assert "\n" not in str(error.value)


def test_cli_reports_an_origin_outside_the_image_on_one_line(tmp_path, capsys) -> None:
    from disa.cli import EXIT_INPUT, main
    from disa.core.io.images import write_image

    pair = ph.make_pair(ph.rigid_truth((0.0, 0.0, 0.0), (1.0, 0.0, 0.0)),
                        fixed_grid=ph.make_grid((24, 24, 24), (2.0, 2.0, 2.0)))
    write_image(pair.fixed, tmp_path / "f.nii.gz")
    write_image(pair.moving, tmp_path / "m.nii.gz")
    code = main(["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-o",
                 str(tmp_path / "out"), "--mode", "rigid+probe", "--similarity", "mind",
                 "--probe-origin", "1000", "0", "0", "--probe-axis", "0", "1", "0", "--quiet"])
    assert code == EXIT_INPUT
    err = capsys.readouterr().err.strip()
    assert "probe_origin" in err and "outside the ultrasound image" in err
    assert len(err.splitlines()) == 1
