
import pytest
import torch

from conftest import randomised
from pixelrepa.jit import JiT, JiTConfig, MODELS, apply_rope, build_jit, count_params, jit_config, rope_2d


@pytest.mark.parametrize("name,expected", [("JiT-B/16", 131e6), ("JiT-L/16", 459e6)])
def test_paper_sizes_have_the_paper_parameter_counts(name, expected):
    with torch.device("meta"):  # no memory, no init cost
        net = JiT(jit_config(name, 256, 1000))
    assert abs(count_params(net) - expected) / expected < 0.02


def test_registry_names_and_unknown_name_lists_them():
    for name in ("JiT-B/16", "JiT-L/16", "JiT-H/16", "JiT-B/32", "JiT-L/32", "JiT-H/32"):
        assert name in MODELS
    with pytest.raises(ValueError, match="JiT-B/16"):
        jit_config("JiT-X/3", 32, 10)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="input_size"):
        JiTConfig(input_size=30, patch_size=4)
    with pytest.raises(ValueError, match="in_context_start"):
        JiTConfig(depth=4, in_context_start=4)


def inputs(B=3, res=32, classes=22, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, res, res, generator=g), torch.rand(B, generator=g), torch.randint(0, classes + 1, (B,), generator=g)


def test_zero_initialised_final_layer_predicts_zero():
    net = build_jit("JiT-Ti/4", 32, 22)
    z, t, y = inputs()
    assert torch.count_nonzero(net(z, t, y)) == 0
    # adaLN-Zero: every block starts as the identity
    x, c, _ = net.embed(z, t, y)
    assert torch.equal(net.blocks[0](x, c, net.rope), x)


def test_hidden_states_and_in_context_tokens():
    net = randomised(build_jit("JiT-Ti/4", 32, 22)).eval()
    z, t, y = inputs()
    x_pred, (h2, h6) = net(z, t, y, hidden_at=(2, 6))
    assert x_pred.shape == z.shape and h2.shape == h6.shape == (3, 64, 192)
    assert torch.equal(net(z, t, y), x_pred)
    # hidden states are image tokens only, and the prediction's tokens are the last block's
    net.final_layer.linear.weight.data.zero_()
    net.final_layer.linear.bias.data.zero_()
    x_pred, (h6b,) = net(z, t, y, hidden_at=(6,))
    assert torch.equal(h6b, h6) and torch.count_nonzero(x_pred) == 0


def test_rope_is_a_rotation_and_identity_on_in_context_tokens():
    D, grid, L = 16, 4, 3
    rope = rope_2d(D, grid, num_identity=L)
    x = torch.randn(2, L + grid * grid, 1, D)
    r = apply_rope(x, rope)
    assert torch.allclose(r.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # norm preserved
    assert torch.equal(r[:, :L], x[:, :L])  # class tokens not rotated
    # relative: <R_m q, R_n k> depends on positions only through m - n along each axis
    q, k = torch.randn(D), torch.randn(D)
    def dot(m, n):
        qs = torch.zeros(1, L + grid * grid, 1, D); qs[0, L + m, 0] = q
        ks = torch.zeros(1, L + grid * grid, 1, D); ks[0, L + n, 0] = k
        return (apply_rope(qs, rope)[0, L + m, 0] * apply_rope(ks, rope)[0, L + n, 0]).sum()
    assert torch.allclose(dot(0, 1), dot(5, 6), atol=1e-5)  # same shift along a row
    assert torch.allclose(dot(0, 4), dot(6, 10), atol=1e-5)  # same shift down a column
    assert not torch.allclose(dot(0, 1), dot(0, 4), atol=1e-3)  # row and column shifts differ


def test_a_block_skipping_leading_tokens_equals_the_full_block_sliced():
    blk = randomised(build_jit("JiT-Ti/4", 32, 22)).blocks[-1]
    x, c, rope = torch.randn(3, 96, 192), torch.randn(3, 192), rope_2d(64, 8, 32)
    full, part = blk(x, c, rope), blk(x, c, rope, 32)
    assert part.shape == (3, 64, 192) and torch.allclose(part, full[:, 32:], atol=1e-5)


def test_dropout_only_in_middle_half():
    net = build_jit("JiT-H/16", 64, 10, depth=8, width=64, num_heads=2, bottleneck=8, in_context_start=2)
    drops = [b.attn.proj_drop.p for b in net.blocks]  # JiT-H: projection dropout 0.2, attention 0 (the reference's)
    assert drops == [0, 0, 0.2, 0.2, 0.2, 0.2, 0, 0]
    assert [b.attn.attn_drop for b in net.blocks] == [0] * 8


def test_wrong_input_size_is_a_clear_error():
    net = build_jit("JiT-Ti/4", 32, 22)
    with pytest.raises(ValueError, match="32 px"):
        net(torch.randn(1, 3, 64, 64), torch.rand(1), torch.zeros(1, dtype=torch.long))
