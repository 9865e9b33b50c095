"""Training loop: one plain function, the same on a 2-core CPU, one GPU or many through torchrun.

    python -m pixelrepa.train --model JiT-Ti/4 --resolution 32 --steps 2000 --out_dir runs/jit
    torchrun --nproc_per_node=8 -m pixelrepa.train --model JiT-B/16 --dataset /data/imagenet/train ...

Every random draw of a step (images, t, noise, flips, label drops) is a function of (seed, step) over
the *global* batch, and each rank takes its slice: so a resumed run repeats an uninterrupted one
exactly, and N processes follow one process at the same global batch up to float reduction order.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, asdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import data as datalib
from . import encoders
from . import scalars
from .align import AlignConfig, Trainable, build_head, check_align, step_loss, token_mask
from .config import check_types, cli_errors, config_parser, refuse, shared
from .distributed import dist_info, process_group, resolve_device
from .flow import FlowConfig, SamplerConfig, check_flow, generate, sample_t
from .jit import JiT, JiTConfig, MODELS, jit_config
from .storage import (CheckpointError, append_log, atomic_write_text, checkpoints, clean_partial_writes,
                      latest_checkpoint, load_weights, save_checkpoint, truncate_log)

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
    attn_drop: float | None = None  # None: the registry's value
    proj_drop: float | None = None
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
    align_depth: int | None = None  # None: the paper's values (align.py)
    align_coef: float | None = None
    mask_ratio: float | None = None
    proj_hidden: int = 2048
    cache_targets: bool = True  # built-in datasets: encoder features computed once and cached under data_dir
    # convergence: FID/KID of eval_samples EMA samples against the held-out split, every eval_every steps
    eval_every: int = 0  # 0: never
    eval_samples: int = 256
    eval_steps: int = 25
    eval_real: int = 0  # held-out images in the FID reference (0: the whole eval split)
    eval_seed: int = 2026  # the samples' noise: fixed, independent of the training seed (paired across methods)
    dist_timeout: int = 1800  # seconds a torchrun collective may wait for a lost process before failing

    def __post_init__(self):
        check_types(self)
        if self.model not in MODELS:
            refuse(self, "model", f"unknown; valid names: {', '.join(MODELS)}")
        for name in ("resolution", "steps", "batch_size", "ckpt_every", "keep_ckpts", "log_every", "sample_steps"):
            if getattr(self, name) < 1:
                refuse(self, name, "must be a positive integer")
        if self.resolution % MODELS[self.model]["patch_size"]:
            refuse(self, "resolution", f"must be divisible by the patch size of {self.model}")
        if not self.blr > 0:
            refuse(self, "blr", "must be a positive finite number")
        if self.warmup_epochs < 0:
            refuse(self, "warmup_epochs", "must be >= 0")
        if not 0 <= self.seed < 2 ** 31:
            refuse(self, "seed", "must be in [0, 2**31)")
        if self.dist_timeout < 1:
            refuse(self, "dist_timeout", "must be >= 1 second")
        if not all(0 < d < 1 for d in self.ema_decays):
            refuse(self, "ema_decays", "need one or more decays in (0, 1)")
        for name in ("attn_drop", "proj_drop"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) < 1:
                refuse(self, name, "must be in [0, 1), or None for the registry's value")
        for name in ("num_samples", "num_workers", "eval_every", "train_images", "eval_real"):
            if getattr(self, name) < 0:
                refuse(self, name, "must be >= 0")
        if self.eval_every and (self.eval_samples < 2 or self.eval_steps < 1):
            refuse(self, "eval_samples" if self.eval_samples < 2 else "eval_steps", "must be >= 2 (samples) and >= 1 (steps)")
        if self.device not in ("auto", "cpu", "cuda"):
            refuse(self, "device", "must be auto, cpu or cuda")
        check_flow(self)  # P_std, noise_scale, t_eps, label_drop
        check_align(self, jit_config(self.model, self.resolution, 1))  # method, coefficient, mask ratio, depth
        if self.encoder not in encoders.ENCODERS:  # both resize any resolution to the JiT's token grid
            refuse(self, "encoder", f"unknown; valid names: {', '.join(encoders.ENCODERS)}")

    @property
    def align(self) -> AlignConfig:
        return AlignConfig(**shared(self, AlignConfig))

    @property
    def flow(self) -> FlowConfig:
        return FlowConfig(**shared(self, FlowConfig))


# ----------------------------------------------------------------------------- what the loop draws and reads

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


@torch.no_grad()
def update_emas(emas: list[list[torch.Tensor]], params: list[torch.Tensor], decays) -> None:
    for ema, decay in zip(emas, decays):
        torch._foreach_lerp_(ema, params, 1 - decay)


def training_set(cfg: TrainConfig, progress: bool = True) -> datalib.ImageDataset:
    """The images a run trains on: the dataset's train split, or its fixed ``train_images`` subset."""
    ds = datalib.load_dataset(cfg.dataset, cfg.resolution, "train", cfg.data_dir, progress=progress)
    return datalib.take(ds, cfg.train_images) if cfg.train_images else ds


