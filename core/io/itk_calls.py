"""Calling SimpleITK readers without ITK's words reaching the user.

ITK warnings on stderr are silenced while a reader runs (errors still raise),
and the text of a SimpleITK error is cut down to its useful words: no C++
source paths, no folders of this machine. Shared by the single-file readers,
the DICOM series reader and `images.write_image`.
"""

import contextlib
import os
import re
from collections.abc import Iterator

import SimpleITK as sitk

from disa.core.errors import InputError
from disa.core.io.dicom_zip import _short


def _execute(reader: sitk.ImageFileReader | sitk.ImageSeriesReader, name: str) -> sitk.Image:
    try:
        with _quiet_itk():
            return reader.Execute()
    except RuntimeError as err:
        raise InputError(
            f"{name}: cannot read the pixel data; the file is truncated or corrupt "
            f"({_itk_detail(err)})"
        ) from err


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silence ITK warnings on stderr (e.g. 'No Series were found'); errors still raise."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


_ITK_PREFIX = re.compile(r"(?:ITK ERROR|itk::ERROR|ERROR):\s*(?:\w+\(0x[0-9a-fA-F]+\):\s*)?")
_ABS_PATH = re.compile(r"/[^\s\"':]+")


def _itk_detail(err: Exception) -> str:
    """The useful words of a SimpleITK error: no C++ source paths, no folders."""
    text = str(err)
    found = list(_ITK_PREFIX.finditer(text))
    if found:
        text = text[found[-1].end() :]
    text = _ABS_PATH.sub(lambda m: os.path.basename(m.group(0).rstrip("/")), text)
    lines = [ln.strip().removeprefix("[nrrd]").strip() for ln in text.splitlines()]
    # The SimpleITK wrapper line only names a C++ source file.
    lines = [ln for ln in lines if ln and not ln.startswith("Exception thrown in SimpleITK")]
    if not lines:
        return "reader failed"
    parts = [ln.rstrip(":") for ln in lines[:1] + lines[1:][-1:]]
    return _short("; ".join(parts), 200)
