"""Benchmarks: one JSON object per figure, with the device, versions and settings.

    python -m benchmarks.bench                     # CPU: JiT-Ti/4 at 32 px; CUDA: JiT-B/16 at 256 px
    python -m benchmarks.bench --figures train sample --model JiT-Ti/8 --resolution 64
    python -m benchmarks.bench --model JiT-B/16 --resolution 256 --batch 64 --device cuda --method pixelrepa

Figures (``--figures``):
- ``train``: training images/s of one model and method (noising, forward, losses, backward, fused
  AdamW, two EMAs), ours against the reference-style path and timm's plain ViT; peak memory; model
  FLOPs per image and, on CUDA, the model FLOPs utilisation against the device's bf16 dense peak.
- ``sample``: class-conditional sampling images/s with classifier-free guidance, ours against the
  reference-style sampler; peak memory; how far their samples differ; alignment-head calls while
  sampling a model trained with a head.
- ``methods``: training step time of repa, adapter and pixelrepa relative to vanilla JiT, with cached
  targets and with the encoder run on every batch.
- ``inception``: Inception feature extraction (FID/KID) images/s.

The reference-style path (``benchmarks/reference.py``) is the same model run the way the reference
JiT code runs it: attention by hand with fp32 logits and softmax (a bias allocated per call), every
token through every block, eager, and guidance as two separate forwards (conditional, unconditional)
at every sampling step, blended with weight 1 outside the guidance interval. Ours is ``pixelrepa`` as
the study runs it: scaled_dot_product_attention, the last block pruned to the image tokens,
torch.compile, guidance batched into one forward and its unconditional half skipped where its weight
is 1, inference_mode. On CUDA both run under bf16 autocast, as the reference trains and samples.
Same model, weights, batch and steps.

Contenders are timed in interleaved rounds and the median round is reported, so that a noisy
neighbour on a shared machine slows every contender alike instead of one of them.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import timm
import timm.models.vision_transformer as vt
import torch
from torch.utils.flop_counter import FlopCounterMode
from torch_fidelity import FeatureExtractorInceptionV3

from pixelrepa import extractors
from pixelrepa.align import AlignConfig, Trainable, build_head, step_loss, token_mask
from pixelrepa.encoders import DINOv2, EncoderWeightsMissing, build_encoder
from pixelrepa.flow import FlowConfig, SamplerConfig, balanced_labels, generate, sample, sample_t
from pixelrepa.jit import JiT, count_params, jit_config
from pixelrepa.distributed import resolve_device
from pixelrepa.train import update_emas

from .memory import WHAT as MEMORY_WHAT, cpu_peak, cuda_peak, in_subprocess as memory_in_subprocess
from .reference import reference_sample, reference_style

ROOT = Path(__file__).resolve().parents[1]

# bf16 dense tensor-core peaks (no sparsity), from NVIDIA's data sheets; matched against the device
# name in order, first hit wins. Anything else: unknown, and the MFU is reported as null.
BF16_DENSE_PEAK_TFLOPS = (("H100", "PCIE", 756.0), ("H100", "NVL", 835.0), ("H100", "", 989.0),
                          ("H200", "", 989.0), ("A100", "", 312.0))

# The targets; each is a ratio from one run (same device, batch, steps and model).
TARGETS = {"cpu": {"speedup_vs_reference_style": 1.3, "vs_timm_vit": 1.0},
           "cuda": {"speedup_vs_reference_style": 1.5, "mfu_h100": 0.40, "mta_overhead": 0.15}}
GPU_TARGET_MODEL = "JiT-B/16"


# ----------------------------------------------------------------------------- contenders

@dataclass
class Contender:
    name: str
    step: Callable[[], None]  # one unit of timed work: a training step, or one sampling call
    images: int  # images per step
    warmup: Callable[[], None] | None = None  # compiles and allocates; default: two steps
    out: dict = field(default_factory=dict)  # what the last step produced (samples), for checks


def seeded_jit(model: str, resolution: int, num_classes: int, device: torch.device, perturb: bool = False) -> JiT:
    """The same weights for every contender of a figure. ``perturb``: add N(0, 0.02^2) to every weight,
    since an untrained JiT's zero-initialised output layer predicts 0 whatever its input, and
    samples of such a network agree whatever the sampler does."""
    torch.manual_seed(0)
    net = JiT(jit_config(model, resolution, num_classes))
    if perturb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g), alpha=0.02)
    return net.to(device)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as the reference trains and samples), fp32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def jit_train_step(net: JiT, batch: int, device: torch.device, flow: FlowConfig = FlowConfig(), ema_decays=(0.9999, 0.9996),
                   compile: bool = False, method: str = "jit", enc_dim: int = 1280, encoder=None, proj_hidden: int = 2048,
                   reference: bool = False):
    """The training loop's work on one batch: noising, x-pred forward, v-loss, AdamW, two EMAs.

    With an alignment ``method``, its head and loss too; targets are fixed tensors of width ``enc_dim``
    (cached features) unless an ``encoder`` is given, which then runs on every step. ``reference``:
    the JiT and its head turned reference-style (``reference.reference_style``).
    """
    acfg = AlignConfig(method, proj_hidden=proj_hidden)
    head = build_head(acfg, net.cfg, encoder.dim if encoder is not None else enc_dim)
    model = Trainable(net, head.to(device) if head is not None else None, acfg.depth(net.cfg))
    if reference:
        reference_style(model)
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
        with autocast(device):
            out = fwd(x)
        loss = ((out.float() - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def sample_step(net: JiT, batch: int, device: torch.device, scfg: SamplerConfig, compile: bool = False,
                reference: bool = False) -> Contender:
    """One class-conditional sampling call of ``batch`` images from fixed noise and balanced labels.
    Ours: ``flow.sample`` under inference_mode. ``reference``: ``reference.reference_sample`` (two
    forwards at every step) under torch.no_grad, as the reference samples; ``net`` is expected
    reference-style already. The warm-up samples with 2 steps, which evaluates both the guided
    (batched: 2 x batch) and the unguided (batch) shapes."""
    cfg = net.cfg
    net.eval().requires_grad_(False)
    y = balanced_labels(batch, cfg.num_classes).to(device)
    z = (scfg.noise_scale * torch.randn(batch, 3, cfg.input_size, cfg.input_size,
                                        generator=torch.Generator().manual_seed(0))).to(device)
    fwd = torch.compile(net, dynamic=False) if compile else net
    out = {}

    def run(sc: SamplerConfig):
        if reference:
            with torch.no_grad(), autocast(device):
                out["x"] = reference_sample(fwd, y, z, cfg.num_classes, sc)
        else:
            with torch.inference_mode(), autocast(device):
                out["x"] = sample(fwd, y, tuple(z.shape[1:]), cfg.num_classes, sc, z=z)
    return Contender("", lambda: run(scfg), batch, lambda: run(replace(scfg, steps=2)), out)


def make_contender(spec: dict, device: torch.device) -> Contender:
    """A contender from a JSON-able description, so that a fresh process can rebuild it (memory).
    ``spec["reference"]``: the reference-style path rather than ours."""
    kind, name = spec["kind"], spec["name"]
    model, res, C, batch = spec["model"], spec["resolution"], spec["num_classes"], spec["batch"]
    reference = spec.get("reference", False)
    if kind == "timm":
        cfg = jit_config(model, res, C)
        step = timm_vit_train_step(cfg.width, cfg.depth, cfg.num_heads, cfg.num_patches + cfg.in_context_len,
                                   cfg.patch_size, batch, device, compile=spec["compile"])
        return Contender(name, step, batch)
    net = seeded_jit(model, res, C, device, perturb=kind == "sample")
    if kind == "train":
        return Contender(name, jit_train_step(net, batch, device, compile=spec["compile"], method=spec["method"],
                                              proj_hidden=spec.get("proj_hidden", 2048), reference=reference), batch)
    if kind == "sample":
        scfg = SamplerConfig(steps=spec["steps"], cfg_scale=spec["cfg_scale"], max_batch=spec.get("max_batch", 0))
        c = sample_step(reference_style(net) if reference else net, batch, device, scfg, compile=spec["compile"],
                        reference=reference)
        c.name = name
        return c
    raise ValueError(f"unknown contender kind {kind!r}")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def race(contenders: list[Contender], device: torch.device, steps: int, rounds: int, warmup: int = 2) -> dict[str, float]:
    """images/s per contender: the median over interleaved rounds of ``steps`` steps each."""
    for c in contenders:
        if c.warmup is not None:
            c.warmup()
        else:
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


# ----------------------------------------------------------------------------- memory

def memory_child(spec: dict) -> dict:
    """Runs in a fresh process (``--memory_child``): one contender's memory on the CPU."""
    if spec.get("compile"):  # imported before the baseline: the compiler's modules are not the contender's memory
        importlib.import_module("torch._inductor.compile_fx")
    torch.set_flush_denormal(True)
    if spec["kind"] == "sample":  # a sampling call's peak is one guided forward's, whatever the step count
        spec = dict(spec, steps=min(spec["steps"], 2))
    return cpu_peak(lambda: make_contender(spec, torch.device("cpu")))


