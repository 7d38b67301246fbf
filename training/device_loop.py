"""The device loop: `disa-train fit --device cpu|cuda` (shift-aware LC2 regression).

Why a second loop: the CPU loop of v1-v5 (`disa.training.loop`) makes every
crop and target on the CPU in float64 (scipy, numba) and supervises 5-11k
targets a second; its network optimum sits 9.1 mm from the truth on average
where LC2's own sits 1.5 mm away (docs/TRAINING.md), because the loss never
looks at how the similarity changes over a few voxels. This loop

* keeps scene synthesis on CPU worker processes (`disa.training.data.SceneStream`,
  the same scenes as the CPU loop for a seed) and moves everything after it to
  the device: crops, rotations, flips and intensity augmentation by
  ``grid_sample``, LC2 targets by box means (`disa.training.device`), the
  network and the optimiser. Each scene serves ``scene_reuse`` steps and stays
  in a pool of the ``scene_pool`` newest scenes that every step draws its crop
  pairs from, so one scene serves ``scene_reuse * batch`` crop pairs;
* supervises, per crop pair (`step_loss`):
  - dense LC2 at every node (zero offset) and at ``node_offsets`` random node
    offsets (every pair (i, i + offset) at once, the CPU loop's cross pairs made
    dense), with the target-bin balancer (``balance_power`` softens it);
  - shift differences: for ``shift_pairs`` pairs of nearby voxel offsets
    (s, s + d), |d| of 1-3 voxels in a random direction, the change of the
    prediction d_f(i) . M(4i + s) -> d_f(i) . M(4i + s + d) (M read between
    nodes by trilinear interpolation, as the registration objective reads it)
    against the same change of LC2, at every node (``shift_weight``);
  - a per-crop gradient term: the w-weighted mean of those changes (w: the
    registration's point weights) is the objective's finite-difference gradient
    along d, so its error is exactly what moves the optimum
    (``gradient_weight``);
* runs the convolutions under bf16 autocast on CUDA (``amp``); the clip, the
  dot products, the targets and the loss stay fp32;
* schedules the rate by wall clock: linear warm-up over ``warmup_steps``, then a
  cosine from ``lr`` to ``lr * final_lr_fraction`` over the budget (or over
  ``schedule_steps`` steps, which makes it a function of the step alone);
* checkpoints every ``checkpoint_minutes`` (1 by default) and at the end, runs
  the optimum-bias scan (`disa.training.scan`) at each checkpoint and keeps the
  weights with the smallest mean drift in ``best.pt``; exports ``disa.onnx``
  (from a CPU copy of the kept weights) when it stops.

Determinism: step t's crop pairs and offsets depend only on (seed, t) and the
scenes only on (seed, group), so a resumed run repeats an uninterrupted one;
on the CPU bit for bit (tests/training/test_device.py), on CUDA up to cuDNN's
own nondeterminism. The scan only reads the weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from disa.core.atomic import atomic_write, write_json
from disa.core.errors import DisaError
from disa.training import device as dv
from disa.training import loop as cpu_loop
from disa.training.data import scene_loader, training_volumes
from disa.training.loop import BEST, TargetBalancer, TrainConfig
from disa.training.network import DisaNet, clip_to_unit_ball
from disa.training.pairs import CropDraw, PairConfig, draw_crop
from disa.training.scan import ScanConfig, make_scan_pairs, run_scan

ONNX = "disa.onnx"
#: What a resumed run may change; everything else defines the run and is kept.
RESUMABLE = ("budget_minutes", "max_steps", "checkpoint_minutes", "workers", "threads",
             "log_every_s", "device")


class DeviceUnavailable(DisaError, RuntimeError):
    """``--device cuda`` on a machine where torch sees no CUDA device."""


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name`` ("cpu" or "cuda"); DeviceUnavailable at once (before
    any data is loaded) when CUDA is asked for and missing."""
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        build = torch.version.cuda or "none"
        raise DeviceUnavailable(f"--device cuda: torch {torch.__version__} sees no CUDA device "
                                f"(built for CUDA {build}); use --device cpu")
    return torch.device(name)


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    if cfg.amp not in ("auto", "off", "bf16"):
        raise ValueError(f"amp must be auto, bf16 or off, got {cfg.amp!r}")
    return None


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Rate of ``step`` at ``progress`` (0-1 of the horizon): warm-up, then cosine."""
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    p = min(max(progress, 0.0), 1.0)
    floor = cfg.final_lr_fraction
    return cfg.lr * warm * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p)))


@dataclass
class DeviceScene:
    group: int
    images: torch.Tensor  # (2, 1, Z, Y, X) on the device
    focus: np.ndarray
    mirror: bool


def step_draws(cfg: TrainConfig, step: int, pool: list[DeviceScene]
               ) -> tuple[list[tuple[int, CropDraw]], dv.StepOffsets]:
    """Crop pair b of ``step``: (index into ``pool``, newest first; its draw), and the
    step's offsets. Pair b uses ``default_rng([seed, step, b + 1])`` as the CPU loop's
    pair b of batch ``step`` does, so with ``scene_pool`` 1 both loops make the same crops."""
    pcfg = pair_config(cfg)
    draws = []
    for b in range(cfg.batch):
        index = b % len(pool)
        draws.append((index, draw_crop(np.random.default_rng([cfg.seed, step, b + 1]),
                                       pool[index].focus, pcfg)))
    # A key of its own length: never the stream of a scene or of a crop pair.
    rng = np.random.default_rng([cfg.seed, step, 0, 0xD15A])
    offsets = dv.draw_offsets(rng, pcfg.out_side, cfg.node_offsets, cfg.cross_reach,
                              cfg.shift_pairs, cfg.shift_range, cfg.shift_step)
    return draws, offsets


def pair_config(cfg: TrainConfig) -> PairConfig:
    return cfg.data_config().pairs


def make_crops(pool: list[DeviceScene], draws: list[tuple[int, CropDraw]], side: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded fixed and moving crops (B, 1, side^3) in the order of ``draws``."""
    fixed: list[torch.Tensor | None] = [None] * len(draws)
    moving: list[torch.Tensor | None] = [None] * len(draws)
    for index, scene in enumerate(pool):
        mine = [b for b, (i, _) in enumerate(draws) if i == index]
        if not mine:
            continue
        f, m = dv.sample_crops(scene.images, [draws[b][1] for b in mine], side, scene.mirror)
        for j, b in enumerate(mine):
            fixed[b], moving[b] = f[j:j + 1], m[j:j + 1]
    return torch.cat(fixed), torch.cat(moving)  # type: ignore[arg-type]


