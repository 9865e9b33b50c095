"""The paper's diagnostics: feature hacking (claim 2) and the same-token-count resolution sweep (claim 1).

Feature hacking: per class, the images closest to and farthest from the class centroid in an
encoder's space (cosine similarity of token-pooled, L2-normalised features) form a "most" and a
"least" subset. Each image is noised to time t (z = t x + (1 - t) e, JiT's convention: t = 1 is
clean) and integrated back to t = 1 by each model with the sampler of `flow.sample`. Each subset's
reconstructions are compared with the same subset's clean images: FID (Inception) and FD in the
encoder's space, each with a paired bootstrap interval. The paper's claim: vanilla JiT wins on
"most", JiT + REPA on "least".

The Frechet distance is always torch-fidelity's (`fid_features_to_statistics`,
`fid_statistics_to_metric`) on features from its registered extractors, so a point value equals
what `metrics.compute_metrics` reports for the same images. To make a bootstrap affordable on the
CPU, both feature sets are first written in an orthonormal basis of their joint span: an isometry
that changes no mean difference, trace or eigenvalue of the distance, and shrinks the 2048 x 2048
eigenproblem (~3 s) to one of size n_fake + n_real when that is smaller.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

from . import metrics
from .config import refuse
from .data import from_model_range, to_model_range
from .extractors import FD_KEYS, INCEPTION
from .flow import Net, SamplerConfig, add_noise, sample
from .jit import MODELS

SUBSETS = ("most", "least")


@dataclass(frozen=True)
class DiagnosticConfig:
    n_per_class: int = 16  # images per class in each subset
    t: float = 0.5  # noise level the subsets are denoised from (1 = clean)
    steps: int = 25  # ODE steps from t to 1
    method: str = "heun"
    cfg_scale: float = 1.0
    noise_scale: float = 1.0
    n_boot: int = 200
    ci: float = 0.95
    seed: int = 0  # the noise and the bootstrap draws: the same for every model, so they compare paired
    encoder: str = "effnet-lite0"  # FD in this space (and the centroids when no features are given)
    batch_size: int = 64
    device: str = "cpu"
    data_dir: str = "data"  # where metrics finds (or converts) the Inception weights

    def __post_init__(self):
        for f in ("n_per_class", "steps", "n_boot", "batch_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                refuse(self, f, "must be a positive integer")
        if not 0 <= self.t < 1:
            refuse(self, "t", "must be in [0, 1): 0 is pure noise, 1 (clean) would leave nothing to denoise")
        if self.method not in ("heun", "euler"):
            refuse(self, "method", "must be 'heun' or 'euler'")
        if not self.cfg_scale >= 0:
            refuse(self, "cfg_scale", "must be >= 0")
        if not self.noise_scale > 0:
            refuse(self, "noise_scale", "must be > 0")
        if not 0 < self.ci < 1:
            refuse(self, "ci", "must be in (0, 1), e.g. 0.95")
        if self.encoder not in FD_KEYS:
            refuse(self, "encoder", f"must be one of {', '.join(map(repr, FD_KEYS))}")

    @property
    def sampler(self) -> SamplerConfig:
        return SamplerConfig(steps=self.steps, method=self.method, cfg_scale=self.cfg_scale,
                             noise_scale=self.noise_scale)


# ----------------------------------------------------------------------------- encoder-space subsets

def pooled(features: torch.Tensor) -> torch.Tensor:
    """(N, D) features as float32; (N, T, D) token features are averaged over tokens first."""
    if features.ndim not in (2, 3):
        raise ValueError(f"features must be (N, D) or (N, tokens, D), got {tuple(features.shape)}")
    return features.float().mean(1) if features.ndim == 3 else features.float()


def class_centroids(features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """(C, D): the mean of each class's L2-normalised pooled features; NaN rows for empty classes."""
    f = F.normalize(pooled(features), dim=1)
    C = int(labels.max()) + 1 if num_classes is None else num_classes
    sums = torch.zeros(C, f.shape[1], device=f.device).index_add_(0, labels.to(f.device), f)
    return sums / torch.bincount(labels.to(f.device), minlength=C)[:, None]


