"""Similarity heatmaps (the paper's Figure 1): one fixed point against a plane of the moving image.

Given a fixed point p (LPS mm) and a display plane of the fixed grid, the map
holds, for every pixel q of the plane's slice through p,

    s(q) = sim(F(p), M(T(q)))

where F and M are the fixed and moving descriptor maps (trilinear
interpolation) and T the job's mapping of fixed points to moving points (LPS
mm): its 4x4 matrix, or x + u(x) with the displacement field of a non-linear
job (`fixed_to_moving`). So the map is the similarity of p to the *registered*
moving image on the fixed plane grid: after a good registration its peak sits
at p itself. Pixels whose T(q) falls outside the moving descriptor grid have no
value (NaN, null in JSON).

    disa:  s = F(p) . M(x)             dot product (approximates LC2; higher = more alike)
    mind:  s = -||F(p) - M(x)||^2      negated SSD of MIND-SSC (0 = identical)

Descriptors are those the engine computes for a job (`pipeline.prepare` at the
job's working spacing, `pipeline.descriptor_maps` with the job's options, the
moving mask applied as the engine applies it), as float32 (the objective's int8
codes differ by at most 1/254 per component). The moving descriptors are on the
moving image's own grid axes, as in the global search. They are computed on the
first request and kept under the job folder:

    <job>/viewer-cache/<key>/{fixed,moving}.npy + grid.json

outside `outputs/` (the result-folder contract lists the official files only);
deleting the job removes them with it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from disa.core.errors import DisaError
from disa.jobs.manifest import Manifest
from disa.jobs.store import JobStore
from disa.service.engine_surface import DescriptorMap, Grid, atomic_write
from disa.service.engine_surface import similarity as similarity_spec
from disa.service.viewer import JobVolumes, PlaneGeometry, read_inputs

#: T: fixed points (N, 3) -> moving points (N, 3), LPS mm.
Mapping = Callable[[np.ndarray], np.ndarray]

CACHE_DIR = "viewer-cache"
log = logging.getLogger("disa.service")

_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


class DescriptorsUnavailable(DisaError):
    """This similarity cannot be computed by this service (the DISA model is missing)."""


@dataclass(frozen=True)
class Heatmap:
    """Similarity of the fixed point to the registered moving image on one fixed-grid slice.

    `values` is (height, width) float32, NaN where the moving image has no descriptors.
    """

    similarity: str
    kind: Literal["dot", "neg_ssd"]
    plane: str
    slice: int
    point_mm: np.ndarray
    point_pixel: np.ndarray
    moving_point_mm: np.ndarray
    values: np.ndarray
    descriptor_spacing_mm: float

    def peak(self) -> tuple[int, int] | None:
        """(column, row) of the highest value, or None when no pixel has one."""
        if not np.isfinite(self.values).any():
            return None
        row, col = np.unravel_index(int(np.nanargmax(self.values)), self.values.shape)
        return int(col), int(row)


# ------------------------------------------------------------------ descriptors


def check_available(similarity: str) -> None:
    """Raise DescriptorsUnavailable unless `similarity` can be computed here."""
    if not similarity_spec(similarity).needs_model:
        return
    from disa.service.engine_surface import default_card_path

    if default_card_path() is None:
        raise DescriptorsUnavailable(
            "the DISA heatmap needs the DISA model (model/weights/disa.onnx and its card), "
            "which this service does not have yet; the MIND-SSC heatmap works")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise DescriptorsUnavailable(
            "the DISA heatmap needs onnxruntime in the API process (pip install disa[cpu])"
        ) from None


def _cache_key(similarity: str, spacing: float, options: Any) -> str:
    """The cache folder's name: what the descriptors depend on (the network's weights, or
    the MIND-SSC radius and dilation) and the working spacing (mm)."""
    spec = similarity_spec(similarity)
    if spec.needs_model:
        from disa.service.engine_surface import default_card_path, load_model_card

        path = default_card_path()
        assert path is not None
        sha = load_model_card(path, verify=False).sha256
        return f"{spec.name}-{sha[:16]}-s{spacing:g}"
    return f"{spec.name}-r{options.mind_radius}-d{options.mind_dilation}-s{spacing:g}"


def _grid_json(grid: Grid) -> dict[str, Any]:
    return {"shape": list(grid.shape), "origin": grid.origin.tolist(),
            "spacing": grid.spacing.tolist(), "direction": grid.direction.ravel().tolist()}


def _grid_from_json(data: dict[str, Any]) -> Grid:
    return Grid(shape=tuple(int(n) for n in data["shape"]),  # type: ignore[arg-type]
                origin=np.asarray(data["origin"], dtype=np.float64),
                spacing=np.asarray(data["spacing"], dtype=np.float64),
                direction=np.asarray(data["direction"], dtype=np.float64).reshape(3, 3))


def _load_cached(folder: Path) -> tuple[DescriptorMap, DescriptorMap] | None:
    try:
        grids = json.loads((folder / "grid.json").read_text(encoding="utf-8"))
        return tuple(  # type: ignore[return-value]
            DescriptorMap(np.load(folder / f"{role}.npy", mmap_mode="r"),
                          _grid_from_json(grids[role]))
            for role in ("fixed", "moving"))
    except (OSError, KeyError, ValueError):
        return None


def compute_descriptors(store: JobStore, manifest: Manifest, similarity: str,
                        max_voxels: int) -> tuple[DescriptorMap, DescriptorMap, str]:
    """Fixed and moving descriptor maps of a job as the engine computes them; cache key."""
    from disa.service.engine_surface import (
        RegistrationOptions,
        auto_working_spacing,
        descriptor_maps,
        prepare,
    )

    options = RegistrationOptions.model_validate(manifest.options)
    images = read_inputs(store, manifest, max_voxels,
                         roles=("fixed", "moving", "fixed_mask", "moving_mask"))
    fixed, moving = images["fixed"], images["moving"]
    spacing = options.working_spacing or auto_working_spacing(fixed, moving, similarity)
    fixed_p = prepare(fixed, spacing, images.get("fixed_mask"), role="fixed")
    moving_p = prepare(moving, spacing, images.get("moving_mask"), role="moving")
    fixed_map, stride, _ = descriptor_maps(fixed_p, similarity, options)
    moving_map, _, _ = descriptor_maps(moving_p, similarity, options)
    if "moving_mask" in images:
        moving_map = moving_map.masked(moving_p.mask[::stride, ::stride, ::stride])
    return fixed_map, moving_map, _cache_key(similarity, spacing, options)


def job_descriptors(store: JobStore, manifest: Manifest, similarity: str,
                    max_voxels: int) -> tuple[DescriptorMap, DescriptorMap]:
    """The job's (fixed, moving) float32 descriptor maps, from the job folder's cache or
    computed once and stored there (memory-mapped on later requests)."""
    check_available(similarity)
    cache = store.job_dir(manifest.id) / CACHE_DIR
    with _locks_guard:
        lock = _locks.setdefault((manifest.id, similarity), threading.Lock())
    with lock:
        index = cache / f"{similarity}.json"  # similarity -> key of its current cache folder
        try:
            key = json.loads(index.read_text(encoding="utf-8"))["key"]
            cached = _load_cached(cache / key)
        except (OSError, KeyError, ValueError):
            cached = None
        if cached is not None:
            return cached
        fixed_map, moving_map, key = compute_descriptors(store, manifest, similarity, max_voxels)
        try:
            _store(cache, key, fixed_map, moving_map)
            _write_atomic(index, json.dumps({"key": key}).encode())
        except OSError as exc:  # a cache only: answer anyway, compute again next time
            log.warning("job %s: descriptor cache not written (%s)", manifest.id,
                        type(exc).__name__)
        return (DescriptorMap(fixed_map.as_float(), fixed_map.grid),
                DescriptorMap(moving_map.as_float(), moving_map.grid))


def _store(cache: Path, key: str, fixed_map: DescriptorMap, moving_map: DescriptorMap) -> None:
    """Write one cache folder atomically (temp folder, then rename into place)."""
    cache.mkdir(exist_ok=True)
    target = cache / key
    if target.is_dir():
        shutil.rmtree(target, ignore_errors=True)
    tmp = cache / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for role, dmap in (("fixed", fixed_map), ("moving", moving_map)):
            np.save(tmp / f"{role}.npy", np.ascontiguousarray(dmap.as_float()))
        (tmp / "grid.json").write_text(json.dumps(
            {"fixed": _grid_json(fixed_map.grid), "moving": _grid_json(moving_map.grid)}),
            encoding="utf-8")
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_atomic(path: Path, data: bytes) -> None:
    # A cache file: atomic for concurrent readers, but not worth an fsync.
    atomic_write(path, lambda fh: fh.write(data), durable=False)


# --------------------------------------------------------------------- sampling


def trilinear(dmap: DescriptorMap, points: np.ndarray) -> np.ndarray:
    """Descriptors (N, C) at LPS mm points (N, 3), trilinear; NaN rows outside the grid
    (the engine's DescriptorMap.sample)."""
    return dmap.sample(points)


def similarity_values(fixed_descriptor: np.ndarray, moving_descriptors: np.ndarray,
                      similarity: str) -> np.ndarray:
    """s per row of `moving_descriptors` (N, C): dot product (disa) or -SSD (mind), as the
    engine's Similarity.heatmap_values computes them."""
    return similarity_spec(similarity).heatmap_values(fixed_descriptor, moving_descriptors)


def apply_matrix(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """x' = A x + t for a 4x4 homogeneous matrix and points (N, 3) in LPS mm."""
    matrix = np.asarray(matrix, dtype=np.float64)
    return np.asarray(points, dtype=np.float64) @ matrix[:3, :3].T + matrix[:3, 3]


def fixed_to_moving(volumes: JobVolumes, matrix: np.ndarray) -> Mapping:
    """The job's mapping T of fixed points to moving points (LPS mm), (N, 3) -> (N, 3).

    Rigid and affine jobs: the 4x4 matrix. Non-linear jobs (a displacement.nii.gz,
    u = T(x) - x of the full mapping on the fixed grid): x + u(x), u interpolated
    trilinearly; NaN outside the fixed grid, where the field is not defined.
    """
    if volumes.displacement is None:
        return lambda points: apply_matrix(matrix, points)
    field = DescriptorMap(volumes.displacement, volumes.grid)

    def mapping(points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        return points + trilinear(field, points).astype(np.float64)

    return mapping


class PointOutside(DisaError, ValueError):
    """The fixed point has no descriptor (outside the fixed descriptor grid)."""


def compute_heatmap(fixed_map: DescriptorMap, moving_map: DescriptorMap, mapping: Mapping,
                    plane: PlaneGeometry, point_mm: np.ndarray, similarity: str) -> Heatmap:
    """The heatmap of fixed point `point_mm` on the plane's slice through it (module doc);
    `mapping` is the job's T (fixed_to_moving)."""
    point_mm = np.asarray(point_mm, dtype=np.float64).reshape(3)
    pixel = (plane.physical_to_pixel @ np.append(point_mm, 1.0))[:3]
    index = int(np.clip(np.rint(pixel[2]), 0, plane.count - 1))
    f = trilinear(fixed_map, point_mm[None, :])[0]
    if not np.isfinite(f).all():
        raise PointOutside(f"the point ({', '.join(f'{v:.1f}' for v in point_mm)}) mm lies "
                           "outside the fixed image's descriptor grid")
    moved = mapping(plane.pixel_points(index))
    values = similarity_values(f, trilinear(moving_map, moved), similarity)
    kind = similarity_spec(similarity).heatmap_kind
    assert kind is not None  # (similarity_values refused a similarity without a heatmap)
    return Heatmap(similarity=similarity, kind=kind,
                   plane=plane.name, slice=index, point_mm=point_mm, point_pixel=pixel[:2],
                   moving_point_mm=mapping(point_mm[None, :])[0],
                   values=values.reshape(plane.height, plane.width),
                   descriptor_spacing_mm=float(np.min(fixed_map.grid.spacing)))


# Colour map of heatmap PNGs: low -> dark blue, high -> yellow (stops in [0, 1]).
_STOPS = np.array([0.0, 0.3, 0.6, 0.85, 1.0])
_RGB = np.array([[20, 12, 80], [60, 70, 200], [30, 170, 150], [180, 215, 60], [255, 240, 50]],
                dtype=np.float64)


def colour_map(values: np.ndarray) -> np.ndarray:
    """(rows, cols) values -> RGBA uint8, min..max of the finite values; NaN transparent."""
    finite = np.isfinite(values)
    out = np.zeros((*values.shape, 4), dtype=np.uint8)
    if not finite.any():
        return out
    lo, hi = float(values[finite].min()), float(values[finite].max())
    v = np.where(finite, (values - lo) / (hi - lo if hi > lo else 1.0), 0.0)
    for k in range(3):
        out[..., k] = (np.interp(v, _STOPS, _RGB[:, k]) + 0.5).astype(np.uint8)
    out[..., 3] = np.where(finite, 255, 0)
    return out
