"""Post-training int8 quantisation of the exported network for OpenVINO on CPU.

Why: on AVX2 cores without bf16 the fp32 network is the largest single cost of a
DISA registration (about 0.14 s an extraction at a 2 mm head, three to four
extractions a case), and a 256^3 volume takes 3-4 s. OpenVINO runs int8
convolutions about twice as fast (benchmarks/README.md, descriptor extraction).

How: NNCF's post-training quantisation (the tool OpenVINO's authors keep for
exactly this) on the OpenVINO graph read from the exported ONNX file,
calibrated on volumes synthesised from the *training* sources only (the
held-out anatomy and settings stay unseen), normalised as the runtime
normalises. Preset "mixed": symmetric per-channel weights, asymmetric
activations (LeakyReLU outputs are mostly positive). Some convolutions stay
fp32 (KEEP_FP32): the first, which reads the z-scored intensities whose small
soft-tissue contrasts an 8-bit input grid would flatten, and the one whose
quantisation cost the most accuracy for the least time (docs/TRAINING.md,
"int8 variant", has the per-layer measurements).

Output: ``<stem>-int8.xml`` + ``<stem>-int8.bin`` (OpenVINO IR) next to the
ONNX file, and an ``int8`` entry in its model card with both files' sha256,
the calibration data and the measured error against fp32.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from disa.model.card import Int8Variant, card_path_for, file_sha256, load_model_card
from disa.model.codes import clip_to_unit_ball
from disa.model.runtime import _OpenVinoSession  # the runtime's own OpenVINO set-up
from disa.training import sources
from disa.training.pairs import make_scene
from disa.training.synthesis import TRAINING_SETTINGS

#: Calibration scenes: every training source and this many training-stream phantoms,
#: each rendered in two training settings (so every setting appears at least once).
CALIBRATION_PHANTOMS = 2
CALIBRATION_SEED = 7
#: The US fan's size as the evaluation draws it (voxels).
CALIBRATION_EXTENT = 40.0
#: Convolutions (positions in graph order) that stay fp32: 0 the input convolution
#: (1 -> 8 channels), 3 the 8 -> 16 convolution before the first BlurPool. Keeping
#: conv 3 as well took the dot-product error RMS on the calibration volumes from
#: 0.0132 to 0.0075 for 8 % more time at 256^3 (docs/TRAINING.md).
KEEP_FP32 = (0, 3)


def calibration_volumes(seed: int = CALIBRATION_SEED, phantoms: int = CALIBRATION_PHANTOMS,
                        volumes: Sequence[sources.Volume] | None = None
                        ) -> tuple[list[np.ndarray], list[str]]:
    """Normalised (z, y, x) float32 volumes on the model's 2 mm grid, and their names.

    Only training data: the packaged training volumes that are installed and
    phantoms of the training seed stream, rendered in training settings.
    """
    if volumes is None:
        volumes = sources.load_split("training")
        volumes += [
            sources.make_phantom(np.random.default_rng(sources.phantom_seed("training", i, seed)),
                                 subject=f"phantom-training-{i}")
            for i in range(phantoms)
        ]
    images: list[np.ndarray] = []
    names: list[str] = []
    settings = list(TRAINING_SETTINGS)
    for vi, volume in enumerate(volumes):
        rng = np.random.default_rng([seed, vi])
        pair = (settings[(2 * vi) % len(settings)], settings[(2 * vi + 1) % len(settings)])
        scene = make_scene(volume, pair, rng, CALIBRATION_EXTENT)
        for setting, image in zip(pair, scene.images, strict=True):
            images.append(np.ascontiguousarray(image, dtype=np.float32))
            names.append(f"{volume.subject}:{setting}")
    return images, names


def _descriptors(session: _OpenVinoSession, volume: np.ndarray) -> np.ndarray:
    """(N, 16) unit-ball descriptors of one volume."""
    (out,) = session.run(None, {session.input_name: volume[None, None]})
    out = out[0]
    return clip_to_unit_ball(out.reshape(out.shape[0], -1).T, axis=-1)


def dot_error(reference: _OpenVinoSession, candidate: _OpenVinoSession,
              volumes: Sequence[np.ndarray],
              pairs_per_volume: int = 4000, seed: int = 0) -> dict[str, float]:
    """RMS and largest error of the candidate's descriptor dot products against the
    reference's, over random descriptor pairs of each volume (same pairs for both)."""
    rng = np.random.default_rng(seed)
    errors = []
    for volume in volumes:
        a, b = _descriptors(reference, volume), _descriptors(candidate, volume)
        idx = rng.integers(0, len(a), (pairs_per_volume, 2))
        dot_a = np.einsum("nc,nc->n", a[idx[:, 0]], a[idx[:, 1]])
        dot_b = np.einsum("nc,nc->n", b[idx[:, 0]], b[idx[:, 1]])
        errors.append(dot_b - dot_a)
    err = np.concatenate(errors)
    return {"rms": float(np.sqrt(np.mean(err**2))), "max": float(np.abs(err).max()),
            "pairs": len(err)}


def quantise(onnx_path: str | Path, volumes: Sequence[np.ndarray] | None = None,
             names: Sequence[str] | None = None, threads: int = 2) -> dict[str, Any]:
    """Write the int8 variant of ``onnx_path`` next to it and record it in its card.

    Returns the card's new ``int8`` entry. The ONNX file must match its card
    (sha256): the variant is only meaningful for the weights it was made from.
    """
    import nncf
    import openvino as ov

    onnx_path = Path(onnx_path)
    card_path = card_path_for(onnx_path)
    card = load_model_card(card_path)
    if volumes is None:
        volumes, names = calibration_volumes()
    if not volumes:
        raise ValueError("quantisation needs at least one calibration volume")
    names = list(names) if names is not None else [f"volume-{i}" for i in range(len(volumes))]

    model = ov.Core().read_model(str(onnx_path))
    convolutions = [op.get_friendly_name() for op in model.get_ordered_ops()
                    if op.get_type_name() == "Convolution"]
    kept_fp32 = [convolutions[i] for i in KEEP_FP32]
    dataset = nncf.Dataset(list(volumes), lambda v: v[None, None])
    quantised = nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.MIXED,
                              subset_size=len(volumes),
                              ignored_scope=nncf.IgnoredScope(names=kept_fp32))
    xml_path = onnx_path.with_name(f"{onnx_path.stem}-int8.xml")
    bin_path = xml_path.with_suffix(".bin")
    ov.save_model(quantised, str(xml_path), compress_to_fp16=False)

    error = dot_error(_OpenVinoSession(onnx_path, threads, "fp32"),
                      _OpenVinoSession(xml_path, threads, "int8"), volumes)
    variant = Int8Variant(
        xml_file=xml_path.name, bin_file=bin_path.name,
        sha256_xml=file_sha256(xml_path), sha256_bin=file_sha256(bin_path),
        tool=f"nncf {nncf.__version__}, openvino {ov.__version__}",
        method=("post-training quantisation, preset mixed (symmetric per-channel weights, "
                f"asymmetric activations); convolutions {list(KEEP_FP32)} (graph order) "
                "kept fp32"),
        kept_fp32=kept_fp32,
        calibration={"volumes": names, "count": len(volumes),
                     "note": "training sources and training settings only"},
        dot_error_vs_fp32=error,
        created=datetime.now(UTC),
    )
    updated = card.model_copy(update={"int8": variant})
    from disa.core import atomic

    atomic.write_json(json.loads(updated.model_dump_json()), card_path)
    return variant.model_dump(mode="json")