def similarity_subsets(features: torch.Tensor, labels: torch.Tensor, n_per_class: int,
                       num_classes: int | None = None) -> dict:
    """Per class the `n_per_class` images most and least cosine-similar to their class centroid.

    Returns `most` and `least` (dataset indices, class by class; most similar first in `most`, least
    similar first in `least`), `sims` (N,) and `per_class` (C,), how many each subset took per class.
    A class with fewer than 2 * n_per_class images gives k = its count // 2 to each subset, so the two
    never overlap and stay the same size (with an odd count the median image is left out; a class of
    one image gives none). Of tied images the lower index counts as the more similar.
    """
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {labels.shape[0]} labels")
    labels = labels.long().to(features.device)
    centroids = class_centroids(features, labels, num_classes)
    sims = F.cosine_similarity(pooled(features), centroids[labels], dim=1)
    most, least, per_class = [], [], torch.zeros(len(centroids), dtype=torch.long)
    for c in range(len(centroids)):
        idx = (labels == c).nonzero().flatten()
        k = min(n_per_class, len(idx) // 2)
        order = idx[torch.sort(sims[idx], descending=True, stable=True).indices]
        most.append(order[:k])
        least.append(order.flip(0)[:k])
        per_class[c] = k
    return {"most": torch.cat(most), "least": torch.cat(least), "sims": sims, "per_class": per_class}


# ----------------------------------------------------------------------------- partial denoising

@torch.no_grad()
def denoise_from(net: Net, x: torch.Tensor, y: torch.Tensor, t: float, cfg: SamplerConfig = SamplerConfig(),
                 seed: int = 0, null_class: int | None = None, batch_size: int = 64) -> torch.Tensor:
    """Clean images x (model range) noised to time t with e = noise_scale * N(0, I), then integrated
    back to t = 1 by `flow.sample` on the grid linspace(t, 1, steps + 1). The noise comes from `seed`
    alone (drawn on the CPU for all of x at once): the same for every model, batch size and device."""
    if not 0 <= t < 1:
        raise ValueError(f"t={t!r}: must be in [0, 1)")
    null_class = getattr(net, "null_class", None) if null_class is None else null_class
    if null_class is None:
        raise ValueError("pass null_class: the network has no `null_class` attribute")
    e = cfg.noise_scale * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    e = e.to(x.device, x.dtype)
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        z = add_noise(xb, torch.full((len(xb),), t, device=x.device), e[i:i + batch_size])
        out.append(sample(net, y[i:i + batch_size], z.shape[1:], null_class, cfg, z=z, t_start=t))
    return torch.cat(out)


# ----------------------------------------------------------------------------- Frechet distance, bootstrapped

def _joint_basis(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a and b (float64) in an orthonormal basis of a space holding every row of both (an isometry)."""
    a, b = a.double(), b.double()
    if len(a) + len(b) >= a.shape[1]:
        return a, b
    q = torch.linalg.qr(torch.cat([a, b]).T).Q  # Householder: orthonormal even for repeated rows
    return a @ q, b @ q


def _fd(a: torch.Tensor, b: torch.Tensor) -> float:
    return fid_statistics_to_metric(fid_features_to_statistics(a.cpu()), fid_features_to_statistics(b.cpu()),
                                    verbose=False)[KEY_METRIC_FID]


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """torch-fidelity's Frechet distance between feature sets (N1, D) and (N2, D)."""
    with threadpool_limits(limits=1, user_api="blas"):  # see metrics.compute_metrics
        return _fd(a, b)


def bootstrap_frechet(fake: torch.Tensor, real: torch.Tensor, n_boot: int = 200, seed: int = 0, ci: float = 0.95,
                      paired: bool = True) -> tuple[float, float, float]:
    """(value, lo, hi): the Frechet distance of two feature sets and a bootstrap interval.

    `paired` (reconstructions against their own originals): row i of both sets is resampled
    together. Independent resampling breaks the pairing and, with fewer images than dimensions,
    roughly doubles the distance (the two covariances then span unrelated subspaces).
    FD's small-sample bias is as large as its spread, so resampled FDs sit above the full-sample value
    (N = 128, D = 2048: percentiles 771..779 around 766); the interval is therefore the percentile
    interval of the draws shifted by the bootstrap estimate of that bias, mean(draws) - value
    (Efron & Tibshirani's bias correction). It is clipped at 0 and always contains value.
    Cost: one eigenproblem of size min(D, len(fake) + len(real)) per draw.
    """
    if paired and len(fake) != len(real):
        raise ValueError(f"paired bootstrap needs sets of equal size, got {len(fake)} and {len(real)}")
    a, b = _joint_basis(fake, real)
    g = torch.Generator().manual_seed(seed)
    draws = []
    with threadpool_limits(limits=1, user_api="blas"):  # see metrics.compute_metrics
        value = _fd(a, b)
        for _ in range(n_boot):
            i = torch.randint(len(a), (len(a),), generator=g)
            j = i if paired else torch.randint(len(b), (len(b),), generator=g)
            draws.append(_fd(a[i], b[j]))
    draws = np.asarray(draws)
    lo, hi = np.quantile(draws - (draws.mean() - value), [(1 - ci) / 2, (1 + ci) / 2])
    return value, min(max(float(lo), 0.0), value), max(float(hi), value)  # min/max: rounding, or wildly skewed draws


# ----------------------------------------------------------------------------- the diagnostic

def feature_hacking(models: dict[str, Net], images: torch.Tensor, labels: torch.Tensor,
                    features: torch.Tensor | None, cfg: DiagnosticConfig) -> list[dict]:
    """One record per (model, subset): `fid`, `fd_<encoder>` (e.g. `fd_effnet`), each with `_lo`/`_hi`,
    of the subset's reconstructions against the subset's own clean images, plus `n`, `t` and the
    subset's `mean_similarity`.

    images: uint8 (N, 3, R, R) with labels (N,); features: the encoder features that define the
    centroids ((N, D) or (N, T, D); e.g. `encoders.cached_features(..., flips=False)`), or None for
    the FD extractor's own pooled features of `images`. Models are called as net(z, t, y) and must
    have `null_class` (every JiT has).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, R, R), got {images.dtype} {tuple(images.shape)}")
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    extractors = {"fid": INCEPTION, FD_KEYS[cfg.encoder]: cfg.encoder}
    kw = dict(data_dir=cfg.data_dir, batch_size=cfg.batch_size, device=cfg.device)
    if features is None:
        features = metrics.features(images, cfg.encoder, **kw)
    subsets = similarity_subsets(features, labels, cfg.n_per_class)
    records = []
    for subset in SUBSETS:
        idx = subsets[subset].cpu()
        if len(idx) < 2:
            raise ValueError(f"the {subset!r} subset has {len(idx)} image(s): FD needs at least 2; "
                             f"use classes with at least 2 images each")
        real = images[idx]
        x, y = to_model_range(real).to(cfg.device), labels[idx].long().to(cfg.device)
        real_features = {key: metrics.features(real, ext, **kw) for key, ext in extractors.items()}
        for name, net in models.items():
            x_rec = denoise_from(net, x, y, cfg.t, cfg.sampler, cfg.seed, batch_size=cfg.batch_size)
            fake = from_model_range(x_rec.cpu())
            rec = {"model": name, "subset": subset, "n": len(idx), "t": cfg.t,
                   "mean_similarity": float(subsets["sims"].cpu()[idx].mean())}
            for key, ext in extractors.items():
                v, lo, hi = bootstrap_frechet(metrics.features(fake, ext, **kw), real_features[key],
                                              cfg.n_boot, cfg.seed, cfg.ci)
                rec |= {key: v, f"{key}_lo": lo, f"{key}_hi": hi}
            records.append(rec)
    return records


# ----------------------------------------------------------------------------- resolution sweep

def tokens(model: str, resolution: int) -> int:
    """Image tokens of registry entry `model` at `resolution` px."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; valid names: {', '.join(MODELS)}")
    p = MODELS[model]["patch_size"]
    if resolution % p:
        raise ValueError(f"{model} (patch {p}) does not tile {resolution} px")
    return (resolution // p) ** 2


def same_token_models(base: str = "JiT-Ti", resolutions: tuple[int, ...] = (32, 64), grid: int = 8) -> dict[int, str]:
    """{resolution: registry name} of the `base` size with a grid x grid token grid at every resolution
    (JiT-Ti: 32 px -> JiT-Ti/4, 64 -> JiT-Ti/8, 128 -> JiT-Ti/16), so only the pixels per token change."""
    by_patch = {MODELS[m]["patch_size"]: m for m in MODELS if m.split("/")[0] == base}
    if not by_patch:
        sizes = ", ".join(sorted({m.split("/")[0] for m in MODELS}))
        raise ValueError(f"no registry entry for {base!r}; sizes: {sizes}")
    out = {}
    for r in resolutions:
        if r % grid or r // grid not in by_patch:
            have = ", ".join(f"{m} ({p * grid} px)" for p, m in sorted(by_patch.items()))
            raise ValueError(f"no {base} entry gives {grid} x {grid} tokens at {r} px (patch {r / grid:g} needed); "
                             f"at grid {grid} the registry has {have}")
        out[r] = by_patch[r // grid]
    return out


__all__ = ["DiagnosticConfig", "SUBSETS", "pooled", "class_centroids", "similarity_subsets", "denoise_from",
           "frechet_distance", "bootstrap_frechet", "feature_hacking", "tokens",
           "same_token_models"]


# ----------------------------------------------------------------------------- the mechanism probe

def patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """Images (B, 3, H, W) as the JiT's tokens see them: (B, (H/p)(W/p), p*p*3), `JiT.unpatchify`'s inverse."""
    B, C, H, W = x.shape
    return x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def ridge_r2(h_fit: torch.Tensor, y_fit: torch.Tensor, h_test: torch.Tensor, y_test: torch.Tensor,
             ridge: float = 1e-3) -> float:
    """R^2 on (h_test, y_test) of a ridge regression y ~ h + 1 fitted on (h_fit, y_fit) (rows are
    tokens); the penalty is ``ridge`` times the mean eigenvalue of the fitted features' covariance."""
    h_fit, y_fit, h_test, y_test = (v.double() for v in (h_fit, y_fit, h_test, y_test))
    mu_h, mu_y = h_fit.mean(0), y_fit.mean(0)
    hc = h_fit - mu_h
    gram = hc.T @ hc
    lam = ridge * torch.trace(gram) / gram.shape[0]
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), hc.T @ (y_fit - mu_y))
    pred = (h_test - mu_h) @ w + mu_y
    return float(1 - ((y_test - pred) ** 2).sum() / ((y_test - y_test.mean(0)) ** 2).sum())


@torch.no_grad()
def pixel_probe(net: Net, depth: int, fit: tuple, test: tuple, target: torch.Tensor, ts=(0.25, 0.5, 0.75),
                noise_scale: float = 1.0, seed: int = 0, ridge: float = 1e-3) -> list[dict]:
    """How much of the clean image block ``depth``'s hidden state still carries: a linear (ridge) probe
    from its image tokens to the clean patch pixels, fitted on ``fit`` = (uint8 images, labels) and
    scored (R^2) on held-out ``test`` images, at each noise level t (1 = clean); beside it the linear
    CKA of the pooled hidden state with the encoder's pooled ``target`` features of the fit images.
    One record per t. The noise comes from ``seed``: the same for every model."""
    from .align import linear_cka
    p = net.cfg.patch_size
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in ts:
        hidden, pix = [], []
        for images, labels in (fit, test):
            x = to_model_range(images)
            e = noise_scale * torch.randn(x.shape, generator=g)
            tt = torch.full((len(x),), float(t))
            _, (h,) = net(add_noise(x, tt, e), tt, labels.long(), hidden_at=(depth,))
            hidden.append(h.float())
            pix.append(patches(x, p))
        r2 = ridge_r2(hidden[0].flatten(0, 1), pix[0].flatten(0, 1), hidden[1].flatten(0, 1), pix[1].flatten(0, 1), ridge)
        cka = linear_cka(hidden[0].mean(1), target.float().mean(1) if target.ndim == 3 else target.float())
        out.append({"t": float(t), "block": depth, "pixel_r2": r2, "cka": cka,
                    "n_fit": len(fit[0]), "n_test": len(test[0])})
    return out
