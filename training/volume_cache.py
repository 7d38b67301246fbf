"""The training volumes in one float16 .npz file, for machines without the data packages.

The GPU machine that runs `scripts/gpu_train.py` has torch, numpy, scipy and
numba but neither SimpleITK nor the packages that carry the volumes (nilearn,
melage), and at most 64 MiB travel with the working tree. `disa-train cache`
therefore writes the derived 2 mm training volumes (`disa.training.sources`)
here, and ``--data-cache`` reads them there. Training split only: the file
must never carry held-out anatomy onto a machine where it could be trained on.

Storage: intensities and tissue maps as float16 (relative precision 5e-4, far
below the synthesis' own noise and jitter), labels as int16, compressed: the
two ICBM152 volumes take about 6 MiB. On loading, tissue maps are
renormalised to sum to 1 per voxel again (float16 rounding moves the sum by
up to ~1e-3).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from disa.training.sources import CATALOGUE, Volume

#: Bump when the layout changes; a reader refuses other versions.
FORMAT_VERSION = 1
#: Refuse to write a cache larger than this (the device machine's working tree is 64 MiB).
MAX_BYTES = 50 * 2**20
_ARRAYS = ("native", "tissues", "labels", "label_tissue")


def _check_training_split(volume: Volume) -> None:
    info = CATALOGUE.get(volume.id)
    if volume.id == "phantom":
        raise ValueError("phantoms are generated from their seed: they need no cache")
    if info is None or info.split != "training":
        raise ValueError(f"{volume.id!r} is not a training source: the cache carries the "
                         f"training split only")


def write_volume_cache(volumes: Sequence[Volume], path: str | Path,
                       max_bytes: int = MAX_BYTES) -> dict[str, object]:
    """Write ``volumes`` (training sources only) to ``path`` atomically; returns a summary
    (ids, shapes, bytes). ValueError for a held-out volume or a file over ``max_bytes``."""
    path = Path(path)
    if not volumes:
        raise ValueError("no training volume to cache (are the data packages installed?)")
    arrays: dict[str, np.ndarray] = {}
    meta = []
    for volume in volumes:
        _check_training_split(volume)
        meta.append({"id": volume.id, "subject": volume.subject, "anatomy": volume.anatomy,
                     "native_modality": volume.native_modality,
                     "border_mode": volume.border_mode, "shape": list(volume.shape)})
        arrays[f"{volume.id}/native"] = volume.native.astype(np.float16)
        arrays[f"{volume.id}/tissues"] = volume.tissues.astype(np.float16)
        arrays[f"{volume.id}/labels"] = volume.labels.astype(np.int16)
        arrays[f"{volume.id}/label_tissue"] = volume.label_tissue.astype(np.int16)
    header = {"format": FORMAT_VERSION, "volumes": meta}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)  # type: ignore[arg-type]
        size = os.path.getsize(tmp)
        if size > max_bytes:
            raise ValueError(f"volume cache would take {size / 2**20:.1f} MiB, over the "
                             f"{max_bytes / 2**20:.0f} MiB limit: cache fewer sources")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache holds nothing secret
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {"path": str(path), "bytes": size, "volumes": meta}


def read_volume_cache(path: str | Path, ids: Sequence[str] | None = None) -> list[Volume]:
    """The volumes of a cache written by `write_volume_cache` (float32 again), optionally
    only those named in ``ids``, in the file's order."""
    with np.load(path) as z:
        header = json.loads(bytes(z["header"]).decode())
        if header.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: volume cache format {header.get('format')}, "
                             f"this code reads {FORMAT_VERSION}")
        volumes = []
        for meta in header["volumes"]:
            if ids is not None and meta["id"] not in ids:
                continue
            a = {k: z[f"{meta['id']}/{k}"] for k in _ARRAYS}
            tissues = a["tissues"].astype(np.float32)
            tissues /= np.maximum(tissues.sum(axis=0, keepdims=True), 1e-6)
            volumes.append(Volume(
                id=meta["id"], subject=meta["subject"], anatomy=meta["anatomy"],
                native_modality=meta["native_modality"],
                native=a["native"].astype(np.float32), tissues=tissues,
                labels=a["labels"].astype(np.int16), label_tissue=a["label_tissue"],
                border_mode=meta["border_mode"]))
    return volumes
