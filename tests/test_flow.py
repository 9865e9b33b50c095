import pytest
import torch

from pixelrepa.flow import (
    FlowConfig,
    SamplerConfig,
    add_noise,
    guidance_weight,
    guided_velocity,
    sample,
    sample_t,
    v_loss,
    velocity,
)


def test_loss_is_zero_for_a_perfect_prediction():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.rand(4, generator=g)
    z = add_noise(x, t, torch.randn(4, 3, 8, 8, generator=g))
    assert torch.equal(v_loss(x, x, z, t, 0.05), torch.zeros(4))


def test_loss_matches_a_hand_computation():
    # one pixel, two samples: t = 0.5 (1 - t = 0.5 > t_eps) and t = 0.99 (clamped to t_eps = 0.05)
    x = torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)
    e = torch.tensor([0.0, 2.0]).view(2, 1, 1, 1)
    t = torch.tensor([0.5, 0.99])
    z = add_noise(x, t, e)  # 0.5 ; -0.99 + 0.02 = -0.97
    assert torch.allclose(z.flatten(), torch.tensor([0.5, -0.97]))
    x_pred = torch.tensor([0.0, -0.5]).view(2, 1, 1, 1)
    # v - v_pred = (x - x_pred) / max(1 - t, t_eps) = 1 / 0.5 = 2 ; -0.5 / 0.05 = -10
    assert torch.allclose(v_loss(x_pred, x, z, t, 0.05), torch.tensor([4.0, 100.0]))


def test_logit_normal_t_statistics():
    t = sample_t(200_000, FlowConfig(P_mean=-0.8, P_std=0.8), torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() + 0.8) < 0.01 and abs(logit.std().item() - 0.8) < 0.01


class Oracle:
    """Predicts the target x* for any input; counts its calls and records (t, labels) of each."""

    def __init__(self, target, null_class=None, uncond_target=None):
        self.target, self.null, self.uncond, self.calls = target, null_class, uncond_target, []

    def __call__(self, z, t, y):
        self.calls.append((t.clone(), y.clone()))
        out = self.target.expand(z.shape[0], *self.target.shape[1:]).clone()
        if self.uncond is not None:
            out[y == self.null] = self.uncond[0]
        return out


@pytest.mark.parametrize("method", ["heun", "euler"])
def test_oracle_denoiser_drives_the_sampler_to_its_target(method):
    x_star = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(2, dtype=torch.long)
    # with 1 - t >= t_eps on every step the straight path is followed exactly
    x = sample(Oracle(x_star), y, (3, 4, 4), 10, SamplerConfig(steps=10, method=method, noise_scale=2.0),
               generator=torch.Generator().manual_seed(1))
    assert torch.allclose(x, x_star.expand(2, -1, -1, -1), atol=1e-5)
    # at 50 steps the t_eps clamp slows the steps with 1 - t < 0.05, leaving a known fraction of the
    # gap: Euler keeps 0.04 * 0.6 * 0.6 of it; Heun 0.06 * 0.7 * 0.68 * 0.6 (the step from t = 0.94
    # already evaluates at 0.96, and the last step is Euler)
    z0 = 2.0 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    x50 = sample(Oracle(x_star), y, (3, 4, 4), 10, SamplerConfig(steps=50, method=method, noise_scale=2.0), z=z0)
    gap = (x50 - x_star).abs().max() / (z0 - x_star).abs().max()
    expected = 0.04 * 0.6 * 0.6 if method == "euler" else 0.06 * 0.7 * 0.68 * 0.6
    assert abs(gap.item() - expected) < 1e-4


def test_step_count_and_heun_calls():
    x_star = torch.zeros(1, 3, 4, 4)
    for steps, method, calls in [(7, "heun", 13), (7, "euler", 7), (1, "heun", 1)]:
        net = Oracle(x_star)
        sample(net, torch.zeros(2, dtype=torch.long), (3, 4, 4), 5, SamplerConfig(steps=steps, method=method))
        assert len(net.calls) == calls
        ts = sorted({round(c[0][0].item(), 6) for c in net.calls})
        assert ts == [round(i / steps, 6) for i in range(steps)]  # never evaluated at t = 1


def test_guidance_interval_and_batched_passes():
    null = 5
    cond, uncond = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    y = torch.tensor([1, 2])
    z = torch.zeros(2, 3, 2, 2)
    cfg = SamplerConfig(cfg_scale=3.0, cfg_interval=(0.1, 0.6))
    net = Oracle(cond, null, uncond)
    # inside the interval: one forward of 4 (cond + uncond), v = v_u + 3 (v_c - v_u)
    v = guided_velocity(net, z, 0.5, y, null, cfg)
    assert len(net.calls) == 1 and net.calls[0][1].tolist() == [1, 2, null, null]
    assert torch.allclose(v, 3 * velocity(cond, z, torch.full((2,), 0.5), 0.05))
    # outside it (and at its open ends): the conditional velocity only, one forward of 2
    for t in (0.05, 0.1, 0.6, 0.9):
        net.calls.clear()
        v = guided_velocity(net, z, t, y, null, cfg)
        assert len(net.calls) == 1 and net.calls[0][1].tolist() == [1, 2]
        assert torch.allclose(v, velocity(cond, z, torch.full((2,), t), 0.05))