def build_and_measure(specs: list[dict], device: torch.device, measure: bool) -> tuple[list[Contender], Callable[[], dict]]:
    """The contenders, and a function giving their memory (call it after the race: on the CPU it
    runs one fresh process per contender, which would disturb the timings)."""
    if device.type == "cuda" and measure:
        built = [cuda_peak(lambda s=s: make_contender(s, device), device) for s in specs]
        mem = {s["name"]: m for s, (_, m) in zip(specs, built)}
        return [c for c, _ in built], lambda: mem
    contenders = [make_contender(s, device) for s in specs]
    if not measure:
        return contenders, lambda: {}
    return contenders, lambda: {s["name"]: memory_in_subprocess(s) for s in specs}


def peak_memory(device: torch.device, mem: dict) -> dict | None:
    return {"what": MEMORY_WHAT["cuda" if device.type == "cuda" else "cpu"], **mem} if mem else None


# ----------------------------------------------------------------------------- FLOPs

def bf16_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for chip, variant, tflops in BF16_DENSE_PEAK_TFLOPS:
        if chip in name and variant in name:
            return tflops * 1e12
    return None


def counted_flops(fn: Callable[[], None]) -> int:
    """Model FLOPs of ``fn``: matmuls, convolutions and attention, as torch.utils.flop_counter counts
    them (2 per multiply-add); elementwise work and the optimiser are not counted."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def train_flops_per_image(model: str, resolution: int, num_classes: int, batch: int, device: torch.device,
                          method: str = "jit", proj_hidden: int = 2048) -> float:
    """Forward and backward of one eager training step (with the method's head), per image."""
    net = seeded_jit(model, resolution, num_classes, device)
    return counted_flops(jit_train_step(net, batch, device, method=method, proj_hidden=proj_hidden)) / batch


def forward_calls(scfg: SamplerConfig, batch: int, reference: bool = False) -> tuple[int, int]:
    """(network calls, images through the network per sampled image) of one sampling call."""
    seen = []

    def net(z, t, y):
        seen.append(z.shape[0])
        return z
    y = torch.zeros(batch, dtype=torch.long)
    if reference:
        reference_sample(net, y, torch.zeros(batch, 1), 1, scfg)
    else:
        sample(net, y, (1,), 1, scfg)
    return len(seen), sum(seen) // batch


# ----------------------------------------------------------------------------- environment

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError, AttributeError):
        return re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).strip()
    return platform.processor() or "cpu"


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def environment(device: torch.device) -> dict:
    return {"device": device_name(device), "device_type": device.type, "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "load_avg_1_5_15min": [round(v, 2) for v in os.getloadavg()],
            "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
            "git": git_commit()}


