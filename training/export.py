"""Turn a training run into the shipped artefacts: ONNX file + model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from disa.training.evaluate import card_metrics
from disa.training.loop import SUMMARY, TrainConfig, load_checkpoint, model_from_checkpoint
from disa.training.onnx_export import export_onnx, write_model_card
from disa.training.sources import CATALOGUE, TRAINING_SOURCES
from disa.training.synthesis import TRAINING_SETTINGS

EVAL_JSON = "eval.json"


def training_description(run: Path) -> dict[str, Any]:
    """The card's ``training`` block, from the run's checkpoint and summary."""
    state = load_checkpoint(run, kept=True)
    cfg = state["config"]
    summary_path = run / SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    sources_used = [
        f"{s} ({CATALOGUE[s].package}: {CATALOGUE[s].anatomy}, subject {CATALOGUE[s].subject})"
        for s in cfg.get("source_ids", [])
        if s in CATALOGUE
    ]
    return {
        "data": {
            "volumes": sources_used,
            "phantoms": f"random smooth label maps, {cfg.get('phantom_fraction')} of scenes",
            "settings": list(TRAINING_SETTINGS),
            "training_sources": list(TRAINING_SOURCES),
            "spacing_mm": 2.0,
            "note": "multimodal pairs synthesised from one anatomy (no real multimodal data)",
        },
        "recipe": _recipe(cfg),
        "command": _command(run, cfg),
        **({"init_from": {"path": cfg["init_from"], "sha256": cfg.get("init_sha256")}}
           if cfg.get("init_from") else {}),
        "minutes": round(float(state["elapsed_s"]) / 60.0, 2),
        "steps": int(state["step"]),
        "stopped_by": summary.get("stopped_by"),
        **({"optimum_bias_scan": {k: state["scan"][k] for k in
                                  ("drift_mm_mean", "drift_mm_median", "val_mse", "step")}}
           if "scan" in state else {}),
    }


def _recipe(cfg: dict[str, Any]) -> str:
    if cfg.get("device"):
        return _device_recipe(cfg)
    cross = int(cfg.get("cross_pairs", 0))
    reach = int(cfg.get("cross_reach", 0))
    return (
        f"dense LC2 regression (radii 3,5,7) of descriptor dot products at every output voxel "
        f"of {cfg['crop']}^3 crop pairs (batch {cfg['batch']}), random relative shift/rotation"
        + (f", plus {cross} cross-position pairs per crop pair within +-{4 * reach} voxels"
           if cross else "")
        + ("; symmetric target (mean LC2 over both MR roles)"
           if cfg.get("symmetric_target", False) else "; MR role drawn per pair")
        + "; shared rotation+flip, intensity augmentation; "
        + ("target-bin balanced MSE" if cfg.get("balance", True) else "plain MSE")
        + f"; AdamW lr {cfg['lr']} wd {cfg['weight_decay']}, warm-up {cfg['warmup_steps']}, "
        f"halving every {cfg['halve_every']} steps; seed {cfg['seed']}"
        + (f"; weights: moving average, decay {cfg['ema_decay']}"
           if cfg.get("ema_decay", 0.0) > 0 else "")
        + (f"; initialised from {cfg['init_from']}" if cfg.get("init_from") else "")
    )


def _device_recipe(cfg: dict[str, Any]) -> str:
    power = float(cfg.get("balance_power", 1.0))
    return (
        f"device loop ({cfg['device']}, "
        + ("bf16" if cfg.get("amp") == "bf16" or (cfg.get("amp") == "auto"
                                                  and cfg["device"] == "cuda") else "fp32")
        + " convolutions): dense LC2 regression "
        f"(radii 3,5,7, symmetric target) of descriptor dot products of {cfg['crop']}^3 crop "
        f"pairs (batch {cfg['batch']}, scene pool {cfg.get('scene_pool')}, each scene "
        f"{cfg['scene_reuse']} steps) at zero and {cfg.get('node_offsets')} random node offsets "
        f"within +-{cfg['cross_reach']} nodes; shift differences at {cfg.get('shift_pairs')} "
        f"offset pairs (s within +-{cfg.get('shift_range')} voxels, |d| 1-"
        f"{cfg.get('shift_step')}) weight {cfg.get('shift_weight')}, w-weighted gradient term "
        f"weight {cfg.get('gradient_weight')}; "
        + (f"target-bin balanced MSE (power {power:g})" if cfg.get("balance", True)
           else "plain MSE")
        + f"; AdamW lr {cfg['lr']} wd {cfg['weight_decay']}, warm-up {cfg['warmup_steps']}, "
        f"cosine to {cfg.get('final_lr_fraction')} x over "
        + (f"{cfg['schedule_steps']} steps" if cfg.get("schedule_steps")
           else f"{cfg['budget_minutes']} min")
        + f"; weights kept by an optimum-bias scan of {cfg.get('val_pairs')} validation pairs"
        f"; seed {cfg['seed']}"
        + (f"; weights: moving average, decay {cfg['ema_decay']}"
           if cfg.get("ema_decay", 0.0) > 0 else "")
        + (f"; initialised from {cfg['init_from']}" if cfg.get("init_from") else "")
    )


def _command(run: Path, cfg: dict[str, Any]) -> str:
    parts = [
        f"disa-train fit --out {run} --budget {cfg['budget_minutes']} --seed {cfg['seed']}",
        f"--crop {cfg['crop']} --batch {cfg['batch']} --lr {cfg['lr']}",
        f"--halve-every {cfg['halve_every']}",
    ]
    if "cross_pairs" in cfg:
        parts.append(f"--cross-pairs {cfg['cross_pairs']} --cross-reach {cfg['cross_reach']}")
    if not cfg.get("symmetric_target", True):
        parts.append("--role-target")
    if cfg.get("ema_decay", 0.0) > 0:
        parts.append(f"--ema {cfg['ema_decay']}")
    if cfg.get("device"):
        defaults = TrainConfig()
        parts = [p for p in parts if not p.startswith("--halve-every")]
        parts.append(f"--device {cfg['device']}")
        for key in ("scene_reuse", "scene_pool", "node_offsets", "shift_pairs", "shift_range",
                    "shift_step", "shift_weight", "gradient_weight", "balance_power",
                    "schedule_steps", "final_lr_fraction", "val_pairs", "val_side", "amp",
                    "warmup_steps"):
            if key in cfg and cfg[key] != getattr(defaults, key):
                flag = {"warmup_steps": "warmup"}.get(key, key)
                parts.append(f"--{flag.replace('_', '-')} {cfg[key]}")
        if cfg.get("volume_cache"):
            parts.append(f"--data-cache {cfg['volume_cache']}")
    if cfg.get("init_from"):
        parts.append(f"--init-from {cfg['init_from']}")
    return " ".join(parts)


def export_run(
    run: str | Path,
    out_dir: str | Path,
    file_name: str = "disa.onnx",
    name: str = "disa",
    version: str | None = None,
) -> dict[str, Any]:
    """Export the run's last checkpoint to ``out_dir/file_name`` and write its card.

    Held-out metrics come from the run's ``eval.json`` when `disa-train evaluate`
    has written one; otherwise the card says they are missing.
    """
    run = Path(run)
    net = model_from_checkpoint(run)
    onnx_path = Path(out_dir) / file_name
    sha = export_onnx(net, onnx_path)
    eval_path = run / EVAL_JSON
    metrics = (
        card_metrics(json.loads(eval_path.read_text()))
        if eval_path.is_file()
        else {"note": "not evaluated yet: run disa-train evaluate --onnx " + str(onnx_path)}
    )
    training = training_description(run)
    card = write_model_card(
        onnx_path,
        name=name,
        version=version or f"{run.name}-step{training['steps']}",
        training=training,
        held_out_metrics=metrics,
        net=net,
    )
    return {"onnx": str(onnx_path), "sha256": sha, "card": card.model_dump(mode="json")}
