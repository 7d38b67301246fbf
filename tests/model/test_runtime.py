"""Tests of the ONNX Runtime extractor: layout, tiling, providers, CPU quota."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

from disa.model import runtime  # noqa: E402
from disa.model.runtime import (  # noqa: E402
    HALO_VOXELS,
    DescriptorExtractor,
    cpu_quota,
    output_shape,
    plan_tiles,
)

SHAPE = (53, 47, 61)  # odd sizes: outputs (14, 12, 16)


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)


@pytest.fixture(scope="module")
def whole(onnx_model: Path, volume: np.ndarray) -> np.ndarray:
    extractor = DescriptorExtractor(onnx_model, device="cpu", memory_budget_bytes=1 << 40)
    assert len(extractor.plan(volume.shape)) == 1
    return extractor.extract(volume)


def test_extract_is_channels_last_contiguous_unit_ball(
    onnx_model: Path, volume: np.ndarray, whole: np.ndarray
) -> None:
    assert whole.shape == (14, 12, 16, 16) == (*output_shape(SHAPE), 16)
    assert whole.dtype == np.float32 and whole.flags.c_contiguous
    assert np.linalg.norm(whole, axis=-1).max() <= 1 + 1e-6
    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    direct = session.run(None, {"volume": volume[None, None]})[0][0]
    np.testing.assert_allclose(whole, np.moveaxis(direct, 0, -1), atol=1e-6)


def test_session_is_created_lazily_and_again_after_fork(onnx_model: Path) -> None:
    extractor = DescriptorExtractor(onnx_model, device="cpu", threads=1)
    assert extractor._session is None
    first = extractor.session
    assert extractor.session is first
    extractor._session_pid = -1  # as seen from a forked child
    assert extractor.session is not first


@pytest.mark.parametrize("tile_voxels", [130_000, 150_000])
def test_tiled_equals_whole(
    onnx_model: Path, volume: np.ndarray, whole: np.ndarray, tile_voxels: int
) -> None:
    extractor = DescriptorExtractor(onnx_model, device="cpu", tile_voxels=tile_voxels)
    tiles = extractor.plan(volume.shape)
    assert len(tiles) > 1
    # Tiles meet inside the volume (halo from real data) as well as at its
    # true borders (the net's own padding).
    assert any(t.in_start[a] > 0 for t in tiles for a in range(3))
    assert any(t.in_stop[a] < SHAPE[a] for t in tiles for a in range(3))
    np.testing.assert_allclose(extractor.extract(volume), whole, atol=1e-4, rtol=0)


def test_halo_below_receptive_field_changes_results(
    onnx_model: Path, volume: np.ndarray, whole: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The equality above is not vacuous: with half the context the receptive
    # field needs, the tile borders show.
    extractor = DescriptorExtractor(onnx_model, device="cpu")
    short = HALO_VOXELS // 2
    monkeypatch.setattr(extractor, "plan", lambda shape: plan_tiles(shape, 100_000, halo=short))
    assert len(extractor.plan(volume.shape)) > 1
    assert np.abs(extractor.extract(volume) - whole).max() > 1e-3


@pytest.mark.parametrize(
    "shape,limit",
    [((53, 47, 61), 40_000), ((256, 256, 256), 8_000_000), ((9, 300, 17), 20_000), ((5, 6, 7), 10)],
)
def test_tiles_cover_every_output_once(shape: tuple[int, int, int], limit: int) -> None:
    tiles = plan_tiles(shape, limit)
    count = np.zeros(output_shape(shape), dtype=int)
    for tile in tiles:
        count[tile.output_slices()] += 1
        assert all(a % 4 == 0 for a in tile.in_start)
        for i0, i1, o0, o1, n in zip(
            tile.in_start, tile.in_stop, tile.out_start, tile.out_stop, shape, strict=True
        ):
            assert i0 == 0 or i0 <= 4 * o0 - HALO_VOXELS
            assert i1 == n or i1 >= 4 * (o1 - 1) + HALO_VOXELS
            assert output_shape([i1 - i0])[0] >= o1 - i0 // 4
    assert (count == 1).all()


def test_unreachable_tile_limit_does_not_multiply_the_work() -> None:
    # No split of this volume fits 150k voxels (the halo bounds how small a tile can
    # be). The planner used to chase the limit down to 2,880 tiles computing 130x
    # the volume's voxels; parts are now never thinner than the halo.
    shape = (120, 72, 64)
    tiles = plan_tiles(shape, 150_000)
    computed = sum(t.input_voxels for t in tiles) / np.prod(shape)
    assert 1 < len(tiles) <= 32 and computed < 10


def test_large_volume_is_tiled_by_memory_budget() -> None:
    tiles = plan_tiles((256, 256, 256), 8_000_000)
    assert 1 < len(tiles) <= 8
    assert max(t.input_voxels for t in tiles) <= 8_000_000
    assert plan_tiles((256, 256, 256), None) == plan_tiles((256, 256, 256), 256**3)
    assert len(plan_tiles((256, 256, 256), None)) == 1


# -- providers ------------------------------------------------------------------


def test_auto_on_cpu_build_uses_cpu(onnx_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime offers CUDA")
    with caplog.at_level(logging.INFO, logger="disa.model"):
        extractor = DescriptorExtractor(onnx_model, device="auto")
        assert extractor.provider == "CPUExecutionProvider"
    assert "CPUExecutionProvider" in caplog.text


def test_cuda_required_but_not_offered_raises(
    onnx_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    extractor = DescriptorExtractor(onnx_model, device="cuda")
    with pytest.raises(RuntimeError, match="GPU required by configuration but CUDA provider"):
        extractor.extract(np.zeros((8, 8, 8), np.float32))


# The CPU-only build warns that it lacks the provider we pretend it lists.
@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")
def test_cuda_listed_but_session_falls_back_raises(
    onnx_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A GPU build whose CUDA libraries or device are missing lists the
    # provider, then quietly runs on CPU: only session.get_providers() tells.
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(
        ort.InferenceSession, "get_providers", lambda self: ["CPUExecutionProvider"]
    )
    with pytest.raises(RuntimeError, match=r"GPU required by configuration.*runs on"):
        _ = DescriptorExtractor(onnx_model, device="cuda").provider
    # "auto" accepts the fallback and says so.
    with caplog.at_level(logging.WARNING, logger="disa.model"):
        assert DescriptorExtractor(onnx_model, device="auto").provider == "CPUExecutionProvider"
    assert "fell back" in caplog.text


def test_bad_arguments(onnx_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        DescriptorExtractor(onnx_model, device="gpu")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        DescriptorExtractor(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="3-D"):
        DescriptorExtractor(onnx_model).extract(np.zeros((4, 4), np.float32))


# -- CPU quota ------------------------------------------------------------------


@pytest.mark.parametrize(
    "cpu_max,expected",
    [
        ("max 100000", 8),
        ("150000 100000", 2),
        ("50000 100000", 1),
        ("400000 100000", 4),
        ("2000000 100000", 8),
        ("garbage", 8),
    ],
)
def test_cpu_quota_cgroup_v2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_max: str, expected: int
) -> None:
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(8)))
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max + "\n")
    assert cpu_quota(path, tmp_path / "no-v1") == expected


def test_cpu_quota_cgroup_v1_and_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert cpu_quota(tmp_path / "absent", tmp_path / "absent") == 3
    (tmp_path / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(tmp_path / "absent", tmp_path) == 2
    (tmp_path / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(tmp_path / "absent", tmp_path) == 3


def test_threads_default_to_quota(onnx_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "cpu_quota", lambda: 3)
    assert DescriptorExtractor(onnx_model)._session_options().intra_op_num_threads == 3
    assert DescriptorExtractor(onnx_model, threads=1)._session_options().intra_op_num_threads == 1


def test_tiny_volume_with_tiny_tile_limit(onnx_model: Path) -> None:
    # Volumes smaller than the halo: every split degenerates to whole-volume tiles.
    x = np.random.default_rng(2).normal(size=(6, 5, 7)).astype(np.float32)
    a = DescriptorExtractor(onnx_model, device="cpu", tile_voxels=10).extract(x)
    b = DescriptorExtractor(onnx_model, device="cpu").extract(x)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a.shape == (2, 2, 2, 16)


# -- optional OpenVINO engine ----------------------------------------------------


def test_engine_arguments(onnx_model: Path) -> None:
    with pytest.raises(ValueError, match="engine must be one of"):
        DescriptorExtractor(onnx_model, engine="tensorrt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="CPU only"):
        DescriptorExtractor(onnx_model, device="cuda", engine="openvino-bf16")


def test_openvino_engine_without_package_says_what_to_install(
    onnx_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails
    extractor = DescriptorExtractor(onnx_model, engine="openvino-bf16")
    with pytest.raises(RuntimeError, match="needs the openvino package"):
        extractor.extract(np.zeros((8, 8, 8), np.float32))


@pytest.mark.parametrize("engine,atol", [("openvino-fp32", 1e-4), ("openvino-bf16", 2e-2)])
def test_openvino_engine_matches_onnxruntime(
    onnx_model: Path, volume: np.ndarray, whole: np.ndarray, engine: str, atol: float
) -> None:
    pytest.importorskip("openvino")
    extractor = DescriptorExtractor(onnx_model, engine=engine)  # type: ignore[arg-type]
    assert extractor.provider.startswith("OpenVINO-CPU")
    got = extractor.extract(volume)
    assert got.shape == whole.shape and got.flags.c_contiguous
    np.testing.assert_allclose(got, whole, atol=atol, rtol=0)


def test_openvino_compiles_each_input_shape_and_keeps_the_last_two(
    onnx_model: Path, volume: np.ndarray, whole: np.ndarray
) -> None:
    """Static shapes (a dynamic-shape first inference was 2-3 s slower at 256^3): every
    shape gets its own compile, the same numbers as ONNX Runtime, and old shapes go."""
    pytest.importorskip("openvino")
    extractor = DescriptorExtractor(onnx_model, engine="openvino-fp32",
                                    memory_budget_bytes=1 << 40)
    session = extractor.session
    small = volume[:40, :36, :44]
    np.testing.assert_allclose(extractor.extract(volume), whole, atol=1e-4, rtol=0)
    expected_small = DescriptorExtractor(onnx_model, device="cpu").extract(small)
    np.testing.assert_allclose(extractor.extract(small), expected_small, atol=1e-4, rtol=0)
    assert session.compiled_shapes() == [(1, 1, *SHAPE), (1, 1, 40, 36, 44)]
    np.testing.assert_allclose(extractor.extract(volume), whole, atol=1e-4, rtol=0)
    assert session.compiled_shapes() == [(1, 1, 40, 36, 44), (1, 1, *SHAPE)]  # reused
    extractor.extract(volume[:33, :33, :33])
    assert session.compiled_shapes() == [(1, 1, *SHAPE), (1, 1, 33, 33, 33)]


# -- engine selection ("auto") ---------------------------------------------------


def test_auto_engine_prefers_cuda_then_openvino_int8_fp32_then_onnxruntime() -> None:
    assert runtime.auto_engine(cuda_available=True, openvino_available=True,
                               int8_available=True) == "onnxruntime"
    assert runtime.auto_engine(cuda_available=False, openvino_available=True,
                               int8_available=True) == "openvino-int8"
    assert runtime.auto_engine(cuda_available=False, openvino_available=True) == "openvino-fp32"
    assert runtime.auto_engine(cuda_available=False, openvino_available=False,
                               int8_available=True) == "onnxruntime"


def test_default_engine_resolves_auto_from_what_is_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    monkeypatch.delenv("DISA_DESCRIPTOR_ENGINE", raising=False)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    has_openvino = importlib.util.find_spec("openvino") is not None
    assert runtime.default_engine() == ("openvino-fp32" if has_openvino else "onnxruntime")
    # Where onnxruntime offers CUDA, the GPU path wins over any CPU engine.
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert runtime.default_engine() == "onnxruntime"
    # Asking for the GPU asks for the one engine that runs on it.
    assert runtime.default_engine("cuda") == "onnxruntime"


def test_default_engine_explicit_setting_and_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISA_DESCRIPTOR_ENGINE", "openvino-bf16")
    assert runtime.default_engine() == "openvino-bf16"
    monkeypatch.setenv("DISA_DESCRIPTOR_ENGINE", "tensorrt")
    with pytest.raises(ValueError, match="DISA_DESCRIPTOR_ENGINE must be auto or one of"):
        runtime.default_engine()


# -- CUDA failing during a call ---------------------------------------------------


class _FailingRun:
    """An ONNX Runtime C session whose run() fails as a broken CUDA device does."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def run(self, *args: object) -> None:
        from onnxruntime.capi.onnxruntime_pybind11_state import EPFail

        raise EPFail("CUDA failure 700: an illegal memory access was encountered")

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


