"""CUDA tests, skipped without a GPU (scripts/gpu_check.py runs them on one): a bf16 autocast training
step for each method, torch.compile, DINOv2 on the GPU, a one-process nccl run of training and of the
evaluate command. Their bf16 autocast code is the CPU's too, which the ordinary tests exercise
(test_evaluate.py::test_bf16_autocast_runs_on_the_cpu)."""
import datetime
import math
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import make_image_folder
from pixelrepa.align import METHODS, AlignConfig, Trainable, build_head, step_loss, token_mask
from pixelrepa.flow import FlowConfig, sample_t
from pixelrepa.jit import build_jit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def batch(net, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    res, C = net.cfg.input_size, net.cfg.num_classes
    x = torch.rand(B, 3, res, res, generator=g) * 2 - 1
    return x, torch.randint(0, C + 1, (B,), generator=g), sample_t(B, FlowConfig(), g), torch.randn(x.shape, generator=g)


@pytest.mark.parametrize("method", METHODS)
def test_a_bf16_training_step_of_each_method(method):
    """JiT-B/16 at 256 px: step_loss runs under bf16 autocast on CUDA; the loss agrees with fp32 on the
    CPU (same weights and batch) to bf16 precision, and one AdamW step moves finite weights."""
    torch.manual_seed(0)
    jit = build_jit("JiT-B/16", 256, 1000)
    with torch.no_grad():  # an untrained JiT predicts 0 whatever it sees: perturb it
        for p in jit.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    acfg = AlignConfig(method)
    head = build_head(acfg, jit.cfg, 768)
    net = Trainable(jit, head, acfg.depth(jit.cfg))
    x, y, t, e = batch(jit, 4)
    mask = token_mask(4, jit.cfg.num_patches, acfg.ratio, torch.Generator().manual_seed(1))
    target = torch.randn(4, jit.cfg.num_patches, 768, generator=torch.Generator().manual_seed(2))
    cpu_loss, _, _ = step_loss(net, x, y, t, e, 0.05, mask, lambda: target, acfg.loss_coef)
    net.to(CUDA)
    seen = []
    hook = jit.final_layer.linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loss, _, _ = step_loss(net, x.to(CUDA), y.to(CUDA), t.to(CUDA), e.to(CUDA), 0.05,
                           None if mask is None else mask.to(CUDA), lambda: target.to(CUDA), acfg.loss_coef)
    hook.remove()
    assert seen == [torch.bfloat16]
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(cpu_loss.item(), rel=5e-2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    before = jit.final_layer.linear.weight.detach().clone()
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert not torch.equal(before, jit.final_layer.linear.weight)


def test_compiled_forward_and_step_match_eager():
    torch.manual_seed(0)
    jit = build_jit("JiT-B/16", 256, 1000).to(CUDA)
    with torch.no_grad():
        for p in jit.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    x, y, t, e = (v.to(CUDA) for v in batch(jit, 8))
    compiled = torch.compile(jit)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = jit(x, t, y).float(), compiled(x, t, y).float()
    assert ((a - b).norm() / a.norm()).item() < 2e-2
    net = torch.compile(Trainable(jit))
    loss, _, _ = step_loss(net, x, y, t, e, 0.05)
    loss.backward()
    assert math.isfinite(loss.item()) and all(p.grad is not None and torch.isfinite(p.grad).all()
                                              for p in jit.parameters())


def test_dinov2_on_the_gpu(record_property):
    """DINOv2-B/14 at PixelREPA's grid (256 px, patch 16: 16 x 16 tokens). Its weights where this
    machine has them; else the same architecture randomly initialised (the code path, not the features)."""
    from benchmarks.bench import timing_encoder
    enc, weights = timing_encoder("dinov2-b14", 16, CUDA)
    record_property("dinov2_weights", weights)
    x = torch.rand(4, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = enc(x.to(CUDA))
    assert out.shape == (4, 256, 768) and out.dtype == torch.float32 and torch.isfinite(out).all()
    ref = enc.to("cpu")(x)
    assert torch.allclose(out.cpu(), ref, atol=1e-3, rtol=1e-3)


def test_one_process_nccl_training_and_evaluation(tmp_path):
    """train() and evaluate() with an nccl process group of one: their barriers, all_reduce and
    all_gather_object run through NCCL."""
    from pixelrepa import evaluate as ev
    from pixelrepa.extractors import inception_weights
    from pixelrepa.storage import read_checkpoint
    from pixelrepa.train import TrainConfig, train
    try:
        inception_weights(str(tmp_path / "data"))
    except FileNotFoundError as err:
        pytest.skip(f"no Inception weights here ({err}); scripts/gpu_check.py provides random-init ones")
    folder = make_image_folder(tmp_path / "folder", classes=4, per_class=8, size=64)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=120))
    torch.cuda.set_device(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = train(TrainConfig(model="JiT-S/4", dataset=str(folder), resolution=32, data_dir=str(tmp_path / "data"),
                                    out_dir=str(tmp_path / "run"), steps=4, batch_size=8, blr=1e-3, warmup_epochs=0,
                                    ckpt_every=2, num_samples=4, sample_steps=2, progress=False, device="cuda",
                                    ema_decays=(0.5, 0.6)))
        assert read_checkpoint(out / "ckpt-00000004.pt")["step"] == 4
        np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048) * 0.01)
        (row,) = ev.evaluate(ev.EvalConfig(checkpoint=str(out), ref_stats=str(tmp_path / "stats.npz"), per_class=4,
                                           steps=3, batch_size=5, out_dir=str(tmp_path / "eval"), device="cuda",
                                           data_dir=str(tmp_path / "data"), progress=False, save_npz=True))
        assert row["world_size"] == 1 and row["precision"] == "bf16 autocast" and math.isfinite(row["fid"])
        assert np.load(tmp_path / "eval" / "samples-cfg1.npz")["arr_0"].shape == (16, 32, 32, 3)
    finally:
        dist.destroy_process_group()
