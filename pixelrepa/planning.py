"""Planning figures for each profile: FLOPs, images, GPU-hours and memory per GPU. Estimates, each with
its formula; the FLOPs and the activations are measured, the rest is arithmetic on them.

    python -m pixelrepa.planning                     # every profile, a Markdown table
    python -m pixelrepa.planning --profiles paper gpu --mfu 0.35 --json plan.json

Measured (shapes only: the networks run on fake tensors, torch's FakeTensorMode, so JiT-H costs no
memory or time here; bf16 autocast as on CUDA for profiles that train there):
- FLOPs per training image: torch.utils.flop_counter.FlopCounterMode over one step's forward and
  backward of the JiT with the method's head (matmuls, convolutions, attention: 2 per multiply-add;
  elementwise work and the optimizer are not counted), per image; plus the frozen encoder's forward
  where it runs on every batch (datasets other than the built-in ones, whose targets are cached once).
- FLOPs per sample: one inference forward per image, times the forwards the sampler makes per sample
  (counted by running flow.sample: Heun, guidance batched and skipped outside its interval).
- Activations: the bytes autograd saves for the backward (dtypes as autocast leaves them, views
  counted once) at batch 1 and 2, fitted as a + b x batch and taken at the per-GPU batch.

Arithmetic:
- images trained = steps x batch_size per run; runs = the study's plan (study.plan).
- training FLOPs = images x (train FLOPs per image + encoder FLOPs per image if not cached), plus
  2 x N_train encoder forwards once where targets are cached; evaluation FLOPs = evaluations x
  eval_samples x FLOPs per sample (eval_steps) + num_samples x FLOPs per sample (sample_steps).
- GPU-hours = FLOPs / (peak bf16 dense FLOP/s x MFU) / 3600, summed over a profile's runs (on n GPUs
  the wall time is that / n). Peaks: H100 SXM and H200 989, A100 312 TFLOP/s.
- memory per GPU = 4 B x (params + grads) + 8 B x params (AdamW) for the JiT and head, + 4 B x JiT
  params per EMA, + 4 B x encoder params where it runs on the GPU, + 4 B x trainable params of DDP
  buckets when nproc > 1, + activations (a + b x per-GPU batch). The allocator's peak adds transient
  buffers (the largest backward temporaries, the optimizer step): read it off the GPU bench.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from dataclasses import asdict, dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .align import Trainable, build_head, cosine_loss
from .data import DATASETS
from .encoders import DINOv2, EffNetLite0, default_image_size
from .flow import SamplerConfig, add_noise, sample, v_loss
from .jit import JiT, jit_config
from .study import load_profile, plan, profiles, run_config
from .train import TrainConfig

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # bf16 dense, NVIDIA data sheets (SXM)
DEFAULT_MFU = 0.40
CLASSES = {"openclipart": 22, "fashion-mnist": 10}  # an ImageFolder: ImageNet's 1000 (an assumption)
TRAIN_IMAGES = {"openclipart": 6210, "fashion-mnist": 60000}  # train splits (openclipart: 90% of 6,900)
IMAGENET_TRAIN = 1_281_167


@dataclass
class RunFigures:
    """One (model, resolution, method) of a profile, as the figures above define them."""
    profile: str
    model: str
    resolution: int
    method: str
    runs: int  # seeds
    params_jit: int
    params_head: int
    params_encoder: int
    train_gflop_per_image: float
    encoder_gflop_per_image: float
    targets_cached: bool
    sample_gflop_per_sample: float  # at the profile's eval_steps, cfg_scale
    images_per_run: int
    train_pflop_per_run: float
    eval_pflop_per_run: float
    gpu_hours: dict  # device -> GPU-hours for all `runs` at the stated MFU
    per_gpu_batch: int
    activation_mib: tuple  # (a, b): saved activations = a + b x batch
    memory_gib_per_gpu: dict  # part -> GiB


# torch counts the CUDA kernels of scaled_dot_product_attention but not the CPU one, which runs here:
# the same formulas for it (4 N_q N_k d forward, twice and a half that backward)
CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v)}


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)


@functools.lru_cache(maxsize=4)
def _encoder_net(name: str, grid: int):
    """The frozen encoder's network, randomly initialised (its FLOPs and size are its own; it is built for
    real, outside the fake-tensor mode, whose shapes-only tensors cannot run timm's initialisation),
    its input size and its forward. (Lazy imports: only the methods with an encoder need them, and
    effnet-lite0's packages are not on every machine.)"""
    size = default_image_size(name, grid)
    if name == "dinov2-b14":
        import timm
        return timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, img_size=size,
                                 patch_size=size // grid).eval(), size, lambda net, x: net.forward_features(x)
    from efficientnet_lite_pytorch import EfficientNet
    return EfficientNet.from_name("efficientnet-lite0", image_size=None).eval(), size, \
        lambda net, x: net.extract_features(x)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves while ``fn()`` runs, each storage once."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s._cdata] = s.nbytes()  # the storage's address: views of one tensor count once
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def training_loss(net: Trainable, cfg: TrainConfig, B: int, bf16: bool) -> torch.Tensor:
    """The training objective of ``B`` random images (v-loss plus the method's alignment term), as
    align.step_loss computes it, with bf16 autocast on whatever device the tensors are."""
    x = torch.randn(B, 3, cfg.resolution, cfg.resolution)
    t, e, y = torch.rand(B), torch.randn(B, 3, cfg.resolution, cfg.resolution), torch.zeros(B, dtype=torch.long)
    z = add_noise(x, t, e)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        x_pred, pred = net(z, t, y)
    loss = v_loss(x_pred.float(), x, z, t, cfg.t_eps).mean()
    if pred is not None:
        loss = loss + cfg.align.loss_coef * cosine_loss(pred, torch.randn(pred.shape))[0]
    return loss


def measure(cfg: TrainConfig, num_classes: int, bf16: bool) -> dict:
    """FLOPs of a training step and of an inference forward per image, parameter counts and saved
    activations at batch 1 and 2 of ``cfg``'s model and method, on fake tensors."""
    acfg = cfg.align
    if acfg.enabled:
        _encoder_net(cfg.encoder, cfg.resolution // jit_config(cfg.model, cfg.resolution, 1).patch_size)
    with FakeTensorMode(allow_non_fake_inputs=True):
        jcfg = jit_config(cfg.model, cfg.resolution, num_classes, attn_drop=cfg.attn_drop, proj_drop=cfg.proj_drop)
        jit = JiT(jcfg)
        enc_dim = {c.name: c.dim for c in (DINOv2, EffNetLite0)}[cfg.encoder]
        head = build_head(acfg, jcfg, enc_dim) if acfg.enabled else None
        net = Trainable(jit, head, acfg.depth(jcfg) if head is not None else 0)
        enc = _encoder_net(cfg.encoder, jcfg.grid) if acfg.enabled else None
        out = {"params_jit": sum(p.numel() for p in jit.parameters()),
               "params_head": sum(p.numel() for p in head.parameters()) if head is not None else 0,
               "params_encoder": sum(p.numel() for p in enc[0].parameters()) if enc else 0}
        with flop_counter() as fc:
            training_loss(net, cfg, 2, bf16).backward()
        out["train_flop_per_image"] = fc.get_total_flops() / 2
        a1, a2 = (_saved_bytes(lambda: training_loss(net, cfg, B, bf16)) for B in (1, 2))
        out["activation_bytes"] = (2 * a1 - a2, a2 - a1)  # a + b x batch through both points
        with torch.no_grad(), flop_counter() as fc, \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            jit(torch.randn(2, 3, cfg.resolution, cfg.resolution), torch.rand(2), torch.zeros(2, dtype=torch.long))
        out["forward_flop_per_image"] = fc.get_total_flops() / 2
        out["encoder_flop_per_image"] = 0.0
        if enc is not None:
            with torch.no_grad(), flop_counter() as fc, \
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                enc[2](enc[0], torch.randn(2, 3, enc[1], enc[1]))
            out["encoder_flop_per_image"] = fc.get_total_flops() / 2
    return out


def forwards_per_sample(scfg: SamplerConfig) -> int:
    """Network images per sampled image of flow.sample with ``scfg`` (guidance doubles a forward)."""
    seen = []

    def stub(z, t, y):
        seen.append(z.shape[0])
        return z
    sample(stub, torch.zeros(1, dtype=torch.long), (1,), 1, scfg)
    return sum(seen)


def evaluations(cfg: TrainConfig) -> int:
    return 0 if not cfg.eval_every else math.ceil(cfg.steps / cfg.eval_every)


def profile_figures(name: str, mfu: float = DEFAULT_MFU) -> list[RunFigures]:
    P = load_profile(name)
    counts: dict[tuple, int] = {}
    for m, res, seed in plan(P):
        counts[(m, res)] = counts.get((m, res), 0) + 1
    gpu = P.device == "cuda"
    nproc = P.nproc
    num_classes = CLASSES.get(P.dataset, 1000)
    n_train = P.train_images or TRAIN_IMAGES.get(P.dataset, IMAGENET_TRAIN)
    rows = []
    for (method, res), runs in counts.items():
        cfg = run_config(P, method, res, P.seeds[0])
        f = measure(cfg, num_classes, bf16=gpu)
        cached = cfg.align.enabled and cfg.cache_targets and cfg.dataset in DATASETS
        images = cfg.steps * cfg.batch_size
        enc = f["encoder_flop_per_image"]
        train = images * (f["train_flop_per_image"] + (0 if cached else enc)) + (2 * n_train * enc if cached else 0)
        per_eval = forwards_per_sample(SamplerConfig(steps=cfg.eval_steps, cfg_scale=cfg.cfg_scale))
        per_grid = forwards_per_sample(SamplerConfig(steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale))
        fwd = f["forward_flop_per_image"]
        evals = evaluations(cfg) * cfg.eval_samples * per_eval * fwd + cfg.num_samples * per_grid * fwd
        total = runs * (train + evals)
        b = cfg.batch_size // nproc
        trainable = f["params_jit"] + f["params_head"]
        a, per = f["activation_bytes"]
        mem = {"weights_grads_adamw": 16 * trainable, "emas": 4 * f["params_jit"] * len(cfg.ema_decays),
               "encoder": 0 if cached else 4 * f["params_encoder"], "ddp_buckets": 4 * trainable if nproc > 1 else 0,
               "activations": a + per * b}
        mem = {k: round(v / 2 ** 30, 2) for k, v in mem.items()}
        mem["total"] = round(sum(mem.values()), 2)
        rows.append(RunFigures(
            profile=P.profile, model=cfg.model, resolution=res, method=method, runs=runs,
            params_jit=f["params_jit"], params_head=f["params_head"], params_encoder=f["params_encoder"],
            train_gflop_per_image=round(f["train_flop_per_image"] / 1e9, 3), encoder_gflop_per_image=round(enc / 1e9, 3),
            targets_cached=cached, sample_gflop_per_sample=round(per_eval * fwd / 1e9, 2), images_per_run=images,
            train_pflop_per_run=round(train / 1e15, 4), eval_pflop_per_run=round(evals / 1e15, 4),
            gpu_hours={d: round(total / (peak * 1e12 * mfu) / 3600, 3) for d, peak in PEAK_TFLOPS.items()},
            per_gpu_batch=b, activation_mib=(round(a / 2 ** 20, 1), round(per / 2 ** 20, 2)), memory_gib_per_gpu=mem))
    return rows


def markdown(rows: list[RunFigures], mfu: float) -> str:
    head = ("| profile | model @ px | method | runs | train GFLOP/img (+ encoder) | GFLOP/sample (eval) | images/run "
            f"| GPU-hours H100 / H200 / A100 at {mfu:.0%} MFU, all runs | per-GPU batch | memory/GPU GiB (weights+grads+AdamW, "
            "EMAs, encoder, DDP, activations = total) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        m, h = r.memory_gib_per_gpu, r.gpu_hours
        enc = f" (+{r.encoder_gflop_per_image:g}{', cached' if r.targets_cached else ''})" if r.encoder_gflop_per_image else ""
        lines.append(f"| {r.profile} | {r.model} @ {r.resolution} | {r.method} | {r.runs} | {r.train_gflop_per_image:g}{enc} "
                     f"| {r.sample_gflop_per_sample:g} | {r.images_per_run:,} | {h['H100']:g} / {h['H200']:g} / {h['A100']:g} "
                     f"| {r.per_gpu_batch} | {m['weights_grads_adamw']:g}, {m['emas']:g}, {m['encoder']:g}, {m['ddp_buckets']:g}, "
                     f"{m['activations']:g} = **{m['total']:g}** |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pixelrepa.planning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", nargs="+", default=None, help="default: every profile")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="the model FLOPs utilisation assumed for GPU-hours")
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args(argv)
    if not 0 < a.mfu <= 1:
        p.error("--mfu must be in (0, 1]")
    rows = [r for name in (a.profiles or profiles()) for r in profile_figures(name, a.mfu)]
    print(markdown(rows, a.mfu))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"mfu": a.mfu, "rows": [asdict(r) for r in rows]}, f, indent=1)
        print(f"wrote {a.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