def emit(record: dict):
    print(json.dumps(record), flush=True)


def target(what: str, value: float | None, goal: float, higher_is_better: bool = True) -> dict:
    met = None if value is None else (value >= goal if higher_is_better else value <= goal)
    return {"what": what, "target": goal, "measured": value, "met": met,
            "short_by": None if met is not False else round(abs(goal - value) / goal, 3)}


def fmt_rates(rates: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in rates.items()}


def precision(device: torch.device) -> str:
    return "bf16 autocast" if device.type == "cuda" else "fp32"


# ----------------------------------------------------------------------------- figures

def bench_train(model: str, resolution: int, batch: int, device: torch.device, steps: int, rounds: int,
                num_classes: int = 22, with_timm: bool = True, compile: bool = True, method: str = "jit",
                memory: bool = True, proj_hidden: int = 2048) -> dict:
    """Training images/s of ours (compiled when ``compile``, and eager), of the reference-style path
    (hand-written fp32 attention, every token through every block, eager) and, for vanilla JiT, of
    timm's ViT (eager and compiled)."""
    base = dict(kind="train", model=model, resolution=resolution, num_classes=num_classes, batch=batch,
                method=method, proj_hidden=proj_hidden)
    specs = [dict(base, name="pixelrepa", compile=compile)]
    if compile:
        specs.append(dict(base, name="pixelrepa_eager", compile=False))
    specs.append(dict(base, name="reference_style", reference=True, compile=False))
    with_timm = with_timm and method == "jit"
    if with_timm:
        for c in (False, True) if compile else (False,):
            specs.append(dict(base, kind="timm", name="timm_vit" + "_compiled" * c, compile=c))
    contenders, memory_of = build_and_measure(specs, device, memory)
    rates = race(contenders, device, steps, rounds)
    del contenders
    mem = memory_of()
    cfg = jit_config(model, resolution, num_classes)
    tokens = cfg.num_patches + cfg.in_context_len
    flops = train_flops_per_image(model, resolution, num_classes, batch, device, method, proj_hidden)
    peak = bf16_peak_flops(device)
    achieved = flops * rates["pixelrepa"]
    ratio = rates["pixelrepa"] / rates["reference_style"]
    rec = {"figure": "train", "model": model, "method": method, "resolution": resolution, "batch": batch,
           "settings": {"num_classes": num_classes, "params": count_params(seeded_jit(model, resolution, num_classes, "cpu")),
                        "image_tokens": cfg.num_patches, "total_tokens": tokens, "steps_per_round": steps,
                        "rounds": rounds, "compiled": compile, "precision": precision(device),
                        "step": "noising, forward, v-loss (+ alignment loss), backward, fused AdamW, two EMAs"},
           "images_per_s": fmt_rates(rates),
           "speedup_vs_reference_style": round(ratio, 3),
           "eager_speedup_vs_reference_style": round(rates.get("pixelrepa_eager", rates["pixelrepa"]) / rates["reference_style"], 3),
           "peak_memory": peak_memory(device, mem),
           "model_flops_per_image": flops, "achieved_tflops": round(achieved / 1e12, 4),
           "bf16_peak_tflops": None if peak is None else peak / 1e12,
           "mfu": None if peak is None else round(achieved / peak, 4)}
    targets = []
    if device.type == "cuda":
        if model == GPU_TARGET_MODEL:
            targets.append(target(f"{model} training images/s vs reference-style path", rec["speedup_vs_reference_style"],
                                  TARGETS["cuda"]["speedup_vs_reference_style"]))
            if "H100" in device_name(device).upper():
                targets.append(target(f"{model} training MFU on an H100", rec["mfu"], TARGETS["cuda"]["mfu_h100"]))
    else:
        targets.append(target(f"{model} training images/s vs reference-style path (CPU)", rec["speedup_vs_reference_style"],
                              TARGETS["cpu"]["speedup_vs_reference_style"]))
    if with_timm:
        best_timm = max(v for k, v in rates.items() if k.startswith("timm_vit"))
        rec["ratio_vs_timm_vit"] = round(rates["pixelrepa"] / rates["timm_vit"], 3)
        rec["ratio_vs_best_timm_vit"] = round(rates["pixelrepa"] / best_timm, 3)
        if device.type == "cpu":
            targets.append(target(f"{model} training images/s vs timm's ViT (faster of eager and compiled)",
                                  rec["ratio_vs_best_timm_vit"], TARGETS["cpu"]["vs_timm_vit"]))
    rec["targets"] = targets
    rec.update(environment(device))
    return rec


