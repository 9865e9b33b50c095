import json
import os
import random
import signal
import subprocess
import time
import zipfile
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PYTHON, ROOT, huge_png, make_image_folder, run_env
from pixelrepa import train as trainmod
from pixelrepa.storage import (CheckpointError, atomic_save, checkpoints, checksum_path, load_jit, load_latest,
                               read_checkpoint, sha256_file)
from pixelrepa.config import cli_errors, config_parser
from pixelrepa.train import StepBatches, TrainConfig, lr_at, train


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


def test_command_line_takes_every_field_and_none_for_the_default_value():
    p = config_parser(TrainConfig, "pixelrepa.train")
    assert TrainConfig(**vars(p.parse_args([]))) == TrainConfig()
    cfg = TrainConfig(**vars(p.parse_args(["--align_coef", "0.3", "--attn_drop", "none", "--align_depth", "None",
                                           "--ema_decays", "0.9", "0.99", "--compile", "true"])))
    assert (cfg.align_coef, cfg.attn_drop, cfg.align_depth, cfg.ema_decays, cfg.compile) == (0.3, None, None, (0.9, 0.99), True)
    # every field, as the study writes a run's torchrun command line, comes back as it was
    cfg = TrainConfig(method="pixelrepa", align_depth=1, mask_ratio=0.3, proj_drop=0.1)
    args = [a for k, v in asdict(cfg).items() for a in ([f"--{k}", *map(str, v)] if isinstance(v, tuple) else [f"--{k}", str(v)])]
    assert TrainConfig(**vars(p.parse_args(args))) == cfg
    with pytest.raises(SystemExit):
        p.parse_args(["--align_depth", "two"])


