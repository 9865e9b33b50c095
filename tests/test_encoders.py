import copy
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pixelrepa.data import to_model_range
from pixelrepa.encoders import (DINOV2_ENV, DINOV2_HF_REPO, EncoderWeightsMissing, build_encoder,
                                cached_features, default_image_size, feature_cache_path,
                                select_targets)

timm = pytest.importorskip("timm")


@pytest.fixture
def no_network(monkeypatch):
    """Any connect() fails the test: proves that nothing tries the network."""
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.fixture
def no_weights_env(monkeypatch, tmp_path):
    """Point every place find_dinov2_weights may look into an empty temporary folder."""
    monkeypatch.delenv(DINOV2_ENV, raising=False)
    for var, sub in (("HF_HUB_CACHE", "hub_cache"), ("HF_HOME", "hf_home"), ("XDG_CACHE_HOME", "xdg")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture(scope="module")
def effnet():
    return build_encoder("effnet-lite0", grid=2, image_size=64)  # 64 px: fast, still the real network


def _square(img: np.ndarray, size: int) -> torch.Tensor:
    h, w = img.shape[:2]
    s = min(h, w)
    crop = Image.fromarray(img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s])
    return torch.from_numpy(np.array(crop.resize((size, size), Image.BICUBIC))).permute(2, 0, 1)


def test_effnet_classifies_real_photos(no_network):
    skdata = pytest.importorskip("skimage.data")
    enc = build_encoder("effnet-lite0", grid=7)  # 224 px: the network's training resolution
    assert (enc.name, enc.dim, enc.grid, enc.image_size) == ("effnet-lite0", 1280, 7, 224)
    x = to_model_range(torch.stack([_square(skdata.chelsea(), 224), _square(skdata.coffee(), 224)]))
    with torch.no_grad():
        fmap = enc.net.extract_features(enc.preprocess(x))
        logits = enc.net._fc(fmap.mean((2, 3)))  # the network's own head (dropout is off in eval)
    assert logits.argmax(1).tolist() == [285, 967]  # Egyptian cat, espresso
    tokens = enc(x)
    assert tokens.shape == (2, 49, 1280)
    # row-major token order: token r * g + c is map position (r, c)
    torch.testing.assert_close(tokens[:, 3 * 7 + 5], fmap[:, :, 3, 5])
    assert not no_network


def test_effnet_preprocessing_and_grid_policy(effnet):
    ends = effnet.preprocess(torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1).expand(2, 3, 64, 64))
    # RGB 0 and 255 under the network's (u - 127) / 128
    torch.testing.assert_close(ends[:, :, 0, 0], torch.tensor([[-127 / 128] * 3, [1.0] * 3]))
    assert effnet.image_size == 64 and effnet(torch.zeros(3, 3, 16, 16)).shape == (3, 4, 1280)
    # default input: the smallest multiple of 32 * grid >= 224 px
    sizes = {g: default_image_size("effnet-lite0", g) for g in (2, 4, 7, 8, 16)}
    assert sizes == {2: 256, 4: 256, 7: 224, 8: 256, 16: 512}
    four = build_encoder("effnet-lite0", grid=4)  # 8 x 8 map, exact 2 x 2 means
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        fmap = four.net.extract_features(four.preprocess(x))
    torch.testing.assert_close(four(x), F.avg_pool2d(fmap, 2).flatten(2).transpose(1, 2))


def test_encoder_is_frozen_hidden_and_stays_eval(effnet):
    parent = nn.Module()
    parent.head = nn.Linear(4, 4)
    parent.encoder = effnet
    parent.train()
    assert not effnet.training and not any(m.training for m in effnet.net.modules())
    assert set(parent.state_dict()) == {"head.weight", "head.bias"}
    assert sum(p.numel() for p in parent.parameters()) == 20
    assert not any(p.requires_grad for p in effnet.net.parameters())
    bn = effnet.net._bn0.running_mean.clone()
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    out = parent.encoder(x)
    assert not out.requires_grad and out.dtype == torch.float32
    torch.testing.assert_close(effnet.net._bn0.running_mean, bn, rtol=0, atol=0)  # BN stats untouched
    assert copy.deepcopy(parent).encoder is effnet  # EMA copies share the frozen encoder


def test_unknown_encoder_and_bad_inputs_are_named(effnet):
    with pytest.raises(ValueError, match="effnet-lite0, dinov2-b14"):
        build_encoder("clip-l14", grid=8)
    with pytest.raises(ValueError, match="to_model_range"):
        effnet(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


# ----------------------------------------------------------------------------- DINOv2

@pytest.fixture(scope="module")
def small_dinov2_sd():
    """A random 2-block DINOv2-B/14 state dict at its native 518 px (37 x 37 positions)."""
    torch.manual_seed(0)
    net = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, depth=2)
    return {k: v.clone() for k, v in net.state_dict().items()}


