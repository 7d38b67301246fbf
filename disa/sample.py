"""The bundled sample pair (made by scripts/make_sample_data.py) and its ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

DATA = Path(__file__).resolve().parent / "data"


def sample_paths() -> tuple[Path, Path, Path]:
    """Fixed (T1 template, 2.5 mm), moving (synthetic T2, 2x2x3 mm, moved) and truth (.tfm)."""
    return (DATA / "sample_fixed_t1.nii.gz", DATA / "sample_moving_t2.nii.gz",
            DATA / "sample_truth.tfm")


def sample_truth_error(estimate_path: str | Path, truth_path: str | Path,
                       fixed_path: str | Path | None = None) -> float:
    """Mean distance (mm) between where the estimate and the truth map the fixed foreground."""
    fixed_path = fixed_path or sample_paths()[0]
    fixed = sitk.ReadImage(str(fixed_path), sitk.sitkFloat32)
    estimate = sitk.ReadTransform(str(estimate_path))
    truth = sitk.ReadTransform(str(truth_path))
    array = sitk.GetArrayFromImage(fixed)
    zyx = np.argwhere(array > 0.2 * array.max())[::50]
    errors = []
    for z, y, x in zyx:
        p = fixed.TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
        errors.append(np.linalg.norm(np.subtract(estimate.TransformPoint(p),
                                                 truth.TransformPoint(p))))
    return float(np.mean(errors))
