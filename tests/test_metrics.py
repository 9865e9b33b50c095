"""Metrics and their extractors: the offline Inception conversion, reference caching, encoder FD and a sanity ordering on real images.

Inception runs at ~3-8 images/s on the 2-core CPU, so every set here is tens of images: the FIDs are
heavily biased upwards at that size, and only their ordering is checked.
"""
import dataclasses
import math
import socket

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT
from pixelrepa import extractors, metrics
from pixelrepa.data import OPENCLIPART_ROOT, FASHION_MNIST_ROOT, load_dataset, to_model_range

DATA = ROOT / "data"
N = 40  # images per set in the sanity ordering
needs_openclipart = pytest.mark.skipif(not OPENCLIPART_ROOT.exists(), reason="apt-get install openclipart-png")


class Exploding(torch.utils.data.Dataset):
    """Stands in for reference images that must never be read (their features are cached)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        raise AssertionError("reference features were recomputed instead of read from the cache")


def openclipart(split: str) -> torch.Tensor:
    return load_dataset("openclipart", 32, split, data_dir=DATA, progress=False).images


def blur(x: torch.Tensor) -> torch.Tensor:
    """Down to 8 px and back: a strong, deterministic blur."""
    y = F.interpolate(F.interpolate(x.float(), size=(8, 8), mode="area"), size=x.shape[-2:], mode="bilinear")
    return y.round().clamp(0, 255).to(torch.uint8)


def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network connection attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A private data dir (own fidelity cache) that shares the project's dataset caches and weights."""
    d = tmp_path_factory.mktemp("data")
    (DATA / "weights").mkdir(parents=True, exist_ok=True)
    (d / "weights").symlink_to(DATA / "weights")
    for name in ("openclipart-32px.pt", "fashion-mnist-32px.pt"):
        if (DATA / name).exists():
            (d / name).symlink_to(DATA / name)
    return d


@pytest.fixture(scope="module")
def sanity(data_dir):
    """Held-out reference (cached), then train / blurred / noise samples against it, offline."""
    if not OPENCLIPART_ROOT.exists():
        pytest.skip("apt-get install openclipart-png")
    g = torch.Generator().manual_seed(0)
    train = openclipart("train")
    train = train[torch.randperm(len(train), generator=g)[:N]]
    noise = torch.randint(0, 256, train.shape, generator=g, dtype=torch.uint8)
    ref = metrics.reference_stats("openclipart", 32, "eval", n=N, data_dir=data_dir)
    with pytest.MonkeyPatch.context() as mp:
        no_network(mp)
        out = {"held-out": metrics.compute_metrics(train, ref_stats=ref, data_dir=data_dir)}
        # The same key must be served from the cache: these reals would raise if read.
        cached = dataclasses.replace(ref, images=Exploding(N))
        for name, fake in (("blurred", blur(train)), ("noise", noise)):
            out[name] = metrics.compute_metrics(fake, ref_stats=cached, data_dir=data_dir, kid=False)
    return ref, out


@pytest.mark.slow
def test_fid_orders_held_out_blurred_noise(sanity):
    _, r = sanity
    fid = {k: v["fid"] for k, v in r.items()}
    print("sanity FIDs (N=%d, 32 px openclipart):" % N, {k: round(v, 1) for k, v in fid.items()})
    assert fid["held-out"] < 0.9 * fid["blurred"] < 0.9 * fid["noise"]
    assert fid["noise"] > 1.5 * fid["held-out"]
    assert r["held-out"]["n_real"] == r["noise"]["n_real"] == N


@pytest.mark.slow
def test_converted_inception_has_no_inception_score(sanity):
    r = sanity[1]["held-out"]
    assert r["isc_mean"] is None and "logits" in r["isc_note"]
    assert r["weights"] == extractors.CONVERTED_WEIGHTS and math.isfinite(r["kid_mean"])


