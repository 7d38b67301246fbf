"""Export a trained DisaNet to ONNX and write its model card (training side: needs torch).

The exported graph takes `volume` (N, 1, Z, Y, X) float32 and returns
`descriptors` (N, 16, Z', Y', X') float32 in the unit ball, with the batch and
all three spatial axes dynamic, so one file serves every volume size.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from disa.model.card import (
    INPUT_SPACING_MM,
    NORMALISATION,
    ModelCard,
    card_path_for,
    file_sha256,
)
from disa.training.network import (
    CHANNELS,
    RECEPTIVE_FIELD_VOXELS,
    STRIDE,
    DisaNet,
    count_trainable_parameters,
)

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "export_onnx", "write_model_card"]

INPUT_NAME = "volume"
OUTPUT_NAME = "descriptors"


def _atomic_target(path: Path) -> tuple[int, Path]:
    """A temporary file next to `path` (same file system, so os.replace is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    return fd, Path(tmp)


def export_onnx(net: DisaNet, path: str | Path, opset: int = 17) -> str:
    """Write `net` as an ONNX file at `path` (atomically) and return its sha256.

    Uses the TorchScript-based exporter: the network is a plain chain of
    Conv/LeakyRelu/Pad/Add ops, which it maps one to one, and it needs no
    onnxscript. Parameters are stored inside the file (90,752 floats, 355 kB).
    """
    path = Path(path)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    was_training = net.training
    net.eval()
    try:
        example = torch.zeros(1, 1, 20, 20, 20, dtype=torch.float32)
        spatial = {0: "batch", 2: "z", 3: "y", 4: "x"}
        out_spatial = {0: "batch", 2: "z_out", 3: "y_out", 4: "x_out"}
        with warnings.catch_warnings(), torch.no_grad():
            # The legacy exporter announces its deprecation on every call.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            # "Constant folding - Only steps=1 ..." for the pad arithmetic: harmless,
            # ONNX Runtime folds those constants when it loads the graph.
            warnings.simplefilter("ignore", category=UserWarning)
            torch.onnx.export(
                net,
                (example,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: spatial, OUTPUT_NAME: out_spatial},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        net.train(was_training)
        tmp.unlink(missing_ok=True)
    return file_sha256(path)


def write_model_card(
    onnx_path: str | Path,
    *,
    name: str,
    version: str,
    training: Mapping[str, Any],
    held_out_metrics: Mapping[str, Any],
    net: DisaNet | None = None,
    input_spacing_mm: float = INPUT_SPACING_MM,
    normalisation: str = NORMALISATION,
    card_path: str | Path | None = None,
) -> ModelCard:
    """Write the model card JSON next to `onnx_path` (atomically) and return it.

    `training` should hold at least `data`, `recipe`, `command` and `minutes`;
    `held_out_metrics` the numbers measured on data not used for training.
    The sha256 is computed from the file as written, so the card always
    matches the bytes it sits next to.
    """
    onnx_path = Path(onnx_path)
    card_path = Path(card_path) if card_path is not None else card_path_for(onnx_path)
    parameters = count_trainable_parameters(net if net is not None else DisaNet())
    card = ModelCard(
        name=name,
        version=version,
        onnx_file=os.path.relpath(onnx_path.resolve(), card_path.resolve().parent),
        sha256=file_sha256(onnx_path),
        input_spacing_mm=input_spacing_mm,
        normalisation=normalisation,
        output_stride=STRIDE,
        output_offset_voxels=0.0,
        channels=CHANNELS,
        receptive_field_voxels=RECEPTIVE_FIELD_VOXELS,
        parameters=parameters,
        training=dict(training),
        held_out_metrics=dict(held_out_metrics),
        created=datetime.now(UTC),
    )
    fd, tmp = _atomic_target(card_path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(card.model_dump_json(indent=2))
            f.write("\n")
        os.replace(tmp, card_path)
    finally:
        tmp.unlink(missing_ok=True)
    return card
