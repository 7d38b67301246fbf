"""Speed and memory of descriptor extraction: eager PyTorch vs ONNX Runtime vs ours.

Each variant runs in its own subprocess, so that its peak resident memory
(VmHWM) is its own, and reports wall and CPU seconds of one inference on a
random z-scored volume of size N^3 after a small warm-up call, the wall
seconds of a second call at that size (warm: a serving worker's steady
state, buffers already allocated), the peak RSS, and the
error of its descriptors against eager PyTorch (max |difference| per
component and max |difference| of dot products with the volume's mean descriptor).

    python benchmarks/descriptor_speed.py --sizes 128 256 --threads 2

Variants: torch (eager, torch.set_num_threads), ort-default (an untouched
InferenceSession), extractor (disa.model.runtime.DescriptorExtractor, tuned,
tiled by its default memory budget), extractor-whole (the same, never tiled),
openvino-fp32 / openvino-bf16 / openvino-int8 (the extractor with
engine="openvino-..."; only where `openvino` and disa import in
--openvino-python, default this interpreter; bf16 needs AVX512_BF16 or AMX;
int8 runs the variant the model's card names, which for the default random net
this script makes with `disa-train quantise`'s code on smooth random volumes).
The model is a seeded random DisaNet unless --model names an exported ONNX
file; speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = (
    "torch",
    "ort-default",
    "extractor",
    "extractor-whole",
    "openvino-fp32",
    "openvino-bf16",
    "openvino-int8",
)


def _volume(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, n, n)).astype(np.float32)


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (s)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (MB).

    VmHWM belongs to the process image; ru_maxrss survives execve and would
    report the parent's peak at fork time (with torch loaded) for small runs.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _worker(variant: str, n: int, model: Path, threads: int, out: Path) -> dict[str, float | str]:
    """Run one variant once (after a 32^3 warm-up) and save its (Z', Y', X', 16) output."""
    volume = _volume(n)
    small = volume[:32, :32, :32]
    if variant == "torch":
        import torch

        from disa.training.network import DisaNet

        torch.set_num_threads(threads)
        net = DisaNet().eval()
        net.load_state_dict(torch.load(model.with_suffix(".pt"), weights_only=True))

        def run(v: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                y = net(torch.from_numpy(v)[None, None])[0].numpy()
            return np.moveaxis(y, 0, -1)

    elif variant == "ort-default":
        import onnxruntime as ort

        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])

        def run(v: np.ndarray) -> np.ndarray:
            return np.moveaxis(session.run(None, {"volume": v[None, None]})[0][0], 0, -1)

    elif variant.startswith("extractor"):
        from disa.model.runtime import DescriptorExtractor

        # "extractor" tiles by the default memory budget; "-whole" never tiles.
        budget = 1 << 50 if variant == "extractor-whole" else None
        extractor = DescriptorExtractor(
            model, device="cpu", threads=threads, memory_budget_bytes=budget
        )
        run = extractor.extract
    elif variant.startswith("openvino-"):
        from disa.model.runtime import DescriptorExtractor

        extractor = DescriptorExtractor(model, device="cpu", threads=threads, engine=variant)
        run = extractor.extract
    else:
        raise ValueError(f"unknown variant {variant}")
    run(small)
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    descriptors = run(volume)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    peak = _peak_rss_mb()
    # A second call at the same size: a worker's steady state, whose buffers are
    # already allocated (the first call at a new largest size pays for the page
    # faults of every activation buffer: ~1.7 s of 3.9 s at 256^3 with OpenVINO).
    start = time.perf_counter()
    run(volume)
    warm = time.perf_counter() - start
    np.save(out, np.ascontiguousarray(descriptors, dtype=np.float32))
    return {
        "variant": variant,
        "n": n,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "warm_seconds": warm,
        "peak_rss_mb": peak,
    }


def _export(folder: Path, int8: bool) -> Path:
    """Seeded random net as ONNX (and its state dict for the eager variant); with ``int8``
    also its card and int8 variant, calibrated on smooth random volumes."""
    import torch

    from disa.training.network import DisaNet
    from disa.training.onnx_export import export_onnx, write_model_card

    torch.manual_seed(0)
    net = DisaNet().eval()
    path = folder / "disa.onnx"
    export_onnx(net, path)
    torch.save(net.state_dict(), path.with_suffix(".pt"))
    if int8:
        from scipy import ndimage

        from disa.training.quantise import quantise

        write_model_card(path, name="disa-bench", version="random", training={},
                         held_out_metrics={}, net=net)
        rng = np.random.default_rng(0)
        volumes = [ndimage.gaussian_filter(rng.normal(size=(64,) * 3), 2.0) for _ in range(3)]
        quantise(path, [((v - v.mean()) / v.std()).astype(np.float32) for v in volumes])
    return path


def _errors(result: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    probe = reference.reshape(-1, reference.shape[-1]).mean(axis=0)
    probe /= max(float(np.linalg.norm(probe)), 1e-12)
    dots = np.abs(result @ probe - reference @ probe)
    return float(np.abs(result - reference).max()), float(dots.max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS[:3]), choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--model",
        type=Path,
        help="exported ONNX (with a .pt state dict beside "
        "it for the torch variant); default: a seeded random net",
    )
    parser.add_argument(
        "--openvino-python", default=sys.executable, help="interpreter that has openvino installed"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(_worker(args.worker, args.sizes[0], args.model, args.threads, args.out)))
        return 0

    with tempfile.TemporaryDirectory(prefix="disa-bench-") as tmp:
        folder = Path(tmp)
        model = args.model or _export(folder, "openvino-int8" in args.variants)
        print(f"threads={args.threads} cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f}")
        # On a shared machine wall time swings with the neighbours' load; CPU
        # seconds / threads is what the variant would take on idle cores.
        print(
            f"{'size':>5} {'variant':<16} {'wall s':>7} {'cpu/thr s':>9} {'vs torch':>9} "
            f"{'warm s':>7} {'peak MB':>8} {'max|d|':>9} {'max|dot|':>9}"
        )
        for n in args.sizes:
            reference: np.ndarray | None = None
            torch_seconds: float | None = None
            for variant in args.variants:
                out = folder / f"{variant}-{n}.npy"
                python = args.openvino_python if variant.startswith("openvino") else sys.executable
                cmd = [
                    python,
                    __file__,
                    "--worker",
                    variant,
                    "--sizes",
                    str(n),
                    "--model",
                    str(model),
                    "--threads",
                    str(args.threads),
                    "--out",
                    str(out),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                    print(f"{n:>5} {variant:<16} skipped: {reason}")
                    continue
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                descriptors = np.load(out)
                if reference is None:
                    reference = descriptors
                per_thread = result["cpu_seconds"] / args.threads
                if variant == "torch":
                    torch_seconds = per_thread
                err, dot_err = _errors(descriptors, reference)
                ratio = f"{torch_seconds / per_thread:.2f}x" if torch_seconds else "-"
                print(
                    f"{n:>5} {variant:<16} {result['seconds']:7.2f} {per_thread:9.2f} {ratio:>9} "
                    f"{result['warm_seconds']:7.2f} {result['peak_rss_mb']:8.0f} {err:9.1e} "
                    f"{dot_err:9.1e}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
