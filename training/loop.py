"""The training loop: dense LC2 regression of descriptor dot products, resumable.

Loss: for every output voxel i of a crop pair, (phi(F)[i] . phi(M)[i] - LC2_i)^2,
averaged over all supervised voxels of the batch. Targets are skewed towards 0
(background, flat tissue, misaligned patches), so by default each voxel's
error is weighted by the inverse running frequency of its target's bin (10
bins over [0, 1], weights clipped to 10 and normalised to mean 1 per batch):
the loss then approximates the uniform target spread the paper evaluates on.

Optimiser: AdamW (lr 1e-3, weight decay 1e-3), linear warm-up, then the rate
halves every ``halve_every`` steps. Checkpoints (model, optimiser, scheduler,
balancer, torch RNG, step, elapsed time, config) are written atomically every
``checkpoint_minutes`` and at the end; ``resume`` continues from the last one.
``budget_minutes`` counts training wall time over all resumed runs, so an
interrupted run resumed with the same command stops where it would have.
Data batches depend only on (seed, step) (see `disa.training.data`), so a run
and its resumed continuation see identical batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from disa.core.atomic import atomic_write, write_json
from disa.training.data import DataConfig, batch_loader
from disa.training.network import DisaNet
from disa.training.pairs import PairConfig

CHECKPOINT = "checkpoint.pt"
#: The weights a device-loop run keeps: the smallest optimum-bias drift of its scans.
BEST = "best.pt"
LOG = "log.jsonl"
SUMMARY = "run.json"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint)."""

    budget_minutes: float = 60.0
    seed: int = 0
    crop: int = 64
    batch: int = 2
    scene_reuse: int = 2
    lr: float = 1e-3
    weight_decay: float = 1e-3
    warmup_steps: int = 100
    halve_every: int = 600
    max_steps: int | None = None
    checkpoint_minutes: float = 5.0
    workers: int = 1
    threads: int = 1
    balance: bool = True
    symmetric_target: bool = True
    cross_pairs: int = 4096
    cross_reach: int = 4
    #: Weight of the contrast term (``pair_loss``): 0 = the paper's MSE alone.
    contrast_weight: float = 0.0
    #: Exponential moving average of the weights (decay per step; 0 = off). The
    #: averaged weights are what a checkpoint serves (export, evaluate, init_from);
    #: why: the batch loss sits at a noise floor (docs/TRAINING.md), and averaging
    #: the iterates is the usual way below it at no extra cost per step.
    ema_decay: float = 0.0
    #: Start from these weights (an exported ONNX file or a run's checkpoint) rather
    #: than from the seed's random initialisation; optimiser and schedule start fresh.
    init_from: str | None = None
    #: sha256 of ``init_from`` at the start, so the card can name the exact parent.
    init_sha256: str | None = None
    phantom_fraction: float = 0.35
    source_ids: tuple[str, ...] = ("icbm152-brain", "icbm152-head")
    phantom_shape: tuple[int, int, int] = (96, 96, 96)
    log_every_s: float = 30.0
    #: Training volumes from this float16 .npz (`disa-train cache`) instead of the
    #: installed packages; None: the packages.
    volume_cache: str | None = None
    #: Exponent of the target-bin balancer's weights (1: the v1-v5 weights, 0: plain MSE,
    #: 0.5: softened). Ignored with ``balance`` off.
    balance_power: float = 1.0
    # ---- the device loop (`disa.training.device_loop`); None: the CPU loop of v1-v5.
    device: str | None = None
    #: Convolutions under bf16 autocast: "auto" (on CUDA only), "bf16" or "off".
    amp: str = "auto"
    #: Recent scenes a step draws its crop pairs from (crop pair b: the b-th newest).
    scene_pool: int = 1
    #: Dense cross targets: node offsets per step, each supervising every node pair
    #: (i, i + offset) of every crop pair; reach in nodes per axis is ``cross_reach``.
    node_offsets: int = 4
    #: Shift-difference terms: pairs of voxel offsets (s, s + d) per step, s within
    #: +-``shift_range`` voxels per axis, |d| in [1, ``shift_step``] voxels.
    shift_pairs: int = 4
    shift_range: int = 4
    shift_step: int = 3
    #: Weight of the per-node shift-difference term and of the per-crop w-weighted
    #: finite-difference gradient term (`disa.training.device_loop.step_loss`). At v5
    #: the terms are 0.0044 and 0.00044 against a dense MSE of 0.025: these weights
    #: give each about 0.7x the MSE's share of the loss.
    shift_weight: float = 4.0
    gradient_weight: float = 40.0
    #: Learning-rate horizon in steps (cosine from ``lr`` to ``lr * final_lr_fraction``);
    #: None: the wall-clock budget is the horizon.
    schedule_steps: int | None = None
    final_lr_fraction: float = 0.05
    #: Optimum-bias scan at every checkpoint: validation pairs (0: none) and their side.
    val_pairs: int = 6
    val_side: int = 80
    extra: dict[str, Any] = field(default_factory=dict)

    def data_config(self) -> DataConfig:
        return DataConfig(
            pairs=PairConfig(
                crop=self.crop,
                symmetric_target=self.symmetric_target,
                cross_pairs=self.cross_pairs,
                cross_reach=self.cross_reach,
            ),
            batch=self.batch,
            scene_reuse=self.scene_reuse,
            source_ids=tuple(self.source_ids),
            phantom_fraction=self.phantom_fraction,
            phantom_shape=tuple(self.phantom_shape),  # type: ignore[arg-type]
            volume_cache=self.volume_cache,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("source_ids", "phantom_shape"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


class TargetBalancer:
    """Per-voxel loss weights from the inverse running frequency of target bins."""

    def __init__(self, bins: int = 10, momentum: float = 0.98, max_weight: float = 10.0,
                 power: float = 1.0) -> None:
        self.bins, self.momentum, self.max_weight = bins, momentum, max_weight
        self.power = power
        self.freq = torch.full((bins,), 1.0 / bins, dtype=torch.float64)

    def weights(self, target: torch.Tensor) -> torch.Tensor:
        idx = torch.clamp((target * self.bins).long(), 0, self.bins - 1)
        # The running frequencies stay on the CPU in float64 whatever the targets' device.
        hist = torch.bincount(idx.flatten(), minlength=self.bins).double().cpu()
        self.freq = self.momentum * self.freq + (1 - self.momentum) * hist / hist.sum()
        w = torch.clamp((1.0 / self.bins) / self.freq.clamp_min(1e-6), max=self.max_weight)
        if self.power != 1.0:
            w = w**self.power
        per_voxel = w.to(target.device)[idx].float()
        return per_voxel / per_voxel.mean()

    def state_dict(self) -> dict[str, Any]:
        return {"freq": self.freq.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.freq = state["freq"].clone().double()


def lr_factor(step: int, warmup_steps: int, halve_every: int) -> float:
    """Multiplier of the base rate: linear warm-up, then halving every ``halve_every`` steps."""
    warm = min(1.0, (step + 1) / max(warmup_steps, 1))
    return warm * 0.5 ** (step // max(halve_every, 1))


def pair_loss(
    net: DisaNet,
    batch: dict[str, torch.Tensor],
    balancer: TargetBalancer | None,
    contrast_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss to minimise, plain MSE) of one batch.

    ``contrast_weight`` adds a term on differences: for every cross pair (i, j)
    the difference between the equal-position prediction and the cross one,
    d_f(i).d_m(i) - d_f(i).d_m(j), is fitted to the same difference of targets,
    and likewise with the moving descriptor j as the anchor. Why: registration
    compares, for each fixed point, its similarity to different moving points;
    an error shared by all partners of one anchor does not move the optimum,
    while an error that differs between partners (a moving patch that looks
    "similar to everything") does. The MSE weighs both kinds alike.
    """
    fixed, moving, target = batch["fixed"], batch["moving"], batch["target"]
    x = torch.cat([fixed, moving]).contiguous(memory_format=torch.channels_last_3d)
    d = net(x)
    b = fixed.shape[0]
    pred = (d[:b] * d[b:]).sum(dim=1).flatten()
    target = target.flatten()
    same_pred, same_target = pred, target
    contrast: torch.Tensor | None = None
    if "cross_target" in batch and batch["cross_target"].numel():
        # Descriptors as (B * k^3, C) rows; cross pairs index fixed and moving rows.
        rows_f = d[:b].permute(0, 2, 3, 4, 1).reshape(-1, d.shape[1])
        rows_m = d[b:].permute(0, 2, 3, 4, 1).reshape(-1, d.shape[1])
        i, j, cross_target = batch["cross_fixed"], batch["cross_moving"], batch["cross_target"]
        cross = (rows_f[i] * rows_m[j]).sum(dim=1)
        if contrast_weight > 0:
            # Rows are (crop pair, z, y, x) in both layouts, so row i of the fixed map
            # and row i of the equal-position predictions are the same position.
            by_fixed = (same_pred[i] - cross) - (same_target[i] - cross_target)
            by_moving = (same_pred[j] - cross) - (same_target[j] - cross_target)
            contrast = 0.5 * (by_fixed**2 + by_moving**2).mean()
        pred = torch.cat([pred, cross])
        target = torch.cat([target, cross_target])
    err = (pred - target) ** 2
    mse = err.mean()
    loss = mse if balancer is None else (balancer.weights(target) * err).mean()
    if contrast is not None:
        loss = loss + contrast_weight * contrast
    return loss, mse.detach()


def new_model(seed: int) -> DisaNet:
    torch.manual_seed(seed)
    # channels_last_3d: about twice as fast on CPU (oneDNN) for this net.
    return DisaNet().to(memory_format=torch.channels_last_3d)


def initial_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """DisaNet parameters from an exported ONNX file (its initialisers keep the
    parameter names) or from a run folder / checkpoint file."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(path)).graph
        weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
                   for i in graph.initializer}
    else:
        weights = served_weights(load_checkpoint(path, kept=True))
    expected = DisaNet().state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"{path} lacks DisaNet parameters: {', '.join(missing[:4])}")
    for name, value in expected.items():
        if tuple(weights[name].shape) != tuple(value.shape):
            raise ValueError(f"{path}: {name} has shape {tuple(weights[name].shape)}, "
                             f"DisaNet expects {tuple(value.shape)}")
    return {name: weights[name] for name in expected}


def _atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh), durable=False)


