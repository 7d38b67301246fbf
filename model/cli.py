"""`disa descriptors IMAGE -o OUT`: the DISA descriptor map of an image as a vector image."""

from __future__ import annotations

import argparse
import gzip
import math
import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path

from disa.model.runtime import ENGINES

#: glibc's malloc tunable that asks for transparent huge pages (glibc >= 2.35).
HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb"
#: Working grids (voxels at the model's spacing) from which the restart with huge pages
#: pays: it costs 0.2-0.3 s (a second interpreter start and the CLI's imports) and saves
#: about 1 CPU s of page faults at 256^3, in proportion to the voxels (2 cores, Intel Xeon).
HUGE_PAGE_MIN_VOXELS = 160**3


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


def huge_page_environment(
    environ: Mapping[str, str] | None = None,
    thp_path: str | Path = "/sys/kernel/mm/transparent_hugepage/enabled",
) -> dict[str, str] | None:
    """The environment (a copy of ``environ``, default os.environ) with
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 added, or None where it would change nothing.

    Why: the first inference on a 256^3 volume touches about 3 GB of fresh activation
    memory that OpenVINO and ONNX Runtime get from malloc; in 4 KiB pages that is
    about 890,000 page faults (1.0 CPU s of kernel time on 2 cores, Intel Xeon). With
    the tunable, glibc asks the kernel for transparent huge pages (2 MiB; about
    60,000 faults) where the kernel gives them only on request (THP mode "madvise",
    the common default). The tunable is read at process start only, hence a new
    environment for a new process. None: not Linux with glibc >= 2.35, THP mode
    "always" (already huge) or "never" (no use), or GLIBC_TUNABLES already names
    the tunable (the user's choice, e.g. ``glibc.malloc.hugetlb=0`` to opt out).
    """
    environ = os.environ if environ is None else environ
    tunables = environ.get("GLIBC_TUNABLES", "")
    if not sys.platform.startswith("linux") or HUGE_PAGE_TUNABLE in tunables:
        return None
    try:
        libc, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        glibc = tuple(int(v) for v in version.split(".")[:2])
        mode = Path(thp_path).read_text()
    except (AttributeError, OSError, ValueError):
        return None
    if libc != "glibc" or glibc < (2, 35) or "[madvise]" not in mode:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, f"{HUGE_PAGE_TUNABLE}=1") if t)
    return env


def nifti_working_voxels(path: str | Path, spacing_mm: float) -> int | None:
    """Voxels of a NIfTI-1/2 image (.nii, .nii.gz) resampled to isotropic ``spacing_mm``,
    from its header alone (no image library); None for other files or unreadable ones."""
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    try:
        with (gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")) as fh:
            header = fh.read(540)
    except (OSError, EOFError):
        return None
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims, spacing = struct.unpack(order + "8h", header[40:56]), \
                struct.unpack(order + "8f", header[76:108])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            dims, spacing = struct.unpack(order + "8q", header[16:80]), \
                struct.unpack(order + "8d", header[104:168])
            break
    else:
        return None
    if not 3 <= dims[0] <= 7:
        return None
    return math.prod(max(1, round((int(n) - 1) * abs(float(s)) / spacing_mm) + 1)
                     for n, s in zip(dims[1:4], spacing[1:4], strict=True))


def _restart_with_huge_pages(image: Path, model: Path | None) -> None:
    """Run this `disa descriptors` command again in a process with huge pages
    (`huge_page_environment`), when this process is the `disa` command itself and the
    working grid is large (NIfTI header: at least HUGE_PAGE_MIN_VOXELS; other formats,
    DICOM series included, are taken as large).

    Costs one interpreter start and the CLI's imports (0.2-0.3 s) and saves 0.5-1 s
    of page faults in the first inference of a 256^3 volume (benchmarks/README.md,
    "Cold disa descriptors"). Never from a caller that runs `disa.cli.main` in its
    own process (tests, scripts): exec would replace that process.
    """
    launcher = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    is_cli = launcher is not None and (
        launcher.name == "disa" or (launcher.name == "__main__.py" and launcher.parent.name
                                    == "disa"))
    env = huge_page_environment() if is_cli else None
    if env is None:
        return
    from disa.model.card import INPUT_SPACING_MM, default_model_path, load_model_card

    try:
        card_of = model or default_model_path()
        spacing = load_model_card(card_of, verify=False).input_spacing_mm if card_of else \
            INPUT_SPACING_MM
    except Exception:  # the command itself reports a bad model; the default spacing here
        spacing = INPUT_SPACING_MM
    voxels = nifti_working_voxels(image, spacing)
    if voxels is not None and voxels < HUGE_PAGE_MIN_VOXELS:
        return
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return  # cannot restart: go on with 4 KiB pages


def _cmd_descriptors(args: argparse.Namespace) -> int:
    _restart_with_huge_pages(args.image, args.model)

    from disa.model.card import default_model_path
    from disa.model.descriptors import compute_descriptor_file
    from disa.model.runtime import default_engine

    engine = args.engine or default_engine(args.device, args.model or default_model_path())
    image = compute_descriptor_file(args.image, args.output, model_path=args.model,
                                    device=args.device, engine=engine)
    print(f"wrote {args.output}: {image.GetSize()} voxels x {image.GetNumberOfComponentsPerPixel()}"
          f" channels, spacing {tuple(round(s, 3) for s in image.GetSpacing())} mm")
    return 0
