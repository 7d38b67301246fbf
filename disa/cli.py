"""The `disa` command: register, info, descriptors, demo, warm-up (and the service commands).

Exit codes: 0 success, 2 bad input or options (one line on stderr naming the
problem), 1 internal error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from disa.core.errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_OK, InputError


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors already; keep its message to one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_INPUT, f"disa: error: {message}\n")


#: RegistrationOptions fields without a `disa register` flag: tuning knobs of the engine
#: (the service and `disa submit` accept them).
ENGINE_ONLY_OPTIONS = ("top_k", "mind_radius", "mind_dilation")

#: `disa register`'s own help text and metavar of an options flag, where they differ from
#: the field's description and name (help None: the flag has no help line). A field not
#: listed here gets its description: a new option needs no entry.
REGISTER_FLAG_TEXT: dict[str, dict[str, Any]] = {
    "mode": {"help": "rigid+probe: ultrasound probe compression with the pose; deformable: "
                     "dense field after rigid/affine"},
    "similarity": {"help": "default: disa when the model ships, else mind"},
    "starts": {"help": "random starts (default 500)"},
    "seed": {"help": None},
    "rotation_range": {"help": None, "metavar": "DEG"},
    "translation_range": {"help": "starts draw shifts in +- this many mm per axis (default: "
                                  "from the images' extents)", "metavar": "MM"},
    "working_spacing": {"help": None, "metavar": "MM"},
    "init": {"help": "poses the starts are drawn around: auto (default): the header pose, the "
                     "aligned foreground centroids and placements of a much smaller field of "
                     "view; centers: the centroids only; geometry: the header pose (or "
                     "--initial-transform) only"},
    "precision": {"help": None},
    "deformable_from": {"help": "deformable mode: the linear stage the field starts from"},
    "regularisation": {"help": "deformable mode: smoothness weight relative to the default "
                               "(1)", "metavar": "W"},
    "search_radius": {"help": "deformable mode: discrete search half-width (default 1.5 "
                              "control spacings)", "metavar": "MM"},
    "ultrasound": {"help": "which image is an ultrasound volume (default: detected from the "
                           "data); rigid+probe mode fits the probe compression in it"},
    "probe_origin": {"help": "rigid+probe mode: probe face centre, LPS mm (default: from the "
                             "ultrasound's field of view)"},
    "probe_axis": {"help": "rigid+probe mode: direction into the body, LPS (default: from the "
                           "ultrasound's field of view)"},
}


def _add_register(sub: argparse._SubParsersAction) -> None:
    from disa.cli_options import add_option_argument
    from disa.registration.options import RegistrationOptions

    p = sub.add_parser("register", help="register MOVING to FIXED and write a result folder",
                       description="Register MOVING to FIXED. The output transform maps fixed "
                                   "points to moving points (LPS mm, ITK convention).")
    p.add_argument("fixed", type=Path, help="fixed image (NIfTI, NRRD, MetaImage .mha, DICOM "
                                            "folder or .zip)")
    p.add_argument("moving", type=Path, help="moving image (same formats)")
    p.add_argument("-o", "--output", type=Path, required=True, help="result folder")
    # One flag per engine option, with the engine's default, type and choices.
    for name, info in RegistrationOptions.model_fields.items():
        if name in ENGINE_ONLY_OPTIONS:
            continue
        add_option_argument(p, name, dest=name, default=info.default,
                            **REGISTER_FLAG_TEXT.get(name, {}))
        if name == "init":  # the pose the starts are drawn around, next to --init in --help
            p.add_argument("--initial-transform", type=Path, default=None, metavar="FILE",
                           help="ITK linear transform (.tfm, .txt, .h5) mapping fixed to "
                                "moving points (LPS mm), e.g. an earlier result's "
                                "transform.tfm or its folder: replaces the header pose as the "
                                "pose to start from")
    p.add_argument("--fixed-mask", type=Path, default=None, metavar="F")
    p.add_argument("--moving-mask", type=Path, default=None, metavar="M")
    p.add_argument("--warp-labels", type=Path, default=None, metavar="FILE",
                   help="label map on MOVING's grid (integer voxels): also written onto the "
                        "fixed grid through the final transform, nearest neighbour, as "
                        "warped_labels.nii.gz")
    p.add_argument("--fixed-series-uid", default=None, metavar="UID",
                   help="series to use when FIXED is a DICOM folder/zip with several")
    p.add_argument("--moving-series-uid", default=None, metavar="UID",
                   help="series to use when MOVING is a DICOM folder/zip with several")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(handler=_cmd_register)


def _options_from_args(args: argparse.Namespace):  # -> RegistrationOptions
    from disa.registration.options import RegistrationOptions

    return RegistrationOptions(**{name: getattr(args, name)
                                  for name in RegistrationOptions.model_fields
                                  if name not in ENGINE_ONLY_OPTIONS})


def _cmd_register(args: argparse.Namespace) -> int:
    from disa.progress import progress_reporter
    from disa.registration.results.outputs import check_output_folder
    from disa.registration.runner import run_registration

    options = _options_from_args(args)
    # Before reading anything: a bad -o must not cost a whole registration.
    check_output_folder(args.output)
    with progress_reporter(quiet=args.quiet) as report:
        data = run_registration(args.fixed, args.moving, args.output, options,
                                args.fixed_mask, args.moving_mask, progress=report,
                                fixed_series_uid=args.fixed_series_uid,
                                moving_series_uid=args.moving_series_uid,
                                initial_transform_path=args.initial_transform,
                                warp_labels_path=args.warp_labels)
    _print_summary(data, args.output)
    return EXIT_OK


def _print_summary(data: dict, outdir: Path) -> None:
    """The verdict first (with the evidence qa.png's title and the web page show), then the
    run's figures and where the files are."""
    from disa.registration.results.readable import verdict_line

    line = verdict_line(data)
    if line:
        print(f"verdict: {line}" + ("" if data["verdict"] == "likely"
                                    else f"\n  why: {data['verdict_reason']}"))
    print(f"{data['mode']} registration with {data['similarity']}: "
          f"similarity {data['similarity_value']:.4f}, {data['evaluations']} evaluations, "
          f"{sum(v for k, v in data['timings_s'].items() if '_' not in k):.2f} s")
    print(f"results in {outdir}/ : {', '.join(data['files'])}")
    missing = (data.get("warped_labels") or {}).get("labels_missing")
    if missing:
        shown = ", ".join(str(v) for v in missing[:10]) + (", ..." if len(missing) > 10 else "")
        print(f"  warped labels: {len(missing)} of {data['warped_labels']['labels']} labels "
              f"land on no fixed voxel (outside the fixed field of view?): {shown}")


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print an image's geometry and a modality hint")
    p.add_argument("image", type=Path)
    p.add_argument("--series-uid", default=None, help="DICOM series to describe")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--header-only", action="store_true",
                   help="read only the header (no intensity-based modality hint)")
    p.set_defaults(handler=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from disa.core.io.images import format_info, inspect_image, read_image
    from disa.registration.modality import modality_hint

    info = inspect_image(args.image, series_uid=args.series_uid)
    hint = None if args.header_only else modality_hint(read_image(args.image,
                                                                  series_uid=args.series_uid))
    if args.json:
        print(json.dumps({**info.as_dict(), "modality_hint": hint}, indent=2))
    else:
        print(format_info(info))
        if hint is not None:
            print(f"modality hint: {hint}")
    return EXIT_OK


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="register the bundled sample pair and check it against "
                                    "its known transform")
    p.add_argument("-o", "--output", type=Path, default=Path("disa-demo"))
    p.add_argument("--starts", type=int, default=500)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from disa.progress import progress_reporter
    from disa.registration.options import RegistrationOptions
    from disa.registration.results.outputs import check_output_folder
    from disa.registration.runner import run_registration
    from disa.sample import sample_paths, sample_truth_error

    check_output_folder(args.output)
    fixed, moving, truth = sample_paths()
    print(f"fixed:  {fixed}\nmoving: {moving}")
    with progress_reporter(quiet=args.quiet) as report:
        data = run_registration(fixed, moving, args.output,
                                RegistrationOptions(starts=args.starts), progress=report)
    _print_summary(data, args.output)
    error = sample_truth_error(args.output / "transform.tfm", truth)
    print(f"mean target registration error against the known transform: {error:.2f} mm")
    return EXIT_OK if error < 2.0 else EXIT_INTERNAL


