"""Held-out evaluation: descriptor dot products against LC2 on paper-style pairs.

Scenes are held-out volumes (held-out subject and anatomy from
`disa.training.sources`, plus phantoms from the held-out seed stream) rendered
in pairs of settings that include the held-out synthesis families. For each
scene the network describes both whole volumes once (as registration does),
patch pairs are drawn the paper's way with near-uniform LC2 targets
(`disa.training.sampling`), and the dot product of the two descriptors at the
patch centres is compared with the target. Reported: MSE, mean absolute
error and Pearson r overall, by target bin (10 bins over [0, 1]), by anatomy,
by volume, by settings pair and by setting (a pair counts for both of its
settings).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from disa.core import atomic
from disa.training import sources
from disa.training.pairs import make_scene
from disa.training.sampling import sample_patch_pairs
from disa.training.synthesis import HELD_OUT_SETTINGS

#: Setting pairs of the evaluation: training families on held-out anatomy, and
#: every held-out family against a training one.
EVAL_SETTING_PAIRS: tuple[tuple[str, str], ...] = (
    ("t1", "t2"),
    ("t1", "ct"),
    ("pd", "us"),
    ("native", "lut"),
    ("t2", "labels"),
    ("t1", "us-steep-attenuation"),
    ("ct", "us-steep-attenuation"),
    ("t2", "lut-high-frequency"),
    ("native", "lut-high-frequency"),
)

Describer = Callable[[np.ndarray], np.ndarray]
"""Maps a z-scored (Z, Y, X) volume to descriptors (16, Z', Y', X'), voxel i at input 4i."""


@dataclass(frozen=True)
class EvalConfig:
    seed: int = 20230
    pairs_per_scene: int = 50
    setting_pairs: tuple[tuple[str, str], ...] = EVAL_SETTING_PAIRS
    held_out_phantoms: int = 2
    extent: float = 64.0


def held_out_volumes(cfg: EvalConfig) -> list[sources.Volume]:
    """Installed held-out packaged volumes, then phantoms from the held-out seed stream."""
    volumes = sources.load_split("held-out")
    for i in range(cfg.held_out_phantoms):
        rng = np.random.default_rng(sources.phantom_seed("held-out", i, cfg.seed))
        volumes.append(sources.make_phantom(rng, subject=f"phantom-held-out-{i}"))
    return volumes


def torch_describer(net: Any, threads: int | None = None) -> Describer:
    """Descriptors from a DisaNet in eval mode (torch, CPU)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    net = net.eval().to(memory_format=torch.channels_last_3d)

    def describe(volume: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
        with torch.no_grad():
            return net(x.contiguous(memory_format=torch.channels_last_3d))[0].numpy()

    return describe


def onnx_describer(path: str | Path, threads: int | None = None,
                   engine: str = "onnxruntime") -> Describer:
    """Descriptors from an exported ONNX file through the runtime's extractor (``engine``:
    one of the runtime's engines; openvino-int8 runs the int8 variant its card names)."""
    from disa.model.runtime import DescriptorExtractor

    extractor = DescriptorExtractor(path, device="cpu", threads=threads,
                                    engine=engine)  # type: ignore[arg-type]

    def describe(volume: np.ndarray) -> np.ndarray:
        return np.moveaxis(extractor.extract(np.asarray(volume, dtype=np.float32)), -1, 0)

    return describe


def _stats(target: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    err = pred - target
    out = {
        "pairs": len(target),
        "mse": float(np.mean(err**2)),
        "mae": float(np.mean(np.abs(err))),
    }
    if len(target) > 2 and np.std(target) > 0 and np.std(pred) > 0:
        out["pearson_r"] = float(np.corrcoef(target, pred)[0, 1])
    return out


def summarise(records: Sequence[dict[str, Any]], bins: int = 10) -> dict[str, Any]:
    """Aggregate per-pair records (target, prediction, tags) into the reported metrics."""
    if not records:
        return {"pairs": 0}
    t = np.array([r["target"] for r in records])
    p = np.array([r["prediction"] for r in records])
    result: dict[str, Any] = _stats(t, p)
    idx = np.clip((t * bins).astype(int), 0, bins - 1)
    result["by_target_bin"] = {
        f"{b / bins:.1f}-{(b + 1) / bins:.1f}": _stats(t[idx == b], p[idx == b])
        for b in range(bins)
        if np.any(idx == b)
    }

    def grouped(keys: Callable[[dict[str, Any]], Iterable[str]]) -> dict[str, Any]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(records):
            for k in keys(r):
                groups[k].append(i)
        return {k: _stats(t[v], p[v]) for k, v in sorted(groups.items())}

    result["by_anatomy"] = grouped(lambda r: [r["anatomy"]])
    result["by_volume"] = grouped(lambda r: [r["volume"]])
    result["by_settings_pair"] = grouped(lambda r: ["|".join(r["settings"])])
    result["by_setting"] = grouped(lambda r: sorted(set(r["settings"])))
    result["by_setting_family"] = grouped(
        lambda r: [
            "held-out-setting"
            if set(r["settings"]) & set(HELD_OUT_SETTINGS)
            else "training-settings"
        ]
    )
    return result


def evaluate(
    describe: Describer,
    cfg: EvalConfig = EvalConfig(),
    volumes: Sequence[sources.Volume] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Metrics of ``describe`` on the held-out scenes (see the module docstring)."""
    volumes = list(volumes) if volumes is not None else held_out_volumes(cfg)
    records: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for vi, volume in enumerate(volumes):
        for si, settings in enumerate(cfg.setting_pairs):
            rng = np.random.default_rng([cfg.seed, vi, si])
            scene = make_scene(volume, settings, rng, cfg.extent)
            fixed, moving = scene.images
            pairs = sample_patch_pairs(fixed, moving, cfg.pairs_per_scene, rng)
            if not pairs:
                continue
            d_fixed, d_moving = describe(fixed), describe(moving)
            for pair in pairs:
                fi = tuple(c // 4 for c in pair.fixed_centre)
                mi = tuple(c // 4 for c in pair.moving_centre)
                pred = float(np.dot(d_fixed[(slice(None), *fi)], d_moving[(slice(None), *mi)]))
                records.append(
                    {
                        "target": pair.target,
                        "prediction": pred,
                        "anatomy": volume.anatomy,
                        "volume": volume.subject,
                        "settings": list(settings),
                        "mr_role": pair.mr_role,
                    }
                )
            if log is not None:
                log(
                    f"{volume.subject} {settings[0]}|{settings[1]}: {len(pairs)} pairs "
                    f"({time.monotonic() - t0:.0f} s)"
                )
    result = summarise(records)
    result["protocol"] = (
        "held-out volumes (subject/anatomy) x setting pairs incl. held-out families; "
        f"{cfg.pairs_per_scene} paper-style pairs per scene "
        "(stratified t ~ U[0,1], tolerance 0.05, "
        "M patch p ~ local std, F searched +-16 voxels on the descriptor grid); "
        "prediction = dot product of whole-volume descriptors at the patch centres"
    )
    result["seed"] = cfg.seed
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result


def write_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically, creating the folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(obj, path)


def card_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The part of an evaluation that goes into a model card's held_out_metrics."""
    keep = (
        "pairs",
        "mse",
        "mae",
        "pearson_r",
        "by_target_bin",
        "by_anatomy",
        "by_setting",
        "by_setting_family",
        "protocol",
        "seed",
    )
    return {k: result[k] for k in keep if k in result}


def merge_into_card(card_path: str | Path, result: dict[str, Any], int8: bool = False) -> None:
    """Replace the held_out_metrics of an existing model card (sha256 unchanged), or with
    ``int8`` those of the card's int8 variant."""
    from disa.model.card import ModelCard

    card_path = Path(card_path)
    card = ModelCard.model_validate_json(card_path.read_text(encoding="utf-8"))
    if int8:
        if card.int8 is None:
            raise ValueError(f"card {card_path} names no int8 variant (disa-train quantise)")
        variant = card.int8.model_copy(update={"held_out_metrics": card_metrics(result)})
        updated = card.model_copy(update={"int8": variant})
    else:
        updated = card.model_copy(update={"held_out_metrics": card_metrics(result)})
    write_json(json.loads(updated.model_dump_json()), card_path)
