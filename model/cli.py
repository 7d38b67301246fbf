"""`disa descriptors IMAGE -o OUT`: the DISA descriptor map of an image as a vector image."""

from __future__ import annotations

import argparse
from pathlib import Path

from disa.model.runtime import ENGINES


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "descriptors",
        help="write the DISA descriptor map of an image (16-component float32 vector image)",
        description="Resample IMAGE to the model's spacing, normalise it and write its "
                    "descriptors on the descriptor grid (origin of the resampled image, spacing "
                    "x4, same direction) as .nii.gz, .nii, .nrrd or .mha.")
    p.add_argument("image", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--model", type=Path, default=None, help="ONNX file (default: shipped model)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--engine", choices=list(ENGINES), default=None,
                   help="default: DISA_DESCRIPTOR_ENGINE, else auto (onnxruntime on CUDA, "
                        "else openvino-int8 when installed and the card names an int8 "
                        "variant, else openvino-fp32 when installed, else onnxruntime)")
    p.set_defaults(handler=_cmd_descriptors)


def _cmd_descriptors(args: argparse.Namespace) -> int:
    from disa.model.card import default_model_path
    from disa.model.descriptors import compute_descriptor_file
    from disa.model.runtime import default_engine

    engine = args.engine or default_engine(args.device, args.model or default_model_path())
    image = compute_descriptor_file(args.image, args.output, model_path=args.model,
                                    device=args.device, engine=engine)
    print(f"wrote {args.output}: {image.GetSize()} voxels x {image.GetNumberOfComponentsPerPixel()}"
          f" channels, spacing {tuple(round(s, 3) for s in image.GetSpacing())} mm")
    return 0
