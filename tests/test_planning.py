"""Planning figures: the measured FLOPs equal a count by hand, the fake-tensor activations equal those
of real tensors, the sampler's forwards per sample are the bench's, and a profile's figures follow
their stated formulas."""
import pytest
import torch

from pixelrepa import planning
from pixelrepa.align import Trainable, build_head
from pixelrepa.flow import SamplerConfig
from pixelrepa.jit import JiT, jit_config
from pixelrepa.train import TrainConfig


def hand_count_forward(w=192, h=512, L=32, N=64, b=64, p=4, depth=6, start=2) -> int:
    """FLOPs (2 per multiply-add) of one JiT-Ti/4 forward at 32 px, written out: embedders, patches,
    blocks (attention 2 Nq Nk w), the last block's queries for the image tokens only, the final layer."""
    macs = 256 * w + w * w + N * (3 * p * p * b + b * w) + depth * w * 6 * w + w * 2 * w + N * w * p * p * 3

    def block(nq, nk):  # qkv for every token, the rest for the queries
        return nk * 3 * w * w + 2 * nq * nk * w + nq * (w * w + w * 2 * h + h * w)
    macs += start * block(N, N) + (depth - start - 1) * block(N + L, N + L) + block(N, N + L)
    return 2 * macs


def test_measured_flops_are_the_count_by_hand_and_training_is_about_three_forwards():
    f = planning.measure(TrainConfig(model="JiT-Ti/4", resolution=32), 22, bf16=False)
    assert f["forward_flop_per_image"] == hand_count_forward()  # attention included (CPU kernel mapped)
    assert 2.9 < f["train_flop_per_image"] / f["forward_flop_per_image"] < 3.1
    assert f["params_jit"] == sum(p.numel() for p in JiT(jit_config("JiT-Ti/4", 32, 22)).parameters())


@pytest.mark.parametrize("method,bf16", [("jit", False), ("pixelrepa", True)])
def test_fake_tensor_activations_are_those_of_real_tensors(method, bf16):
    cfg = TrainConfig(model="JiT-Ti/4", resolution=16, method=method)
    a, b = planning.measure(cfg, 3, bf16=bf16)["activation_bytes"]
    torch.manual_seed(0)
    jcfg = jit_config("JiT-Ti/4", 16, 3)
    jit = JiT(jcfg)
    head = build_head(cfg.align, jcfg, 1280) if method != "jit" else None
    net = Trainable(jit, head, cfg.align.depth(jcfg) if head is not None else 0)
    for B in (1, 3):  # measured at 1 and 2, checked at 3: the fit is linear in the batch
        real = planning._saved_bytes(lambda: planning.training_loss(net, cfg, B, bf16))
        assert real == pytest.approx(a + b * B, rel=1e-5)  # bf16 on real tensors: a few bytes apart
    assert b > 0
    if bf16:
        assert a > 0  # the autocast copies of the weights are saved once per step, not per image


def test_forwards_per_sample_match_the_sampler():
    assert planning.forwards_per_sample(SamplerConfig(steps=50, cfg_scale=2.0)) == 187  # the bench's count
    assert planning.forwards_per_sample(SamplerConfig(steps=50)) == 99  # no guidance: Heun 2 x 50 - 1


def test_a_profiles_figures_follow_their_formulas():
    rows = planning.profile_figures("smoke", mfu=0.5)
    from pixelrepa.study import load_profile, plan
    P = load_profile("smoke")
    assert sum(r.runs for r in rows) == len(plan(P))
    for r in rows:
        assert r.images_per_run == P.steps * P.batch_size and r.per_gpu_batch == P.batch_size
        flops = r.runs * (r.train_pflop_per_run + r.eval_pflop_per_run) * 1e15
        assert r.gpu_hours["A100"] == pytest.approx(flops / (312e12 * 0.5) / 3600, rel=0.02, abs=2e-3)
        m = r.memory_gib_per_gpu
        assert m["total"] == pytest.approx(sum(v for k, v in m.items() if k != "total"), abs=0.02)
        assert m["weights_grads_adamw"] == pytest.approx(16 * (r.params_jit + r.params_head) / 2 ** 30, abs=0.01)
        assert r.targets_cached == (r.method != "jit")  # openclipart: the encoder runs once per image, cached
    table = planning.markdown(rows, 0.5)
    assert table.count("\n") == len(rows) + 1 and "50% MFU" in table
