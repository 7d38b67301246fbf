"""Volumes of a finished job for the web viewer: the fixed grid's planes, slices as 8-bit images.

A succeeded job gives three volumes, all on the fixed image's voxel grid:

    fixed       the fixed input image
    registered  outputs/registered.nii.gz: the moving image resampled with the result transform
    before      the moving image resampled with the identity (what the images look like unaligned)
    displacement  non-linear jobs only: |u(x)| in mm of displacement.nii.gz (window 0..max)

Planes are index planes of the fixed grid, so a slice is exactly one layer of
voxels (no resampling, no interpolation). Each plane is named after the patient
axis its normal is closest to and is shown in the radiological view of the QA
picture (`disa.registration.results.qa`): axial seen from the feet (patient Right on the
viewer's left, Anterior up), coronal from the front, sagittal from the patient's
left. A plane's `pixel_to_physical` 4x4 matrix maps (column, row, slice, 1),
column and row in pixels from the top left pixel's centre and slice the voxel
index along the plane's normal grid axis, to LPS millimetres.

The viewer's first slices pass through the job's view point: result.json's
`view_point_mm`, the centre of the region where the registered moving image has
data, which qa.png's planes pass through too (`disa.registration.results.qa.view_centre`),
so a small moving field of view (an ultrasound sector in a CT) is on screen from
the start; results without one start at the fixed grid's centre.

Loaded volumes are kept in a small LRU bounded by bytes (VolumeCache): the
viewer asks for many slices of the same job in a row.
"""

from __future__ import annotations

import io
import itertools
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from disa.core.result_files import DISPLACEMENT_FILE
from disa.jobs.manifest import Manifest
from disa.jobs.store import INPUTS_DIR, RESULT_JSON, JobStore
from disa.service.engine_surface import Grid, display_window

VOLUMES = ("fixed", "registered", "before")
PLANES = ("axial", "coronal", "sagittal")

#: LPS unit vectors of each plane as displayed: (column direction, row direction, normal);
#: rows run downwards on screen. The same convention as the QA picture.
PLANE_AXES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]] = {
    "axial": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
    "coronal": ((1, 0, 0), (0, 0, -1), (0, 1, 0)),
    "sagittal": ((0, 1, 0), (0, 0, -1), (-1, 0, 0)),
}
#: Patient-direction letter of each signed LPS axis.
_LETTERS = {(0, 1): "L", (0, -1): "R", (1, 1): "P", (1, -1): "A", (2, 1): "S", (2, -1): "I"}

# DISPLACEMENT_FILE: the result file of non-linear jobs, u(x) = T(x) - x of the full
# mapping on the fixed grid (disa.core.result_files).
#: The viewer's volume of non-linear jobs: |u(x)| in mm on the fixed grid (window 0..max).
DISPLACEMENT_VOLUME = "displacement"
#: Bytes of volumes the cache keeps (the newest job is always kept, whatever its size).
CACHE_BYTES = 1 << 30
#: Auto window: these intensity percentiles of the whole volume map to black and white.
WINDOW_PERCENTILES = (0.5, 99.5)

ViewPointSource = Literal["overlap", "fixed centre"]


