"""The commit A/B's import redirection, its table and its clinical CT grid."""

from __future__ import annotations

import sys

from .scripts import load_benchmark

ab = load_benchmark("commit_ab")


def test_tree_finder_imports_the_mapped_packages_from_its_tree(tmp_path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools]\npackage-dir = { "abtop" = "top", "abtop.engine" = "engine" }\n')
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "__init__.py").write_text("WHERE = 'top'\n")
    (tmp_path / "engine" / "search").mkdir(parents=True)
    (tmp_path / "engine" / "__init__.py").write_text("")
    (tmp_path / "engine" / "search" / "__init__.py").write_text("")
    (tmp_path / "engine" / "search" / "core.py").write_text("VALUE = 7\n")
    finder = ab.TreeFinder(tmp_path)
    sys.meta_path.insert(0, finder)
    try:
        import abtop  # type: ignore[import-not-found]
        from abtop.engine.search import core  # type: ignore[import-not-found]

        assert abtop.WHERE == "top" and core.VALUE == 7
        assert core.__file__ == str(tmp_path / "engine" / "search" / "core.py")
        assert finder.find_spec("json") is None
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.split(".")[0] == "abtop"]:
            del sys.modules[name]


def test_summary_compares_each_case_with_itself_and_lists_moved_results() -> None:
    def row(tree: str, case: str, pair: str, s: float, tre: float) -> dict:
        return {"tree": tree, "case": case, "pair": pair, "s": s, "reorient_s": s / 4,
                "search_s": s / 2, "tre": tre}

    rows = [row("B", "a", "ct-mr", 4.0, 0.7), row("H", "a", "ct-mr", 3.0, 0.7),
            row("H", "a", "ct-mr", 3.2, 0.7), row("B", "a", "ct-mr", 4.2, 0.7),
            row("B", "b", "torso", 8.0, 1.0), row("H", "b", "torso", 9.0, 30.0)]
    text = ab.summary(rows, {"base": "B", "head": "H"})
    assert "| ct-mr | 1 | 4.10 | 3.10 | -1.00 | 1.02 -> 0.78 | 2.05 -> 1.55 |" in text
    assert "| torso | 1 | 8.00 | 9.00 | +1.00 |" in text
    assert "| all | 2 |" in text
    assert "- b: base 1.0 mm, head 30.0 mm" in text and "- a:" not in text


def test_clinical_grid_keeps_the_field_of_view_and_the_image() -> None:
    """--clinical-ct: the CT on a 0.7 x 0.7 x 1.0 mm grid over the same box, same axes; a
    point inside reads the same (linear) value; the CT of each pair is found by name."""
    import numpy as np
    import SimpleITK as sitk

    z, y, x = np.mgrid[0:20, 0:18, 0:16].astype(np.float32)
    image = sitk.GetImageFromArray(3.0 * x + 2.0 * y + z - 40.0)
    image.SetSpacing((2.0, 2.0, 2.5))
    image.SetOrigin((10.0, -4.0, 7.0))
    image.SetDirection(sitk.Euler3DTransform((0, 0, 0), 0.2, -0.1, 0.3).GetMatrix())
    fine = ab.clinical_grid(image)
    assert fine.GetSpacing() == ab.CLINICAL_CT_SPACING_MM
    assert fine.GetDirection() == image.GetDirection()
    for corner in ((-0.5, -0.5, -0.5), tuple(n - 0.5 for n in image.GetSize())):
        fine_corner = tuple(n - 0.5 for n in fine.GetSize()) if corner[0] > 0 else corner
        np.testing.assert_allclose(fine.TransformContinuousIndexToPhysicalPoint(fine_corner),
                                   image.TransformContinuousIndexToPhysicalPoint(corner),
                                   atol=0.5)
    point = image.TransformContinuousIndexToPhysicalPoint((7.3, 9.1, 11.6))
    index = fine.TransformPhysicalPointToContinuousIndex(point)
    assert abs(fine.EvaluateAtContinuousIndex(index) - (3 * 7.3 + 2 * 9.1 + 11.6 - 40)) < 0.2
    assert [ab._ct_role(p) for p in ("ct-mr", "ct-mr-torso", "us-ct", "ct-us-moving",
                                     "t1-t2")] == ["fixed", "fixed", "moving", "fixed", None]


def test_a_deformable_result_reads_back_from_the_children_s_transform_file(tmp_path) -> None:
    """--mode deformable: a child writes each result as .tfm, and a rigid part composed
    with a displacement field reads back from it into the same mapping (TRE is computed
    from that file)."""
    import numpy as np
    import SimpleITK as sitk

    field = sitk.Image([6, 5, 4], sitk.sitkVectorFloat64, 3)
    field.SetSpacing((4.0, 4.0, 4.0))
    array = sitk.GetArrayFromImage(field)
    array[..., 0] = 2.5
    array[2, 2, 3, 1] = -1.5
    vectors = sitk.GetImageFromArray(array, isVector=True)
    vectors.CopyInformation(field)
    composite = sitk.CompositeTransform([sitk.Euler3DTransform((8, 8, 6), 0.1, 0.0, 0.2,
                                                               (1.0, -2.0, 3.0)),
                                         sitk.DisplacementFieldTransform(vectors)])
    path = tmp_path / "case-1.tfm"
    sitk.WriteTransform(composite, str(path))
    again = sitk.ReadTransform(str(path))
    for point in ((12.0, 8.0, 8.0), (4.0, 6.0, 5.0)):
        np.testing.assert_allclose(again.TransformPoint(point), composite.TransformPoint(point),
                                   atol=1e-9)
    assert not np.allclose(composite.TransformPoint((12.0, 8.0, 8.0)),
                           composite.GetNthTransform(0).TransformPoint((12.0, 8.0, 8.0)))