def load_checkpoint(run: str | Path, kept: bool = False) -> dict[str, Any]:
    """The last checkpoint of a run folder (or a checkpoint file); with ``kept``, the
    weights the run keeps: ``best.pt`` where its optimum-bias scans wrote one."""
    path = Path(run)
    if path.is_dir():
        path = path / (BEST if kept and (path / BEST).is_file() else CHECKPOINT)
    return torch.load(path, map_location="cpu", weights_only=False)


def served_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint serves: the moving average when the run keeps one."""
    return state.get("averaged_model") or state["model"]


def model_from_checkpoint(run: str | Path) -> DisaNet:
    """The weights a run serves (export, evaluate): its kept ones, else its last."""
    state = load_checkpoint(run, kept=True)
    net = DisaNet()
    net.load_state_dict(served_weights(state))
    return net.eval()


class Reporter:
    """Progress on a terminal (rich) or as plain lines (logs, CI)."""

    def __init__(self, total_s: float, done_s: float, interactive: bool) -> None:
        self.interactive = interactive
        self._progress = None
        if interactive:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                TextColumn("{task.description}"),
                TimeRemainingColumn(),
            )
            self._task = self._progress.add_task("", total=total_s, completed=done_s)
            self._progress.start()

    def update(self, elapsed_s: float, line: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=elapsed_s, description=line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def fit(
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = False,
    interactive: bool | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train (or continue training) into the folder ``out``; returns the run summary.

    With ``cfg.device`` set, or resuming a run that had one, the device loop trains
    (`disa.training.device_loop`); otherwise this CPU loop, which made v1-v5.
    """
    out = Path(out)
    if cfg.device is not None or (resume and _is_device_run(out / CHECKPOINT)):
        from disa.training.device_loop import fit_device

        return fit_device(cfg, out, resume=resume, interactive=interactive, on_step=on_step)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    cfg, state = _config_to_run(cfg, ckpt_path, resume)
    run, cfg = _start(cfg, state)
    budget_s = cfg.budget_minutes * 60.0
    interactive = sys.stdout.isatty() if interactive is None else interactive
    reporter = Reporter(budget_s, run.elapsed, interactive)
    log = (out / LOG).open("a", encoding="utf-8")
    loader = batch_loader(cfg.data_config(), cfg.seed, start=run.step, workers=cfg.workers,
                          stop=cfg.max_steps)
    restore_signals = _stop_on_signals()
    try:
        stop_reason = _train_steps(run, cfg, loader, log, reporter, ckpt_path, on_step)
    finally:
        restore_signals()
        reporter.close()
        log.close()
    summary = run_summary(run.step, run.elapsed, stop_reason, cfg, ckpt_path)
    write_json(summary, out / SUMMARY, durable=False)
    return summary


