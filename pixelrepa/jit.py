"""JiT: a plain Vision Transformer that maps noisy pixels (z, t, y) to clean pixels x_pred.

Faithful to the JiT paper's network (see ../shared/REFERENCE.md): bottleneck patch embedding, fixed
2D sin-cos positions plus 2D RoPE (identity on the in-context class tokens), RMSNorm, qk-norm,
SwiGLU, adaLN-Zero, 32 in-context class tokens prepended at block ``in_context_start``, a null class
for classifier-free guidance and a zero-initialised final layer. The diffusion process lives in
``flow.py``; alignment heads in ``align.py`` read hidden states this module hands back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import refuse

# Paper sizes, plus small ones for CPU work at 32-128 px. Resolution and classes are set per run.
MODELS: dict[str, dict] = {
    "JiT-B/16": dict(depth=12, width=768, num_heads=12, bottleneck=128, in_context_start=4, patch_size=16),
    "JiT-L/16": dict(depth=24, width=1024, num_heads=16, bottleneck=128, in_context_start=8, patch_size=16),
    "JiT-H/16": dict(depth=32, width=1280, num_heads=16, bottleneck=256, in_context_start=10, patch_size=16,
                     proj_drop=0.2),  # as the reference commands: projection dropout only (attention: 0)
    "JiT-B/32": dict(depth=12, width=768, num_heads=12, bottleneck=128, in_context_start=4, patch_size=32),
    "JiT-L/32": dict(depth=24, width=1024, num_heads=16, bottleneck=128, in_context_start=8, patch_size=32),
    "JiT-H/32": dict(depth=32, width=1280, num_heads=16, bottleneck=256, in_context_start=10, patch_size=32,
                     proj_drop=0.2),
    # CPU sizes: 64 image tokens at 32 px (/4) or 64 px (/8); 128 px /16 keeps the same token count.
    "JiT-Ti/4": dict(depth=6, width=192, num_heads=3, bottleneck=64, in_context_start=2, patch_size=4),
    "JiT-Ti/8": dict(depth=6, width=192, num_heads=3, bottleneck=64, in_context_start=2, patch_size=8),
    "JiT-Ti/16": dict(depth=6, width=192, num_heads=3, bottleneck=64, in_context_start=2, patch_size=16),
    "JiT-S/4": dict(depth=8, width=256, num_heads=4, bottleneck=64, in_context_start=2, patch_size=4),
    "JiT-S/8": dict(depth=8, width=256, num_heads=4, bottleneck=64, in_context_start=2, patch_size=8),
    "JiT-S/16": dict(depth=8, width=256, num_heads=4, bottleneck=64, in_context_start=2, patch_size=16),
}


@dataclass(frozen=True)
class JiTConfig:
    input_size: int = 32
    patch_size: int = 4
    depth: int = 6
    width: int = 192
    num_heads: int = 3
    bottleneck: int = 64
    in_context_len: int = 32
    in_context_start: int = 2
    num_classes: int = 22
    mlp_ratio: float = 4.0
    attn_drop: float = 0.0
    proj_drop: float = 0.0

    def __post_init__(self):
        for f in ("input_size", "patch_size", "depth", "width", "num_heads", "bottleneck", "num_classes"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                refuse(self, f, "must be a positive integer")
        if self.input_size % self.patch_size:
            refuse(self, "input_size", f"must be divisible by patch_size={self.patch_size}")
        if self.width % self.num_heads or (self.width // self.num_heads) % 4:
            refuse(self, "width", f"width / num_heads must be a multiple of 4 (2D RoPE), num_heads={self.num_heads}")
        if self.in_context_len < 0:
            refuse(self, "in_context_len", "must be >= 0")
        if not 0 <= self.in_context_start < self.depth:
            refuse(self, "in_context_start", f"must be in [0, depth={self.depth})")
        for f in ("attn_drop", "proj_drop"):
            if not 0.0 <= getattr(self, f) < 1.0:
                refuse(self, f, "must be in [0, 1)")

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2


def jit_config(model: str, input_size: int, num_classes: int, **overrides) -> JiTConfig:
    """The registry entry ``model`` (e.g. 'JiT-B/16') at a resolution and class count; ``overrides``
    replace its fields, an override of None keeps the registry's value."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; valid names: {', '.join(MODELS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return JiTConfig(input_size=input_size, num_classes=num_classes, **{**MODELS[model], **overrides})


# ----------------------------------------------------------------------------- positions