def head_free_sampling(model: str, resolution: int, num_classes: int, device: torch.device, scfg: SamplerConfig,
                       enc_dim: int = 768) -> dict:
    """Sampling a JiT trained with PixelREPA's adapter: the head's forward calls while sampling (as
    training samples, from a copy of the JiT), against one training forward, and the sampling FLOPs
    against a JiT that never had a head."""
    acfg = AlignConfig("pixelrepa")
    net = seeded_jit(model, resolution, num_classes, device)
    trainable = Trainable(net, build_head(acfg, net.cfg, enc_dim).to(device), acfg.depth(net.cfg))
    calls = []
    hook = trainable.head.register_forward_pre_hook(lambda m, a: calls.append(1))
    n, shape, short = 2, (3, resolution, resolution), replace(scfg, steps=2)
    try:
        with torch.no_grad():
            trainable(torch.zeros(n, *shape, device=device), torch.full((n,), 0.5, device=device),
                      torch.zeros(n, dtype=torch.long, device=device))
        in_training = len(calls)
        calls.clear()
        ema = copy.deepcopy(trainable.jit)
        with_head = counted_flops(lambda: generate(ema, n, num_classes, shape, short, batch_size=n, device=device,
                                                   progress=False))
    finally:
        hook.remove()
    plain = seeded_jit(model, resolution, num_classes, device)
    without = counted_flops(lambda: generate(plain, n, num_classes, shape, short, batch_size=n, device=device,
                                             progress=False))
    return {"head": "pixelrepa (masked transformer adapter)", "head_calls_in_one_training_forward": in_training,
            "head_calls_while_sampling": len(calls), "sampling_flops_trained_with_head": with_head,
            "sampling_flops_never_had_head": without,
            "sampling_overhead": (with_head - without) / without}


