"""/v1/jobs/{id}/viewer, /slices and /heatmap: what the web page's result viewer reads.

Only for succeeded jobs (409 otherwise). Volumes are the fixed image, the
registered moving image and the moving image before registration (identity), all
on the fixed grid; see `disa.service.viewer` for planes and orientation and
`disa.service.heatmap` for the similarity maps. Coordinates are LPS millimetres.
"""

from __future__ import annotations

import json
import math
import threading
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from disa.jobs.manifest import JobNotFound, Manifest
from disa.jobs.store import RESULT_JSON
from disa.service.deps import CallerDep, JobIdPath, RuntimeDep, read_visible, require_api_key
from disa.service.engine_surface import InputError, UnpackBusy
from disa.service.models import error_responses
from disa.service.runtime import Runtime
from disa.service.security import Caller

if TYPE_CHECKING:  # numpy, SimpleITK and scipy load on the first viewer request, not at start
    import numpy as np

    from disa.service.heatmap import Heatmap
    from disa.service.viewer import JobVolumes, PlaneGeometry, VolumeCache

Volume = Literal["fixed", "registered", "before", "displacement"]
Plane = Literal["axial", "coronal", "sagittal"]
HeatmapSimilarity = Literal["disa", "mind"]

router = APIRouter(prefix="/jobs", tags=["viewer"], dependencies=[Depends(require_api_key)],
                   responses=error_responses(401, 403))

_cache_guard = threading.Lock()
# allow_inf_nan=False: a NaN is refused as such (describe() says not-a-number), not as
# out of range.
_COORDINATE = {"ge": -1e6, "le": 1e6, "allow_inf_nan": False}
_SLICE_HEADERS = {"Cache-Control": "private, max-age=86400"}


class PlaneOut(BaseModel):
    """A display plane of the fixed grid (radiological view; see GET .../viewer)."""

    name: str
    width: int = Field(description="pixels per row (columns)")
    height: int = Field(description="rows")
    count: int = Field(description="slices: valid {index} values are 0..count-1")
    pixel_spacing_mm: list[float] = Field(description="(column, row) pixel size in mm")
    column_axis: int = Field(description="fixed grid axis along columns (0=i, 1=j, 2=k)")
    row_axis: int = Field(description="fixed grid axis along rows")
    normal_axis: int = Field(description="fixed grid axis the slice index runs along")
    pixel_to_physical: list[list[float]] = Field(
        description="4x4: (column, row, slice, 1) -> LPS mm; pixel centres at integers")
    physical_to_pixel: list[list[float]] = Field(description="4x4: LPS mm -> (column, row, "
                                                             "slice, 1)")
    letters: dict[str, str] = Field(description="patient direction at the left, right, top "
                                                "and bottom edges (R/L, A/P, S/I)")


class ViewerOut(BaseModel):
    """Geometry of the fixed grid, its display planes and the registration matrix."""

    job_id: str
    size: list[int] = Field(description="fixed grid size (i, j, k) in voxels")
    spacing: list[float] = Field(description="fixed grid spacing (i, j, k) in mm")
    origin: list[float] = Field(description="LPS mm centre of voxel (0, 0, 0)")
    direction: list[float] = Field(description="3x3 direction cosines, row-major; column k is "
                                               "grid axis k in LPS")
    index_to_physical: list[list[float]] = Field(description="4x4: (i, j, k, 1) -> LPS mm")
    matrix_fixed_to_moving: list[list[float]] = Field(
        description="4x4 T: a fixed point p (LPS mm) corresponds to the moving point T p")
    planes: dict[str, PlaneOut]
    volumes: list[str] = Field(description="volume names for .../slices/{volume}/... "
                                           "(displacement: non-linear jobs only, |u| in mm)")
    windows: dict[str, list[float]] = Field(
        description="default display window (low, high) in image units: 'fixed' for the fixed "
                    "image, 'moving' for registered and before; non-linear jobs: "
                    "'displacement' (0, largest |u| in mm)")
    heatmaps: dict[str, str | None] = Field(
        description="similarity -> null when GET .../heatmap can compute it, else the reason")
    mapping: Literal["linear", "displacement"] = Field(
        description="linear: T p = matrix_fixed_to_moving p; displacement (non-linear jobs): "
                    "T p = p + u(p) with displacement.nii.gz, so ask GET .../point for T p")
    view_point_mm: list[float] = Field(
        description="LPS mm point the first slices pass through, as qa.png's planes do: the "
                    "centre of the region where the registered moving image has data")
    view_point: Literal["overlap", "fixed centre"] = Field(
        description="overlap: view_point_mm is that centre (result.json's view_point_mm); "
                    "fixed centre: the fixed grid's centre (no such region, or a result "
                    "written before result.json recorded it)")


