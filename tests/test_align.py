import pytest
import torch

from pixelrepa.align import (AlignConfig, MaskedTransformerAdapter, REPAProjector, Trainable, build_head,
                             cosine_loss, linear_cka, token_mask)
from pixelrepa.flow import SamplerConfig, generate
from pixelrepa.jit import build_jit


def test_mask_fraction_matches_the_ratio():
    for ratio in (0.2, 0.5):
        m = token_mask(256, 64, ratio, torch.Generator().manual_seed(0))
        n = m.numel()
        # binomial: 5 standard deviations
        assert abs(m.float().mean().item() - ratio) < 5 * (ratio * (1 - ratio) / n) ** 0.5
        # independent per token: every position and every image is masked sometimes, not a fixed pattern
        assert m.any(0).all() and (m.float().mean(1).std() > 0)
    assert token_mask(4, 64, 0.0) is None


def test_cosine_loss_is_0_for_identical_and_2_for_opposite():
    a = torch.randn(3, 10, 16)
    assert cosine_loss(a, a)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(a, -a)[0].item() == pytest.approx(2.0, abs=1e-6)
    assert cosine_loss(a, 5 * a)[0].item() == pytest.approx(0.0, abs=1e-6)  # scale-free


def test_targets_of_another_token_count_are_a_clear_error():
    with pytest.raises(ValueError, match=r"one token per JiT patch \(64 here, the targets have 16\)"):
        cosine_loss(torch.randn(2, 64, 8), torch.randn(2, 16, 8))
    with pytest.raises(ValueError, match=r"\(2, 64, 8\).*\(2, 64, 4\)"):
        cosine_loss(torch.randn(2, 64, 4), torch.randn(2, 64, 8))


def test_method_defaults_come_from_configuration():
    assert AlignConfig("repa").loss_coef == 0.5 and AlignConfig("pixelrepa").loss_coef == 0.1
    assert AlignConfig("pixelrepa").ratio == 0.2 and AlignConfig("adapter").ratio == 0.0
    assert AlignConfig("pixelrepa", align_coef=0.3, mask_ratio=0.5).loss_coef == 0.3
    assert AlignConfig("pixelrepa", mask_ratio=0.5).ratio == 0.5
    with pytest.raises(ValueError, match="method"):
        AlignConfig("repa2")
    with pytest.raises(ValueError, match="mask_ratio"):
        AlignConfig("pixelrepa", mask_ratio=1.0)
    jit = build_jit("JiT-Ti/4", 32, 22).cfg
    assert AlignConfig("repa").depth(jit) == 2 and AlignConfig("repa", align_depth=5).depth(jit) == 5
    with pytest.raises(ValueError, match="align_depth"):
        AlignConfig("repa", align_depth=7).depth(jit)
    assert build_head(AlignConfig("jit"), jit, 1280) is None
    assert isinstance(build_head(AlignConfig("repa"), jit, 1280), REPAProjector)
    mta = build_head(AlignConfig("pixelrepa"), jit, 1280)
    assert isinstance(mta, MaskedTransformerAdapter) and len(mta.blocks) == 2
    assert all(b.attn.attn_drop == 0 for b in mta.blocks)


class FrozenEncoder(torch.nn.Module):
    def __init__(self, dim=32, grid=8):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, dim, 4, 4).requires_grad_(False)

    def forward(self, x):
        with torch.no_grad():
            return self.conv(x).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("method", ["repa", "pixelrepa", "adapter"])
def test_alignment_gradient_reaches_early_blocks_and_stops_at_the_encoder(method):
    torch.manual_seed(0)
    jit = build_jit("JiT-Ti/4", 32, 5)
    with torch.no_grad():  # adaLN-Zero gates start at 0 and would block the gradient: open them
        for b in jit.blocks:
            b.adaLN_modulation[-1].bias.normal_(0, 0.5)
    cfg = AlignConfig(method)
    head = build_head(cfg, jit.cfg, 32)
    model = Trainable(jit, head, cfg.depth(jit.cfg))
    enc = FrozenEncoder()
    x = torch.randn(4, 3, 32, 32)
    t, y = torch.rand(4), torch.randint(0, 5, (4,))
    mask = token_mask(4, 64, cfg.ratio, torch.Generator().manual_seed(0))
    _, pred = model(x, t, y, mask)
    loss, _ = cosine_loss(pred, enc(x))
    loss.backward()  # the alignment loss alone
    assert jit.patch1.weight.grad is not None and jit.patch1.weight.grad.abs().sum() > 0
    assert jit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # blocks after the aligned depth get nothing from it, and the frozen encoder nothing at all
    assert jit.blocks[-1].attn.qkv.weight.grad is None
    assert enc.conv.weight.grad is None


class StubEncoder(FrozenEncoder):
    name, dim, grid = "stub", 32, 4


