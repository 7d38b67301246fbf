"""Read and check a user's initial transform (``--initial-transform``, the service's
``initial_transform`` upload): one reader for the CLI, the worker and the API.

The file is an ITK transform mapping FIXED points to MOVING points (LPS mm, the
convention of a result's ``transform.tfm``), and it must be linear (x -> A x + b with
A invertible): a tracked probe's pose or an earlier result. Accepted: ITK text
(``.tfm``, ``.txt``) and, where the caller allows it, HDF5 (``.h5``, ``.hdf5``); a
DISA result folder stands for its ``transform.tfm``.

Safety, since the service reads uploads with it:

- the file is capped at ``MAX_TRANSFORM_BYTES`` before anything reads it;
- a text file's transform class names are checked against an allowlist of linear ITK
  transforms *before* ITK parses it: a displacement field or B-spline declares its grid
  in its fixed parameters, and ITK would allocate whatever grid a few bytes claim;
- HDF5 is for local files only (``allow_hdf5``): an HDF5 dataset may keep its data in
  another file of the machine (external storage), whose bytes would become parameters.

Every problem is an InputError whose one-line message starts with ``initial transform``
and names only the file's basename.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import SimpleITK as sitk

from disa.core.errors import InputError
from disa.core.io.images import check_regular_file

#: Largest transform file read (bytes). A linear transform in text is a few hundred
#: bytes; a composite of a few dozen linear parts stays far below this.
MAX_TRANSFORM_BYTES = 1024 * 1024
#: Suffixes of ITK text transform files.
TEXT_SUFFIXES = (".tfm", ".txt")
#: Suffixes of ITK HDF5 transform files (local files only, see the module docstring).
HDF5_SUFFIXES = (".h5", ".hdf5")
#: The file a DISA result folder holds its rigid/affine transform in (outputs.TRANSFORM_FILE;
#: not imported from there, which would pull the whole pipeline into the API process).
RESULT_TRANSFORM_FILE = "transform.tfm"
#: ITK transform classes whose mapping is x -> A x + b (plus the composite that chains
#: them). Anything else (BSplineTransform, DisplacementFieldTransform, velocity fields,
#: perspective or spherical transforms) is refused by name.
LINEAR_CLASSES = frozenset({
    "AffineTransform", "CenteredAffineTransform", "CenteredEuler3DTransform",
    "ComposeScaleSkewVersor3DTransform", "CompositeTransform", "Euler3DTransform",
    "FixedCenterOfRotationAffineTransform", "IdentityTransform", "MatrixOffsetTransformBase",
    "QuaternionRigidTransform", "Rigid3DTransform", "ScalableAffineTransform",
    "ScaleLogarithmicTransform", "ScaleSkewVersor3DTransform", "ScaleTransform",
    "ScaleVersor3DTransform", "Similarity3DTransform", "TranslationTransform",
    "VersorRigid3DTransform", "VersorTransform",
})
#: "Transform: Euler3DTransform_double_3_3": class, precision, input and output dimension.
_TEXT_CLASS = re.compile(r"^([A-Za-z0-9]+)_(?:double|float)_(\d+)_(\d+)$")


def read_initial_transform(path: str | Path, *, allow_hdf5: bool = True) -> sitk.AffineTransform:
    """The linear transform (fixed -> moving, LPS mm) in ``path``, as an AffineTransform.

    Whatever class the file holds (Euler, versor, similarity, affine, translation or a
    composite of them), the result is the same mapping as a 3-D ``sitk.AffineTransform``
    with centre 0, so callers get one kind of object. ``path`` may be a DISA result folder
    (its ``transform.tfm``). ``allow_hdf5=False`` refuses ``.h5``/``.hdf5``: the service
    passes it for uploads. Raises InputError (message: ``initial transform (NAME): ...``)
    for a missing, oversized, unreadable, non-linear, singular or non-finite transform.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / RESULT_TRANSFORM_FILE).is_file():
            raise InputError(f"initial transform ({path.name or path}): a folder without "
                             f"{RESULT_TRANSFORM_FILE}; give a transform file or a DISA "
                             "result folder")
        path = path / RESULT_TRANSFORM_FILE
    name = f"initial transform ({path.name or path})"
    data = _read_capped(path, name)
    suffixes = TEXT_SUFFIXES + (HDF5_SUFFIXES if allow_hdf5 else ())
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        # ITK picks the format by suffix: refuse here rather than let it guess.
        raise InputError(f"{name}: not an ITK transform file name; accepted: "
                         f"{', '.join(suffixes)}")
    if suffix in TEXT_SUFFIXES:
        _check_text_classes(data, name)
    transform = _sitk_read(path, name)
    _check_parts(transform, name)
    return _as_affine(transform, name)


