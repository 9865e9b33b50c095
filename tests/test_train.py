import json
import signal
import subprocess
import time

import pytest
import torch

from conftest import PYTHON, ROOT, make_image_folder, run_env
from pixelrepa.train import StepBatches, TrainConfig, checkpoints, lr_at, train


def tiny_args(folder, out, steps=12, **extra):
    args = dict(model="JiT-Ti/4", dataset=str(folder), resolution=16, data_dir=str(out.parent / "cache"),
                out_dir=str(out), steps=steps, batch_size=8, blr=1e-2, warmup_epochs=1, ckpt_every=3, log_every=1,
                num_samples=0, progress=False, seed=3)
    args.update(extra)
    return args


def cli(args: dict) -> list[str]:
    out = []
    for k, v in args.items():
        out += [f"--{k}", str(v)]
    return out


def load_final(out, step):
    return torch.load(out / f"ckpt-{step:08d}.pt", weights_only=False)


def assert_same_state(a, b, atol=0.0):
    for key in ("model",):
        for name in a[key]:
            diff = (a[key][name] - b[key][name]).abs().max().item()
            assert diff <= atol, f"{key}.{name} differs by {diff}"
    for ea, eb in zip(a["emas"], b["emas"]):
        for name in ea:
            assert (ea[name] - eb[name]).abs().max().item() <= atol, f"ema {name}"


def test_config_rejects_bad_values_naming_the_field():
    for field, value in [("steps", 0), ("batch_size", -1), ("blr", float("nan")), ("model", "JiT-Q/4"),
                         ("ema_decays", (1.5,)), ("resolution", 30), ("label_drop", 1.0), ("device", "tpu")]:
        with pytest.raises(ValueError, match=field):
            TrainConfig(**{field: value})


def test_lr_scales_with_batch_and_warms_up_linearly():
    cfg = TrainConfig(blr=5e-5, batch_size=512, warmup_epochs=2)
    base = 5e-5 * 512 / 256
    assert lr_at(0, cfg, steps_per_epoch=10) == pytest.approx(base / 20)
    assert lr_at(9, cfg, steps_per_epoch=10) == pytest.approx(base / 2)
    assert lr_at(500, cfg, steps_per_epoch=10) == pytest.approx(base)


def test_step_batches_cover_each_epoch_once_and_split_across_ranks():
    n, B = 20, 4
    s = StepBatches(n, B, seed=0, start=0, stop=10)
    epoch0 = sum((s.global_indices(k).tolist() for k in range(5)), [])
    assert sorted(epoch0) == list(range(n))
    r0 = list(StepBatches(n, B, 0, 3, 5, rank=0, world=2))
    r1 = list(StepBatches(n, B, 0, 3, 5, rank=1, world=2))
    assert [a + b for a, b in zip(r0, r1)] == [s.global_indices(k).tolist() for k in (3, 4)]


def test_training_lowers_the_loss_and_logs_metrics(tmp_path, image_folder):
    out = tmp_path / "run"
    cfg = TrainConfig(**tiny_args(image_folder, out, steps=30, ckpt_every=10, num_samples=4, sample_steps=3))
    train(cfg)
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 31))
    assert recs[-1]["images"] == 240 and recs[-1]["images_per_s"] > 0
    assert any(k.startswith("loss_t") for k in recs[-1])
    first = sum(r["loss"] for r in recs[:5]) / 5
    last = sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.7 * first
    assert [p.name for p in checkpoints(out)] == ["ckpt-00000020.pt", "ckpt-00000030.pt"]  # keep_ckpts=2
    samples = torch.load(out / "samples.pt")
    assert samples["images"].shape == (4, 3, 16, 16) and samples["images"].dtype == torch.uint8
    assert (out / "samples.png").stat().st_size > 0
    assert not list(out.glob(".*.tmp"))


