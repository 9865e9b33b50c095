"""Benchmarks: one JSON object per figure, with the device, versions and settings.

    python -m pixelrepa.bench                      # the default CPU model at 32 and 64 px
    python -m pixelrepa.bench --model JiT-B/16 --resolution 256 --batch 64 --device cuda

Contenders are timed in interleaved rounds and the median round is reported, so that a noisy
neighbour on a shared machine slows every contender alike instead of one of them.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from .flow import FlowConfig, sample_t
from .jit import JiT, count_params, jit_config


@dataclass
class Contender:
    name: str
    step: callable  # one training step on a fixed batch
    images: int  # images per step


def jit_train_step(net: JiT, batch: int, device: torch.device, flow: FlowConfig = FlowConfig(), ema_decays=(0.9999, 0.9996),
                   compile: bool = False, method: str = "jit", enc_dim: int = 1280, encoder=None, proj_hidden: int = 2048):
    """The training loop's work on one batch: noising, x-pred forward, v-loss, AdamW, two EMAs.

    With an alignment ``method``, its head and loss too; targets are fixed tensors of width ``enc_dim``
    (cached features) unless an ``encoder`` is given, which then runs on every step.
    """
    from .align import AlignConfig, build_head, token_mask
    from .train import Trainable, step_loss, update_emas
    acfg = AlignConfig(method, proj_hidden=proj_hidden)
    head = build_head(acfg, net.cfg, encoder.dim if encoder is not None else enc_dim)
    model = Trainable(net, head.to(device) if head is not None else None, acfg.depth(net.cfg))
    fwd = torch.compile(model) if compile else model
    res, C = net.cfg.input_size, net.cfg.num_classes
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, res, res, generator=g) * 2 - 1).to(device)
    y = torch.randint(0, C + 1, (batch,), generator=g).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    params = list(net.parameters())
    target = torch.randn(batch, net.cfg.num_patches, enc_dim, generator=g).to(device)
    emas = [[p.detach().clone() for p in params] for _ in ema_decays]

    def step():
        t = sample_t(batch, flow, g).to(device)
        e = flow.noise_scale * torch.randn(x.shape, generator=g).to(device)
        mask = token_mask(batch, net.cfg.num_patches, acfg.ratio, g)
        loss, _, _ = step_loss(fwd, x, y, t, e, flow.t_eps, None if mask is None else mask.to(device),
                               lambda: target if encoder is None else encoder(x), acfg.loss_coef)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_emas(emas, params, ema_decays)
    return step


def timm_vit_train_step(width: int, depth: int, heads: int, tokens: int, patch: int, batch: int, device: torch.device,
                        compile: bool = False):
    """timm's plain VisionTransformer with the same width, depth and total token count: forward,
    MSE on its tokens, backward, AdamW (no EMA, no noising: a floor for the network itself)."""
    import timm.models.vision_transformer as vt
    rows = 8
    assert tokens % rows == 0
    vit = vt.VisionTransformer(img_size=(rows * patch, tokens // rows * patch), patch_size=patch, embed_dim=width,
                               depth=depth, num_heads=heads, class_token=False, global_pool="", num_classes=0).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, rows * patch, tokens // rows * patch, generator=g).to(device)
    target = torch.randn(batch, tokens, width, generator=g).to(device)
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    fwd = torch.compile(vit) if compile else vit  # global_pool='' and no head: forward returns the tokens

    def step():
        loss = ((fwd(x) - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def race(contenders: list[Contender], device: torch.device, steps: int, rounds: int, warmup: int = 2) -> dict[str, float]:
    """images/s per contender: the median over interleaved rounds of ``steps`` steps each."""
    for c in contenders:
        for _ in range(warmup):
            c.step()
    rates = {c.name: [] for c in contenders}
    for _ in range(rounds):
        for c in contenders:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                c.step()
            sync(device)
            rates[c.name].append(c.images * steps / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


def environment(device: torch.device) -> dict:
    import timm
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "device_type": device.type, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "timm": timm.__version__, "python": platform.python_version()}
    return env


def emit(record: dict):
    print(json.dumps(record), flush=True)


def bench_train(model: str, resolution: int, batch: int, device: torch.device, steps: int, rounds: int,
                num_classes: int = 22, with_timm: bool = True, compile: bool = True) -> dict:
    """Training images/s of our JiT (eager, and compiled when ``compile``), of the reference-style
    path (hand-written fp32 attention, eager) and of timm's ViT (eager and compiled)."""
    def jit(**kw):
        torch.manual_seed(0)
        return JiT(jit_config(model, resolution, num_classes, **kw)).to(device)
    ours, ref = jit(), jit(attn_impl="reference")
    cfg = ours.cfg
    tokens = cfg.num_patches + cfg.in_context_len
    contenders = [Contender("pixelrepa", jit_train_step(ours, batch, device), batch),
                  Contender("reference_style", jit_train_step(ref, batch, device), batch)]
    if compile:
        contenders.append(Contender("pixelrepa_compiled", jit_train_step(jit(), batch, device, compile=True), batch))
    if with_timm:
        for c in (False, True) if compile else (False,):
            contenders.append(Contender("timm_vit" + "_compiled" * c, timm_vit_train_step(
                cfg.width, cfg.depth, cfg.num_heads, tokens, cfg.patch_size, batch, device, compile=c), batch))
    rates = race(contenders, device, steps, rounds)
    best = max(rates["pixelrepa"], rates.get("pixelrepa_compiled", 0))
    rec = {"figure": "train_images_per_s", "model": model, "resolution": resolution, "batch": batch,
           "params": count_params(ours), "image_tokens": cfg.num_patches, "total_tokens": tokens,
           "steps_per_round": steps, "rounds": rounds, **{k: round(v, 2) for k, v in rates.items()},
           "speedup_vs_reference_style": round(best / rates["reference_style"], 3),
           "eager_speedup_vs_reference_style": round(rates["pixelrepa"] / rates["reference_style"], 3)}
    if with_timm:
        rec["ratio_vs_timm_vit"] = round(best / rates["timm_vit"], 3)
        if compile:
            rec["ratio_vs_timm_vit_compiled"] = round(best / rates["timm_vit_compiled"], 3)
    rec.update(environment(device))
    return rec