def sincos_2d(width: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos absolute positions (grid*grid, width): half the channels per axis."""
    assert width % 4 == 0
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for pos in (cols.flatten(), rows.flatten()):
        angle = pos[:, None] * omega[None]
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=1).float()


def rope_2d(head_dim: int, grid: int, num_identity: int = 0, theta: float = 10000.0) -> torch.Tensor:
    """2D RoPE table (N, head_dim/2, 2) of (cos, sin) for channel pairs (2i, 2i + 1).

    The first half of the head dimension rotates with the row index and the second with the column
    index (half the head dim per axis, theta 10000). ``num_identity`` leading tokens (the
    in-context class tokens) get the identity rotation.
    """
    quarter = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    angle = torch.cat([rows.flatten()[:, None] * freqs, cols.flatten()[:, None] * freqs], dim=1)
    angle = torch.cat([torch.zeros(num_identity, head_dim // 2, dtype=angle.dtype), angle])
    return torch.stack([angle.cos(), angle.sin()], dim=-1).float()


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i + 1) of x (B, N, ..., D) by the table of ``rope_2d``.

    As one complex multiply: on the CPU about 5x faster than the rotate-half form, forward and back.
    """
    shape = (rope.shape[0],) + (1,) * (x.ndim - 3) + (rope.shape[1],)
    if torch.compiler.is_compiling():
        # the same complex multiply in real arithmetic: inductor generates no code for complex ops
        # (it would run them eagerly, with copies), and this form fuses with qk-norm
        cos, sin = rope.view(*shape, 2).unbind(-1)
        a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)
    cis = torch.view_as_complex(rope).view(shape)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * cis).flatten(-2).type_as(x)


class _RMS(torch.autograd.Function):
    """RMSNorm without a weight, with a hand-fused backward: dx = r (g - y mean(g y)).

    On the CPU the composite F.rms_norm (or a vector_norm expression) spends most of its time in
    autograd's many small backward ops; this is about twice as fast and agrees to float rounding.
    """

    @staticmethod
    def forward(ctx, x, eps):
        r = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps))
        y = x * r
        ctx.save_for_backward(y, r)
        return y

    @staticmethod
    def backward(ctx, g):
        y, r = ctx.saved_tensors
        m = torch.linalg.vecdot(g, y).unsqueeze(-1).div_(-y.shape[-1])
        return torch.addcmul(g, y, m).mul_(r), None


def rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMS-normalise the last dim without a weight (callers fold the weight into a later multiply)."""
    if x.device.type == "cpu" and torch.is_grad_enabled():
        return _RMS.apply(x, eps)
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


# ----------------------------------------------------------------------------- layers

class Linear(nn.Linear):
    """nn.Linear (same parameters and maths). Compiled for the CPU, the bias is added after the
    matmul: inductor would copy the broadcast bias into the output before the GEMM, a whole pass
    over it, where the add fuses into the elementwise work that follows (on GPUs it does this itself)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None and x.device.type == "cpu" and torch.compiler.is_compiling():
            return F.linear(x, self.weight) + self.bias
        return F.linear(x, self.weight, self.bias)


def norm_modulate(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: RMSNorm(x) * (1 + scale) + shift, with the RMSNorm weight folded into the scale."""
    return torch.addcmul(shift.unsqueeze(1), rms(x), (weight * (1 + scale)).unsqueeze(1))


class TimestepEmbedder(nn.Module):
    """256-d sinusoidal features of raw t in [0, 1] (max period 10000), then Linear-SiLU-Linear."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.qkv = Linear(width, 3 * width)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.attn_drop = attn_drop
        self.proj = Linear(width, width)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, skip: int = 0) -> torch.Tensor:
        """Attention over all N tokens; outputs for tokens ``skip:`` only (queries of the first ``skip``
        tokens are not computed: the last block's in-context outputs are discarded anyway)."""
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        # qk-norm and RoPE on q and k together: half the elementwise launches
        qk_weight = torch.stack([self.q_norm.weight, self.k_norm.weight])[:, None]
        qk = apply_rope(rms(qkv[:, :, :2]) * qk_weight, rope)
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)
        q = q[:, :, skip:]
        v = qkv[:, :, 2].transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N - skip, C)))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int, drop: float):
        super().__init__()
        self.w12 = Linear(width, 2 * hidden)
        self.w3 = Linear(hidden, width)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.drop(F.silu(x1) * x2))


class JiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero (6 modulations from c = t_emb + y_emb)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.RMSNorm(width, eps=1e-6)
        self.attn = Attention(width, num_heads, attn_drop, proj_drop)
        self.norm2 = nn.RMSNorm(width, eps=1e-6)
        self.mlp = SwiGLU(width, int(width * mlp_ratio * 2 / 3), proj_drop)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor, skip: int = 0) -> torch.Tensor:
        """``skip``: return only tokens ``skip:`` (the others still serve as keys and values), the same
        values as ``forward(x, c, rope)[:, skip:]`` for the work of N - skip tokens after attention."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        a = self.attn(norm_modulate(x, self.norm1.weight, shift1, scale1), rope, skip)
        x = torch.addcmul(x[:, skip:], gate1.unsqueeze(1), a)
        return torch.addcmul(x, gate2.unsqueeze(1), self.mlp(norm_modulate(x, self.norm2.weight, shift2, scale2)))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = Linear(width, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(norm_modulate(x, self.norm.weight, shift, scale))


# ----------------------------------------------------------------------------- network

class JiT(nn.Module):
    def __init__(self, cfg: JiTConfig):
        super().__init__()
        self.cfg = cfg
        w, p = cfg.width, cfg.patch_size
        self.t_embedder = TimestepEmbedder(w)
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, w)  # last index: the null class
        # bottleneck patch embedding: a low-rank linear map of each p x p x 3 patch
        self.patch1 = nn.Conv2d(3, cfg.bottleneck, kernel_size=p, stride=p, bias=False)
        self.patch2 = nn.Conv2d(cfg.bottleneck, w, kernel_size=1)
        self.register_buffer("pos_embed", sincos_2d(w, cfg.grid)[None], persistent=False)
        self.in_context_pos = nn.Parameter(torch.zeros(1, cfg.in_context_len, w))
        hd = w // cfg.num_heads
        self.register_buffer("rope", rope_2d(hd, cfg.grid), persistent=False)
        self.register_buffer("rope_ic", rope_2d(hd, cfg.grid, cfg.in_context_len), persistent=False)
        lo, hi = cfg.depth // 4, cfg.depth // 4 * 3  # dropout only in the middle half
        self.blocks = nn.ModuleList(
            JiTBlock(w, cfg.num_heads, cfg.mlp_ratio,
                     cfg.attn_drop if lo <= i < hi else 0.0, cfg.proj_drop if lo <= i < hi else 0.0)
            for i in range(cfg.depth))
        self.final_layer = FinalLayer(w, p * p * 3)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for conv in (self.patch1, self.patch2):  # like a Linear on the flattened patch
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(self.patch2.bias)
        nn.init.normal_(self.in_context_pos, std=0.02)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for mod in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                    self.final_layer.linear]:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    def embed(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        """Image tokens with positions, the conditioning vector c and the class embedding."""
        if z.shape[-1] != self.cfg.input_size or z.shape[-2] != self.cfg.input_size:
            raise ValueError(f"JiT built for {self.cfg.input_size} px got input of shape {tuple(z.shape)}")
        y_emb = self.y_embedder(y)
        c = self.t_embedder(t) + y_emb
        x = self.patch2(self.patch1(z)).flatten(2).transpose(1, 2) + self.pos_embed
        return x, c, y_emb

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        B, g, p = x.shape[0], self.cfg.grid, self.cfg.patch_size
        return x.view(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, g * p, g * p)

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor, hidden_at: tuple[int, ...] = ()):
        """x_pred for noisy images z at times t (1 = clean) and labels y (num_classes = null).

        ``hidden_at``: block counts k (1..depth) whose output image tokens (in-context tokens
        stripped) are returned too, as ``(x_pred, [h_k ...])``; k = in_context_start is the state
        before the class tokens are inserted, the one the PixelREPA adapter reads.
        """
        x, c, y_emb = self.embed(z, t, y)
        L, start, hidden = self.cfg.in_context_len, self.cfg.in_context_start, []
        # The last block computes outputs for the image tokens only: the in-context tokens' outputs
        # would be stripped before the final layer.
        for i, block in enumerate(self.blocks):
            if i == start and L > 0:
                x = torch.cat([y_emb.unsqueeze(1) + self.in_context_pos, x], dim=1)
            skip = L if i == len(self.blocks) - 1 and i >= start else 0
            x = block(x, c, self.rope_ic if i >= start and L > 0 else self.rope, skip)
            L -= skip  # 0 once the last block has dropped the in-context tokens
            if i + 1 in hidden_at:
                hidden.append(x[:, L:] if i >= start else x)
        x_pred = self.unpatchify(self.final_layer(x[:, L:], c))
        return (x_pred, hidden) if hidden_at else x_pred


def build_jit(model: str = "JiT-Ti/4", input_size: int = 32, num_classes: int = 22, **overrides) -> JiT:
    return JiT(jit_config(model, input_size, num_classes, **overrides))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["MODELS", "JiTConfig", "JiT", "JiTBlock", "jit_config", "build_jit", "count_params",
           "rope_2d", "apply_rope", "sincos_2d"]
