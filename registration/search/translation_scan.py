"""Exhaustive translation scan per orientation bin: starts where the descriptors agree.

Why: the random starts of the global search cover +-40 degrees and +-100 mm or more per
axis, a six-dimensional box in which the true basin is small. On realistic cases with a
large initial error and a rotation of 20-36 degrees the search's best basin lay 25-260 mm
off while the true pose scored far better (a torso CT against a cropped MR: refined cost
1.33 at the truth against 1.76 found); 16 starts at the nearest bin's rotation and the
true translation +-10 mm all reached the truth. Rotation is what the orientation bins
already sample; translation is what a correlation covers exhaustively.

How: an orientation bin's map of the sampled image a lies on axes that the bin's pose
rotation R turns onto the other map's axes (orientations.py), at the same spacing. For
that R, poses differ by a translation only, and a translation by whole blocks of a common
lattice shifts one map over the other, so the objective's sums over a's points become
correlations over all shifts at once (FFT). With a's block sums of w, w F and w |F|^2
(weights w summing to 1) and b's block means of the validity V, V M and V |M|^2:

    W(s) = sum_i w(i) V(i + s)                                  (the overlap)
    S(s) = sum_i [w|F|^2](i) V(i+s) - 2 [wF](i) . [VM](i+s) + w(i) [V|M|^2](i+s)   (ssd)
    S(s) = - sum_i [wF](i) . [VM](i+s)                                              (dot)
    cost(s) = (S + W0 c0) / (W + W0),  W >= the objective's minimum overlap,

the objective's own normalisation (similarity/objective.py) on blocks of about
SCAN_BLOCK_MM. Each bin's lowest costs, two blocks apart, become starts of the search.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import scipy.fft
from numba import get_num_threads, njit, prange

from disa.registration.similarity.descriptor_map import DescriptorMap
from disa.registration.similarity.objective import MIN_OVERLAP, PRIOR_WEIGHT
from disa.registration.transform.parametric import rigid_parameters

#: Block edge (mm) of the scan's lattice. Why 10 mm: the search's Adam walk and L-BFGS
#: recover a start 5-10 mm from the truth (the case above: 16 of 16); a finer lattice
#: multiplies the FFTs' voxels by (10 mm / edge)^3 (0.3-0.7 s for 7 bins on a torso now).
SCAN_BLOCK_MM = 10.0

#: Starts kept per orientation bin: its lowest scanned costs, SUPPRESS_BLOCKS apart (7
#: bins: 56 of the 500 starts; 0 switches the scan off).
SCAN_PER_BIN = 8

#: The fewest starts a search must have for the scan to run. Why: its poses are starts of
#: their own, so with a small budget they would be most of the search, and a user who
#: asks for one start (a local refinement from the header) would get 57. At 200 they take
#: at most about a quarter of the starts.
SCAN_MIN_STARTS = 200


@dataclass(frozen=True)
class ScanTerms:
    """One side's block arrays (Z, Y, X[, C]) on a block lattice: ``origin`` (LPS mm) is the
    centre of block (0, 0, 0), ``spacing`` (mm) its edge, ``direction`` the grid axes.

    Sampled side: ``descriptor`` = block sums of w F, ``square`` = of w |F|^2, ``weight`` =
    of w (w summing to 1 over the image). Other side: block means of V M, V |M|^2 and V.
    """

    descriptor: np.ndarray
    square: np.ndarray
    weight: np.ndarray
    origin: np.ndarray
    spacing: float
    direction: np.ndarray
    #: The other side's open faces (x low, x high, y low, y high, z low, z high: the
    #: image meets air there, DescriptorMap.open_faces), carried on by ``extended``.
    open_faces: tuple[bool, ...] = (False,) * 6

    def extended(self, margin: np.ndarray) -> ScanTerms:
        """These blocks carried on by ``margin`` (z, y, x) blocks beyond each open face as
        that face's own blocks: the objective reads a point there as the face (kernels.py),
        and so must the scan, or it ranks shifts that slide a partial view out of the
        other's box (where nothing counts against them) above the true one."""
        if not any(self.open_faces):
            return self
        faces = np.asarray(self.open_faces).reshape(3, 2)[::-1]  # (z, y, x) x (low, high)
        pad = faces * np.asarray(margin)[:, None]
        widths = [(int(lo), int(hi)) for lo, hi in pad]

        def grown(array: np.ndarray) -> np.ndarray:
            return np.pad(array, widths + [(0, 0)] * (array.ndim - 3), mode="edge")

        origin = self.origin - self.direction @ (pad[::-1, 0] * self.spacing)
        return ScanTerms(grown(self.descriptor), grown(self.square), grown(self.weight),
                         origin, self.spacing, self.direction, self.open_faces)