def bench_methods(model: str, resolution: int, batch: int, device: torch.device, steps: int, rounds: int,
                  num_classes: int = 22, encoder: str | None = "effnet-lite0", proj_hidden: int = 2048,
                  compile: bool = False) -> dict:
    """Training step cost of repa, adapter and pixelrepa relative to vanilla jit: with cached targets
    (a fixed feature tensor) and, when ``encoder`` is given, with the encoder run on every batch."""
    def step(method, enc=None):
        torch.manual_seed(0)
        net = JiT(jit_config(model, resolution, num_classes)).to(device)
        return Contender(method + ("+encoder" if enc is not None else ""),
                         jit_train_step(net, batch, device, method=method, encoder=enc, proj_hidden=proj_hidden,
                                        compile=compile), batch)
    contenders = [step(m) for m in ("jit", "repa", "adapter", "pixelrepa")]
    enc_name = None
    if encoder:
        from .encoders import build_encoder
        grid = resolution // jit_config(model, resolution, num_classes).patch_size
        enc = build_encoder(encoder, grid, device=device)
        enc_name = enc.name
        contenders += [step(m, enc) for m in ("repa", "pixelrepa")]
    rates = race(contenders, device, steps, rounds)
    base = rates["jit"]
    rec = {"figure": "method_step_cost", "model": model, "resolution": resolution, "batch": batch,
           "proj_hidden": proj_hidden, "encoder": enc_name, "compiled": compile,
           "images_per_s": {k: round(v, 2) for k, v in rates.items()},
           "step_time_vs_jit": {k: round(base / v, 3) for k, v in rates.items()}}
    rec.update(environment(device))
    return rec


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pixelrepa.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=None, help="registry names (default: JiT-Ti/4 at 32 px, JiT-Ti/8 at 64 px)")
    p.add_argument("--resolution", nargs="+", type=int, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--no_timm", action="store_true")
    p.add_argument("--no_compile", action="store_true", help="skip the torch.compile contenders (saves ~2 min)")
    p.add_argument("--figures", nargs="+", default=["inception", "train", "methods"], choices=["train", "methods", "inception"])
    p.add_argument("--proj_hidden", type=int, default=2048, help="REPA projector width for the method costs")
    a = p.parse_args(argv)
    from .train import resolve_device
    device = resolve_device(a.device)
    torch.set_flush_denormal(True)  # as training does: denormals made single contenders 5x slower
    models = a.model or ["JiT-Ti/4", "JiT-Ti/8"]
    resolutions = a.resolution or [32, 64][:len(models)]
    if len(resolutions) != len(models):
        p.error("give one --resolution per --model")
    if "inception" in a.figures:
        from .metrics import bench_inception
        rec = bench_inception(n=128, device=device)
        emit({"figure": "inception_images_per_s", "images_per_s": round(rec.pop("images_per_s"), 2), **rec,
              **environment(device)})
    for model, res in zip(models, resolutions):
        if "train" in a.figures:
            emit(bench_train(model, res, a.batch, device, a.steps, a.rounds, with_timm=not a.no_timm,
                             compile=not a.no_compile))
        if "methods" in a.figures:
            emit(bench_methods(model, res, a.batch, device, a.steps, a.rounds, proj_hidden=a.proj_hidden))


if __name__ == "__main__":
    main()
