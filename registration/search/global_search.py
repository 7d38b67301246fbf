"""Global multi-start search and local refinement of transform parameters.

Strategy (coarse to fine, everything batched over starts):

1. Draw N random starts around a few initial poses (the header pose, the
   aligned centroids, placements of a small field of view over the larger
   one: pipeline.initial_poses): Euler angles uniform in +-rotation_range
   degrees, translations uniform in +-(the pose's spread) mm; the poses
   themselves are starts, start 0 the first. Deterministic for a seed.
2. Successive halving on the coarse objective: every surviving start takes a
   few batched Adam steps in displacement units (mm), then the weaker
   half/quarter is pruned (the last cut ranks on the fine objective). Batched
   steps cost one kernel call for all starts, which is what makes hundreds of
   starts affordable on a CPU.
3. The survivors continue on the fine objective; the best K are refined with
   scipy's L-BFGS-B and the analytic gradient.
4. Confidence: the fraction of the K refined solutions whose mapping agrees
   with the best one (RMS point distance below a tolerance) and whether a
   disagreeing solution scores almost as well (an ambiguous result).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

from disa.core.errors import CancelledError
from disa.registration.similarity.objective import Objective
from disa.registration.transform.parametric import TransformModel

#: progress(stage, fraction in [0, 1]) is called between optimiser iterations.
Progress = Callable[[str, float], None]
#: cancel() returning True stops the search at the next iteration.
Cancel = Callable[[], bool]


@dataclass(frozen=True)
class SearchSettings:
    """Settings of the global search. Angles in degrees, distances in mm."""

    starts: int = 500
    rotation_range_deg: float = 40.0
    top_k: int = 8
    seed: int = 0
    coarse_rounds: tuple[tuple[int, float], ...] = ((8, 0.25), (12, 0.25))
    #: First coarse Adam step, in coarse-grid spacings (halved every round). Two, not one:
    #: with one, starts 30-60 mm from a torso CT-MR pose stalled short of its basin and
    #: 3 of 72 realistic cases failed that pass with two (benchmarks/README.md, "Coarse step").
    coarse_step_spacings: float = 2.0
    #: The last coarse cut ranks its survivors on the fine objective (one cost-only call),
    #: not on the pooled maps that their Adam steps used (see global_search).
    fine_ranked_cut: bool = True
    #: Coarse Adam steps of a placed start (a scanned pose: translation_scan.py put it within
    #: about half a block of a basin), as a fraction of the random starts' steps.
    #: Why: the random starts' long steps (two coarse spacings) overshoot such a start's
    #: basin every time, and Adam keeps the start itself as its best pose: a torso pose 20
    #: mm from the truth stayed there with steps of 10 mm and reached the truth with 2.5 mm.
    placed_step_fraction: float = 0.25
    fine_steps: int = 15
    lbfgs_iterations: int = 100
    agree_tolerance_mm: float = 5.0
    #: "Almost as good": within this fraction of ``SearchResult.contrast`` of the best.
    #: 0.05 of the coarse-level contrast until 2026-12-07; that contrast was ~0.56 of the
    #: fine-level one (median of 180 realistic cases, 0 to 1.08), so 0.03 keeps the scale.
    ambiguity_margin: float = 0.03


@dataclass
class RefinedSolution:
    theta: np.ndarray
    cost: float
    start_index: int


@dataclass
class SearchResult:
    """Outcome of a search: best parameters, their cost and diagnostics."""

    theta: np.ndarray
    cost: float
    solutions: list[RefinedSolution]
    agreeing: int
    confidence: float
    ambiguous: bool
    evaluations: int
    starts: int
    timings: dict[str, float] = field(default_factory=dict)
    #: Scale of "almost as good": the median fine-level cost of a subset of the starts
    #: minus the best cost (see global_search).
    contrast: float = 1.0
    #: Refined solutions that disagree with the best yet score within the ambiguity margin,
    #: one per basin, best first (what made the result ambiguous).
    rivals: list[RefinedSolution] = field(default_factory=list)
    #: Every other basin among the refined solutions, one each, best first (rivals first).
    basins: list[RefinedSolution] = field(default_factory=list)


def draw_starts(model: TransformModel, anchors: np.ndarray, settings: SearchSettings,
                rng: np.random.Generator, spreads_mm: np.ndarray | None = None,
                shares: np.ndarray | None = None) -> np.ndarray:
    """Random starts (N, P) around the initial poses ``anchors`` (A, P); rows 0..A-1 are the
    anchors themselves (so row 0 is the first). The other starts are divided among the
    anchors by ``shares`` (default equal) and perturbed by angles uniform in
    +-rotation_range_deg and translations uniform in +-``spreads_mm[a]`` per axis (default
    100 mm). Rigid parameters vary rotation and translation (rigid+probe: the compression
    starts at the anchor's); affine starts are rigid perturbations of the anchor."""
    anchors = np.atleast_2d(np.asarray(anchors, dtype=np.float64))
    n_anchors = len(anchors)
    n = max(n_anchors, settings.starts)
    spreads = np.full(n_anchors, 100.0) if spreads_mm is None else np.asarray(spreads_mm, float)
    share = np.full(n_anchors, 1.0 / n_anchors) if shares is None else np.asarray(shares, float)
    counts = np.floor(share / share.sum() * (n - n_anchors)).astype(int)
    counts[0] += (n - n_anchors) - counts.sum()
    owner = np.concatenate([np.arange(n_anchors), np.repeat(np.arange(n_anchors), counts)])
    rot = np.deg2rad(settings.rotation_range_deg) * rng.uniform(-1, 1, size=(n, 3))
    trans = spreads[owner, None] * rng.uniform(-1, 1, size=(n, 3))
    rot[:n_anchors] = 0.0
    trans[:n_anchors] = 0.0
    base = anchors[owner]
    if model.mode in ("rigid", "rigid+probe"):
        starts = base.copy()
        starts[:, :3] += rot
        starts[:, 3:6] += trans
        return starts
    from disa.registration.transform.parametric import rotation_matrix

    m0 = base[:, :9].reshape(n, 3, 3)
    mats = rotation_matrix(rot) @ m0
    return np.concatenate([mats.reshape(n, 9), base[:, 9:] + trans], axis=1)


def _check(cancel: Cancel | None) -> None:
    if cancel is not None and cancel():
        raise CancelledError("registration cancelled")


def adam_steps(objective: Objective, theta: np.ndarray, scales: np.ndarray, steps: int,
               lr_start: float | np.ndarray, lr_end: float | np.ndarray,
               cancel: Cancel | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Batched Adam on theta (B, P) in displacement units u = theta / scales (mm).

    Adam's per-coordinate normalisation makes the step length (mm) independent
    of the objective's scale, so one schedule serves DISA and MIND alike. The
    learning rate decays geometrically from lr_start to lr_end mm (scalars, or
    (B, 1) arrays: one schedule per row). Returns the best parameters seen per
    start and their costs.
    """
    theta = theta.copy()
    best_theta = theta.copy()
    best_cost = np.full(len(theta), np.inf)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    beta1, beta2, eps = 0.9, 0.999, 1e-12
    for step in range(steps):
        _check(cancel)
        cost, grad = objective.cost_and_grad(theta)
        better = cost < best_cost
        best_cost[better] = cost[better]
        best_theta[better] = theta[better]
        g = grad * scales
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1 ** (step + 1))
        v_hat = v / (1 - beta2 ** (step + 1))
        frac = step / max(steps - 1, 1)
        lr = lr_start * (lr_end / lr_start) ** frac
        theta = theta - lr * scales * m_hat / (np.sqrt(v_hat) + eps)
    cost = objective.cost(theta)
    better = cost < best_cost
    best_cost[better] = cost[better]
    best_theta[better] = theta[better]
    return best_theta, best_cost


def lbfgs_refine(objective: Objective, theta: np.ndarray, scales: np.ndarray, iterations: int,
                 cancel: Cancel | None = None, bounds_mm: float | None = None,
                 step_tolerance_mm: float = 0.0) -> tuple[np.ndarray, float]:
    """L-BFGS-B (scipy) from one start, in displacement units, with the analytic gradient.

    Displacement units u = (theta - theta_start) / scales are mm of motion at the
    sample radius. Stops after ``iterations``, or when two successive iterations
    changed no coordinate of u by more than ``step_tolerance_mm`` (the transform
    family's ``step_tolerance_mm``; 0, the default, leaves it to scipy's own
    tolerances; two, so that one short step of a line search does not end the run
    far from the optimum).
    """
    theta0 = np.asarray(theta, dtype=np.float64)

    def fun(u: np.ndarray) -> tuple[float, np.ndarray]:
        _check(cancel)
        th = theta0 + u * scales
        cost, grad = objective.cost_and_grad(th[None, :])
        return float(cost[0]), grad[0] * scales

    previous = np.zeros_like(theta0)
    small_steps = 0

    def small_step(intermediate_result: optimize.OptimizeResult) -> None:
        nonlocal previous, small_steps
        u = np.asarray(intermediate_result.x)
        moved = float(np.abs(u - previous).max())
        previous = u.copy()
        small_steps = small_steps + 1 if moved < step_tolerance_mm else 0
        if small_steps == 2:
            raise StopIteration  # scipy ends the run and keeps this iterate

    bounds = None if bounds_mm is None else [(-bounds_mm, bounds_mm)] * len(theta0)
    res = optimize.minimize(fun, np.zeros_like(theta0), jac=True, method="L-BFGS-B",
                            bounds=bounds, callback=small_step if step_tolerance_mm > 0 else None,
                            options={"maxiter": iterations, "ftol": 1e-10, "gtol": 1e-9})
    return theta0 + res.x * scales, float(res.fun)


def mapping_distance(model: TransformModel, theta_a: np.ndarray, theta_b: np.ndarray,
                     points: np.ndarray) -> float:
    """RMS distance (mm) between where two parameter sets map the same points (N, 3)."""
    return float(np.sqrt(np.mean(np.sum(
        (model.apply(theta_a, points) - model.apply(theta_b, points)) ** 2, axis=1))))


def _keep_initial(order: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """``order`` (row indices to keep), with the row descending from start 0 (the
    initial pose) swapped in for the last kept row if the cut dropped it.

    Why: the coarse levels pool the descriptor maps, and a good initial pose (a
    header or a previous registration already close) can rank low there while it
    is the best optimum at full resolution. Carrying it to the L-BFGS stage means
    the global search never ends worse, in the refinement's cost, than a local
    search from the initial pose would have.
    """
    initial = np.flatnonzero(origin == 0)
    if len(initial) == 0 or initial[0] in order:
        return order
    return np.concatenate([order[:-1], initial[:1]])


def global_search(coarse: Objective, fine: Objective, refine: Objective, model: TransformModel,
                  init: np.ndarray, settings: SearchSettings, radius_mm: float,
                  coarse_spacing_mm: float, fine_spacing_mm: float, check_points: np.ndarray,
                  progress: Progress | None = None, cancel: Cancel | None = None,
                  spreads_mm: np.ndarray | None = None, shares: np.ndarray | None = None,
                  placed: np.ndarray | None = None) -> SearchResult:
    """Multi-start search: successive halving on ``coarse``, Adam on ``fine``, L-BFGS on
    ``refine`` for the best K; ``check_points`` (N, 3, mm) measure agreement. ``init`` is
    one initial pose (P,) or several (A, P), with ``spreads_mm`` and ``shares`` as in
    ``draw_starts``; the descendant of the first is never dropped. ``placed`` (A,) bool:
    the anchors that a scan placed near a basin (shorter coarse steps)."""
    report = progress or (lambda stage, fraction: None)
    timings: dict[str, float] = {}
    rng = np.random.default_rng(settings.seed)
    scales = model.scales(radius_mm)
    t0 = time.perf_counter()
    theta = draw_starts(model, np.asarray(init, dtype=np.float64), settings, rng, spreads_mm,
                        shares)
    n_starts = len(theta)
    report("search", 0.0)
    cost = coarse.cost(theta)
    # The typical start's cost, for the contrast below, on the fine level where the
    # solutions' costs are: the pooled coarse maps' costs run lower (about half the
    # contrast on realistic cases; on a head US pair the coarse median lay below the best
    # fine cost, which left nothing ambiguous). ~64 starts (every 7th of 500): a few ms.
    fine_start_median = float(np.median(fine.cost(theta[:: max(1, n_starts // 64)])))
    # Step length (mm) per row: the placed starts' shorter (placed_step_fraction says why).
    fraction = np.ones(n_starts)
    if placed is not None:
        fraction[:len(placed)][np.asarray(placed, dtype=bool)] = settings.placed_step_fraction
    lr = settings.coarse_step_spacings * coarse_spacing_mm * fraction[:, None]
    n_rounds = len(settings.coarse_rounds)
    origin = np.arange(n_starts)  # which start each surviving row descends from
    for r, (steps, keep) in enumerate(settings.coarse_rounds):
        theta, cost = adam_steps(coarse, theta, scales, steps, lr, lr / 4, cancel)
        lr = lr / 2
        n_keep = max(settings.top_k * 2, math.ceil(len(theta) * keep))
        if settings.fine_ranked_cut and r == n_rounds - 1:
            # The pooled maps blur what a thin or small view holds: on a realistic T2 slab
            # the wrong basin scored 1.12 coarse against the truth's 1.23, and 1.65 fine
            # against 1.45, so the coarse ranking cut every start near the truth. The
            # fine cost of ~125 survivors is one batched call (tens of ms).
            cost = fine.cost(theta)
        order = _keep_initial(np.argsort(cost, kind="stable")[:n_keep], origin)
        theta, cost, origin, lr = theta[order], cost[order], origin[order], lr[order]
        report("search", 0.5 * (r + 1) / n_rounds)
    timings["coarse"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    theta, cost = adam_steps(fine, theta, scales, settings.fine_steps, fine_spacing_mm / 2,
                             fine_spacing_mm / 16, cancel)
    order = _keep_initial(np.argsort(cost, kind="stable")[: settings.top_k], origin)
    theta, origin = theta[order], origin[order]
    report("search", 0.6)
    timings["fine"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    solutions: list[RefinedSolution] = []
    for i, th in enumerate(theta):
        refined, refined_cost = lbfgs_refine(refine, th, scales, settings.lbfgs_iterations, cancel,
                                             step_tolerance_mm=model.step_tolerance_mm)
        solutions.append(RefinedSolution(refined, refined_cost, int(origin[i])))
        report("refine", 0.6 + 0.4 * (i + 1) / len(theta))
    solutions.sort(key=lambda s: s.cost)
    timings["refine"] = time.perf_counter() - t2

    # The cost contrast between a typical random start and the best solution is the scale
    # for "almost as good": SSD costs carry a large constant offset, so |best| is not.
    contrast = max(fine_start_median - solutions[0].cost, 1e-12)
    agreeing, confidence, ambiguous = assess(model, solutions, check_points, settings, contrast)
    evaluations = coarse.evaluations + fine.evaluations + refine.evaluations
    return SearchResult(theta=solutions[0].theta, cost=solutions[0].cost, solutions=solutions,
                        agreeing=agreeing, confidence=confidence, ambiguous=ambiguous,
                        evaluations=evaluations, starts=n_starts, timings=timings,
                        contrast=contrast,
                        rivals=rivals(model, solutions, check_points, settings, contrast),
                        basins=rivals(model, solutions, check_points, settings, contrast,
                                      within_margin=False))


def assess(model: TransformModel, solutions: list[RefinedSolution], check_points: np.ndarray,
           settings: SearchSettings, contrast: float) -> tuple[int, float, bool]:
    """Agreement of refined solutions with the best: (count, fraction, ambiguous).

    A solution agrees when its mapping of ``check_points`` is within
    ``agree_tolerance_mm`` RMS of the best: the same answer up to the local
    minima that any similarity has within a few voxels of its optimum. The
    result is ambiguous when a disagreeing solution's cost is within
    ``ambiguity_margin`` x ``contrast`` (the starts' median fine cost - best cost) of the
    best: a different pose that the similarity can hardly tell apart.
    """
    best = solutions[0]
    agreeing = 0
    ambiguous = False
    for s in solutions:
        distance = mapping_distance(model, s.theta, best.theta, check_points)
        if distance <= settings.agree_tolerance_mm:
            agreeing += 1
        elif (s.cost - best.cost) / contrast < settings.ambiguity_margin:
            ambiguous = True
    return agreeing, agreeing / len(solutions), ambiguous


def rivals(model: TransformModel, solutions: list[RefinedSolution], check_points: np.ndarray,
           settings: SearchSettings, contrast: float, within_margin: bool = True
           ) -> list[RefinedSolution]:
    """The solutions (sorted by cost, best first) that disagree with the best (beyond
    ``agree_tolerance_mm``) and score within ``ambiguity_margin`` x ``contrast`` of it, one
    per basin: a rival within the tolerance of a better rival is the same answer. With
    ``within_margin`` False: every other basin, whatever its cost (the runners-up)."""
    best = solutions[0]
    found: list[RefinedSolution] = []
    for s in solutions[1:]:
        if within_margin and (s.cost - best.cost) / contrast >= settings.ambiguity_margin:
            continue
        if all(mapping_distance(model, s.theta, other.theta, check_points)
               > settings.agree_tolerance_mm for other in [best, *found]):
            found.append(s)
    return found


def local_search(objective: Objective, model: TransformModel, init: np.ndarray,
                 radius_mm: float, step_mm: float, max_evaluations: int = 600,
                 cancel: Cancel | None = None) -> SearchResult:
    """Derivative-free local optimisation (scipy Powell) from ``init``, for LC2."""
    scales = model.scales(radius_mm)
    theta0 = np.asarray(init, dtype=np.float64)
    t0 = time.perf_counter()

    def fun(u: np.ndarray) -> float:
        _check(cancel)
        return float(objective.cost((theta0 + u * scales)[None, :])[0])

    res = optimize.minimize(fun, np.zeros_like(theta0), method="Powell",
                            options={"maxfev": max_evaluations, "xtol": 0.1, "ftol": 1e-5,
                                     "direc": np.eye(len(theta0)) * step_mm})
    theta = theta0 + res.x * scales
    sol = RefinedSolution(theta, float(res.fun), 0)
    return SearchResult(theta=theta, cost=float(res.fun), solutions=[sol], agreeing=1,
                        confidence=1.0, ambiguous=False, evaluations=objective.evaluations,
                        starts=1, timings={"local": time.perf_counter() - t0})