def _targets_name(cfg: TrainConfig) -> str:
    return f"{cfg.dataset}-train" + (f"{cfg.train_images}" if cfg.train_images else "")


def cached_targets(cfg: TrainConfig, enc, ds, progress: bool = True) -> torch.Tensor:
    """The encoder tokens of a built-in training set, (2: plain and flipped, N, T, D), cached once."""
    return encoders.cached_features(enc, _targets_name(cfg), ds.images, cfg.resolution, cfg.data_dir, progress=progress)


def make_targets(cfg: TrainConfig, ds, jit_cfg: JiTConfig, device: torch.device):
    """A function (indices, images in model range, flip mask) -> encoder tokens on the JiT grid, and
    the encoder's width. Built-in datasets read features cached once per dataset and resolution;
    anything else runs the frozen encoder on the batch."""
    enc = encoders.build_encoder(cfg.encoder, jit_cfg.grid, weights=cfg.encoder_weights or None, device=device)
    if cfg.cache_targets and getattr(ds, "images", None) is not None and cfg.dataset in datalib.DATASETS:
        feats = cached_targets(cfg, enc, ds, progress=cfg.progress and dist_info()[0] == 0)
        if feats.shape[-2] != jit_cfg.num_patches:
            raise ValueError(f"cached {cfg.encoder} features have {feats.shape[-2]} tokens per image but "
                             f"{cfg.model} at {cfg.resolution} px has {jit_cfg.num_patches} patches "
                             f"({jit_cfg.grid} x {jit_cfg.grid}); delete "
                             f"{encoders.feature_cache_path(enc, _targets_name(cfg), cfg.resolution, cfg.data_dir)}")
        return (lambda idx, x, flip: encoders.select_targets(feats, idx, flip).to(device)), enc.dim
    return (lambda idx, x, flip: enc(x).float()), enc.dim


