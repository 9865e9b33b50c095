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
import datetime
import hashlib
import json
import math
import numbers
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
from .data import atomic_write_text
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
    dist_timeout: int = 1800  # seconds a torchrun collective may wait for a lost process before failing

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")
        self._check_types(bad)
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
        if not 0 <= self.seed < 2 ** 31:
            bad("seed", "must be in [0, 2**31)")
        if self.dist_timeout < 1:
            bad("dist_timeout", "must be >= 1 second")
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
        try:
            self.flow  # validates P_std, noise_scale, t_eps, label_drop
            self.align  # validates method, coefficient and mask ratio
            self.align.depth(jit_config(self.model, self.resolution, 1))
        except ValueError as err:  # the same checks, in this class's field names
            raise ValueError(str(err).replace("AlignConfig.coef", "TrainConfig.align_coef")
                             .replace("AlignConfig.", "TrainConfig.").replace("FlowConfig.", "TrainConfig.")) from None
        from .encoders import ENCODERS  # both resize any resolution to the JiT's token grid
        if self.encoder not in ENCODERS:
            bad("encoder", f"unknown; valid names: {', '.join(ENCODERS)}")

    def _check_types(self, bad):
        """Each field must have its default's type (ints for floats allowed; numbers must be finite):
        a string, a NaN or a bool where a count belongs is refused here, not deep inside training."""
        for f in dataclasses.fields(self):
            v, default = getattr(self, f.name), f.default
            if isinstance(default, bool):
                if not isinstance(v, bool):
                    bad(f.name, "must be True or False")
            elif isinstance(default, int):
                if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                    bad(f.name, "must be an integer")
                setattr(self, f.name, int(v))
            elif isinstance(default, float):
                if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                    bad(f.name, "must be a finite number")
                setattr(self, f.name, float(v))
            elif isinstance(default, str):
                if isinstance(v, os.PathLike):
                    v = os.fspath(v)
                    setattr(self, f.name, v)
                if not isinstance(v, str):
                    bad(f.name, "must be a string")
            elif isinstance(default, tuple):
                try:
                    v = None if isinstance(v, (str, bytes)) else tuple(v)
                except TypeError:
                    v = None
                if v is None or not all(isinstance(d, numbers.Real) and not isinstance(d, bool) and math.isfinite(d)
                                        for d in v):
                    bad(f.name, "must be a sequence of finite numbers")
                setattr(self, f.name, tuple(float(d) for d in v))

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


def training_set(cfg: TrainConfig, progress: bool = True) -> datalib.ImageDataset:
    """The images a run trains on: the dataset's train split, or its fixed ``train_images`` subset."""
    ds = datalib.load_dataset(cfg.dataset, cfg.resolution, "train", cfg.data_dir, progress=progress)
    return datalib.take(ds, cfg.train_images) if cfg.train_images else ds


def _targets_name(cfg: TrainConfig) -> str:
    return f"{cfg.dataset}-train" + (f"{cfg.train_images}" if cfg.train_images else "")


def cached_targets(cfg: TrainConfig, enc, ds, progress: bool = True) -> torch.Tensor:
    """The encoder tokens of a built-in training set, (2: plain and flipped, N, T, D), cached once."""
    from . import encoders
    return encoders.cached_features(enc, _targets_name(cfg), ds.images, cfg.resolution, cfg.data_dir, progress=progress)


def make_targets(cfg: TrainConfig, ds, jit_cfg: JiTConfig, device: torch.device):
    """A function (indices, images in model range, flip mask) -> encoder tokens on the JiT grid, and
    the encoder's width. Built-in datasets read features cached once per dataset and resolution;
    anything else runs the frozen encoder on the batch."""
    from . import encoders
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
    base = cfg.blr * cfg.batch_size / 256
    warmup = cfg.warmup_epochs * steps_per_epoch
    return base * min(1.0, (step + 1) / warmup) if warmup > 0 else base


# ----------------------------------------------------------------------------- checkpoints

class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, failing its checksum, not a pixelrepa training
    checkpoint, or holding weights of another network. The message names the file."""


CKPT_KEYS = ("step", "config", "model", "emas", "opt")


def checkpoints(out_dir: Path) -> list[Path]:
    return sorted(Path(out_dir).glob("ckpt-*.pt"))


def checksum_path(path: Path) -> Path:
    """The sidecar holding a checkpoint's sha256, in `sha256sum` format (`sha256sum -c` checks it)."""
    return path.with_name(path.name + ".sha256")


