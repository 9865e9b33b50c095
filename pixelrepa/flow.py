"""The flow-matching process around an x-predicting network (JiT's convention: t = 1 is clean).

Training: t = sigmoid(N(P_mean, P_std)), z = t * x + (1 - t) * e with e = noise_scale * N(0, I); the
network predicts x and the loss is on velocity, v = (x - z) / max(1 - t, t_eps). Sampling integrates
dz/dt = v from t = 0 (noise) to t = 1 with Heun (Euler on the last step) and classifier-free
guidance applied only inside an interval of t (weight 1 outside it). Nothing here knows what the network is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import refuse

Net = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (z, t, y) -> x_pred


@dataclass(frozen=True)
class FlowConfig:
    P_mean: float = -0.8
    P_std: float = 0.8
    noise_scale: float = 1.0
    t_eps: float = 0.05
    label_drop: float = 0.1

    def __post_init__(self):
        check_flow(self)


def check_flow(cfg) -> None:
    """Refuse bad process settings of ``cfg``, a FlowConfig or any config with its fields (a
    TrainConfig), naming the field of ``cfg``'s class."""
    if not cfg.P_std > 0:
        refuse(cfg, "P_std", "must be > 0")
    if not cfg.noise_scale > 0:
        refuse(cfg, "noise_scale", "must be > 0")
    if not 0 <= cfg.t_eps < 1:
        refuse(cfg, "t_eps", "must be in [0, 1)")
    if not 0 <= cfg.label_drop < 1:
        refuse(cfg, "label_drop", "must be in [0, 1)")


