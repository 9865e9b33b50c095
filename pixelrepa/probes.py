"""What the explorers show, as plain functions that run without any widget (`widgets` builds the
explorers on them), deterministic given the seeds, on the CPU.

- Runs loaded once (``ModelCache``): each checkpoint's JiT, alignment head and frozen encoder, and the
  encoder's targets of the displayed images.
- Masking: which tokens ``align.token_mask`` masks (``mask_for``, ``masked_view``), and for a run with
  an alignment head the per-token cosine between the head's prediction (from the masked hidden state)
  and the frozen encoder's tokens of the clean image (``adapter_token_cosine``).
- Alignment: the per-token cosine between a block's hidden state, mapped to the encoder's space, and
  the encoder's tokens (``hidden_token_cosine``): the map is the trained head where the run has one
  reading that block, else a least-squares linear map fitted on the displayed images (in-sample: an
  upper bound on what a linear read-out finds); beside it the linear CKA probe
  (``align.probe_alignment``) of every block and t (``cka_probe``, ``cka_grid``).

The head is applied to the raw weights' hidden state (``weights="model"``), the network it was
trained with; the EMA copies ("ema0", ...) can be chosen for the head-free maps.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data as datalib
from . import encoders
from .align import AlignConfig, build_head, probe_alignment, token_mask
from .config import shared
from .flow import add_noise
from .jit import JiT, JiTConfig
from .storage import checkpoints, jit_from_state, read_run

PROBE_TS = (0.1, 0.3, 0.5, 0.7, 0.9)  # the alignment explorer's t grid (its t slider and the CKA probe)


# ----------------------------------------------------------------------------- loading, cached

@dataclass
class LoadedRun:
    """One checkpoint's JiT, alignment head (or None) and frozen encoder, ready on the CPU."""
    path: Path  # the checkpoint file
    step: int
    cfg: dict  # the run's TrainConfig as saved
    jit: JiT
    jit_cfg: JiTConfig
    align: AlignConfig
    head: torch.nn.Module | None
    encoder: torch.nn.Module

    @property
    def name(self) -> str:
        return self.path.parent.name

    @property
    def head_block(self) -> int | None:
        """The block count whose output the head reads, or None for a run without a head."""
        return self.align.depth(self.jit_cfg) if self.head is not None else None

    @property
    def noise_scale(self) -> float:
        return float(self.cfg.get("noise_scale", 1.0))

    @property
    def grid(self) -> int:
        return self.jit_cfg.grid


def checkpoint_step(path: str | Path) -> int:
    m = re.search(r"ckpt-(\d+)\.pt$", str(path))
    return int(m.group(1)) if m else -1


