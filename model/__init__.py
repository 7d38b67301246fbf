"""The DISA descriptor network: architecture, ONNX runtime, int8 codes, shipped weights.

Runtime modules (`card`, `codes`, `runtime`, `descriptors`) need no torch;
`network` and `export` are for training and export only. Import submodules
directly; this package namespace re-exports the torch-free essentials.
"""

from disa.model.card import (
    CHANNELS,
    STRIDE,
    ModelCard,
    ModelIntegrityError,
    default_card_path,
    default_model_path,
    load_model_card,
)
from disa.model.codes import INT8_SCALE, clip_to_unit_ball, decode_int8, encode_int8
from disa.model.runtime import DescriptorExtractor, cpu_quota

__all__ = [
    "CHANNELS",
    "INT8_SCALE",
    "STRIDE",
    "DescriptorExtractor",
    "ModelCard",
    "ModelIntegrityError",
    "clip_to_unit_ball",
    "cpu_quota",
    "decode_int8",
    "default_card_path",
    "default_model_path",
    "encode_int8",
    "load_model_card",
]
