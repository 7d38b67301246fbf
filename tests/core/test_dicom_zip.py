"""DICOM zips: headers read from the members without unpacking, unpacking counted and bounded.

Before: every inspection (the service checks each upload) extracted the whole zip
into the system's temporary folder; a 3.2 MB zip of 400 members of 1 MB wrote 418 MB
to /tmp, outside the jobs volume.
"""

from __future__ import annotations

import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from disa.core.errors import InputError
from disa.core.io import dicom_zip
from disa.core.io.dicom_zip import UnpackBusy, UnpackPool, unpack_budget
from disa.core.io.images import inspect_image, read_dicom_headers, read_image

from . import dicom_fixtures as dx
from .io_fixtures import OTHER_SERIES_UID, phantom, write_dicom_series, zip_folder


def _big_slices(folder: Path, slices: int = 12, side: int = 256) -> Path:
    """A CT series of `slices` noisy side x side int16 slices (128 KiB each, compressing
    little), zipped; the headers are a few hundred bytes each."""
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1000, (slices, side, side)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 2.0))
    dx.write_series(image, folder / "ct")
    return zip_folder(folder / "ct", folder / "ct.zip")


@pytest.fixture
def quiet_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system's temporary folder, redirected to an empty folder to watch."""
    temp = tmp_path / "system-temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return temp


