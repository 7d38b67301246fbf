"""Packaging: the extras install what the images they feed can run."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]

#: CUDA major the onnxruntime-gpu wheels on PyPI are built for, by release (one
#: representative per line): 1.17-1.18 CUDA 11.8, 1.19-1.26 CUDA 12 (cuDNN 9),
#: 1.27 on CUDA 13 (their metadata's `cuda` extra names nvidia-cuda-runtime ~=13.0).
ORT_GPU_CUDA_MAJOR = {"1.17.1": 11, "1.18.1": 11, "1.19.0": 12, "1.22.0": 12, "1.26.0": 12,
                      "1.27.0": 13, "1.29.0": 13, "1.31.1": 13, "1.40.0": 13}


def _extra(name: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(r) for r in project["optional-dependencies"][name]]


def test_gpu_extra_only_admits_onnxruntime_gpu_for_the_images_cuda():
    """A wheel built for another CUDA major than the worker-gpu image finds no libcudart:
    the worker then runs every job on the CPU, with nothing failing."""
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text(encoding="utf-8")
    image = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.", dockerfile, re.MULTILINE)
    assert image, "docker/Dockerfile names no nvidia/cuda CUDA_IMAGE"
    cuda = int(image.group(1))
    (ort,) = [r for r in _extra("gpu") if r.name == "onnxruntime-gpu"]
    admitted = [v for v in ORT_GPU_CUDA_MAJOR if ort.specifier.contains(v)]
    assert admitted, f"{ort} admits no known onnxruntime-gpu release"
    wrong = [v for v in admitted if ORT_GPU_CUDA_MAJOR[v] != cuda]
    assert not wrong, f"{ort} admits {wrong}, not built for CUDA {cuda} (the image's)"


def test_runtime_extras_never_pull_torch():
    """torch (GBs with CUDA) belongs to the train extra only."""
    for extra in ("cpu", "gpu", "openvino"):
        assert not [r for r in _extra(extra) if r.name == "torch"], extra
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not [r for r in project["dependencies"] if Requirement(r).name == "torch"]


def _stages(dockerfile: str) -> dict[str, list[str]]:
    """Instructions (continuation lines joined) of each named stage of a Dockerfile."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in re.sub(r"\\\n\s*", " ", dockerfile).splitlines():
        line = line.strip()
        named = re.match(r"FROM \S+ AS (\S+)", line)
        if named:
            current = stages.setdefault(named.group(1), [])
        elif line and not line.startswith("#"):
            current.append(line)
    return stages


def test_every_image_that_registers_ships_a_warmed_kernel_cache():
    """`disa warm-up` after the last install, as the user that runs the jobs: run before
    the install it compiles nothing that ships, run as root the cache would be root's."""
    stages = _stages((ROOT / "docker" / "Dockerfile").read_text(encoding="utf-8"))
    for target in ("api", "worker-cpu", "worker-gpu"):
        lines = stages[target]
        warm = [i for i, line in enumerate(lines) if line == "RUN disa warm-up"]
        assert warm, f"{target} does not run `disa warm-up`"
        installs = [i for i, line in enumerate(lines) if "pip install" in line]
        users = [i for i, line in enumerate(lines) if line.startswith("USER ")]
        assert installs and warm[0] > installs[-1], target
        assert users and users[-1] < warm[0] and lines[users[-1]] == "USER disa", target
