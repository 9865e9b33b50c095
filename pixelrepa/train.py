"""Training loop: one plain function, the same on a 2-core CPU, one GPU or many through torchrun.

    python -m pixelrepa.train --model JiT-Ti/4 --resolution 32 --steps 2000 --out_dir runs/jit
    torchrun --nproc_per_node=8 -m pixelrepa.train --model JiT-B/16 --dataset /data/imagenet/train ...

Every random draw of a step (images, t, noise, flips, label drops) is a function of (seed, step) over
the *global* batch, and each rank takes its slice: so a resumed run repeats an uninterrupted one
exactly, and N processes follow one process at the same global batch up to float reduction order.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from . import data as datalib
from .align import AlignConfig, build_head, cosine_loss, token_mask
from .flow import FlowConfig, SamplerConfig, add_noise, generate, sample_t, v_loss
from .jit import JiT, JiTConfig, MODELS, jit_config

T_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the loss is logged per t bin: low t (noisy) is the hard part


@dataclass
class TrainConfig:
    model: str = "JiT-Ti/4"
    dataset: str = "openclipart"  # a built-in name (data.DATASETS) or an ImageFolder path
    resolution: int = 32
    train_images: int = 0  # > 0: a fixed seeded subset of the built-in train split (many passes, little CPU)
    data_dir: str = "data"
    out_dir: str = "runs/default"
    steps: int = 500
    batch_size: int = 64  # global, across all processes
    blr: float = 5e-5  # lr = blr * batch_size / 256
    warmup_epochs: float = 5.0
    ema_decays: tuple[float, ...] = (0.9999, 0.9996)
    P_mean: float = -0.8
    P_std: float = 0.8
    noise_scale: float = 1.0
    t_eps: float = 0.05
    label_drop: float = 0.1
    attn_drop: float = -1.0  # -1: the registry's value
    proj_drop: float = -1.0
    seed: int = 0
    ckpt_every: int = 100
    keep_ckpts: int = 2
    log_every: int = 10
    num_workers: int = 0
    device: str = "auto"  # auto, cpu, cuda
    compile: bool = False
    num_samples: int = 32  # saved from the first EMA at the end (0: none)
    sample_steps: int = 50
    cfg_scale: float = 1.0
    progress: bool = True
    # representation alignment (align.py): jit | repa | adapter | pixelrepa
    method: str = "jit"
    encoder: str = "effnet-lite0"
    encoder_weights: str = ""  # DINOv2 weights file; empty: $PIXELREPA_DINOV2 or the Hugging Face cache
    align_depth: int = -1
    align_coef: float = -1.0
    mask_ratio: float = -1.0
    proj_hidden: int = 2048
    cache_targets: bool = True  # built-in datasets: encoder features computed once and cached under data_dir
    # convergence: FID/KID of eval_samples EMA samples against the held-out split, every eval_every steps
    eval_every: int = 0  # 0: never
    eval_samples: int = 256
    eval_steps: int = 25
    eval_real: int = 0  # held-out images in the FID reference (0: the whole eval split)

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")
        self.ema_decays = tuple(self.ema_decays)
        if self.model not in MODELS:
            bad("model", f"unknown; valid names: {', '.join(MODELS)}")
        for name in ("resolution", "steps", "batch_size", "ckpt_every", "keep_ckpts", "log_every", "sample_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "must be a positive integer")
        if self.resolution % MODELS[self.model]["patch_size"]:
            bad("resolution", f"must be divisible by the patch size of {self.model}")
        if not (isinstance(self.blr, (int, float)) and self.blr > 0 and math.isfinite(self.blr)):
            bad("blr", "must be a positive finite number")
        if self.warmup_epochs < 0:
            bad("warmup_epochs", "must be >= 0")
        if not self.ema_decays or not all(0 < d < 1 for d in self.ema_decays):
            bad("ema_decays", "need one or more decays in (0, 1)")
        for name in ("attn_drop", "proj_drop"):
            if not (getattr(self, name) == -1.0 or 0 <= getattr(self, name) < 1):
                bad(name, "must be in [0, 1), or -1 for the registry's value")
        for name in ("num_samples", "num_workers", "eval_every", "train_images", "eval_real"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.eval_every and (self.eval_samples < 2 or self.eval_steps < 1):
            bad("eval_samples" if self.eval_samples < 2 else "eval_steps", "must be >= 2 (samples) and >= 1 (steps)")
        if self.device not in ("auto", "cpu", "cuda"):
            bad("device", "must be auto, cpu or cuda")
        self.flow  # validates P_std, noise_scale, t_eps, label_drop
        self.align  # validates method, coefficient and mask ratio
        self.align.depth(jit_config(self.model, self.resolution, 1))

    @property
    def align(self) -> AlignConfig:
        return AlignConfig(self.method, self.encoder, self.align_depth, self.align_coef, self.mask_ratio,
                           self.proj_hidden)

    @property
    def flow(self) -> FlowConfig:
        return FlowConfig(self.P_mean, self.P_std, self.noise_scale, self.t_eps, self.label_drop)


# ----------------------------------------------------------------------------- process helpers

def dist_info() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' asked for but torch sees no CUDA device")
    if name == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class StepBatches(torch.utils.data.Sampler):
    """This rank's slice of the global batch of each step from ``start`` on: epoch permutations are a
    function of (seed, epoch), so the order never depends on where a run was interrupted."""

    def __init__(self, n: int, global_batch: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1):
        if n < global_batch:
            raise ValueError(f"dataset has {n} images, fewer than one global batch of {global_batch}")
        self.n, self.B, self.seed, self.start, self.stop, self.rank, self.world = n, global_batch, seed, start, stop, rank, world
        self._epoch, self._perm = None, None

    def global_indices(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.n // self.B)
        if epoch != self._epoch:  # one permutation per epoch, not per call (ImageNet: 1.28M entries)
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        return self._perm[k * self.B:(k + 1) * self.B]

    def __iter__(self):
        b = self.B // self.world
        for step in range(self.start, self.stop):
            yield self.global_indices(step)[self.rank * b:(self.rank + 1) * b].tolist()

    def __len__(self):
        return self.stop - self.start


class Trainable(nn.Module):
    """The JiT and its optional alignment head: one module for DDP, one forward pass for both losses."""

    def __init__(self, jit: JiT, head: nn.Module | None = None, depth: int = 0):
        super().__init__()
        self.jit, self.head, self.depth = jit, head, depth

    def forward(self, z, t, y, mask=None):
        if self.head is None:
            return self.jit(z, t, y), None
        x_pred, (h,) = self.jit(z, t, y, hidden_at=(self.depth,))
        return x_pred, self.head(h, t, y, mask)


def step_loss(net: nn.Module, x, y, t, e, t_eps: float, mask=None, target=None, coef: float = 0.0):
    """One batch's objective: the v-loss of the x-prediction plus ``coef`` times the alignment loss.

    ``net`` is a ``Trainable`` (or its DDP/compiled wrapper); ``target()`` gives the encoder tokens and
    is called only when the net has a head. Returns (loss, per-sample v-loss, per-token cosines or None).
    """
    z = add_noise(x, t, e)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        x_pred, pred = net(z, t, y, mask)
    per_sample = v_loss(x_pred.float(), x, z, t, t_eps)
    loss, cos = per_sample.mean(), None
    if pred is not None:
        align_loss, cos = cosine_loss(pred, target())
        loss = loss + coef * align_loss
    return loss, per_sample, cos


@torch.no_grad()
def update_emas(emas: list[list[torch.Tensor]], params: list[torch.Tensor], decays) -> None:
    for ema, decay in zip(emas, decays):
        torch._foreach_lerp_(ema, params, 1 - decay)


def make_targets(cfg: TrainConfig, ds, jit_cfg: JiTConfig, device: torch.device):
    """A function (indices, images in model range, flip mask) -> encoder tokens on the JiT grid, and
    the encoder's width. Built-in datasets read features cached once per dataset and resolution;
    anything else runs the frozen encoder on the batch."""
    from . import encoders
    enc = encoders.build_encoder(cfg.encoder, jit_cfg.grid, weights=cfg.encoder_weights or None, device=device)
    if cfg.cache_targets and getattr(ds, "images", None) is not None and cfg.dataset in datalib.DATASETS:
        name = f"{cfg.dataset}-train" + (f"{cfg.train_images}" if cfg.train_images else "")
        feats = encoders.cached_features(enc, name, ds.images, cfg.resolution, cfg.data_dir,
                                         progress=cfg.progress and dist_info()[0] == 0)
        return (lambda idx, x, flip: encoders.select_targets(feats, idx, flip).to(device)), enc.dim
    return (lambda idx, x, flip: enc(x).float()), enc.dim


def lr_at(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    base = cfg.blr * cfg.batch_size / 256
    warmup = cfg.warmup_epochs * steps_per_epoch
    return base * min(1.0, (step + 1) / warmup) if warmup > 0 else base


# ----------------------------------------------------------------------------- checkpoints

def checkpoints(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("ckpt-*.pt"))


def atomic_save(obj, path: Path):
    """Written aside, flushed to disk, then renamed: a crash leaves the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_latest(out_dir: Path, map_location="cpu") -> dict | None:
    """The newest checkpoint that loads; a corrupt one is reported and the previous one used."""
    for path in reversed(checkpoints(out_dir)):
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as err:  # truncated zip, bad pickle, ...
            print(f"warning: checkpoint {path} is unreadable ({type(err).__name__}: {err}); "
                  "trying the previous one", file=sys.stderr)
    return None


