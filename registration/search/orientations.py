"""Orientation bins for the global search: one sampled descriptor map per bin.

Why: neither DISA nor MIND-SSC descriptors are rotation invariant. Each image's
descriptors describe neighbourhoods along its own grid axes, so a start whose
rotation is 30-40 degrees from the identity compares neighbourhoods that are
30-40 degrees apart, and the true pose scores no better than a wrong one. The
re-oriented refinement (pipeline._reoriented_refinement) fixes that for the
final pose only; the global search before it lost the true basin of a rotated
slab or sector (realistic family: 5 of 9 failures had a refined cost at the
truth well below the cost of the result).

So the sampled image (the smaller field of view, cheap to describe) is also
described on K rotated grids, one per bin of the starts' rotation range, and
each start is scored against the map of the bin nearest its current rotation.
With a rotation R of the search frame (sampled points -> interpolated points),
the sampled descriptor axes must satisfy R D_a' = D_b to compare like with like
(D_a, D_b: the two maps' grid directions). For the bin rotation Q_k (relative to
R_0 = D_b D_a^T, the rotation at which the unrotated maps already agree) the
bin's grid therefore has axes D_a,k = (Q_k R_0)^T D_b.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.spatial.transform import Rotation

from disa.registration.similarity.objective import Objective
from disa.registration.transform.parametric import TransformModel

#: Bin centres: the identity and +-ORIENTATION_STEP_DEG about each axis. A start is
#: scored with the map of the nearest centre, so a bin serves rotations up to about
#: half the step from it, where MIND-SSC descriptors still match. Why 7 bins and not a
#: full grid of Euler angles (27 bins at 0 and +-27 degrees): each bin describes the
#: sampled image once more (50-90 ms for MIND-SSC on an oblique slab's box, which
#: holds ~10x the voxels of its data); on the realistic cases that showed the problem
#: the grid fixed one more case of six at 4x the cost (2-3 s a case).
ORIENTATION_STEP_DEG = 25.0


def orientation_bins(rotation_range_deg: float, step_deg: float = ORIENTATION_STEP_DEG
                     ) -> np.ndarray:
    """Bin rotations (K, 3, 3), the identity first, then +-``step_deg`` about x, y and z
    (7 bins) when the starts' rotation range reaches half a step; else the identity alone."""
    if step_deg <= 0 or rotation_range_deg < step_deg / 2:
        return np.eye(3)[None]
    vectors = [np.zeros(3)]
    for axis in range(3):
        for sign in (-1.0, 1.0):
            v = np.zeros(3)
            v[axis] = sign * np.deg2rad(step_deg)
            vectors.append(v)
    return Rotation.from_rotvec(np.asarray(vectors)).as_matrix()


def bin_directions(bins: np.ndarray, sampled_direction: np.ndarray,
                   other_direction: np.ndarray) -> np.ndarray:
    """Grid directions (K, 3, 3) of the sampled image's maps, one per bin: D_a,k =
    (Q_k R_0)^T D_b with R_0 = D_b D_a^T (module docstring). The identity bin gives D_a."""
    base = other_direction @ sampled_direction.T
    return np.einsum("ji,klj,lm->kim", base, bins, other_direction)


class OrientedObjective:
    """An objective whose value at each pose comes from the bin nearest its rotation.

    ``objectives[k]`` (or ``build(k)``, called the first time a pose falls into bin
    k: the fine and refinement levels only need the bins that the coarse rounds left
    alive) scores poses with bin k's sampled map. Batched like the objectives it
    holds: one call per bin present in the batch. A pose that crosses a bin edge
    changes map; costs of neighbouring bins agree to within the descriptors'
    orientation error, and the search keeps the best pose seen, so no start is lost
    at the edge.
    """

    differentiable = True

    def __init__(self, model: TransformModel, bins: np.ndarray, base_rotation: np.ndarray,
                 build: Callable[[int], Objective],
                 objectives: list[Objective | None] | None = None) -> None:
        self.model = model
        self.bins = np.asarray(bins, dtype=np.float64)
        self.base_rotation = np.asarray(base_rotation, dtype=np.float64)
        self._build = build
        self._objectives: list[Objective | None] = (
            list(objectives) if objectives is not None else [None] * len(self.bins))

    def objective(self, k: int) -> Objective:
        """Bin k's objective (built on first use)."""
        found = self._objectives[k]
        if found is None:
            found = self._build(k)
            self._objectives[k] = found
        return found

    @property
    def built(self) -> int:
        """How many bins' objectives exist (diagnostics: the lazy levels' cost)."""
        return sum(o is not None for o in self._objectives)

    @property
    def evaluations(self) -> int:
        return sum(int(o.evaluations) for o in self._objectives  # type: ignore[attr-defined]
                   if o is not None)

    def bin_of(self, theta: np.ndarray) -> np.ndarray:
        """Index (B,) of the bin nearest each pose's rotation relative to R_0 (largest
        trace of Q_k^T R R_0^T, i.e. smallest rotation angle between them)."""
        rotations = self.model.linear_part(np.atleast_2d(theta))[0]
        relative = rotations @ self.base_rotation.T
        return np.argmax(np.einsum("kij,bij->bk", self.bins, relative), axis=1)

    def _batched(self, theta: np.ndarray, want_grad: bool) -> tuple[np.ndarray, np.ndarray]:
        theta = np.atleast_2d(np.asarray(theta, dtype=np.float64))
        owner = self.bin_of(theta)
        cost = np.empty(len(theta))
        grad = np.zeros_like(theta)
        for k in np.unique(owner):
            rows = owner == k
            objective = self.objective(int(k))
            if want_grad:
                cost[rows], grad[rows] = objective.cost_and_grad(theta[rows])
            else:
                cost[rows] = objective.cost(theta[rows])
        return cost, grad

    def cost(self, theta: np.ndarray) -> np.ndarray:
        return self._batched(theta, want_grad=False)[0]

    def cost_and_grad(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._batched(theta, want_grad=True)
