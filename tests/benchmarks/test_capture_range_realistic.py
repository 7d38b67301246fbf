"""The realistic capture-range family: own grids, cropped fields of view, the truth."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from .scripts import load_benchmark

cr = load_benchmark("capture_range")
rc = cr.realistic_cases


def _phantom(shape: tuple[int, int, int] = (44, 48, 52)):
    from disa.training import sources

    return sources.make_phantom(np.random.default_rng(5), shape)


def _same_modality(volume, setting: str, rng: np.random.Generator, *args) -> np.ndarray:
    """Both images from the native intensities: the truth check compares like with like."""
    return volume.native.astype(np.float32)


def _fixed_points_index(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    return np.array([image.TransformPhysicalPointToContinuousIndex(tuple(map(float, p)))
                     for p in points])


def _build(kind: str, rng: np.random.Generator, volume=None):
    from disa.training.synthesis import simulate_ultrasound

    volume = volume if volume is not None else _phantom()
    spec = rc.PairSpec("phantom", "ct", kind)
    built = rc.build_pair(volume, spec, rng, _same_modality, simulate_ultrasound)
    center = np.asarray(built.fixed.TransformContinuousIndexToPhysicalPoint(
        [(s - 1) / 2.0 for s in built.fixed.GetSize()]))
    truth = cr.draw_pose(rng, built.overlap, center, (25.0, 50.0), 40.0)
    return volume, built, truth, rc.move_header(built.moving, truth)


@pytest.mark.parametrize("kind", ["mr-crop", "t2-slab"])
def test_resampling_with_the_truth_brings_the_moving_crop_onto_the_fixed_image(kind: str) -> None:
    rng = np.random.default_rng(11)
    _, built, truth, moving = _build(kind, rng)
    fixed = built.fixed
    # The moving image is on its own lattice: other spacing, oblique, elsewhere.
    assert not np.allclose(moving.GetSpacing(), fixed.GetSpacing())
    assert abs(np.asarray(moving.GetDirection()).reshape(3, 3)[0, 0]) < 0.999
    assert moving.GetNumberOfPixels() < fixed.GetNumberOfPixels() or kind == "t2-slab"
    fixed_a = sitk.GetArrayFromImage(fixed)
    sentinel = -1e6

    def agreement(transform: sitk.Transform) -> tuple[float, float]:
        back = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear,
                                                    sentinel))
        has = back != sentinel
        return float(np.corrcoef(back[has], fixed_a[has])[0, 1]), float(has.mean())

    r_true, covered = agreement(truth)
    # Same intensities on both sides: with T the crop lands on the fixed anatomy (up to
    # the moving grid's coarser sampling); with T's inverse or the identity it does not.
    assert r_true > 0.9, r_true
    assert covered < 0.9  # a crop: part of the fixed field only
    assert agreement(truth.GetInverse())[0] < 0.7
    assert agreement(sitk.Euler3DTransform())[0] < 0.7
    # Every overlap point has moving data at the true pose and only there.
    index = _fixed_points_index(moving, np.array([truth.TransformPoint(tuple(p))
                                                  for p in built.overlap]))
    assert np.all((index > -1e-6) & (index < np.asarray(moving.GetSize()) - 1 + 1e-6))


def test_the_ultrasound_fan_holds_the_overlap_at_the_true_pose() -> None:
    rng = np.random.default_rng(4)
    _, built, truth, moving = _build("us", rng)
    back = sitk.Resample(moving, built.fixed, truth, sitk.sitkLinear, 0.0)
    index = np.round(_fixed_points_index(built.fixed, built.overlap)).astype(int)
    values = sitk.GetArrayViewFromImage(back)[index[:, 2], index[:, 1], index[:, 0]]
    assert np.mean(values > 0) > 0.95  # the fan is where the overlap points are
    wrong = sitk.Resample(moving, built.fixed, truth.GetInverse(), sitk.sitkLinear, 0.0)
    values = sitk.GetArrayViewFromImage(wrong)[index[:, 2], index[:, 1], index[:, 0]]
    assert np.mean(values > 0) < 0.8
    # A probe lattice: one axis along the beam, zero outside the fan.
    array = sitk.GetArrayViewFromImage(built.moving)
    assert np.mean(array == 0) > 0.2 and array.max() > 0


def test_realistic_cases_fill_the_bins_deterministically() -> None:
    pairs = ("ct-mr", "us-ct")
    a = cr.make_realistic_cases(1, pairs, seed=3, bins=(0, 2), crop=40)
    b = cr.make_realistic_cases(1, pairs[1:], seed=3, bins=(0, 2), crop=40)
    assert [c.name for c in a] == ["ct-mr-bin0-0", "ct-mr-bin2-0", "us-ct-bin0-0",
                                   "us-ct-bin2-0"]
    for case in a:
        lo, hi = cr.BINS_MM[case.bin_index]
        assert lo <= case.initial_error_mm < hi
        assert case.initial_error_mm == pytest.approx(
            cr.tre(sitk.Euler3DTransform(), case.truth, case.points))
    # A pair's cases do not depend on which other pairs run.
    for case, twin in zip(a[2:], b, strict=True):
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(case.moving),
                                      sitk.GetArrayViewFromImage(twin.moving))
    with pytest.raises(ValueError, match="unknown pair"):
        cr.make_realistic_cases(1, ("mr-pet",), bins=(0,), crop=40)


def test_a_swapped_pair_makes_the_partial_view_the_fixed_image() -> None:
    """mr-ct: the cropped MR, on its own oblique grid, is the fixed image and the whole CT
    the moving one; the truth still maps fixed points to moving points, in the same bin."""
    assert "mr-ct" in cr.ALL_REALISTIC_PAIRS and "mr-ct" not in cr.REALISTIC_PAIRS
    (case,) = cr.make_realistic_cases(1, ("mr-ct",), seed=3, bins=(2,), crop=48)
    ct, view = case.moving, case.fixed
    assert np.allclose(ct.GetDirection(), np.eye(3).ravel())  # the source's own grid
    assert abs(np.asarray(view.GetDirection()).reshape(3, 3)[0, 0]) < 0.999  # oblique
    lo, hi = cr.BINS_MM[2]
    assert lo <= case.initial_error_mm < hi
    assert case.initial_error_mm == pytest.approx(
        cr.tre(sitk.Euler3DTransform(), case.truth, case.points))
    # The overlap points lie in the fixed view...
    index = _fixed_points_index(view, case.points)
    assert np.all((index > -1e-6) & (index < np.asarray(view.GetSize()) - 1 + 1e-6))
    ct_array = sitk.GetArrayViewFromImage(ct)

    def on_ct_tissue(transform: sitk.Transform) -> float:
        """Share of the points that ``transform`` maps onto CT tissue (> -500 HU)."""
        mapped = np.array([transform.TransformPoint([float(v) for v in p])
                           for p in case.points])
        ijk = np.rint(_fixed_points_index(ct, mapped)).astype(int)
        inside = np.all((ijk >= 0) & (ijk < np.asarray(ct.GetSize())), axis=1)
        values = np.full(len(ijk), -1000.0)
        values[inside] = ct_array[ijk[inside, 2], ijk[inside, 1], ijk[inside, 0]]
        return float(np.mean(values > -500))

    # ...and are the CT's foreground points moved with the view: the truth takes them back
    # onto tissue, the header pose (50-75 mm off) mostly does not.
    assert on_ct_tissue(case.truth) > 0.98
    assert on_ct_tissue(sitk.Euler3DTransform()) < 0.8


def test_quick_realistic_run_records_what_the_engine_reported(tmp_path: Path) -> None:
    """One ct-mr case of a small crop, ``register(fixed, moving)`` with the defaults."""
    outcomes, _ = cr.run(1, ["disa-default"], tmp_path, pairs=("ct-mr",), bins=(0,),
                         crop=cr.QUICK_CROP, family="realistic", warm=False)
    (outcome,) = outcomes
    assert outcome.error is None, outcome.error
    assert np.isfinite(outcome.tre_mm)
    assert 0.0 <= outcome.result["confidence"] <= 1.0
    assert "ambiguous" in outcome.result and "confidence" in outcome.extra
    recorded = json.loads((tmp_path / "capture_range_realistic.jsonl").read_text())
    assert recorded["result"] == outcome.result
    table = (tmp_path / "capture_range_realistic.md").read_text()
    assert "| ct-mr | disa-default | 0-25 mm | 1 |" in table
    assert "--family realistic" in table and "ct-mr (" in table
    assert not (tmp_path / "capture_range.jsonl").exists()  # the full-field file is apart


def test_mesh_voxeliser_fills_a_closed_surface() -> None:
    """The torso source's voxeliser (ray parity along z) on a sphere of radius 10 mm."""
    from disa.training import sources

    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, 61), np.linspace(0, np.pi, 31))
    s = 10.0 * np.stack([np.sin(v) * np.cos(u), np.sin(v) * np.sin(u), np.cos(v)], -1)
    a, b, c, d = s[:-1, :-1], s[1:, :-1], s[1:, 1:], s[:-1, 1:]
    quads = [x.reshape(-1, 3) for x in (a, b, c, d)]
    triangles = np.concatenate([np.stack(quads[:3], 1), np.stack([quads[0], *quads[2:]], 1)])
    inside = sources.voxelise_mesh(triangles, np.array([-15.013, -15.029, -15.0]), 0.5,
                                   (60, 60, 60))
    assert inside.sum() * 0.5**3 == pytest.approx(4 / 3 * np.pi * 10.0**3, rel=0.03)
    assert not inside[0].any() and not inside[-1].any()  # nothing leaks along the rays


