"""Tests of descriptor images: geometry in physical space (LPS mm), file output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("onnxruntime")

from disa.core.preprocess import (
    normalise_intensities,
    resample_to_spacing,
)
from disa.model.card import card_path_for, load_model_card
from disa.model.descriptors import (
    compute_descriptor_file,
    compute_descriptor_image,
)
from disa.model.runtime import DescriptorExtractor


def _rotation(ax: float, az: float) -> np.ndarray:
    cx, sx, cz, sz = np.cos(ax), np.sin(ax), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx


def _physical_points(image: sitk.Image) -> np.ndarray:
    """LPS mm of every voxel, array (z, y, x, 3)."""
    size = image.GetSize()
    zi, yi, xi = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    index = np.stack([xi, yi, zi], axis=-1).astype(np.float64)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return (index * image.GetSpacing()) @ direction.T + image.GetOrigin()


def _blob_image(
    size: tuple[int, int, int],
    spacing: tuple[float, float, float],
    direction: np.ndarray,
    origin: tuple[float, float, float],
    centre: np.ndarray,
    sigma_mm: float,
) -> sitk.Image:
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetDirection(tuple(direction.ravel()))
    image.SetOrigin(origin)
    r2 = np.sum((_physical_points(image) - centre) ** 2, axis=-1)
    values = 100.0 + 400.0 * np.exp(-r2 / (2 * sigma_mm**2))
    out = sitk.GetImageFromArray(values.astype(np.float32))
    out.CopyInformation(image)
    return out


def test_descriptor_grid_is_every_fourth_resampled_voxel(onnx_model: Path) -> None:
    card = load_model_card(card_path_for(onnx_model))
    extractor = DescriptorExtractor(onnx_model, device="cpu")
    direction = _rotation(0.3, -0.2)
    image = _blob_image(
        (40, 36, 30),
        (1.5, 1.7, 2.4),
        direction,
        (10.0, -20.0, 30.0),
        centre=np.array([40.0, 10.0, 60.0]),
        sigma_mm=8.0,
    )
    out = compute_descriptor_image(image, extractor, card)
    resampled = resample_to_spacing(image, card.input_spacing_mm)
    assert out.GetNumberOfComponentsPerPixel() == 16
    assert out.GetPixelID() == sitk.sitkVectorFloat32
    np.testing.assert_allclose(out.GetSpacing(), 4 * np.asarray(resampled.GetSpacing()))
    np.testing.assert_allclose(out.GetDirection(), resampled.GetDirection())
    for index in [(0, 0, 0), (3, 1, 2), (5, 4, 7)]:
        np.testing.assert_allclose(
            out.TransformIndexToPhysicalPoint(index),
            resampled.TransformIndexToPhysicalPoint(tuple(4 * i for i in index)),
            atol=1e-9,
        )
    expected = extractor.extract(normalise_intensities(sitk.GetArrayFromImage(resampled)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), expected)


def test_blob_activity_is_centred_on_the_blob(symmetric_model: Path) -> None:
    # A net with flip-symmetric kernels answers a round blob with activity
    # symmetric about the blob: its centroid, computed with the descriptor
    # image's own geometry, must land on the blob's physical centre. A wrong
    # origin (e.g. output i placed at input 4i + 1.5) would move it by mm.
    card = load_model_card(card_path_for(symmetric_model))
    assert card.input_spacing_mm == 4.0
    extractor = DescriptorExtractor(symmetric_model, device="cpu")
    direction = _rotation(0.25, 0.4)
    spacing = (3.0, 3.5, 4.5)
    size = (142, 122, 95)  # about 424 mm per axis
    origin = (-150.0, 60.0, 300.0)
    centre_index = np.array([70.3, 61.8, 46.2])  # ITK (x, y, z), off the 4 mm lattice
    centre = direction @ (centre_index * spacing) + origin
    image = _blob_image(size, spacing, direction, origin, centre, sigma_mm=6.0)

    out = compute_descriptor_image(image, extractor, card)
    d = sitk.GetArrayFromImage(out)  # (z, y, x, 16)
    points = _physical_points(out)
    # Background descriptor: far from the blob and from the volume border.
    background = d[6, 6, 6]
    energy = np.sum((d - background) ** 2, axis=-1)
    # Border effects (zero padding) reach 24 input voxels = 6 descriptor voxels.
    margin = 7
    inner = (slice(margin, -margin),) * 3
    weights = energy[inner]
    centroid = (weights[..., None] * points[inner]).sum(axis=(0, 1, 2)) / weights.sum()
    assert weights.max() > 100 * np.median(weights)
    np.testing.assert_allclose(centroid, centre, atol=1.0)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_compute_descriptor_file_round_trip(onnx_model: Path, tmp_path: Path, suffix: str) -> None:
    image = _blob_image(
        (30, 28, 26),
        (2.0, 2.0, 2.0),
        np.eye(3),
        (0.0, 0.0, 0.0),
        centre=np.array([30.0, 28.0, 26.0]),
        sigma_mm=6.0,
    )
    source = tmp_path / "image.nii.gz"
    sitk.WriteImage(image, str(source))
    target = tmp_path / f"descriptors{suffix}"
    written = compute_descriptor_file(source, target, model_path=onnx_model, device="cpu")
    back = sitk.ReadImage(str(target))
    assert back.GetNumberOfComponentsPerPixel() == 16
    np.testing.assert_allclose(back.GetSpacing(), written.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), written.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(written), atol=1e-6
    )


def _image_file(tmp_path: Path) -> Path:
    image = _blob_image((30, 28, 26), (2.0, 2.0, 2.0), np.eye(3), (5.0, -3.0, 7.0),
                        centre=np.array([35.0, 25.0, 33.0]), sigma_mm=6.0)
    source = tmp_path / "image.nii.gz"
    sitk.WriteImage(image, str(source))
    return source


def test_descriptors_command_writes_the_vector_image(onnx_model: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    from disa.cli import main

    target = tmp_path / "out.nrrd"
    code = main(["descriptors", str(_image_file(tmp_path)), "-o", str(target),
                 "--model", str(onnx_model), "--engine", "onnxruntime"])
    assert code == 0 and "wrote" in capsys.readouterr().out
    back = sitk.ReadImage(str(target))
    assert back.GetNumberOfComponentsPerPixel() == 16
    np.testing.assert_allclose(back.GetSpacing(), (8.0, 8.0, 8.0), rtol=1e-6)
    assert back.GetPixelID() == sitk.sitkVectorFloat32


def test_descriptors_command_on_cuda_without_a_gpu_fails_in_one_line(
        onnx_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    import onnxruntime as ort

    from disa.cli import main

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    target = tmp_path / "out.nii.gz"
    code = main(["descriptors", str(_image_file(tmp_path)), "-o", str(target),
                 "--model", str(onnx_model), "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and not target.exists()
    assert len(err.splitlines()) == 1 and "GPU required by configuration" in err