def load_jit(path: str | Path, which: str = "ema0", device: str | torch.device = "cpu") -> tuple[JiT, dict]:
    """A trained JiT from a checkpoint file or run directory (its newest checkpoint), without any head.

    ``which``: "model" (raw weights) or "ema0", "ema1" (the EMA copies, decays in config order).
    Returns the network in eval mode and the run's config dict.
    """
    path = Path(path)
    state = load_latest(path) if path.is_dir() else torch.load(path, map_location="cpu", weights_only=False)
    if state is None:
        raise FileNotFoundError(f"no readable checkpoint (ckpt-*.pt) in {path}")
    cfg = state["config"]
    sd = state["model"] if which == "model" else state["emas"][int(which.removeprefix("ema"))]
    num_classes = sd["y_embedder.weight"].shape[0] - 1
    over = {k: cfg[k] for k in ("attn_drop", "proj_drop") if cfg.get(k, -1) >= 0}
    net = JiT(jit_config(cfg["model"], cfg["resolution"], num_classes, **over))
    net.load_state_dict(sd)
    return net.to(device).eval(), cfg


COMPAT_FIELDS = ("model", "dataset", "resolution", "train_images", "batch_size", "seed", "ema_decays", "method", "encoder",
                 "align_depth", "mask_ratio", "proj_hidden")


