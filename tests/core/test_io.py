"""Image input: round trips for every format and a corpus of hostile or broken inputs."""

from __future__ import annotations

import os
import stat
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from disa.core.errors import InputError
from disa.core.io.images import (
    detect_format,
    format_info,
    inspect_image,
    read_image,
    write_image,
)
from disa.core.io.itk_calls import _itk_detail
from disa.core.io.limits import ImageInfo, InputLimits

from .io_fixtures import (
    ORIGIN,
    OTHER_SERIES_UID,
    SERIES_UID,
    SIZE,
    SPACING,
    metaimage,
    nifti1,
    nrrd,
    oblique_direction,
    patch_zip,
    phantom,
    write_dicom_series,
    write_gz,
    zip_folder,
)

GEOMETRY_TOL = 1e-3  # mm (and direction cosines)


def assert_geometry(image: sitk.Image | ImageInfo, size: tuple[int, ...] = SIZE) -> None:
    if isinstance(image, sitk.Image):
        got = (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    else:
        got = (image.size, image.spacing, image.origin, image.direction)
    assert tuple(got[0]) == size
    np.testing.assert_allclose(got[1], SPACING, atol=GEOMETRY_TOL)
    np.testing.assert_allclose(got[2], ORIGIN, atol=GEOMETRY_TOL)
    np.testing.assert_allclose(got[3], oblique_direction(), atol=GEOMETRY_TOL)


# ------------------------------------------------------------------ formats


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.nii", "nifti"),
        ("a.NII.GZ", "nifti"),
        ("a.nrrd", "nrrd"),
        ("a.nhdr", "nrrd"),
        ("a.mha", "metaimage"),
        ("a.MHD", "metaimage"),
        ("a.zip", "dicom"),
    ],
)
def test_detect_format_by_extension(name: str, fmt: str) -> None:
    assert detect_format(Path(name)) == fmt


def test_detect_format_folder_is_dicom(tmp_path: Path) -> None:
    assert detect_format(tmp_path) == "dicom"


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_round_trip(tmp_path: Path, ext: str) -> None:
    source = phantom()
    path = tmp_path / f"moving{ext}"
    write_image(source, path)
    image = read_image(path)
    assert image.GetPixelID() == sitk.sitkFloat32
    assert_geometry(image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(source))
    # Atomic write: nothing but the target is left in the folder.
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_read_casts_integer_pixels_to_float32(tmp_path: Path) -> None:
    path = tmp_path / "labels.nrrd"
    write_image(sitk.Cast(phantom(), sitk.sitkInt16), path)
    assert inspect_image(path).pixel_type == "16-bit signed integer"
    assert read_image(path).GetPixelID() == sitk.sitkFloat32


def test_mhd_with_inline_data_is_accepted(tmp_path: Path) -> None:
    write_image(phantom(), tmp_path / "a.mha")
    (tmp_path / "a.mha").rename(tmp_path / "a.mhd")
    assert_geometry(read_image(tmp_path / "a.mhd"))


def test_nrrd_nan_spacings_beside_space_directions_are_accepted(tmp_path: Path) -> None:
    # NRRD writes NaN spacings for axes that a space-direction vector describes.
    path = tmp_path / "a.nrrd"
    fields = (
        "space: left-posterior-superior\n"
        "space directions: (0.8,0,0) (0,1.1,0) (0,0,2.5)\n"
        "spacings: NaN NaN NaN\n"
    )
    path.write_bytes(nrrd(fields))
    assert inspect_image(path).spacing == pytest.approx(SPACING)