class _HashingWriter:
    """A file object for torch.save that hashes the bytes on their way to disk."""

    def __init__(self, f):
        self.f, self.name, self.sha = f, getattr(f, "name", ""), hashlib.sha256()

    def write(self, b):
        self.sha.update(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path: Path) -> str:
    """Written aside, flushed to disk, then renamed: a crash leaves the old file or the new, never half.

    The sha256 of the bytes goes to ``PATH.sha256``, renamed into place *before* the file itself, so
    every file at ``path`` has its checksum beside it (a kill in between leaves only a stray sidecar).
    Returns the hex digest.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            w = _HashingWriter(f)
            torch.save(obj, w)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # disk full, interrupted: no half file left behind
        tmp.unlink(missing_ok=True)
        raise
    digest = w.sha.hexdigest()
    atomic_write_text(checksum_path(path), f"{digest}  {path.name}\n")
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return digest


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A training checkpoint, verified: its sha256 against the sidecar (when there is one; files
    written before checksums existed have none and are checked by loading only), then loaded, then
    checked to hold a pixelrepa training state. Raises `CheckpointError` naming the file."""
    path = Path(path)
    side = checksum_path(path)
    if side.is_file():
        want = (side.read_text().split() or [""])[0].lower()
        got = sha256_file(path)
        if got != want:
            raise CheckpointError(f"checkpoint {path} fails its checksum (sha256 {got[:16]}..., but "
                                  f"{side.name} records {want[:16] or 'nothing'}...): the file is corrupt or truncated")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated zip, bad pickle, ...
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from err
    missing = [k for k in CKPT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a pixelrepa training checkpoint (it has no {', '.join(missing)} "
                              "entries); move it out of the run directory")
    return state


def latest_checkpoint(out_dir: Path, map_location="cpu", verbose: bool = True) -> tuple[Path, dict] | None:
    """(path, state) of the newest usable checkpoint in ``out_dir``, or None. A corrupt, truncated or
    foreign one is reported on stderr (file and reason) and the previous one used."""
    for path in reversed(checkpoints(Path(out_dir))):
        try:
            return path, read_checkpoint(path, map_location)
        except CheckpointError as err:
            if verbose:
                print(f"warning: {err}; trying the previous one", file=sys.stderr, flush=True)
    return None


def load_latest(out_dir: Path, map_location="cpu") -> dict | None:
    """The newest checkpoint that passes `read_checkpoint`; a bad one is reported and the previous one used."""
    found = latest_checkpoint(out_dir, map_location)
    return None if found is None else found[1]


def clean_partial_writes(out_dir: Path):
    """Remove what a process killed while saving leaves behind: temporary files and stray sidecars."""
    for tmp in sorted(out_dir.glob(".*.tmp")):  # checkpoints, and text records (unique names)
        print(f"note: removing {tmp}, a write that was interrupted", file=sys.stderr, flush=True)
        tmp.unlink(missing_ok=True)
    for side in out_dir.glob("ckpt-*.pt.sha256"):
        if not side.with_name(side.name.removesuffix(".sha256")).exists():
            side.unlink(missing_ok=True)


def _state_dict_diff(module: nn.Module, sd: dict) -> str:
    """What keeps ``sd`` from loading into ``module``, in a line: missing, unexpected and reshaped entries."""
    if not isinstance(module, nn.Module) or not isinstance(sd, dict):
        return ""
    own = module.state_dict()
    missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
    shaped = [f"{k}: checkpoint {tuple(sd[k].shape)} vs network {tuple(own[k].shape)}" for k in own
              if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)]
    parts = [f"{len(v)} {what} (e.g. {', '.join(v[:2])})" for v, what in
             ((shaped, "of another shape"), (missing, "missing"), (unexpected, "unexpected")) if v]
    return "; ".join(parts)


def _load_weights(module, sd: dict, path, what: str):
    try:
        module.load_state_dict(sd)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
        why = _state_dict_diff(module, sd) or "; ".join(l.strip() for l in str(err).splitlines() if l.strip())[:400]
        raise CheckpointError(f"the {what} weights in {path} do not fit this network ({why}); was the checkpoint "
                              "made with another model size, method or number of classes?") from None


