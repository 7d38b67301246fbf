"""The translation scan: block sums, the shift it finds on a cropped copy (axes aligned
and turned), the FFT's wrap-around, and the range filter on its poses."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from disa.core.grid import Grid
from disa.registration.search import translation_scan
from disa.registration.search.translation_scan import (
    SUPPRESS_BLOCKS,
    BinScan,
    _channel_products,
    _chunks_by_cost,
    _lowest_admissible,
    _spectrum,
    block_factor,
    other_terms,
    sampled_terms,
    scan_poses,
    within_ranges,
)
from disa.registration.similarity.descriptor_map import DescriptorMap
from disa.registration.transform.parametric import TransformModel, rigid_parameters

SPACING = 2.0


def _descriptors(shape: tuple[int, int, int], seed: int, channels: int = 12) -> np.ndarray:
    """Smooth random descriptors in [0, 1] (MIND-like), (Z, Y, X, C) float32."""
    rng = np.random.default_rng(seed)
    data = ndimage.gaussian_filter(rng.normal(size=(*shape, channels)), (2.5, 2.5, 2.5, 0))
    data = (data - data.min()) / (data.max() - data.min())
    return np.ascontiguousarray(data.astype(np.float32))


def test_block_sums_match_numpy() -> None:
    data = _descriptors((11, 9, 10), 1, channels=3)
    grid = Grid((11, 9, 10), np.zeros(3), np.full(3, SPACING), np.eye(3))
    weights = np.random.default_rng(2).uniform(0.0, 1.0, (11, 9, 10)).astype(np.float32)
    weights[weights < 0.3] = 0.0
    terms = sampled_terms(DescriptorMap(data, grid), weights, 3)
    w = weights / weights.sum(dtype=np.float64)
    block = (slice(3, 6), slice(0, 3), slice(6, 9))  # block (1, 0, 2); the last voxels dropped
    assert terms.weight.shape == (3, 3, 3)
    assert terms.weight[1, 0, 2] == pytest.approx(w[block].sum(), rel=1e-5)
    assert terms.descriptor[1, 0, 2] == pytest.approx(
        (data[block] * w[block][..., None]).sum(axis=(0, 1, 2)), rel=1e-5)
    assert terms.square[1, 0, 2] == pytest.approx(
        (w[block] * (data[block] ** 2).sum(axis=3)).sum(), rel=1e-5)
    assert terms.weight.sum() == pytest.approx(w[:9, :9, :9].sum(), rel=1e-5)
    # Block centres: voxel (1, 1, 1) of the first block.
    assert np.allclose(terms.origin, [SPACING] * 3) and terms.spacing == 3 * SPACING
    other = other_terms(DescriptorMap(data, grid, valid=np.ones((11, 9, 10), np.float32)), 3)
    assert other.weight[1, 0, 2] == pytest.approx(1.0)  # means, not sums
    assert other.descriptor[1, 0, 2] == pytest.approx(data[block].mean(axis=(0, 1, 2)), rel=1e-5)


def _case(rotation: np.ndarray, offset_voxels: tuple[int, int, int], kind: str):
    """The other map on a 64 x 60 x 56 grid (axes D_b), the sampled one a 24^3 crop of it on
    axes D_a = R^T D_b: under y = R x + tau with the returned tau its voxel i lies on the
    other's voxel i + offset (x, y, z), so (R, tau) is the truth."""
    d_b = Rotation.from_rotvec([0.1, -0.2, 0.3]).as_matrix()
    other_grid = Grid((56, 60, 64), np.array([-60.0, 10.0, 5.0]), np.full(3, SPACING), d_b)
    data = _descriptors((56, 60, 64), 3)
    if kind == "dot":
        data = data - data.mean(axis=3, keepdims=True)
    ox, oy, oz = offset_voxels
    crop = np.ascontiguousarray(data[oz:oz + 24, oy:oy + 24, ox:ox + 24])
    d_a = rotation.T @ d_b
    sampled_grid = Grid((24, 24, 24), np.array([3.0, -7.0, 11.0]), np.full(3, SPACING), d_a)
    target = other_grid.to_physical(np.array([offset_voxels], float))[0]
    tau = target - rotation @ sampled_grid.origin
    valid = np.ones((56, 60, 64), np.float32)
    return (DescriptorMap(crop, sampled_grid), DescriptorMap(data, other_grid, valid=valid),
            tau)