def sample_agreement(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> dict:
    """How far ours' samples are from the reference-style path's (same noise, labels and weights)."""
    a, b = a.float(), b.float()
    rel = ((a - b).norm() / b.norm()).item()
    tol = 2e-2 if device.type == "cuda" else 1e-3  # bf16 autocast on CUDA; fp32 on the CPU
    return {"max_abs_diff": (a - b).abs().max().item(), "relative_rms_diff": rel, "tolerance": tol,
            "precision": precision(device), "agree": rel <= tol}


def bench_sample(model: str, resolution: int, batch: int, device: torch.device, rounds: int, num_classes: int = 22,
                 sample_steps: int = 50, cfg_scale: float = 2.0, compile: bool = True, memory: bool = True,
                 max_batch: int | None = None) -> dict:
    """Class-conditional sampling images/s with guidance: ours (fused attention, guidance batched,
    compiled when ``compile``, inference_mode) against the reference-style sampler (hand-written fp32
    attention, two forwards at every step, no_grad, eager), with the default SamplerConfig otherwise.
    ``max_batch``: ours' largest network call (SamplerConfig.max_batch); default ``batch`` on the CPU,
    where two forwards of ``batch`` images are faster than one of twice as many, else no limit."""
    if max_batch is None:
        max_batch = 0 if device.type == "cuda" else batch
    base = dict(kind="sample", model=model, resolution=resolution, num_classes=num_classes, batch=batch,
                steps=sample_steps, cfg_scale=cfg_scale)
    ours = dict(base, max_batch=max_batch)
    specs = [dict(ours, name="pixelrepa", compile=compile)]
    if compile:
        specs.append(dict(ours, name="pixelrepa_eager", compile=False))
    specs.append(dict(base, name="reference_style", reference=True, compile=False))
    contenders, memory_of = build_and_measure(specs, device, memory)
    rates = race(contenders, device, 1, rounds, warmup=1)
    samples = {c.name: c.out["x"] for c in contenders}
    del contenders
    agreement = {k: sample_agreement(v, samples["reference_style"], device) for k, v in samples.items()
                 if k != "reference_style"}
    mem = memory_of()
    scfg = SamplerConfig(steps=sample_steps, cfg_scale=cfg_scale)
    calls = {s["name"]: forward_calls(replace(scfg, max_batch=s.get("max_batch", 0)), batch, s.get("reference", False))
             for s in specs}
    net = seeded_jit(model, resolution, num_classes, device)
    with torch.no_grad(), autocast(device):
        per_forward = counted_flops(lambda: net(torch.zeros(2, 3, resolution, resolution, device=device),
                                                torch.full((2,), 0.5, device=device),
                                                torch.zeros(2, dtype=torch.long, device=device))) / 2
    flops = per_forward * calls["pixelrepa"][1]
    peak = bf16_peak_flops(device)
    ratio = rates["pixelrepa"] / rates["reference_style"]
    rec = {"figure": "sample", "model": model, "resolution": resolution, "batch": batch,
           "settings": {"num_classes": num_classes, "sampler": scfg.method, "steps": sample_steps, "cfg_scale": cfg_scale,
                        "cfg_interval": list(scfg.cfg_interval), "ours_max_batch": max_batch,
                        "rounds": rounds, "calls_per_round": 1, "compiled": compile, "precision": precision(device),
                        "weights": "seeded init plus N(0, 0.02^2) on every weight (an untrained JiT outputs 0)"},
           "images_per_s": fmt_rates(rates),
           "speedup_vs_reference_style": round(ratio, 3),
           "eager_speedup_vs_reference_style": round(rates.get("pixelrepa_eager", rates["pixelrepa"]) / rates["reference_style"], 3),
           "network_calls_per_sampling_call": {k: v[0] for k, v in calls.items()},
           "network_images_per_sampled_image": {k: v[1] for k, v in calls.items()},
           "agreement_with_reference_style": agreement,
           "peak_memory": peak_memory(device, mem),
           "model_flops_per_image": flops, "achieved_tflops": round(flops * rates["pixelrepa"] / 1e12, 4),
           "mfu": None if peak is None else round(flops * rates["pixelrepa"] / peak, 4),
           "alignment_head": head_free_sampling(model, resolution, num_classes, device, scfg)}
    goal = TARGETS["cuda" if device.type == "cuda" else "cpu"]["speedup_vs_reference_style"]
    rec["targets"] = [] if device.type == "cuda" and model != GPU_TARGET_MODEL else [
        target(f"{model} sampling images/s vs reference-style path ({device.type})", rec["speedup_vs_reference_style"], goal),
        target("sampling overhead of an alignment head", rec["alignment_head"]["sampling_overhead"], 0.0, False)]
    rec.update(environment(device))
    return rec


def timing_encoder(name: str, grid: int, device: torch.device):
    """The encoder for per-batch targets. Without DINOv2 weights on this machine: the same
    architecture randomly initialised (its cost is the same; its features are not)."""
    try:
        return build_encoder(name, grid, device=device), "pretrained"
    except EncoderWeightsMissing:
        if name != "dinov2-b14":
            raise
    size = 16 * grid
    net = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, img_size=size, patch_size=16)
    return DINOv2(net, grid, size, "random-init").to(device), "random init (no weights here; timing only)"