def transform_matrix(transform: sitk.Transform) -> list[list[float]]:
    """The 4x4 homogeneous matrix (fixed -> moving, LPS mm) of a checked linear transform,
    as nested lists for result.json."""
    from disa.registration.transform.parametric import linear_matrix

    return [[float(v) for v in row] for row in linear_matrix(transform)]


def _read_capped(path: Path, name: str) -> bytes:
    """The file's bytes, after checking it is a regular file of at most the cap."""
    if not path.exists():
        raise InputError(f"{name}: file not found")
    check_regular_file(path, name)  # (a FIFO would block; a folder is not a transform)
    size = path.stat().st_size
    if size > MAX_TRANSFORM_BYTES:
        raise InputError(f"{name}: file is {size:,} bytes, above the limit of "
                         f"{MAX_TRANSFORM_BYTES:,} for a transform")
    try:
        with open(path, "rb") as f:
            # Read one byte past the cap: the file may have grown since stat().
            data = f.read(MAX_TRANSFORM_BYTES + 1)
    except OSError as err:
        raise InputError(f"{name}: cannot be read ({err.strerror})") from err
    if len(data) > MAX_TRANSFORM_BYTES:
        raise InputError(f"{name}: file is above the limit of {MAX_TRANSFORM_BYTES:,} bytes "
                         "for a transform")
    return data


def _check_text_classes(data: bytes, name: str) -> None:
    """Refuse a text file that is not an ITK transform or declares a non-linear or
    non-3-D transform, before ITK parses (and allocates for) it."""
    if b"\0" in data:
        raise InputError(f"{name}: not an ITK transform file (binary data in a text format)")
    classes: list[tuple[str, int, int]] = []
    for line in data.decode("latin-1").splitlines():
        key, sep, value = line.strip().partition(":")
        if not sep or key.strip().lower() != "transform":
            continue
        match = _TEXT_CLASS.match(value.strip())
        if match is None:
            raise InputError(f"{name}: not an ITK transform file (unknown transform line "
                             f"{_clip(value.strip())!r})")
        classes.append((match[1], int(match[2]), int(match[3])))
    if not classes:
        raise InputError(f"{name}: not an ITK transform file (no 'Transform:' line)")
    for cls, dim_in, dim_out in classes:
        _check_class(cls, name)
        if (dim_in, dim_out) != (3, 3):
            raise InputError(f"{name}: {cls} is {dim_in}-D; a 3-D transform is required")


def _check_class(cls: str, name: str) -> None:
    if cls not in LINEAR_CLASSES:
        raise InputError(f"{name}: {_clip(cls)} is not a linear transform; give a rigid or "
                         "affine transform (fixed -> moving), e.g. a result's transform.tfm")


def _check_parts(transform: sitk.Transform, name: str) -> None:
    """The read transform (and a composite's parts): linear classes, 3-D, finite
    parameters. The text check ran before parsing already; this one also covers HDF5."""
    if transform.GetDimension() != 3:
        raise InputError(f"{name}: {transform.GetName()} is {transform.GetDimension()}-D; "
                         "a 3-D transform is required")
    _check_class(transform.GetName(), name)
    if transform.GetName() == "CompositeTransform":
        if not isinstance(transform, sitk.CompositeTransform):  # older SimpleITK: a base class
            transform = sitk.CompositeTransform(transform)
        for i in range(transform.GetNumberOfTransforms()):
            _check_parts(transform.GetNthTransform(i), name)
        return
    values = (*transform.GetParameters(), *transform.GetFixedParameters())
    if not all(math.isfinite(v) for v in values):
        raise InputError(f"{name}: parameters are not finite numbers")


def _sitk_read(path: Path, name: str) -> sitk.Transform:
    try:
        return sitk.ReadTransform(str(path))
    except RuntimeError:
        # ITK's message is C++ text with this machine's paths: not for the user.
        raise InputError(f"{name}: not a readable ITK transform file") from None


def _as_affine(transform: sitk.Transform, name: str) -> sitk.AffineTransform:
    """The mapping as an AffineTransform (centre 0), refusing non-linear mappings, points
    sent to non-finite coordinates and singular matrices (transforms.linear_matrix)."""
    from disa.registration.transform.parametric import linear_matrix

    try:
        matrix = linear_matrix(transform)
    except ValueError as exc:
        raise InputError(f"{name}: {exc}") from None
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(tuple(float(v) for v in matrix[:3, :3].ravel()))
    affine.SetTranslation(tuple(float(v) for v in matrix[:3, 3]))
    return affine


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
