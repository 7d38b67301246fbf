"""Model card: the JSON file shipped next to the ONNX descriptor network.

It states what a caller must reproduce for the descriptors to mean anything
(input spacing, intensity normalisation), how the output grid sits on the input
grid (stride, offset), where the weights came from (training data, recipe,
command) and how well they did on held-out data, plus the ONNX file's sha256,
which is checked on load. No torch here: the runtime reads cards.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from disa.core.errors import DisaError

__all__ = [
    "CHANNELS",
    "DEFAULT_MODEL_NAME",
    "INPUT_SPACING_MM",
    "NORMALISATION",
    "PARAMETERS",
    "RECEPTIVE_FIELD_VOXELS",
    "STRIDE",
    "WEIGHTS_DIR",
    "Int8Variant",
    "ModelCard",
    "ModelIntegrityError",
    "card_path_for",
    "default_card_path",
    "default_model_path",
    "file_sha256",
    "int8_model_path",
    "load_model_card",
]

# Architecture facts (docs/DESIGN.md, "The method and the network"). They live here, free of torch,
# because the runtime's tiling and the descriptor geometry depend on them;
# `disa.training.network` re-exports them and the tests check them against the net.
CHANNELS = 16
STRIDE = 4
RECEPTIVE_FIELD_VOXELS = 49
PARAMETERS = 90_752
INPUT_SPACING_MM = 2.0
NORMALISATION = (
    "robust z-score over the foreground (automatic Otsu-based mask unless given): clip to the "
    "0.5-99.5 percentiles, subtract the mean, divide by the standard deviation, clip to +-5; "
    "disa.core.preprocess.normalise_intensities after resample_to_spacing"
)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL_NAME = "disa.onnx"


class ModelIntegrityError(DisaError, RuntimeError):
    """The ONNX file does not match its model card (missing, or wrong sha256)."""


class Int8Variant(BaseModel):
    """The int8 variant of the network for OpenVINO on CPU (`disa-train quantise`).

    An OpenVINO IR pair (`xml_file` + `bin_file`, relative to the card's folder)
    made from the card's ONNX weights by post-training quantisation;
    `dot_error_vs_fp32` is the RMS / largest error of its descriptor dot products
    against the fp32 network's on the calibration volumes, `held_out_metrics`
    the same held-out evaluation as the card's, run through this variant.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    xml_file: str
    bin_file: str
    sha256_xml: str = Field(pattern=r"^[0-9a-f]{64}$")
    sha256_bin: str = Field(pattern=r"^[0-9a-f]{64}$")
    tool: str
    method: str
    kept_fp32: list[str] = Field(default_factory=list)
    calibration: dict[str, Any] = Field(default_factory=dict)
    dot_error_vs_fp32: dict[str, float | int] = Field(default_factory=dict)
    held_out_metrics: dict[str, Any] = Field(default_factory=dict)
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))


class ModelCard(BaseModel):
    """What the shipped descriptor network expects and what it was trained on.

    Geometry: output voxel i lies at input voxel `output_stride * i +
    output_offset_voxels` of the grid resampled to `input_spacing_mm`
    (isotropic); `onnx_file` is relative to the card's folder.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    onnx_file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_spacing_mm: float = Field(default=INPUT_SPACING_MM, gt=0)
    normalisation: str = NORMALISATION
    output_stride: int = Field(default=STRIDE, ge=1)
    output_offset_voxels: float = 0.0
    channels: int = Field(default=CHANNELS, ge=1)
    receptive_field_voxels: int = Field(default=RECEPTIVE_FIELD_VOXELS, ge=1)
    parameters: int = Field(default=PARAMETERS, ge=0)
    training: dict[str, Any] = Field(default_factory=dict)
    held_out_metrics: dict[str, Any] = Field(default_factory=dict)
    int8: Int8Variant | None = None
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def onnx_path(self, card_dir: Path) -> Path:
        """Absolute path of the ONNX file for a card read from `card_dir`."""
        return (Path(card_dir) / self.onnx_file).resolve()


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (weights may be tens of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def card_path_for(onnx_path: str | Path) -> Path:
    """The card that belongs to an ONNX file: same name, `.json` suffix."""
    return Path(onnx_path).with_suffix(".json")


def load_model_card(path: str | Path, *, verify: bool = True) -> ModelCard:
    """Read a model card (JSON) and, by default, check the ONNX file's sha256.

    `path` may name the card or its ONNX file (the card is then found next to it).
    Raises ModelIntegrityError if the ONNX file is missing or its hash differs:
    descriptors from other weights would silently break registration.
    """
    path = Path(path)
    if path.suffix == ".onnx":
        path = card_path_for(path)
    card = ModelCard.model_validate_json(path.read_text(encoding="utf-8"))
    if verify:
        onnx_path = card.onnx_path(path.parent)
        if not onnx_path.is_file():
            raise ModelIntegrityError(f"model file {onnx_path} named by card {path} is missing")
        actual = file_sha256(onnx_path)
        if actual != card.sha256:
            raise ModelIntegrityError(
                f"model file {onnx_path} has sha256 {actual}, but its card {path} "
                f"states {card.sha256}: the weights were replaced or corrupted"
            )
    return card


def int8_model_path(onnx_path: str | Path, *, verify: bool = True) -> Path | None:
    """The int8 variant (OpenVINO IR .xml) that the card of ``onnx_path`` names, or None
    when the card names none or its files are missing.

    With ``verify``, a variant whose files are present but whose sha256 differs from
    the card's raises ModelIntegrityError, as for the ONNX file.
    """
    card_path = card_path_for(onnx_path)
    if not card_path.is_file():
        return None
    card = load_model_card(card_path, verify=False)
    if card.int8 is None:
        return None
    xml_path = (card_path.parent / card.int8.xml_file).resolve()
    bin_path = (card_path.parent / card.int8.bin_file).resolve()
    if not (xml_path.is_file() and bin_path.is_file()):
        return None
    if verify:
        for path, expected in ((xml_path, card.int8.sha256_xml), (bin_path, card.int8.sha256_bin)):
            actual = file_sha256(path)
            if actual != expected:
                raise ModelIntegrityError(
                    f"int8 model file {path} has sha256 {actual}, but its card {card_path} "
                    f"states {expected}: the file was replaced or corrupted"
                )
    return xml_path


def default_model_path() -> Path | None:
    """The shipped ONNX file (model/weights/disa.onnx) if it exists, else None."""
    path = WEIGHTS_DIR / DEFAULT_MODEL_NAME
    return path if path.is_file() else None


def default_card_path() -> Path | None:
    """The shipped model card if it exists, else None."""
    path = card_path_for(WEIGHTS_DIR / DEFAULT_MODEL_NAME)
    return path if path.is_file() else None