def run_summary(steps: int, elapsed_s: float, stop_reason: str, cfg: TrainConfig,
                checkpoint: Path) -> dict[str, Any]:
    """The head of summary.json (CPU and device loops): steps, minutes, why it stopped, the
    configuration and the checkpoint's path."""
    return {"steps": steps, "elapsed_minutes": round(elapsed_s / 60.0, 3),
            "stopped_by": stop_reason, "config": dataclasses.asdict(cfg),
            "checkpoint": str(checkpoint)}


def _config_to_run(cfg: TrainConfig, ckpt_path: Path, resume: bool
                   ) -> tuple[TrainConfig, dict[str, Any] | None]:
    """(configuration, checkpoint state): a resumed run's saved configuration with the
    caller's budget and resources, and its state; a new run's own, with no state."""
    if not resume:
        if ckpt_path.exists():
            raise FileExistsError(f"{ckpt_path} exists: pass resume=True (--resume) or "
                                  "another --out")
        return cfg, None
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"nothing to resume: {ckpt_path} does not exist")
    state = load_checkpoint(ckpt_path)
    saved = TrainConfig.from_dict(state["config"])
    # The data stream and the model must not change under a resumed run;
    # the budget, step cap, logging and parallelism may.
    return dataclasses.replace(
        saved,
        budget_minutes=cfg.budget_minutes,
        max_steps=cfg.max_steps,
        checkpoint_minutes=cfg.checkpoint_minutes,
        workers=cfg.workers,
        threads=cfg.threads,
        log_every_s=cfg.log_every_s,
    ), state


