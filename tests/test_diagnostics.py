"""Feature-hacking diagnostic and resolution-sweep helpers.

The subset geometry, the partial-denoising ODE and the bootstrap are checked against answers known
in closed form; the Inception / EfficientNet end-to-end run is marked slow (tens of images).
"""
import math

import pytest
import torch

from pixelrepa import diagnostics as dg
from pixelrepa import metrics
from pixelrepa.flow import SamplerConfig, sample


# ----------------------------------------------------------------------------- subsets

def known_geometry():
    """Class c: f_i = scale_i * (e_c + s_i w_i) with w_i orthonormal and orthogonal to both e_c.

    The cosine of image i to its centroid is then A / sqrt(1 + s^2) + s^2 / ((1 + s^2) n), strictly
    decreasing in s whenever A = mean_i 1 / sqrt(1 + s_i^2) > 2 / n: the order is that of s.
    Classes 0 (8 images), 1 (5) and 2 (1) interleaved; tokens average to f_i.
    """
    labels = torch.tensor([0, 1, 0, 0, 2, 1, 0, 1, 0, 0, 1, 0, 1, 0])
    s = torch.tensor([0.7, 0.4, 2.5, 0.1, 0.3, 1.9, 1.2, 0.2, 3.0, 0.5, 0.9, 1.6, 1.3, 0.3])
    N, D = len(labels), 3 + len(labels)
    f = torch.zeros(N, D)
    f[torch.arange(N), labels] = 1.0
    f[torch.arange(N), 3 + torch.arange(N)] = s
    f = f * torch.linspace(0.5, 4.0, N)[:, None]  # norms must not matter
    r = torch.randn(N, D, generator=torch.Generator().manual_seed(0))
    return torch.stack([f + r, f - r], dim=1), labels, s


def test_centroids_are_means_of_unit_features():
    tokens, labels, s = known_geometry()
    c = dg.class_centroids(tokens, labels, num_classes=4)
    assert c.shape == (4, tokens.shape[-1])
    i0 = (labels == 0).nonzero().flatten()
    unit = 1 / torch.sqrt(1 + s[i0] ** 2)
    assert torch.allclose(c[0, 0], unit.mean(), atol=1e-6)
    assert torch.allclose(c[0, 3 + i0], s[i0] * unit / len(i0), atol=1e-6)
    assert torch.isnan(c[3]).all()  # a class with no images


def test_most_and_least_similar_subsets_are_the_known_ones():
    tokens, labels, s = known_geometry()
    out = dg.similarity_subsets(tokens, labels, n_per_class=3)
    # class 0: s = 0.7 2.5 0.1 1.2 3.0 0.5 1.6 0.3 at indices 0 2 3 6 8 9 11 13;
    # class 1 (5 images, k = 2): s = 0.4 1.9 0.2 0.9 1.3 at 1 5 7 10 12; class 2 (one image): k = 0
    assert out["most"].tolist() == [3, 13, 9] + [7, 1]
    assert out["least"].tolist() == [8, 2, 11] + [5, 12]
    assert out["per_class"].tolist() == [3, 2, 0]
    assert not set(out["most"].tolist()) & set(out["least"].tolist())
    assert (out["sims"][out["most"][:3]].min() > out["sims"][out["least"][:3]].max()).item()
    # pooled (N, D) input gives the same subsets as (N, T, D)
    again = dg.similarity_subsets(tokens.mean(1), labels, n_per_class=3)
    assert torch.equal(again["most"], out["most"]) and torch.equal(again["least"], out["least"])


def test_a_class_with_fewer_than_2n_images_splits_without_overlap():
    tokens, labels, _ = known_geometry()
    out = dg.similarity_subsets(tokens, labels, n_per_class=10)
    assert out["per_class"].tolist() == [4, 2, 0]  # 8 -> 4 + 4, 5 -> 2 + 2 (median left out), 1 -> 0
    assert len(out["most"]) == len(out["least"]) == 6
    assert not set(out["most"].tolist()) & set(out["least"].tolist())


# ----------------------------------------------------------------------------- partial denoising

class Oracle:
    """Predicts fixed clean images x* whatever the input; records the t of every call."""
    null_class = 9

    def __init__(self, target):
        self.target, self.ts = target, []

    def __call__(self, z, t, y):
        self.ts.append(t[0].item())
        return self.target.clone()


