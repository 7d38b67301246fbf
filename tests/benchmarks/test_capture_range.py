"""The capture-range benchmark harness: case construction, conventions, a quick run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from disa.training import phantom as ph

from .scripts import load_benchmark

cr = load_benchmark("capture_range")


def _blob_array(shape: tuple[int, int, int] = (40, 44, 48)) -> np.ndarray:
    z, y, x = np.indices(shape, dtype=np.float32)
    c = [(s - 1) / 2 for s in shape]
    r2 = ((z - c[0]) / 12) ** 2 + ((y - c[1]) / 15) ** 2 + ((x - c[2] - 4) / 18) ** 2
    return (np.exp(-r2) + 0.5 * (x > c[2] + 6) * (r2 < 1)).astype(np.float32)


def test_header_transform_is_the_fixed_to_moving_mapping() -> None:
    rng = np.random.default_rng(0)
    array = _blob_array()
    fixed = cr._image(array)
    mask = array > 0.2
    points = cr._foreground_points(fixed, mask, 500, rng)
    center = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint(
        [(s - 1) / 2.0 for s in fixed.GetSize()]))
    truth = cr.draw_pose(rng, points, center, (25.0, 50.0), 40.0)
    assert 25.0 <= cr.tre(sitk.Euler3DTransform(), truth, points) < 50.0
    moving = cr.with_header_transform(array, truth, rng)
    back = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, truth, sitk.sitkLinear, 0.0))
    inner = mask & (back != 0)
    # Resampling with T brings the moving image back onto the fixed one (up to the
    # sub-voxel lattice shift); with T's inverse it would not.
    assert np.corrcoef(back[inner], array[inner])[0, 1] > 0.97
    wrong = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, truth.GetInverse(),
                                                 sitk.sitkLinear, 0.0))
    assert np.corrcoef(wrong[mask], array[mask])[0, 1] < 0.8


def test_cases_fill_the_requested_bins_deterministically() -> None:
    a = cr.make_cases(1, ("ct-mr", "ct-us"), seed=3, source="phantom", bins=(0, 2), crop=40)
    b = cr.make_cases(1, ("ct-mr", "ct-us"), seed=3, source="phantom", bins=(0, 2), crop=40)
    assert [c.name for c in a] == ["ct-mr-bin0-0", "ct-mr-bin2-0", "ct-us-bin0-0",
                                   "ct-us-bin2-0"]
    for case, twin in zip(a, b, strict=True):
        lo, hi = cr.BINS_MM[case.bin_index]
        assert lo <= case.initial_error_mm < hi
        assert case.initial_error_mm == pytest.approx(
            cr.tre(sitk.Euler3DTransform(), case.truth, case.points))
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(case.moving),
                                      sitk.GetArrayViewFromImage(twin.moving))
    with pytest.raises(ValueError, match="unknown pair"):
        cr.make_cases(1, ("mr-pet",), source="phantom", bins=(0,), crop=40)


def test_summary_counts_converged_cases_per_method_and_bin() -> None:
    outcomes = [
        cr.Outcome("a", "ct-mr", 0, "m", 2.0, 1.0, 10),
        cr.Outcome("b", "ct-mr", 0, "m", 30.0, 3.0, 30),
        cr.Outcome("c", "ct-mr", 1, "m", float("inf"), 0.5, None, "RuntimeError: x"),
    ]
    rows = cr.summarise(outcomes, ["m"], (0, 1))
    assert rows[0]["converged"] == 0.5 and rows[0]["tre_p50"] == 2.0
    assert rows[0]["seconds"] == 2.0 and rows[0]["evaluations"] == 20.0
    assert rows[1]["converged"] == 0.0 and rows[1]["tre_p50"] is None and rows[1]["errors"] == 1
    table = cr.markdown(rows, "header")
    assert "| ct-mr | m | 0-25 mm | 2 | 50 % | 2.0 / 2.0 | 2.0 | 20 |" in table
    both = cr.summarise([*outcomes, cr.Outcome("d", "ct-us", 0, "m", 1.0, 1.0, 10)], ["m"],
                        (0,))
    assert [(r["pair"], r["cases"]) for r in both] == [("ct-mr", 2), ("ct-us", 1), ("all", 3)]
    with pytest.raises(ValueError, match="unknown methods"):
        cr.run(1, ["nope"], Path("unused"))


def test_confidence_summary_counts_warnings_on_failed_and_converged_cases() -> None:
    def outcome(tre: float, confidence: float | None, ambiguous: float = 0.0) -> cr.Outcome:
        extra = {} if confidence is None else {"confidence": confidence, "ambiguous": ambiguous}
        return cr.Outcome("x", "ct-us", 0, "g" if confidence is not None else "p", tre, 1.0,
                          None, extra=extra)

    outcomes = [outcome(40.0, 0.25), outcome(40.0, 1.0), outcome(40.0, 0.75, ambiguous=1.0),
                outcome(2.0, 1.0), outcome(2.0, 0.25), outcome(2.0, 0.75), outcome(40.0, None)]
    rows = cr.confidence_summary(outcomes)
    assert rows == [{"pair": "ct-us", "method": "g", "failed": 3, "failed_flagged": 2,
                     "converged": 3, "converged_flagged": 1}]  # "p" reports none
    assert "| ct-us | g | 2 / 3 | 1 / 3 |" in cr.confidence_markdown(rows)


def test_verdict_summary_counts_wrong_likely_and_converged_not_likely() -> None:
    def outcome(tre: float, verdict: str | None, method: str = "g") -> cr.Outcome:
        result = {} if verdict is None else {"verdict": verdict}
        return cr.Outcome("x", "ct-mr", 0, method, tre, 1.0, None, result=result)

    outcomes = [outcome(1.0, "likely"), outcome(2.0, "likely"), outcome(30.0, "likely"),
                outcome(3.0, "uncertain"), outcome(40.0, "failed"), outcome(50.0, "uncertain"),
                outcome(1.0, None, "p")]
    rows = cr.verdict_summary(outcomes)
    assert rows == [{"method": "g", "results": 6, "likely": 3, "likely_wrong": 1,
                     "converged": 3, "converged_not_likely": 1, "failed_wrong": 1}]
    assert "| g | 6 | 3 | 1 | 3 | 1 | 1 |" in cr.verdict_markdown(rows)


def test_quick_run_of_every_method_writes_table_and_plot(tmp_path: Path) -> None:
    """One CT / FLAIR case of the held-out CT head (its central 56^3 voxels), 0-25 mm initial
    error, every method.

    The peers' transforms are read back in our convention (fixed -> moving): a
    convention slip would put their TRE near twice the initial error, so the
    robust ones must converge on this easy case.
    """
    from disa.training.sources import available_sources

    # .ci/run installs the data packages (scripts/install_training_data.sh).
    assert "ct-brain-atlas" in available_sources("held-out"), "totalsegmentator not installed"
    methods = list(cr.ALL_METHODS)
    # (The source cropped to QUICK_CROP^3 voxels: about 60 s instead of 110 s, the same methods
    # converging; LC2's local search is most of it either way.)
    outcomes, rows = cr.run(1, methods, tmp_path, pairs=("ct-mr",), bins=(0,), warm=False,
                            crop=cr.QUICK_CROP)
    assert len(rows) == len({o.method for o in outcomes})
    ran = {o.method for o in outcomes}
    assert ran == {m for m in methods if cr.available(m)}
    assert {"sitk-mi", "mind-global", "lc2-local"} <= ran
    by_method = {o.method: o for o in outcomes}
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
    # ANTs' rigid default is not robust on this cropped view (CI once saw it stop at 15 mm
    # from 24 mm, this machine at 1 mm): its convention is checked on a pair of its own
    # (test_peers_map_fixed_points_to_moving_points).
    for method in ("mind-global", "elastix"):
        if method in by_method:
            assert by_method[method].tre_mm < cr.CONVERGED_MM, by_method[method]
    table = (tmp_path / "capture_range.md").read_text()
    for method in ran:
        assert f"| ct-mr | {method} | 0-25 mm | 1 |" in table
    # Global engine methods report what a user is told about the answer; local ones can't.
    assert 0.0 <= by_method["mind-global"].extra["confidence"] <= 1.0
    assert "confidence" not in by_method["lc2-local"].extra
    assert "| ct-mr | mind-global |" in table.split("Warnings")[1]
    png = tmp_path / "capture_range.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method", ["sitk-mi", "ants"])  # elastix: the quick run above
def test_peers_map_fixed_points_to_moving_points(method: str) -> None:
    """Each peer's transform, read back, maps fixed points to moving points: a phantom pair
    (the moving image another, non-monotonic contrast) 8 mm and 6 deg apart, where the
    inverse (what a convention slip returns) lies twice as far from the truth as the
    identity. ANTs lands 1-2 mm off here and varies from run to run (its threads), hence
    40 % of the initial error."""
    if not cr.available(method):
        pytest.skip(f"{method}: its package (bench extra) is not installed")
    grid = ph.make_grid((40, 44, 48), (cr.SPACING_MM,) * 3)
    anatomy = ph.default_anatomy(scale_mm=30.0)
    voxels = ph.grid_points(grid)
    fixed_array = ph.render(voxels, anatomy, ph.contrast_table(9, 1), 4).reshape(grid.shape)
    moving_array = ph.render(voxels, anatomy, ph.contrast_table(9, 2, non_monotonic=True),
                             5).reshape(grid.shape)
    rng = np.random.default_rng(3)
    fixed = cr._image(fixed_array)
    points = cr._foreground_points(fixed, fixed_array > 0.05, 500, rng)
    center = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint(
        [(s - 1) / 2.0 for s in fixed.GetSize()]))
    truth = sitk.Euler3DTransform()
    truth.SetCenter(tuple(map(float, center)))
    truth.SetRotation(0.0, 0.0, float(np.radians(6.0)))
    truth.SetTranslation((6.0, -4.0, 3.0))
    moving = cr.with_header_transform(moving_array, truth, rng)
    initial = cr.tre(sitk.Euler3DTransform(), truth, points)
    assert cr.tre(truth.GetInverse(), truth, points) > 1.8 * initial
    estimate = cr.METHODS[method](fixed, moving)[0]
    assert cr.tre(estimate, truth, points) < 0.4 * initial


def test_resume_keeps_finished_outcomes_and_runs_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def identity(fixed: sitk.Image, moving: sitk.Image) -> tuple[sitk.Transform, int]:
        calls.append("identity")
        return sitk.Euler3DTransform(), 1

    monkeypatch.setitem(cr.METHODS, "identity", identity)
    kwargs = dict(pairs=("ct-mr",), bins=(0, 1), crop=40, source="phantom")
    first, _ = cr.run(1, ["identity"], tmp_path, **kwargs)
    assert len(calls) == 3  # one untimed warm-up call, then the two cases
    # The identity's TRE is each case's initial error, by definition.
    assert all(cr.BINS_MM[o.bin_index][0] <= o.tre_mm < cr.BINS_MM[o.bin_index][1]
               for o in first)
    lines = (tmp_path / cr.OUTCOMES).read_text().splitlines()
    (tmp_path / cr.OUTCOMES).write_text(lines[0] + "\n")  # as if interrupted after one
    again, rows = cr.run(1, ["identity"], tmp_path, resume=True, warm=False, **kwargs)
    assert len(calls) == 4 and len(again) == 2
    assert [r["cases"] for r in rows] == [1, 1]
    cr.run(1, ["identity"], tmp_path, warm=False, **kwargs)  # no resume: everything again
    assert len(calls) == 6
