"""`disa-train`: fit, export, quantise and evaluate the descriptor network.

disa-train fit --out runs/NAME --budget MINUTES --seed S [--crop 64 --batch 2 ...] [--resume]
               [--device cpu|cuda ...]     # the device loop (shift-aware loss); else the CPU loop
disa-train cache --out runs/volumes.npz   # training volumes as float16 .npz (for --data-cache)
disa-train export --run runs/NAME --out model/weights/
disa-train quantise --onnx model/weights/disa.onnx       # int8 variant for OpenVINO
disa-train evaluate --run runs/NAME | --onnx model/weights/disa.onnx [--card CARD.json]
                    [--engine openvino-int8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from disa.model.card import card_path_for


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="disa-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    # One function per command, in the order `disa-train --help` lists them.
    _add_fit(sub)
    _add_cache(sub)
    _add_export(sub)
    _add_quantise(sub)
    _add_evaluate(sub)
    return p


def _add_fit(sub: argparse._SubParsersAction) -> None:
    """`disa-train fit`: the run folder, the data, the CPU loop's and the device loop's knobs."""
    f = sub.add_parser("fit", help="train (or --resume) into a run folder")
    f.add_argument(
        "--out", required=True, type=Path, help="run folder (checkpoint, log.jsonl, run.json)"
    )
    f.add_argument(
        "--budget",
        required=True,
        type=float,
        help="training minutes in total, over all resumed runs",
    )
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--crop", type=int, default=64, help="crop side in voxels (2 mm), multiple of 4")
    f.add_argument("--batch", type=int, default=2, help="crop pairs per step")
    f.add_argument(
        "--scene-reuse", type=int, default=2, help="consecutive batches drawn from one scene"
    )
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--weight-decay", type=float, default=1e-3)
    f.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    f.add_argument(
        "--halve-every", type=int, default=600, help="steps between halvings of the rate"
    )
    f.add_argument("--max-steps", type=int, default=None)
    f.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="decay of an exponential moving average of the weights, which the run then "
        "serves (export, evaluate); 0: off",
    )
    f.add_argument("--checkpoint-minutes", type=float, default=None,
                   help="minutes between checkpoints (default 5; 1 with --device)")
    f.add_argument("--workers", type=int, default=1, help="data processes (0: in the trainer)")
    f.add_argument("--threads", type=int, default=1, help="torch threads of the trainer")
    f.add_argument("--no-balance", action="store_true", help="plain MSE, no target-bin weights")
    f.add_argument("--balance-power", type=float, default=1.0,
                   help="exponent of the target-bin weights (1: v1-v5, 0.5: softened)")
    f.add_argument("--data-cache", type=Path, default=None,
                   help="training volumes from this .npz (disa-train cache) instead of the "
                        "installed packages")
    _add_device_loop(f)
    _add_cpu_loop(f)


def _add_device_loop(f: argparse.ArgumentParser) -> None:
    """The options of the device loop (`--device`), shown as a group of their own."""
    d = f.add_argument_group(
        "device loop", "with --device: crops, targets and the network on a torch device, "
        "shift-aware loss, wall-clock schedule, optimum-bias checkpoint selection "
        "(docs/TRAINING.md); --halve-every, --cross-pairs, --contrast-weight and "
        "--role-target belong to the CPU loop")
    d.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="train with the device loop on this device (default: the CPU loop)")
    d.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto",
                   help="bf16 autocast of the convolutions (auto: on CUDA only)")
    d.add_argument("--scene-pool", type=int, default=1,
                   help="newest scenes a step draws its crop pairs from")
    d.add_argument("--node-offsets", type=int, default=4,
                   help="random node offsets per step with dense cross targets")
    d.add_argument("--shift-pairs", type=int, default=4,
                   help="offset pairs (s, s + d) per step for the shift-difference terms")
    d.add_argument("--shift-range", type=int, default=4, help="|s| per axis, voxels")
    d.add_argument("--shift-step", type=int, default=3, help="largest |d|, voxels")
    d.add_argument("--shift-weight", type=float, default=4.0,
                   help="weight of the per-node shift-difference term (0: off)")
    d.add_argument("--gradient-weight", type=float, default=40.0,
                   help="weight of the per-crop w-weighted gradient term (0: off)")
    d.add_argument("--schedule-steps", type=int, default=None,
                   help="cosine horizon in steps (default: the budget's wall clock)")
    d.add_argument("--final-lr-fraction", type=float, default=0.05)
    d.add_argument("--val-pairs", type=int, default=6,
                   help="optimum-bias scan pairs at every checkpoint (0: keep the last weights)")
    d.add_argument("--val-side", type=int, default=80, help="scan crop side, voxels")


def _add_cpu_loop(f: argparse.ArgumentParser) -> None:
    """The rest of `fit`'s options: the CPU loop's targets and loss, the starting weights,
    the training data, logging and --resume (added after the device group, as always, so
    that the help lists them in the same order)."""
    f.add_argument(
        "--role-target",
        action="store_true",
        help="target LC2 with a random MR role per pair (paper) instead of the mean of both roles",
    )
    f.add_argument(
        "--cross-pairs",
        type=int,
        default=4096,
        help="supervised pairs at different positions per crop pair (0: same positions only)",
    )
    f.add_argument(
        "--cross-reach",
        type=int,
        default=4,
        help="reach of cross pairs, descriptor voxels per axis",
    )
    f.add_argument(
        "--contrast-weight",
        type=float,
        default=0.0,
        help="weight of the term fitting differences between an anchor's partners (0: off)",
    )
    f.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from these weights (exported .onnx, run folder or checkpoint)",
    )
    f.add_argument("--phantom-fraction", type=float, default=0.35)
    f.add_argument(
        "--sources",
        nargs="+",
        default=["icbm152-brain", "icbm152-head"],
        help="training volumes (missing packages are skipped)",
    )
    f.add_argument("--log-every", type=float, default=30.0, help="seconds between progress lines")
    f.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")


def _add_cache(sub: argparse._SubParsersAction) -> None:
    """`disa-train cache`: the training volumes as one float16 .npz."""
    c = sub.add_parser("cache", help="write the training volumes to a float16 .npz")
    c.add_argument("--out", required=True, type=Path)
    c.add_argument("--sources", nargs="+", default=["icbm152-brain", "icbm152-head"],
                   help="training sources to include (held-out ones are refused)")


def _add_export(sub: argparse._SubParsersAction) -> None:
    """`disa-train export`: ONNX file and model card from a run."""
    e = sub.add_parser("export", help="write ONNX + model card from a run")
    e.add_argument("--run", required=True, type=Path)
    e.add_argument("--out", type=Path, default=Path("model/weights"))
    e.add_argument("--file-name", default="disa.onnx")
    e.add_argument("--version", default=None)


def _add_quantise(sub: argparse._SubParsersAction) -> None:
    """`disa-train quantise`: the int8 OpenVINO variant of an exported model."""
    q = sub.add_parser("quantise", help="int8 variant of an exported model (OpenVINO IR)")
    q.add_argument("--onnx", type=Path, default=Path("model/weights/disa.onnx"),
                   help="exported model whose card the variant is recorded in")
    q.add_argument("--seed", type=int, default=7, help="calibration scenes")
    q.add_argument("--phantoms", type=int, default=2,
                   help="training-stream phantoms added to the training volumes")
    q.add_argument("--threads", type=int, default=2)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    """`disa-train evaluate`: held-out accuracy of a run or an exported model."""
    v = sub.add_parser("evaluate", help="held-out MSE / Pearson r against LC2")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="run folder (uses its checkpoint through torch)")
    src.add_argument("--onnx", type=Path, help="exported model (through ONNX Runtime)")
    v.add_argument(
        "--card",
        type=Path,
        default=None,
        help="model card to merge held_out_metrics into (default: the ONNX file's card)",
    )
    v.add_argument(
        "--out", type=Path, default=None, help="JSON (default: RUN/eval.json or ONNX.eval.json)"
    )
    v.add_argument("--pairs-per-scene", type=int, default=50)
    v.add_argument("--seed", type=int, default=20230)
    v.add_argument("--threads", type=int, default=None)
    v.add_argument("--engine", choices=["onnxruntime", "openvino-fp32", "openvino-int8"],
                   default="onnxruntime",
                   help="with --onnx: the runtime engine; openvino-int8 evaluates the card's "
                        "int8 variant and records the figures in its entry")


def _fit(args: argparse.Namespace) -> int:
    from disa.training.device_loop import DeviceUnavailable, resolve_device
    from disa.training.loop import TrainConfig, fit

    if args.device is not None:
        try:
            resolve_device(args.device)
        except DeviceUnavailable as exc:
            print(f"disa-train: {exc}", file=sys.stderr)
            return 2
    minutes = args.checkpoint_minutes
    if minutes is None:
        minutes = 1.0 if args.device is not None else 5.0
    cfg = TrainConfig(
        budget_minutes=args.budget,
        seed=args.seed,
        crop=args.crop,
        batch=args.batch,
        scene_reuse=args.scene_reuse,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup,
        halve_every=args.halve_every,
        max_steps=args.max_steps,
        checkpoint_minutes=minutes,
        workers=args.workers,
        threads=args.threads,
        balance=not args.no_balance,
        symmetric_target=not args.role_target,
        cross_pairs=args.cross_pairs,
        cross_reach=args.cross_reach,
        contrast_weight=args.contrast_weight,
        ema_decay=args.ema,
        init_from=str(args.init_from) if args.init_from is not None else None,
        phantom_fraction=args.phantom_fraction,
        source_ids=tuple(args.sources),
        log_every_s=args.log_every,
        volume_cache=str(args.data_cache) if args.data_cache is not None else None,
        balance_power=args.balance_power,
        device=args.device,
        amp=args.amp,
        scene_pool=args.scene_pool,
        node_offsets=args.node_offsets,
        shift_pairs=args.shift_pairs,
        shift_range=args.shift_range,
        shift_step=args.shift_step,
        shift_weight=args.shift_weight,
        gradient_weight=args.gradient_weight,
        schedule_steps=args.schedule_steps,
        final_lr_fraction=args.final_lr_fraction,
        val_pairs=args.val_pairs,
        val_side=args.val_side,
    )
    summary = fit(cfg, args.out, resume=args.resume)
    print(
        json.dumps(
            {k: summary[k] for k in ("steps", "elapsed_minutes", "stopped_by", "checkpoint")}
        )
    )
    return 0


def _cache(args: argparse.Namespace) -> int:
    from disa.training import sources
    from disa.training.volume_cache import write_volume_cache

    held_out = [s for s in args.sources
                if s not in sources.CATALOGUE or sources.CATALOGUE[s].split != "training"]
    if held_out:
        print(f"disa-train: not training sources: {', '.join(held_out)}", file=sys.stderr)
        return 2
    installed = set(sources.available_sources("training"))
    missing = [s for s in args.sources if s not in installed]
    if missing:
        print(f"disa-train: not installed: {', '.join(missing)} "
              "(bash scripts/install_training_data.sh)", file=sys.stderr)
        return 2
    summary = write_volume_cache([sources.load_volume(s) for s in args.sources], args.out)
    print(json.dumps(summary))
    return 0


def _export(args: argparse.Namespace) -> int:
    from disa.training.export import export_run

    result = export_run(args.run, args.out, args.file_name, version=args.version)
    print(json.dumps({"onnx": result["onnx"], "sha256": result["sha256"]}))
    return 0


def _quantise(args: argparse.Namespace) -> int:
    from disa.model.card import load_model_card
    from disa.training.quantise import calibration_volumes, quantise

    load_model_card(args.onnx)  # refuse weights that do not match their card, before any work
    volumes, names = calibration_volumes(args.seed, args.phantoms)
    variant = quantise(args.onnx, volumes, names, threads=args.threads)
    print(json.dumps({k: variant[k] for k in ("xml_file", "sha256_xml", "dot_error_vs_fp32")}))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from disa.training import evaluate as ev

    if args.run is not None:
        from disa.training.loop import model_from_checkpoint

        describe = ev.torch_describer(model_from_checkpoint(args.run), args.threads)
        out = args.out or args.run / "eval.json"
        card = args.card
    else:
        describe = ev.onnx_describer(args.onnx, args.threads, args.engine)
        suffix = ".int8.eval.json" if args.engine == "openvino-int8" else ".eval.json"
        out = args.out or args.onnx.with_suffix(suffix)
        card = args.card or card_path_for(args.onnx)
    cfg = ev.EvalConfig(seed=args.seed, pairs_per_scene=args.pairs_per_scene)
    result = ev.evaluate(describe, cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    ev.write_json(result, out)
    if card is not None and Path(card).is_file():
        ev.merge_into_card(card, result, int8=args.run is None and args.engine == "openvino-int8")
    print(
        json.dumps(
            {
                "pairs": result.get("pairs"),
                "mse": result.get("mse"),
                "pearson_r": result.get("pearson_r"),
                "json": str(out),
            }
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return {"fit": _fit, "cache": _cache, "export": _export, "quantise": _quantise,
            "evaluate": _evaluate}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