class PointOut(BaseModel):
    """A fixed point and the corresponding moving point."""

    point_mm: list[float] = Field(description="the fixed point p, LPS mm")
    index: list[float] = Field(description="p as a continuous fixed grid index (i, j, k)")
    moving_point_mm: list[float] = Field(description="T p in the moving image's frame, LPS mm")
    mapping: Literal["linear", "displacement"]


class HeatmapPeakOut(BaseModel):
    column: int
    row: int
    point_mm: list[float] = Field(description="LPS mm of the pixel with the highest value")
    value: float


class HeatmapNearestPeakOut(HeatmapPeakOut):
    distance_mm: float = Field(description="from the point's pixel to this peak, mm")


class HeatmapOut(BaseModel):
    """Similarity of the fixed point to the registered moving image on one fixed-grid slice."""

    similarity: str = Field(description="disa or mind")
    kind: Literal["dot", "neg_ssd"] = Field(
        description="dot: F(p).M(T q); neg_ssd: -||F(p) - M(T q)||^2 (higher = more alike)")
    plane: str
    slice: int = Field(description="slice index of the plane through the point")
    width: int
    height: int
    point_mm: list[float] = Field(description="the fixed point p, LPS mm")
    point_pixel: list[float] = Field(description="p as (column, row) on the slice")
    moving_point_mm: list[float] = Field(description="T p: the same point in the moving "
                                                     "image's frame, LPS mm")
    values: list[float | None] = Field(description="height*width values, row-major from the "
                                                   "top left; null where T q is outside the "
                                                   "moving image")
    min: float | None
    max: float | None
    peak: HeatmapPeakOut | None = Field(description="the slice's highest value (global peak)")
    descriptor_spacing_mm: float
    point_value: float | None = Field(None, description="the value at the point's pixel")
    point_percentile: float | None = Field(
        None, description="percent of the slice's pixels (with a value) whose value is at most "
                          "the point's: 100 = the point scores highest")
    point_rank: int | None = Field(None, description="1 = the highest value on the slice")
    nearest_peak: HeatmapNearestPeakOut | None = Field(
        None, description="the local maximum (highest within one descriptor voxel) nearest the "
                          "point; distance 0 when the point is on it")


def _volume_cache(request: Request) -> VolumeCache:
    """The app's cache of loaded job volumes (made on first use)."""
    from disa.service.viewer import VolumeCache

    state = request.app.state
    with _cache_guard:
        cache = getattr(state, "viewer_cache", None)
        if cache is None:
            cache = state.viewer_cache = VolumeCache()
    return cache


def _succeeded(runtime: Runtime, job_id: str, caller: Caller) -> Manifest:
    """The caller's job (404 for another key's), 409 unless it succeeded."""
    manifest = read_visible(runtime.store, job_id, caller)
    if manifest.state != "succeeded":
        raise HTTPException(status_code=409, detail=f"job is {manifest.state}: the viewer "
                                                    "needs a job that has succeeded")
    return manifest


def _busy(exc: UnpackBusy) -> HTTPException:
    """503 with Retry-After: a DICOM input found the process's unpack pool full (the
    server is busy; the job's inputs are fine)."""
    from disa.service.routes_jobs import UNPACK_RETRY_AFTER_S

    return HTTPException(status_code=503, detail=str(exc),
                         headers={"Retry-After": str(UNPACK_RETRY_AFTER_S)})