@dataclass
class _Run:
    """What a CPU training run holds between steps and saves in its checkpoint."""

    net: DisaNet
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    balancer: TargetBalancer | None
    ema: AveragedModel | None
    step: int = 0
    elapsed: float = 0.0  # seconds of training, over every resumption

    def save(self, cfg: TrainConfig, path: Path) -> None:
        """Write the checkpoint (atomically: a run killed meanwhile keeps the last one)."""
        ema = self.ema
        _atomic_save(
            {
                "model": self.net.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "balancer": self.balancer.state_dict() if self.balancer is not None else None,
                "ema": ema.state_dict() if ema is not None else None,
                "averaged_model": ema.module.state_dict() if ema is not None else None,
                "torch_rng": torch.get_rng_state(),
                "step": self.step,
                "elapsed_s": self.elapsed,
                "config": dataclasses.asdict(cfg),
            },
            path,
        )


def _start(cfg: TrainConfig, state: dict[str, Any] | None) -> tuple[_Run, TrainConfig]:
    """The network, optimiser, schedule, balancer and average of a new run (from
    ``cfg.init_from`` when given) or of a resumed one (from ``state``); the configuration
    gains the initial weights' sha256 in the first case."""
    torch.set_num_threads(cfg.threads)
    net = new_model(cfg.seed)
    if state is None and cfg.init_from is not None:
        from disa.model.card import file_sha256

        cfg = dataclasses.replace(cfg, init_sha256=file_sha256(cfg.init_from)
                                  if Path(cfg.init_from).is_file() else None)
        net.load_state_dict(initial_weights(cfg.init_from))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup_steps, halve_every = cfg.warmup_steps, cfg.halve_every
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, warmup_steps, halve_every)
    )
    balancer = TargetBalancer(power=cfg.balance_power) if cfg.balance else None
    ema = (AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
           if cfg.ema_decay > 0 else None)
    run = _Run(net, opt, sched, balancer, ema)
    if state is not None:
        net.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if balancer is not None and state.get("balancer") is not None:
            balancer.load_state_dict(state["balancer"])
        torch.set_rng_state(state["torch_rng"])
        run.step, run.elapsed = int(state["step"]), float(state["elapsed_s"])
    return run, cfg