def test_nii_gz_is_plain_gzip_with_the_image_and_leaves_no_temporary(tmp_path: Path) -> None:
    """write_image's .nii.gz (ISA-L, core/io/fast_gzip.py) is one gzip stream that any
    reader takes: Python's zlib gives the uncompressed NIfTI ITK writes, ITK reads back the
    same vectors and geometry; only the file itself is left in the folder."""
    import gzip

    rng = np.random.default_rng(5)
    values = rng.normal(size=(9, 8, 7, 3)).astype(np.float32)
    field = sitk.GetImageFromArray(values, isVector=True)
    field.SetSpacing((0.7, 0.8, 1.5))
    field.SetOrigin((-3.0, 12.5, 40.0))
    field.SetDirection(sitk.Euler3DTransform((0, 0, 0), 0.2, -0.1, 0.4).GetMatrix())
    write_image(field, tmp_path / "displacement.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["displacement.nii.gz"]
    sitk.WriteImage(field, str(tmp_path / "reference.nii"))
    assert gzip.decompress((tmp_path / "displacement.nii.gz").read_bytes()) == (
        tmp_path / "reference.nii").read_bytes()
    again = sitk.ReadImage(str(tmp_path / "displacement.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(again), values)
    assert again.GetSpacing() == pytest.approx(field.GetSpacing())
    assert again.GetOrigin() == pytest.approx(field.GetOrigin())
    assert again.GetDirection() == pytest.approx(field.GetDirection(), abs=1e-6)


def test_a_failed_nii_gz_write_keeps_the_stored_file_and_no_temporary(tmp_path: Path,
                                                                     monkeypatch) -> None:
    """ITK failing inside the compressed write: OSError naming the file, the earlier
    result untouched, neither temporary left."""
    from disa.core.io import fast_gzip

    write_image(phantom(), tmp_path / "registered.nii.gz")
    stored = (tmp_path / "registered.nii.gz").read_bytes()

    class Failing:
        def __getattr__(self, name):
            def fail(*args):
                if name == "Execute":
                    raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute:"
                                       " disk full")
            return fail

    monkeypatch.setattr(fast_gzip.sitk, "ImageFileWriter", Failing)
    with pytest.raises(OSError, match=r"registered\.nii\.gz: cannot write image"):
        write_image(phantom(), tmp_path / "registered.nii.gz")
    assert (tmp_path / "registered.nii.gz").read_bytes() == stored
    assert [p.name for p in tmp_path.iterdir()] == ["registered.nii.gz"]


def test_write_image_refuses_detached_formats(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="output formats"):
        write_image(phantom(), tmp_path / "out.mhd")


def test_dicom_folder_round_trip(tmp_path: Path) -> None:
    expected = write_dicom_series(phantom(), tmp_path / "ct")
    image = read_image(tmp_path / "ct")
    assert_geometry(image)
    # Rescale slope 0.5: values come back on the 0.5 grid the stored int16 define.
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), expected, atol=1e-3)
    original = sitk.GetArrayFromImage(phantom())
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), original, atol=0.25 + 1e-3)
    assert image.GetMetaData("0020|000e") == SERIES_UID
    assert image.GetMetaData("0008|0060") == "CT"
    info = inspect_image(tmp_path / "ct")
    assert (info.format, info.modality, info.series_uid) == ("dicom", "CT", SERIES_UID)
    assert_geometry(info)


def test_dicom_zip_round_trip(tmp_path: Path) -> None:
    expected = write_dicom_series(phantom(), tmp_path / "ct")
    archive = zip_folder(tmp_path / "ct", tmp_path / "ct.zip")
    image = read_image(archive)
    assert_geometry(image)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), expected, atol=1e-3)
    assert inspect_image(archive).series_uid == SERIES_UID


def test_series_uid_picks_one_of_several(tmp_path: Path) -> None:
    write_dicom_series(phantom(), tmp_path / "mixed")
    write_dicom_series(
        phantom((12, 10, 6)), tmp_path / "mixed", OTHER_SERIES_UID, modality="MR", prefix="mr"
    )
    with pytest.raises(InputError, match="choose one with series_uid") as caught:
        read_image(tmp_path / "mixed")
    message = str(caught.value)
    assert f"{SERIES_UID} (16 slices)" in message
    assert f"{OTHER_SERIES_UID} (6 slices)" in message
    image = read_image(tmp_path / "mixed", series_uid=OTHER_SERIES_UID)
    assert image.GetSize() == (12, 10, 6)
    assert inspect_image(tmp_path / "mixed", series_uid=SERIES_UID).modality == "CT"
    with pytest.raises(InputError, match="is not in it"):
        read_image(tmp_path / "mixed", series_uid="1.2.3")


# ------------------------------------------------------------ header only