def _volumes(request: Request, runtime: Runtime, manifest: Manifest) -> JobVolumes:
    try:
        return _volume_cache(request).get(runtime.store, manifest, runtime.settings.max_voxels)
    except UnpackBusy as exc:
        raise _busy(exc) from None
    except InputError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    except (JobNotFound, FileNotFoundError):
        raise HTTPException(status_code=404, detail="no such job") from None


def _matrix(runtime: Runtime, manifest: Manifest) -> np.ndarray:
    """The job's 4x4 fixed -> moving matrix (manifest summary, else result.json)."""
    import numpy as np

    matrix = (manifest.result or {}).get("matrix_fixed_to_moving")
    if matrix is None:
        path = runtime.store.outputs_dir(manifest.id) / RESULT_JSON
        matrix = json.loads(path.read_text(encoding="utf-8"))["matrix_fixed_to_moving"]
    return np.asarray(matrix, dtype=np.float64).reshape(4, 4)


def _plane_out(plane: PlaneGeometry) -> PlaneOut:
    return PlaneOut(name=plane.name, width=plane.width, height=plane.height, count=plane.count,
                    pixel_spacing_mm=list(plane.pixel_spacing_mm),
                    column_axis=plane.column_axis, row_axis=plane.row_axis,
                    normal_axis=plane.normal_axis,
                    pixel_to_physical=plane.pixel_to_physical.tolist(),
                    physical_to_pixel=plane.physical_to_pixel.tolist(), letters=plane.letters)


def _unavailable(similarity: str) -> str | None:
    from disa.service.heatmap import DescriptorsUnavailable, check_available

    try:
        check_available(similarity)
    except DescriptorsUnavailable as exc:
        return str(exc)
    return None


@router.get("/{job_id}/viewer", response_model=ViewerOut,
            summary="Fixed grid geometry, display planes and matrix of a succeeded job",
            responses=error_responses(404, 409, 422, 503))
def get_viewer(job_id: JobIdPath, runtime: RuntimeDep, request: Request,
               caller: CallerDep) -> ViewerOut:
    manifest = _succeeded(runtime, job_id, caller)
    volumes = _volumes(request, runtime, manifest)
    grid = volumes.grid
    return ViewerOut(
        job_id=job_id, size=list(grid.size_xyz), spacing=grid.spacing.tolist(),
        origin=grid.origin.tolist(), direction=grid.direction.ravel().tolist(),
        index_to_physical=grid.index_to_physical.tolist(),
        matrix_fixed_to_moving=_matrix(runtime, manifest).tolist(),
        planes={name: _plane_out(p) for name, p in volumes.planes.items()},
        volumes=[v for v in get_args(Volume) if v != "displacement"
                 or volumes.displacement is not None],
        windows={k: list(v) for k, v in volumes.windows.items()},
        heatmaps={s: _unavailable(s) for s in get_args(HeatmapSimilarity)},
        mapping="linear" if volumes.displacement is None else "displacement",
        view_point_mm=(grid.center if volumes.view_point_mm is None
                       else volumes.view_point_mm).tolist(),
        view_point=volumes.view_point)


@router.get("/{job_id}/point", response_model=PointOut,
            summary="The moving point T p corresponding to a fixed point p (LPS mm)",
            responses=error_responses(404, 409, 422, 503))
def get_point(job_id: JobIdPath, runtime: RuntimeDep, request: Request, caller: CallerDep,
              x: Annotated[float, Query(**_COORDINATE, description="fixed point, LPS mm")],
              y: Annotated[float, Query(**_COORDINATE, description="fixed point, LPS mm")],
              z: Annotated[float, Query(**_COORDINATE, description="fixed point, LPS mm")]
              ) -> PointOut:
    """T p with the job's full mapping: its matrix, or p + u(p) for non-linear jobs (422 when p
    lies outside the fixed grid, where their displacement field is not defined)."""
    import numpy as np

    from disa.service.heatmap import fixed_to_moving

    manifest = _succeeded(runtime, job_id, caller)
    volumes = _volumes(request, runtime, manifest)
    p = np.array([[x, y, z]], dtype=np.float64)
    moved = fixed_to_moving(volumes, _matrix(runtime, manifest))(p)[0]
    if not np.isfinite(moved).all():
        raise HTTPException(status_code=422, detail="the point lies outside the fixed grid, "
                                                    "where the displacement field is defined")
    return PointOut(point_mm=p[0].tolist(), index=volumes.grid.to_index(p)[0].tolist(),
                    moving_point_mm=moved.tolist(),
                    mapping="linear" if volumes.displacement is None else "displacement")


