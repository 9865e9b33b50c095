"""Representation alignment as an additive, training-only head on a JiT hidden state.

Four methods, differing only in configuration:
- ``jit``: no head.
- ``repa``: REPA's per-token MLP projector on the output of block ``align_depth``; total loss
  v_loss + 0.5 * (1 - cos). (REPA writes -cos; the constant does not change the gradient.)
- ``pixelrepa``: the Masked Transformer Adapter (MTA): 2 JiT blocks with their own t and y embedders
  and in-context class tokens, reading the hidden state after ``in_context_start`` blocks with 20% of
  its tokens replaced by a learnable mask token; total v_loss + 0.1 * (1 - cos) over all tokens.
- ``adapter``: the same adapter without masking (mask_ratio 0), the paper's ablation.
The JiT pathway continues from the same unmasked hidden state, so one pass feeds both losses and the
alignment gradient reaches the early blocks (`Trainable`, the JiT and its head as one module;
`step_loss`, one batch's objective). Sampling never calls a head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import refuse
from .flow import add_noise, v_loss
from .jit import JiT, JiTBlock, JiTConfig, TimestepEmbedder, rope_2d

METHODS = ("jit", "repa", "adapter", "pixelrepa")
DEFAULT_COEF = {"repa": 0.5, "adapter": 0.1, "pixelrepa": 0.1}
DEFAULT_MASK_RATIO = {"adapter": 0.0, "pixelrepa": 0.2}


@dataclass(frozen=True)
class AlignConfig:
    method: str = "jit"
    encoder: str = "effnet-lite0"  # or "dinov2-b14" where its weights are present
    align_depth: int | None = None  # block count whose output is read; None: the JiT's in_context_start
    align_coef: float | None = None  # None: the paper's (REPA 0.5, adapters 0.1)
    mask_ratio: float | None = None  # None: 0.2 for pixelrepa, 0 for the unmasked adapter
    proj_hidden: int = 2048  # REPA projector width
    adapter_depth: int = 2

    def __post_init__(self):
        check_align(self)
        if self.adapter_depth < 1:
            refuse(self, "adapter_depth", "must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.method != "jit"

    def depth(self, jit_cfg: JiTConfig) -> int:
        return aligned_depth(self, jit_cfg)

    @property
    def loss_coef(self) -> float:
        return DEFAULT_COEF.get(self.method, 0.0) if self.align_coef is None else self.align_coef

    @property
    def ratio(self) -> float:
        return DEFAULT_MASK_RATIO.get(self.method, 0.0) if self.mask_ratio is None else self.mask_ratio


def check_align(cfg, jit_cfg: JiTConfig | None = None) -> None:
    """Refuse bad alignment settings of ``cfg``, an AlignConfig or any config with its fields (a
    TrainConfig), naming the field of ``cfg``'s class; with ``jit_cfg``, also the depth it reads."""
    if cfg.method not in METHODS:
        refuse(cfg, "method", f"must be one of {', '.join(METHODS)}")
    if cfg.align_coef is not None and not cfg.align_coef >= 0:
        refuse(cfg, "align_coef", "must be >= 0 (or None for the paper's value)")
    if cfg.mask_ratio is not None and not 0 <= cfg.mask_ratio < 1:
        refuse(cfg, "mask_ratio", "must be in [0, 1) (or None for the method's default)")
    if cfg.method == "adapter" and cfg.mask_ratio not in (None, 0.0):
        refuse(cfg, "mask_ratio", "the unmasked adapter has mask ratio 0; use method='pixelrepa' to mask")
    if cfg.proj_hidden < 1:
        refuse(cfg, "proj_hidden", "must be >= 1")
    if jit_cfg is not None:
        aligned_depth(cfg, jit_cfg)