@pytest.mark.parametrize("kind", ["ssd", "dot"])
@pytest.mark.parametrize("turned", [False, True])
def test_the_best_scanned_pose_lies_within_a_block_of_a_cropped_copys_truth(
        kind: str, turned: bool) -> None:
    rotation = (Rotation.from_rotvec([0.3, 0.2, -0.4]).as_matrix() if turned else np.eye(3))
    sampled, other, tau = _case(rotation, (22, 13, 17), kind)
    factor = block_factor(SPACING)
    assert factor == 5
    weights = np.ones(sampled.grid.shape, np.float32)
    center = np.array([10.0, 20.0, 30.0])
    poses = scan_poses([BinScan(sampled_terms(sampled, weights, factor), rotation, 0.5)],
                       other_terms(other, factor), kind, center, count=4)
    assert 1 <= len(poses) <= 4
    model = TransformModel("rigid", center)
    points = sampled.grid.to_physical(np.indices((24, 24, 24)).reshape(3, -1).T[::97])
    truth = points @ rotation.T + tau
    mapped = [points @ m[:, :3].T + m[:, 3] for m in model.matrices(np.asarray(poses))[0]]
    errors = [float(np.linalg.norm(p - truth, axis=1).max()) for p in mapped]
    # Within one block edge (10 mm; the crop's offset is not a whole number of blocks),
    # and the others spread apart, not the same basin four times.
    assert errors[0] <= factor * SPACING
    assert min(errors[1:], default=np.inf) > factor * SPACING


def test_the_ranges_restrict_the_shifts_before_the_lowest_are_picked() -> None:
    """Poses outside the search's ranges are not candidates: with the true shift excluded
    the scan still returns its count of admissible poses (a filter applied after picking
    the lowest costs returned none on a torso whose lowest costs lay past the ranges)."""
    rotation = Rotation.from_rotvec([0.3, 0.2, -0.4]).as_matrix()
    sampled, other, tau = _case(rotation, (22, 13, 17), "ssd")
    center = np.array([10.0, 20.0, 30.0])
    truth = rigid_parameters(np.block([[rotation, tau[:, None]], [np.zeros((1, 3)), 1.0]]),
                             center)
    terms = sampled_terms(sampled, np.ones(sampled.grid.shape, np.float32), 5)
    seen: list[int] = []

    def far_from_truth(thetas: np.ndarray) -> np.ndarray:
        seen.append(len(thetas))
        return np.linalg.norm(thetas[:, 3:] - truth[3:], axis=1) > 30.0

    poses = scan_poses([BinScan(terms, rotation, 0.5)], other_terms(other, 5), "ssd", center,
                       count=3, admissible=far_from_truth)
    assert len(poses) == 3 and seen and seen[0] > 3
    assert far_from_truth(np.asarray(poses)).all()
    near = scan_poses([BinScan(terms, rotation, 0.5)], other_terms(other, 5), "ssd", center,
                      count=1, admissible=lambda thetas: ~far_from_truth(thetas))
    assert np.linalg.norm(near[0][3:] - truth[3:]) <= 5 * SPACING * np.sqrt(3)


def test_a_rotation_that_does_not_align_the_axes_is_refused() -> None:
    sampled, other, _ = _case(np.eye(3), (0, 0, 0), "ssd")
    terms = sampled_terms(sampled, np.ones(sampled.grid.shape, np.float32), 5)
    turned = Rotation.from_rotvec([0.0, 0.0, 0.3]).as_matrix()
    with pytest.raises(ValueError, match="axes"):
        scan_poses([BinScan(terms, turned, 0.5)], other_terms(other, 5), "ssd", np.zeros(3))