def test_user_errors_end_a_command_with_one_line_and_status_1(capsys, monkeypatch):
    monkeypatch.delenv("PIXELREPA_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stop:
        with cli_errors("pixelrepa.train", trainmod.USER_ERRORS):
            TrainConfig(steps=0)
    assert stop.value.code == 1
    assert capsys.readouterr().err == "pixelrepa.train: error: TrainConfig.steps=0: must be a positive integer\n"
    with pytest.raises(KeyError):  # not a user error: the traceback, as ever
        with cli_errors("pixelrepa.train", trainmod.USER_ERRORS):
            raise KeyError("bug")
    monkeypatch.setenv("PIXELREPA_TRACEBACK", "1")
    with pytest.raises(ValueError, match="steps"):
        with cli_errors("pixelrepa.train", trainmod.USER_ERRORS):
            TrainConfig(steps=0)
    assert capsys.readouterr().err == ""


def test_lr_scales_with_batch_and_warms_up_linearly():
    cfg = TrainConfig(blr=5e-5, batch_size=512, warmup_epochs=2)
    base = 5e-5 * 512 / 256
    assert lr_at(0, cfg, steps_per_epoch=10) == 0.0  # the reference: lr * it / warmup_its, it = 0 first
    assert lr_at(10, cfg, steps_per_epoch=10) == pytest.approx(base / 2)
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


# Runs pixelrepa.train with torch.save slowed down for one checkpoint: its write stops half-way (the
# bytes so far on disk) until the test kills the process, so "killed while writing" is hit every time.
STALLING_TRAIN = """
import io, os, sys, time
from pathlib import Path
import torch
import pixelrepa.train as T
stall, _save = os.environ.get("STALL_CKPT"), torch.save
def save(obj, f, *args, **kwargs):
    name = Path(getattr(f, "name", "")).name  # the temporary file beside the checkpoint: .NAME.<unique>.tmp
    if stall and name.startswith("." + stall + ".") and name.endswith(".tmp"):
        buf = io.BytesIO()
        _save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        Path(os.environ["STALL_MARKER"]).touch()
        time.sleep(600)
    return _save(obj, f, *args, **kwargs)
torch.save = save
T.main(sys.argv[1:])
"""


def logged_steps(out):
    path = out / "metrics.jsonl"
    return [json.loads(l)["step"] for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def test_resume_after_sigkill_at_random_points_is_exact(tmp_path):
    """Four SIGKILLs at seeded random points, one of them half-way through writing a checkpoint; the
    run resumed each time ends bit-identical to an uninterrupted one (weights, EMAs, Adam state, log)."""
    folder = make_image_folder(tmp_path / "folder")
    steps, every = 40, 4
    args = cli(tiny_args(folder, tmp_path / "ref", steps, ckpt_every=every))
    ref = tmp_path / "ref"
    subprocess.run([PYTHON, "-m", "pixelrepa.train", *args], check=True, cwd=ROOT, env=run_env(), capture_output=True)
    out = tmp_path / "killed"
    args = cli(tiny_args(folder, out, steps, ckpt_every=every))
    script = tmp_path / "stalling_train.py"
    script.write_text(STALLING_TRAIN)
    rng = random.Random(20260513)
    seen, stalled, logs = 0, None, []
    for k, kind in enumerate(["step", "write", "step", "step"]):
        env, marker = run_env(), tmp_path / f"stalled-{k}"
        if kind == "write":  # a checkpoint the run has not reached yet
            stalled = f"ckpt-{(seen // every + 1 + rng.randint(0, 1)) * every:08d}.pt"
            env.update(STALL_CKPT=stalled, STALL_MARKER=str(marker))
        target = seen + rng.randint(3, 8)
        logs.append(tmp_path / f"segment-{k}.err")
        with open(logs[-1], "w") as err:
            proc = subprocess.Popen([PYTHON, str(script), *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                    stderr=err)
        deadline = time.time() + 120
        while not (marker.exists() if kind == "write" else max(logged_steps(out), default=0) >= target):
            assert proc.poll() is None, f"segment {k} ended before it could be killed: {logs[-1].read_text()[-2000:]}"
            assert time.time() < deadline, "training made no progress"
            time.sleep(0.01)
        if kind == "step":
            time.sleep(rng.uniform(0, 0.05))  # anywhere inside the following step
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen = max(logged_steps(out), default=0)
        print(f"segment {k}: SIGKILL ({kind}) after step {seen}; checkpoints {[p.name for p in checkpoints(out)]}")
        assert seen < steps
        if kind == "write":
            assert list(out.glob(f".{stalled}.*.tmp")) and not (out / stalled).exists()  # half a file, never renamed
    r = subprocess.run([PYTHON, "-m", "pixelrepa.train", *args], cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    after_write_kill = logs[2].read_text()
    assert f"removing {out / ('.' + stalled)}." in after_write_kill and "resuming from" in after_write_kill
    assert not list(out.glob(".*.tmp")) and "resuming from" in r.stderr
    a, b = load_final(ref, steps), load_final(out, steps)
    assert_same_state(a, b, atol=0.0)
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # the metrics log has each step exactly once, as the uninterrupted run's
    assert logged_steps(out) == list(range(1, steps + 1))
    la = [json.loads(l)["loss"] for l in (ref / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert la == lb
    for path in checkpoints(out):  # every checkpoint left has its checksum, in sha256sum's format
        assert checksum_path(path).read_text() == f"{sha256_file(path)}  {path.name}\n"


def test_resume_refuses_a_run_of_another_configuration(tmp_path, image_folder, monkeypatch):
    out = tmp_path / "run"
    train(TrainConfig(**tiny_args(image_folder, out, steps=3)))
    with pytest.raises(ValueError, match="model: checkpoint 'JiT-Ti/4' vs now 'JiT-S/4'"):
        train(TrainConfig(**tiny_args(image_folder, out, steps=6, model="JiT-S/4")))
    # another method is refused before any encoder is built or feature computed
    from pixelrepa import encoders
    monkeypatch.setattr(encoders, "build_encoder", lambda *a, **k: pytest.fail("encoder built before the check"))
    with pytest.raises(ValueError, match="method: checkpoint 'jit' vs now 'pixelrepa'"):
        train(TrainConfig(**tiny_args(image_folder, out, steps=6, method="pixelrepa")))
    # the command line says the same in one line, without a traceback
    r = subprocess.run([PYTHON, "-m", "pixelrepa.train", *cli(tiny_args(image_folder, out, steps=6, method="repa"))],
                       cwd=ROOT, env={**run_env(), "PIXELREPA_TRACEBACK": ""}, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("pixelrepa.train: error: ") and "method" in r.stderr


def test_checkpoint_of_another_size_or_a_foreign_file_is_a_clear_error(tmp_path, image_folder):
    out = tmp_path / "run"
    train(TrainConfig(**tiny_args(image_folder, out, steps=3, ema_decays=(0.9,))))
    state = torch.load(out / "ckpt-00000003.pt", weights_only=False)
    state["config"]["model"] = "JiT-S/4"  # says S, holds Ti weights
    atomic_save(state, tmp_path / "mislabelled.pt")
    with pytest.raises(CheckpointError, match=r"mislabelled.pt do not fit .*of another shape.*missing \(e.g. blocks.6.*another model size"):
        load_jit(tmp_path / "mislabelled.pt")
    with pytest.raises(ValueError, match="which='ema1'.* holds model, ema0"):
        load_jit(out, "ema1")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="foreign.pt is not a pixelrepa training checkpoint"):
        load_jit(tmp_path / "foreign.pt")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_jit(tmp_path / "nowhere.pt")
    # the same run directory grew a class: the embedding no longer fits, and resuming says so
    (image_folder / "class_3").mkdir()
    for i in range(8):
        Image.new("RGB", (20, 20), (9, 9, 9)).save(image_folder / "class_3" / f"{i}.png")
    with pytest.raises(CheckpointError, match=r"model weights in .*ckpt-00000003.pt do not fit.*y_embedder"):
        train(TrainConfig(**tiny_args(image_folder, out, steps=6, ema_decays=(0.9,))))


def test_a_checkpoint_from_before_none_defaults_resumes_and_loads(tmp_path, image_folder):
    """Checkpoints written when -1 meant "the registry's or paper's value" read back with None there:
    such a run resumes (its configuration matches today's defaults) and its JiT loads."""
    out = tmp_path / "run"
    train(TrainConfig(**tiny_args(image_folder, out, steps=3)))
    path = out / "ckpt-00000003.pt"
    state = torch.load(path, weights_only=False)
    state["config"].update(attn_drop=-1.0, proj_drop=-1.0, align_depth=-1, align_coef=-1.0, mask_ratio=-1.0)
    atomic_save(state, path, checksum=True)
    saved = read_checkpoint(path)["config"]
    assert [saved[k] for k in ("attn_drop", "proj_drop", "align_depth", "align_coef", "mask_ratio")] == [None] * 5
    assert load_jit(out)[0].cfg.attn_drop == 0.0
    train(TrainConfig(**tiny_args(image_folder, out, steps=6)))
    assert read_checkpoint(out / "ckpt-00000006.pt")["step"] == 6


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


def flip_a_weight_byte(path):
    """One byte in the middle of the largest tensor record: the zip still reads."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    pos = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[pos] ^= 0x40
    path.write_bytes(bytes(raw))


def test_truncated_latest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, image_folder, capfd):
    out = tmp_path / "run"
    train(TrainConfig(**tiny_args(image_folder, out, steps=6)))  # checkpoints at 3 and 6
    latest = out / "ckpt-00000006.pt"
    good = latest.read_bytes()
    # a flipped bit in a weight loads without complaint from torch: only the checksum sees it
    flip_a_weight_byte(latest)
    torch.load(latest, weights_only=False)
    with pytest.raises(CheckpointError, match="ckpt-00000006.pt fails its checksum"):
        read_checkpoint(latest)
    assert load_latest(out)["step"] == 3
    assert "ckpt-00000006.pt fails its checksum" in capfd.readouterr().err
    latest.write_bytes(good[: len(good) // 2])  # truncated
    assert load_latest(out)["step"] == 3
    assert "ckpt-00000006.pt fails its checksum" in capfd.readouterr().err
    checksum_path(latest).unlink()  # a checkpoint from before checksums: loading is the check
    assert load_latest(out)["step"] == 3
    assert "ckpt-00000006.pt is unreadable" in capfd.readouterr().err
    # training resumes from step 3 and ends with the uninterrupted run's weights
    ref = tmp_path / "ref"
    train(TrainConfig(**tiny_args(image_folder, ref, steps=6)))
    train(TrainConfig(**tiny_args(image_folder, out, steps=6)))
    assert "resuming from" in capfd.readouterr().err
    assert_same_state(load_final(ref, 6), load_final(out, 6))
    assert read_checkpoint(latest)["step"] == 6  # rewritten, with a checksum again


def test_non_finite_loss_stops_with_what_reproduces_it(tmp_path, image_folder, monkeypatch):
    out = tmp_path / "run"
    # an absurd learning rate: the first update sends the weights to inf, the second loss is not finite
    with pytest.raises(FloatingPointError, match="at step 1"):
        train(TrainConfig(**tiny_args(image_folder, out, steps=3, blr=1e308, warmup_epochs=0)))
    info = json.loads((out / "nonfinite-step00000001.json").read_text())
    assert info["step"] == 1 and info["seed"] == 3 and len(info["batch_indices"]) == 8
    # ... and those weights are never saved as a checkpoint, even when one is due right after the update
    out = tmp_path / "run1"
    with pytest.raises(FloatingPointError, match="non-finite weights after the update of step 0"):
        train(TrainConfig(**tiny_args(image_folder, out, steps=3, blr=1e308, warmup_epochs=0, ckpt_every=1)))
    assert checkpoints(out) == []

    # a loss that turns non-finite after checkpoints were written: the last good one stays
    out = tmp_path / "run2"
    real = trainmod.step_loss
    calls = []

    def nan_at_step_4(*args, **kwargs):
        loss, per_sample, cos = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 5 else loss), per_sample, cos

    monkeypatch.setattr(trainmod, "step_loss", nan_at_step_4)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 4 .*last good checkpoint .*ckpt-00000003.pt is kept"):
        train(TrainConfig(**tiny_args(image_folder, out, steps=9)))
    assert [p.name for p in checkpoints(out)] == ["ckpt-00000003.pt"] and read_checkpoint(checkpoints(out)[0])
    info = json.loads((out / "nonfinite-step00000004.json").read_text())
    assert info["step"] == 4 and info["seed"] == 3 and info["last_checkpoint"] == "ckpt-00000003.pt"
    assert info["batch_indices"] == StepBatches(24, 8, 3, 0, 9).global_indices(4).tolist()
    assert all(str(image_folder) in src for src in info["batch_sources"])
    assert TrainConfig(**info["config"]) == TrainConfig(**tiny_args(image_folder, out, steps=9))


def test_training_on_a_folder_with_bad_images_skips_counts_and_reports_them(tmp_path, image_folder):
    """Odd but readable files (greyscale, CMYK, 16-bit) train; corrupt, truncated, empty and huge files
    are skipped with a running count; an empty class folder is reported. The run ends normally."""
    c0 = image_folder / "class_0"
    Image.new("L", (20, 20), 90).save(c0 / "grey.png")
    Image.new("CMYK", (20, 20), (0, 200, 200, 0)).save(c0 / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(c0 / "sixteen.png")
    bad = {"corrupt.png", "truncated.png", "empty.png", "huge.png"}
    c1 = image_folder / "class_1"
    (c1 / "corrupt.png").write_bytes(os.urandom(300))
    (c1 / "truncated.png").write_bytes((c1 / "0.png").read_bytes()[:200])
    (c1 / "empty.png").write_bytes(b"")
    huge_png(c1 / "huge.png")
    (image_folder / "class_9_empty").mkdir()
    out = tmp_path / "run"
    with pytest.warns(UserWarning) as record:
        train(TrainConfig(**tiny_args(image_folder, out, steps=8, ckpt_every=4)))
    messages = [str(w.message) for w in record]
    assert any("1 class folder(s) have no images" in m and "class_9_empty" in m for m in messages)
    skips = [m for m in messages if "skipped unreadable image" in m]
    assert skips and all(any(f"/{b} (" in m for b in bad) for m in skips)
    assert [f"{k} image(s) skipped so far" in m for k, m in enumerate(skips, 1)] == [True] * len(skips)
    assert logged_steps(out)[-1] == 8 and all(np.isfinite(json.loads(l)["loss"])
                                              for l in (out / "metrics.jsonl").read_text().splitlines())


def test_dinov2_at_any_resolution_is_accepted_and_an_unknown_encoder_refused():
    # DINOv2 resizes to 16 px per JiT token (the paper's 512 px JiT-B/32 aligns to the 256 px view);
    # a mismatch that cannot be resized away, targets of another token count, is refused in align/encoders
    TrainConfig(method="pixelrepa", encoder="dinov2-b14", model="JiT-Ti/4", resolution=32)
    TrainConfig(method="pixelrepa", encoder="dinov2-b14", model="JiT-B/32", resolution=512)
    TrainConfig(method="jit", encoder="dinov2-b14", model="JiT-Ti/4", resolution=32)  # no encoder in use
    with pytest.raises(ValueError, match="TrainConfig.encoder='clip'"):
        TrainConfig(encoder="clip")


@pytest.mark.slow
def test_torchrun_with_a_killed_rank_ends_and_resumes(tmp_path):
    """SIGKILL one of 2 gloo processes mid-run: torchrun ends, non-zero, within 60 s (its agent stops
    the other rank; dist_timeout bounds any collective left waiting); a rerun resumes from the last
    checkpoint and ends where one uninterrupted process does (float reduction order: 1e-5)."""
    folder = make_image_folder(tmp_path / "folder")
    steps, out = 12, tmp_path / "two"
    args = cli(tiny_args(folder, out, steps, ckpt_every=4, dist_timeout=30))
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=0",
           "-m", "pixelrepa.train", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "ckpt-00000004.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "torchrun ended before a rank could be killed"
        time.sleep(0.05)
    workers = {}
    for pid in os.listdir("/proc"):  # the two workers are torchrun's children, told apart by $RANK
        try:
            if pid.isdigit() and int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) == proc.pid:
                env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
                workers[int(env["RANK"])] = int(pid)
        except (OSError, KeyError, ValueError):
            pass
    assert sorted(workers) == [0, 1]
    os.kill(workers[1], signal.SIGKILL)
    t0 = time.time()
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("torchrun still running 60 s after a rank was killed")
    print(f"torchrun ended {time.time() - t0:.1f} s after the kill, status {proc.returncode}")
    assert proc.returncode != 0
    assert not os.path.exists(f"/proc/{workers[0]}") or "zombie" in open(f"/proc/{workers[0]}/status").read()
    last = checkpoints(out)[-1]
    assert read_checkpoint(last)["step"] < steps
    r = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {last}" in r.stderr
    one = tmp_path / "one"
    train(TrainConfig(**tiny_args(folder, one, steps, ckpt_every=4)))
    assert_same_state(load_final(one, steps), load_final(out, steps), atol=1e-5)