def block_factor(spacing_mm: float) -> int:
    """Voxels per block edge for a map of ``spacing_mm``: about SCAN_BLOCK_MM."""
    return max(1, round(SCAN_BLOCK_MM / spacing_mm))


@njit(cache=True)
def _block_sums(values: np.ndarray, scale: np.ndarray, factor: int, descriptor: np.ndarray,
                square: np.ndarray, weight: np.ndarray) -> None:  # pragma: no cover - compiled
    """Adds scale * values, scale * |values|^2 and scale over each factor^3 block (voxels
    past the last whole block of an axis dropped; zero-scale voxels skipped)."""
    nz, ny, nx = weight.shape
    channels = values.shape[3]
    for z in range(min(values.shape[0], nz * factor)):
        bz = z // factor
        for y in range(min(values.shape[1], ny * factor)):
            by = y // factor
            for x in range(min(values.shape[2], nx * factor)):
                s = scale[z, y, x]
                if s == 0.0:
                    continue
                bx = x // factor
                norm = 0.0
                for c in range(channels):
                    v = values[z, y, x, c]
                    descriptor[bz, by, bx, c] += s * v
                    norm += v * v
                square[bz, by, bx] += s * norm
                weight[bz, by, bx] += s


def _terms(descriptors: DescriptorMap, scale: np.ndarray, factor: int, reduce: str
           ) -> ScanTerms:
    """Block sums (or means) of scale * M, scale * |M|^2 and scale on the block lattice.
    Compiled: numpy's reshaped block sums took ~0.3 s a torso bin (a map-sized float64
    temporary per channel)."""
    shape = tuple(max(1, n // factor) for n in descriptors.grid.shape)
    descriptor = np.zeros((*shape, descriptors.channels))
    square, weight = np.zeros(shape), np.zeros(shape)
    _block_sums(descriptors.as_float(), np.ascontiguousarray(scale, dtype=np.float32), factor,
                descriptor, square, weight)
    if reduce == "mean":
        descriptor, square, weight = (a / factor ** 3 for a in (descriptor, square, weight))
    centre = np.full((1, 3), (factor - 1) / 2.0)
    return ScanTerms(descriptor, square, weight, descriptors.grid.to_physical(centre)[0],
                     float(descriptors.grid.spacing[0]) * factor, descriptors.grid.direction)


def sampled_terms(descriptors: DescriptorMap, weights: np.ndarray, factor: int) -> ScanTerms:
    """The sampled side's block sums from its map and its weights (on the map's grid)."""
    total = max(float(weights.sum(dtype=np.float64)), 1e-30)
    return _terms(descriptors, weights / total, factor, "sum")


def other_terms(descriptors: DescriptorMap, factor: int) -> ScanTerms:
    """The other side's block means of V M, V |M|^2 and V, and its open faces."""
    terms = _terms(descriptors, descriptors.validity, factor, "mean")
    return replace(terms, open_faces=tuple(bool(f) for f in descriptors.faces))


#: Scanned poses of one bin lie at least this many blocks apart (the lowest cost first,
#: then the lowest outside its neighbourhood, ...): local minima of a noisy cost
#: cluster, and a cluster is one basin.
SUPPRESS_BLOCKS = 2.0


@dataclass(frozen=True)
class BinScan:
    """One orientation bin to scan: its sampled terms, the pose rotation (3, 3, search frame)
    that turns their axes onto the other's, and its objective's chance cost."""

    terms: ScanTerms
    rotation: np.ndarray
    chance_cost: float


def _workers() -> int:
    """FFT threads: as many as the engine's compiled kernels use. pocketfft's threads
    are joined after each call (they do not spin-wait: registration/threads.py); 2
    threads halved a 12-channel spectrum here (25 -> 13 ms)."""
    return int(get_num_threads())


def _spectrum(array: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """rfftn over the first three axes, zero-padded to ``size``, one axis at a time: each
    pass transforms only the rows that hold data (the padding is most of ``size``), which
    took 0.42 -> 0.28 s for a torso's 7 bins against one padded rfftn (same spectrum)."""
    # (float32: half the time of float64, and the scan only ranks shifts.)
    spectrum = scipy.fft.rfft(array.astype(np.float32), n=size[2], axis=2, workers=_workers())
    spectrum = scipy.fft.fft(spectrum, n=size[1], axis=1, workers=_workers())
    return scipy.fft.fft(spectrum, n=size[0], axis=0, workers=_workers())


@njit(cache=True, parallel=True)
def _channel_products(a_hat: np.ndarray, b_hat: np.ndarray
                      ) -> np.ndarray:  # pragma: no cover - compiled
    """sum_c conj(a_hat[..., c]) * b_hat[..., c] without the (Z, Y, X, C) temporary that
    numpy's product and sum build (3.5x faster on a torso's spectra)."""
    nz, ny, nx, channels = a_hat.shape
    out = np.empty((nz, ny, nx), dtype=np.complex64)
    for z in prange(nz):
        for y in range(ny):
            for x in range(nx):
                real = np.float32(0.0)
                imag = np.float32(0.0)
                for c in range(channels):
                    u = a_hat[z, y, x, c]
                    v = b_hat[z, y, x, c]
                    real += u.real * v.real + u.imag * v.imag
                    imag += u.real * v.imag - u.imag * v.real
                out[z, y, x] = complex(real, imag)
    return out


def _correlate(a_hat: np.ndarray, b_hat: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """sum_i a(i) b(i + s) for every shift s (index s mod size), summed over channels."""
    product = _channel_products(a_hat, b_hat) if a_hat.ndim == 4 else np.conj(a_hat) * b_hat
    return scipy.fft.irfftn(product, s=size, axes=(0, 1, 2), workers=_workers())


#: Candidates (lowest costs first) tested against the ranges at a time: the lowest few
#: thousand shifts of a bin hold its picks unless the ranges refuse most of them, and
#: testing every shift of a torso bin (~300,000) took 50 ms a bin.
SELECT_CHUNK = 4096

#: Candidates put in cost order first; the rest follow (sorted) only if ever reached.
SORT_FIRST = 65536


def _chunks_by_cost(candidates: np.ndarray, cost: np.ndarray) -> Iterator[np.ndarray]:
    """``candidates`` by ascending ``cost`` (ties by index), SELECT_CHUNK at a time: the
    lowest SORT_FIRST are sorted first and the rest only when the selection reaches them
    (a full sort of a torso bin's ~300,000 shifts took 15 ms a bin)."""
    parts = [np.arange(len(cost))]
    if len(cost) > SORT_FIRST:
        lowest = np.argpartition(cost, SORT_FIRST)[:SORT_FIRST]
        rest = np.ones(len(cost), dtype=bool)
        rest[lowest] = False
        parts = [lowest, np.flatnonzero(rest)]
    for part in parts:
        ordered = candidates[part[np.lexsort((candidates[part], cost[part]))]]
        for start in range(0, len(ordered), SELECT_CHUNK):
            yield ordered[start:start + SELECT_CHUNK]


def _lowest_admissible(chunks: Iterable[np.ndarray], shift_of: Callable[[np.ndarray], np.ndarray],
                       theta_of: Callable[[np.ndarray], np.ndarray], count: int,
                       admissible: Callable[[np.ndarray], np.ndarray] | None
                       ) -> list[np.ndarray]:
    """Up to ``count`` poses of the candidates in ``chunks`` (flat shift indices, lowest
    cost first) that ``admissible`` keeps, each at least SUPPRESS_BLOCKS from those picked
    before it: the greedy choice over every admissible candidate, tested a chunk at a time
    and stopped once ``count`` are picked."""
    picked: list[np.ndarray] = []
    picked_shifts: list[np.ndarray] = []
    for chunk in chunks:
        thetas = theta_of(chunk)
        if admissible is not None:
            keep = np.asarray(admissible(thetas), dtype=bool)
            chunk, thetas = chunk[keep], thetas[keep]
        shifts = shift_of(chunk)
        alive = np.arange(len(chunk))
        for done in picked_shifts:
            alive = alive[np.linalg.norm(shifts[alive] - done, axis=1) > SUPPRESS_BLOCKS]
        while len(alive) and len(picked) < count:
            best = alive[0]
            picked.append(thetas[best])
            picked_shifts.append(shifts[best])
            alive = alive[np.linalg.norm(shifts[alive] - shifts[best], axis=1)
                          > SUPPRESS_BLOCKS]
        if len(picked) >= count:
            break
    return picked


def scan_poses(bins: list[BinScan], other: ScanTerms, kind: str, center: np.ndarray,
               count: int = SCAN_PER_BIN,
               admissible: Callable[[np.ndarray], np.ndarray] | None = None
               ) -> list[np.ndarray]:
    """Rigid thetas (rad, mm about ``center``, search frame: sampled points -> other points):
    per bin the ``count`` lowest scanned costs, SUPPRESS_BLOCKS apart, at shifts where the
    overlap reaches the objective's minimum and ``admissible`` (thetas (N, 6) -> bool (N,),
    e.g. the search's ranges: ``within_ranges``) holds. Each bin's rotation must turn its
    lattice's axes onto the other's at the same block spacing."""
    if count <= 0 or not bins:
        return []
    for scan in bins:
        if abs(scan.terms.spacing - other.spacing) > 1e-3 * other.spacing or not np.allclose(
                scan.rotation @ scan.terms.direction, other.direction, atol=1e-6):
            raise ValueError("the scan needs each bin's axes turned onto the other's, "
                             "at the same spacing")
    # One FFT size for every bin, so the other side's spectra are computed once.
    na = np.max([scan.terms.weight.shape for scan in bins], axis=0)
    # Beyond an open face: half the sampled side's extent, which the minimum overlap
    # leaves a pose room to reach (MIN_OVERLAP of its weight on the other side).
    other = other.extended(-(-na // 2))
    nb = np.array(other.weight.shape)
    size = tuple(int(scipy.fft.next_fast_len(int(n), real=True)) for n in na + nb - 1)
    valid_hat = _spectrum(other.weight, size)
    descriptor_hat = _spectrum(other.descriptor, size)
    square_hat = _spectrum(other.square, size) if kind != "dot" else None
    size_array, nb_array = np.array(size), nb

    def shift_of(flat: np.ndarray) -> np.ndarray:
        # (The FFT is circular: index j stands for the shift j, or j - size past the
        # other's extent; indices between the two ranges hold empty sums, which the
        # overlap refuses.)
        index = np.stack(np.unravel_index(flat, size), axis=1)
        return np.where(index >= nb_array, index - size_array, index)

    poses: list[np.ndarray] = []
    for scan in bins:
        weight_hat = _spectrum(scan.terms.weight, size)
        overlap = _correlate(weight_hat, valid_hat, size).ravel()
        total = -_correlate(_spectrum(scan.terms.descriptor, size), descriptor_hat, size)
        if square_hat is not None:
            total = (2.0 * total + _correlate(_spectrum(scan.terms.square, size), valid_hat, size)
                     + _correlate(weight_hat, square_hat, size))
        total = total.ravel()
        candidates = np.flatnonzero(overlap >= MIN_OVERLAP)
        cost = ((total[candidates] + PRIOR_WEIGHT * scan.chance_cost)
                / (overlap[candidates] + PRIOR_WEIGHT))
        chunks = _chunks_by_cost(candidates, cost)
        # Sampled block (0, 0, 0) lands on the other's block ``shift``: y = R x + tau, and
        # a pose's translation parameters move with tau one to one (rigid_parameters).
        matrix = np.eye(4)
        matrix[:3, :3] = scan.rotation
        matrix[:3, 3] = other.origin - scan.rotation @ scan.terms.origin
        zero_shift = rigid_parameters(matrix, center)

        def theta_of(flat: np.ndarray, zero_shift: np.ndarray = zero_shift) -> np.ndarray:
            thetas = np.tile(zero_shift, (len(flat), 1))
            thetas[:, 3:] += (shift_of(flat)[:, ::-1] * other.spacing) @ other.direction.T
            return thetas

        # Outside the ranges before the selection, not after it: the lowest costs of a
        # torso bin all lay past the search's +-120 mm (edge overlaps), and dropping them
        # afterwards left that case without a scanned start.
        poses.extend(_lowest_admissible(chunks, shift_of, theta_of, count, admissible))
    return poses


def within_ranges(thetas: np.ndarray, anchors: np.ndarray, spreads_mm: np.ndarray,
                  rotation_range_deg: float) -> np.ndarray:
    """Which rigid poses (N, 6) a random start could have been (bool (N,)): within
    +-``spreads_mm[a]`` per translation axis and +-``rotation_range_deg`` per angle of some
    anchor a (a user's narrow ranges around a tracked pose keep the scan's far poses out)."""
    theta = np.atleast_2d(np.asarray(thetas, dtype=np.float64))
    columns = np.ascontiguousarray(theta[:, :6].T)  # (one column per parameter: row-wise
    # max over 3 values and strided slices made this 0.1 s a torso bin of ~40,000 shifts)
    inside = np.zeros(len(theta), dtype=bool)
    limit = np.deg2rad(rotation_range_deg) + 1e-9
    for anchor, spread in zip(np.atleast_2d(anchors), np.asarray(spreads_mm, np.float64),
                              strict=True):
        ok = ~inside
        for p in range(6):
            ok &= np.abs(columns[p] - anchor[p]) <= (limit if p < 3 else spread + 1e-9)
        inside |= ok
    return inside
