"""Image datasets for pixelrepa: two offline built-ins plus any ImageFolder tree.

Built-ins (`DATASETS`) are decoded once per resolution into a uint8 tensor cache
under ``data_dir`` so that every experiment sees bit-identical pixels and a fixed
train/eval split. ImageFolder trees (e.g. ImageNet) are decoded lazily per item
with the ADM centre crop, because they are too large to hold in memory.

Every image, whatever its source, goes through `load_rgb`, the single place where
odd modes, transparency, oversized and corrupt files are handled.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import multiprocessing as mp
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm  # not tqdm.auto: its widget needs ipywidgets under papermill

from .storage import read_cache, save_cache

DATASETS = ("openclipart", "fashion-mnist")
SPLITS = ("train", "eval", "all")
OPENCLIPART_ROOT = Path("/usr/share/openclipart/png")
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
INSTALL_HINT = {"openclipart": "apt-get install -y openclipart-png",
                "fashion-mnist": "apt-get install -y dataset-fashion-mnist"}
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Openclipart holds 16000x16000 and 20990x29700 RGBA renders (up to 623 Mpx, 2.5 GB
# decoded) that trip Pillow's bomb guard; we admit up to 2**30 px, refuse larger.
MAX_PIXELS = 1 << 30
CACHE_VERSION = 1  # bump whenever decoding changes: old caches then count as stale
EVAL_FRACTION = 0.1  # openclipart: share of each class held out for evaluation
BUILD_WORKERS = max(1, min(2, os.cpu_count() or 1))


class DatasetError(RuntimeError):
    """A dataset is missing, unknown or empty; the message says what to do."""


@contextlib.contextmanager
def _pixel_limit(limit: int) -> Iterator[None]:
    """Raise Pillow's bomb bound only while we decode, so callers keep the default."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _normalise_mode(im: Image.Image) -> Image.Image:
    """Return RGB, or RGBA when the image has any transparency (composited later,
    after resizing, because Pillow resizes RGBA premultiplied and that is far
    cheaper than compositing a 600 Mpx image)."""
    mode = im.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        # 16-bit greyscale (PNG gives 'I;16' or 'I'): scale 0..65535 -> 0..255
        # instead of letting convert() clip everything above 255 to white.
        arr = np.asarray(im).astype(np.float64)
        if mode != "F":
            arr = arr / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if "A" in mode or mode in ("La", "RGBa") or "transparency" in im.info:
        return im.convert("RGBA")
    return im if mode == "RGB" else im.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def _adm_center_crop(im: Image.Image, resolution: int) -> Image.Image:
    """ADM's `center_crop_arr`, kept step for step so ImageNet numbers stay comparable."""
    while min(*im.size) >= 2 * resolution:
        im = im.resize(tuple(x // 2 for x in im.size), resample=Image.BOX)
    scale = resolution / min(*im.size)
    im = im.resize(tuple(round(x * scale) for x in im.size), resample=Image.BICUBIC)
    left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
    return im.crop((left, top, left + resolution, top + resolution))


def load_rgb(path: str | Path, resolution: int, *,
             center_crop: Literal["adm", "square"] = "adm") -> np.ndarray:
    """Decode one file into an H x W x 3 uint8 array of side `resolution`.

    "adm": ADM centre crop, no JPEG draft (bit-compatible with guided-diffusion).
    "square": crop the long side centrally, JPEG draft and box `reduce` down to 3x
    the target, then LANCZOS, so multi-hundred-megapixel files stay fast.
    Transparency is composited on white. Raises on any unreadable input; the
    callers decide how to skip and report it.
    """
    return load_rgb_many(path, (resolution,), center_crop=center_crop)[0]


def load_rgb_many(path: str | Path, resolutions: tuple[int, ...], *,
                  center_crop: Literal["adm", "square"] = "adm") -> list[np.ndarray]:
    """`load_rgb` at each of ``resolutions``, decoding the file once where that gives the same arrays
    (every format but JPEG, whose draft mode depends on the target size: it is decoded per size)."""
    if center_crop not in ("adm", "square"):
        raise ValueError(f"center_crop must be 'adm' or 'square', got {center_crop!r}")
    out = {}
    for res in resolutions:
        if res in out:
            continue
        with _pixel_limit(MAX_PIXELS), Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ValueError(f"{im.width}x{im.height} exceeds MAX_PIXELS={MAX_PIXELS}")
            # only formats with a draft mode (JPEG) decode differently per target size
            shared = center_crop == "adm" or type(im).draft is Image.Image.draft
            if center_crop == "square" and not shared:
                im.draft(None, (res, res))
            im.load()  # decode errors (truncation, bad CRC) surface here
            img = _normalise_mode(im)
        for r in ([x for x in resolutions if x not in out] if shared else [res]):
            out[r] = _resize(img, r, center_crop)
    return [out[r] for r in resolutions]


def _resize(img: Image.Image, resolution: int, center_crop: str) -> np.ndarray:
    """A decoded, mode-normalised image cropped and resized to ``resolution`` (see `load_rgb`)."""
    if center_crop == "adm":
        img = _adm_center_crop(img, resolution)
    else:
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        box = (left, top, left + side, top + side)
        factor = side // (3 * resolution)
        # reduce(box)/crop read only pixels inside the square; resize(box=) would not.
        img = img.reduce(factor, box) if factor > 1 else img.crop(box)
        img = img.resize((resolution, resolution), Image.LANCZOS)
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img).convert("RGB")
    return np.array(img, dtype=np.uint8)


def to_model_range(img: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]; refuses floats so nothing is scaled twice."""
    if img.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects uint8 images, got {img.dtype}")
    return img.float() / 127.5 - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8, clamped and rounded (not truncated, which biases dark)."""
    return ((x.float() + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)


class ImageDataset(Dataset):
    """(uint8 3xRxR image, int label) pairs, either held in memory or decoded lazily.

    In-memory (built-ins): `images` is N x 3 x R x R uint8 (for fashion-mnist an
    expanded view of one grey channel, so it costs a third of the memory).
    Lazy (ImageFolder): an unreadable file is replaced by the next readable index,
    so training never crashes, and each skip raises a warning with a running count
    (per process: every DataLoader worker counts and reports its own skips).
    """

    def __init__(self, classes: list[str], labels: torch.Tensor, resolution: int, *,
                 images: torch.Tensor | None = None, paths: list[str] | None = None,
                 sources: list[str] | None = None, num_skipped: int = 0) -> None:
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.labels = labels.long()
        self.resolution = resolution
        self.images = images
        self.paths = paths
        self.sources = sources if sources is not None else paths
        self.num_skipped = num_skipped
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.images is not None:
            return self.images[index].contiguous(), int(self.labels[index])
        n = len(self)
        if not -n <= index < n:
            raise IndexError(index)  # plain `for x in ds` relies on this to stop
        j = index % n
        for _ in range(n):
            if j not in self._bad:
                try:
                    arr = load_rgb(self.paths[j], self.resolution, center_crop="adm")
                    return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), int(self.labels[j])
                except Exception as err:  # any decoder failure: skip, never crash training
                    self._bad.add(j)
                    self.num_skipped += 1
                    warnings.warn(f"skipped unreadable image {self.paths[j]} ({type(err).__name__}: "
                                  f"{err}); {self.num_skipped} image(s) skipped so far", stacklevel=2)
            j = (j + 1) % n
        raise DatasetError(f"no readable image among the {n} files of this dataset")


def _image_files(folder: Path) -> list[Path]:
    """Recursive, sorted, by extension only: os.walk reads file types from the
    directory entries, so indexing ImageNet costs no per-file stat or decode."""
    found = [Path(d) / f for d, _, files in os.walk(folder, followlinks=True)
             for f in files if os.path.splitext(f)[1].lower() in IMG_EXTENSIONS]
    return sorted(found)


def _image_folder(root: Path, resolution: int) -> ImageDataset:
    """Index an ImageFolder tree; `split` has no meaning here, the caller picks the
    root (ImageNet train/ vs val/). Empty class folders keep their index (so labels
    match the sorted folder names, as in ImageNet) but are reported."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"ImageFolder {root} has no class sub-folders (expected root/<class>/<image>)")
    paths, labels, empty = [], [], []
    for idx, cls in enumerate(classes):
        files = _image_files(root / cls)
        empty += [] if files else [cls]
        paths += [str(p) for p in files]
        labels += [idx] * len(files)
    if not paths:
        raise DatasetError(f"ImageFolder {root} contains no image files ({', '.join(IMG_EXTENSIONS)})")
    if empty:
        warnings.warn(f"ImageFolder {root}: {len(empty)} class folder(s) have no images and keep "
                      f"their label index with zero samples: {', '.join(empty[:5])}", stacklevel=3)
    return ImageDataset(classes, torch.tensor(labels, dtype=torch.long), resolution, paths=paths)


def _scan_openclipart(root: Path) -> tuple[list[str], list[tuple[str, str, int]]]:
    """(classes, [(relative path, real path, label)]) with symlinked duplicates dropped:
    a file counts once, under the class of its first occurrence in sorted path order."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    seen: set[str] = set()
    items, parents = [], {}
    for label, cls in enumerate(classes):
        for p in _image_files(root / cls):
            if os.path.islink(p):
                real = os.path.realpath(p)
            else:  # what realpath(p) gives, with one lstat instead of one per path component
                if p.parent not in parents:
                    parents[p.parent] = os.path.realpath(p.parent)
                real = os.path.join(parents[p.parent], p.name)
            if real not in seen:
                seen.add(real)
                items.append((p.relative_to(root).as_posix(), real, label))
    return classes, items


def _decode_task(task: tuple[str, tuple[int, ...]]) -> list[np.ndarray] | str:
    """Pool worker: the file's arrays at each resolution, or the error text (exceptions may not pickle)."""
    try:
        return load_rgb_many(task[0], task[1], center_crop="square")
    except Exception as err:
        return f"{type(err).__name__}: {err}"


def _decode_all(tasks: list[tuple[str, tuple[int, ...]]]) -> Iterator[list[np.ndarray] | str]:
    """`_decode_task` of every task, in order, on BUILD_WORKERS processes. A worker killed mid-way (the
    kernel's out-of-memory killer, on a huge image while other jobs hold memory) breaks the pool: what
    is left is then decoded here, one image at a time, instead of hanging or losing the work done."""
    done = 0
    if BUILD_WORKERS > 1 and len(tasks) >= 64:
        try:
            with ProcessPoolExecutor(BUILD_WORKERS, mp_context=mp.get_context()) as pool:
                for res in pool.map(_decode_task, tasks, chunksize=4):
                    yield res
                    done += 1
        except BrokenProcessPool:
            warnings.warn(f"openclipart: a decoding process died after {done} of {len(tasks)} images (out of "
                          f"memory?); decoding the rest in this process", stacklevel=3)
    for task in tasks[done:]:
        yield _decode_task(task)


def _hash_rank_split(labels: list[int], keys: list[str], num_classes: int) -> dict[str, torch.Tensor]:
    """Per class, hold out the EVAL_FRACTION items with the smallest sha1(relative path):
    a pure function of the file names, so it never depends on scan or worker order."""
    eval_idx: list[int] = []
    for c in range(num_classes):
        members = [i for i, y in enumerate(labels) if y == c]
        n_eval = 0 if len(members) < 2 else max(1, round(EVAL_FRACTION * len(members)))
        members.sort(key=lambda i: hashlib.sha1(keys[i].encode()).hexdigest())
        eval_idx += members[:n_eval]
    is_eval = torch.zeros(len(labels), dtype=torch.bool)
    is_eval[eval_idx] = True
    return {"train": torch.nonzero(~is_eval).flatten(), "eval": torch.nonzero(is_eval).flatten()}


def _build_openclipart(resolutions: tuple[int, ...], progress: bool) -> dict[int, dict]:
    """{resolution: cache payload}, every resolution from one decoding pass over the files."""
    classes, items = _scan_openclipart(OPENCLIPART_ROOT)
    tasks = [(real, tuple(resolutions)) for _, real, _ in items]
    images = {r: torch.empty(len(items), 3, r, r, dtype=torch.uint8) for r in resolutions}
    ok, bad = [], []
    desc = "openclipart " + " and ".join(f"{r}px" for r in resolutions)
    bar = tqdm(total=len(tasks), desc=desc, unit="img", disable=not progress)
    for i, res in enumerate(_decode_all(tasks)):
        if isinstance(res, str):
            bad.append(f"{items[i][0]} ({res})")
        else:
            for r, arr in zip(resolutions, res):
                images[r][len(ok)] = torch.from_numpy(arr).permute(2, 0, 1)
            ok.append(i)
        bar.update()
    bar.close()
    if bad:
        warnings.warn(f"openclipart: skipped {len(bad)} unreadable image(s) of {len(items)}, e.g. "
                      + "; ".join(bad[:3]), stacklevel=4)
    if not ok:
        raise DatasetError(f"no readable images under {OPENCLIPART_ROOT}")
    labels = [items[i][2] for i in ok]
    sources = [items[i][0] for i in ok]
    splits = _hash_rank_split(labels, sources, len(classes))
    return {r: {"images": images[r][: len(ok)].clone(), "labels": torch.tensor(labels, dtype=torch.long),
                "classes": classes, "sources": sources, "num_skipped": len(bad), "splits": splits}
            for r in resolutions}


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    head = int.from_bytes(raw[:4], "big")
    if head != magic:
        raise DatasetError(f"{path}: not an IDX file of the expected kind (magic {head:#x})")
    ndim = magic & 0xFF
    shape = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_files() -> dict[str, Path]:
    return {f"{s}-{kind}": FASHION_MNIST_ROOT / f"{s}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"
            for s in ("train", "t10k") for kind in ("images", "labels")}


def _build_fashion_mnist(resolution: int, progress: bool) -> dict:
    """Only one grey channel is cached; `_subset` expands it to RGB as a view."""
    files = _fashion_files()
    parts = {k: _read_idx(p, 0x803 if k.endswith("images") else 0x801) for k, p in files.items()}
    grey = np.concatenate([parts["train-images"], parts["t10k-images"]])
    labels = np.concatenate([parts["train-labels"], parts["t10k-labels"]])
    n_train = len(parts["train-labels"])
    out = torch.empty(len(grey), 1, resolution, resolution, dtype=torch.uint8)
    src = torch.from_numpy(grey.copy()).unsqueeze(1)
    for start in tqdm(range(0, len(src), 2048), desc=f"fashion-mnist {resolution}px",
                      unit="batch", disable=not progress):
        x = src[start:start + 2048].float()
        if resolution != x.shape[-1]:
            x = F.interpolate(x, size=(resolution, resolution), mode="bicubic",
                              align_corners=False, antialias=True)
        out[start:start + 2048] = x.round().clamp(0, 255).to(torch.uint8)
    idx = torch.arange(len(grey))
    sources = [f"train/{i}" for i in range(n_train)] + [f"t10k/{i}" for i in range(len(grey) - n_train)]
    return {"images": out, "labels": torch.from_numpy(labels.astype(np.int64)), "sources": sources,
            "classes": list(FASHION_MNIST_CLASSES), "num_skipped": 0,
            "splits": {"train": idx[:n_train], "eval": idx[n_train:]}}


def _source_key(name: str, resolution: int) -> dict:
    """What the cache was built from; any difference means the cache is stale."""
    if name == "openclipart":
        _, items = _scan_openclipart(OPENCLIPART_ROOT)
        listing = [f"{rel}\0{os.path.getsize(real) if os.path.exists(real) else -1}" for rel, real, _ in items]
    else:
        listing = [f"{p.name}\0{p.stat().st_size}" for p in _fashion_files().values()]
    digest = hashlib.sha256("\n".join(listing).encode()).hexdigest()
    return {"dataset": name, "resolution": resolution, "version": CACHE_VERSION,
            "num_files": len(listing), "sha256": digest}


def _subset(data: dict, split: str, resolution: int) -> ImageDataset:
    idx = data["splits"][split] if split != "all" else torch.arange(len(data["labels"]))
    images = data["images"].index_select(0, idx)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    sources = [data["sources"][i] for i in idx.tolist()]
    return ImageDataset(data["classes"], data["labels"][idx], resolution, images=images,
                        sources=sources, num_skipped=data["num_skipped"])


def _check_resolution(resolution) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8 or resolution % 2:
        raise ValueError(f"resolution must be an even int >= 8, got {resolution!r}")


def build_caches(name: str, resolutions: tuple[int, ...], data_dir: str | Path = "data",
                 progress: bool = True) -> dict[int, dict]:
    """{resolution: the built-in dataset's cache}, read, or built where missing or stale: openclipart's
    missing resolutions all from one decoding pass (a study needs two; each file is decoded once)."""
    if name not in DATASETS:
        raise DatasetError(f"unknown built-in dataset {name!r}: built-in names are {', '.join(DATASETS)}")
    root = OPENCLIPART_ROOT if name == "openclipart" else FASHION_MNIST_ROOT
    missing = [p for p in ([root] if name == "openclipart" else _fashion_files().values())
               if not p.exists()]
    if missing:
        raise DatasetError(f"dataset {name!r} not found: {missing[0]} does not exist; "
                           f"install it with `{INSTALL_HINT[name]}`")
    for res in resolutions:
        _check_resolution(res)
    out, keys = {}, {}
    for res in dict.fromkeys(resolutions):
        keys[res] = _source_key(name, res)
        out[res] = read_cache(Path(data_dir) / f"{name}-{res}px.pt", keys[res])
    missing = tuple(r for r, d in out.items() if d is None)
    if missing:
        built = _build_openclipart(missing, progress) if name == "openclipart" else \
            {r: _build_fashion_mnist(r, progress) for r in missing}
        for r in missing:
            out[r] = save_cache(Path(data_dir) / f"{name}-{r}px.pt", keys[r], built[r])
    return out


def load_dataset(name: str, resolution: int, split: str = "train",
                 data_dir: str | Path = "data", progress: bool = True) -> ImageDataset:
    """Load a built-in (`DATASETS`, cached under `data_dir`) or an ImageFolder path.

    `split` is "train", "eval" or "all". Built-ins have a fixed held-out eval split
    (openclipart: 10% of each class by path hash; fashion-mnist: the official t10k
    set). For an ImageFolder `split` is ignored: pass the train or val root instead.
    """
    _check_resolution(resolution)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name in DATASETS:
        data = build_caches(name, (resolution,), data_dir, progress)[resolution]
        return _subset(data, split, resolution)
    path = Path(name).expanduser()
    if path.is_dir():
        return _image_folder(path, resolution)
    if path.exists():
        raise DatasetError(f"{path} is a file, not an ImageFolder directory (root/<class>/<image>)")
    raise DatasetError(f"unknown dataset {name!r}: built-in names are {', '.join(DATASETS)}, or pass "
                       f"the path of an ImageFolder directory, but path {str(path)!r} does not exist")


def take(ds: ImageDataset, n: int, seed: int = 0) -> ImageDataset:
    """The first ``n`` images of a seeded permutation of an in-memory dataset (classes kept, so labels
    mean the same): a small training set that many passes fit into, the same at every resolution."""
    if ds.images is None:
        raise DatasetError("take() needs an in-memory (built-in) dataset; for an ImageFolder, make a "
                           "smaller folder")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(ds):
        raise ValueError(f"cannot take {n!r} images from a dataset of {len(ds)}")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return ImageDataset(ds.classes, ds.labels[idx], ds.resolution, images=ds.images[idx],
                        sources=[ds.sources[i] for i in idx.tolist()], num_skipped=ds.num_skipped)