def bench_methods(model: str, resolution: int, batch: int, device: torch.device, steps: int, rounds: int,
                  num_classes: int = 22, encoder: str | None = "effnet-lite0", proj_hidden: int = 2048,
                  compile: bool = False) -> dict:
    """Training step cost of repa, adapter and pixelrepa relative to vanilla jit: with cached targets
    (a fixed feature tensor) and, when ``encoder`` is given, with the encoder run on every batch."""
    def step(method, enc=None):
        net = seeded_jit(model, resolution, num_classes, device)
        return Contender(method + ("+encoder" if enc is not None else ""),
                         jit_train_step(net, batch, device, method=method, encoder=enc, proj_hidden=proj_hidden,
                                        compile=compile), batch)
    contenders = [step(m) for m in ("jit", "repa", "adapter", "pixelrepa")]
    enc_name = enc_weights = None
    if encoder:
        enc, enc_weights = timing_encoder(encoder, jit_config(model, resolution, num_classes).grid, device)
        enc_name = enc.name
        contenders += [step(m, enc) for m in ("repa", "pixelrepa")]
    rates = race(contenders, device, steps, rounds)
    base = rates["jit"]
    cost = {k: round(base / v, 3) for k, v in rates.items()}
    rec = {"figure": "methods", "model": model, "resolution": resolution, "batch": batch,
           "settings": {"num_classes": num_classes, "proj_hidden": proj_hidden, "encoder": enc_name,
                        "encoder_weights": enc_weights, "compiled": compile, "steps_per_round": steps, "rounds": rounds,
                        "precision": precision(device)},
           "images_per_s": fmt_rates(rates), "step_time_vs_jit": cost,
           "mta_overhead_cached_targets": round(cost["pixelrepa"] - 1, 3),
           "mta_overhead_encoder_included": round(cost["pixelrepa+encoder"] - 1, 3) if encoder else None}
    rec["targets"] = [target(f"MTA step overhead, {model}, {enc_name} run on every batch",
                             rec["mta_overhead_encoder_included"], TARGETS["cuda"]["mta_overhead"], False)] \
        if device.type == "cuda" and model == GPU_TARGET_MODEL and encoder else []
    rec.update(environment(device))
    return rec