def test_sampling_never_runs_a_head_and_emas_carry_no_head(tmp_path, monkeypatch):
    from conftest import make_image_folder
    from pixelrepa import encoders
    from pixelrepa.train import TrainConfig, train
    monkeypatch.setattr(encoders, "build_encoder", lambda name, grid, weights=None, device="cpu": StubEncoder())
    calls, forward = [], MaskedTransformerAdapter.forward

    def counted(self, h, t, y, mask=None):
        calls.append(h.shape[0])
        return forward(self, h, t, y, mask)
    monkeypatch.setattr(MaskedTransformerAdapter, "forward", counted)
    folder = make_image_folder(tmp_path / "folder")
    out = tmp_path / "run"
    cfg = TrainConfig(model="JiT-Ti/4", dataset=str(folder), resolution=16, data_dir=str(tmp_path / "cache"),
                      out_dir=str(out), steps=4, batch_size=8, blr=0.3, warmup_epochs=0, ckpt_every=4, num_samples=6,
                      sample_steps=3, ema_decays=(0.3, 0.4), progress=False, method="pixelrepa", proj_hidden=64)
    train(cfg)
    # the head ran once per training step, on its batch, and never while the run sampled its grid
    assert calls == [8] * 4
    state = torch.load(out / "ckpt-00000004.pt", weights_only=False)
    assert state["head"] and any(k.startswith("blocks.") for k in state["head"])
    jit_keys = set(build_jit("JiT-Ti/4", 16, 3).state_dict())
    for ema in state["emas"]:
        assert set(ema) == jit_keys  # no head parameters in the EMA copies
    assert set(state["model"]) == jit_keys
    # the run's samples are those of its first EMA's weights in a bare JiT, same sampler and seed
    bare = build_jit("JiT-Ti/4", 16, 3)
    bare.load_state_dict(state["emas"][0])
    scfg = SamplerConfig(steps=3, cfg_scale=cfg.cfg_scale, noise_scale=cfg.noise_scale, t_eps=cfg.t_eps)
    expected, labels = generate(bare, 6, 3, (3, 16, 16), scfg, seed=cfg.seed, progress=False)
    saved = torch.load(out / "samples.pt")
    assert torch.equal(saved["images"], expected) and torch.equal(saved["labels"], labels)
    assert saved["images"].float().std() > 1  # trained weights: not the grey of a zero output layer


def test_linear_cka():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 16, generator=g)
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(X, 3 * X @ Q) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(X, torch.randn(200, 16, generator=g)) < 0.2


def test_cached_targets_equal_the_encoder_on_the_flipped_batch(tmp_path):
    """The training loop flips images at random and reads cached features by (index, flip): they must
    be the features of exactly the image it trains on."""
    from pixelrepa.data import ImageDataset, to_model_range
    from pixelrepa.jit import jit_config
    from pixelrepa.train import TrainConfig, make_targets
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 16, 16), generator=g, dtype=torch.uint8)
    ds = ImageDataset(["a", "b"], torch.tensor([0, 1, 0, 1, 0, 1]), 16, images=images)
    jit_cfg = jit_config("JiT-Ti/4", 16, 2)
    base = dict(model="JiT-Ti/4", dataset="openclipart", resolution=16, data_dir=str(tmp_path), method="pixelrepa",
                progress=False)
    cached, dim = make_targets(TrainConfig(**base), ds, jit_cfg, torch.device("cpu"))
    online, _ = make_targets(TrainConfig(**base, cache_targets=False), ds, jit_cfg, torch.device("cpu"))
    assert dim == 1280 and list(tmp_path.glob("features-*openclipart-train*"))
    idx, flip = torch.tensor([4, 1, 2]), torch.tensor([True, False, True])
    x = to_model_range(images[idx])
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    a, b = cached(idx, x, flip), online(idx, x, flip)
    assert a.shape == (3, 16, 1280)
    assert torch.allclose(a, b, atol=2e-2 * b.abs().max().item())  # fp16 cache
    assert not torch.allclose(a[0], cached(idx, x, ~flip)[0], atol=1e-3)  # the flip matters


def test_probe_alignment_records_every_block_and_t():
    from pixelrepa.align import probe_alignment
    torch.manual_seed(0)
    net = build_jit("JiT-Ti/4", 32, 5).eval()
    with torch.no_grad():
        for b in net.blocks:
            b.adaLN_modulation[-1].bias.normal_(0, 0.5)
    x = torch.rand(24, 3, 32, 32) * 2 - 1
    y = torch.randint(0, 5, (24,))
    target = torch.randn(24, 64, 40)
    recs = probe_alignment(net, x, y, target, ts=(0.3, 0.9), blocks=(4, 1))
    assert [(r["block"], r["t"]) for r in recs] == [(1, 0.3), (4, 0.3), (1, 0.9), (4, 0.9)]
    assert all(0 <= r["cka"] <= 1 for r in recs)
    # a target equal to the block-1 state up to rotation and scale is perfectly aligned with it
    # (at t = 1 the probe's input is the clean image itself)
    _, (h1,) = net(x, torch.full((24,), 1.0), y, hidden_at=(1,))
    Q, _ = torch.linalg.qr(torch.randn(192, 192))
    recs = probe_alignment(net, x, y, 3 * h1 @ Q, ts=(1.0,), blocks=(1,))
    assert recs[0]["cka"] == pytest.approx(1.0, abs=1e-6)
