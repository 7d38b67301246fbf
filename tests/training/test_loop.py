"""Training loop: learns, resumes exactly, exports an ONNX file that ONNX Runtime runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from disa.training import data, evaluate, loop
from disa.training.cli import main as cli_main
from disa.training.sources import Volume


def test_lr_schedule_warms_up_then_halves() -> None:
    assert loop.lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert loop.lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert loop.lr_factor(150, 10, 100) == pytest.approx(0.5)
    assert loop.lr_factor(250, 10, 100) == pytest.approx(0.25)


def test_batches_depend_only_on_seed_and_index(tiny_config: loop.TrainConfig) -> None:
    cfg = tiny_config.data_config()
    a = data.make_batch(5, 1, cfg, [])
    b = data.make_batch(5, 1, cfg, [])
    c = data.make_batch(6, 1, cfg, [])
    assert a["fixed"].shape == (1, 1, 16, 16, 16) and a["target"].shape == (1, 4, 4, 4)
    assert torch.equal(a["target"], b["target"]) and torch.equal(a["moving"], b["moving"])
    assert not torch.equal(a["fixed"], c["fixed"])


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_config: loop.TrainConfig) -> None:
    torch.set_num_threads(1)
    cfg = dataclasses.replace(tiny_config, batch=2).data_config()
    batch = data.make_batch(0, 11, cfg, [])
    net = loop.new_model(0)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-3)
    losses = []
    for _ in range(40):
        loss, _ = loop.pair_loss(net, batch, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_loss_covers_equal_and_cross_positions(tiny_config: loop.TrainConfig) -> None:
    cfg = dataclasses.replace(tiny_config, batch=2, cross_pairs=30).data_config()
    batch = data.make_batch(0, 5, cfg, [])
    assert batch["cross_target"].shape == (60,)
    # Flat indices address the batch's 2 x 4^3 descriptors: the second pair's are offset.
    assert batch["cross_fixed"][:30].max() < 64 and batch["cross_fixed"][30:].min() >= 64
    net = loop.new_model(1).eval()
    with torch.no_grad():
        loss, mse = loop.pair_loss(net, batch, None)
        d = net(torch.cat([batch["fixed"], batch["moving"]]))
    f = d[:2].permute(0, 2, 3, 4, 1).reshape(-1, 16)
    m = d[2:].permute(0, 2, 3, 4, 1).reshape(-1, 16)
    equal = (f * m).sum(1) - batch["target"].flatten()
    cross = (f[batch["cross_fixed"]] * m[batch["cross_moving"]]).sum(1) - batch["cross_target"]
    expected = torch.cat([equal, cross]).pow(2).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(mse) == pytest.approx(float(expected), rel=1e-5)


def _params(run: Path) -> dict[str, torch.Tensor]:
    return loop.load_checkpoint(run)["model"]


def test_resume_reproduces_an_uninterrupted_run(
    tiny_config: loop.TrainConfig, tmp_path: Path
) -> None:
    straight = dataclasses.replace(tiny_config, max_steps=6)
    loop.fit(straight, tmp_path / "a", interactive=False)
    loop.fit(dataclasses.replace(tiny_config, max_steps=3), tmp_path / "b", interactive=False)
    with pytest.raises(FileExistsError):
        loop.fit(straight, tmp_path / "b", interactive=False)
    summary = loop.fit(straight, tmp_path / "b", resume=True, interactive=False)
    assert summary["steps"] == 6
    a, b = loop.load_checkpoint(tmp_path / "a"), loop.load_checkpoint(tmp_path / "b")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6
    for sa, sb in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    assert torch.equal(a["balancer"]["freq"], b["balancer"]["freq"])
    log = [json.loads(line) for line in (tmp_path / "b" / loop.LOG).read_text().splitlines()]
    assert log[-1]["step"] == 6 and "targets_per_s" in log[-1]


def test_budget_stops_training(tiny_config: loop.TrainConfig, tmp_path: Path) -> None:
    summary = loop.fit(
        dataclasses.replace(tiny_config, budget_minutes=0.0), tmp_path / "r", interactive=False
    )
    assert summary["stopped_by"] == "budget" and summary["steps"] == 0
    assert (tmp_path / "r" / loop.CHECKPOINT).is_file()


def test_export_runs_in_onnxruntime_and_evaluate_merges_into_card(
    tiny_config: loop.TrainConfig, tmp_path: Path, phantom: Volume
) -> None:
    ort = pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    loop.fit(dataclasses.replace(tiny_config, max_steps=2), run, interactive=False)
    assert cli_main(["export", "--run", str(run), "--out", str(tmp_path / "w")]) == 0
    onnx_path = tmp_path / "w" / "disa.onnx"
    card_path = tmp_path / "w" / "disa.json"
    assert onnx_path.is_file() and card_path.is_file()
    x = np.random.default_rng(0).normal(size=(1, 1, 24, 20, 28)).astype(np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x})
    net = loop.model_from_checkpoint(run)
    with torch.no_grad():
        torch_out = net(torch.from_numpy(x)).numpy()
    assert onnx_out.shape == (1, 16, 6, 5, 7)
    np.testing.assert_allclose(onnx_out, torch_out, atol=1e-4)

    cfg = evaluate.EvalConfig(
        pairs_per_scene=12, setting_pairs=(("t1", "us"), ("ct", "lut-high-frequency"))
    )
    result = evaluate.evaluate(
        evaluate.onnx_describer(onnx_path, threads=1), cfg, volumes=[phantom]
    )
    assert result["pairs"] > 0 and 0.0 <= result["mse"] <= 4.0
    assert set(result["by_setting"]) >= {"t1", "us"}
    assert "held-out-setting" in result["by_setting_family"]
    assert len(result["by_target_bin"]) >= 3
    evaluate.merge_into_card(card_path, result)
    card = json.loads(card_path.read_text())
    assert card["held_out_metrics"]["mse"] == pytest.approx(result["mse"])
    from disa.model.card import load_model_card

    load_model_card(card_path)  # the sha256 still matches the ONNX file


def test_fit_can_start_from_an_exported_model(
    tiny_config: loop.TrainConfig, tmp_path: Path
) -> None:
    from disa.model.card import file_sha256
    from disa.training.onnx_export import export_onnx

    parent = loop.new_model(42)
    onnx_path = tmp_path / "parent.onnx"
    export_onnx(parent, onnx_path)
    weights = loop.initial_weights(onnx_path)
    for name, value in parent.state_dict().items():
        assert torch.equal(weights[name], value), name
    cfg = dataclasses.replace(tiny_config, max_steps=1, lr=0.0, init_from=str(onnx_path))
    loop.fit(cfg, tmp_path / "child", interactive=False)
    state = loop.load_checkpoint(tmp_path / "child")
    # lr 0: the child still holds the parent's weights, and names its parent exactly.
    assert torch.equal(state["model"]["head.weight"], parent.state_dict()["head.weight"])
    assert state["config"]["init_sha256"] == file_sha256(onnx_path)
    bad = {k: v for k, v in parent.state_dict().items() if k != "head.weight"}
    torch.save({"model": bad}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"lacks DisaNet parameters: head\.weight"):
        loop.initial_weights(tmp_path / "bad.pt")


def test_sigterm_stops_with_a_checkpoint(tmp_path: Path) -> None:
    """A scheduler's SIGTERM (or the end of a session) must not lose the run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "disa.training.cli", "fit", "--out", str(out),
           "--budget", "10", "--crop", "16", "--batch", "1", "--workers", "0",
           "--phantom-fraction", "1.0", "--sources", "none", "--cross-pairs", "16",
           "--log-every", "0.2"]
    # start_new_session: like a job started in the background, away from our signals.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            log = out / loop.LOG
            if log.is_file() and log.read_text().count("\n") >= 2:
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.2)
        else:
            pytest.fail("training logged no progress within 120 s")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = json.loads((out / loop.SUMMARY).read_text())
    assert summary["stopped_by"] == "interrupted" and summary["steps"] >= 1
    assert loop.load_checkpoint(out)["step"] == summary["steps"]