def check_compatible(saved: dict, cfg: TrainConfig, out_dir: Path):
    now = asdict(cfg)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in COMPAT_FIELDS
             if json.dumps(saved.get(k)) != json.dumps(now[k])]
    if diffs:
        raise ValueError(f"{out_dir} holds a run with another configuration ({'; '.join(diffs)}); "
                         "use another out_dir or delete its checkpoints")


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig) -> Path:
    rank, world = dist_info()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {world} processes")
    device = resolve_device(cfg.device)
    # Denormal floats (softmax tails, tiny EMA or Adam updates) run ~100x slower on x86 CPUs and
    # changed step times by 5x in our benchmarks; flushing them to zero changes nothing measurable.
    torch.set_flush_denormal(True)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    ds = datalib.load_dataset(cfg.dataset, cfg.resolution, "train", cfg.data_dir, progress=cfg.progress and rank == 0)
    if cfg.train_images:
        ds = datalib.take(ds, cfg.train_images)
    over = {k: v for k, v in (("attn_drop", cfg.attn_drop), ("proj_drop", cfg.proj_drop)) if v >= 0}
    jit_cfg = jit_config(cfg.model, cfg.resolution, ds.num_classes, **over)
    align = cfg.align
    targets, enc_dim = make_targets(cfg, ds, jit_cfg, device) if align.enabled else (None, 0)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = JiT(jit_cfg).to(device)
    head = build_head(align, jit_cfg, enc_dim)
    trainable = Trainable(model, head.to(device) if head is not None else None, align.depth(jit_cfg))
    emas = [copy.deepcopy(model).requires_grad_(False).eval() for _ in cfg.ema_decays]  # the JiT only
    opt = torch.optim.AdamW(trainable.parameters(), lr=cfg.blr, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=device.type in ("cpu", "cuda"))
    start = 0
    saved = load_latest(out_dir)
    if saved is not None:
        check_compatible(saved["config"], cfg, out_dir)
        model.load_state_dict(saved["model"])
        if head is not None:
            head.load_state_dict(saved["head"])
        for ema, sd in zip(emas, saved["emas"]):
            ema.load_state_dict(sd)
        opt.load_state_dict(saved["opt"])
        start = saved["step"]
    stale = [d for d in cfg.ema_decays if d ** cfg.steps > 0.05]
    if stale and rank == 0:
        warnings.warn(f"EMA decay(s) {stale} keep {max(stale) ** cfg.steps:.0%} of the initial weights after "
                      f"{cfg.steps} steps (the zero-initialised JiT predicts grey): samples from them show the "
                      "initialisation, not training; use shorter --ema_decays for short runs")
    log_path = out_dir / "metrics.jsonl"
    if rank == 0:
        truncate_log(log_path, start)  # steps after the checkpoint will be logged again
        (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))

    net = trainable
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(trainable, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    sampler = StepBatches(len(ds), cfg.batch_size, cfg.seed, start, cfg.steps, rank, world)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         pin_memory=device.type == "cuda")
    steps_per_epoch = len(ds) // cfg.batch_size
    b = cfg.batch_size // world
    sl = slice(rank * b, (rank + 1) * b)
    flow = cfg.flow
    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not (cfg.progress and rank == 0),
               dynamic_ncols=True)
    params = list(model.parameters())
    ema_params = [list(ema.parameters()) for ema in emas]
    t_last, n_last = time.perf_counter(), 0
    trainable.train()
    for step, (img, y) in enumerate(loader, start=start):
        g = step_generator(cfg.seed, step)
        B = cfg.batch_size
        t = sample_t(B, flow, g)[sl]
        e = (flow.noise_scale * torch.randn((B, 3, cfg.resolution, cfg.resolution), generator=g))[sl]
        flip = (torch.rand(B, generator=g) < 0.5)[sl]
        drop = (torch.rand(B, generator=g) < flow.label_drop)[sl]  # to the null class, for guidance
        y = torch.where(drop, torch.full_like(y, ds.num_classes), y)
        x = datalib.to_model_range(img)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        mask = None
        if head is not None and align.ratio > 0:
            mask = token_mask(B, jit_cfg.num_patches, align.ratio, g)[sl].to(device)
        x, y, t, e = (v.to(device, non_blocking=True) for v in (x, y, t, e))
        torch.manual_seed(cfg.seed * 1_000_003 + step * 64 + rank)  # dropout draws, reproducible on resume
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, steps_per_epoch)
        loss, per_sample, cos = step_loss(net, x, y, t, e, flow.t_eps, mask,
                                          lambda: targets(sampler.global_indices(step)[sl], x, flip),
                                          align.loss_coef)
        if not torch.isfinite(loss):
            report_nonfinite(out_dir, cfg, step, sampler.global_indices(step), loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_emas(ema_params, params, cfg.ema_decays)
        bar.update(1)
        n_last += B
        done = step + 1
        if rank == 0 and (done % cfg.log_every == 0 or done == cfg.steps):
            now = time.perf_counter()
            rec = {"step": done, "images": done * B, "loss": round(loss.item(), 6), "lr": opt.param_groups[0]["lr"],
                   "images_per_s": round(n_last / (now - t_last), 2)}
            rec.update(loss_by_t(per_sample.detach(), t))
            if cos is not None:
                rec["align_cos"] = round(cos.mean().item(), 6)
                if mask is not None:
                    rec["align_cos_masked"] = round(cos[mask].mean().item(), 6)
            append_log(log_path, rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            t_last, n_last = now, 0
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            if rank == 0:
                append_log(log_path, {"step": done, "images": done * B, **evaluate(cfg, emas[0], ds.num_classes, device)})
            if dist.is_initialized():
                dist.barrier()
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            save_checkpoint(out_dir, cfg, done, model, head, emas, opt, rank)
    bar.close()
    if rank == 0 and cfg.num_samples:
        save_samples(out_dir, cfg, emas[0], ds.num_classes, device)
    return out_dir


def loss_by_t(per_sample: torch.Tensor, t: torch.Tensor) -> dict:
    out = {}
    for lo, hi in zip(T_BINS[:-1], T_BINS[1:]):
        m = (t >= lo) & (t < hi)
        if m.any():
            out[f"loss_t{lo:.2f}-{hi:.2f}"] = round(per_sample[m].mean().item(), 6)
    return out


def append_log(path: Path, rec: dict):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def truncate_log(path: Path, step: int):
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def save_checkpoint(out_dir: Path, cfg: TrainConfig, step: int, model, head, emas, opt, rank: int):
    if rank == 0:
        state = {"step": step, "config": asdict(cfg), "model": model.state_dict(),
                 "head": head.state_dict() if head is not None else {},
                 "emas": [e.state_dict() for e in emas], "opt": opt.state_dict()}
        atomic_save(state, out_dir / f"ckpt-{step:08d}.pt")
        for old in checkpoints(out_dir)[:-cfg.keep_ckpts]:
            old.unlink()
    if dist.is_initialized():
        dist.barrier()


def report_nonfinite(out_dir: Path, cfg: TrainConfig, step: int, indices: torch.Tensor, loss):
    info = {"step": step, "seed": cfg.seed, "loss": str(loss.item()), "batch_indices": indices.tolist(),
            "config": asdict(cfg)}
    path = out_dir / f"nonfinite-step{step:08d}.json"
    path.write_text(json.dumps(info))
    raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}; the last good checkpoint is kept "
                             f"in {out_dir}; what reproduces it (seed, step, batch indices) is in {path}")


