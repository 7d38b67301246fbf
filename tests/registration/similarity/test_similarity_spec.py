"""The Similarity interface: each similarity's properties, the lookup, and the heatmap's
sampling and values against the numpy formulas service/heatmap.py used before they moved
into the engine (kept here as the oracle)."""

from __future__ import annotations

import numpy as np
import pytest

from disa.core.errors import InputError
from disa.core.grid import Grid
from disa.registration.options import RegistrationOptions
from disa.registration.similarity.descriptor_map import DescriptorMap
from disa.registration.similarity.spec import SIMILARITIES, Similarity, similarity

# ------------------------------------------------------------ the former heatmap code

_CORNERS = tuple((dx, dy, dz) for dz in (0, 1) for dy in (0, 1) for dx in (0, 1))


def _old_trilinear(dmap: DescriptorMap, points: np.ndarray) -> np.ndarray:
    """service/heatmap.trilinear as it was before DescriptorMap.sample."""
    data = dmap.data
    shape_xyz = np.array(dmap.grid.size_xyz)
    idx = dmap.grid.to_index(np.asarray(points, dtype=np.float64).reshape(-1, 3))
    eps = 1e-6
    inside = np.all((idx >= -eps) & (idx <= shape_xyz - 1 + eps), axis=1)
    idx = np.clip(idx, 0.0, shape_xyz - 1.0)
    base = np.minimum(np.floor(idx).astype(np.int64), np.maximum(shape_xyz - 2, 0))
    frac = (idx - base).astype(np.float32)
    out = np.zeros((idx.shape[0], data.shape[3]), dtype=np.float32)
    for dx, dy, dz in _CORNERS:
        weight = ((frac[:, 0] if dx else 1.0 - frac[:, 0])
                  * (frac[:, 1] if dy else 1.0 - frac[:, 1])
                  * (frac[:, 2] if dz else 1.0 - frac[:, 2]))
        x = np.minimum(base[:, 0] + dx, shape_xyz[0] - 1)
        y = np.minimum(base[:, 1] + dy, shape_xyz[1] - 1)
        z = np.minimum(base[:, 2] + dz, shape_xyz[2] - 1)
        out += weight[:, None] * np.asarray(data[z, y, x], dtype=np.float32)
    out[~inside] = np.nan
    return out


def _old_values(f: np.ndarray, m: np.ndarray, name: str) -> np.ndarray:
    """service/heatmap.similarity_values as it was before Similarity.heatmap_values."""
    f64, m64 = f.astype(np.float64), m.astype(np.float64)
    if name == "disa":
        return (m64 @ f64).astype(np.float32)
    return (-np.sum((m64 - f64) ** 2, axis=1)).astype(np.float32)


def _random_map(rng: np.random.Generator, shape: tuple[int, int, int], channels: int
                ) -> DescriptorMap:
    angle = 0.3
    direction = np.array([[np.cos(angle), -np.sin(angle), 0.0],
                          [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    grid = Grid(shape=shape, origin=np.array([-20.0, 5.0, 12.5]),
                spacing=np.array([2.0, 2.5, 3.0]), direction=direction)
    data = rng.standard_normal((*shape, channels)).astype(np.float32)
    return DescriptorMap(data, grid)


# ---------------------------------------------------------------------------- tests


def test_properties_of_each_similarity() -> None:
    disa, mind, lc2 = similarity("disa"), similarity("mind"), similarity("lc2")
    assert set(SIMILARITIES) == {"disa", "mind", "lc2"}
    assert (disa.cost_kind, mind.cost_kind, lc2.cost_kind) == ("dot", "ssd", "lc2")
    assert (disa.objective_kind, mind.objective_kind) == ("dot", "ssd")
    with pytest.raises(ValueError):
        _ = lc2.objective_kind
    assert disa.similarity_value(-0.4) == 0.4 and lc2.similarity_value(-0.7) == 0.7
    assert mind.similarity_value(0.3) == 0.3
    assert (disa.reorient_passes, mind.reorient_passes) == (4, 8)
    assert (disa.refine_smoothing_voxels, mind.refine_smoothing_voxels) == (0.0, 1.0)
    assert [s.name for s in SIMILARITIES.values() if s.oriented_search] == ["mind"]
    assert [s.name for s in SIMILARITIES.values() if s.needs_model] == ["disa"]
    assert (disa.uses_descriptors, mind.uses_descriptors, lc2.uses_descriptors) == (
        True, True, False)
    assert (disa.heatmap_kind, mind.heatmap_kind, lc2.heatmap_kind) == ("dot", "neg_ssd", None)


def test_footprint_and_validity_erosion() -> None:
    options = RegistrationOptions(mind_radius=1, mind_dilation=2)
    mind, disa = similarity("mind"), similarity("disa")
    assert mind.descriptor_footprint_voxels(options) == 4
    assert mind.validity_erosion_voxels(1, options) == 3
    assert disa.descriptor_footprint_voxels(options, receptive_field_voxels=45) == 23
    assert disa.validity_erosion_voxels(4, options) == 4
    with pytest.raises(ValueError):
        disa.descriptor_footprint_voxels(options)


def test_lookup() -> None:
    mind = similarity("mind")
    assert isinstance(mind, Similarity) and mind.name == "mind"
    assert similarity(mind) is mind
    with pytest.raises(InputError, match="unknown similarity 'ncc'"):
        similarity("ncc")
    with pytest.raises(InputError):
        similarity("lc2").heatmap_values(np.zeros(3), np.zeros((2, 3)))


def test_sample_equals_the_former_heatmap_trilinear() -> None:
    rng = np.random.default_rng(5)
    for shape, channels in (((7, 9, 11), 12), ((1, 6, 5), 3), ((4, 4, 2), 1)):
        dmap = _random_map(rng, shape, channels)
        # Points inside, on the corner voxel centres and outside the grid.
        index = rng.uniform(-1.5, 1.0, (500, 3)) * np.array(dmap.grid.size_xyz)[None, :] * 1.2
        corners = np.array([[0, 0, 0], np.array(dmap.grid.size_xyz) - 1], dtype=np.float64)
        points = dmap.grid.to_physical(np.vstack([np.abs(index), index, corners]))
        np.testing.assert_array_equal(dmap.sample(points), _old_trilinear(dmap, points))


def test_heatmap_values_equal_the_former_formulas() -> None:
    rng = np.random.default_rng(11)
    for name in ("disa", "mind"):
        for channels in (1, 12, 16):
            f = rng.standard_normal(channels).astype(np.float32)
            m = rng.standard_normal((300, channels)).astype(np.float32)
            m[::17] = np.nan  # rows outside the moving grid stay NaN
            got = similarity(name).heatmap_values(f, m)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, _old_values(f, m, name))