def test_inspecting_a_zip_unpacks_nothing_and_reads_only_headers(
        tmp_path: Path, quiet_temp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _big_slices(tmp_path)

    def no_unpacking(*args: object) -> None:
        raise AssertionError("a member was unpacked")

    monkeypatch.setattr(dicom_zip, "_copy_member", no_unpacking)
    total = sum(m.file_size for m in zipfile.ZipFile(archive).infolist())
    before = sorted(p.name for p in archive.parent.iterdir())
    with unpack_budget(64 * 1024):  # far below the 1.5 MB the members hold
        info = inspect_image(archive)
        headers = read_dicom_headers(archive)
    assert info.size == (256, 256, 12) and len(headers) == 12
    assert total > 12 * 128 * 1024
    assert list(quiet_temp.iterdir()) == []
    assert sorted(p.name for p in archive.parent.iterdir()) == before


def test_reading_unpacks_the_series_beside_the_zip_and_removes_it(
        tmp_path: Path, quiet_temp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the chosen series' members are unpacked, into the zip's own folder (the job's
    folder, for the service), and the folder is gone afterwards."""
    write_dicom_series(phantom(), tmp_path / "two")
    write_dicom_series(phantom(), tmp_path / "two", series_uid=OTHER_SERIES_UID, prefix="other")
    (tmp_path / "job" / "inputs").mkdir(parents=True)
    archive = zip_folder(tmp_path / "two", tmp_path / "job" / "inputs" / "fixed.zip")
    written: list[Path] = []
    copy = dicom_zip._copy_member

    def watched(src, dst, source, name):
        written.append(Path(dst.name))
        copy(src, dst, source, name)

    monkeypatch.setattr(dicom_zip, "_copy_member", watched)
    image = read_image(archive, series_uid=OTHER_SERIES_UID)
    assert image.GetSize() == (24, 20, 16)
    assert len(written) == 16  # one series of the two
    assert {p.parent.parent for p in written} == {archive.parent}
    assert all(p.parent.name.startswith(".unpack-") for p in written)
    assert sorted(p.name for p in archive.parent.iterdir()) == ["fixed.zip"]
    assert list(quiet_temp.iterdir()) == []


def test_a_request_budget_counts_unpacked_bytes_across_its_reads(tmp_path: Path) -> None:
    archive = _big_slices(tmp_path)
    with unpack_budget(512 * 1024), pytest.raises(InputError, match=r"ct\.zip: the DICOM zips "
                                                  r"of this request decompress to more than"):
        read_image(archive)  # the pixels: 1.5 MB
    with unpack_budget(64 * 1024):
        inspect_image(archive)
        inspect_image(archive)  # twice the headers still fit


def test_concurrent_unpacking_waits_for_room_then_says_busy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _big_slices(tmp_path)
    pool = UnpackPool(capacity=4 * 1024**2, wait_s=0.3)
    monkeypatch.setattr(dicom_zip, "_POOL", pool)
    with pool.hold(4 * 1024**2 - 1000, "other.zip"), \
            pytest.raises(UnpackBusy, match="unpacking other DICOM zips"):  # held by another
        inspect_image(archive)
    assert pool.in_use == 0
    # Room that frees up while the read waits is taken.
    release = threading.Event()

    def other() -> None:
        with pool.hold(4 * 1024**2 - 1000, "other.zip"):
            release.wait(5)
            time.sleep(0.1)

    thread = threading.Thread(target=other)
    thread.start()
    time.sleep(0.05)
    release.set()
    assert inspect_image(archive).size == (256, 256, 12)
    thread.join()
    assert pool.in_use == 0


def test_a_zip_larger_than_the_pool_is_refused_as_input(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _big_slices(tmp_path)
    monkeypatch.setattr(dicom_zip, "_POOL", UnpackPool(capacity=64 * 1024, wait_s=0.1))
    with pytest.raises(InputError, match="more than this server unpacks at once") as caught:
        read_image(archive)
    assert not isinstance(caught.value, UnpackBusy)


def test_a_series_as_large_as_the_pool_is_held_once(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Unpacking holds the series' declared size; its members are not held a second time
    (which made a series near the pool's size wait on itself, then fail as busy)."""
    archive = _big_slices(tmp_path)
    declared = sum(m.file_size for m in zipfile.ZipFile(archive).infolist())
    pool = UnpackPool(capacity=declared, wait_s=0.2)
    monkeypatch.setattr(dicom_zip, "_POOL", pool)
    assert read_image(archive).GetSize() == (256, 256, 12)
    assert pool.in_use == 0


def test_a_read_only_zip_folder_falls_back_to_the_temp_folder_only_where_allowed(
        tmp_path: Path, quiet_temp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads a zip on read-only media through the system's temporary folder; the
    service's processes (temp_fallback=False) never do: the OSError stands (a storage
    failure of the job's folder, retried), nothing lands in /tmp."""
    import errno

    monkeypatch.setattr(dicom_zip, "_POOL", UnpackPool(dicom_zip.DEFAULT_POOL_BYTES))
    archive = _big_slices(tmp_path)
    make = tempfile.mkdtemp

    def read_only_beside_zip(*args, **kwargs):
        if kwargs.get("dir") == archive.parent:
            raise OSError(errno.EROFS, "Read-only file system")
        return make(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", read_only_beside_zip)
    used: list[Path] = []
    copy = dicom_zip._copy_member
    monkeypatch.setattr(dicom_zip, "_copy_member", lambda src, dst, source, name: (
        used.append(Path(dst.name).parent), copy(src, dst, source, name)))
    assert read_image(archive).GetSize() == (256, 256, 12)
    assert {p.parent for p in used} == {quiet_temp} and list(quiet_temp.iterdir()) == []
    monkeypatch.setattr(dicom_zip, "_POOL", UnpackPool(dicom_zip.DEFAULT_POOL_BYTES,
                                                       temp_fallback=False))
    used.clear()
    with pytest.raises(OSError) as caught:
        read_image(archive)
    assert caught.value.errno == errno.EROFS and not isinstance(caught.value, InputError)
    assert used == [] and list(quiet_temp.iterdir()) == []


def test_the_pool_is_sized_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = UnpackPool(capacity=dicom_zip.DEFAULT_POOL_BYTES)
    monkeypatch.setattr(dicom_zip, "_POOL", pool)
    dicom_zip.configure_unpack_pool(3 * 1024**2, wait_s=1.5)
    assert dicom_zip.unpack_pool() is pool
    assert (pool.capacity, pool.wait_s) == (3 * 1024**2, 1.5)
    dicom_zip.configure_unpack_pool(5 * 1024**2)
    assert (pool.capacity, pool.wait_s, pool.temp_fallback) == (5 * 1024**2, 1.5, True)
    dicom_zip.configure_unpack_pool(5 * 1024**2, temp_fallback=False)
    assert not pool.temp_fallback
    with pytest.raises(ValueError, match="positive"):
        dicom_zip.configure_unpack_pool(0)


@pytest.mark.parametrize("slope, intercept", [(1.0, -1024.0), (0.5, -100.0), (1.0, 0.0),
                                              (2.0, 10.0)])
def test_pixel_type_from_the_headers_is_gdcm_s(tmp_path: Path, slope: float,
                                               intercept: float) -> None:
    """The pixel type (and so the byte cap) now comes from the headers alone; it is the
    type GDCM decodes to."""
    dx.write_series(phantom(), tmp_path / "ct", slope=slope, intercept=intercept)
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(next((tmp_path / "ct").iterdir())))
    reader.ReadImageInformation()
    expected = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    assert inspect_image(tmp_path / "ct").pixel_type == expected
