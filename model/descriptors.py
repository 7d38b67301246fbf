"""Descriptor images with physical geometry (no torch).

`compute_descriptor_image` takes an image in physical space (LPS mm), brings it
to what the network was trained on (isotropic `card.input_spacing_mm`, robust
z-score), runs the extractor and returns a 16-component float32 vector image
whose geometry places every descriptor at the physical point it describes:

    output voxel i  <->  input voxel stride * i + offset of the resampled grid
    origin'    = origin + D @ (offset * spacing)      (offset 0: origin kept)
    spacing'   = stride * spacing
    direction' = direction
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from disa.core.preprocess import normalise_intensities, resample_to_spacing
from disa.model.card import ModelCard, card_path_for, default_model_path, load_model_card
from disa.model.runtime import DescriptorExtractor, Device, Engine

__all__ = ["compute_descriptor_file", "compute_descriptor_image", "descriptor_geometry",
           "write_descriptor_image"]

#: zlib level of written .nii.gz descriptor images. ITK's NIfTI writer compresses at
#: zlib's default (6): 0.5-0.7 s for the 16 MiB of a 256^3 input's descriptors, against
#: 0.16 s at level 1 for a file 13% larger (4.7 instead of 4.2 MB); float descriptors
#: compress poorly at any level.
NIFTI_GZIP_LEVEL = 1


def descriptor_geometry(
    resampled: sitk.Image, card: ModelCard
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(origin, spacing, direction) of the descriptor grid over a resampled input grid.

    ITK order (x, y, z), LPS mm. The offset is along the grid axes, so it goes
    through the direction cosines.
    """
    spacing = np.asarray(resampled.GetSpacing(), dtype=np.float64)
    direction = np.asarray(resampled.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin = np.asarray(resampled.GetOrigin(), dtype=np.float64)
    origin = origin + direction @ (card.output_offset_voxels * spacing)
    return (
        tuple(float(v) for v in origin),
        tuple(float(v) for v in card.output_stride * spacing),
        tuple(float(v) for v in direction.ravel()),
    )


def compute_descriptor_image(
    image: sitk.Image,
    extractor: DescriptorExtractor,
    card: ModelCard,
    mask: np.ndarray | None = None,
) -> sitk.Image:
    """Descriptors of a 3-D scalar image as a 16-component float32 vector image.

    `image`: any spacing and direction (LPS mm). It is resampled to
    `card.input_spacing_mm` isotropic with the registration engine's
    `resample_to_spacing` (same origin and direction) and z-scored with
    `normalise_intensities` (`mask`, on the resampled grid, selects the voxels
    whose statistics define the z-score; default: automatic foreground), so the
    descriptors equal those the registration pipeline computes.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("expected a 3-D scalar image")
    resampled = resample_to_spacing(image, card.input_spacing_mm)
    # A view, not a copy (64 MiB at 256^3): normalising only reads it.
    volume = normalise_intensities(sitk.GetArrayViewFromImage(resampled), mask=mask)
    descriptors = extractor.extract(volume)  # (z', y', x', 16)
    out = sitk.GetImageFromArray(descriptors, isVector=True)
    origin, spacing, direction = descriptor_geometry(resampled, card)
    out.SetOrigin(origin)
    out.SetSpacing(spacing)
    out.SetDirection(direction)
    return out


def compute_descriptor_file(
    image_path: str | Path,
    output_path: str | Path,
    model_path: str | Path | None = None,
    device: Device = "auto",
    engine: Engine = "onnxruntime",
) -> sitk.Image:
    """`disa descriptors IMAGE -o OUT`: read, describe, write (.nii.gz, .nii, .nrrd, .mha).

    `model_path` names an ONNX file with its card next to it (`.json`);
    default: the shipped model. The card's sha256 is checked. `device` and
    `engine` as for `DescriptorExtractor`. Input is read
    and validated with the engine's `read_image`, output written atomically
    with `write_image`; both raise InputError for problems a user can fix.
    """
    from disa.core.errors import InputError
    from disa.core.io.images import read_image

    onnx_path = Path(model_path) if model_path is not None else default_model_path()
    if onnx_path is None:
        raise InputError(
            "no descriptor model is installed: pass a model file (.onnx with its card)"
        )
    card_path = card_path_for(onnx_path)
    if not card_path.is_file():
        raise InputError(f"model card {card_path.name} not found next to {onnx_path.name}")
    card = load_model_card(card_path)
    extractor = DescriptorExtractor(card.onnx_path(card_path.parent), device=device, engine=engine)
    # The session (importing the runtime, reading and compiling the network: 0.2-0.3 s)
    # is made on a second thread while this one reads and resamples the image, which
    # keep one core busy; an error there is raised again by the extraction itself.
    with ThreadPoolExecutor(1, thread_name_prefix="disa-session") as pool:
        pool.submit(lambda: extractor.session)
        image = read_image(image_path)
        descriptors = compute_descriptor_image(image, extractor, card)
    write_descriptor_image(descriptors, output_path)
    return descriptors


def write_descriptor_image(image: sitk.Image, output_path: str | Path) -> None:
    """``disa.core.io.images.write_image``, but a ``.nii.gz`` is compressed at
    NIFTI_GZIP_LEVEL: ITK writes the uncompressed NIfTI next to it, Python's gzip
    compresses it into a temporary file, flushed to disk and renamed over
    ``output_path`` (readers never see a half-written file). The same NIfTI bytes
    inside. Other formats, and any path write_image would refuse, go to write_image."""
    from disa.core.io.images import write_image

    path = Path(output_path)
    if not path.name.lower().endswith(".nii.gz") or not path.parent.is_dir():
        write_image(image, path)
        return
    stem = path.parent / f".{path.name}.{uuid.uuid4().hex}"
    raw, packed = Path(f"{stem}.tmp.nii"), Path(f"{stem}.tmp.nii.gz")
    try:
        try:
            sitk.WriteImage(image, str(raw), False)
        except RuntimeError as err:
            raise OSError(f"{path.name}: cannot write image: {err}") from err
        with open(raw, "rb") as source, open(packed, "wb") as target:
            # mtime 0 and no file name in the gzip header: the same bytes for the same image.
            with gzip.GzipFile(filename="", mode="wb", fileobj=target,
                               compresslevel=NIFTI_GZIP_LEVEL, mtime=0) as zipped:
                shutil.copyfileobj(source, zipped, 1 << 20)
            target.flush()
            os.fsync(target.fileno())
        os.replace(packed, path)
    finally:
        for leftover in (raw, packed):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