def sample_t(n: int, cfg: FlowConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Logit-normal training times."""
    return torch.sigmoid(torch.randn(n, generator=generator) * cfg.P_std + cfg.P_mean)


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.ndim - 1)))


def add_noise(x: torch.Tensor, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """z = t x + (1 - t) e; e already carries noise_scale."""
    t = _bcast(t, x)
    return t * x + (1 - t) * e


def velocity(x_pred: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_eps: float) -> torch.Tensor:
    """v = (x_pred - z) / max(1 - t, t_eps): the clamp keeps the target finite as t -> 1."""
    return (x_pred - z) / (1 - _bcast(t, z)).clamp_min(t_eps)


def v_loss(x_pred: torch.Tensor, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_eps: float) -> torch.Tensor:
    """Per-sample velocity loss mean((v - v_pred)^2); the z terms cancel, leaving the clamped x error."""
    return ((velocity(x, z, t, t_eps) - velocity(x_pred, z, t, t_eps)) ** 2).flatten(1).mean(1)


# ----------------------------------------------------------------------------- sampling

@dataclass(frozen=True)
class SamplerConfig:
    steps: int = 50
    method: str = "heun"  # "heun" (Euler on the last step) or "euler"
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.1, 1.0)  # guidance for lo < t < hi (lo = 0: for t < hi), else weight 1
    noise_scale: float = 1.0
    t_eps: float = 0.05
    max_batch: int = 0  # > 0: network calls of more images run in chunks of this many (0: no limit)

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"SamplerConfig.steps={self.steps!r}: must be a positive integer")
        if self.method not in ("heun", "euler"):
            raise ValueError(f"SamplerConfig.method={self.method!r}: must be 'heun' or 'euler'")
        lo, hi = self.cfg_interval
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"SamplerConfig.cfg_interval={self.cfg_interval!r}: need 0 <= lo <= hi <= 1")
        if self.cfg_scale < 0:
            raise ValueError(f"SamplerConfig.cfg_scale={self.cfg_scale!r}: must be >= 0")
        if not isinstance(self.max_batch, int) or self.max_batch < 0:
            raise ValueError(f"SamplerConfig.max_batch={self.max_batch!r}: must be an integer >= 0 (0: no limit)")


def guidance_weight(t: float, cfg: SamplerConfig) -> float:
    """cfg_scale inside the interval, 1 outside it; as the reference, lo = 0 closes the interval's
    lower end (t = 0 is guided) and any other lo opens it."""
    lo, hi = cfg.cfg_interval
    return cfg.cfg_scale if t < hi and (lo == 0 or t > lo) else 1.0


def _chunked(net: Net, max_batch: int) -> Net:
    """``net`` on at most ``max_batch`` images per call. On a CPU a forward's cost per image grows with
    its batch (the activations leave the caches), so that a batch of 2B (batched guidance) can cost
    more than two of B; on a GPU the larger batch is the faster."""
    if not max_batch:
        return net

    def run(z, t, y):
        if z.shape[0] <= max_batch:
            return net(z, t, y)
        return torch.cat([net(z[i:i + max_batch], t[i:i + max_batch], y[i:i + max_batch])
                          for i in range(0, z.shape[0], max_batch)])
    return run


def guided_velocity(net: Net, z: torch.Tensor, t: float, y: torch.Tensor, null_class: int,
                    cfg: SamplerConfig) -> torch.Tensor:
    """v_u + w (v_c - v_u), w = guidance_weight(t): the conditional and unconditional passes in one
    forward of 2B; where w = 1 that is v_c, computed without the unconditional pass (the same velocity
    up to float rounding)."""
    net = _chunked(net, cfg.max_batch)
    tt = torch.full((z.shape[0],), t, device=z.device)
    w = guidance_weight(t, cfg)
    if w == 1.0:
        return velocity(net(z, tt, y), z, tt, cfg.t_eps)
    x_c, x_u = net(torch.cat([z, z]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, null_class)])).chunk(2)
    v_c, v_u = velocity(x_c, z, tt, cfg.t_eps), velocity(x_u, z, tt, cfg.t_eps)
    return v_u + w * (v_c - v_u)


@torch.no_grad()
def sample(net: Net, y: torch.Tensor, shape: tuple[int, ...], null_class: int, cfg: SamplerConfig = SamplerConfig(),
           generator: torch.Generator | None = None, z: torch.Tensor | None = None, t_start: float = 0.0) -> torch.Tensor:
    """Integrate from z_0 = noise_scale * N(0, I) at t = 0 to t = 1; returns x in model range.

    With ``z`` and ``t_start`` it integrates a given noisy state from t_start to 1 on the grid
    linspace(t_start, 1, steps + 1): the partial denoising of the feature-hacking diagnostic.
    """
    if not 0 <= t_start < 1:
        raise ValueError(f"t_start={t_start!r}: must be in [0, 1)")
    if z is None:
        z = cfg.noise_scale * torch.randn((y.shape[0], *shape), generator=generator).to(y.device)
    ts = torch.linspace(t_start, 1, cfg.steps + 1).tolist()
    for i in range(cfg.steps):
        t, t_next = ts[i], ts[i + 1]
        v = guided_velocity(net, z, t, y, null_class, cfg)
        if cfg.method == "euler" or i == cfg.steps - 1:
            z = z + (t_next - t) * v
        else:
            z_euler = z + (t_next - t) * v
            v_next = guided_velocity(net, z_euler, t_next, y, null_class, cfg)
            z = z + (t_next - t) * 0.5 * (v + v_next)
    return z


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """n labels cycling through the classes: counts differ by at most one between classes."""
    return torch.arange(n) % num_classes


def matched_labels(n: int, counts: torch.Tensor) -> torch.Tensor:
    """n labels with the class frequencies of ``counts`` (e.g. the FID reference set's), so that samples
    and reference have one class mix: each class gets floor(n * p) labels and the largest remainders one
    more (every count within 1 of n * p). Interleaved, so that any prefix has nearly the same mix."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.ndim != 1 or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError("counts must be a 1-d tensor of non-negative class counts, not all 0")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    share = n * counts / counts.sum()
    k = share.floor().long()
    rest = n - int(k.sum())
    k[torch.argsort(share - k, descending=True, stable=True)[:rest]] += 1
    labels = torch.repeat_interleave(torch.arange(len(k)), k)
    rank = torch.cat([(torch.arange(int(c)) + 0.5) / int(c) for c in k if c > 0]) if n else torch.zeros(0)
    return labels[torch.argsort(rank, stable=True)]


@torch.no_grad()
def generate(net: Net, n: int, num_classes: int, shape: tuple[int, ...], cfg: SamplerConfig = SamplerConfig(),
             batch_size: int = 64, seed: int = 0, device: torch.device | str = "cpu", progress: bool = True,
             labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n class-balanced samples as uint8 images (n, C, H, W) and their labels, in batches.

    Each batch draws its noise from (seed, index of its first image): the same call gives the same
    images whatever ran before it.
    """
    from tqdm import tqdm
    from .data import from_model_range
    labels = balanced_labels(n, num_classes) if labels is None else labels
    out = []
    for i in tqdm(range(0, n, batch_size), desc="sample", disable=not progress, dynamic_ncols=True):
        y = labels[i:i + batch_size].to(device)
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        x = sample(net, y, shape, num_classes, cfg, generator=g)
        out.append(from_model_range(x.float().cpu()))
    return torch.cat(out), labels