@router.get("/{job_id}/slices/{volume}/{plane}/{index}", response_class=Response,
            summary="One slice of the fixed, registered or before volume, window applied",
            responses={200: {"description": "PNG (8-bit grey) or raw bytes (width*height "
                                            "uint8, row-major from the top left)",
                             "headers": {"X-Slice-Width": {"schema": {"type": "integer"}},
                                         "X-Slice-Height": {"schema": {"type": "integer"}}},
                             "content": {"image/png": {"schema": {"type": "string",
                                                                  "format": "binary"}},
                                         "application/octet-stream": {
                                             "schema": {"type": "string",
                                                        "format": "binary"}}}},
                       **error_responses(404, 409, 422, 503)})
def get_slice(job_id: JobIdPath, volume: Volume, plane: Plane,
              index: Annotated[int, Path(ge=0, le=100_000, description="slice index along "
                                                                       "the plane's normal")],
              runtime: RuntimeDep, request: Request, caller: CallerDep,
              format: Annotated[Literal["png", "raw"], Query(
                  description="png: 8-bit grey PNG; raw: width*height bytes")] = "png",
              window: Annotated[float | None, Query(gt=0, le=1e9, allow_inf_nan=False,
                                                    description=(
                  "window width in image units (with level); default: the volume's "
                  "0.5-99.5 percentile range"))] = None,
              level: Annotated[float | None, Query(ge=-1e9, le=1e9, allow_inf_nan=False,
                                                   description=(
                  "window centre in image units (with window)"))] = None) -> Response:
    """Slice `index` of a plane in display orientation (see GET .../viewer), mapped
    through the window to 0..255. Registered and before share the moving image's window."""
    from disa.service.viewer import png_bytes, to_uint8

    if (window is None) != (level is None):
        raise HTTPException(status_code=422, detail="give both window and level, or neither")
    manifest = _succeeded(runtime, job_id, caller)
    volumes = _volumes(request, runtime, manifest)
    geometry = volumes.planes[plane]
    if index >= geometry.count:
        raise HTTPException(status_code=422, detail=f"slice index {index} is outside "
                                                    f"0..{geometry.count - 1} of the {plane} "
                                                    "plane")
    if volume == "displacement" and volumes.displacement is None:
        raise HTTPException(status_code=422, detail="this job has no displacement field "
                                                    "(rigid and affine jobs)")
    bounds = (volumes.window_of(volume) if window is None or level is None
              else (level - window / 2.0, level + window / 2.0))
    pixels = to_uint8(geometry.take(volumes.array(volume), index), bounds)
    headers = {**_SLICE_HEADERS, "X-Slice-Width": str(geometry.width),
               "X-Slice-Height": str(geometry.height)}
    if format == "raw":
        return Response(pixels.tobytes(), media_type="application/octet-stream",
                        headers=headers)
    return Response(png_bytes(pixels), media_type="image/png", headers=headers)


@router.get("/{job_id}/heatmap", response_model=HeatmapOut,
            summary="Similarity of a fixed point to every pixel of a registered moving plane",
            responses={200: {"description": "values (JSON) or a colour-mapped PNG",
                             "content": {"image/png": {"schema": {"type": "string",
                                                                  "format": "binary"}}}},
                       **error_responses(404, 409, 422, 503)})