def _add_warm_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("warm-up", help="compile the engine's kernels into the on-disk cache "
                                       "(the Docker images and `disa worker` run this)",
                       description="Register the bundled sample pair (rigid, deformable and, "
                                   "when the model ships, DISA) with few starts, so that "
                                   "numba's kernels are compiled and cached before a real "
                                   "job needs them (NUMBA_CACHE_DIR). Does nothing when a "
                                   "finished warm-up's stamp in the cache still matches this "
                                   "install and host.")
    p.add_argument("--force", action="store_true",
                   help="run the registrations even when the cache is stamped warm")
    p.set_defaults(handler=_cmd_warm_up)


def _cmd_warm_up(args: argparse.Namespace) -> int:
    from disa.warm_up import cache_folder, is_warm, warm_up, write_stamp

    where = cache_folder()
    if not args.force and is_warm():
        print(f"warm-up: cache already warm for this install and host (numba cache: {where}; "
              "--force runs it again)")
        return EXIT_OK
    seconds = warm_up()
    stamped = write_stamp()
    runs = ", ".join(f"{name} {s:.1f} s" for name, s in seconds.items())
    note = "" if stamped else "; not stamped: the folder is not writable"
    print(f"warm-up: {runs} (numba cache: {where}{note})")
    return EXIT_OK


#: Subcommand builders; other packages (model, service, worker) add theirs here.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_register, _add_info,
                                                                 _add_demo, _add_warm_up]


def build_parser() -> argparse.ArgumentParser:
    from disa import __version__

    parser = _Parser(prog="disa", description="DISA multimodal image registration")
    parser.add_argument("--version", action="version", version=f"disa {__version__}")
    parser.add_argument("--debug", action="store_true", help="tracebacks for internal errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub: argparse._SubParsersAction) -> None:
    """Commands of packages that may be absent or still growing (descriptors, service)."""
    import importlib

    for module_name in ("disa.model.cli", "disa.service.cli", "disa.worker.cli", "disa.pacs.cli"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.add_commands(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except InputError as exc:
        print(f"disa: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_INPUT
    except ValidationError as exc:
        # A model-level check (several options together) has an empty location.
        problems = "; ".join(
            (f"{'.'.join(str(p) for p in e['loc'])}: " if e["loc"] else "") + e["msg"]
            for e in exc.errors())
        print(f"disa: error: invalid options: {problems}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("disa: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: one line unless --debug
        if args.debug:
            raise
        print(f"disa: internal error: {type(exc).__name__}: {_one_line(str(exc))} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


def _one_line(text: str) -> str:
    return " ".join(text.split())