@dataclass(frozen=True)
class PlaneGeometry:
    """One display plane of the fixed grid.

    Attributes:
        name: axial, coronal or sagittal.
        column_axis, row_axis, normal_axis: the fixed grid axes (0=i/x, 1=j/y, 2=k/z of the
            ITK index) along the slice's columns, its rows and across slices.
        flip_columns, flip_rows: whether the index runs against the displayed direction.
        width, height: pixels of a slice; count: slices (voxels along the normal axis).
        pixel_spacing_mm: (column, row) pixel size in mm.
        pixel_to_index: 4x4, (column, row, slice, 1) -> continuous ITK index (i, j, k, 1).
        pixel_to_physical: 4x4, (column, row, slice, 1) -> LPS mm.
        letters: patient-direction letters at the left, right, top and bottom edges.
    """

    name: str
    column_axis: int
    row_axis: int
    normal_axis: int
    flip_columns: bool
    flip_rows: bool
    width: int
    height: int
    count: int
    pixel_spacing_mm: tuple[float, float]
    pixel_to_index: np.ndarray
    pixel_to_physical: np.ndarray
    letters: dict[str, str]

    @property
    def physical_to_pixel(self) -> np.ndarray:
        """4x4, LPS mm -> (column, row, slice, 1) (continuous)."""
        return np.linalg.inv(self.pixel_to_physical)

    def pixel_points(self, index: int) -> np.ndarray:
        """LPS mm centres (height*width, 3) of every pixel of slice `index`, row-major."""
        rows, cols = np.mgrid[0:self.height, 0:self.width]
        pix = np.stack([cols.ravel(), rows.ravel(), np.full(cols.size, index),
                        np.ones(cols.size)], axis=1).astype(np.float64)
        return (pix @ self.pixel_to_physical.T)[:, :3]

    def take(self, array: np.ndarray, index: int) -> np.ndarray:
        """Slice `index` of a (z, y, x) array as (rows, columns) in display orientation."""
        layer = np.take(array, index, axis=2 - self.normal_axis)
        # The layer's axes are the remaining grid axes in array order (k before j before i).
        remaining = [k for k in (2, 1, 0) if k != self.normal_axis]
        if remaining != [self.row_axis, self.column_axis]:
            layer = layer.T
        if self.flip_rows:
            layer = layer[::-1, :]
        if self.flip_columns:
            layer = layer[:, ::-1]
        return np.ascontiguousarray(layer)


def _letter(vector: np.ndarray, sign: int) -> str:
    axis = int(np.argmax(np.abs(vector)))
    return _LETTERS[(axis, sign * (1 if vector[axis] >= 0 else -1))]


def plane_geometry(grid: Grid, name: str) -> PlaneGeometry:
    """The display plane `name` of a grid: the grid axes closest to the plane's LPS axes.

    The assignment of grid axes to (column, row, normal) is the permutation with
    the largest total |cosine|, so oblique grids get the nearest plane.
    """
    wanted = np.array(PLANE_AXES[name], dtype=np.float64)  # rows: column, row, normal directions
    cosines = wanted @ grid.direction  # [d, k]: cosine of wanted direction d and grid axis k
    perm = max(itertools.permutations(range(3)),
               key=lambda p: sum(abs(cosines[d, p[d]]) for d in range(3)))
    col_axis, row_axis, normal_axis = perm
    flip_c = bool(cosines[0, col_axis] < 0)
    flip_r = bool(cosines[1, row_axis] < 0)
    size = grid.size_xyz
    to_index = np.zeros((4, 4))
    to_index[col_axis, 0] = -1.0 if flip_c else 1.0
    to_index[col_axis, 3] = size[col_axis] - 1.0 if flip_c else 0.0
    to_index[row_axis, 1] = -1.0 if flip_r else 1.0
    to_index[row_axis, 3] = size[row_axis] - 1.0 if flip_r else 0.0
    to_index[normal_axis, 2] = 1.0
    to_index[3, 3] = 1.0
    to_physical = grid.index_to_physical @ to_index
    col_dir, row_dir = to_physical[:3, 0], to_physical[:3, 1]
    return PlaneGeometry(
        name=name, column_axis=col_axis, row_axis=row_axis, normal_axis=normal_axis,
        flip_columns=flip_c, flip_rows=flip_r, width=int(size[col_axis]),
        height=int(size[row_axis]), count=int(size[normal_axis]),
        pixel_spacing_mm=(float(grid.spacing[col_axis]), float(grid.spacing[row_axis])),
        pixel_to_index=to_index, pixel_to_physical=to_physical,
        letters={"left": _letter(col_dir, -1), "right": _letter(col_dir, 1),
                 "top": _letter(row_dir, -1), "bottom": _letter(row_dir, 1)})