def test_oracle_denoising_returns_the_clean_images_with_the_heun_call_count():
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(3, dtype=torch.long)
    net = Oracle(x)
    # (1 - t) / steps = t_eps: every evaluation has 1 - t >= t_eps, so the straight path is exact
    out = dg.denoise_from(net, x, y, 0.5, SamplerConfig(steps=10, noise_scale=2.0), seed=3)
    assert torch.allclose(out, x, atol=1e-5)
    assert len(net.ts) == 2 * 10 - 1  # Heun on 9 steps, Euler on the last
    assert sorted({round(t, 6) for t in net.ts}) == [round(0.5 + 0.05 * i, 6) for i in range(10)]


def test_close_to_one_the_image_barely_changes_and_the_clamp_is_applied():
    class Zero:  # the worst guess: x_pred = 0
        def __call__(self, z, t, y):
            return torch.zeros_like(z)

    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.zeros(2, dtype=torch.long)
    t, cfg = 0.999, SamplerConfig(steps=1, noise_scale=1.5)
    out = dg.denoise_from(Zero(), x, y, t, cfg, seed=7, null_class=5)
    e = 1.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    z = t * x + (1 - t) * e
    # one Euler step: z + (1 - t) (0 - z) / max(1 - t, t_eps) = z (1 - 0.001 / 0.05)
    assert torch.allclose(out, z * (1 - 0.001 / 0.05), atol=1e-6)
    assert (out - x).abs().max() < 0.03


class Smooth:
    """A deterministic nonlinear denoiser that depends on z, t and y (to exercise guidance)."""
    null_class = 4

    def __call__(self, z, t, y):
        return torch.tanh(z * (1 + t.view(-1, 1, 1, 1))) + 0.1 * y.float().view(-1, 1, 1, 1)


def test_from_t0_it_is_flow_sample_with_the_same_noise_and_guidance():
    x = torch.zeros(4, 3, 4, 4)
    y = torch.tensor([0, 1, 2, 3])
    cfg = SamplerConfig(steps=5, cfg_scale=2.5, noise_scale=2.0)
    ours = dg.denoise_from(Smooth(), x, y, 0.0, cfg, seed=11)
    z0 = 2.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(11))
    theirs = sample(Smooth(), y, (3, 4, 4), Smooth.null_class, cfg, z=z0)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_the_noise_depends_on_the_seed_only_not_the_batch_size():
    x = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(5) % 4
    cfg = SamplerConfig(steps=3, cfg_scale=2.0)
    a = dg.denoise_from(Smooth(), x, y, 0.3, cfg, seed=1, batch_size=5)
    b = dg.denoise_from(Smooth(), x, y, 0.3, cfg, seed=1, batch_size=2)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, dg.denoise_from(Smooth(), x, y, 0.3, cfg, seed=2))
    with pytest.raises(ValueError, match="t="):
        dg.denoise_from(Smooth(), x, y, 1.0, cfg)


# ----------------------------------------------------------------------------- bootstrap

def gaussian_pair(n, d, seed, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(n, d, generator=g)
    return 0.8 * real + 0.5 * torch.randn(n, d, generator=g) + shift, real


def test_the_joint_basis_keeps_torch_fidelitys_distance():
    fake, real = gaussian_pair(12, 300, 0)  # fewer images than dimensions: the projection is used
    v, _, _ = dg.bootstrap_frechet(fake, real, n_boot=1)
    assert math.isclose(v, dg.frechet_distance(fake, real), rel_tol=1e-5)
    fake2, real2 = dg._joint_basis(fake, real)
    assert fake2.shape == (12, 24)


def test_bootstrap_interval_contains_reproduces_and_shrinks():
    fake, real = gaussian_pair(40, 4, 0)
    v, lo, hi = dg.bootstrap_frechet(fake, real, n_boot=200, seed=5)
    assert lo <= v <= hi and lo < hi
    assert dg.bootstrap_frechet(fake, real, n_boot=200, seed=5) == (v, lo, hi)
    assert dg.bootstrap_frechet(fake, real, n_boot=200, seed=6)[1:] != (lo, hi)
    fake_l, real_l = gaussian_pair(640, 4, 0)
    v_l, lo_l, hi_l = dg.bootstrap_frechet(fake_l, real_l, n_boot=200, seed=5)
    assert lo_l <= v_l <= hi_l
    assert (hi_l - lo_l) < 0.5 * (hi - lo)  # 16x the images: about a quarter of the width
    # the true distance: means differ by 0.5 per dim, covariances 0.89 I and I
    true = 4 * 0.25 + 4 * (0.89 + 1 - 2 * math.sqrt(0.89))
    assert lo_l <= true <= hi_l


def test_identical_sets_are_at_distance_zero():
    _, real = gaussian_pair(30, 8, 1)
    v, lo, hi = dg.bootstrap_frechet(real, real.clone(), n_boot=20)
    assert abs(v) < 1e-8 and abs(lo) < 1e-8 and abs(hi) < 1e-8
    with pytest.raises(ValueError, match="equal size"):
        dg.bootstrap_frechet(real, real[:10])


# ----------------------------------------------------------------------------- config, resolution helpers

@pytest.mark.parametrize("field,value", [("n_per_class", 0), ("t", 1.0), ("steps", 2.5), ("n_boot", 0),
                                         ("ci", 1.0), ("encoder", "clip"), ("method", "rk4")])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"DiagnosticConfig.{field}="):
        dg.DiagnosticConfig(**{field: value})