def _assert_loaded(enc, sd, grid):
    from timm.layers import resample_abs_pos_embed, resample_patch_embed
    got = enc.net.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        if k not in ("patch_embed.proj.weight", "pos_embed"):
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    p = enc.image_size // grid
    kernel = resample_patch_embed(sd["patch_embed.proj.weight"], [p, p])
    torch.testing.assert_close(got["patch_embed.proj.weight"], kernel)
    torch.testing.assert_close(got["pos_embed"], resample_abs_pos_embed(sd["pos_embed"], [grid, grid], [37, 37]))


@pytest.mark.parametrize("layout", ["timm.safetensors", "facebookresearch.pth"])
def test_dinov2_loads_a_weights_file(tmp_path, small_dinov2_sd, no_network, no_weights_env, layout):
    from safetensors.torch import save_file
    path = tmp_path / f"dinov2.{layout.split('.')[1]}"
    if layout.startswith("timm"):
        save_file(small_dinov2_sd, str(path))
    else:  # the released dinov2_vitb14_pretrain.pth has a mask_token and otherwise timm's keys
        torch.save({**small_dinov2_sd, "mask_token": torch.zeros(1, 768)}, path)
    enc = build_encoder("dinov2-b14", grid=4, weights=path, arch_overrides={"depth": 2})
    assert (enc.name, enc.dim, enc.grid, enc.image_size) == ("dinov2-b14", 768, 4, 64)
    _assert_loaded(enc, small_dinov2_sd, 4)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = enc(x)
    assert out.shape == (2, 16, 768)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    z = ((x + 1) / 2 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)  # [-1, 1] -> [0, 1] -> ImageNet
    torch.testing.assert_close(out, enc.net.forward_features(z)[:, 1:].detach())  # patch tokens, final norm
    assert not no_network


