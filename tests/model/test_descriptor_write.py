"""`disa descriptors` writes .nii.gz at zlib level 1 (issue 24: ITK's default level took
0.5-0.7 s of a cold call): the same NIfTI bytes as write_image's, written atomically."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from disa.core.errors import InputError
from disa.core.io.images import write_image
from disa.model.descriptors import write_descriptor_image


def _vector_image() -> sitk.Image:
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(size=(9, 10, 11, 16)).astype(np.float32),
                                   isVector=True)
    image.SetSpacing((8.0, 8.0, 8.0))
    image.SetOrigin((1.5, -2.0, 30.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    return image


def test_nifti_gz_holds_the_bytes_write_image_writes(tmp_path: Path) -> None:
    image = _vector_image()
    write_image(image, tmp_path / "reference.nii.gz")
    write_descriptor_image(image, tmp_path / "out.nii.gz")
    with gzip.open(tmp_path / "reference.nii.gz") as a, gzip.open(tmp_path / "out.nii.gz") as b:
        assert a.read() == b.read()
    back = sitk.ReadImage(str(tmp_path / "out.nii.gz"))
    assert back.GetNumberOfComponentsPerPixel() == 16
    assert back.GetDirection() == image.GetDirection() and back.GetOrigin() == image.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz", "reference.nii.gz"]


def test_other_formats_and_bad_paths_go_to_write_image(tmp_path: Path) -> None:
    image = _vector_image()
    write_descriptor_image(image, tmp_path / "out.nrrd")
    assert sitk.ReadImage(str(tmp_path / "out.nrrd")).GetNumberOfComponentsPerPixel() == 16
    with pytest.raises(InputError, match="does not exist"):
        write_descriptor_image(image, tmp_path / "missing" / "out.nii.gz")
    with pytest.raises(InputError, match="cannot write"):
        write_descriptor_image(image, tmp_path / "out.png")
