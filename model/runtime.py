"""Run the exported descriptor network with ONNX Runtime (no torch).

`DescriptorExtractor` turns a z-scored volume (Z, Y, X) on the model's input
grid into descriptors (Z', Y', X', 16), channels last, with output voxel i
centred on input voxel 4i. Large volumes are cut into overlapping tiles whose
halo covers the receptive field, so tiling changes memory, not results.

The ONNX Runtime session is created lazily on first use, in the process that
uses it: Celery prefork workers fork after import, and a session (thread pools,
CUDA context) must never cross a fork.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from disa.model.card import CHANNELS, RECEPTIVE_FIELD_VOXELS, STRIDE
from disa.model.codes import clip_to_unit_ball

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "ACTIVATION_BYTES_PER_VOXEL",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "ENGINES",
    "HALO_VOXELS",
    "MIN_TILE_VOXELS",
    "DescriptorExtractor",
    "Device",
    "Engine",
    "Tile",
    "cpu_quota",
    "output_shape",
    "plan_tiles",
]

logger = logging.getLogger("disa.model")

Device = Literal["auto", "cpu", "cuda"]
Engine = Literal["onnxruntime", "openvino-fp32", "openvino-bf16", "openvino-int8"]
ENGINES: tuple[str, ...] = ("onnxruntime", "openvino-fp32", "openvino-bf16", "openvino-int8")

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

# Input voxels of context each tile needs beyond the outputs it keeps: half the
# receptive field (24 for 49), rounded up to the stride so that every tile
# starts on an input voxel 4k and its output grid is a sub-grid of the whole
# volume's. With it, tiled and whole-volume inference agree to float rounding.
HALO_VOXELS = STRIDE * math.ceil((RECEPTIVE_FIELD_VOXELS // 2) / STRIDE)

# Peak resident memory of one CPU inference per input voxel, measured with
# ONNX Runtime 1.32 (fp32, memory arena off): 127-133 B for the
# full-resolution activations of 8 and 16 channels, the replicate-padded blur
# input and im2col buffers (2.2 GB for 256^3), plus the caller's copies.
ACTIVATION_BYTES_PER_VOXEL = 160
# 3 GiB: a 256^3 volume (2.7 GB estimated) still runs in one call.
DEFAULT_MEMORY_BUDGET_BYTES = 3 << 30
# Budget-derived tiles are never smaller than this: below a core of twice the
# halo per axis, a tile computes 8x the voxels it keeps.
MIN_TILE_VOXELS = (4 * HALO_VOXELS) ** 3


def cpu_quota(
    cpu_max_path: str | Path = "/sys/fs/cgroup/cpu.max",
    cfs_dir: str | Path = "/sys/fs/cgroup/cpu",
) -> int:
    """CPUs this process may really use: affinity mask capped by the cgroup quota.

    `os.cpu_count()` reports the host's CPUs; in a container the scheduler
    affinity and the cgroup CPU quota (v2 `cpu.max` "quota period", or v1
    `cpu.cfs_quota_us`/`cpu.cfs_period_us`) are the real limit, and more ONNX
    Runtime threads than that only adds contention. Fractional quotas round up.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_v2_quota(Path(cpu_max_path))
    if quota is None:
        quota = _cgroup_v1_quota(Path(cfs_dir))
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_v2_quota(path: Path) -> float | None:
    try:
        fields = path.read_text().split()
    except OSError:
        return None
    if len(fields) < 1 or fields[0] == "max":
        return None
    try:
        quota = float(fields[0])
        period = float(fields[1]) if len(fields) > 1 else 100_000.0
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _cgroup_v1_quota(cfs_dir: Path) -> float | None:
    try:
        quota = float((cfs_dir / "cpu.cfs_quota_us").read_text())
        period = float((cfs_dir / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def output_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Descriptor grid size for an input grid: ceil(ceil(n / 2) / 2) per axis."""
    return tuple(((int(n) + 1) // 2 + 1) // 2 for n in shape)


@dataclass(frozen=True)
class Tile:
    """One inference call: input box [in_start, in_stop) and kept output box [out_start, out_stop).

    All boxes are (z, y, x) voxel index ranges; `in_start` is a multiple of
    the stride, so output voxel o of the whole volume is voxel o - in_start/4
    of the tile's output.
    """

    in_start: tuple[int, int, int]
    in_stop: tuple[int, int, int]
    out_start: tuple[int, int, int]
    out_stop: tuple[int, int, int]

    @property
    def input_voxels(self) -> int:
        return math.prod(b - a for a, b in zip(self.in_start, self.in_stop, strict=True))

    def input_slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.in_start, self.in_stop, strict=True))

    def output_slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.out_start, self.out_stop, strict=True))

    def crop_slices(self) -> tuple[slice, slice, slice]:
        """Where the kept outputs lie in this tile's own output grid."""
        return tuple(
            slice(o0 - i0 // STRIDE, o1 - i0 // STRIDE)
            for i0, o0, o1 in zip(self.in_start, self.out_start, self.out_stop, strict=True)
        )


def _axis_ranges(n: int, parts: int, halo: int) -> list[tuple[int, int, int, int]]:
    """Split one axis of n input voxels into `parts` tiles: (in0, in1, out0, out1)."""
    n_out = output_shape([n])[0]
    bounds = [round(k * n_out / parts) for k in range(parts + 1)]
    ranges = []
    for o0, o1 in itertools.pairwise(bounds):
        # Output o is centred on input 4o and sees inputs 4o +- 24, so the
        # halo (a multiple of 4, >= 24) on both sides keeps every kept output
        # exact; at the true border the tile ends where the volume ends, so
        # the network's own zero/replicate padding is reproduced.
        ranges.append((max(0, STRIDE * o0 - halo), min(n, STRIDE * o1 + halo), o0, o1))
    return ranges


def plan_tiles(
    shape: Sequence[int], max_tile_voxels: int | None, halo: int = HALO_VOXELS
) -> list[Tile]:
    """Cover a volume with the fewest computed voxels such that each tile fits the limit.

    `max_tile_voxels=None` (or a volume within the limit) gives one tile. The
    search tries every split count per axis up to the number of output voxels
    and keeps the one with the least total input (halo overhead), preferring
    splits of the slow z axis (contiguous slabs) on ties.
    """
    if len(shape) != 3:
        raise ValueError(f"expected a 3-D shape (z, y, x), got {tuple(shape)}")
    # A halo below HALO_VOXELS is allowed (tests show what it breaks), but
    # it must keep tiles on the stride grid.
    if halo % STRIDE or halo < 0:
        raise ValueError(f"halo must be a non-negative multiple of {STRIDE}, got {halo}")
    n_out = output_shape(shape)
    if max_tile_voxels is None or math.prod(shape) <= max_tile_voxels:
        splits = (1, 1, 1)
    else:
        splits = _best_splits(tuple(int(n) for n in shape), n_out, max_tile_voxels, halo)
    axes = [_axis_ranges(n, k, halo) for n, k in zip(shape, splits, strict=True)]
    tiles = []
    for rz in axes[0]:
        for ry in axes[1]:
            for rx in axes[2]:
                r = (rz, ry, rx)
                tiles.append(
                    Tile(
                        in_start=tuple(a[0] for a in r),
                        in_stop=tuple(a[1] for a in r),
                        out_start=tuple(a[2] for a in r),
                        out_stop=tuple(a[3] for a in r),
                    )
                )
    return tiles


def _best_splits(
    shape: tuple[int, ...], n_out: tuple[int, ...], max_tile_voxels: int, halo: int
) -> tuple[int, int, int]:
    # Up to 16 parts per axis, and no part whose kept core is thinner than the
    # halo: beyond that the halo (2 x 28 voxels per tile and axis) dwarfs the core
    # and a limit that still does not fit is unreachable anyway. (Without the
    # second bound an unreachable limit split a 120x72x64 volume into 2,880
    # tiles that computed 130x its voxels.)
    min_core = max(1, halo // STRIDE)
    candidates = [range(1, max(1, min(m // min_core, 16)) + 1) for m in n_out]
    extents = {
        (ax, k): [b - a for a, b, _, _ in _axis_ranges(shape[ax], k, halo)]
        for ax in range(3)
        for k in candidates[ax]
    }
    best_key: tuple[int, ...] | None = None
    best = (1, 1, 1)
    for kz in candidates[0]:
        for ky in candidates[1]:
            for kx in candidates[2]:
                ez, ey, ex = extents[0, kz], extents[1, ky], extents[2, kx]
                largest = max(ez) * max(ey) * max(ex)
                total = sum(ez) * sum(ey) * sum(ex)
                # Feasible splits by least computed voxels, then fewest tiles,
                # then fewest x and y splits (z slabs are contiguous copies);
                # if none fits (the halo bounds how small a tile can be), the
                # one with the smallest largest tile.
                key = (max(0, largest - max_tile_voxels), total, kz * ky * kx, kx, ky)
                if best_key is None or key < best_key:
                    best_key, best = key, (kz, ky, kx)
    return best


def auto_engine(cuda_available: bool, openvino_available: bool,
                int8_available: bool = False) -> Engine:
    """The engine "auto" resolves to: onnxruntime where it can run on CUDA (the GPU
    path); else, where OpenVINO is installed, its int8 variant of the network when the
    model card names one (about 2x fp32 on AVX2 cores, held-out error unchanged:
    benchmarks/README.md), else OpenVINO fp32 (2-3x faster than onnxruntime on CPU for
    registration-sized volumes, same fp32 numbers); else onnxruntime on CPU. bf16 is
    never chosen automatically: it needs AVX512_BF16/AMX and was not evaluated held out."""
    if cuda_available:
        return "onnxruntime"
    if openvino_available:
        return "openvino-int8" if int8_available else "openvino-fp32"
    return "onnxruntime"


def default_engine(device: Device = "auto", model_path: str | Path | None = None) -> Engine:
    """The descriptor engine from DISA_DESCRIPTOR_ENGINE (deployment setting, default
    ``auto``: see `auto_engine`; ``model_path``, the ONNX file, tells whether its card
    names an int8 variant). ``auto`` with ``device="cuda"`` is onnxruntime, the one
    engine that runs on CUDA (and fails loudly without it); with ``device="cpu"`` it
    is the CPU choice even where onnxruntime offers CUDA."""
    from disa.core.environment import Environment

    value = (Environment.read().descriptor_engine or "").strip() or "auto"
    if value == "auto" and device == "cuda":
        return "onnxruntime"
    if value == "auto":
        import importlib.util

        import onnxruntime as ort

        from disa.model.card import int8_model_path

        int8 = model_path is not None and int8_model_path(model_path, verify=False) is not None
        # device="cpu" will not use CUDA even where onnxruntime offers it: the
        # CPU choice (OpenVINO when installed) applies.
        cuda = device != "cpu" and CUDA_PROVIDER in ort.get_available_providers()
        return auto_engine(cuda, importlib.util.find_spec("openvino") is not None, int8)
    if value not in ENGINES:
        raise ValueError(f"DISA_DESCRIPTOR_ENGINE must be auto or one of {', '.join(ENGINES)}, "
                         f"got {value!r}")
    return value  # type: ignore[return-value]


class DescriptorExtractor:
    """Descriptors of whole volumes from an ONNX descriptor network.

    Parameters
    ----------
    onnx_path:
        The exported network (input `volume` (N, 1, Z, Y, X), output (N, 16, Z', Y', X')).
    device:
        "cpu", "cuda" (fail loudly unless CUDA really runs the graph, also when
        CUDA fails during a call) or "auto" (CUDA when the installed onnxruntime
        offers it, else CPU; a CUDA failure during a call moves the extractor
        to CPU for good, with a warning).
    threads:
        ONNX Runtime intra-op threads on CPU; default `cpu_quota()`.
    tile_voxels:
        Largest tile in input voxels. Default: derived from `memory_budget_bytes`.
    memory_budget_bytes:
        Peak activation memory allowed for one inference call; volumes whose
        estimate exceeds it are tiled automatically.
    engine:
        "onnxruntime" (default; CPU or CUDA), or OpenVINO on CPU (optional
        `openvino` package): "openvino-fp32", "openvino-bf16" or "openvino-int8"
        (the quantised variant named by the model card). On 2 AVX-512 cores a
        256^3 volume takes about 7.3 s with onnxruntime, 3.7 s with
        openvino-fp32 and 2.0 s with openvino-bf16, whose dot-product error
        (RMS 0.0007) is a fifth of the int8 codes' (0.0032); on 2 AVX2 cores
        openvino-fp32 takes 2.8-4.0 s and openvino-int8 2.3-3.7 s (warm / first
        call; dot-product error RMS 0.008-0.012 against fp32); see
        benchmarks/descriptor_speed.py. bf16 needs AVX512_BF16 or AMX, else
        OpenVINO runs fp32. Tiled and whole-volume results agree to 1e-4 in
        fp32 and int8 (static quantisation scales), not in bf16.
    """

    def __init__(
        self,
        onnx_path: str | Path,
        device: Device = "auto",
        threads: int | None = None,
        tile_voxels: int | None = None,
        memory_budget_bytes: int | None = None,
        engine: Engine = "onnxruntime",
    ) -> None:
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        if engine != "onnxruntime" and device == "cuda":
            raise ValueError(f"engine {engine!r} runs on CPU only; use onnxruntime for CUDA")
        self.engine: Engine = engine
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise FileNotFoundError(f"descriptor model {self.onnx_path} does not exist")
        self.device: Device = device
        self.threads = threads
        budget = (
            memory_budget_bytes if memory_budget_bytes is not None else DEFAULT_MEMORY_BUDGET_BYTES
        )
        # An explicit tile size is honoured as given (tests force tiny tiles);
        # one derived from the budget is floored, trading memory for sanity.
        self.tile_voxels = (
            tile_voxels
            if tile_voxels is not None
            else max(MIN_TILE_VOXELS, budget // ACTIVATION_BYTES_PER_VOXEL)
        )
        self._session: ort.InferenceSession | None = None
        self._session_pid: int | None = None
        self._input_name = "volume"
        self._lock = threading.Lock()
        self._lock_pid = os.getpid()

    # -- session ---------------------------------------------------------------

    @property
    def session(self) -> ort.InferenceSession:
        """The ONNX Runtime session, created on first use in this process."""
        pid = os.getpid()
        if self._session is None or self._session_pid != pid:
            if self._lock_pid != pid:
                # A lock copied by fork may be held by a thread that does not
                # exist in this child.
                self._lock, self._lock_pid = threading.Lock(), pid
            with self._lock:
                if self._session is None or self._session_pid != pid:
                    self._session = self._create_session()
                    self._session_pid = pid
        return self._session

    @property
    def provider(self) -> str:
        """The execution provider that actually runs the graph (creates the session)."""
        return self.session.get_providers()[0]

    def _session_options(self) -> ort.SessionOptions:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # The graph is a chain: inter-op parallelism has nothing to overlap.
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = self.threads if self.threads is not None else cpu_quota()
        # No CPU memory arena: every call has a new volume shape, so the arena
        # only grows (power-of-two chunks: peak 265 instead of 133 B per voxel
        # at 256^3) and keeps its peak for the life of the worker, while a
        # first call at a new shape costs the same CPU time either way.
        options.enable_cpu_mem_arena = False
        options.log_severity_level = 3
        return options

    def _run_options(self) -> ort.RunOptions | None:
        if self.engine != "onnxruntime":
            return None
        import onnxruntime as ort

        options = ort.RunOptions()
        if self.provider == CUDA_PROVIDER:
            # The GPU arena stays on (cudaMalloc is slow) but gives its memory
            # back after every call instead of holding the largest volume's.
            options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "gpu:0")
        return options

    def _create_session(self, device: Device | None = None) -> ort.InferenceSession:
        """A new session; `device` overrides `self.device` (CPU after a CUDA failure).

        OpenVINO engines get `_create_openvino_session`; ONNX Runtime gets the
        providers `device` asks for among those installed, CUDA first, and the
        session is checked for running on the provider it was meant to.
        """
        device = self.device if device is None else device
        if self.engine != "onnxruntime":
            return self._create_openvino_session()  # type: ignore[return-value]

        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = _wanted_providers(device, available)
        session = ort.InferenceSession(
            str(self.onnx_path), sess_options=self._session_options(),
            providers=_provider_options(wanted),
        )
        in_use = session.get_providers()
        # A GPU build falls back to CPU silently when CUDA libraries or the
        # device are missing: only get_providers() tells.
        if device == "cuda" and (not in_use or in_use[0] != CUDA_PROVIDER):
            raise RuntimeError(
                "GPU required by configuration but CUDA provider is not available: "
                f"onnxruntime offers {available} but the session runs on {in_use} "
                "(CUDA or cuDNN libraries missing, or no usable GPU)"
            )
        self._input_name = session.get_inputs()[0].name
        _settle_cuda_fallback(session, in_use, wanted)
        logger.info(
            "descriptor model %s runs on %s (%s threads)",
            self.onnx_path.name,
            in_use[0],
            "n/a" if in_use[0] == CUDA_PROVIDER else self._session_options().intra_op_num_threads,
        )
        return session

    def _create_openvino_session(self) -> _OpenVinoSession:
        """The OpenVINO session of `self.engine` on CPU (fp32, bf16 or the int8 variant
        that the model card names), with `self.threads` or `cpu_quota()` threads."""
        threads = self.threads if self.threads is not None else cpu_quota()
        precision = self.engine.split("-")[1]
        graph = self.onnx_path
        if precision == "int8":
            from disa.model.card import int8_model_path

            int8 = int8_model_path(self.onnx_path)  # sha256 checked against the card
            if int8 is None:
                raise RuntimeError(
                    f"descriptor engine 'openvino-int8' needs the int8 variant named by "
                    f"the model card of {self.onnx_path} (run: disa-train quantise "
                    f"--onnx {self.onnx_path}), or use engine 'openvino-fp32'"
                )
            graph = int8
        session = _OpenVinoSession(graph, threads, precision)
        self._input_name = session.input_name
        logger.info(
            "descriptor model %s runs on %s (%d threads)",
            graph.name,
            session.get_providers()[0],
            threads,
        )
        return session  # same run()/get_providers() as an ONNX Runtime session

    # -- inference -------------------------------------------------------------

    def plan(self, shape: Sequence[int]) -> list[Tile]:
        """The tiles `extract` will run for a volume of this shape."""
        return plan_tiles(shape, self.tile_voxels)

    def extract(self, volume: np.ndarray) -> np.ndarray:
        """Descriptors of a z-scored volume.

        `volume`: (Z, Y, X) intensities on the model's input grid (card
        `input_spacing_mm`, isotropic), already normalised. Returns float32
        (Z', Y', X', 16), C-contiguous, channels last (registration gathers
        one 16-vector per voxel), every vector in the unit ball; output voxel
        i is centred on input voxel 4i.
        """
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise ValueError(f"expected a 3-D volume (z, y, x), got shape {volume.shape}")
        if min(volume.shape) < 1:
            raise ValueError(f"volume has an empty axis: shape {volume.shape}")
        volume = np.ascontiguousarray(volume, dtype=np.float32)
        out = np.empty((*output_shape(volume.shape), CHANNELS), dtype=np.float32)
        for tile, descriptors in self._run_tiles(volume):
            # (16, z, y, x) -> (z, y, x, 16): one copy per tile into the result.
            kept = descriptors[(slice(None), *tile.crop_slices())]
            out[tile.output_slices()] = np.moveaxis(kept, 0, -1)
        return clip_to_unit_ball(out, axis=-1)

    def _run_tiles(self, volume: np.ndarray) -> Iterator[tuple[Tile, np.ndarray]]:
        session = self.session
        run_options = self._run_options()
        for tile in self.plan(volume.shape):
            block = np.ascontiguousarray(volume[tile.input_slices()])[None, None]
            try:
                (descriptors,) = session.run(None, {self._input_name: block}, run_options)
            except Exception as err:
                if not self._cuda_failed_on_auto(session, err):
                    raise
                logger.warning(
                    "CUDA failed during descriptor inference (%s): the descriptor session "
                    "falls back to CPU",
                    err,
                )
                with self._lock:
                    self._session = self._create_session(device="cpu")
                    self._session_pid = os.getpid()
                session, run_options = self._session, self._run_options()
                (descriptors,) = session.run(None, {self._input_name: block}, run_options)
            yield tile, descriptors[0]

    def _cuda_failed_on_auto(self, session: ort.InferenceSession, err: Exception) -> bool:
        """Whether `err` is CUDA failing in a call that may go on on CPU (device "auto")."""
        if self.device != "auto" or session.get_providers()[0] != CUDA_PROVIDER:
            return False
        from onnxruntime.capi.onnxruntime_pybind11_state import EPFail

        return isinstance(err, EPFail)


def _wanted_providers(device: Device, available: list[str]) -> list[str]:
    """The ONNX Runtime providers to ask for, in order of preference: CPU alone for
    "cpu"; else CUDA (when `available`, the installed build's providers) then CPU.
    Raises RuntimeError when `device` is "cuda" and the build offers no CUDA."""
    if device == "cpu":
        return [CPU_PROVIDER]
    if device == "cuda" and CUDA_PROVIDER not in available:
        raise RuntimeError(
            "GPU required by configuration but CUDA provider is not available: "
            f"onnxruntime offers {available} (install onnxruntime-gpu, not "
            "onnxruntime, and check the CUDA/cuDNN libraries and the device)"
        )
    return [p for p in (CUDA_PROVIDER, CPU_PROVIDER) if p in available]


def _provider_options(wanted: list[str]) -> list[str | tuple[str, dict[str, str]]]:
    """`wanted` as InferenceSession's `providers` argument: CUDA with its options."""
    return [
        # Every volume has its own shape: an exhaustive cuDNN search per
        # shape would cost more than the inference it tunes.
        (
            CUDA_PROVIDER,
            {
                "cudnn_conv_algo_search": "HEURISTIC",
                "arena_extend_strategy": "kSameAsRequested",
            },
        )
        if p == CUDA_PROVIDER
        else p
        for p in wanted
    ]


def _settle_cuda_fallback(session: ort.InferenceSession, in_use: list[str],
                          wanted: list[str]) -> None:
    """Turn off ONNX Runtime's own CPU fallback of a session on CUDA (`in_use`, its
    providers), and warn when CUDA was `wanted` but the session fell back at creation."""
    if in_use[0] == CUDA_PROVIDER:
        # ONNX Runtime's own fallback, on a CUDA error during run(), swaps
        # in a CPU session (said on stdout only) and retries with our GPU
        # run options, which then fail ("gpu:0" arena); with device="cuda"
        # every later call would run on CPU. `_run_tiles` handles it.
        session.disable_fallback()
    if CUDA_PROVIDER in wanted and in_use[0] != CUDA_PROVIDER:
        logger.warning(
            "onnxruntime offers CUDA but the descriptor session fell back to %s "
            "(CUDA or cuDNN libraries missing, or no usable GPU)",
            in_use[0],
        )


class _OpenVinoSession:
    """The part of an ONNX Runtime session the extractor uses, run by OpenVINO on CPU.

    OpenVINO's CPU plugin has JIT 3-D convolutions and, on AVX512_BF16/AMX
    cores, bf16 arithmetic; fp32 and bf16 run the ONNX file, int8 the quantised
    OpenVINO IR made from it (`disa-train quantise`), whose integer convolutions
    run whatever the precision hint says.

    The network is compiled for each input shape it meets (static shapes), the last
    `KEEP_SHAPES` kept. Why: compiled with its dynamic input, the first inference at a
    new shape built that shape's kernels and buffers and took 4.5-5.9 s at 256^3
    (1.8-1.9 s warm); compiled for the static shape, 0.12-0.14 s of compilation and a
    first inference of 2.3 s (benchmarks/README.md, "Cold `disa descriptors`").
    """

    #: Compiled shapes kept: a registration describes two images, the fixed and moving.
    KEEP_SHAPES = 2

    def __init__(self, graph_path: Path, threads: int, precision: str) -> None:
        try:
            import openvino as ov
        except ImportError as err:
            raise RuntimeError(
                f"descriptor engine 'openvino-{precision}' needs the openvino package "
                "(pip install openvino), or use engine 'onnxruntime'"
            ) from err
        core = ov.Core()
        hint = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}[precision]
        if precision == "bf16":
            capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            if "BF16" not in capabilities:
                logger.warning("this CPU has no native bf16 (%s): OpenVINO runs fp32", capabilities)
                precision, hint = "fp32", "f32"
        self._core = core
        self._config = {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": hint,
        }
        self._model = core.read_model(str(graph_path))
        self.input_name = self._model.inputs[0].get_any_name()
        self._by_shape: dict[tuple[int, ...], object] = {}  # insertion order = use order
        self._lock = threading.Lock()
        self._provider = f"OpenVINO-CPU-{precision}"

    def get_providers(self) -> list[str]:
        return [self._provider]

    def compiled_shapes(self) -> list[tuple[int, ...]]:
        """The input shapes compiled and kept, least recently used first."""
        return list(self._by_shape)

    def _compiled_for(self, shape: tuple[int, ...]):  # -> openvino.CompiledModel
        with self._lock:
            compiled = self._by_shape.pop(shape, None)
            if compiled is None:
                # reshape() changes the read model in place; it is only a template here.
                self._model.reshape({self.input_name: list(shape)})
                compiled = self._core.compile_model(self._model, "CPU", self._config)
                while len(self._by_shape) >= self.KEEP_SHAPES:
                    self._by_shape.pop(next(iter(self._by_shape)))
            self._by_shape[shape] = compiled
            return compiled

    def run(
        self, output_names: object, feeds: dict[str, np.ndarray], run_options: object = None
    ) -> list[np.ndarray]:
        (volume,) = feeds.values()
        compiled = self._compiled_for(tuple(int(n) for n in volume.shape))
        # share_outputs=False: the result must outlive the next call.
        result = compiled(volume, share_outputs=False)
        return [np.asarray(result[compiled.outputs[0]], dtype=np.float32)]
