"""Engine speed: objective evaluations per second and global-search wall time.

    python benchmarks/engine_speed.py [--quick]

Part A (same pair, same descriptor grid): evaluations per second of the
descriptor objective on int8 and float32 DISA maps, of MIND-SSC + SSD, and of
LC2 (the reference metric, on the working grid and on a grid of the descriptor
grid's size), with ratios against LC2. Target: int8 >= 300x LC2 (the paper).

Part B: wall time of `register` (500 starts + refinement, rigid) for a pair
whose descriptor grid is about 64^3, split into stages. Target: global search
<= 2 s on 2 CPU cores (the paper: 1.8 s on an RTX 4090 with extraction).

Without shipped DISA weights the DISA rows use surrogate 16-channel unit-ball
maps on the same grid (the objective's cost does not depend on the weights)
and say so.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import machine
from scipy import ndimage

from disa.registration.options import RegistrationOptions
from disa.registration.pipeline import fixed_weights, prepare, register
from disa.registration.similarity.descriptor_map import DescriptorMap
from disa.registration.similarity.mind import mind_ssc
from disa.registration.similarity.objective import DescriptorObjective, LC2Objective
from disa.registration.transform.parametric import TransformModel
from disa.training import phantom as ph


def disa_maps(fixed_p, moving_p) -> tuple[DescriptorMap, DescriptorMap, str]:
    """DISA descriptors from the shipped model, else surrogate maps on the stride-4 grid."""
    from disa.model.card import default_card_path

    if default_card_path() is not None:
        from disa.registration.pipeline import descriptor_maps

        opts = RegistrationOptions(similarity="disa")
        f, _, _ = descriptor_maps(fixed_p, "disa", opts)
        m, _, _ = descriptor_maps(moving_p, "disa", opts)
        return f, m, "shipped DISA model"
    maps = []
    for seed, prep in ((1, fixed_p), (2, moving_p)):
        grid = prep.grid.strided(4)
        data = ndimage.gaussian_filter(np.random.default_rng(seed).normal(
            size=(*grid.shape, 16)), (1, 1, 1, 0))
        data /= np.maximum(np.linalg.norm(data, axis=-1, keepdims=True), 1.0)
        maps.append(DescriptorMap(np.ascontiguousarray(data.astype(np.float32)), grid))
    return maps[0], maps[1], "surrogate maps (no shipped model)"


def rate(fn, batch: int, min_seconds: float = 1.0) -> float:
    """Evaluations per second of fn() that evaluates ``batch`` transforms."""
    fn()  # warm-up (compilation, caches)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        fn()
        n += 1
    return n * batch / (time.perf_counter() - start)


def part_a(size: int) -> None:
    print(f"\n## A. objective evaluations per second ({size}^3 voxels at 2 mm)")
    truth = ph.rigid_truth((5.0, -4.0, 6.0), (6.0, -5.0, 4.0))
    grid = ph.make_grid((size, size, size), (2.0, 2.0, 2.0))
    pair = ph.make_pair(truth, fixed_grid=grid, moving_grid=grid, seed=11)
    fixed_p, moving_p = prepare(pair.fixed, 2.0, None), prepare(pair.moving, 2.0, None)
    f_disa, m_disa, source = disa_maps(fixed_p, moving_p)
    weights = fixed_weights(fixed_p, 4)
    model = TransformModel("rigid", fixed_p.grid.center)
    rng = np.random.default_rng(0)
    thetas = rng.normal(size=(500, 6)) * [0.1, 0.1, 0.1, 5, 5, 5]
    rows = []
    for name, f, m, kind in (
        (f"DISA int8 ({source})", f_disa.quantised(), m_disa.quantised(), "dot"),
        (f"DISA float32 ({source})", f_disa, m_disa, "dot"),
    ):
        obj = DescriptorObjective(f, m, weights, model, kind=kind)
        rows.append((name, rate(lambda o=obj: o.cost_and_grad(thetas), len(thetas)),
                     len(obj.points)))
    mind_f = DescriptorMap(np.ascontiguousarray(mind_ssc(fixed_p.volume)[::4, ::4, ::4]),
                           f_disa.grid)
    mind_m = DescriptorMap(np.ascontiguousarray(mind_ssc(moving_p.volume)[::4, ::4, ::4]),
                           m_disa.grid)
    obj = DescriptorObjective(mind_f, mind_m, weights, model, kind="ssd")
    rows.append(("MIND-SSC float32 + SSD", rate(lambda: obj.cost_and_grad(thetas), 500),
                 len(obj.points)))
    lc2 = LC2Objective(fixed_p.volume, fixed_p.grid, moving_p.volume, moving_p.grid, model,
                       fixed_mask=fixed_p.mask)
    lc2_rate = rate(lambda: lc2.cost(thetas[:1]), 1, min_seconds=3.0)
    rows.append((f"LC2 on the working grid ({size}^3)", lc2_rate, int(fixed_p.mask.sum())))
    small = LC2Objective(fixed_p.volume[::4, ::4, ::4].copy(), fixed_p.grid.strided(4),
                         moving_p.volume[::4, ::4, ::4].copy(), moving_p.grid.strided(4), model,
                         fixed_mask=fixed_p.mask[::4, ::4, ::4])
    rows.append((f"LC2 on the descriptor grid ({f_disa.grid.shape[0]}^3)",
                 rate(lambda: small.cost(thetas[:1]), 1, min_seconds=2.0),
                 int(fixed_p.mask[::4, ::4, ::4].sum())))
    print(f"descriptor grid {f_disa.grid.shape}, weighted points {len(obj.points)}")
    print("| objective | evaluations/s (with gradient where available) | points | vs LC2 |")
    print("|---|---:|---:|---:|")
    for name, r, n in rows:
        print(f"| {name} | {r:,.0f} | {n:,} | {r / lc2_rate:,.0f}x |")


def part_b(size: int, spacing: float, starts: int) -> None:
    print(f"\n## B. register(): {starts} starts + refinement, rigid")
    truth = ph.rigid_truth((20.0, -15.0, 18.0), (30.0, -25.0, 20.0))
    grid = ph.make_grid((size, size, size), (spacing, spacing, spacing))
    pair = ph.make_pair(truth, fixed_grid=grid, seed=12)
    points = ph.grid_points(ph.make_grid((9, 9, 9), (10.0, 10.0, 10.0)))
    from disa.model.card import default_card_path

    sims = ["mind"] + (["disa"] if default_card_path() is not None else [])
    for sim in sims:
        working = 4.0 if sim == "mind" else None  # MIND: 64^3 map; DISA: model spacing
        options = RegistrationOptions(similarity=sim, starts=starts, working_spacing=working)
        register(pair.fixed, pair.moving, options.model_copy(update={"starts": 10}))  # warm-up
        start = time.perf_counter()
        result = register(pair.fixed, pair.moving, options)
        total = time.perf_counter() - start
        t = result.timings
        search = t.get("search", 0.0)
        error = ph.target_registration_error(result.transform, truth, points)
        print(f"- {sim}: descriptor grid spacing {result.descriptor_spacing_mm:.1f} mm, "
              f"total {total:.2f} s = preprocess {t.get('preprocess', 0):.2f} + descriptors "
              f"{t.get('descriptors', 0):.2f} + global search {search:.2f} (coarse "
              f"{t.get('search_coarse', 0):.2f}, fine {t.get('search_fine', 0):.2f}, L-BFGS "
              f"{t.get('search_refine', 0):.2f}) + re-oriented refinement "
              f"{t.get('reorient', 0):.2f}; {result.evaluations} evaluations; TRE {error:.2f} mm;"
              f" confidence {result.confidence:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    args = parser.parse_args()
    print(f"# engine speed — {machine()}")
    if args.quick:
        part_a(48)
        part_b(48, 4.0, 50)
    else:
        part_a(128)
        part_b(128, 2.0, 500)


if __name__ == "__main__":
    main()
