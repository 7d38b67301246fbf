"""A guess of an image's modality from its intensities, for `disa info` (no DICOM tag needed).

Heuristics, stated so a user can judge them: CT stores Hounsfield units, so air
sits near -1000 and soft tissue near 0..100; MR intensities are non-negative
with arbitrary units; 3D ultrasound volumes are mostly exactly zero outside
the scan's fan and carry speckle inside it.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def modality_hint(image: sitk.Image, max_samples: int = 1_000_000) -> str:
    """One line: the likely modality and the evidence for it."""
    values = sitk.GetArrayViewFromImage(image).ravel()
    if values.size > max_samples:
        values = values[:: values.size // max_samples]
    values = values[np.isfinite(values)].astype(np.float64)
    if values.size == 0:
        return "unknown (no finite voxel)"
    low, high = np.percentile(values, [1.0, 99.5])
    air = np.mean((values > -1100) & (values < -900))
    zeros = np.mean(values == 0)
    if low < -500 and air > 0.05 and high < 5000:
        return f"CT-like (Hounsfield units: {air:.0%} of voxels near -1000 HU, air)"
    if values.min() >= 0 and zeros > 0.3:
        inside = values[values > 0]
        contrast = float(inside.std() / max(inside.mean(), 1e-9)) if inside.size else 0.0
        if contrast > 0.5:
            return (f"ultrasound-like ({zeros:.0%} of voxels exactly zero outside the field of "
                    f"view, speckle contrast {contrast:.2f} inside)")
    if values.min() >= 0:
        return f"MR-like (non-negative arbitrary units, 99.5th percentile {high:.4g})"
    return f"unknown (intensities {low:.4g} .. {high:.4g})"