def lr_at(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """blr * batch / 256, warmed up linearly per iteration as the reference: lr * step / warmup_its,
    so the very first step (step 0) has lr 0; constant after warm-up."""
    base = cfg.blr * cfg.batch_size / 256
    warmup = cfg.warmup_epochs * steps_per_epoch
    return base * min(1.0, step / warmup) if warmup > 0 else base


# ----------------------------------------------------------------------------- resuming

COMPAT_FIELDS = ("model", "dataset", "resolution", "train_images", "batch_size", "seed", "ema_decays", "method", "encoder",
                 "align_depth", "mask_ratio", "proj_hidden")


def check_compatible(saved: dict, cfg: TrainConfig, out_dir: Path):
    now = asdict(cfg)
    default = asdict(TrainConfig())  # a field added after the checkpoint was made counts as its default
    saved = {k: saved.get(k, default[k]) for k in COMPAT_FIELDS}
    diffs = [f"{k}: checkpoint {saved[k]!r} vs now {now[k]!r}" for k in COMPAT_FIELDS
             if json.dumps(saved[k]) != json.dumps(now[k])]
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
    # The checkpoint first: a run of another configuration is refused before any data or encoder work.
    if rank == 0:
        clean_partial_writes(out_dir)
    if dist.is_initialized():
        dist.barrier()
    found = latest_checkpoint(out_dir, verbose=rank == 0)
    saved_path, saved = found if found is not None else (None, None)
    if saved is not None:
        check_compatible(saved["config"], cfg, out_dir)

    ds = training_set(cfg, progress=cfg.progress and rank == 0)
    jit_cfg = jit_config(cfg.model, cfg.resolution, ds.num_classes, attn_drop=cfg.attn_drop, proj_drop=cfg.proj_drop)
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
    if saved is not None:
        load_weights(model, saved["model"], saved_path, "model")
        if head is not None:
            load_weights(head, saved.get("head", {}), saved_path, f"{cfg.method} head")
        for i, (ema, sd) in enumerate(zip(emas, saved["emas"])):
            load_weights(ema, sd, saved_path, f"ema{i}")
        load_weights(opt, saved["opt"], saved_path, "optimizer")
        start = saved["step"]
        if rank == 0:
            print(f"resuming from {saved_path} (step {start} of {cfg.steps})", file=sys.stderr, flush=True)
        del saved
    stale = [d for d in cfg.ema_decays if d ** cfg.steps > 0.05]
    if stale and rank == 0:
        warnings.warn(f"EMA decay(s) {stale} keep {max(stale) ** cfg.steps:.0%} of the initial weights after "
                      f"{cfg.steps} steps (the zero-initialised JiT predicts grey): samples from them show the "
                      "initialisation, not training; use shorter --ema_decays for short runs")
    log_path = out_dir / "metrics.jsonl"
    if rank == 0:
        truncate_log(log_path, start)  # steps after the checkpoint will be logged again
        atomic_write_text(out_dir / "config.json", json.dumps(asdict(cfg), indent=1))
    tb = scalars.open_writer(out_dir, start, note=cfg.progress) if rank == 0 else None  # TensorBoard too, where installed

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
        bad_ranks = nonfinite_ranks(loss)
        if bad_ranks:
            report_nonfinite(out_dir, cfg, step, sampler.global_indices(step), loss, ds=ds, ranks=bad_ranks)
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
            scalars.write(tb, rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            t_last, n_last = now, 0
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            if rank == 0:
                rec = {"step": done, "images": done * B, **evaluate(cfg, emas[0], ds.num_classes, device)}
                append_log(log_path, rec)
                scalars.write(tb, rec)
            if dist.is_initialized():
                dist.barrier()
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            if not all(bool(torch.isfinite(p).all()) for p in trainable.parameters()):
                # the loss was finite but the update was not: never save such weights as "good"
                report_nonfinite(out_dir, cfg, step, sampler.global_indices(step), loss, ds=ds,
                                 what="weights after the update of")
            if rank == 0:
                save_checkpoint(out_dir, {"step": done, "config": asdict(cfg), "model": model.state_dict(),
                                          "head": head.state_dict() if head is not None else {},
                                          "emas": [e.state_dict() for e in emas], "opt": opt.state_dict()},
                                cfg.keep_ckpts)
            if dist.is_initialized():
                dist.barrier()
    bar.close()
    scalars.close(tb)
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


def nonfinite_ranks(loss: torch.Tensor) -> list[int]:
    """The ranks whose loss is not finite (every rank gets the same list, so all stop together)."""
    bad = ~torch.isfinite(loss.detach())
    if not dist.is_initialized():
        return [0] if bool(bad) else []
    rank, world = dist_info()
    flags = torch.zeros(world, device=loss.device)
    flags[rank] = bad.float()
    dist.all_reduce(flags)
    return torch.nonzero(flags.cpu()).flatten().tolist()


def report_nonfinite(out_dir: Path, cfg: TrainConfig, step: int, indices: torch.Tensor, loss, *, ds=None,
                     ranks=(0,), what: str = "loss at"):
    """Stop training: write what reproduces step ``step`` (seed, step, the global batch's dataset indices
    and image sources, the last good checkpoint) to ``nonfinite-stepN.json`` and raise FloatingPointError."""
    rank = dist_info()[0]
    path = out_dir / f"nonfinite-step{step:08d}.json"
    last = checkpoints(out_dir)
    if rank == 0:
        idx = indices.tolist()
        sources = getattr(ds, "sources", None)
        info = {"step": step, "seed": cfg.seed, "what": f"non-finite {what} step {step}", "loss": str(loss.item()),
                "ranks": list(ranks), "batch_indices": idx,
                "batch_sources": [sources[i] for i in idx] if sources is not None else None,
                "last_checkpoint": last[-1].name if last else None,
                "reproduce": "TrainConfig(**config) resumed from last_checkpoint repeats this step: every draw "
                             "is a function of (seed, step) and batch_indices index the training set",
                "config": asdict(cfg)}
        atomic_write_text(path, json.dumps(info, indent=1))
    keep = f"the last good checkpoint {last[-1]} is kept" if last else "no checkpoint was written before it"
    raise FloatingPointError(f"non-finite {what} step {step} (loss {loss.item()}); training stopped; {keep}; "
                             f"what reproduces it (seed, step, batch indices) is in {path}")


def evaluate(cfg: TrainConfig, ema: JiT, num_classes: int, device: torch.device) -> dict:
    """FID, KID and precision/recall (torch-fidelity, offline Inception) of EMA samples, labelled with
    the held-out split's class frequencies, against that split: the convergence curves' points."""
    from .metrics import evaluate_model
    scfg = SamplerConfig(steps=cfg.eval_steps, cfg_scale=cfg.cfg_scale, noise_scale=cfg.noise_scale, t_eps=cfg.t_eps)
    m = evaluate_model(ema, dataset=cfg.dataset, resolution=cfg.resolution, num_classes=num_classes,
                       n=cfg.eval_samples, sampler=scfg, sample_seed=cfg.eval_seed, data_dir=cfg.data_dir,
                       n_real=cfg.eval_real, device=device)
    return {"eval_fid": round(m["fid"], 4), "eval_kid": round(m["kid_mean"], 6), "eval_kid_std": round(m["kid_std"], 6),
            "eval_precision": round(m["precision"], 4), "eval_recall": round(m["recall"], 4),
            "eval_n": cfg.eval_samples, "eval_n_real": m["n_real"], "eval_steps": cfg.eval_steps,
            "eval_seed": cfg.eval_seed}


def save_samples(out_dir: Path, cfg: TrainConfig, ema: JiT, num_classes: int, device: torch.device):
    from torchvision.utils import save_image
    scfg = SamplerConfig(steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale, noise_scale=cfg.noise_scale, t_eps=cfg.t_eps)
    imgs, y = generate(ema, cfg.num_samples, num_classes, (3, cfg.resolution, cfg.resolution), scfg,
                       seed=cfg.seed, device=device, progress=cfg.progress)
    torch.save({"images": imgs, "labels": y}, out_dir / "samples.pt")
    save_image(imgs.float() / 255, out_dir / "samples.png", nrow=int(math.ceil(cfg.num_samples ** 0.5)))


# ----------------------------------------------------------------------------- command line

USER_ERRORS = (ValueError, FloatingPointError, FileNotFoundError, CheckpointError, datalib.DatasetError)


def main(argv=None):
    """Command line entry. Errors about the input (configuration, data, checkpoints, non-finite numbers)
    end the process with status 1 and a one-line message; set PIXELREPA_TRACEBACK=1 for the traceback."""
    with cli_errors("pixelrepa.train", USER_ERRORS):
        cfg = TrainConfig(**vars(config_parser(TrainConfig, prog=f"python -m {__name__}").parse_args(argv)))
        with process_group(cfg.device, cfg.dist_timeout):
            out = train(cfg)
            if dist_info()[0] == 0:
                print(f"done: {out}")


if __name__ == "__main__":
    main()