class _BrokenCudaSession(ort.InferenceSession):
    """A session that reports CUDA (when asked for it) and whose every run fails in CUDA.

    The CPU-only build cannot run CUDA, so the graph really runs on CPU; only
    what the extractor can observe (providers, EPFail from run) is faked.
    """

    def __init__(self, path: str, sess_options: object = None, providers: list | None = None,
                 **kwargs: object) -> None:
        names = [p[0] if isinstance(p, tuple) else p for p in providers or []]
        self.fake_cuda = "CUDAExecutionProvider" in names
        super().__init__(path, sess_options=sess_options, providers=["CPUExecutionProvider"],
                         **kwargs)
        if self.fake_cuda:
            self._sess = _FailingRun(self._sess)

    def get_providers(self) -> list[str]:
        if self.fake_cuda:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return super().get_providers()

    def set_providers(self, providers: object = None, provider_options: object = None) -> None:
        # ONNX Runtime's own run-time fallback re-creates the session here.
        self.fake_cuda = False
        super().set_providers(providers, provider_options)


@pytest.fixture()
def broken_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "InferenceSession", _BrokenCudaSession)


def test_cuda_failing_during_a_call_falls_back_to_cpu_on_auto(
    onnx_model: Path, volume: np.ndarray, whole: np.ndarray, broken_cuda: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # ONNX Runtime's own fallback re-ran the call on a CPU session with the GPU
    # run options (arena shrinkage "gpu:0") and failed with InvalidArgument.
    extractor = DescriptorExtractor(onnx_model, device="auto", tile_voxels=150_000)
    assert extractor.provider == "CUDAExecutionProvider"
    with caplog.at_level(logging.WARNING, logger="disa.model"):
        got = extractor.extract(volume)
    np.testing.assert_allclose(got, whole, atol=1e-4, rtol=0)
    assert extractor.provider == "CPUExecutionProvider"
    assert "CUDA failed" in caplog.text and "falls back to CPU" in caplog.text


def test_cuda_failing_during_a_call_raises_every_time_on_cuda(
    onnx_model: Path, broken_cuda: None
) -> None:
    # device="cuda" must never end up on CPU: ONNX Runtime's fallback used to
    # fail the first call with a confusing InvalidArgument and run every later
    # call on CPU without a word.
    from onnxruntime.capi.onnxruntime_pybind11_state import EPFail

    extractor = DescriptorExtractor(onnx_model, device="cuda")
    x = np.zeros((8, 8, 8), np.float32)
    for _ in range(2):
        with pytest.raises(EPFail, match="CUDA failure"):
            extractor.extract(x)
    assert extractor.provider == "CUDAExecutionProvider"


def test_default_engine_on_cpu_ignores_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    # `disa descriptors --device cpu` on a GPU host with OpenVINO installed ran
    # onnxruntime on CPU (2-3x slower) because onnxruntime offered CUDA.
    import importlib.util

    monkeypatch.delenv("DISA_DESCRIPTOR_ENGINE", raising=False)
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: object() if name == "openvino" else find_spec(name, *a),
    )
    assert runtime.default_engine("cpu") == "openvino-fp32"
    assert runtime.default_engine("auto") == "onnxruntime"