def describe(net: DisaNet, x: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
    """Unit-ball descriptors (N, 16, ...) in fp32; only the convolutions under autocast."""
    x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast(device_type=x.device.type, dtype=amp or torch.float32,
                        enabled=amp is not None):
        raw = net.forward_unnormalised(x)
    return clip_to_unit_ball(raw.float(), dim=1)


def step_loss(
    d_f: torch.Tensor,
    d_m: torch.Tensor,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    offsets: dv.StepOffsets,
    cfg: TrainConfig,
    balancer: TargetBalancer | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss to minimise, figures) of one step.

    ``d_f``, ``d_m``: descriptors (B, C, k, k, k) of the inner crops; ``fixed``,
    ``moving``: the padded crops (B, 1, side^3) the targets come from. Figures:
    ``mse`` (dense targets, unweighted: the CPU loop's figure), ``shift_mse`` (per
    node shift differences), ``gradient_mse`` (per crop w-weighted means of them),
    ``targets`` (dense targets + node shift differences supervised).
    """
    pcfg = pair_config(cfg)
    k = pcfg.out_side
    with torch.no_grad():
        lc2 = dv.LC2Targets(dv.prepare(fixed, moving), pcfg)
    preds, targets = [], []
    for offset in ((0, 0, 0), *offsets.node):
        nodes = dv.node_range(offset, k)
        assert nodes is not None
        with torch.no_grad():
            targets.append(lc2(offset, nodes).flatten())
        moved = dv.moving_at_offset(d_m, offset, nodes)
        preds.append((d_f[nodes.slices()] * moved).sum(dim=1).flatten())
    pred, target = torch.cat(preds), torch.cat(targets)
    err = (pred - target) ** 2
    mse = err.mean()
    loss = mse if balancer is None else (balancer.weights(target) * err).mean()
    figures = {"mse": float(mse.detach()), "targets": float(target.numel())}
    if offsets.shift and (cfg.shift_weight > 0 or cfg.gradient_weight > 0):
        with torch.no_grad():
            w = dv.node_weights(fixed, pcfg)
        node_terms, crop_terms = [], []
        for s, s2 in offsets.shift:
            a, b = dv.node_range(s, k), dv.node_range(s2, k)
            assert a is not None and b is not None
            nodes = a.intersect(b)
            assert nodes is not None
            with torch.no_grad():
                change_target = lc2(s2, nodes) - lc2(s, nodes)
            change_pred = (d_f[nodes.slices()] * (dv.moving_at_offset(d_m, s2, nodes)
                                                  - dv.moving_at_offset(d_m, s, nodes))).sum(1)
            node_terms.append(((change_pred - change_target) ** 2).flatten(1))
            # The objective's finite difference along d: w-weighted means over the crop.
            wn = w[nodes.slices()[:1] + nodes.slices()[2:]].flatten(1)
            total = wn.sum(dim=1).clamp_min(1e-12)
            grad_pred = (wn * change_pred.flatten(1)).sum(dim=1) / total
            grad_target = (wn * change_target.flatten(1)).sum(dim=1) / total
            crop_terms.append((grad_pred - grad_target) ** 2)
        shift_mse = torch.cat(node_terms, dim=1).mean()
        gradient_mse = torch.cat(crop_terms).mean()
        loss = loss + cfg.shift_weight * shift_mse + cfg.gradient_weight * gradient_mse
        figures["shift_mse"] = float(shift_mse.detach())
        figures["gradient_mse"] = float(gradient_mse.detach())
        figures["targets"] += float(sum(t.numel() for t in node_terms))
    return loss, figures


def _atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh), durable=False)


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def fit_device(
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = False,
    interactive: bool | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train (or continue) into ``out`` with the device loop; returns the run summary."""
    out = Path(out)
    ckpt_path = out / cpu_loop.CHECKPOINT
    cfg, state = _device_config_to_run(cfg, ckpt_path, resume)
    device = resolve_device(cfg.device or "cpu")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        # Crop and batch shapes never change within a run: let cuDNN pick its kernels once.
        torch.backends.cudnn.benchmark = True
    amp = amp_dtype(cfg, device)  # a bad --amp fails before the run starts
    run = _start_device_run(cfg, state, device, out)
    cfg = run.cfg
    budget_s = cfg.budget_minutes * 60.0
    interactive = sys.stdout.isatty() if interactive is None else interactive
    reporter = cpu_loop.Reporter(budget_s, run.elapsed, interactive)
    log = (out / cpu_loop.LOG).open("a", encoding="utf-8")
    first_group = max(0, run.step // cfg.scene_reuse - cfg.scene_pool + 1)
    loader = iter(scene_loader(cfg.data_config(), cfg.seed, first_group, cfg.workers,
                               pin_memory=device.type == "cuda"))
    stop_reason, interrupted = _device_steps(run, loader, amp, log, reporter, on_step)
    onnx_path = None if interrupted else export_kept(out)
    reporter.close()
    log.close()
    summary = {
        **cpu_loop.run_summary(run.step, run.elapsed, stop_reason, cfg, ckpt_path),
        "best": run.best,
        "onnx": onnx_path,
    }
    write_json(summary, out / cpu_loop.SUMMARY, durable=False)
    return summary


def _device_config_to_run(cfg: TrainConfig, ckpt_path: Path, resume: bool
                          ) -> tuple[TrainConfig, dict[str, Any] | None]:
    """(configuration, checkpoint state) of a device run, refused before anything is read
    when the device is missing, the checkpoint is the CPU loop's, or the configuration
    asks for what only the CPU loop trains."""
    if cfg.device is not None:
        resolve_device(cfg.device)  # fail before anything is read
    state: dict[str, Any] | None = None
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"nothing to resume: {ckpt_path} does not exist")
        state = cpu_loop.load_checkpoint(ckpt_path)
        saved = TrainConfig.from_dict(state["config"])
        if saved.device is None:
            raise ValueError(f"{ckpt_path} is a run of the CPU loop: resume it without --device")
        changes = {k: getattr(cfg, k) for k in RESUMABLE}
        changes["device"] = cfg.device or saved.device
        cfg = dataclasses.replace(saved, **changes)
    elif ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass resume=True (--resume) or another --out")
    if not cfg.symmetric_target or cfg.contrast_weight:
        raise ValueError("the device loop trains on symmetric targets without the contrast "
                         "term: drop --role-target / --contrast-weight, or drop --device")
    return cfg, state


@dataclass
class _DeviceRun:
    """A device run between steps: the network and what trains it, the counters, the best
    scan so far and the scan pairs that judge it (what a checkpoint saves)."""

    cfg: TrainConfig
    device: torch.device
    out: Path
    net: DisaNet
    opt: torch.optim.Optimizer
    balancer: TargetBalancer | None
    ema: AveragedModel | None
    scan_cfg: ScanConfig
    scan_pairs: list[Any]
    step: int = 0
    elapsed: float = 0.0  # seconds of training, over every resumption
    best: dict[str, Any] | None = None

    def served(self) -> torch.nn.Module:
        """The weights the run serves: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.net

    def checkpoint(self, scan: bool, log: Any, reporter: cpu_loop.Reporter) -> None:
        """Save the checkpoint; with ``scan``, scan the served weights first and keep them
        as best.pt when their drift is the lowest so far."""
        cfg, ema, balancer = self.cfg, self.ema, self.balancer
        if scan and self.scan_pairs:
            result = run_scan(self.served(), self.scan_pairs, self.scan_cfg, self.device)
            result.update(step=self.step, elapsed_s=round(self.elapsed, 1))
            log.write(json.dumps({"scan": result}) + "\n")
            log.flush()
            reporter.update(self.elapsed, f"scan at step {self.step}: drift "
                                          f"{result['drift_mm_mean']:.2f} mm (median "
                                          f"{result['drift_mm_median']:.2f}), "
                                          f"val mse {result['val_mse']:.4f}")
            if self.best is None or result["drift_mm_mean"] < self.best["drift_mm_mean"]:
                self.best = {k: result[k] for k in ("drift_mm_mean", "drift_mm_median",
                                                    "val_mse", "step")}
                _atomic_save({"model": _cpu_state(self.served()), "averaged_model": None,
                              "step": self.step, "elapsed_s": self.elapsed, "scan": result,
                              "config": dataclasses.asdict(cfg)}, self.out / BEST)
        _atomic_save(
            {
                "model": _cpu_state(self.net),
                "optimizer": self.opt.state_dict(),
                "balancer": balancer.state_dict() if balancer is not None else None,
                "ema": ema.state_dict() if ema is not None else None,
                "averaged_model": _cpu_state(ema.module) if ema is not None else None,
                "step": self.step,
                "elapsed_s": self.elapsed,
                "best": self.best,
                "config": dataclasses.asdict(cfg),
            },
            self.out / cpu_loop.CHECKPOINT,
        )


def _start_device_run(cfg: TrainConfig, state: dict[str, Any] | None, device: torch.device,
                      out: Path) -> _DeviceRun:
    """The network (from ``cfg.init_from`` or the checkpoint ``state``) on ``device``, its
    optimiser, balancer and average, and the scan pairs; the run's configuration gains
    the initial weights' sha256 when it starts from them."""
    net = cpu_loop.new_model(cfg.seed)
    if state is None and cfg.init_from is not None:
        from disa.model.card import file_sha256

        cfg = dataclasses.replace(cfg, init_sha256=file_sha256(cfg.init_from)
                                  if Path(cfg.init_from).is_file() else None)
        net.load_state_dict(cpu_loop.initial_weights(cfg.init_from))
    if state is not None:
        net.load_state_dict(state["model"])
    net = net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    balancer = TargetBalancer(power=cfg.balance_power) if cfg.balance else None
    ema = (AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
           if cfg.ema_decay > 0 else None)
    scan_cfg = ScanConfig(pairs=cfg.val_pairs, side=cfg.val_side)
    run = _DeviceRun(cfg, device, out, net, opt, balancer, ema, scan_cfg, [])
    if state is not None:
        if ema is not None:
            ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        if balancer is not None and state.get("balancer") is not None:
            balancer.load_state_dict(state["balancer"])
        run.step, run.elapsed = int(state["step"]), float(state["elapsed_s"])
        run.best = state.get("best")
    if cfg.val_pairs > 0:
        run.scan_pairs = make_scan_pairs(training_volumes(cfg.data_config()), scan_cfg,
                                         tuple(cfg.phantom_shape))  # type: ignore[arg-type]
    return run


def _refill_pool(pool: OrderedDict[int, DeviceScene], loader: Any, group: int,
                 cfg: TrainConfig, device: torch.device) -> None:
    """Bring the scene pool to the ``cfg.scene_pool`` newest scenes up to ``group``: load
    scenes until it holds ``group``, drop the oldest beyond the pool."""
    while not pool or next(reversed(pool)) < group:
        item = next(loader)
        pool[int(item["group"])] = DeviceScene(
            int(item["group"]),
            item["images"].to(device, non_blocking=True)[:, None],
            item["focus"].numpy(), bool(item["mirror"]))
    while len(pool) > cfg.scene_pool or next(iter(pool)) <= group - cfg.scene_pool:
        pool.popitem(last=False)


def _device_steps(run: _DeviceRun, loader: Any, amp: torch.dtype | None, log: Any,
                  reporter: cpu_loop.Reporter, on_step: Callable[[int, float], None] | None
                  ) -> tuple[str, bool]:
    """Train until the budget, the step cap or an interrupt; log every
    ``cfg.log_every_s``, checkpoint (with a scan) every ``cfg.checkpoint_minutes`` and at
    the end (a finished run scans its last weights too). Returns (why it stopped,
    whether it was interrupted). SIGTERM and SIGINT stop it like Ctrl-C meanwhile."""
    cfg, net, opt = run.cfg, run.net, run.opt
    pcfg = pair_config(cfg)
    budget_s = cfg.budget_minutes * 60.0
    pool: OrderedDict[int, DeviceScene] = OrderedDict()
    restore_signals = cpu_loop._stop_on_signals()
    t_start = time.monotonic()
    elapsed0 = run.elapsed
    last_ckpt = last_log = t_start
    window: dict[str, float] = {"n": 0, "wait": 0.0, "t0": t_start, "targets": 0.0}
    stop_reason = "max_steps"
    interrupted = finished = False
    net.train()
    try:
        while True:
            now = time.monotonic()
            run.elapsed = elapsed0 + (now - t_start)
            if run.elapsed >= budget_s:
                stop_reason = "budget"
                break
            if cfg.max_steps is not None and run.step >= cfg.max_steps:
                break
            t_wait = time.monotonic()
            _refill_pool(pool, loader, run.step // cfg.scene_reuse, cfg, run.device)
            window["wait"] += time.monotonic() - t_wait
            scenes = list(reversed(pool.values()))
            draws, offsets = step_draws(cfg, run.step, scenes)
            with torch.no_grad():
                fixed, moving = make_crops(scenes, draws, pcfg.side)
            inner = slice(pcfg.margin, pcfg.margin + pcfg.crop)
            d = describe(net, torch.cat([fixed, moving])[:, :, inner, inner, inner], amp)
            b = fixed.shape[0]
            loss, figures = step_loss(d[:b], d[b:], fixed, moving, offsets, cfg, run.balancer)
            if cfg.schedule_steps:
                progress = run.step / cfg.schedule_steps
            else:
                progress = run.elapsed / budget_s if budget_s > 0 else 1.0
            for group_ in opt.param_groups:
                group_["lr"] = lr_at(cfg, run.step, progress)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if run.ema is not None:
                run.ema.update_parameters(net)
            run.step += 1
            window["n"] += 1
            window["targets"] += figures.pop("targets")
            figures["loss"] = float(loss.detach())
            for key, value in figures.items():
                window[key] = window.get(key, 0.0) + value
            now = time.monotonic()
            run.elapsed = elapsed0 + (now - t_start)
            if on_step is not None:
                on_step(run.step, figures["mse"])
            if now - last_log >= cfg.log_every_s:
                _log(log, reporter, window, run.step, run.elapsed, budget_s, opt)
                last_log = now
            if now - last_ckpt >= cfg.checkpoint_minutes * 60.0:
                run.checkpoint(True, log, reporter)
                last_ckpt = time.monotonic()
        finished = True
    except KeyboardInterrupt:
        stop_reason, interrupted = "interrupted", True
    finally:
        run.elapsed = elapsed0 + (time.monotonic() - t_start)
        if window["n"]:
            _log(log, reporter, window, run.step, run.elapsed, budget_s, opt)
        try:
            # An interrupted or failed run saves at once; a finished one scans its last
            # weights too, so that they can be kept.
            run.checkpoint(finished, log, reporter)
        finally:
            restore_signals()
    return stop_reason, interrupted


def export_kept(run: Path) -> str:
    """``run/disa.onnx`` from a CPU copy of the weights the run keeps (best.pt when the
    scan ran, else the last checkpoint's served weights); the model card is written
    later by `disa-train export` on a machine with the runtime's packages."""
    from disa.training.onnx_export import export_onnx

    net = cpu_loop.model_from_checkpoint(run)
    path = run / ONNX
    export_onnx(net, path)
    return str(path)


def _log(log: Any, reporter: Any, window: dict[str, float], step: int, elapsed: float,
         budget_s: float, opt: torch.optim.Optimizer) -> None:
    now = time.monotonic()
    span = max(now - window["t0"], 1e-9)
    n = max(int(window["n"]), 1)
    record: dict[str, Any] = {"step": step, "elapsed_s": round(elapsed, 1)}
    for key in ("loss", "mse", "shift_mse", "gradient_mse"):
        if key in window:
            record[key] = window[key] / n
    record.update(
        lr=opt.param_groups[0]["lr"],
        steps_per_s=round(window["n"] / span, 4),
        targets_per_s=round(window["targets"] / span, 1),
        data_wait_fraction=round(window["wait"] / span, 3),
    )
    log.write(json.dumps(record) + "\n")
    log.flush()
    remaining = max(budget_s - elapsed, 0.0)
    terms = "".join(f"  {name} {record[key]:.2g}" for key, name in
                    (("shift_mse", "shift"), ("gradient_mse", "grad")) if key in record)
    reporter.update(
        elapsed,
        f"step {step}  loss {record.get('loss', 0):.4f}  mse {record.get('mse', 0):.4f}{terms}  "
        f"lr {record['lr']:.2e}  {record['steps_per_s']:.2f} steps/s  "
        f"{record['targets_per_s']:.0f} targets/s  wait {record['data_wait_fraction']:.0%}  "
        f"left {math.ceil(remaining / 60)} min",
    )
    window.clear()
    window.update(n=0, wait=0.0, t0=now, targets=0.0)
