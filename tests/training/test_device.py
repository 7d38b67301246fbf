"""The device loop: torch targets against the numba kernel, the same crops as the CPU
pipeline, shift-difference terms, exact resume, CUDA refusal, the volume cache and the
GPU script on a machine without SimpleITK or pydantic (all on the CPU, tiny sizes)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.nn import functional as F

from disa.training import data, device_loop, loop, pairs, scan, sources
from disa.training import device as dv
from disa.training.cli import main as cli_main
from disa.training.pair_lc2 import pair_lc2
from disa.training.volume_cache import read_volume_cache, write_volume_cache

ROOT = Path(__file__).resolve().parents[2]
CFG = pairs.PairConfig(crop=24)


def _fields(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two related smooth random crops (2 each): LC2 spans much of [0, 1]."""
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.normal(size=(2, n, n, n)), (0, 2, 2, 2))
    a = (a / a.std()).astype(np.float32)
    noise = ndimage.gaussian_filter(rng.normal(size=(2, n, n, n)), (0, 1, 1, 1))
    b = np.cos(1.3 * a) + 0.5 * noise / noise.std()
    return a, b.astype(np.float32)


def _centres(nodes: dv.NodeRange, cfg: pairs.PairConfig) -> np.ndarray:
    axes = [np.arange(lo, hi) for lo, hi in zip(nodes.lo, nodes.hi, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij")
    return cfg.margin + pairs.STRIDE * np.stack([g.ravel() for g in grid], axis=1)


@pytest.mark.parametrize("offset", [(0, 0, 0), (4, -8, 12), (1, -2, 3), (-5, 0, 7)])
def test_torch_targets_match_the_pair_kernel(offset: tuple[int, int, int]) -> None:
    fixed, moving = _fields(0, CFG.side)
    targets = dv.LC2Targets(dv.prepare(torch.from_numpy(fixed[:, None]),
                                       torch.from_numpy(moving[:, None])), CFG)
    nodes = dv.node_range(offset, CFG.out_side)
    assert nodes is not None
    got = targets(offset, nodes).numpy()
    centres = _centres(nodes, CFG)
    for b in range(2):
        ref = pair_lc2(fixed[b], moving[b], centres, centres + np.array(offset), CFG.radii)
        expected = ref.mean(axis=1).reshape(got.shape[1:])
        assert expected.std() > 0.02  # targets that vary: a test of something
        np.testing.assert_allclose(got[b], expected, atol=1e-5)


def test_node_ranges_keep_partners_inside() -> None:
    k = CFG.out_side
    assert dv.node_range((0, 0, 0), k) == dv.NodeRange((0, 0, 0), (k, k, k))
    # +5 voxels: moving point 4i + 5 lies between nodes i + 1 and i + 2.
    assert dv.node_range((5, -4, 0), k) == dv.NodeRange((0, 1, 0), (k - 2, k, k))
    assert dv.node_range((4 * k, 0, 0), k) is None
    with pytest.raises(ValueError, match="outside the padded crop"):
        dv.lc2_map(dv.prepare(torch.zeros(1, 1, CFG.side, CFG.side, CFG.side),
                              torch.zeros(1, 1, CFG.side, CFG.side, CFG.side)),
                   (4 * k + 4, 0, 0), dv.NodeRange((0, 0, 0), (1, 1, 1)), CFG)


def test_device_crops_and_targets_equal_the_cpu_loops(phantom: sources.Volume) -> None:
    """With a pool of one scene, step t's crop pairs are the CPU loop's batch t."""
    cfg = loop.TrainConfig(crop=16, batch=2, scene_reuse=2, source_ids=(),
                           phantom_fraction=1.0, phantom_shape=(40, 40, 40), cross_pairs=0,
                           device="cpu")
    data_cfg = cfg.data_config()
    for step in (0, 3):
        scene = data.make_training_scene(step // cfg.scene_reuse, cfg.seed, data_cfg, [])
        batch = data.make_batch(step, cfg.seed, data_cfg, [], scene)
        pool = [device_loop.DeviceScene(0, torch.from_numpy(np.stack(scene.images))[:, None],
                                        scene.focus, scene.border_mode == "mirror")]
        draws, _ = device_loop.step_draws(cfg, step, pool)
        fixed, moving = device_loop.make_crops(pool, draws, data_cfg.pairs.side)
        inner = slice(data_cfg.pairs.margin, data_cfg.pairs.margin + data_cfg.pairs.crop)
        np.testing.assert_allclose(fixed[:, :, inner, inner, inner], batch["fixed"], atol=2e-4)
        np.testing.assert_allclose(moving[:, :, inner, inner, inner], batch["moving"],
                                   atol=2e-4)
        k = data_cfg.pairs.out_side
        target = dv.lc2_map(dv.prepare(fixed, moving), (0, 0, 0),
                            dv.NodeRange((0, 0, 0), (k, k, k)), data_cfg.pairs)
        np.testing.assert_allclose(target, batch["target"], atol=2e-3)


def test_shift_difference_targets_on_a_translated_copy() -> None:
    """Moving = fixed translated by v: LC2 is ~1 at offset -v and falls for s + d away."""
    rng = np.random.default_rng(4)
    big = ndimage.gaussian_filter(rng.normal(size=(CFG.side + 8,) * 3), 1.5)
    big = (big / big.std()).astype(np.float32)
    v = np.array([1, -2, 3])
    a = 4
    fixed = big[a:a + CFG.side, a:a + CFG.side, a:a + CFG.side]
    lo = a + v
    moving = big[lo[0]:lo[0] + CFG.side, lo[1]:lo[1] + CFG.side, lo[2]:lo[2] + CFG.side]
    # Moving voxel y shows fixed voxel y + v: fixed centre c matches moving c - v.
    targets = dv.LC2Targets(dv.prepare(torch.from_numpy(fixed)[None, None],
                                       torch.from_numpy(moving)[None, None]), CFG)
    s, s2 = tuple(-v), tuple(-v + np.array([0, 2, 0]))
    k = CFG.out_side
    nodes = dv.node_range(s, k).intersect(dv.node_range(s2, k))  # type: ignore[union-attr]
    assert nodes is not None
    at_truth, away = targets(s, nodes)[0].numpy(), targets(s2, nodes)[0].numpy()
    assert at_truth.min() > 0.99  # identical patches: LC2 1 up to the ridge
    change = away - at_truth
    assert change.max() < 0 and change.mean() < -0.1
    centres = _centres(nodes, CFG)
    ref = pair_lc2(fixed, moving, centres, centres + np.array(s2), CFG.radii).mean(1)
    np.testing.assert_allclose(away.ravel(), ref, atol=1e-5)


def test_moving_descriptors_between_nodes_are_trilinear() -> None:
    d = torch.randn(2, 3, 6, 6, 6)
    offset = (5, -3, 2)
    nodes = dv.node_range(offset, 6)
    assert nodes is not None
    got = dv.moving_at_offset(d, offset, nodes)
    axes = [torch.arange(lo, hi, dtype=torch.float32) + o / 4
            for lo, hi, o in zip(nodes.lo, nodes.hi, offset, strict=True)]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack([xx, yy, zz], dim=-1) / 5 * 2 - 1
    expected = F.grid_sample(d, grid[None].expand(2, -1, -1, -1, -1), align_corners=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_node_weights_are_the_registration_weights() -> None:
    from disa.core.preprocess import local_std

    fixed, _ = _fields(2, CFG.side)
    fixed[0, :, :, : CFG.side // 2] = 0.3  # a flat half carries no weight
    w = dv.node_weights(torch.from_numpy(fixed[:, None]), CFG).numpy()
    centres = pairs.descriptor_centres(CFG)
    for b in range(2):
        std = local_std(fixed[b], dv.WEIGHT_RADIUS)[tuple(centres.T)]
        std = np.where(std > dv.WEIGHT_FLOOR * std.max(), std, 0.0)
        np.testing.assert_allclose(w[b].ravel(), std, atol=1e-4)
    assert (w[0][:, :, :2] == 0).all() and (w[0][:, :, -2:] > 0).any()


def test_step_loss_terms_are_the_documented_differences() -> None:
    cfg = loop.TrainConfig(crop=24, device="cpu", balance=False, shift_weight=2.0,
                           gradient_weight=3.0)
    fixed_np, moving_np = _fields(5, CFG.side)
    fixed, moving = torch.from_numpy(fixed_np[:, None]), torch.from_numpy(moving_np[:, None])
    k = CFG.out_side
    d_f = F.normalize(torch.randn(2, 16, k, k, k), dim=1) * 0.8
    d_m = F.normalize(torch.randn(2, 16, k, k, k), dim=1) * 0.8
    offsets = dv.StepOffsets(node=((4, 0, -4),), shift=(((1, 0, 2), (1, 2, 2)),))
    loss, figures = device_loop.step_loss(d_f, d_m, fixed, moving, offsets, cfg, None)
    targets = dv.LC2Targets(dv.prepare(fixed, moving), CFG)
    full = dv.NodeRange((0, 0, 0), (k, k, k))
    cross = dv.node_range((4, 0, -4), k)
    dense_pred = torch.cat([(d_f * d_m).sum(1).flatten(),
                            (d_f[cross.slices()] * dv.moving_at_offset(d_m, (4, 0, -4), cross)
                             ).sum(1).flatten()])
    dense_target = torch.cat([targets((0, 0, 0), full).flatten(),
                              targets((4, 0, -4), cross).flatten()])
    mse = ((dense_pred - dense_target) ** 2).mean()
    s, s2 = (1, 0, 2), (1, 2, 2)
    nodes = dv.node_range(s, k).intersect(dv.node_range(s2, k))  # type: ignore[union-attr]
    dp = (d_f[nodes.slices()] * (dv.moving_at_offset(d_m, s2, nodes)
                                 - dv.moving_at_offset(d_m, s, nodes))).sum(1)
    dt = targets(s2, nodes) - targets(s, nodes)
    shift_mse = ((dp - dt) ** 2).mean()
    w = dv.node_weights(fixed, CFG)[:, nodes.slices()[2], nodes.slices()[3], nodes.slices()[4]]
    grad = [((w[b] * dp[b]).sum() / w[b].sum() - (w[b] * dt[b]).sum() / w[b].sum()) ** 2
            for b in range(2)]
    gradient_mse = torch.stack(grad).mean()
    assert figures["mse"] == pytest.approx(float(mse), rel=1e-5)
    assert figures["shift_mse"] == pytest.approx(float(shift_mse), rel=1e-5)
    assert figures["gradient_mse"] == pytest.approx(float(gradient_mse), rel=1e-4)
    assert float(loss) == pytest.approx(float(mse + 2 * shift_mse + 3 * gradient_mse), rel=1e-5)
    assert figures["targets"] == 2 * (k**3 + cross.count + nodes.count)


def test_bf16_autocast_covers_the_convolutions_only() -> None:
    net = loop.new_model(0)
    x = torch.randn(2, 1, 16, 16, 16)
    full = device_loop.describe(net, x, None)
    half = device_loop.describe(net, x, torch.bfloat16)
    assert half.dtype == full.dtype == torch.float32  # the clip and what follows: fp32
    assert torch.linalg.vector_norm(half, dim=1).max() <= 1.0 + 1e-6
    assert 0 < (half - full).abs().max() < 0.05  # bf16 convolutions, not fp32 ones


def test_offsets_are_valid_and_depend_on_the_step() -> None:
    a = dv.draw_offsets(np.random.default_rng(1), 4, 3, 4, 5, 4, 3)
    b = dv.draw_offsets(np.random.default_rng(1), 4, 3, 4, 5, 4, 3)
    assert a == b and len(a.node) == 3 and len(a.shift) == 5
    for o in a.node:
        assert all(v % 4 == 0 for v in o) and any(o) and dv.node_range(o, 4) is not None
    for s, s2 in a.shift:
        d = np.subtract(s2, s)
        assert 1 <= np.abs(d).max() <= 3 and max(abs(v) for v in s) <= 4


def test_climb_finds_the_nearest_maximum() -> None:
    peak = np.array([1.3, -0.6, 2.1])
    found = scan.climb(lambda t: -((t - peak) ** 2).sum(axis=1), np.zeros(3), (0.5, 0.25), 48)
    assert np.abs(found - peak).max() <= 0.125 + 1e-9


@pytest.fixture()
def device_config() -> loop.TrainConfig:
    return loop.TrainConfig(
        budget_minutes=5.0, seed=3, crop=16, batch=2, scene_reuse=2, warmup_steps=1,
        workers=0, threads=1, source_ids=(), phantom_fraction=1.0, phantom_shape=(40, 40, 40),
        log_every_s=1e9, checkpoint_minutes=10.0, device="cpu", node_offsets=2,
        shift_pairs=2, val_pairs=1, val_side=32, schedule_steps=6, ema_decay=0.5,
        scene_pool=2)


def test_device_loop_resumes_bit_identically(device_config: loop.TrainConfig,
                                             tmp_path: Path) -> None:
    torch.set_num_threads(1)
    straight = dataclasses.replace(device_config, max_steps=6)
    summary = loop.fit(straight, tmp_path / "a", interactive=False)
    assert summary["steps"] == 6 and summary["best"]["step"] == 6
    loop.fit(dataclasses.replace(straight, max_steps=3), tmp_path / "b", interactive=False)
    # Resuming needs no --device: the checkpoint names its loop.
    resumed = dataclasses.replace(straight, device=None)
    assert loop.fit(resumed, tmp_path / "b", resume=True, interactive=False)["steps"] == 6
    a, b = loop.load_checkpoint(tmp_path / "a"), loop.load_checkpoint(tmp_path / "b")
    for key in ("model", "averaged_model"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert torch.equal(a["balancer"]["freq"], b["balancer"]["freq"])
    log = [json.loads(line) for line in (tmp_path / "a" / loop.LOG).read_text().splitlines()]
    assert any("scan" in r for r in log) and log[0]["targets_per_s"] > 0
    # The run keeps the scan's best weights, and serves and exports them.
    kept = torch.load(tmp_path / "a" / loop.BEST, weights_only=False)
    name = next(iter(kept["model"]))
    assert torch.equal(loop.model_from_checkpoint(tmp_path / "a").state_dict()[name],
                       kept["model"][name])
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(tmp_path / "a" / device_loop.ONNX),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(1, 1, 20, 24, 16)).astype(np.float32)
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        expected = loop.model_from_checkpoint(tmp_path / "a")(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-4)
    # The card names the device loop's recipe, command and the kept weights' scan.
    assert cli_main(["export", "--run", str(tmp_path / "a"), "--out", str(tmp_path / "w")]) == 0
    training = json.loads((tmp_path / "w" / "disa.json").read_text())["training"]
    assert training["recipe"].startswith("device loop (cpu, fp32 convolutions)")
    assert "--device cpu" in training["command"] and "--scene-pool 2" in training["command"]
    assert training["optimum_bias_scan"]["step"] == training["steps"] == 6


def test_cuda_without_a_device_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    assert cli_main(["fit", "--device", "cuda", "--out", str(out), "--budget", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda" in err and "no CUDA device" in err
    assert not out.exists()


def _fake_training_volume(phantom: sources.Volume) -> sources.Volume:
    # The cache takes training sources only; a phantom's arrays stand in for one.
    return dataclasses.replace(phantom, id="icbm152-brain", subject="icbm152-2009a",
                               anatomy="brain-mri-template", native_modality="t1",
                               border_mode="nearest")


def test_volume_cache_round_trip(phantom: sources.Volume, tmp_path: Path) -> None:
    volume = _fake_training_volume(phantom)
    summary = write_volume_cache([volume], tmp_path / "v.npz")
    assert summary["bytes"] == (tmp_path / "v.npz").stat().st_size
    (back,) = read_volume_cache(tmp_path / "v.npz")
    assert (back.id, back.subject, back.border_mode) == (volume.id, volume.subject, "nearest")
    assert back.native.dtype == np.float32 and back.tissues.dtype == np.float32
    np.testing.assert_allclose(back.native, volume.native, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(back.tissues, volume.tissues, atol=2e-3)
    np.testing.assert_allclose(back.tissues.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(back.labels, volume.labels)
    np.testing.assert_array_equal(back.label_tissue, volume.label_tissue)
    assert read_volume_cache(tmp_path / "v.npz", ids=("icbm152-head",)) == []
    with pytest.raises(ValueError, match="phantoms"):
        write_volume_cache([phantom], tmp_path / "p.npz")
    held_out = dataclasses.replace(volume, id="ct-brain-atlas")
    with pytest.raises(ValueError, match="not a training source"):
        write_volume_cache([held_out], tmp_path / "h.npz")
    with pytest.raises(ValueError, match="limit"):
        write_volume_cache([volume], tmp_path / "big.npz", max_bytes=1000)
    assert not (tmp_path / "big.npz").exists() and not (tmp_path / "h.npz").exists()


def test_cache_command(phantom: sources.Volume, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    volume = _fake_training_volume(phantom)
    monkeypatch.setattr(sources, "available_sources", lambda split=None: ["icbm152-brain"])
    monkeypatch.setattr(sources, "load_volume", lambda source_id: volume)
    out = tmp_path / "v.npz"
    assert cli_main(["cache", "--out", str(out), "--sources", "icbm152-brain"]) == 0
    assert [v.id for v in read_volume_cache(out)] == ["icbm152-brain"]
    assert cli_main(["cache", "--out", str(out), "--sources", "ct-brain-atlas"]) == 2
    assert cli_main(["cache", "--out", str(out), "--sources", "icbm152-head"]) == 2


_HIDE = """
import runpy, sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"SimpleITK", "pydantic", "pydantic_core", "nibabel",
                                  "nilearn", "melage"}:
            raise ImportError("not on the GPU machine: " + name)
sys.meta_path.insert(0, Hide())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_gpu_script_trains_from_the_cache_without_simpleitk_or_pydantic(
    phantom: sources.Volume, tmp_path: Path
) -> None:
    """The GPU run's whole path: cache, device loop, scans, checkpoints, ONNX export."""
    write_volume_cache([_fake_training_volume(phantom)], tmp_path / "v.npz")
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", _HIDE, str(ROOT / "scripts" / "gpu_train.py"), "fit",
           "--device", "cpu", "--data-cache", str(tmp_path / "v.npz"),
           "--sources", "icbm152-brain", "--phantom-fraction", "0.5", "--out", str(out),
           "--budget", "2", "--max-steps", "3", "--crop", "16", "--batch", "2",
           "--workers", "1", "--scene-pool", "2", "--val-pairs", "2", "--val-side", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stand-ins for SimpleITK, pydantic" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["stopped_by"] == "max_steps"
    assert {p.name for p in out.iterdir()} >= {"checkpoint.pt", "best.pt", "disa.onnx",
                                               "log.jsonl", "run.json"}
    state = loop.load_checkpoint(out)
    assert state["config"]["volume_cache"] == str(tmp_path / "v.npz")
    assert state["config"]["checkpoint_minutes"] == 1.0  # the device loop's default