class ModelCache:
    """Checkpoints, encoders and encoder targets loaded once (one per explorer, or shared)."""

    def __init__(self):
        self._runs: dict = {}
        self._encoders: dict = {}
        self._targets: dict = {}
        self._probes: dict = {}

    def encoder(self, name: str, grid: int, weights: str = ""):
        key = (name, grid, weights)
        if key not in self._encoders:
            self._encoders[key] = encoders.build_encoder(name, grid, weights=weights or None)
        return self._encoders[key]

    def run(self, path: str | Path, weights: str = "model") -> LoadedRun:
        """``path``: a run directory (its newest checkpoint) or a ``ckpt-*.pt`` file; ``weights``:
        "model" (raw, what the head was trained with) or "ema0", "ema1", ..."""
        path = Path(path).resolve()
        if path.is_dir():  # the newest file now: a run that trains on is seen at its new step
            files = checkpoints(path)
            if not files:
                raise FileNotFoundError(f"no checkpoint (ckpt-*.pt) in {path}")
            key = (str(files[-1]), weights)
        else:
            key = (str(path), weights)
        if key not in self._runs:
            f, state = read_run(path)
            net, cfg = jit_from_state(state, weights, f)
            jcfg = net.cfg
            align = AlignConfig(**shared(cfg, AlignConfig))  # what the run saved; defaults for what it lacks
            enc = self.encoder(align.encoder, jcfg.grid, cfg.get("encoder_weights", ""))
            head = build_head(align, jcfg, enc.dim)
            if head is not None:
                head.load_state_dict(state["head"])
                head.eval()
            self._runs[key] = LoadedRun(f, int(state.get("step", checkpoint_step(f))), cfg, net.eval(), jcfg,
                                        align, head, enc)
            self._runs[(str(f), weights)] = self._runs[key]
        return self._runs[key]

    def targets(self, run: LoadedRun, images: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's tokens (N, T, D) of the clean uint8 ``images``."""
        images = as_images(images)
        key = (id(run.encoder), images.data_ptr(), tuple(images.shape), int(images.int().sum()))
        if key not in self._targets:
            self._targets[key] = run.encoder(datalib.to_model_range(images)).float()
        return self._targets[key]

    def probe(self, run: LoadedRun, images, labels, ts=PROBE_TS, noise_seed: int = 0) -> list[dict]:
        key = (str(run.path), id(run.jit), tuple(ts), noise_seed, as_images(images).data_ptr(), len(images))
        if key not in self._probes:
            self._probes[key] = cka_probe(run, images, labels, ts, noise_seed=noise_seed, cache=self)
        return self._probes[key]


def as_images(images) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.ndim == 3:
        images = images[None]
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, R, R) or (3, R, R), got {images.dtype} {tuple(images.shape)}")
    return images


def _as_run(run, cache: ModelCache | None, weights: str = "model") -> tuple[LoadedRun, ModelCache]:
    cache = cache or ModelCache()
    return (run if isinstance(run, LoadedRun) else cache.run(run, weights)), cache


def _noise(shape, noise_scale: float, seed: int) -> torch.Tensor:
    """The probe's noise: one draw for the whole batch from ``seed`` (align.probe_alignment)."""
    return noise_scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- computations

def mask_for(grid: int, ratio: float, seed: int) -> torch.Tensor:
    """The (grid * grid,) bool mask ``align.token_mask`` draws for one image from ``seed``."""
    m = token_mask(1, grid * grid, ratio, torch.Generator().manual_seed(seed))
    return torch.zeros(grid * grid, dtype=torch.bool) if m is None else m[0]


def masked_view(image, mask, grid: int, keep: float = 0.25, grey: int = 128) -> np.ndarray:
    """(R, R, 3) uint8 picture of ``image`` (uint8 (3, R, R)) with the tokens of ``mask`` ((T,) bool,
    row-major over the grid x grid tokens) faded to grey: ``keep`` of the image shows through."""
    img = np.asarray(torch.as_tensor(image)).transpose(1, 2, 0).astype(np.float32)
    r = img.shape[0]
    if img.shape[:2] != (r, r) or r % grid:
        raise ValueError(f"image of {img.shape[:2]} px does not split into a {grid} x {grid} token grid")
    p = r // grid
    m = np.zeros(grid * grid, bool) if mask is None else np.asarray(torch.as_tensor(mask)).astype(bool)
    if m.shape != (grid * grid,):
        raise ValueError(f"mask must have {grid * grid} entries, got shape {m.shape}")
    pix = np.kron(m.reshape(grid, grid), np.ones((p, p), bool))[..., None]
    out = np.where(pix, keep * img + (1 - keep) * grey, img)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@torch.no_grad()