def load_jit(path: str | Path, which: str = "ema0", device: str | torch.device = "cpu") -> tuple[JiT, dict]:
    """A trained JiT from a checkpoint file or run directory (its newest checkpoint), without any head.

    ``which``: "model" (raw weights) or "ema0", "ema1" (the EMA copies, decays in config order).
    Returns the network in eval mode and the run's config dict. A file failing its checksum, not a
    pixelrepa checkpoint, or holding weights of another size raises `CheckpointError`.
    """
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no readable checkpoint (ckpt-*.pt) in {path}")
        path, state = found
    elif path.is_file():
        state = read_checkpoint(path)
    else:
        raise FileNotFoundError(f"no checkpoint file or run directory at {path}")
    net, cfg = jit_from_state(state, which, path)
    return net.to(device), cfg


def jit_from_state(state: dict, which: str = "ema0", path: str | Path = "the checkpoint") -> tuple[JiT, dict]:
    """The JiT (eval mode, on the CPU) of a loaded checkpoint ``state`` and the run's config dict;
    ``which`` as in `load_jit`, ``path`` only names the file in errors."""
    cfg = state["config"]
    names = ["model"] + [f"ema{i}" for i in range(len(state["emas"]))]
    if which not in names:
        raise ValueError(f"which={which!r}: {path} holds {', '.join(names)}")
    sd = state["model"] if which == "model" else state["emas"][int(which.removeprefix("ema"))]
    if not isinstance(cfg, dict) or cfg.get("model") not in MODELS or "y_embedder.weight" not in sd:
        raise CheckpointError(f"{path}: its config names no known model ({cfg.get('model') if isinstance(cfg, dict) else cfg!r}) "
                              "or its weights are not a JiT's")
    num_classes = sd["y_embedder.weight"].shape[0] - 1
    over = {k: cfg[k] for k in ("attn_drop", "proj_drop") if cfg.get(k, -1) >= 0}
    net = JiT(jit_config(cfg["model"], cfg["resolution"], num_classes, **over))
    _load_weights(net, sd, path, f"{which} ({cfg['model']} at {cfg['resolution']} px)")
    return net.eval(), cfg


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
    if saved is not None:
        _load_weights(model, saved["model"], saved_path, "model")
        if head is not None:
            _load_weights(head, saved.get("head", {}), saved_path, f"{cfg.method} head")
        for i, (ema, sd) in enumerate(zip(emas, saved["emas"])):
            _load_weights(ema, sd, saved_path, f"ema{i}")
        _load_weights(opt, saved["opt"], saved_path, "optimizer")
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
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            t_last, n_last = now, 0
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            if rank == 0:
                append_log(log_path, {"step": done, "images": done * B, **evaluate(cfg, emas[0], ds.num_classes, device)})
            if dist.is_initialized():
                dist.barrier()
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            if not all(bool(torch.isfinite(p).all()) for p in trainable.parameters()):
                # the loss was finite but the update was not: never save such weights as "good"
                report_nonfinite(out_dir, cfg, step, sampler.global_indices(step), loss, ds=ds,
                                 what="weights after the update of")
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
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:  # a line cut short by a kill mid-write
            print(f"warning: dropping a damaged line of {path}: {line[:80]!r}", file=sys.stderr)
            continue
        if rec is not None and rec.get("step", math.inf) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def save_checkpoint(out_dir: Path, cfg: TrainConfig, step: int, model, head, emas, opt, rank: int):
    if rank == 0:
        state = {"step": step, "config": asdict(cfg), "model": model.state_dict(),
                 "head": head.state_dict() if head is not None else {},
                 "emas": [e.state_dict() for e in emas], "opt": opt.state_dict()}
        atomic_save(state, out_dir / f"ckpt-{step:08d}.pt")
        for old in checkpoints(out_dir)[:-cfg.keep_ckpts]:
            old.unlink()
            checksum_path(old).unlink(missing_ok=True)
    if dist.is_initialized():
        dist.barrier()


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


USER_ERRORS = (ValueError, FloatingPointError, FileNotFoundError, CheckpointError, datalib.DatasetError)


def main(argv=None):
    """Command line entry. Errors about the input (configuration, data, checkpoints, non-finite numbers)
    end the process with status 1 and a one-line message; set PIXELREPA_TRACEBACK=1 for the traceback."""
    try:
        cfg = TrainConfig(**vars(config_parser(TrainConfig).parse_args(argv)))
        if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
            backend = "nccl" if resolve_device(cfg.device).type == "cuda" else "gloo"
            # a lost process makes the others' collectives fail after dist_timeout instead of hanging
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.dist_timeout))
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        try:
            out = train(cfg)
            if dist_info()[0] == 0:
                print(f"done: {out}")
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except USER_ERRORS as err:
        if os.environ.get("PIXELREPA_TRACEBACK"):
            raise
        print(f"pixelrepa.train: error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