def aligned_depth(cfg, jit_cfg: JiTConfig) -> int:
    """The block count whose output ``cfg``'s head reads: its align_depth, or the JiT's in_context_start."""
    d = jit_cfg.in_context_start if cfg.align_depth is None else cfg.align_depth
    if not 1 <= d <= jit_cfg.depth:
        refuse(cfg, "align_depth", f"must be in [1, depth={jit_cfg.depth}]", value=d)
    return d


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mean(1 - cos) over tokens and batch, and the per-token cosines (for logging and explorers)."""
    if pred.shape != target.shape:
        raise ValueError(f"alignment targets have shape {tuple(target.shape)} (batch, tokens, dim) but the head "
                         f"predicts {tuple(pred.shape)}: the encoder must give one token per JiT patch "
                         f"({pred.shape[1] if pred.ndim == 3 else '?'} here, the targets have "
                         f"{target.shape[1] if target.ndim == 3 else '?'}) and the head must end at the encoder's width")
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)
    return (1 - cos).mean(), cos.detach()


class REPAProjector(nn.Module):
    """Per-token Linear(w, h) - SiLU - Linear(h, h) - SiLU - Linear(h, D_enc)."""

    def __init__(self, width: int, enc_dim: int, hidden: int = 2048):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, enc_dim))

    def forward(self, h, t, y, mask=None):
        return self.net(h)


class MaskedTransformerAdapter(nn.Module):
    """PixelREPA's MTA. ``mask`` (B, N) bool marks tokens replaced by the mask token; the mask token
    carries no absolute position (the JiT's was added at its input) but is rotated by RoPE."""

    def __init__(self, jit_cfg: JiTConfig, enc_dim: int, depth: int = 2):
        super().__init__()
        w = jit_cfg.width
        self.in_context_len = jit_cfg.in_context_len
        self.t_embedder = TimestepEmbedder(w)
        self.y_embedder = nn.Embedding(jit_cfg.num_classes + 1, w)
        self.in_context_pos = nn.Parameter(torch.zeros(1, jit_cfg.in_context_len, w))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, w))
        self.register_buffer("rope", rope_2d(w // jit_cfg.num_heads, jit_cfg.grid, jit_cfg.in_context_len),
                             persistent=False)
        self.blocks = nn.ModuleList(JiTBlock(w, jit_cfg.num_heads, jit_cfg.mlp_ratio) for _ in range(depth))
        self.head = nn.Identity() if w == enc_dim else nn.Sequential(
            nn.Linear(w, w), nn.LayerNorm(w), nn.SiLU(), nn.Linear(w, enc_dim))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.in_context_pos, self.mask_token, self.y_embedder.weight,
                  self.t_embedder.mlp[0].weight, self.t_embedder.mlp[2].weight):
            nn.init.normal_(p, std=0.02)
        for b in self.blocks:  # adaLN-Zero, as in the JiT
            nn.init.zeros_(b.adaLN_modulation[-1].weight)
            nn.init.zeros_(b.adaLN_modulation[-1].bias)

    def forward(self, h, t, y, mask=None):
        if mask is not None:
            h = torch.where(mask.unsqueeze(-1), self.mask_token.to(h.dtype), h)
        y_emb = self.y_embedder(y)
        c = self.t_embedder(t) + y_emb
        L = self.in_context_len
        x = torch.cat([y_emb.unsqueeze(1) + self.in_context_pos, h], dim=1) if L else h
        for block in self.blocks[:-1]:
            x = block(x, c, self.rope)
        # the last block gives the image tokens only (the in-context ones are not aligned), as the JiT's
        return self.head(self.blocks[-1](x, c, self.rope, L))


def build_head(cfg: AlignConfig, jit_cfg: JiTConfig, enc_dim: int) -> nn.Module | None:
    if cfg.method == "jit":
        return None
    if cfg.method == "repa":
        return REPAProjector(jit_cfg.width, enc_dim, cfg.proj_hidden)
    return MaskedTransformerAdapter(jit_cfg, enc_dim, cfg.adapter_depth)


def token_mask(batch: int, tokens: int, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Per-token Bernoulli mask: each token is masked with probability ``ratio``, independently."""
    if ratio <= 0:
        return None
    return torch.rand(batch, tokens, generator=generator) < ratio


# ----------------------------------------------------------------------------- the objective

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


# ----------------------------------------------------------------------------- alignment probe

def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA between two sets of features (n, d1) and (n, d2) of the same n items (Kornblith
    et al., 2019): 1 for representations equal up to rotation and scale, ~0 for unrelated ones."""
    X = X.double() - X.double().mean(0)
    Y = Y.double() - Y.double().mean(0)
    hsic = (Y.T @ X).square().sum()
    return (hsic / ((X.T @ X).square().sum().sqrt() * (Y.T @ Y).square().sum().sqrt())).item()


@torch.no_grad()
def probe_alignment(net, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, ts=(0.25, 0.5, 0.75),
                    blocks=None, noise_scale: float = 1.0, seed: int = 0) -> list[dict]:
    """Linear CKA between the JiT's mean-pooled hidden state after each block and the encoder's
    mean-pooled features, for images x (model range) noised to each t. One record per (block, t)."""
    blocks = tuple(sorted(blocks or range(1, net.cfg.depth + 1)))
    g = torch.Generator().manual_seed(seed)
    e = noise_scale * torch.randn(x.shape, generator=g).to(x.device)
    pooled_target = target.float().mean(1)
    out = []
    for t in ts:
        tt = torch.full((x.shape[0],), float(t), device=x.device)
        _, hidden = net(add_noise(x, tt, e), tt, y, hidden_at=blocks)
        for k, h in zip(blocks, hidden):
            out.append({"block": k, "t": float(t), "cka": linear_cka(h.float().mean(1), pooled_target)})
    return out
