"""Patient geometry of DICOM slices and frames, and the grid a stack of them makes.

Each slice (or each frame of a multi-frame file) states its orientation,
position and pixel spacing (LPS mm) in its header; `_stack_geometry` checks
that they belong to one stack and orders the slices along the normal into a
grid (`slice_stack.plan_stack_grid`), or raises InputError where no grid
describes them. The header readers here (`_int`, `_numbers`, `_functional_item`,
`_frames_in`) take what they need from pydicom datasets without pixel data.
"""

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from disa.core.errors import InputError
from disa.core.io.slice_stack import StackGrid, plan_stack_grid

# Tolerances of the series consistency checks. Scanners write positions and
# cosines as decimal strings of about six digits, so exact equality is too strict.
_IOP_TOL = 1e-3  # direction cosines of two slices: about 0.06 degrees apart at most
_SPACING_REL_TOL = 1e-3  # pixel spacing of two slices


@dataclass(frozen=True)
class _Frame:
    """Geometry of one slice as its header states it (LPS mm)."""

    orientation: np.ndarray  # 6 cosines: row direction, then column direction
    position: np.ndarray  # centre of the first pixel
    pixel_spacing: np.ndarray  # (between rows, between columns), as DICOM orders it


def _frames_in(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _int(ds: Dataset, keyword: str) -> int:
    try:
        return int(ds.get(keyword))
    except (TypeError, ValueError):
        return -1


def _numbers(source: Dataset | None, keyword: str, count: int) -> np.ndarray | None:
    """`count` finite floats from a multi-valued decimal string, or None."""
    if source is None or keyword not in source:
        return None
    value = source.get(keyword)
    try:
        items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
        numbers = np.asarray([float(v) for v in items], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if numbers.shape != (count,) or not np.isfinite(numbers).all():
        return None
    return numbers


def _single_frame(name: str, label: str, ds: Dataset) -> _Frame:
    return _frame(name, label, ds, ds, ds)


def _frame(
    name: str,
    label: str,
    orientation_item: Dataset | None,
    position_item: Dataset | None,
    measures_item: Dataset | None,
) -> _Frame:
    orientation = _numbers(orientation_item, "ImageOrientationPatient", 6)
    position = _numbers(position_item, "ImagePositionPatient", 3)
    pixel_spacing = _numbers(measures_item, "PixelSpacing", 2)
    missing = [
        keyword
        for keyword, value in (
            ("ImageOrientationPatient", orientation),
            ("ImagePositionPatient", position),
            ("PixelSpacing", pixel_spacing),
        )
        if value is None
    ]
    if missing:
        raise InputError(
            f"{name}: {label} lacks a valid {' and '.join(missing)}; a volume needs the "
            "patient geometry of every slice"
        )
    assert orientation is not None and position is not None and pixel_spacing is not None
    return _Frame(orientation, position, pixel_spacing)


def _functional_item(ds: Dataset, index: int, keyword: str) -> Dataset | None:
    """First item of functional group `keyword` for frame `index`: per-frame, else shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    for groups in (per_frame[index] if per_frame else None, shared[0] if shared else None):
        if groups is not None and keyword in groups and len(groups.get(keyword)) > 0:
            return groups.get(keyword)[0]
    return None


def _multiframe_frames(name: str, label: str, ds: Dataset) -> list[_Frame]:
    """Per-frame geometry of a multi-frame file.

    Enhanced objects (CT, MR, PET...) state each frame's position in the
    functional groups. A legacy multi-frame file states one position and
    orientation plus SpacingBetweenSlices: frame k lies k steps along the
    normal (how GDCM and the NM IOD read it).
    """
    count = _frames_in(ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None or "SharedFunctionalGroupsSequence" in ds:
        if per_frame is None or len(per_frame) != count:
            raise InputError(
                f"{name}: {label} has {count} frames but "
                f"{len(per_frame) if per_frame is not None else 'no'} per-frame functional "
                "groups; the file is inconsistent"
            )
        rescales = set()
        for k in range(count):
            item = _functional_item(ds, k, "PixelValueTransformationSequence")
            if item is not None:
                rescales.add(
                    (
                        str(item.get("RescaleSlope", "1")).strip(),
                        str(item.get("RescaleIntercept", "0")).strip(),
                    )
                )
        if len(rescales) > 1:
            raise InputError(
                f"{name}: {label} rescales pixel values differently frame by frame; not supported"
            )
        return [
            _frame(
                name,
                label,
                _functional_item(ds, k, "PlaneOrientationSequence"),
                _functional_item(ds, k, "PlanePositionSequence"),
                _functional_item(ds, k, "PixelMeasuresSequence"),
            )
            for k in range(count)
        ]
    first = _single_frame(name, label, ds)
    step = _numbers(ds, "SpacingBetweenSlices", 1)
    if step is None or not step[0] > 0:
        raise InputError(
            f"{name}: {label} is a multi-frame file without per-frame positions or "
            "SpacingBetweenSlices; its slice geometry is unknown"
        )
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    return [
        _Frame(first.orientation, first.position + k * float(step[0]) * normal, first.pixel_spacing)
        for k in range(count)
    ]


def _stack_geometry(
    name: str, label: str, frames: list[_Frame], matrix: tuple[int, int]
) -> tuple[list[int], StackGrid]:
    """Slice order and grid of a stack of slices (`slice_stack.plan_stack_grid`).

    Slices are ordered by their position along the normal n = row x column
    direction, so the third axis is +n and the direction matrix [r c n] is a
    rotation. A gantry tilt or a slice spacing that varies gives a grid to
    resample onto; what cannot be corrected (mixed orientations, a gap of
    missing slices, ...) raises InputError. `matrix` is (columns, rows).
    """
    orientations = np.stack([f.orientation for f in frames])
    if float(np.abs(orientations - orientations[0]).max()) > _IOP_TOL:
        raise InputError(
            f"{name}: {label} mixes slice orientations (ImageOrientationPatient differs "
            "between slices); give one stack per series"
        )
    row, col = orientations[0, :3], orientations[0, 3:]
    norms = (float(np.linalg.norm(row)), float(np.linalg.norm(col)))
    if abs(norms[0] - 1.0) > 1e-2 or abs(norms[1] - 1.0) > 1e-2 or abs(float(row @ col)) > 1e-2:
        raise InputError(
            f"{name}: {label} has ImageOrientationPatient cosines that are not orthonormal"
        )
    row, col = row / norms[0], col / norms[1]
    col = col - (col @ row) * row  # remove the rounding residue of the stored decimals
    col /= np.linalg.norm(col)
    spacings = np.stack([f.pixel_spacing for f in frames])
    if not (spacings > 0).all():
        raise InputError(f"{name}: {label} has a pixel spacing that is not positive")
    if float(np.abs(spacings / spacings[0] - 1.0).max()) > _SPACING_REL_TOL:
        other = spacings[int(np.abs(spacings / spacings[0] - 1.0).max(axis=1).argmax())]
        raise InputError(
            f"{name}: {label} mixes pixel spacings ({_pair(spacings[0])} and {_pair(other)} mm)"
        )
    positions = np.stack([f.position for f in frames])
    # DICOM's PixelSpacing is (between rows, between columns): x spacing second.
    return plan_stack_grid(name, label, row, col, positions,
                           (float(spacings[0][1]), float(spacings[0][0])), matrix)


def _pair(values: np.ndarray) -> str:
    return " x ".join(f"{v:g}" for v in values)
