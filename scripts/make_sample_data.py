"""Make the bundled sample pair (disa/data/): real anatomy, two contrasts, a known transform.

Fixed: the ICBM152 2009a T1 template that nilearn ships, at 2.5 mm. Moving: a
T2-like contrast synthesised from the same template's grey- and white-matter
maps (CSF bright, white matter dark), with a bias field and noise, acquired in
a different frame (2 x 2 x 3 mm voxels) under a known rigid transform. The
transform (fixed -> moving points, LPS mm) is stored as sample_truth.tfm.

Run once with the train extra installed (nilearn):  python scripts/make_sample_data.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

OUT = Path(__file__).resolve().parents[1] / "disa" / "data"


def nilearn_file(name: str) -> Path:
    import nilearn

    return Path(nilearn.__file__).parent / "datasets" / "data" / name


def main() -> None:
    t1 = sitk.ReadImage(str(nilearn_file("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")),
                        sitk.sitkFloat32)
    gm = sitk.ReadImage(str(nilearn_file("mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")),
                        sitk.sitkFloat32)
    wm = sitk.ReadImage(str(nilearn_file("mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")),
                        sitk.sitkFloat32)
    spacing = 2.5
    size = [round(n * s / spacing) for n, s in zip(t1.GetSize(), t1.GetSpacing(), strict=True)]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetOrigin(t1.GetOrigin())
    ref.SetDirection(t1.GetDirection())
    ref.SetSpacing((spacing,) * 3)
    fixed = sitk.Resample(sitk.SmoothingRecursiveGaussian(t1, 1.0), ref)

    # T2-like: CSF (inside the head, neither GM nor WM, moderately bright on T1) bright.
    # nilearn ships the tissue maps as 0..255 (uint8 converted): probabilities are /255.
    # (Unscaled maps made every tissue voxel ~100x too bright: 84 % of the moving image's
    # data sat at the int16 clip value and the T2 showed as a white silhouette.)
    g = sitk.GetArrayFromImage(gm) / 255.0
    w = sitk.GetArrayFromImage(wm) / 255.0
    t1a = sitk.GetArrayFromImage(t1)
    head = t1a > 0.1 * t1a.max()
    csf = np.clip(1.0 - g - w, 0, 1) * head
    rng = np.random.default_rng(2023)
    t2 = 0.9 * csf + 0.55 * g + 0.3 * w + 0.15 * head * (1 - csf)
    t2_img = sitk.GetImageFromArray(t2.astype(np.float32))
    t2_img.CopyInformation(t1)

    truth = sitk.Euler3DTransform()
    truth.SetComputeZYX(True)
    center = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2 for n in fixed.GetSize()]))
    truth.SetCenter(tuple(center))
    truth.SetRotation(*np.deg2rad([12.0, -8.0, 15.0]))
    truth.SetTranslation((25.0, -18.0, 30.0))

    moving_spacing = (2.0, 2.0, 3.0)
    extent = np.asarray(fixed.GetSize()) * spacing
    moving_size = [int(np.ceil(e / s)) for e, s in zip(extent, moving_spacing, strict=True)]
    m_center = np.asarray(truth.TransformPoint(tuple(center)))
    rot = np.asarray(truth.GetMatrix()).reshape(3, 3)
    half = (np.asarray(moving_size) - 1) / 2 * np.asarray(moving_spacing)
    moving_ref = sitk.Image(moving_size, sitk.sitkFloat32)
    moving_ref.SetSpacing(moving_spacing)
    # The second scanner's axes are rotated by 5 degrees against the first one's.
    tilt = sitk.Euler3DTransform()
    tilt.SetRotation(0.0, 0.0, np.deg2rad(5.0))
    direction = np.asarray(tilt.GetMatrix()).reshape(3, 3)
    moving_ref.SetDirection(tuple(direction.ravel()))
    moving_ref.SetOrigin(tuple(m_center - direction @ half))
    del rot
    # M(y) = T2(T^-1(y)): Resample(image, ref, tx) samples image at tx(y).
    moving = sitk.Resample(sitk.SmoothingRecursiveGaussian(t2_img, 1.0), moving_ref,
                           truth.GetInverse(), sitk.sitkLinear, 0.0)
    m = sitk.GetArrayFromImage(moving)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, n) for n in m.shape), indexing="ij")
    bias = 1.0 + 0.25 * xx - 0.15 * zz + 0.1 * yy * yy
    m = m * bias + rng.normal(0, 0.02, m.shape) * (m > 0.01)
    # Scaled to at most 1000 units, well inside int16: no voxel is clipped (checked below).
    scaled = np.clip(m, 0, None) * (1000.0 / float(np.percentile(m[m > 0.01], 99.9)))
    moving_out = sitk.GetImageFromArray(np.rint(np.minimum(scaled, 2000.0)).astype(np.int16))
    moving_out.CopyInformation(moving)
    fixed_out = sitk.Cast(sitk.RescaleIntensity(fixed, 0, 1000), sitk.sitkInt16)

    saturated = float(np.mean(scaled[scaled > 0] >= 2000.0))
    if saturated > 0.001:
        raise SystemExit(f"{saturated:.1%} of the moving image's data is clipped")
    OUT.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(fixed_out, str(OUT / "sample_fixed_t1.nii.gz"), useCompression=True)
    sitk.WriteImage(moving_out, str(OUT / "sample_moving_t2.nii.gz"), useCompression=True)
    sitk.WriteTransform(truth, str(OUT / "sample_truth.tfm"))
    print("wrote", sorted(p.name for p in OUT.iterdir()))


if __name__ == "__main__":
    main()