def test_no_pose_when_no_shift_overlaps_enough() -> None:
    sampled, other, _ = _case(np.eye(3), (0, 0, 0), "ssd")
    # The other image valid in one corner block only: every shift overlaps < 30 %.
    valid = np.zeros(other.grid.shape, np.float32)
    valid[:5, :5, :5] = 1.0
    terms = sampled_terms(sampled, np.ones(sampled.grid.shape, np.float32), 5)
    assert scan_poses([BinScan(terms, np.eye(3), 0.5)],
                      other_terms(other.with_validity(valid), 5), "ssd", np.zeros(3)) == []
    assert scan_poses([BinScan(terms, np.eye(3), 0.5)], other_terms(other, 5), "ssd",
                      np.zeros(3), count=0) == []


def test_poses_outside_every_anchors_ranges_are_dropped() -> None:
    anchors = np.array([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 100.0, 0.0, 0.0]])
    spreads = np.array([20.0, 5.0])
    inside = np.array([0.1, 0.0, 0.0, 15.0, -19.0, 0.0])
    near_second = np.array([0.0, 0.2, 0.0, 104.0, 0.0, 3.0])
    too_far = np.array([0.0, 0.0, 0.0, 60.0, 0.0, 0.0])
    too_turned = np.array([0.0, 0.0, np.deg2rad(45.0), 0.0, 0.0, 0.0])
    kept = within_ranges(np.array([inside, near_second, too_far, too_turned]), anchors,
                         spreads, 40.0)
    assert kept.tolist() == [True, True, False, False]
    assert within_ranges(np.zeros((0, 6)), anchors, spreads, 40.0).tolist() == []


def test_the_padded_spectrum_and_channel_products_match_numpy() -> None:
    """The axis-by-axis padded spectrum and the compiled channel sum give numpy's rfftn and
    sum of conj(a) b (the scan's correlations rest on both)."""
    rng = np.random.default_rng(5)
    a = rng.normal(size=(7, 5, 6, 3)).astype(np.float32)
    b = rng.normal(size=(4, 6, 5, 3)).astype(np.float32)
    size = (12, 12, 12)
    a_hat, b_hat = _spectrum(a, size), _spectrum(b, size)
    reference = np.fft.rfftn(a.astype(np.float64), s=size, axes=(0, 1, 2))
    np.testing.assert_allclose(a_hat, reference, atol=1e-4 * np.abs(reference).max())
    expected = (np.conj(a_hat) * b_hat).sum(axis=3)
    np.testing.assert_allclose(_channel_products(a_hat, b_hat), expected,
                               atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("chunk,first", [(3, 5), (4096, 65536), (1, 1)])
def test_the_chunked_selection_is_the_greedy_choice_over_every_admissible_shift(
        monkeypatch: pytest.MonkeyPatch, chunk: int, first: int) -> None:
    """Cost-ordered chunks and a partial sort pick what a full stable sort and one greedy
    pass over all admissible candidates pick (ties included), however small the chunks."""
    monkeypatch.setattr(translation_scan, "SELECT_CHUNK", chunk)
    monkeypatch.setattr(translation_scan, "SORT_FIRST", first)
    rng = np.random.default_rng(9)
    size = (6, 7, 8)
    candidates = np.sort(rng.choice(np.prod(size), 200, replace=False))
    cost = rng.integers(0, 40, len(candidates)).astype(np.float32)  # ties on purpose

    def shift_of(flat: np.ndarray) -> np.ndarray:
        return np.stack(np.unravel_index(flat, size), axis=1)

    def theta_of(flat: np.ndarray) -> np.ndarray:
        return np.column_stack([np.zeros((len(flat), 3)), shift_of(flat).astype(float)])

    def admissible(thetas: np.ndarray) -> np.ndarray:
        return thetas[:, 3] + thetas[:, 5] != 4.0

    picked = _lowest_admissible(_chunks_by_cost(candidates, cost), shift_of, theta_of, 6,
                                admissible)
    order = candidates[np.argsort(cost, kind="stable")]
    order = order[admissible(theta_of(order))]
    expected: list[np.ndarray] = []
    for flat in order:
        shift = shift_of(np.array([flat]))[0]
        if all(np.linalg.norm(shift - e[3:]) > SUPPRESS_BLOCKS for e in expected):
            expected.append(theta_of(np.array([flat]))[0])
        if len(expected) == 6:
            break
    assert len(picked) == 6
    np.testing.assert_array_equal(np.array(picked), np.array(expected))