def evaluate(cfg: TrainConfig, ema: JiT, num_classes: int, device: torch.device) -> dict:
    """FID and KID (torch-fidelity, offline Inception) of class-balanced EMA samples against the
    dataset's held-out split: a small-sample estimate for convergence curves, not a final number."""
    from .metrics import compute_metrics, reference_stats
    scfg = SamplerConfig(steps=cfg.eval_steps, cfg_scale=cfg.cfg_scale, noise_scale=cfg.noise_scale, t_eps=cfg.t_eps)
    imgs, _ = generate(ema, cfg.eval_samples, num_classes, (3, cfg.resolution, cfg.resolution), scfg,
                       seed=cfg.seed + 1, device=device, progress=False)
    ref = reference_stats(cfg.dataset, cfg.resolution, "eval", n=cfg.eval_real or None, data_dir=cfg.data_dir)
    m = compute_metrics(imgs, ref_stats=ref, dataset=cfg.dataset, data_dir=cfg.data_dir, device=device)
    return {"eval_fid": round(m["fid"], 4), "eval_kid": round(m["kid_mean"], 6), "eval_n": cfg.eval_samples,
            "eval_n_real": m["n_real"], "eval_steps": cfg.eval_steps}


def save_samples(out_dir: Path, cfg: TrainConfig, ema: JiT, num_classes: int, device: torch.device):
    from torchvision.utils import save_image
    scfg = SamplerConfig(steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale, noise_scale=cfg.noise_scale, t_eps=cfg.t_eps)
    imgs, y = generate(ema, cfg.num_samples, num_classes, (3, cfg.resolution, cfg.resolution), scfg,
                       seed=cfg.seed, device=device, progress=cfg.progress)
    torch.save({"images": imgs, "labels": y}, out_dir / "samples.pt")
    save_image(imgs.float() / 255, out_dir / "samples.png", nrow=int(math.ceil(cfg.num_samples ** 0.5)))


# ----------------------------------------------------------------------------- command line

def config_parser(cls) -> argparse.ArgumentParser:
    """--field value for every field of a config dataclass, typed from its default."""
    p = argparse.ArgumentParser(prog=f"python -m {__name__}", description=cls.__doc__)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            p.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=default,
                           metavar="BOOL")
        elif isinstance(default, tuple):
            p.add_argument(f"--{f.name}", type=type(default[0]), nargs="+", default=default)
        else:
            p.add_argument(f"--{f.name}", type=type(default), default=default)
    return p


def main(argv=None):
    cfg = TrainConfig(**vars(config_parser(TrainConfig).parse_args(argv)))
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        backend = "nccl" if resolve_device(cfg.device).type == "cuda" else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        out = train(cfg)
        if dist_info()[0] == 0:
            print(f"done: {out}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