@pytest.mark.slow
@needs_openclipart
def test_mismatched_reference_is_refused(sanity, data_dir):
    ref, _ = sanity
    fake = openclipart("train")[:2]
    with pytest.raises(ValueError, match="32 px .* samples are 64x64 px"):
        metrics.compute_metrics(F.interpolate(fake.float(), scale_factor=2).to(torch.uint8), ref_stats=ref,
                                data_dir=data_dir)
    with pytest.raises(ValueError, match="not 'fashion-mnist'"):
        metrics.compute_metrics(fake, ref_stats=ref, dataset="fashion-mnist", data_dir=data_dir)
    with pytest.raises(ValueError, match="exactly one"):
        metrics.compute_metrics(fake, fake, ref_stats=ref, data_dir=data_dir)
    with pytest.raises(TypeError, match="uint8"):
        metrics.compute_metrics(fake.float(), fake, data_dir=data_dir)
    # Another resolution or dataset is another key, hence another cache entry: never served the
    # openclipart eval features that the sanity fixture cached.
    assert metrics.RefStats({**ref.key, "resolution": 64}, ref.images, ref.cache_root).cache_name != ref.cache_name
    other = (metrics.reference_stats("fashion-mnist", 32, "eval", n=N, data_dir=data_dir) if FASHION_MNIST_ROOT.exists()
             else metrics.reference_stats("openclipart", 32, "train", n=N, data_dir=data_dir))
    assert other.cache_name != ref.cache_name
    with pytest.raises(AssertionError, match="recomputed"):
        metrics.compute_metrics(fake, ref_stats=dataclasses.replace(other, images=Exploding(N)), data_dir=data_dir,
                                kid=False)


@needs_openclipart
def test_converted_inception_matches_torchscript(data_dir):
    path, has_logits = extractors.inception_weights(data_dir)
    assert not has_logits
    # Clip art (not the photos the conversion was checked on), upsampled to the native 299 px.
    x = F.interpolate(openclipart("eval")[:3].float(), size=(299, 299), mode="bicubic")
    diff = extractors.inception_max_abs_diff(path, x.round().clamp(0, 255).to(torch.uint8))
    print(f"converted Inception vs TorchScript: max abs diff {diff:.2e}")
    assert diff <= 1e-5


def test_wrong_conversion_is_refused_and_not_saved(tmp_path, monkeypatch):
    swapped = {**extractors._BRANCHES["E"], "tower_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv": "branch3x3_2a"}
    monkeypatch.setitem(extractors._BRANCHES, "E", swapped)  # same shapes, wrong wiring
    with pytest.raises(RuntimeError, match="differs"):
        extractors.convert_fid_helper_inception(tmp_path / "w.pth")
    assert list(tmp_path.iterdir()) == []


@needs_openclipart
def test_standard_weights_give_inception_score(data_dir, tmp_path, monkeypatch):
    """A file with logits (here: the converted convolutions plus a random fc) is picked up from
    $PIXELREPA_INCEPTION or the torch hub cache, and then IS is computed."""
    converted, _ = extractors.inception_weights(data_dir)
    sd = torch.load(converted, weights_only=True)
    g = torch.Generator().manual_seed(0)
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1008, 2048, generator=g) * 0.05, torch.zeros(1008)
    standard = tmp_path / extractors.STANDARD_WEIGHTS
    torch.save(sd, standard)

    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / extractors.STANDARD_WEIGHTS).symlink_to(standard)
    monkeypatch.delenv("PIXELREPA_INCEPTION", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert extractors.inception_weights(data_dir) == (hub / extractors.STANDARD_WEIGHTS, True)
    monkeypatch.delenv("TORCH_HOME")

    no_network(monkeypatch)
    monkeypatch.setenv("PIXELREPA_INCEPTION", str(standard))
    assert extractors.inception_weights(data_dir) == (standard, True)
    r = metrics.compute_metrics(openclipart("train")[:8], openclipart("eval")[:8], data_dir=data_dir, kid=False)
    assert r["isc_mean"] > 1.0 and math.isfinite(r["isc_std"]) and "isc_note" not in r
    assert r["weights"] == extractors.STANDARD_WEIGHTS and r["fid"] > 0


class RandConv(nn.Module):
    """A fixed random patch encoder: [-1, 1] images -> (B, 64 tokens, 8) at 32 px."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, 4)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)
            self.conv.bias.zero_()

    def forward(self, x):
        return self.conv(x).flatten(2).transpose(1, 2)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Independent FD (scipy sqrtm) to check torch-fidelity received the pooled encoder features."""
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


def test_registered_encoder_fd_matches_independent_frechet(data_dir):
    extractors.register_encoder_fd("test-randconv", lambda weights, device: RandConv())
    extractors.register_encoder_fd("test-randconv", lambda weights, device: RandConv())  # re-registering is fine
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8)
    b = (a.float() * 0.6 + 40).to(torch.uint8)
    out = metrics.compute_metrics(a, b, feature_extractor="test-randconv", data_dir=data_dir)
    assert set(out) == {"fd_test-randconv", "n_fake", "n_real", "feature_extractor"}  # FD, never "fid"
    with torch.no_grad():
        fa, fb = (RandConv()(to_model_range(x)).mean(1).double().numpy() for x in (a, b))
    assert out["fd_test-randconv"] == pytest.approx(frechet(fa, fb), rel=1e-4)
    assert out["fd_test-randconv"] > 0.01
    same = metrics.compute_metrics(a, a, feature_extractor="test-randconv", data_dir=data_dir)
    assert abs(same["fd_test-randconv"]) < 1e-5


