"""Writing and reading compressed NIfTI: the project's ISA-L path against ITK's own zlib.

    python benchmarks/nifti_gzip.py [--size X Y Z] [--out DIR]
    python benchmarks/nifti_gzip.py --quick     # small volumes: the script works

The volumes of a deformable run on a clinical CT: the dense field u(x) on a scanner's grid
(594 x 371 x 320 voxels, 3 float32 components: smooth, its low mantissa bits noise) and
a CT-like float32 image of that size (the registered image). For each: ITK's writer with
compression (the baseline, what `write_image` did until 2026-12-08), `write_image` now
(core/io/fast_gzip.py: ITK writes plain NIfTI, ISA-L compresses), both file sizes; the
input check's scan of the decompressed bytes with Python's zlib (the baseline) and with
ISA-L (now); and ITK reading the file back. Same process, same files, one after the
other; a table with ratios against the baseline goes to stdout and DIR/nifti_gzip.md.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

HERE = Path(__file__).resolve().parent
CLINICAL_SIZE = (594, 371, 320)  # x y z: commit_ab.py's clinical CT grid of the torso
QUICK_SIZE = (60, 50, 40)


def volumes(size_xyz: tuple[int, int, int], seed: int = 0) -> dict[str, sitk.Image]:
    """The field (smooth random vectors, mm) and a CT-like image (smooth tissue values
    with noise, air outside an ellipse) on a 0.7 x 0.7 x 1.0 mm grid of ``size_xyz``."""
    rng = np.random.default_rng(seed)
    shape = size_xyz[::-1]
    coarse = ndimage.gaussian_filter(rng.normal(size=(12, 14, 18, 3)), (1, 1, 1, 0)) * 20.0
    zoom = np.asarray(shape) / coarse.shape[:3]
    field = np.stack([ndimage.zoom(coarse[..., i], zoom, order=1) for i in range(3)], -1)
    _, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    body = ((y / shape[1] - 0.5) ** 2 / 0.2 + (x / shape[2] - 0.5) ** 2 / 0.2) < 1.0
    tissue = ndimage.zoom(rng.normal(40.0, 30.0, (12, 14, 18)), zoom, order=1)
    ct = np.where(body, tissue + rng.normal(0.0, 15.0, shape), -1000.0)
    images = {"field": sitk.GetImageFromArray(field.astype(np.float32), isVector=True),
              "ct": sitk.GetImageFromArray(ct.astype(np.float32))}
    for image in images.values():
        image.SetSpacing((0.7, 0.7, 1.0))
    return images


def _seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _scan(opener: Callable[[Path], object], path: Path) -> None:
    with opener(path) as fh:  # type: ignore[attr-defined]
        while fh.read(16 * 1024**2):
            pass


def measure(name: str, image: sitk.Image, folder: Path) -> list[tuple[str, str, float, float]]:
    """(volume, step, baseline s, now s) rows, with the two file sizes as a last row (MB)."""
    from disa.core.io.fast_gzip import open_gzip
    from disa.core.io.images import write_image

    itk_path, now_path = folder / f"{name}-itk.nii.gz", folder / f"{name}-now.nii.gz"
    write_itk = _seconds(lambda: sitk.WriteImage(image, str(itk_path), True))
    write_now = _seconds(lambda: write_image(image, now_path))
    scan_zlib = _seconds(lambda: _scan(gzip.open, now_path))
    scan_isal = _seconds(lambda: _scan(open_gzip, now_path))
    read_itk = _seconds(lambda: sitk.ReadImage(str(itk_path)))
    read_now = _seconds(lambda: sitk.ReadImage(str(now_path)))
    mb = 1e-6
    return [(name, "write", write_itk, write_now), (name, "scan (input check)", scan_zlib,
                                                    scan_isal),
            (name, "ITK read", read_itk, read_now),
            (name, "file MB", itk_path.stat().st_size * mb, now_path.stat().st_size * mb)]


def table(rows: list[tuple[str, str, float, float]]) -> str:
    lines = ["| volume | step | baseline (ITK zlib / Python zlib) | now (ISA-L) | now / baseline |",
             "|---|---|---:|---:|---:|"]
    for volume, step, base, now in rows:
        unit = "" if step == "file MB" else " s"
        lines.append(f"| {volume} | {step} | {base:.2f}{unit} | {now:.2f}{unit} | "
                     f"{now / base:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=3, default=CLINICAL_SIZE, metavar=("X", "Y", "Z"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from common import machine

    size = QUICK_SIZE if args.quick else tuple(args.size)
    rows: list[tuple[str, str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="nifti-gzip-") as tmp:
        for name, image in volumes(size).items():  # type: ignore[arg-type]
            rows += measure(name, image, Path(tmp))
    command = " ".join(["python benchmarks/nifti_gzip.py", *(argv or sys.argv[1:])])
    report = (f"Command: `{command}`. Machine: {machine()}. "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Volumes of "
              f"{size[0]} x {size[1]} x {size[2]} voxels.\n\n{table(rows)}\n")
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nifti_gzip.md").write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