def bench_inception(n: int = 128, device: torch.device | str = "cpu", batch_size: int = 32, resolution: int = 32,
                    data_dir: str | Path = ROOT / "data") -> dict:
    """Inception feature extraction images/s (uint8 input, resize to 299 included) with the network and
    weights FID uses (``extractors.inception_weights``), after one warm-up batch."""
    device = torch.device(device)
    path, _ = extractors.inception_weights(data_dir)
    net = FeatureExtractorInceptionV3(extractors.INCEPTION, ["2048"], feature_extractor_weights_path=str(path)).to(device)
    x = torch.randint(0, 256, (n, 3, resolution, resolution), generator=torch.Generator().manual_seed(0),
                      dtype=torch.uint8).to(device)
    timed = []
    with torch.no_grad():
        net(x[:batch_size])  # warm-up: allocations, cuDNN / oneDNN kernel choice
        sync(device)
        start = time.perf_counter()
        for i in range(0, n, batch_size):
            timed.append(net(x[i:i + batch_size])[0].shape)
        sync(device)
        seconds = time.perf_counter() - start
    return {"figure": "inception", "images_per_s": round(n / seconds, 2),
            "settings": {"seconds": seconds, "n": n, "batch_size": batch_size, "resolution": resolution,
                         "timed_images": sum(s[0] for s in timed), "timed_calls": len(timed),
                         "feature_dim": timed[0][1], "device": str(device), "threads": torch.get_num_threads(),
                         "weights": path.name},
            **environment(device)}


# ----------------------------------------------------------------------------- command line