def test_resume_after_sigkill_is_exact(tmp_path):
    folder = make_image_folder(tmp_path / "folder")
    steps = 40
    ref = tmp_path / "ref"
    subprocess.run([PYTHON, "-m", "pixelrepa.train", *cli(tiny_args(folder, ref, steps, ckpt_every=5))],
                   check=True, cwd=ROOT, env=run_env(), capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen([PYTHON, "-m", "pixelrepa.train", *cli(tiny_args(folder, out, steps, ckpt_every=5))],
                            cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "ckpt-00000010.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.stem.split("-")[1]) for p in checkpoints(out))
    assert 10 <= killed_at < steps
    subprocess.run([PYTHON, "-m", "pixelrepa.train", *cli(tiny_args(folder, out, steps, ckpt_every=5))],
                   check=True, cwd=ROOT, env=run_env(), capture_output=True)
    a, b = load_final(ref, steps), load_final(out, steps)
    assert_same_state(a, b, atol=0.0)
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # the metrics log has each step exactly once, as the uninterrupted run's
    steps_logged = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1))
    la = [json.loads(l)["loss"] for l in (ref / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


def test_resume_refuses_a_run_of_another_configuration(tmp_path, image_folder):
    out = tmp_path / "run"
    train(TrainConfig(**tiny_args(image_folder, out, steps=3)))
    with pytest.raises(ValueError, match="model"):
        train(TrainConfig(**tiny_args(image_folder, out, steps=6, model="JiT-S/4")))


@pytest.mark.slow
def test_two_torchrun_processes_match_one_process(tmp_path):
    """Gloo DDP at 2 x 4 images vs one process at 8: same global batch, same draws. The tolerance
    covers float summation order in the gradient all-reduce (measured: ~1e-7 after 6 steps)."""
    folder = make_image_folder(tmp_path / "folder")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([PYTHON, "-m", "pixelrepa.train", *cli(tiny_args(folder, one, 6))], check=True, cwd=ROOT,
                   env=run_env(), capture_output=True, timeout=300)
    r = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "pixelrepa.train", *cli(tiny_args(folder, two, 6))], cwd=ROOT, env=run_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_final(one, 6), load_final(two, 6)
    assert_same_state(a, b, atol=1e-5)
    # and it is not trivially equal because nothing trained
    first = torch.load(one / "ckpt-00000003.pt", weights_only=False)
    moved = max((a["model"][k] - first["model"][k]).abs().max().item() for k in a["model"])
    assert moved > 50 * 1e-5


def test_load_jit_gives_the_ema_weights_without_a_head(tmp_path, image_folder):
    from pixelrepa.train import load_jit
    out = tmp_path / "run"
    train(TrainConfig(**tiny_args(image_folder, out, steps=3)))
    net, cfg = load_jit(out, "ema1")
    state = torch.load(out / "ckpt-00000003.pt", weights_only=False)
    assert cfg["model"] == "JiT-Ti/4" and not net.training
    assert all(torch.equal(v, state["emas"][1][k]) for k, v in net.state_dict().items())
    with pytest.raises(FileNotFoundError, match="no readable checkpoint"):
        load_jit(tmp_path)


@pytest.mark.slow
def test_training_logs_fid_against_held_out_images(tmp_path, image_folder):
    out = tmp_path / "run"
    train(TrainConfig(**tiny_args(image_folder, out, steps=4, eval_every=2, eval_samples=6, eval_steps=2)))
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "eval_fid" in r]
    assert [r["step"] for r in evals] == [2, 4] and [r["images"] for r in evals] == [16, 32]
    assert all(r["eval_fid"] > 0 and r["eval_n"] == 6 and r["eval_n_real"] == 24 for r in evals)


def test_short_run_with_long_ema_warns_that_samples_show_the_initialisation(tmp_path, image_folder):
    with pytest.warns(UserWarning, match="initial weights"):
        train(TrainConfig(**tiny_args(image_folder, tmp_path / "run", steps=3, ema_decays=(0.9999,))))


def test_truncated_latest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, image_folder, capfd):
    out = tmp_path / "run"
    train(TrainConfig(**tiny_args(image_folder, out, steps=6)))  # checkpoints at 3 and 6
    latest = out / "ckpt-00000006.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    from pixelrepa.train import load_latest
    state = load_latest(out)
    assert state["step"] == 3
    assert "ckpt-00000006.pt is unreadable" in capfd.readouterr().err
    # training resumes from step 3 and ends with the uninterrupted run's weights
    ref = tmp_path / "ref"
    train(TrainConfig(**tiny_args(image_folder, ref, steps=6)))
    train(TrainConfig(**tiny_args(image_folder, out, steps=6)))
    assert_same_state(load_final(ref, 6), load_final(out, 6))


def test_non_finite_loss_stops_with_what_reproduces_it(tmp_path, image_folder):
    out = tmp_path / "run"
    # an absurd learning rate: the first update sends the weights to inf, the second loss is not finite
    with pytest.raises(FloatingPointError, match="at step 1"):
        train(TrainConfig(**tiny_args(image_folder, out, steps=3, blr=1e308, warmup_epochs=0)))
    info = json.loads((out / "nonfinite-step00000001.json").read_text())
    assert info["step"] == 1 and info["seed"] == 3 and len(info["batch_indices"]) == 8