def test_dinov2_resampled_kernel_sees_a_resized_patch_like_the_original(tmp_path, small_dinov2_sd, no_weights_env):
    # the pseudo-inverse resampling: <resize(x), w16> = <x, w14> for every 14 x 14 patch x
    torch.save(small_dinov2_sd, tmp_path / "w.pth")
    enc = build_encoder("dinov2-b14", grid=4, weights=tmp_path / "w.pth", arch_overrides={"depth": 2})
    x14 = torch.randn(4, 3, 14, 14)
    x16 = F.interpolate(x14, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    w14, w16 = small_dinov2_sd["patch_embed.proj.weight"], enc.net.patch_embed.proj.weight
    torch.testing.assert_close(F.conv2d(x16, w16), F.conv2d(x14, w14), atol=1e-4, rtol=1e-3)


def test_dinov2_from_hugging_face_cache(tmp_path, small_dinov2_sd, no_network, no_weights_env):
    from safetensors.torch import save_file
    repo = tmp_path / "hub_cache" / DINOV2_HF_REPO  # huggingface_hub's layout: snapshot files link to blobs
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    save_file(small_dinov2_sd, str(repo / "blobs" / "deadbeef"))
    (repo / "snapshots" / "abc123" / "model.safetensors").symlink_to("../../blobs/deadbeef")
    enc = build_encoder("dinov2-b14", grid=2, arch_overrides={"depth": 2})
    assert enc.weights_file.endswith("abc123/model.safetensors") and enc.image_size == 32
    _assert_loaded(enc, small_dinov2_sd, 2)
    assert enc(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 768)
    assert not no_network


def test_dinov2_missing_weights_one_clear_error(tmp_path, no_network, no_weights_env, monkeypatch):
    with pytest.raises(EncoderWeightsMissing) as err:
        build_encoder("dinov2-b14", grid=16)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    for where in ("hub_cache", "hf_home", DINOV2_ENV, "weights=PATH", "effnet-lite0", "nothing is downloaded"):
        assert where in msg, where
    monkeypatch.setenv(DINOV2_ENV, str(tmp_path / "nowhere.pth"))
    with pytest.raises(EncoderWeightsMissing, match="nowhere.pth"):
        build_encoder("dinov2-b14", grid=16)
    assert not no_network


def test_dinov2_resizes_other_resolutions_to_its_grid(tmp_path, small_dinov2_sd, no_weights_env):
    """Images of another size are resized to 16 px per token (a 512 px JiT/32 aligns to the 256 px
    view): the same tokens as resizing them first; a grid the patch size cannot make is refused."""
    torch.save(small_dinov2_sd, tmp_path / "w.pth")
    enc = build_encoder("dinov2-b14", grid=4, weights=tmp_path / "w.pth", arch_overrides={"depth": 2})
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    small = torch.nn.functional.interpolate(x, size=(64, 64), mode="bicubic", align_corners=False,
                                            antialias=True).clamp(-1, 1)
    assert enc(x).shape == (2, 16, 768)
    torch.testing.assert_close(enc(x), enc(small))
    with pytest.raises(ValueError, match="not a multiple of grid 8"):
        build_encoder("dinov2-b14", grid=8, weights=tmp_path / "w.pth", image_size=60)


def test_dinov2_full_b14_at_pixelrepa_grid(tmp_path, no_network, no_weights_env, monkeypatch):
    """The real architecture (86M parameters) from a file found through $PIXELREPA_DINOV2:
    256 px -> 16 x 16 tokens of 768, as PixelREPA's target."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    sd = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0).state_dict()
    save_file(sd, str(tmp_path / "b14.safetensors"))
    monkeypatch.setenv(DINOV2_ENV, str(tmp_path / "b14.safetensors"))
    enc = build_encoder("dinov2-b14", grid=16)
    assert enc.image_size == 256 and len(enc.net.blocks) == 12
    _assert_loaded(enc, sd, 16)
    assert enc(torch.zeros(1, 3, 256, 256)).shape == (1, 256, 768)
    assert not no_network


# ----------------------------------------------------------------------------- feature cache

def _images(n=5, res=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8, generator=g)


def test_feature_cache_mirrors_reuse_and_staleness(tmp_path, effnet, monkeypatch):
    images = _images()
    feats = cached_features(effnet, "toy-train", images, 16, data_dir=tmp_path, batch_size=3, progress=False)
    path = feature_cache_path(effnet, "toy-train", 16, tmp_path)
    assert path.name == "features-effnet-lite0-toy-train-16px-g2-flip.pt" and path.exists()
    assert feats.shape == (2, 5, 4, 1280) and feats.dtype == torch.float16
    x = to_model_range(images)
    direct = effnet(torch.cat([x, x.flip(-1)])).view(2, 5, 4, 1280)  # the mirror images, encoded
    torch.testing.assert_close(feats.float(), direct, atol=2e-3, rtol=2e-3)
    assert (feats[1].float() - feats[0].float()).abs().max() > 0.1  # mirrored features are not the same

    idx, flipped = torch.tensor([4, 0, 4]), torch.tensor([True, False, False])
    t = select_targets(feats, idx, flipped)
    assert t.dtype == torch.float32
    torch.testing.assert_close(t, torch.stack([feats[1, 4], feats[0, 0], feats[0, 4]]).float())

    def boom(*a, **k):
        raise AssertionError("recomputed although the cache is valid")
    with monkeypatch.context() as m:
        m.setattr(effnet, "forward", boom)
        again = cached_features(effnet, "toy-train", images, 16, data_dir=tmp_path, progress=False)
    assert torch.equal(again, feats)

    changed = images.clone()
    changed[2, 0, 5, 5] ^= 1  # one pixel of one image: the key must notice
    calls = []
    real = effnet.forward
    monkeypatch.setattr(effnet, "forward", lambda x: calls.append(len(x)) or real(x))
    with pytest.warns(UserWarning, match="stale"):
        fresh = cached_features(effnet, "toy-train", changed, 16, data_dir=tmp_path, progress=False)
    assert calls == [2] * 5 and fresh.shape == feats.shape  # on the CPU one image and its mirror at a time
    # the batch size (3 above, 1 here) changes nothing beyond float rounding; the changed image changes
    torch.testing.assert_close(fresh[:, [0, 1, 3, 4]].float(), feats[:, [0, 1, 3, 4]].float(), atol=2e-3, rtol=2e-3)
    assert not torch.equal(fresh[:, 2], feats[:, 2])


def test_feature_cache_without_flips(tmp_path, effnet):
    images = _images(3)
    feats = cached_features(effnet, "toy", images, 16, data_dir=tmp_path, progress=False, flips=False)
    assert feats.shape == (3, 4, 1280)
    torch.testing.assert_close(select_targets(feats, torch.tensor([2])), feats[2:3].float())
    with pytest.raises(ValueError, match="flips=True"):
        select_targets(feats, torch.tensor([2]), torch.tensor([True]))
    with pytest.raises(ValueError, match="uint8"):
        cached_features(effnet, "toy", images.float(), 16, data_dir=tmp_path, progress=False)


def test_feature_cache_made_for_another_grid_or_resolution_is_rebuilt(tmp_path, effnet):
    """A cache file under this name but made for another token grid or image resolution is never served."""
    import shutil
    images = _images(3)
    cached_features(effnet, "toy", images, 16, data_dir=tmp_path, progress=False)
    one = copy.copy(effnet)
    one.grid = 1  # the same network pooled to a 1 x 1 grid
    shutil.copy(feature_cache_path(effnet, "toy", 16, tmp_path), feature_cache_path(one, "toy", 16, tmp_path))
    with pytest.warns(UserWarning, match="stale"):
        assert cached_features(one, "toy", images, 16, data_dir=tmp_path, progress=False).shape == (2, 3, 1, 1280)
    small = images[:, :, ::2, ::2].contiguous()
    shutil.copy(feature_cache_path(effnet, "toy", 16, tmp_path), feature_cache_path(effnet, "toy", 8, tmp_path))
    with pytest.warns(UserWarning, match="stale"):
        feats = cached_features(effnet, "toy", small, 8, data_dir=tmp_path, progress=False)
    x = to_model_range(small)
    torch.testing.assert_close(feats[0].float(), effnet(x), atol=2e-3, rtol=2e-3)