def to_uint8(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Intensities -> 0..255 through the window (low -> 0, high -> 255); NaN -> 0."""
    lo, hi = window
    scaled = np.clip((values.astype(np.float32) - lo) / np.float32(hi - lo), 0.0, 1.0)
    return (np.nan_to_num(scaled, nan=0.0) * 255.0 + 0.5).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    """A (rows, cols) uint8 grey or (rows, cols, 3|4) uint8 RGB(A) array as PNG."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


@dataclass
class JobVolumes:
    """The three volumes of a succeeded job on the fixed grid (float32, (z, y, x)) and the
    fixed grid's planes. `windows` holds the auto windows of the fixed image and of the
    moving image (shared by registered and before, so the toggle compares like with like)."""

    grid: Grid
    arrays: dict[str, np.ndarray]
    windows: dict[str, tuple[float, float]]
    planes: dict[str, PlaneGeometry] = field(default_factory=dict)
    #: non-linear jobs: u(x) = T(x) - x of the full mapping on the fixed grid, (z, y, x, 3)
    #: float32 in LPS mm (outputs/displacement.nii.gz); None for rigid and affine jobs
    displacement: np.ndarray | None = None
    #: LPS mm point the first slices pass through, and why (see view_point); None: the
    #: fixed grid's centre
    view_point_mm: np.ndarray | None = None
    view_point: ViewPointSource = "fixed centre"

    @property
    def nbytes(self) -> int:
        extra = 0 if self.displacement is None else self.displacement.nbytes
        return sum(a.nbytes for a in self.arrays.values()) + extra

    def window_of(self, volume: str) -> tuple[float, float]:
        if volume in ("fixed", DISPLACEMENT_VOLUME):
            return self.windows[volume]
        return self.windows["moving"]

    def array(self, volume: str) -> np.ndarray:
        """The (z, y, x) array of a volume; `displacement` (non-linear jobs): |u| in mm,
        made on first use (KeyError for a job without a field)."""
        if volume == DISPLACEMENT_VOLUME and volume not in self.arrays:
            if self.displacement is None:
                raise KeyError(volume)
            magnitude = np.sqrt(np.sum(np.square(self.displacement, dtype=np.float32), axis=-1))
            self.arrays[volume] = magnitude
        return self.arrays[volume]


def view_point(result: Mapping[str, Any] | None, grid: Grid) -> tuple[np.ndarray, ViewPointSource]:
    """Where the viewer's first slices pass: result.json's `view_point_mm` (LPS mm) and
    `view_point` ("overlap" or "fixed centre"), or the fixed grid's centre when the result
    has no usable one (written before the field existed)."""
    result = result or {}
    source = result.get("view_point")
    try:
        point = np.asarray(result.get("view_point_mm"), dtype=np.float64)
    except (TypeError, ValueError):
        point = np.empty(0)
    if point.shape == (3,) and np.isfinite(point).all() and source in ("overlap", "fixed centre"):
        return point, source
    return grid.center, "fixed centre"


def _read_result(path: Path) -> dict[str, Any]:
    """result.json as a dict; {} when it cannot be read (the view point then falls back)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def input_paths(store: JobStore, manifest: Manifest) -> dict[str, Path]:
    """Role -> path of the job's inputs, refusing anything but server-named files in inputs/."""
    from disa.service.engine_surface import InputError

    folder = store.job_dir(manifest.id)
    paths = {role: folder / rel for role, rel in manifest.inputs.items()}
    for path in paths.values():
        if path.parent != folder / INPUTS_DIR:
            raise InputError("job inputs are malformed")
    return paths


def read_inputs(store: JobStore, manifest: Manifest, max_voxels: int,
                roles: tuple[str, ...] = ("fixed", "moving")) -> dict[str, sitk.Image]:
    """The job's input images (as the worker read them: same limits, same DICOM series)."""
    from disa.service.engine_surface import InputLimits, read_image

    limits = InputLimits(max_voxels=max_voxels)
    paths = input_paths(store, manifest)
    return {role: read_image(paths[role], limits, series_uid=manifest.series.get(role))
            for role in roles if role in paths}


def load_job_volumes(store: JobStore, manifest: Manifest, max_voxels: int) -> JobVolumes:
    """Read the fixed and moving inputs, registered.nii.gz, (non-linear jobs)
    displacement.nii.gz and result.json's view point; resample `before`."""
    from disa.service.engine_surface import REGISTERED_FILE, InputError, resample_moving

    images = read_inputs(store, manifest, max_voxels)
    fixed, moving = images["fixed"], images["moving"]
    registered = sitk.ReadImage(str(store.outputs_dir(manifest.id) / REGISTERED_FILE),
                                sitk.sitkFloat32)
    if registered.GetSize() != fixed.GetSize():
        raise InputError("registered.nii.gz is not on the fixed grid")
    before = resample_moving(moving, fixed, sitk.Transform())
    arrays = {"fixed": sitk.GetArrayFromImage(sitk.Cast(fixed, sitk.sitkFloat32)),
              "registered": sitk.GetArrayFromImage(registered),
              "before": sitk.GetArrayFromImage(before)}
    grid = Grid.from_image(fixed)
    windows = {"fixed": display_window(arrays["fixed"], WINDOW_PERCENTILES),
               "moving": display_window(sitk.GetArrayViewFromImage(moving),
                                        WINDOW_PERCENTILES)}
    displacement = None
    if DISPLACEMENT_FILE in manifest.files:
        field_image = sitk.ReadImage(str(store.outputs_dir(manifest.id) / DISPLACEMENT_FILE),
                                     sitk.sitkVectorFloat32)
        displacement = sitk.GetArrayFromImage(field_image)
        if displacement.shape != (*arrays["fixed"].shape, 3):
            raise InputError("displacement.nii.gz is not a 3-vector field on the fixed grid")
        largest = float(np.sqrt(np.max(np.sum(np.square(displacement, dtype=np.float32),
                                              axis=-1)))) if displacement.size else 0.0
        windows[DISPLACEMENT_VOLUME] = (0.0, max(largest, 1e-3))
    point, source = view_point(_read_result(store.outputs_dir(manifest.id) / RESULT_JSON), grid)
    return JobVolumes(grid=grid, arrays=arrays, windows=windows,
                      planes={name: plane_geometry(grid, name) for name in PLANES},
                      displacement=displacement, view_point_mm=point, view_point=source)


class VolumeCache:
    """Least recently used JobVolumes by job id, bounded by bytes; thread-safe.

    A job loads once even when several slice requests for it arrive together
    (one lock per job id while loading).
    """

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, JobVolumes] = OrderedDict()
        self._guard = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, store: JobStore, manifest: Manifest, max_voxels: int) -> JobVolumes:
        with self._guard:
            hit = self._entries.get(manifest.id)
            if hit is not None:
                self._entries.move_to_end(manifest.id)
                return hit
            loading = self._loading.setdefault(manifest.id, threading.Lock())
        with loading:
            with self._guard:
                hit = self._entries.get(manifest.id)
            if hit is not None:
                return hit
            try:
                volumes = load_job_volumes(store, manifest, max_voxels)
            except BaseException:
                with self._guard:
                    self._loading.pop(manifest.id, None)
                raise
            with self._guard:
                self._entries[manifest.id] = volumes
                self._loading.pop(manifest.id, None)
                self._evict()
            return volumes

    def _evict(self) -> None:
        total = sum(v.nbytes for v in self._entries.values())
        while len(self._entries) > 1 and total > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            total -= dropped.nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._entries