def get_heatmap(job_id: JobIdPath, runtime: RuntimeDep, request: Request, caller: CallerDep,
                x: Annotated[float, Query(**_COORDINATE, description="fixed point, LPS mm")],
                y: Annotated[float, Query(**_COORDINATE, description="fixed point, LPS mm")],
                z: Annotated[float, Query(**_COORDINATE, description="fixed point, LPS mm")],
                plane: Plane = "axial",
                similarity: Annotated[HeatmapSimilarity, Query(
                    description="disa: descriptor dot product; mind: -SSD of MIND-SSC")]
                = "mind",
                format: Annotated[Literal["json", "png"], Query(
                    description="json: values; png: colour map (min..max), transparent "
                                "where undefined")] = "json") -> Any:
    """For every pixel q of the fixed grid's `plane` slice through p = (x, y, z), the
    similarity of the fixed descriptor at p to the moving descriptor at T q (T: the job's
    fixed -> moving mapping: its matrix, or with the displacement field of non-linear jobs).
    Descriptors are computed on the first request and cached in the job folder. 409 while the
    job has not succeeded or when the DISA model is missing."""
    import numpy as np

    from disa.service.heatmap import (
        DescriptorsUnavailable,
        PointOutside,
        colour_map,
        compute_heatmap,
        fixed_to_moving,
        job_descriptors,
    )
    from disa.service.viewer import png_bytes

    manifest = _succeeded(runtime, job_id, caller)
    volumes = _volumes(request, runtime, manifest)
    try:
        fixed_map, moving_map = job_descriptors(runtime.store, manifest, similarity,
                                                runtime.settings.max_voxels)
        mapping = fixed_to_moving(volumes, _matrix(runtime, manifest))
        heatmap = compute_heatmap(fixed_map, moving_map, mapping, volumes.planes[plane],
                                  np.array([x, y, z]), similarity)
    except DescriptorsUnavailable as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    except UnpackBusy as exc:
        raise _busy(exc) from None
    except (InputError, PointOutside) as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    except (JobNotFound, FileNotFoundError):  # deleted meanwhile
        raise HTTPException(status_code=404, detail="no such job") from None
    if format == "png":
        return Response(png_bytes(colour_map(heatmap.values)), media_type="image/png")
    return JSONResponse(_heatmap_json(heatmap, volumes.planes[plane]))


def _heatmap_json(heatmap: Heatmap, plane: PlaneGeometry) -> dict[str, Any]:
    import numpy as np

    values = heatmap.values
    finite = np.isfinite(values)
    peak = heatmap.peak()
    peak_out = None
    if peak is not None:
        col, row = peak
        point = (plane.pixel_to_physical @ np.array([col, row, heatmap.slice, 1.0]))[:3]
        peak_out = {"column": col, "row": row, "point_mm": point.tolist(),
                    "value": float(values[row, col])}
    return {
        "similarity": heatmap.similarity, "kind": heatmap.kind, "plane": heatmap.plane,
        "slice": heatmap.slice, "width": int(values.shape[1]), "height": int(values.shape[0]),
        "point_mm": heatmap.point_mm.tolist(), "point_pixel": heatmap.point_pixel.tolist(),
        "moving_point_mm": heatmap.moving_point_mm.tolist(),
        "values": [float(v) if math.isfinite(v) else None for v in values.ravel().tolist()],
        "min": float(values[finite].min()) if finite.any() else None,
        "max": float(values[finite].max()) if finite.any() else None,
        "peak": peak_out, "descriptor_spacing_mm": heatmap.descriptor_spacing_mm,
        **_standing_json(heatmap, plane),
    }


def _standing_json(heatmap: Heatmap, plane: PlaneGeometry) -> dict[str, Any]:
    """point_value, point_percentile, point_rank and nearest_peak (heatmap_stats)."""
    from disa.service.heatmap_stats import standing

    s = standing(heatmap, plane)
    nearest = None
    if s.peak_column is not None and s.peak_point_mm is not None:
        nearest = {"column": s.peak_column, "row": s.peak_row,
                   "point_mm": list(s.peak_point_mm), "value": s.peak_value,
                   "distance_mm": s.peak_distance_mm}
    return {"point_value": s.value, "point_percentile": s.percentile, "point_rank": s.rank,
            "nearest_peak": nearest}