def test_config_builds_its_sampler():
    s = dg.DiagnosticConfig(steps=7, cfg_scale=2.0, noise_scale=2.0, method="euler").sampler
    assert (s.steps, s.cfg_scale, s.noise_scale, s.method) == (7, 2.0, 2.0, "euler")


def test_same_token_models():
    assert dg.same_token_models() == {32: "JiT-Ti/4", 64: "JiT-Ti/8"}
    m = dg.same_token_models("JiT-S", (32, 64, 128))
    assert m == {32: "JiT-S/4", 64: "JiT-S/8", 128: "JiT-S/16"}
    assert {dg.tokens(name, r) for r, name in m.items()} == {64}
    assert dg.same_token_models("JiT-Ti", (32, 64), grid=4) == {32: "JiT-Ti/8", 64: "JiT-Ti/16"}
    with pytest.raises(ValueError, match=r"at 48 px .*JiT-Ti/4 \(32 px\), JiT-Ti/8 \(64 px\), JiT-Ti/16 \(128 px\)"):
        dg.same_token_models("JiT-Ti", (32, 48))
    with pytest.raises(ValueError, match="JiT-B"):
        dg.same_token_models("JiT-XL")
    with pytest.raises(ValueError, match="does not tile"):
        dg.tokens("JiT-B/16", 40)


# ----------------------------------------------------------------------------- end to end

class Lookup:
    """A perfect denoiser for a known set: the clean image x_k minimising |z - t x_k| (unique when the
    images are far apart), so reconstructions equal the originals when 1 - t >= t_eps throughout."""
    null_class = 2

    def __init__(self, clean):
        self.clean = clean.flatten(1)

    def __call__(self, z, t, y):
        k = torch.cdist(z.flatten(1), t[0] * self.clean).argmin(1)
        return self.clean[k].view_as(z)


@pytest.mark.slow
def test_feature_hacking_end_to_end():
    from pixelrepa.data import to_model_range
    from pixelrepa.jit import build_jit
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1] * 3)
    images = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    images[labels == 0, 0] //= 4  # classes differ in colour
    models = {"oracle": Lookup(to_model_range(images)), "untrained": build_jit("JiT-Ti/4", 32, 2).eval()}
    # 3 images per class: one per subset per class, the median one left out
    cfg = dg.DiagnosticConfig(n_per_class=2, t=0.5, steps=10, n_boot=10, batch_size=16)
    recs = dg.feature_hacking(models, images, labels, None, cfg)
    assert [(r["model"], r["subset"]) for r in recs] == [("oracle", "most"), ("untrained", "most"),
                                                         ("oracle", "least"), ("untrained", "least")]
    for r in recs:
        assert r["n"] == 2
        for key in ("fid", "fd_effnet"):
            assert all(math.isfinite(r[k]) for k in (key, f"{key}_lo", f"{key}_hi"))
            assert r[f"{key}_lo"] <= r[key] <= r[f"{key}_hi"]
    oracle = {r["subset"]: r for r in recs if r["model"] == "oracle"}
    untrained = {r["subset"]: r for r in recs if r["model"] == "untrained"}
    for subset in dg.SUBSETS:  # exact reconstructions: the same uint8 images, so the same features
        assert abs(oracle[subset]["fid"]) < 1e-3 and abs(oracle[subset]["fd_effnet"]) < 1e-3
        assert untrained[subset]["fid"] > 10 and untrained[subset]["fd_effnet"] > 1
    assert oracle["most"]["mean_similarity"] > oracle["least"]["mean_similarity"]


@pytest.mark.slow
def test_fidelity_features_give_compute_metrics_fid():
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    f = metrics.features(images)
    ours = dg.frechet_distance(f[:2], f[2:])
    assert math.isclose(ours, metrics.compute_metrics(images[:2], images[2:], kid=False)["fid"], rel_tol=1e-6)
