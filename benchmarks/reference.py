"""The reference-style path: the same JiT, with the same weights, run the way the reference JiT code runs it.

- Attention by hand: logits and softmax in fp32, a zero bias allocated per call (``reference_attention``).
- Every token through every block: the reference strips the in-context class tokens after the last
  block, where ours computes the last block for the image tokens only (JiT and adapter alike).
- Guidance as two separate forwards, conditional and unconditional, at every sampling step, blended
  with weight 1 outside the guidance interval (``reference_sample``); ours batches them into one
  forward and skips the unconditional pass where its weight is 1.

``reference_style(module)`` turns a JiT or an alignment head built by ``pixelrepa`` into its
reference-style twin in place (the same parameters and state dict), so that a figure races both from
one set of weights. Everything else (qk-norm, RoPE, the linears, the loss, the optimiser) is ours:
the measured gap is the attention, the pruned last block and the guidance, and nothing else.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pixelrepa.flow import Net, SamplerConfig, guidance_weight, velocity
from pixelrepa.jit import Attention, JiTBlock, apply_rope, rms


def reference_attention(q, k, v, dropout_p: float = 0.0) -> torch.Tensor:
    """The reference JiT's attention: logits and softmax by hand in fp32, a bias allocated per call.
    The same maths as scaled_dot_product_attention."""
    bias = torch.zeros(q.shape[0], 1, q.shape[-2], k.shape[-2], dtype=q.dtype, device=q.device)
    with torch.autocast(q.device.type, enabled=False):
        w = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    w = torch.softmax(w + bias, dim=-1)
    w = torch.dropout(w, dropout_p, train=dropout_p > 0)
    return (w @ v.float()).to(v.dtype)


class ReferenceAttention(Attention):
    """``jit.Attention`` with the reference's hand-written attention and every token's query; the
    projections, qk-norm and RoPE are ours, op for op, so that only the attention differs."""

    def forward(self, x: torch.Tensor, rope: torch.Tensor, skip: int = 0) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        qk_weight = torch.stack([self.q_norm.weight, self.k_norm.weight])[:, None]
        q, k = apply_rope(rms(qkv[:, :, :2]) * qk_weight, rope).permute(2, 0, 3, 1, 4).unbind(0)
        x = reference_attention(q, k, qkv[:, :, 2].transpose(1, 2), self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))[:, skip:]


class ReferenceBlock(JiTBlock):
    """``jit.JiTBlock`` doing the reference's work: every token through the whole block, then the
    tokens ``skip:`` handed on (ours computes only those after attention)."""

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor, skip: int = 0) -> torch.Tensor:
        return super().forward(x, c, rope)[:, skip:]


def reference_style(module: nn.Module) -> nn.Module:
    """Turn every JiT block and attention of ``module`` (a JiT, an adapter, a ``Trainable``) into the
    reference's, in place. The subclasses add no state: parameters, buffers and state dict stay."""
    for m in module.modules():
        if type(m) is JiTBlock:
            m.__class__ = ReferenceBlock
        elif type(m) is Attention:
            m.__class__ = ReferenceAttention
    return module


def reference_guided_velocity(net: Net, z: torch.Tensor, t: float, y: torch.Tensor, null_class: int,
                              cfg: SamplerConfig) -> torch.Tensor:
    """The reference's guidance: a conditional and an unconditional forward whatever t, blended
    v_u + w (v_c - v_u) with w = guidance_weight(t) (1 outside the interval)."""
    tt = torch.full((z.shape[0],), t, device=z.device)
    v_c = velocity(net(z, tt, y), z, tt, cfg.t_eps)
    v_u = velocity(net(z, tt, torch.full_like(y, null_class)), z, tt, cfg.t_eps)
    return v_u + guidance_weight(t, cfg) * (v_c - v_u)


def reference_sample(net: Net, y: torch.Tensor, z: torch.Tensor, null_class: int, cfg: SamplerConfig) -> torch.Tensor:
    """``flow.sample`` from the noise ``z`` at t = 0 to t = 1 (Heun, Euler on the last step, on the same
    grid) with the reference's two forwards per evaluation. Call it under torch.no_grad, as the
    reference samples."""
    ts = torch.linspace(0, 1, cfg.steps + 1).tolist()
    for i in range(cfg.steps):
        t, dt = ts[i], ts[i + 1] - ts[i]
        v = reference_guided_velocity(net, z, t, y, null_class, cfg)
        if cfg.method == "euler" or i == cfg.steps - 1:
            z = z + dt * v
        else:
            z = z + dt * 0.5 * (v + reference_guided_velocity(net, z + dt * v, ts[i + 1], y, null_class, cfg))
    return z