def test_reference_cache_of_another_resolution_or_dataset_is_never_used(tmp_path):
    """A reference cache file under this reference's name but made for another resolution or dataset
    (its key file says so), one truncated after writing, or an old one (no key file) of another size is
    reported and rebuilt: every FD below equals the one computed from the images with no cache."""
    import shutil
    from conftest import make_image_folder
    extractors.register_encoder_fd("test-randconv", lambda weights, device: RandConv())
    folders = {"a": make_image_folder(tmp_path / "a", per_class=4), "b": make_image_folder(tmp_path / "b", per_class=4, seed=1)}
    kw = dict(feature_extractor="test-randconv", data_dir=tmp_path / "data")
    g = torch.Generator().manual_seed(0)
    fake = {r: torch.randint(0, 256, (12, 3, r, r), generator=g, dtype=torch.uint8) for r in (16, 32)}

    def fd(r, real=None, ref=None):
        return metrics.compute_metrics(fake[r], real, ref_stats=ref, **kw)["fd_test-randconv"]

    truth = {(name, r): fd(r, real=torch.stack([x for x, _ in load_dataset(str(f), r, progress=False)]))
             for name, f in folders.items() for r in (16, 32)}
    ref = {(name, r): metrics.reference_stats(str(f), r, **kw) for name, f in folders.items() for r in (16, 32)}
    assert fd(32, ref=ref["a", 32]) == pytest.approx(truth["a", 32])
    made = ref["a", 32].cache_files()
    assert len(made) == 2 and ref["a", 32].key_file.exists()
    assert fd(32, ref=dataclasses.replace(ref["a", 32], images=Exploding(12))) == pytest.approx(truth["a", 32])

    def plant(src, dst, key_file=True):  # src's cache files under dst's name
        for f in src.cache_files():
            shutil.copy(f, f.with_name(f.name.replace(src.cache_name, dst.cache_name)))
        if key_file:
            shutil.copy(src.key_file, dst.key_file)

    for other, why in ((("a", 16), r"made for .*a at 32 px .* not .*a at 16 px"), (("b", 32), r"made for .*a at 32 px .* not .*b at 32 px")):
        plant(ref["a", 32], ref[other])
        with pytest.warns(UserWarning, match=why):
            assert fd(other[1], ref=ref[other]) == pytest.approx(truth[other])
    stat = [f for f in made if "-stat-" in f.name][0]
    stat.write_bytes(stat.read_bytes()[:100])
    with pytest.warns(UserWarning, match="changed size after it was written"):
        assert fd(32, ref=ref["a", 32]) == pytest.approx(truth["a", 32])
    half = metrics.reference_stats(str(folders["a"]), 32, n=6, **kw)
    plant(ref["a", 32], half, key_file=False)  # as a cache from before key files: 12 images, not 6
    with pytest.warns(UserWarning, match="holds features of 12 images, not 6"):
        fd(32, ref=half)
    assert fd(32, ref=dataclasses.replace(half, images=Exploding(6))) == pytest.approx(
        fd(32, real=torch.stack([x for x, _ in load_dataset(str(folders["a"]), 32, progress=False)][:6])))


@pytest.mark.slow
@needs_openclipart
def test_effnet_fd_separates_real_from_noise(data_dir):
    ref = metrics.reference_stats("openclipart", 32, "eval", n=16, feature_extractor="effnet-lite0",
                                  data_dir=data_dir)
    other = openclipart("train")[:16]
    noise = torch.randint(0, 256, other.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    fd = {k: metrics.compute_metrics(x, ref_stats=ref, feature_extractor="effnet-lite0", data_dir=data_dir)
          for k, x in (("held-out", other), ("noise", noise))}
    print("FD_EffNet (N=16):", {k: round(v["fd_effnet"], 1) for k, v in fd.items()})
    assert "fid" not in fd["noise"]
    assert fd["held-out"]["fd_effnet"] < 0.8 * fd["noise"]["fd_effnet"]
