"""On-the-fly training batches, deterministic per (seed, batch index).

Batch b is a pure function of the seed and b: its scene comes from
``default_rng([seed, b // scene_reuse])`` and each of its pairs from
``default_rng([seed, b, i + 1])``. Resuming at step s therefore just starts at
batch s, and any number of DataLoader workers produce the same stream (worker
w makes batches b = w mod W, which the DataLoader returns in order). Each
scene (two full synthetic volumes, the expensive part) serves ``scene_reuse``
consecutive batches; a worker caches the last scene it made.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from disa.training import sources
from disa.training.pairs import PairConfig, Scene, make_scene, sample_crop_pair
from disa.training.volume_cache import read_volume_cache


@dataclass(frozen=True)
class DataConfig:
    """What the training stream draws from and how much work each scene serves."""

    pairs: PairConfig = field(default_factory=PairConfig)
    batch: int = 2
    scene_reuse: int = 2
    source_ids: tuple[str, ...] = ("icbm152-brain", "icbm152-head")
    #: Share of scenes made from random phantoms (anatomy-free).
    phantom_fraction: float = 0.35
    phantom_shape: tuple[int, int, int] = sources.PHANTOM_SHAPE
    #: A float16 .npz of the training volumes (`disa.training.volume_cache`) to read
    #: instead of the installed packages.
    volume_cache: str | None = None


@functools.cache
def _cached_volumes(path: str, ids: tuple[str, ...]) -> tuple[sources.Volume, ...]:
    return tuple(read_volume_cache(path, ids))


def training_volumes(cfg: DataConfig) -> list[sources.Volume]:
    """The training volumes named by ``cfg``, from the volume cache when it names one,
    else the installed packages (loaded once per process)."""
    if cfg.volume_cache is not None:
        return list(_cached_volumes(str(cfg.volume_cache), tuple(cfg.source_ids)))
    installed = set(sources.available_sources("training"))
    return [sources.load_volume(s) for s in cfg.source_ids if s in installed]


def make_training_scene(
    group: int, seed: int, cfg: DataConfig, volumes: Sequence[sources.Volume]
) -> Scene:
    rng = np.random.default_rng([seed, group, 0])
    if not volumes or rng.random() < cfg.phantom_fraction:
        volume = sources.make_phantom(rng, cfg.phantom_shape, subject=f"phantom-train-{group}")
    else:
        volume = volumes[int(rng.integers(len(volumes)))]
    settings = tuple(str(s) for s in rng.choice(cfg.pairs.settings, size=2))
    return make_scene(volume, settings, rng, float(cfg.pairs.crop))  # type: ignore[arg-type]


def make_batch(
    index: int,
    seed: int,
    cfg: DataConfig,
    volumes: Sequence[sources.Volume],
    scene: Scene | None = None,
) -> dict[str, torch.Tensor]:
    """Batch ``index``: fixed/moving (B, 1, c, c, c) float32, target (B, k, k, k), and
    cross pairs (cross_fixed, cross_moving: flat indices into B * k^3; cross_target)."""
    if scene is None:
        scene = make_training_scene(index // cfg.scene_reuse, seed, cfg, volumes)
    pairs = [
        sample_crop_pair(scene, np.random.default_rng([seed, index, i + 1]), cfg.pairs)
        for i in range(cfg.batch)
    ]
    # Cross pairs as flat indices into the batch's (B * k^3) descriptors.
    per_pair = cfg.pairs.out_side**3
    return {
        "fixed": torch.from_numpy(np.stack([p.fixed for p in pairs])[:, None]),
        "moving": torch.from_numpy(np.stack([p.moving for p in pairs])[:, None]),
        "target": torch.from_numpy(np.stack([p.target for p in pairs])),
        "cross_fixed": torch.from_numpy(
            np.concatenate([p.cross_fixed + b * per_pair for b, p in enumerate(pairs)])
        ),
        "cross_moving": torch.from_numpy(
            np.concatenate([p.cross_moving + b * per_pair for b, p in enumerate(pairs)])
        ),
        "cross_target": torch.from_numpy(np.concatenate([p.cross_target for p in pairs])),
        "index": torch.tensor(index),
    }


class BatchStream(IterableDataset):
    """Batches start, start + 1, ... (up to stop), for a DataLoader with batch_size=None."""

    def __init__(self, cfg: DataConfig, seed: int, start: int = 0, stop: int | None = None) -> None:
        super().__init__()
        self.cfg, self.seed, self.start, self.stop = cfg, seed, start, stop

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            # A worker must not compete with the trainer's threads for the cores.
            torch.set_num_threads(1)
        volumes = training_volumes(self.cfg)
        cached: tuple[int, Scene] | None = None
        b = self.start + worker
        while self.stop is None or b < self.stop:
            group = b // self.cfg.scene_reuse
            if cached is None or cached[0] != group:
                cached = (group, make_training_scene(group, self.seed, self.cfg, volumes))
            yield make_batch(b, self.seed, self.cfg, volumes, cached[1])
            b += workers


def batch_loader(
    cfg: DataConfig, seed: int, start: int, workers: int, stop: int | None = None
) -> DataLoader:
    """A DataLoader over ``BatchStream``; ``workers`` = 0 makes batches in this process."""
    if workers > 0:
        training_volumes(cfg)  # load before forking so workers share the arrays
    return DataLoader(
        BatchStream(cfg, seed, start, stop),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2 if workers > 0 else None,
        persistent_workers=False,
    )


class SceneStream(IterableDataset):
    """Scenes start, start + 1, ... for the device loop (`disa.training.device_loop`).

    Scene g is `make_training_scene(g, seed, ...)`, the scene the CPU loop's batches
    g * scene_reuse ... use, so both loops see the same scenes for a seed. Workers
    make scenes g = start + w, start + w + W, ...; the DataLoader returns them in
    order. Items: group (int), images (2, Z, Y, X) float32 (fixed, moving setting,
    z-scored), focus (3,) float64 voxels, mirror (bool: the scene continues by
    reflection past its border, else by its edge voxels).
    """

    def __init__(self, cfg: DataConfig, seed: int, start: int = 0) -> None:
        super().__init__()
        self.cfg, self.seed, self.start = cfg, seed, start

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        volumes = training_volumes(self.cfg)
        group = self.start + worker
        while True:
            scene = make_training_scene(group, self.seed, self.cfg, volumes)
            yield {
                "group": torch.tensor(group),
                "images": torch.from_numpy(np.stack(scene.images)),
                "focus": torch.from_numpy(np.asarray(scene.focus, dtype=np.float64)),
                "mirror": torch.tensor(scene.border_mode == "mirror"),
            }
            group += workers


def scene_loader(cfg: DataConfig, seed: int, start: int, workers: int,
                 pin_memory: bool = False) -> DataLoader:
    """A DataLoader over `SceneStream`; ``workers`` = 0 makes scenes in this process."""
    if workers > 0:
        training_volumes(cfg)  # load before forking so workers share the arrays
    return DataLoader(
        SceneStream(cfg, seed, start),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2 if workers > 0 else None,
        persistent_workers=False,
        pin_memory=pin_memory,
    )