def _train_steps(run: _Run, cfg: TrainConfig, loader: Any, log: Any, reporter: Reporter,
                 ckpt_path: Path, on_step: Callable[[int, float], None] | None) -> str:
    """Train on ``loader``'s batches until the budget, the step cap, the data or an
    interrupt ends the run; log every ``cfg.log_every_s``, checkpoint every
    ``cfg.checkpoint_minutes`` and at the end, whatever ended it. Returns why it stopped."""
    budget_s = cfg.budget_minutes * 60.0
    data_cfg = cfg.data_config()
    targets_per_step = cfg.batch * (data_cfg.pairs.out_side**3 + data_cfg.pairs.cross_pairs)
    net, opt, sched, ema = run.net, run.opt, run.sched, run.ema
    t_start = time.monotonic()
    elapsed0 = run.elapsed
    last_ckpt = last_log = t_start
    window = {"loss": 0.0, "mse": 0.0, "n": 0, "wait": 0.0, "t0": t_start, "step0": run.step}
    stop_reason = "data exhausted"
    net.train()
    try:
        t_wait = time.monotonic()
        for batch in loader:
            now = time.monotonic()
            window["wait"] += now - t_wait
            run.elapsed = elapsed0 + (now - t_start)
            if run.elapsed >= budget_s:
                stop_reason = "budget"
                break
            if cfg.max_steps is not None and run.step >= cfg.max_steps:
                stop_reason = "max_steps"
                break
            loss, mse = pair_loss(net, batch, run.balancer, cfg.contrast_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(net)
            run.step += 1
            window["loss"] += float(loss.detach())
            window["mse"] += float(mse)
            window["n"] += 1
            now = time.monotonic()
            run.elapsed = elapsed0 + (now - t_start)
            if on_step is not None:
                on_step(run.step, float(mse))
            if now - last_log >= cfg.log_every_s:
                _log_window(log, reporter, window, run.step, run.elapsed, budget_s, opt,
                            targets_per_step)
                last_log = now
            if now - last_ckpt >= cfg.checkpoint_minutes * 60.0:
                run.save(cfg, ckpt_path)
                last_ckpt = now
            t_wait = time.monotonic()
        else:
            if cfg.max_steps is not None and run.step >= cfg.max_steps:
                stop_reason = "max_steps"
    except KeyboardInterrupt:
        stop_reason = "interrupted"
    finally:
        run.elapsed = elapsed0 + (time.monotonic() - t_start)
        if window["n"]:
            _log_window(log, reporter, window, run.step, run.elapsed, budget_s, opt,
                        targets_per_step)
        run.save(cfg, ckpt_path)
    return stop_reason


def _is_device_run(ckpt_path: Path) -> bool:
    return ckpt_path.is_file() and load_checkpoint(ckpt_path)["config"].get("device") is not None


def _stop_on_signals() -> Callable[[], None]:
    """Make SIGTERM and SIGINT stop training the way Ctrl-C does (checkpoint, then
    return), and return a function that restores the previous handlers.

    Why: a scheduler, ``kill`` or the end of a session sends SIGTERM, and a job
    started in the background by a non-interactive shell ignores SIGINT; without
    this the run would lose everything since the last periodic checkpoint.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _log_window(
    log: Any,
    reporter: Reporter,
    window: dict[str, float],
    step: int,
    elapsed: float,
    budget_s: float,
    opt: torch.optim.Optimizer,
    targets_per_step: int,
) -> None:
    now = time.monotonic()
    span = max(now - window["t0"], 1e-9)
    n = max(int(window["n"]), 1)
    steps_per_s = window["n"] / span
    record = {
        "step": step,
        "elapsed_s": round(elapsed, 1),
        "loss": window["loss"] / n,
        "mse": window["mse"] / n,
        "lr": opt.param_groups[0]["lr"],
        "steps_per_s": round(steps_per_s, 4),
        "targets_per_s": round(steps_per_s * targets_per_step, 1),
        "data_wait_fraction": round(window["wait"] / span, 3),
    }
    log.write(json.dumps(record) + "\n")
    log.flush()
    remaining = max(budget_s - elapsed, 0.0)
    reporter.update(
        elapsed,
        f"step {step}  loss {record['loss']:.4f}  mse {record['mse']:.4f}  "
        f"lr {record['lr']:.2e}  {record['steps_per_s']:.2f} steps/s  "
        f"{record['targets_per_s']:.0f} targets/s  wait {record['data_wait_fraction']:.0%}  "
        f"left {math.ceil(remaining / 60)} min",
    )
    window.update(loss=0.0, mse=0.0, n=0, wait=0.0, t0=now, step0=step)