def test_a_file_cut_a_few_kilobytes_in_keeps_its_header(tmp_path: Path) -> None:
    """A .nii.gz cut 3000 bytes in (what an interrupted upload leaves) still has its
    header: inspect_image reads it, and read_image names the truncated data. (ISA-L's
    reader refuses the first 540 bytes of such a stream, so the header is read with
    Python's zlib.)"""
    noise = np.random.default_rng(2).normal(size=(32, 40, 48)).astype(np.float32)
    image = sitk.GetImageFromArray(noise)
    image.CopyInformation(sitk.Resample(phantom(), [48, 40, 32]))
    path = tmp_path / "moving.nii.gz"
    write_image(image, path)
    assert path.stat().st_size > 100_000
    path.write_bytes(path.read_bytes()[:3000])
    info = inspect_image(path)
    assert info.size == (48, 40, 32) and info.pixel_type == "32-bit float"
    with pytest.raises(InputError, match="truncated"):
        read_image(path)


def test_inspect_reads_the_header_only(tmp_path: Path) -> None:
    path = tmp_path / "moving.nii.gz"
    write_image(phantom(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # pixels cut off, header intact
    info = inspect_image(path)
    assert_geometry(info)
    assert (info.path, info.format, info.components) == ("moving.nii.gz", "nifti", 1)
    assert info.pixel_type == "32-bit float"
    assert (info.modality, info.series_uid) == (None, None)
    assert info.as_dict()["size"] == list(SIZE)
    with pytest.raises(InputError, match="truncated"):
        read_image(path)


def test_format_info_names_the_geometry(tmp_path: Path) -> None:
    path = tmp_path / "fixed.nrrd"
    write_image(phantom(), path)
    text = format_info(inspect_image(path))
    assert "fixed.nrrd (NRRD)" in text
    assert "24x20x16 voxels" in text
    assert "0.8 x 1.1 x 2.5 mm" in text
    assert "19.2 x 22.0 x 40.0 mm" in text  # physical extent
    assert "(-10.000, 20.000, 5.000) mm, LPS" in text
    assert "direction:   +0.9553 -0.2896 +0.0587  (3x3 matrix" in text
    assert "\n             +0.0000 +0.1987 +0.9801\n" in text  # third row, no -0.0000
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(oblique_direction())
    assert f"orientation: {code} " in text
    assert "oblique by up to" in text
    assert "32-bit float" in text


# ---------------------------------------------------- corpus of bad input

Case = Callable[[Path], Path]


def _phantom_nrrd(tmp: Path) -> Path:
    path = tmp / "moving.nrrd"
    write_image(phantom(), path)
    return path


def _truncated_nii_gz(tmp: Path) -> Path:
    path = tmp / "moving.nii.gz"
    write_image(phantom(), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


def _truncated_nii(tmp: Path) -> Path:
    path = tmp / "moving.nii"
    write_image(phantom(), path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    return path


def _corrupt_gzip(tmp: Path) -> Path:
    path = tmp / "moving.nii.gz"
    write_image(phantom(), path)
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def _huge_header(tmp: Path) -> Path:
    # 356 bytes on disk, 256 GiB claimed.
    return write_gz(tmp / "moving.nii.gz", nifti1((4096, 4096, 4096), data=False))


def _mha_external_data(tmp: Path) -> Path:
    path = tmp / "moving.mha"
    path.write_bytes(metaimage({}, data_file="/etc/passwd")[:400])
    return path


def _nrrd_external_data(tmp: Path) -> Path:
    path = tmp / "moving.nrrd"
    path.write_bytes(nrrd("data file: /etc/passwd\n")[:200])
    return path


def _nhdr_written_by_sitk(tmp: Path) -> Path:
    sitk.WriteImage(phantom(), str(tmp / "moving.nhdr"))
    return tmp / "moving.nhdr"


def _mhd_with_raw(tmp: Path) -> Path:
    sitk.WriteImage(phantom(), str(tmp / "moving.mhd"))
    return tmp / "moving.mhd"


def _nifti_pair_header(tmp: Path) -> Path:
    path = tmp / "moving.nii"
    path.write_bytes(nifti1((8, 8, 8), magic=b"ni1\0"))
    return path


def _image_2d(tmp: Path) -> Path:
    path = tmp / "slice.nii.gz"
    sitk.WriteImage(sitk.Image([24, 20], sitk.sitkFloat32), str(path))
    return path


def _image_4d(tmp: Path) -> Path:
    return write_gz(tmp / "bold.nii.gz", nifti1((8, 8, 8, 3)))


def _too_thin(tmp: Path) -> Path:
    path = tmp / "thin.nrrd"
    sitk.WriteImage(sitk.Image([24, 20, 2], sitk.sitkFloat32), str(path))
    return path


def _nan_pixdim(tmp: Path) -> Path:
    path = tmp / "moving.nii"
    path.write_bytes(nifti1((8, 8, 8), pixdim=(float("nan"), 1.0, 1.0)))
    return path


def _nan_spacing_mha(tmp: Path) -> Path:
    path = tmp / "moving.mha"
    path.write_bytes(metaimage({"ElementSpacing": "nan 1 1"}))
    return path


def _negative_spacing_mha(tmp: Path) -> Path:
    path = tmp / "moving.mha"
    path.write_bytes(metaimage({"ElementSpacing": "-1 1 1"}))
    return path


def _negative_spacing_nrrd(tmp: Path) -> Path:
    path = tmp / "moving.nrrd"
    path.write_bytes(nrrd("spacings: -1 1 1\n"))
    return path


def _nan_space_origin_nrrd(tmp: Path) -> Path:
    path = tmp / "moving.nrrd"
    path.write_bytes(nrrd("space: left-posterior-superior\nspace origin: (0,NaN,0)\n"))
    return path


def _nan_origin(tmp: Path) -> Path:
    path = tmp / "moving.mha"
    path.write_bytes(metaimage({"Offset": "0 nan 0"}))
    return path


def _with_voxels(tmp: Path, name: str, values: dict[tuple[int, int, int], float]) -> Path:
    """The phantom written as ``name`` (NRRD and MetaImage keep NaN and Inf; NIfTI I/O
    through ITK zeroes NaN) with the given (z, y, x) voxels overwritten."""
    array = sitk.GetArrayFromImage(phantom())
    for index, value in values.items():
        array[index] = value
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(phantom())
    path = tmp / name
    sitk.WriteImage(image, str(path))
    return path


def _nan_voxels_nrrd(tmp: Path) -> Path:
    # 5x5x5 NaN voxels in a background corner, where they decide no percentile visibly.
    return _with_voxels(tmp, "moving.nrrd", {(z, y, x): np.nan for z in range(1, 6)
                                             for y in range(1, 6) for x in range(1, 6)})


def _infinite_voxels_mha(tmp: Path) -> Path:
    return _with_voxels(tmp, "moving.mha", {(8, 10, 12): np.inf, (2, 3, 4): -np.inf})


def _nan_voxels_nifti(tmp: Path) -> Path:
    # ITK's NIfTI reader would turn these into 0: the check reads the stored data.
    return _with_voxels(tmp, "moving.nii.gz", {(3, 4, 5): np.nan, (15, 19, 23): np.nan})


def _infinite_voxels_nifti(tmp: Path) -> Path:
    return _with_voxels(tmp, "moving.nii", {(0, 0, 0): -np.inf})


def _sheared_direction(tmp: Path) -> Path:
    path = tmp / "moving.mha"
    path.write_bytes(metaimage({"TransformMatrix": "1 0.5 0 0 1 0 0 0 1"}))
    return path


def _vector_image(tmp: Path) -> Path:
    path = tmp / "field.nii.gz"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3), str(path))
    return path


def _empty_file(tmp: Path) -> Path:
    path = tmp / "moving.nii.gz"
    path.write_bytes(b"")
    return path


def _text_in_nii_gz(tmp: Path) -> Path:
    return write_gz(tmp / "notes.nii.gz", b"patient notes, not an image\n" * 40)


def _text_file(tmp: Path) -> Path:
    path = tmp / "notes.txt"
    path.write_text("not an image\n")
    return path


def _missing_file(tmp: Path) -> Path:
    return tmp / "absent.nii.gz"


def _folder_named_like_nifti(tmp: Path) -> Path:
    (tmp / "moving.nii.gz").mkdir()
    return tmp / "moving.nii.gz"


def _folder_without_dicom(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    (tmp / "empty" / "readme.txt").write_text("no images here\n")
    return tmp / "empty"


def _not_a_zip(tmp: Path) -> Path:
    path = tmp / "series.zip"
    path.write_text("not a zip\n")
    return path


def _zip(tmp: Path, members: dict[str, bytes], **kwargs: int) -> Path:
    path = tmp / "series.zip"
    with zipfile.ZipFile(path, "w", kwargs.get("compression", zipfile.ZIP_DEFLATED)) as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    return path


def _zip_traversal(tmp: Path) -> Path:
    return _zip(tmp, {"../../evil.dcm": b"x" * 100})


def _zip_absolute(tmp: Path) -> Path:
    return _zip(tmp, {"/etc/cron.d/evil": b"x" * 100})


def _zip_bomb(tmp: Path) -> Path:
    # 16 MiB of zeros deflate to about 16 KiB: ratio about 1000:1.
    return _zip(tmp, {"0001.dcm": bytes(16 * 1024**2)})


def _zip_too_many_members(tmp: Path) -> Path:
    return _zip(tmp, {f"{i:04d}.dcm": b"x" for i in range(6)})


def _zip_too_large(tmp: Path) -> Path:
    return _zip(tmp, {f"{i:04d}.dcm": os.urandom(4000) for i in range(3)})


def _zip_lying_size(tmp: Path) -> Path:
    path = _zip(tmp, {"0001.dcm": os.urandom(5000)}, compression=zipfile.ZIP_STORED)
    patch_zip(path, file_size=10)  # declares 10 bytes, holds 5000
    return path


def _zip_encrypted(tmp: Path) -> Path:
    path = _zip(tmp, {"0001.dcm": b"x" * 100}, compression=zipfile.ZIP_STORED)
    patch_zip(path, flag_bits=0x1)
    return path


def _zip_symlink(tmp: Path) -> Path:
    path = tmp / "series.zip"
    link = zipfile.ZipInfo("0001.dcm")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(link, "/etc/passwd")
    return path


def _unknown_series(tmp: Path) -> Path:
    write_dicom_series(phantom(), tmp / "ct")
    return tmp / "ct"


SMALL_ZIP = InputLimits(max_zip_members=5, max_zip_bytes=10_000)

# (builder, expected phrase, limits, series_uid)
BAD_INPUTS: dict[str, tuple[Case, str, InputLimits, str | None]] = {
    "truncated_nii_gz": (_truncated_nii_gz, "truncated", InputLimits(), None),
    "truncated_nii": (_truncated_nii, "file is truncated", InputLimits(), None),
    "corrupt_gzip": (_corrupt_gzip, "corrupt gzip data", InputLimits(), None),
    "huge_header": (
        _huge_header,
        "header claims 4096x4096x4096 voxels (68.7 G), above the limit",
        InputLimits(),
        None,
    ),
    "byte_cap": (_phantom_nrrd, "of pixel data", InputLimits(max_bytes=1024), None),
    "mha_external_data": (
        _mha_external_data,
        "separate data file (ElementDataFile = /etc/passwd)",
        InputLimits(),
        None,
    ),
    "nrrd_external_data": (
        _nrrd_external_data,
        "separate data file (data file: /etc/passwd)",
        InputLimits(),
        None,
    ),
    "nhdr_detached": (_nhdr_written_by_sitk, "separate data file", InputLimits(), None),
    "mhd_with_raw": (_mhd_with_raw, "single .mha file", InputLimits(), None),
    "nifti_pair": (_nifti_pair_header, "NIfTI pair", InputLimits(), None),
    "image_2d": (_image_2d, "is a 2D image (24x20 voxels); a 3D volume", InputLimits(), None),
    "image_4d": (_image_4d, "is a 4D image (8x8x8x3 voxels)", InputLimits(), None),
    "too_thin": (_too_thin, "too thin to register: the z axis has 2", InputLimits(), None),
    "nan_pixdim": (_nan_pixdim, "spacing must be positive and finite", InputLimits(), None),
    "nan_spacing_mha": (
        _nan_spacing_mha,
        "spacing must be positive and finite",
        InputLimits(),
        None,
    ),
    "negative_spacing_mha": (
        _negative_spacing_mha,
        "spacing must be positive and finite",
        InputLimits(),
        None,
    ),
    "negative_spacing_nrrd": (
        _negative_spacing_nrrd,
        "voxel spacing '-1 1 1' (spacings)",
        InputLimits(),
        None,
    ),
    "nan_origin": (_nan_origin, "not a finite number", InputLimits(), None),
    "nan_voxels": (
        _nan_voxels_nrrd,
        "125 of 7680 voxels are not finite (125 NaN, 0 infinite)",
        InputLimits(),
        None,
    ),
    "infinite_voxels": (
        _infinite_voxels_mha,
        "2 of 7680 voxels are not finite (0 NaN, 2 infinite)",
        InputLimits(),
        None,
    ),
    "nan_voxels_nifti": (
        _nan_voxels_nifti,
        "2 of 7680 voxels are not finite (2 NaN, 0 infinite)",
        InputLimits(),
        None,
    ),
    "infinite_voxels_nifti": (
        _infinite_voxels_nifti,
        "1 of 7680 voxels are not finite (0 NaN, 1 infinite)",
        InputLimits(),
        None,
    ),
    "nan_space_origin_nrrd": (_nan_space_origin_nrrd, "not a finite number", InputLimits(), None),
    "sheared_direction": (_sheared_direction, "not orthonormal", InputLimits(), None),
    "vector_image": (_vector_image, "has 3 components", InputLimits(), None),
    "empty_file": (_empty_file, "file is empty", InputLimits(), None),
    "text_in_nii_gz": (_text_in_nii_gz, "not a NIfTI file", InputLimits(), None),
    "text_file": (_text_file, "unknown image format ('.txt')", InputLimits(), None),
    "missing_file": (_missing_file, "file not found", InputLimits(), None),
    "folder_named_nifti": (_folder_named_like_nifti, "is a folder", InputLimits(), None),
    "no_dicom": (_folder_without_dicom, "no DICOM series found", InputLimits(), None),
    "not_a_zip": (_not_a_zip, "not a valid zip archive", InputLimits(), None),
    "zip_traversal": (_zip_traversal, "unsafe path with '..'", InputLimits(), None),
    "zip_absolute": (_zip_absolute, "unsafe absolute path", InputLimits(), None),
    "zip_bomb": (_zip_bomb, "compression ratio", InputLimits(), None),
    "zip_too_many": (
        _zip_too_many_members,
        "zip holds 6 members, above the limit",
        SMALL_ZIP,
        None,
    ),
    "zip_too_large": (_zip_too_large, "zip expands to", SMALL_ZIP, None),
    "zip_lying_size": (_zip_lying_size, "corrupt zip archive", InputLimits(), None),
    "zip_encrypted": (_zip_encrypted, "is encrypted", InputLimits(), None),
    "zip_symlink": (_zip_symlink, "is a symbolic link", InputLimits(), None),
    "unknown_series": (_unknown_series, "is not in it", InputLimits(), "1.2.3.4"),
}


def test_nifti_finiteness_is_checked_slab_by_slab(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One slab of stored data at a time (here one z plane): the NaN in the last plane is
    found, and a finite image passes."""
    import disa.core.io.file_formats as file_formats

    monkeypatch.setattr(file_formats, "_FINITE_CHUNK_BYTES", 1)
    path = _with_voxels(tmp_path, "last.nii.gz", {(15, 0, 0): np.nan})
    with pytest.raises(InputError, match=r"1 of 7680 voxels are not finite \(1 NaN"):
        read_image(path)
    fine = _with_voxels(tmp_path, "fine.nii.gz", {})
    assert read_image(fine).GetSize() == (24, 20, 16)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_rejected_with_a_clear_message(tmp_path: Path, case: str) -> None:
    build, phrase, limits, series_uid = BAD_INPUTS[case]
    path = build(tmp_path)
    with pytest.raises(InputError) as caught:
        read_image(path, limits, series_uid=series_uid)
    message = str(caught.value)
    assert phrase in message
    assert message.startswith(f"{path.name}: ")
    # One line for the CLI, no C++ text and no folders of this machine.
    assert "\n" not in message
    assert "itk" not in message.lower() and ".cxx" not in message
    assert str(tmp_path) not in message


def test_zip_extraction_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Members land under server-chosen names in a temporary folder that is
    # removed afterwards, whether the read succeeds or fails.
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with pytest.raises(InputError, match="no DICOM series found"):
        read_image(_zip(tmp_path, {"passwd": b"x" * 100}))
    write_dicom_series(phantom(), tmp_path / "ct")
    read_image(zip_folder(tmp_path / "ct", tmp_path / "ct.zip"))
    assert list(temp.iterdir()) == []


def test_inspect_applies_the_same_checks(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="above the limit"):
        inspect_image(_huge_header(tmp_path))
    with pytest.raises(InputError, match="separate data file"):
        inspect_image(_mha_external_data(tmp_path))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Exception thrown in SimpleITK ImageFileReader_Execute: /tmp/b/ITK/Modules/IO/NRRD/"
            "src/itkNrrdImageIO.cxx:935:\nITK ERROR: NrrdImageIO(0x560ac106d1a0): Read: Error "
            'reading /srv/jobs/42/t.nrrd:\n[nrrd] nrrdLoad: trouble reading "/srv/jobs/42/t.nrrd"'
            "\n[nrrd] _nrrdEncodingGzip_read: expected 30720 bytes but received 100",
            "Read: Error reading t.nrrd; _nrrdEncodingGzip_read: expected 30720 bytes but "
            "received 100",
        ),
        (
            "Exception thrown in SimpleITK ImageFileWriter_Execute: /tmp/b/gdcm/Source/"
            "gdcmRescaler.cxx:67 ():\nAn invalid logic behavior occurred",
            "An invalid logic behavior occurred",
        ),
    ],
)
def test_itk_messages_are_cleaned(text: str, expected: str) -> None:
    assert _itk_detail(RuntimeError(text)) == expected


def test_series_uid_is_refused_for_single_files(tmp_path: Path) -> None:
    write_image(phantom(), tmp_path / "a.nii.gz")
    with pytest.raises(InputError, match="only to DICOM"):
        read_image(tmp_path / "a.nii.gz", series_uid=SERIES_UID)


@pytest.mark.parametrize("name", ["split.nii.gz", "split.nii"])
def test_nifti_finiteness_finds_values_split_between_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """The stored bytes arrive in chunks that cut float32 values in two (7 bytes of file,
    3 of data at a time): every NaN and infinity is still counted once."""
    import disa.core.io.file_formats as file_formats

    monkeypatch.setattr(file_formats, "_CHUNK", 7)
    monkeypatch.setattr(file_formats, "_FINITE_CHUNK_BYTES", 3)
    path = _with_voxels(tmp_path, name, {(0, 0, 0): np.nan, (7, 9, 11): -np.inf,
                                         (15, 19, 23): np.inf})
    with pytest.raises(InputError, match=r"3 of 7680 voxels are not finite \(1 NaN, 2 inf"):
        read_image(path)


def test_nifti_finiteness_reads_the_stored_type_and_byte_order(tmp_path: Path) -> None:
    """The stored type and byte order come from the header: a big-endian float64 NIfTI
    with a NaN voxel is refused, its finite twin read. (SimpleITK reads no NIfTI-2.)"""
    import struct

    values = np.arange(4 * 5 * 6, dtype=">f8").reshape(6, 5, 4)
    for bad in (True, False):
        data = values.copy()
        if bad:
            data[5, 4, 3] = np.nan
        header = bytearray(nifti1((4, 5, 6)))[:348]
        struct.pack_into(">i", header, 0, 348)  # the whole header big-endian
        struct.pack_into(">8h", header, 40, 3, 4, 5, 6, 1, 1, 1, 1)
        struct.pack_into(">2h", header, 70, 64, 64)  # float64, 64 bits
        struct.pack_into(">8f", header, 76, 1, 1, 1, 1, 1, 1, 1, 1)
        struct.pack_into(">f", header, 108, 352)
        struct.pack_into(">f", header, 112, 1.0)  # scl_slope
        struct.pack_into(">2h", header, 252, 0, 0)
        header[344:348] = b"n+1\0"
        path = tmp_path / f"{'nan' if bad else 'fine'}.nii"
        path.write_bytes(bytes(header) + b"\0" * 4 + data.tobytes())
        if bad:
            with pytest.raises(InputError, match=r"1 of 120 voxels are not finite \(1 NaN"):
                read_image(path)
        else:
            assert read_image(path).GetSize() == (4, 5, 6)


def test_reading_a_float_nifti_imports_no_nibabel(tmp_path: Path) -> None:
    """The stored-value check is ours: reading a float32 NIfTI pulls in no nibabel
    (its import cost 0.2-0.3 s of every cold ``disa register``)."""
    import subprocess
    import sys

    path = _with_voxels(tmp_path, "fine.nii.gz", {})
    code = ("import sys; from disa.core.io.images import read_image; "
            f"read_image({str(path)!r}); print('nibabel' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
