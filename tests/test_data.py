"""Tests for pixelrepa.data: pixel values, bad input, cache behaviour, real datasets."""

from __future__ import annotations

import gzip
import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelrepa import data

REPO_DATA = Path(__file__).parents[1] / "data"
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def solid(path: Path, colour, size=(40, 30), mode="RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, **save)
    return path


def stripes(path: Path, colours, size) -> Path:
    """Equal vertical (w > h) or horizontal (h > w) bands, to see which part a crop keeps."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    n = len(colours)
    for k, c in enumerate(colours):
        if w >= h:
            arr[:, k * w // n:(k + 1) * w // n] = c
        else:
            arr[k * h // n:(k + 1) * h // n, :] = c
    Image.fromarray(arr).save(path)
    return path


def half_transparent(path: Path, opaque=RED, size=(64, 64)) -> Path:
    """Left half fully transparent *black*, right half opaque: black must not leak."""
    arr = np.zeros((size[1], size[0], 4), np.uint8)
    arr[:, size[0] // 2:] = (*opaque, 255)
    Image.fromarray(arr, "RGBA").save(path)
    return path


def truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def corrupt_png(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(1).integers(0, 255, 500, dtype=np.uint8).tobytes())
    return path


def adm_reference(img: Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's center_crop_arr, restated independently for comparison."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    s = size / min(img.size)
    img = img.resize((round(img.size[0] * s), round(img.size[1] * s)), resample=Image.BICUBIC)
    a = np.array(img)
    y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[y:y + size, x:x + size]


# ---------------------------------------------------------------- arguments, ranges

@pytest.mark.parametrize("res", [0, 4, 6, 7, 9, 33, -8, 16.0, True, "32"])
def test_bad_resolution_rejected(res, tmp_path):
    with pytest.raises(ValueError, match=repr(res).replace(".", r"\.")):
        data.load_dataset("fashion-mnist", res, data_dir=tmp_path)


def test_bad_split_rejected(tmp_path):
    with pytest.raises(ValueError, match="validation"):
        data.load_dataset("fashion-mnist", 8, split="validation", data_dir=tmp_path)


def test_model_range_round_trip_and_clamp():
    x = torch.arange(256, dtype=torch.uint8)
    y = data.to_model_range(x)
    assert y[0].item() == -1.0 and y[255].item() == 1.0 and y.dtype == torch.float32
    assert torch.equal(data.from_model_range(y), x)
    out = data.from_model_range(torch.tensor([-3.0, 3.0, 0.0, 128.6 / 127.5 - 1]))
    assert out.tolist() == [0, 255, 128, 129]  # clamped, and rounded rather than truncated
    with pytest.raises(TypeError):
        data.to_model_range(y)


# ---------------------------------------------------------------- load_rgb

@pytest.mark.parametrize("crop", ["adm", "square"])
def test_solid_colours_survive_exactly(tmp_path, crop):
    for mode, value, rgb in [("RGB", (10, 200, 30), (10, 200, 30)), ("L", 77, (77, 77, 77)),
                             ("RGBA", (9, 99, 199, 255), (9, 99, 199))]:
        out = data.load_rgb(solid(tmp_path / f"{mode}.png", value, mode=mode), 16, center_crop=crop)
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8
        assert (out == rgb).all(), (mode, np.unique(out.reshape(-1, 3), axis=0))


def test_jpeg_and_cmyk_and_palette(tmp_path):
    jpg = data.load_rgb(solid(tmp_path / "a.jpg", (200, 40, 60), quality=95), 8)
    assert np.abs(jpg.astype(int) - (200, 40, 60)).max() <= 3
    cmyk = data.load_rgb(solid(tmp_path / "c.jpg", (0, 255, 255, 0), mode="CMYK"), 8)  # M+Y = red
    assert np.abs(cmyk.astype(int) - RED).max() <= 3
    pal = Image.new("P", (32, 32), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(0, (0, 0, 16, 32))
    pal.save(tmp_path / "p.png", transparency=0)  # index 0 (black) is transparent
    out = data.load_rgb(tmp_path / "p.png", 8, center_crop="adm")  # box halving: exact edges
    assert (out[:, :4] == WHITE).all() and (out[:, 4:] == BLUE).all()


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 1000, 32896, 40000, 65535]], np.uint16).repeat(16, 0).repeat(16, 1)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = data.load_rgb(tmp_path / "g16.png", 8, center_crop="square")  # 80x16 -> middle 16x16
    assert (out == 128).all()  # 32896 / 257 == 128 exactly; clipping would give 255
    full = data.load_rgb(tmp_path / "g16.png", 16, center_crop="adm")  # 80 -> 40x8 -> need 16
    assert full.min() >= 0 and full.max() <= 255 and (full[..., 0] == full[..., 2]).all()
    solid16 = np.full((16, 16), 40000, np.uint16)
    Image.fromarray(solid16).save(tmp_path / "s16.png")
    assert (data.load_rgb(tmp_path / "s16.png", 8) == 156).all()  # round(40000 / 257)


@pytest.mark.parametrize("crop", ["adm", "square"])
def test_transparency_becomes_white_without_dark_fringe(tmp_path, crop):
    out = data.load_rgb(half_transparent(tmp_path / "t.png"), 16, center_crop=crop).astype(int)
    assert (out[:, :5] == WHITE).all() and (out[:, 11:] == RED).all()  # away from the edge
    assert out[..., 0].min() >= 254  # red and white share R=255: black leaking would lower it
    la = np.zeros((32, 32, 2), np.uint8)
    la[:, 16:] = (50, 255)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = data.load_rgb(tmp_path / "la.png", 16, center_crop=crop)
    assert (out[:, :5] == 255).all() and (out[:, 11:] == 50).all()


def test_center_crop_keeps_the_centre(tmp_path):
    wide = stripes(tmp_path / "wide.png", [RED, GREEN, BLUE], (96, 32))
    tall = stripes(tmp_path / "tall.png", [RED, GREEN, BLUE], (30, 90))
    for path in (wide, tall):
        sq = data.load_rgb(path, 8, center_crop="square")
        assert (sq == GREEN).all()
        adm = data.load_rgb(path, 8, center_crop="adm")
        assert np.abs(adm[2:6, 2:6].astype(int) - GREEN).max() <= 2
        assert np.array_equal(adm, adm_reference(Image.open(path).convert("RGB"), 8))


def test_adm_crop_matches_reference_on_noise(tmp_path):
    rng = np.random.default_rng(3)
    for size in [(333, 257), (64, 64), (250, 500), (33, 17)]:
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        img.save(tmp_path / "n.png")
        assert np.array_equal(data.load_rgb(tmp_path / "n.png", 32, center_crop="adm"),
                              adm_reference(img, 32))


def test_unreadable_files_raise(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    for path in (corrupt_png(tmp_path / "c.png"), truncated_jpeg(tmp_path / "t.jpg"), tmp_path / "empty.png"):
        with pytest.raises(Exception):
            data.load_rgb(path, 8)
    with pytest.raises(ValueError, match="center_crop"):
        data.load_rgb(solid(tmp_path / "ok.png", RED), 8, center_crop="middle")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_is_scoped_and_enforced(tmp_path, monkeypatch):
    default = Image.MAX_IMAGE_PIXELS
    path = solid(tmp_path / "big.png", RED, size=(300, 200))
    assert (data.load_rgb(path, 8) == RED).all()
    assert Image.MAX_IMAGE_PIXELS == default  # raised only inside load_rgb
    monkeypatch.setattr(data, "MAX_PIXELS", 300 * 200 - 1)
    with pytest.raises(Exception, match="MAX_PIXELS|exceeds|decompression"):
        data.load_rgb(path, 8)
    assert Image.MAX_IMAGE_PIXELS == default


# ---------------------------------------------------------------- ImageFolder

def make_folder(root: Path) -> Path:
    """a/ empty class, b/ red images (one nested), c/ blue plus every kind of bad file."""
    (root / "a_empty").mkdir(parents=True)
    solid(root / "b" / "1.png", RED)
    solid(root / "b" / "sub" / "2.JPEG", RED, quality=100)
    solid(root / "b" / "3.png", (255, 0, 0, 255), mode="RGBA")
    (root / "b" / "notes.txt").write_text("not an image")
    solid(root / "c" / "1.png", BLUE, mode="RGB")
    corrupt_png(root / "c" / "2_corrupt.png")
    truncated_jpeg(root / "c" / "3_trunc.jpg")
    (root / "c" / "4_empty.png").write_bytes(b"")
    solid(root / "c" / "5.png", BLUE)
    return root


def test_image_folder_skips_bad_files_and_keeps_labels_consistent(tmp_path):
    root = make_folder(tmp_path / "tree")
    with pytest.warns(UserWarning, match="1 class folder.*a_empty"):
        ds = data.load_dataset(str(root), 16, split="eval", data_dir=tmp_path / "cache")
    assert ds.classes == ["a_empty", "b", "c"] and ds.num_classes == 3
    assert len(ds) == 8 and ds.labels.tolist() == [1, 1, 1, 2, 2, 2, 2, 2]
    assert not (tmp_path / "cache").exists()  # ImageFolder data is never cached
    with pytest.warns(UserWarning) as record:
        items = [ds[i] for i in range(len(ds))]
    messages = [str(w.message) for w in record if "skipped unreadable" in str(w.message)]
    assert len(messages) == 3 and "3 image(s) skipped" in messages[-1]
    assert any("2_corrupt.png" in m for m in messages) and any("4_empty.png" in m for m in messages)
    assert ds.num_skipped == 3
    for img, label in items:
        assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and isinstance(label, int)
        expected = RED if label == 1 else BLUE  # a replacement item carries its own label
        assert (img.permute(1, 2, 0).int() - torch.tensor(expected)).abs().max() <= 3
    assert [lab for _, lab in items[4:7]] == [2, 2, 2]  # bad c/ files are replaced by c/5.png
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known-bad files are not re-decoded nor re-reported
        assert ds[4][1] == 2
    with pytest.raises(IndexError):
        ds[len(ds)]  # so that `for img, label in ds` terminates


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_folder_decodes_odd_modes_and_skips_huge_files(tmp_path):
    """Greyscale, CMYK and 16-bit files in a folder decode to their colours; files over MAX_PIXELS
    (Pillow's bomb error at 2x its bound, our own check below it) are skipped and counted, not decoded."""
    from conftest import huge_png
    root = tmp_path / "tree"
    solid(root / "a" / "1_grey.png", 77, mode="L")
    solid(root / "a" / "2_cmyk.jpg", (0, 255, 255, 0), mode="CMYK", quality=95)  # M + Y = red
    Image.fromarray(np.full((30, 40), 40000, np.uint16)).save(root / "a" / "3_g16.png")
    (root / "b").mkdir()
    huge_png(root / "b" / "1_bomb.png", 50_000, 50_000)  # 2.5 Gpx: Pillow refuses to open it
    huge_png(root / "b" / "2_big.png", 40_000, 30_000)  # 1.2 Gpx: over MAX_PIXELS = 2**30
    solid(root / "b" / "3_ok.png", BLUE)
    ds = data.load_dataset(str(root), 16, data_dir=tmp_path / "cache")
    with pytest.warns(UserWarning) as record:
        items = [ds[i] for i in range(len(ds))]
    px = [img.permute(1, 2, 0).int() for img, _ in items]
    assert (px[0] == 77).all() and (px[1] - torch.tensor(RED)).abs().max() <= 3 and (px[2] == 156).all()
    assert [lab for _, lab in items] == [0, 0, 0, 1, 1, 1] and all((p == torch.tensor(BLUE)).all() for p in px[3:])
    skips = [str(w.message) for w in record if "skipped unreadable" in str(w.message)]
    assert len(skips) == 2 and ds.num_skipped == 2 and "2 image(s) skipped" in skips[-1]
    assert "1_bomb.png (DecompressionBombError" in skips[0] and "2_big.png (ValueError: 40000x30000 exceeds" in skips[1]


@pytest.mark.parametrize("kind", ["missing", "no_classes", "no_images", "file"])
def test_image_folder_errors_name_the_path(tmp_path, kind):
    root = tmp_path / "imagenet"
    if kind == "no_classes":
        root.mkdir()
        solid(root / "loose.png", RED)
    elif kind == "no_images":
        (root / "cls").mkdir(parents=True)
        (root / "cls" / "x.txt").write_text("x")
    elif kind == "file":
        root = solid(tmp_path / "img.png", RED)
    with pytest.raises(data.DatasetError, match=re.escape(str(root))):
        data.load_dataset(str(root), 8, data_dir=tmp_path)


def test_unknown_name_lists_builtins(tmp_path):
    with pytest.raises(data.DatasetError) as err:
        data.load_dataset("cifar10", 32, data_dir=tmp_path)
    msg = str(err.value)
    assert "cifar10" in msg and "openclipart" in msg and "fashion-mnist" in msg and "ImageFolder" in msg


@pytest.mark.parametrize("name,attr,hint", [
    ("openclipart", "OPENCLIPART_ROOT", "apt-get install -y openclipart-png"),
    ("fashion-mnist", "FASHION_MNIST_ROOT", "apt-get install -y dataset-fashion-mnist")])
def test_missing_builtin_names_path_and_install_command(tmp_path, monkeypatch, name, attr, hint):
    monkeypatch.setattr(data, attr, tmp_path / "nowhere")
    with pytest.raises(data.DatasetError) as err:
        data.load_dataset(name, 32, data_dir=tmp_path)
    assert str(tmp_path / "nowhere") in str(err.value) and hint in str(err.value)


# ---------------------------------------------------------------- built-in cache (fake sources)

@pytest.fixture
def fake_clipart(tmp_path, monkeypatch) -> Path:
    """Two classes, nested folders, symlinked duplicates and two unreadable files."""
    root = tmp_path / "openclipart"
    for k in range(12):
        solid(root / "alpha" / "deep" / "er" / f"a{k:02d}.png", (k * 20, 0, 0), size=(30 + k, 20))
    for k in range(9):
        solid(root / "beta" / f"b{k}.png", (0, 0, 10 + k))
    half_transparent(root / "beta" / "b_alpha.png", opaque=BLUE)
    corrupt_png(root / "beta" / "zz_corrupt.png")
    (root / "beta" / "zz_empty.png").write_bytes(b"")
    os.symlink(root / "alpha" / "deep" / "er" / "a00.png", root / "beta" / "link_to_a00.png")
    # sorts before its target (aa < beta), so the file counts once, under class "aa_first"
    (root / "aa_first").mkdir()
    os.symlink(root / "beta" / "b0.png", root / "aa_first" / "link_to_b0.png")
    monkeypatch.setattr(data, "OPENCLIPART_ROOT", root)
    return root


def test_fake_openclipart_build(tmp_path, fake_clipart):
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\) of 24.*zz_corrupt"):
        ds = data.load_dataset("openclipart", 8, split="all", data_dir=tmp_path / "c", progress=False)
    assert ds.classes == ["aa_first", "alpha", "beta"] and ds.num_classes == 3
    assert len(ds) == 22 and ds.num_skipped == 2  # 24 distinct files, the 2 links deduplicated
    assert torch.bincount(ds.labels).tolist() == [1, 12, 9]
    assert ds.sources[0] == "aa_first/link_to_b0.png" and "beta/b0.png" not in ds.sources
    assert ds.images.shape == (22, 3, 8, 8) and ds.images.dtype == torch.uint8
    img, label = ds[ds.sources.index("alpha/deep/er/a05.png")]
    assert label == 1 and (img.permute(1, 2, 0) == torch.tensor((100, 0, 0), dtype=torch.uint8)).all()
    img = ds[ds.sources.index("beta/b_alpha.png")][0]
    assert img[:, :, :2].min() >= 250 and img[0, :, 6:].max() <= 5  # white left, blue right
    assert img[2].min() == 255  # blue and white share B=255: a dark fringe would lower it
    tr = data.load_dataset("openclipart", 8, split="train", data_dir=tmp_path / "c")
    ev = data.load_dataset("openclipart", 8, split="eval", data_dir=tmp_path / "c")
    assert torch.bincount(ev.labels, minlength=3).tolist() == [0, 1, 1]  # 10% per class, >= 1 if n >= 2
    assert len(tr) + len(ev) == 22 and not set(tr.sources) & set(ev.sources)
    with pytest.warns(UserWarning):
        again = data.load_dataset("openclipart", 8, split="eval", data_dir=tmp_path / "other")
    assert again.sources == ev.sources  # the held-out set is a fixed function of the file list


def test_cache_is_reused(tmp_path, fake_clipart, monkeypatch):
    with pytest.warns(UserWarning):
        first = data.load_dataset("openclipart", 8, split="all", data_dir=tmp_path, progress=False)
    assert (tmp_path / "openclipart-8px.pt").exists()
    monkeypatch.setattr(data, "_build_openclipart", lambda *a: pytest.fail("cache not reused"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = data.load_dataset("openclipart", 8, split="all", data_dir=tmp_path)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)


def test_stale_cache_is_rebuilt(tmp_path, fake_clipart, monkeypatch):
    with pytest.warns(UserWarning):
        n0 = len(data.load_dataset("openclipart", 8, split="all", data_dir=tmp_path, progress=False))
    solid(fake_clipart / "alpha" / "new.png", GREEN)  # the source list changed
    with pytest.warns(UserWarning) as record:
        ds = data.load_dataset("openclipart", 8, split="all", data_dir=tmp_path, progress=False)
    assert any("stale" in str(w.message) for w in record)
    assert len(ds) == n0 + 1 and "alpha/new.png" in ds.sources
    monkeypatch.setattr(data, "CACHE_VERSION", data.CACHE_VERSION + 1)  # the format changed
    with pytest.warns(UserWarning) as record:
        data.load_dataset("openclipart", 8, split="all", data_dir=tmp_path, progress=False)
    assert any("stale" in str(w.message) for w in record)
    assert torch.load(tmp_path / "openclipart-8px.pt", weights_only=True)["key"]["version"] \
        == data.CACHE_VERSION


def test_truncated_cache_is_rebuilt_with_warning(tmp_path, fake_clipart):
    with pytest.warns(UserWarning):
        first = data.load_dataset("openclipart", 8, split="all", data_dir=tmp_path, progress=False)
    cache = tmp_path / "openclipart-8px.pt"
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    with pytest.warns(UserWarning) as record:
        ds = data.load_dataset("openclipart", 8, split="all", data_dir=tmp_path, progress=False)
    assert any(re.search(r"(?s)cache .* is unreadable.*rebuilding", str(w.message)) for w in record)
    assert torch.equal(ds.images, first.images)
    assert torch.load(cache, weights_only=True)["key"]["dataset"] == "openclipart"


def test_failed_build_or_write_leaves_no_file(tmp_path, fake_clipart, monkeypatch):
    calls = []

    def flaky(task):
        calls.append(task)
        if len(calls) == 5:
            raise KeyboardInterrupt  # e.g. the user interrupts midway
        return [np.zeros((r, r, 3), np.uint8) for r in task[1]]  # one array per resolution asked

    monkeypatch.setattr(data, "_decode_task", flaky)
    with pytest.raises(KeyboardInterrupt):
        data.load_dataset("openclipart", 8, data_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())

    def half_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(data.torch, "save", half_save)
    with pytest.raises(OSError, match="disk full"):
        data.load_dataset("openclipart", 8, data_dir=tmp_path / "c", progress=False)
    assert list((tmp_path / "c").iterdir()) == []  # neither the cache nor the temporary file


def write_idx(path: Path, arr: np.ndarray) -> None:
    magic = (0x08 << 8) | arr.ndim
    head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def test_fake_fashion_mnist(tmp_path, monkeypatch):
    src = tmp_path / "fm"
    src.mkdir()
    imgs = np.zeros((7, 28, 28), np.uint8)
    imgs[:, :, :] = np.arange(7)[:, None, None] * 30  # solid grey levels 0, 30, ..., 180
    write_idx(src / "train-images-idx3-ubyte.gz", imgs[:4])
    write_idx(src / "train-labels-idx1-ubyte.gz", np.array([9, 0, 3, 3]))
    write_idx(src / "t10k-images-idx3-ubyte.gz", imgs[4:])
    write_idx(src / "t10k-labels-idx1-ubyte.gz", np.array([1, 2, 8]))
    monkeypatch.setattr(data, "FASHION_MNIST_ROOT", src)
    for res in (8, 32):
        tr = data.load_dataset("fashion-mnist", res, "train", data_dir=tmp_path, progress=False)
        ev = data.load_dataset("fashion-mnist", res, "eval", data_dir=tmp_path, progress=False)
        assert len(tr) == 4 and len(ev) == 3 and tr.num_classes == 10
        assert tr.classes[9] == "Ankle boot" and tr.labels.tolist() == [9, 0, 3, 3]
        assert ev.labels.tolist() == [1, 2, 8]
        img, label = ev[2]
        assert img.shape == (3, res, res) and label == 8 and (img == 180).all()  # constant stays
        assert tr.images.shape == (4, 3, res, res) and (tr.images[3] == 90).all()
    write_idx(src / "t10k-labels-idx1-ubyte.gz", np.zeros((3, 28, 28)))  # wrong kind of file
    with pytest.raises(data.DatasetError, match="t10k-labels"):
        data.load_dataset("fashion-mnist", 16, data_dir=tmp_path, progress=False)


# ---------------------------------------------------------------- real Debian datasets

@pytest.mark.slow
@pytest.mark.skipif(not data.OPENCLIPART_ROOT.is_dir(),
                    reason="openclipart absent: apt-get install -y openclipart-png")
def test_real_openclipart_counts():
    kw = dict(resolution=32, data_dir=REPO_DATA, progress=False)
    full = data.load_dataset("openclipart", split="all", **kw)
    train = data.load_dataset("openclipart", split="train", **kw)
    ev = data.load_dataset("openclipart", split="eval", **kw)
    assert full.num_classes == 22 and full.classes[0] == "animals" and full.classes[-1] == "unsorted"
    assert 6890 <= len(full) <= 6900 and len(full) + full.num_skipped == 6900
    assert len(train) + len(ev) == len(full) and 0.09 < len(ev) / len(full) < 0.11
    assert torch.bincount(ev.labels, minlength=22).min() >= 1
    assert full.images.shape == (len(full), 3, 32, 32) and full.images.dtype == torch.uint8
    assert full.images.float().mean() > 150  # clip art on white backgrounds


@pytest.mark.skipif(not (data.FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").exists(),
                    reason="fashion-mnist absent: apt-get install -y dataset-fashion-mnist")
def test_real_fashion_mnist_counts():
    train = data.load_dataset("fashion-mnist", 32, "train", data_dir=REPO_DATA, progress=False)
    ev = data.load_dataset("fashion-mnist", 32, "eval", data_dir=REPO_DATA, progress=False)
    assert len(train) == 60_000 and len(ev) == 10_000 and train.num_classes == 10
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(ev.labels).tolist() == [1000] * 10
    img, label = train[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and label == 9  # first item: ankle boot
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])


_PARENT = os.getpid()


def _dying_decode(task):  # module level: the pool pickles it by name
    if task[0] == "boom" and os.getpid() != _PARENT:
        os._exit(9)  # as if killed
    return np.full((1, 1, 3), task[1], dtype=np.uint8)


def test_a_decoding_process_killed_midway_loses_nothing(monkeypatch):
    """The out-of-memory killer taking a pool worker (seen on a huge openclipart image while training
    jobs held memory) used to hang the cache build forever; now the rest is decoded in-process."""
    monkeypatch.setattr(data, "_decode_task", _dying_decode)
    monkeypatch.setattr(data, "BUILD_WORKERS", 2)
    tasks = [(f"f{i}", i) for i in range(100)]
    tasks[70] = ("boom", 70)
    with pytest.warns(UserWarning, match="a decoding process died"):
        got = list(data._decode_all(tasks))
    assert [int(a[0, 0, 0]) for a in got] == list(range(100))


def test_one_decoding_pass_gives_each_resolution_what_its_own_build_gives(tmp_path, fake_clipart, monkeypatch):
    """build_caches decodes each file once for every resolution it is asked (a JPEG once per size,
    since its draft mode depends on the size): the caches must equal those built one at a time."""
    g = np.random.default_rng(0)
    Image.fromarray(g.integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(fake_clipart / "alpha" / "noise.png")
    Image.fromarray(g.integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(fake_clipart / "beta" / "noise.jpg", quality=90)
    with pytest.warns(UserWarning, match="skipped 2"):
        both = data.build_caches("openclipart", (8, 16), tmp_path / "both", progress=False)
    for res in (8, 16):
        with pytest.warns(UserWarning, match="skipped 2"):
            alone = data.build_caches("openclipart", (res,), tmp_path / f"alone{res}", progress=False)[res]
        assert torch.equal(both[res]["images"], alone["images"]) and both[res]["sources"] == alone["sources"]
        assert both[res]["images"].shape[-1] == res and both[res]["key"] == alone["key"]
        for path in ("alpha/noise.png", "beta/noise.jpg"):  # each file as load_rgb decodes it alone
            i = alone["sources"].index(path)
            want = data.load_rgb(fake_clipart / path, res, center_crop="square")
            assert np.array_equal(both[res]["images"][i].permute(1, 2, 0).numpy(), want)
    monkeypatch.setattr(data, "_build_openclipart", lambda *a: pytest.fail("caches not reused"))
    again = data.build_caches("openclipart", (16, 8), tmp_path / "both", progress=False)
    assert torch.equal(again[8]["images"], both[8]["images"])


def test_the_scan_resolves_links_as_realpath_does(fake_clipart):
    os.symlink(fake_clipart / "alpha", fake_clipart / "zz_linked_dir")  # a class that is a linked folder
    classes, items = data._scan_openclipart(fake_clipart)
    assert "zz_linked_dir" in classes
    seen, want = set(), []
    for label, cls in enumerate(classes):
        for p in data._image_files(fake_clipart / cls):
            real = os.path.realpath(p)
            if real not in seen:
                seen.add(real)
                want.append((p.relative_to(fake_clipart).as_posix(), real, label))
    assert items == want and not any(rel.startswith("zz_linked_dir") for rel, _, _ in items)