def test_interval_from_zero_guides_t_zero_as_the_reference():
    cfg = SamplerConfig(cfg_scale=3.0, cfg_interval=(0.0, 0.5))
    assert [guidance_weight(t, cfg) for t in (0.0, 0.25, 0.5, 0.75)] == [3.0, 3.0, 1.0, 1.0]
    cfg = SamplerConfig(cfg_scale=3.0, cfg_interval=(0.1, 1.0))
    assert [guidance_weight(t, cfg) for t in (0.0, 0.1, 0.5, 0.98)] == [1.0, 1.0, 3.0, 3.0]


@pytest.mark.parametrize("steps", [7, 50])
def test_guidance_is_one_forward_per_evaluation_of_2b_inside_the_interval_and_b_outside(steps):
    null, calls = 4, []

    def net(z, t, y):
        calls.append((t[0].item(), y.tolist()))
        return z
    y = torch.tensor([0, 1, 2])
    cfg = SamplerConfig(steps=steps, cfg_scale=2.5)
    sample(net, y, (3, 4, 4), null, cfg, z=torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0)))
    ts = torch.linspace(0, 1, steps + 1).tolist()
    times = [t for i in range(steps) for t in ([ts[i], ts[i + 1]] if i < steps - 1 else [ts[i]])]  # Euler, Heun
    assert [t for t, _ in calls] == pytest.approx(times)
    guided = [guidance_weight(t, cfg) != 1.0 for t in times]
    assert 0 < sum(guided) < len(guided)  # both kinds of evaluation happen
    assert [lab for _, lab in calls] == [[0, 1, 2, null, null, null] if g else [0, 1, 2] for g in guided]


def test_max_batch_splits_network_calls_without_changing_the_samples():
    sizes = []

    def net(z, t, y):
        sizes.append(z.shape[0])
        return torch.sin(z * (1 + y.float().view(-1, 1, 1, 1))) + t.view(-1, 1, 1, 1)
    y = torch.arange(5)
    z0 = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    whole = sample(net, y, (3, 2, 2), 9, SamplerConfig(steps=4, cfg_scale=2.0), z=z0)
    assert max(sizes) == 10
    sizes.clear()
    split = sample(net, y, (3, 2, 2), 9, SamplerConfig(steps=4, cfg_scale=2.0, max_batch=4), z=z0)
    assert max(sizes) == 4 and torch.equal(whole, split)
    with pytest.raises(ValueError, match="max_batch"):
        SamplerConfig(max_batch=-1)


def test_bad_sampler_and_flow_configs_name_the_field():
    with pytest.raises(ValueError, match="steps"):
        SamplerConfig(steps=0)
    with pytest.raises(ValueError, match="cfg_interval"):
        SamplerConfig(cfg_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="t_eps"):
        FlowConfig(t_eps=1.5)


def test_generate_is_class_balanced_uint8_and_its_noise_a_function_of_seed_and_batch_start():
    from pixelrepa.flow import generate

    class Net:  # predicts a class-dependent constant image
        def __call__(self, z, t, y):
            return (y.float() / 10 - 0.5).view(-1, 1, 1, 1).expand_as(z)

    cfg = SamplerConfig(steps=4)
    imgs, labels = generate(Net(), 25, 10, (3, 4, 4), cfg, batch_size=8, seed=1, progress=False)
    assert imgs.dtype == torch.uint8 and imgs.shape == (25, 3, 4, 4)
    counts = torch.bincount(labels, minlength=10)
    assert counts.max() - counts.min() <= 1
    # an oracle-like net: each image is its class's constant, mapped to uint8
    assert torch.equal(imgs[:, 0, 0, 0], ((labels.float() / 10 - 0.5 + 1) * 127.5).round().to(torch.uint8))

    def identity(z, t, y):  # x_pred = z: velocity 0, so every sample is its initial noise
        return z
    cfg = SamplerConfig(steps=2, noise_scale=0.4)
    noise, _ = generate(identity, 25, 10, (3, 4, 4), cfg, batch_size=8, seed=1, progress=False)
    assert len({tuple(x.flatten().tolist()) for x in noise}) == 25  # every image its own noise
    torch.manual_seed(123)  # the global generator plays no part
    torch.rand(1000)
    again, _ = generate(identity, 25, 10, (3, 4, 4), cfg, batch_size=8, seed=1, progress=False)
    assert torch.equal(again, noise)
    fewer, _ = generate(identity, 16, 10, (3, 4, 4), cfg, batch_size=8, seed=1, progress=False)
    assert torch.equal(fewer, noise[:16])  # a batch's noise depends on the seed and its first index only
    other, _ = generate(identity, 25, 10, (3, 4, 4), cfg, batch_size=8, seed=2, progress=False)
    assert (other != noise).float().mean() > 0.9