def test_moving_average_is_served_and_resumes_exactly(
    tiny_config: loop.TrainConfig, tmp_path: Path
) -> None:
    averaged = dataclasses.replace(tiny_config, ema_decay=0.5, max_steps=4)
    loop.fit(averaged, tmp_path / "a", interactive=False)
    loop.fit(dataclasses.replace(averaged, max_steps=2), tmp_path / "b", interactive=False)
    loop.fit(averaged, tmp_path / "b", resume=True, interactive=False)
    a, b = loop.load_checkpoint(tmp_path / "a"), loop.load_checkpoint(tmp_path / "b")
    for k, v in a["averaged_model"].items():
        assert torch.equal(v, b["averaged_model"][k]), k
    # The average lags the raw weights, and it is what the run serves.
    name = next(iter(a["model"]))
    assert not torch.equal(a["model"][name], a["averaged_model"][name])
    served = loop.model_from_checkpoint(tmp_path / "a").state_dict()
    assert torch.equal(served[name], a["averaged_model"][name])
    assert torch.equal(loop.initial_weights(tmp_path / "a")[name], a["averaged_model"][name])
    # Without the option nothing is averaged and the raw weights are served.
    plain = dataclasses.replace(tiny_config, max_steps=1)
    loop.fit(plain, tmp_path / "c", interactive=False)
    c = loop.load_checkpoint(tmp_path / "c")
    assert c["averaged_model"] is None
    assert torch.equal(loop.model_from_checkpoint(tmp_path / "c").state_dict()[name],
                       c["model"][name])


def test_contrast_term_fits_differences_between_an_anchors_partners(
    tiny_config: loop.TrainConfig,
) -> None:
    cfg = dataclasses.replace(tiny_config, batch=2, cross_pairs=30).data_config()
    batch = data.make_batch(0, 5, cfg, [])
    net = loop.new_model(1).eval()
    with torch.no_grad():
        plain, mse = loop.pair_loss(net, batch, None)
        with_term, mse2 = loop.pair_loss(net, batch, None, contrast_weight=1.0)
        d = net(torch.cat([batch["fixed"], batch["moving"]]))
    assert torch.equal(mse, mse2)  # the reported MSE stays the paper's figure
    rows_f = d[:2].permute(0, 2, 3, 4, 1).reshape(-1, d.shape[1])
    rows_m = d[2:].permute(0, 2, 3, 4, 1).reshape(-1, d.shape[1])
    same = (rows_f * rows_m).sum(dim=1)
    target = batch["target"].flatten()
    i, j, t = batch["cross_fixed"], batch["cross_moving"], batch["cross_target"]
    cross = (rows_f[i] * rows_m[j]).sum(dim=1)
    expected = 0.5 * (((same[i] - cross) - (target[i] - t)) ** 2
                      + ((same[j] - cross) - (target[j] - t)) ** 2).mean()
    assert float(with_term - plain) == pytest.approx(float(expected), rel=1e-5)
    # An error shared by all partners of every anchor costs the MSE but not the term.
    shifted = {**batch, "target": batch["target"] + 0.1, "cross_target": t + 0.1}
    with torch.no_grad():
        a, _ = loop.pair_loss(net, shifted, None, contrast_weight=1.0)
        b, _ = loop.pair_loss(net, shifted, None)
    assert float(a - b) == pytest.approx(float(expected), rel=1e-4)