def default_resolution(model: str) -> int:
    """256 px for the paper's sizes; 64 image tokens (8 x 8 patches) for the small CPU sizes."""
    patch = jit_config(model, 256, 1).patch_size
    return 8 * patch if model.split("-")[1][0] in "TS" else 256


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=None, help="registry names (default: JiT-Ti/4 on the CPU, JiT-B/16 on CUDA)")
    p.add_argument("--resolution", nargs="+", type=int, default=None,
                   help="one per --model (default: 256 px for B/L/H, 8 patches a side for Ti and S)")
    p.add_argument("--num_classes", type=int, default=None, help="default: 22 on the CPU (openclipart), 1000 on CUDA")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--method", default="jit", choices=["jit", "repa", "adapter", "pixelrepa"],
                   help="what the train figure trains")
    p.add_argument("--steps", type=int, default=5, help="training steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sample_batch", type=int, default=None, help="images per sampling call (default: 32 CPU, 64 CUDA)")
    p.add_argument("--sample_steps", type=int, default=50, help="sampler steps (Heun)")
    p.add_argument("--sample_rounds", type=int, default=3, help="timed rounds of one sampling call each")
    p.add_argument("--cfg_scale", type=float, default=2.0)
    p.add_argument("--sample_max_batch", type=int, default=None,
                   help="ours' largest network call while sampling (default: --sample_batch on the CPU, "
                        "where two forwards of a batch beat one of twice as many; no limit on CUDA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no_timm", action="store_true")
    p.add_argument("--no_compile", action="store_true", help="skip torch.compile (saves minutes of compilation)")
    p.add_argument("--no_memory", action="store_true", help="skip the peak memory measurements")
    p.add_argument("--figures", nargs="+", default=["inception", "train", "sample", "methods"],
                   choices=["train", "sample", "methods", "inception"])
    p.add_argument("--inception_images", type=int, default=128, help="images of the inception figure")
    p.add_argument("--encoder", default=None, help="per-batch encoder of the methods figure "
                   "(default: effnet-lite0 on the CPU, dinov2-b14 on CUDA; 'none' to skip)")
    p.add_argument("--proj_hidden", type=int, default=2048, help="REPA projector width for the method costs")
    p.add_argument("--memory_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.memory_child:
        print(json.dumps(memory_child(json.loads(a.memory_child))), flush=True)
        return
    device = resolve_device(a.device)
    cuda = device.type == "cuda"
    torch.set_flush_denormal(True)  # as training does: denormals made single contenders 5x slower
    models = a.model or [GPU_TARGET_MODEL if cuda else "JiT-Ti/4"]
    resolutions = a.resolution or [default_resolution(m) for m in models]
    if len(resolutions) != len(models):
        p.error("give one --resolution per --model")
    num_classes = a.num_classes or (1000 if cuda else 22)
    sample_batch = a.sample_batch or (64 if cuda else 32)
    encoder = a.encoder or ("dinov2-b14" if cuda else "effnet-lite0")
    compile = not a.no_compile
    if "inception" in a.figures:
        emit(bench_inception(n=a.inception_images, device=device))
    for model, res in zip(models, resolutions):
        if "train" in a.figures:
            emit(bench_train(model, res, a.batch, device, a.steps, a.rounds, num_classes, with_timm=not a.no_timm,
                             compile=compile, method=a.method, memory=not a.no_memory, proj_hidden=a.proj_hidden))
        if "sample" in a.figures:
            emit(bench_sample(model, res, sample_batch, device, a.sample_rounds, num_classes, a.sample_steps,
                              a.cfg_scale, compile=compile, memory=not a.no_memory, max_batch=a.sample_max_batch))
        if "methods" in a.figures:
            emit(bench_methods(model, res, a.batch, device, a.steps, a.rounds, num_classes,
                               encoder=None if encoder == "none" else encoder, proj_hidden=a.proj_hidden,
                               compile=compile and cuda))


if __name__ == "__main__":
    main()