def adapter_token_cosine(run, image, label: int, t: float, mask_ratio: float, seed: int, noise_seed: int = 0,
                         cache: ModelCache | None = None, weights: str = "model") -> dict:
    """The head's per-token cosine with the encoder's tokens of the clean image, for one image noised
    to ``t`` (noise from ``noise_seed``) and its hidden state masked by ``mask_for(grid, mask_ratio,
    seed)``. A REPA projector ignores the mask. ``run``: a run directory, a checkpoint or a LoadedRun.

    Returns ``mask`` (T,) bool, ``cos`` (T,) float tensor (None for a run without a head), ``grid``
    and the run's ``method``.
    """
    run, cache = _as_run(run, cache, weights)
    image = as_images(image)[:1]
    mask = mask_for(run.grid, mask_ratio, seed)
    out = {"mask": mask, "cos": None, "grid": run.grid, "method": run.align.method, "t": float(t)}
    if run.head is None:
        return out
    x = datalib.to_model_range(image)
    tt = torch.full((1,), float(t))
    y = torch.tensor([int(label)])
    z = add_noise(x, tt, _noise(x.shape, run.noise_scale, noise_seed))
    _, (h,) = run.jit(z, tt, y, hidden_at=(run.head_block,))
    pred = run.head(h, tt, y, mask[None] if mask.any() else None)
    out["cos"] = F.cosine_similarity(pred.float(), cache.targets(run, image), dim=-1)[0]
    return out


@torch.no_grad()
def hidden_token_cosine(run, images, labels, t: float, block: int, noise_seed: int = 0,
                        cache: ModelCache | None = None, weights: str = "model") -> dict:
    """Per-token cosine (N, T) between block ``block``'s hidden state, mapped to the encoder's space,
    and the encoder's tokens of the clean images, for the images noised to ``t`` (one noise draw
    for the batch from ``noise_seed``, the same as ``align.probe_alignment``).

    The map (``source``): "head" when the run's head reads this block (its prediction, no mask);
    else "linear", a least-squares affine map fitted on these images' tokens (in-sample).
    """
    run, cache = _as_run(run, cache, weights)
    images = as_images(images)
    if not 1 <= block <= run.jit_cfg.depth:
        raise ValueError(f"block {block} is not in [1, depth={run.jit_cfg.depth}]")
    x = datalib.to_model_range(images)
    y = torch.as_tensor(labels).long().view(-1)
    tt = torch.full((len(x),), float(t))
    z = add_noise(x, tt, _noise(x.shape, run.noise_scale, noise_seed))
    _, (h,) = run.jit(z, tt, y, hidden_at=(block,))
    target = cache.targets(run, images)
    if run.head is not None and block == run.head_block:
        pred, source = run.head(h, tt, y, None).float(), "head"
    else:
        pred, source = linear_map(h, target), "linear"
    cos = F.cosine_similarity(pred, target, dim=-1)
    return {"cos": cos, "source": source, "grid": run.grid, "block": block, "t": float(t),
            "method": run.align.method, "mean_cos": float(cos.mean())}


def linear_map(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The least-squares affine map from tokens ``h`` (N, T, w) to ``target`` (N, T, D), fitted on
    these N * T tokens and applied to them (float64; minimum-norm when under-determined)."""
    X = h.reshape(-1, h.shape[-1]).double()
    X = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    Y = target.reshape(-1, target.shape[-1]).double()
    W = torch.linalg.lstsq(X, Y, driver="gelsd").solution
    return (X @ W).float().view(*target.shape)


def cka_probe(run, images, labels, ts=PROBE_TS, blocks=None, noise_seed: int = 0,
              cache: ModelCache | None = None, weights: str = "model") -> list[dict]:
    """``align.probe_alignment`` (linear CKA of pooled hidden state vs pooled encoder tokens over
    the images) for every block and t: records {block, t, cka}."""
    run, cache = _as_run(run, cache, weights)
    images = as_images(images)
    return probe_alignment(run.jit, datalib.to_model_range(images), torch.as_tensor(labels).long().view(-1),
                           cache.targets(run, images), ts=tuple(ts), blocks=blocks,
                           noise_scale=run.noise_scale, seed=noise_seed)


def cka_grid(records: list[dict]) -> tuple[list[int], list[float], list[list[float]]]:
    """(blocks, ts, z[block][t]) from probe records."""
    blocks = sorted({r["block"] for r in records})
    ts = sorted({r["t"] for r in records})
    val = {(r["block"], r["t"]): r["cka"] for r in records}
    return blocks, ts, [[val.get((b, t), float("nan")) for t in ts] for b in blocks]