def test_the_xcat_torso_file_parses_into_closed_surfaces() -> None:
    from disa.training import sources

    # .ci/run installs the data packages (scripts/install_training_data.sh).
    paths = sources.source_files("xcat-chest")
    assert paths is not None, "gecatsim not installed"
    surfaces = {s.name: s for s in sources.read_nrb(paths[0])}
    assert {"chest_surface", "rlung", "llung", "sternum"} <= set(surfaces)
    lung = sources.surface_mesh(surfaces["rlung"], step_mm=3.0)
    lo = lung.reshape(-1, 3).min(0)
    inside = sources.voxelise_mesh(lung, lo - 4.013, 4.0, (70, 50, 40))
    # A right lung is some 1-3 litres (the voxels are 64 mm^3) and lies at -x (LPS).
    assert 1.0e6 < inside.sum() * 64.0 < 3.5e6
    assert surfaces["rlung"].control[..., 0].mean() < 0 < surfaces["llung"].control[..., 0].mean()



def test_a_fan_that_never_qualifies_falls_back_to_the_best_draw_not_the_last() -> None:
    """Where no draw shows a second tissue with energy (the XCAT torso: soft tissue,
    lung behind an opaque pleura, bone), the kept fan is a lit one, not the last draw."""
    from types import SimpleNamespace

    from disa.training.sources import TISSUES

    phantom = _phantom((24, 24, 24))
    # One soft tissue everywhere: fan_structure is 0 for every draw, so none qualifies.
    soft = TISSUES.index("soft")
    tissues = np.zeros_like(phantom.tissues)
    tissues[soft] = 1.0
    volume = dataclasses.replace(phantom, labels=np.ones(phantom.shape, phantom.labels.dtype),
                                 label_tissue=np.array([soft, soft]), tissues=tissues)
    assert volume.foreground()[12, 12, 12]  # the apex below is coupled
    draws: list[SimpleNamespace] = []

    def simulate(vol, rng, focus, extent, params):
        fan = np.zeros(volume.shape, dtype=bool)
        fan[4:20, 4:20, 4:20] = True
        lit = len(draws) % 4 == 1  # draws 1, 5, ..., 17 lit; the last (19) dark
        transmission = np.where(fan, 0.5 if lit else 1e-9, 0.0).astype(np.float32)
        draws.append(SimpleNamespace(fan=fan, transmission=transmission, lit=lit,
                                     apex=np.array([12.0, 12.0, 12.0]), image=transmission))
        return draws[-1]

    kept = rc.draw_fan(volume, np.random.default_rng(0), np.ones(volume.shape, bool), simulate)
    assert len(draws) == 20 and not draws[-1].lit
    assert kept.lit and rc.fan_structure(volume, kept) == 0.0
