"""Sample-quality metrics, all computed by torch-fidelity, with no network: `compute_metrics` (FID,
KID and IS of images through `calculate_metrics`), and the study's scores from features computed
once per image (`score`, `memorisation`, `evaluate_model`). Which network gives the features, and
with which weights, is `extractors`' (the offline Inception, the encoders registered for FD).

Reference features of real images are cached by torch-fidelity itself (`input2_cache_name`) under
data/fidelity_cache/, in files named by a hash of everything they depend on, so a stale or foreign
cache can never be read.
"""
from __future__ import annotations

import glob
import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits
import torch_fidelity
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.utils import get_featuresdict_from_dataset

from . import extractors
from .data import load_dataset
from .extractors import FD_KEYS, INCEPTION, ISC_NOTE
from .storage import read_cache, record_files, record_problem, save_cache

FORMAT_VERSION = 1  # bump when the reference-cache key or its contents change


class Images(Dataset):
    """uint8 3 x H x W tensors, as torch-fidelity wants, from an N x 3 x H x W uint8 tensor or from a
    dataset of (image, label) pairs; `n` keeps the first n."""

    def __init__(self, source: torch.Tensor | Dataset, n: int | None = None) -> None:
        if isinstance(source, torch.Tensor) and (source.dtype != torch.uint8 or source.ndim != 4
                                                 or source.shape[1] != 3):
            raise TypeError(f"expected uint8 N x 3 x H x W images, got {source.dtype} {tuple(source.shape)}")
        if isinstance(source, torch.Tensor):
            source = source.cpu()  # torch-fidelity's loader pins batches and moves them itself
        self.source, self.n = source, len(source) if n is None else min(n, len(source))
        if self.n < 2:
            raise ValueError(f"need at least 2 images, got {self.n}")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(i)
        item = self.source[i]
        return (item[0] if isinstance(item, tuple) else item).contiguous()

    def sha256(self) -> str:
        h = hashlib.sha256()
        for i in range(self.n):
            h.update(self[i].numpy().tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class RefStats:
    """Real images and the key of their cached features (computed on first use by compute_metrics)."""
    key: dict  # dataset, resolution, split, n, sha256 of the pixels, extractor, weights, version
    images: Images
    cache_root: Path

    @property
    def cache_name(self) -> str:
        """torch-fidelity's input2_cache_name: readable, and unique to the whole key."""
        k, digest = self.key, hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(k["dataset"]).name) or "images"
        return f"{slug}-{k['resolution']}px-{k['split']}-n{k['n']}-{digest}"

    def describe(self) -> str:
        return _describe(self.key)

    @property
    def key_file(self) -> Path:
        return self.cache_root / f"{self.cache_name}.key.json"

    def cache_files(self) -> list[Path]:
        return sorted(self.cache_root.glob(f"{glob.escape(self.cache_name)}-*.pt"))


def _describe(key) -> str:
    try:
        return "{dataset} at {resolution} px ({split} split, N={n}, {extractor})".format(**key)
    except (KeyError, TypeError, AttributeError):
        return f"an unknown reference ({str(key)[:80]})"


def _legacy_cache_problem(ref: RefStats, files: list[Path]) -> str | None:
    """A cache written before key files existed: it must load and hold features of N images."""
    for f in files:
        try:
            obj = torch.load(f, map_location="cpu", weights_only=False)
        except Exception as err:
            return f"{f.name} is unreadable ({type(err).__name__}: {str(err)[:120]})"
        if "-features-" in f.name and (not hasattr(obj, "shape") or obj.shape[0] != ref.key["n"]):
            return f"{f.name} holds features of {getattr(obj, 'shape', ['?'])[0]} images, not {ref.key['n']}"
    return None


def check_reference_cache(ref: RefStats) -> bool:
    """torch-fidelity reads whatever file carries the cache name. Ours are vouched for by a key file
    written beside them (the full key and each file's size): a cache whose key file names another
    dataset, resolution, split, N or extractor, whose files changed size (truncated, replaced), or
    (made before key files) that does not load or holds another number of images, is reported with a
    warning and deleted, so that it is rebuilt. Returns True if such a cache was deleted."""
    files, kf = ref.cache_files(), ref.key_file
    if not files:
        kf.unlink(missing_ok=True)
        return False
    problem = record_problem(kf, ref.key, files, _describe) if kf.exists() else _legacy_cache_problem(ref, files)
    if problem is None:
        return False
    warnings.warn(f"reference statistics cache {ref.cache_root / ref.cache_name}-*: {problem}; deleted, rebuilding",
                  stacklevel=3)
    for f in files:
        f.unlink(missing_ok=True)
    kf.unlink(missing_ok=True)
    return True


def _record_reference_cache(ref: RefStats) -> None:
    files = ref.cache_files()
    if files:
        record_files(ref.key_file, ref.key, files)


def reference_stats(dataset: str, resolution: int, split: str = "eval", n: int | None = None, *,
                    feature_extractor: str = INCEPTION, weights: str | Path | None = None,
                    data_dir: str | Path = "data") -> RefStats:
    """Reference for `dataset` (a built-in name or ImageFolder path) at `resolution`: the first `n`
    images of `split` (default: all), their features cached under `data_dir`/fidelity_cache/."""
    images = Images(load_dataset(dataset, resolution, split, data_dir=data_dir, progress=False), n)
    key = {"dataset": str(dataset), "resolution": resolution, "split": split, "n": len(images),
           "sha256": images.sha256(), "extractor": feature_extractor,
           "weights": extractors.weights_id(feature_extractor,
                                            extractors.resolve_weights(feature_extractor, weights, data_dir)[0]),
           "version": FORMAT_VERSION}
    return RefStats(key, images, Path(data_dir) / "fidelity_cache")


def features(images: torch.Tensor, feature_extractor: str = INCEPTION, *, data_dir="data",
             batch_size: int = 64, device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, D) features that torch-fidelity's FID would use for uint8 images (N, 3, H, W): Inception's
    2048-d pool, or the token-mean of an encoder registered in `extractors` (e.g. 'effnet-lite0')."""
    weights_path, _ = extractors.resolve_weights(feature_extractor, None, data_dir)
    cuda = torch.device(device).type == "cuda"
    net, layer = extractors.build(feature_extractor, weights_path, cuda)
    return get_featuresdict_from_dataset(Images(images), net, batch_size, cuda, True, False)[layer]


def compute_metrics(fake: torch.Tensor, real: torch.Tensor | None = None, *, ref_stats: RefStats | None = None,
                    dataset: str | None = None, kid: bool = True, feature_extractor: str = INCEPTION,
                    weights: str | Path | None = None, data_dir: str | Path = "data", batch_size: int = 64,
                    device: str | torch.device = "cpu") -> dict:
    """FID (`fid`), KID and IS of uint8 N x 3 x H x W samples against `real` images or `ref_stats`;
    with an encoder as `feature_extractor`, its Frechet distance (`fd_effnet`, `fd_dinov2`) instead.
    `dataset`, if given, must be the one `ref_stats` was built from."""
    if (real is None) == (ref_stats is None):
        raise ValueError("pass exactly one of `real` (uint8 images) and `ref_stats` (reference_stats(...))")
    fakes = Images(fake)
    weights_path, has_logits = extractors.resolve_weights(feature_extractor, weights, data_dir)
    if ref_stats is not None:
        k, size = ref_stats.key, tuple(fakes[0].shape[-2:])
        if size != (k["resolution"],) * 2:
            raise ValueError(f"reference statistics are for {ref_stats.describe()} but the samples are "
                             f"{size[0]}x{size[1]} px: use reference_stats({k['dataset']!r}, {size[0]})")
        if dataset is not None and dataset != k["dataset"]:
            raise ValueError(f"reference statistics are for {ref_stats.describe()}, not {dataset!r}: "
                             f"use reference_stats({dataset!r}, {k['resolution']})")
        if (feature_extractor, extractors.weights_id(feature_extractor, weights_path)) != (k["extractor"], k["weights"]):
            raise ValueError(f"reference statistics for {ref_stats.describe()} were computed with other "
                             f"feature-extractor weights than {feature_extractor!r} {weights_path or ''}")
        check_reference_cache(ref_stats)
    reals = ref_stats.images if ref_stats is not None else Images(real)
    inception = feature_extractor == INCEPTION
    kid = kid and inception
    cache = {} if ref_stats is None else {"cache": True, "cache_root": str(ref_stats.cache_root),
                                          "input2_cache_name": ref_stats.cache_name}
    # numpy's OpenBLAS threads spin-wait on a busy 2-core CPU: the 2048 x 2048 eigendecomposition
    # inside FID took 29 s with 2 threads against 2.4 s with 1
    with threadpool_limits(limits=1, user_api="blas"):
        m = torch_fidelity.calculate_metrics(
            input1=fakes, input2=reals, fid=True, kid=kid, isc=inception and has_logits,
            feature_extractor=feature_extractor, feature_extractor_weights_path=weights_path,
            kid_subset_size=min(1000, len(fakes), len(reals)), isc_splits=max(1, min(10, len(fakes) // 2)),
            batch_size=batch_size, cuda=torch.device(device).type == "cuda", datasets_download=False,
            save_cpu_ram=True, verbose=False, **{"cache": False, **cache})  # save_cpu_ram: no loader workers
    if ref_stats is not None:
        _record_reference_cache(ref_stats)
    out = {"n_fake": len(fakes), "n_real": len(reals), "feature_extractor": feature_extractor}
    if not inception:
        return out | {FD_KEYS.get(feature_extractor, f"fd_{feature_extractor}"): m[torch_fidelity.KEY_METRIC_FID]}
    out |= {"fid": m[torch_fidelity.KEY_METRIC_FID], "kid_mean": m.get(torch_fidelity.KEY_METRIC_KID_MEAN),
            "kid_std": m.get(torch_fidelity.KEY_METRIC_KID_STD), "weights": Path(weights_path).name}
    if has_logits:
        return out | {"isc_mean": m[torch_fidelity.KEY_METRIC_ISC_MEAN], "isc_std": m[torch_fidelity.KEY_METRIC_ISC_STD]}
    return out | {"isc_mean": None, "isc_std": None, "isc_note": ISC_NOTE}


# ----------------------------------------------------------------------------- scores from features
# The study scores samples from their Inception features, computed once per image: the reference
# set's features are cached, and FID, KID and precision/recall all come from torch-fidelity's own
# feature-level functions (the same arithmetic as calculate_metrics, without recomputing features).

KID_SUBSETS = 100
PRC_NEIGHBORHOOD = 3  # k of the k-NN balls (Kynkaanniemi et al. 2019; torch-fidelity's default)


def split_features(dataset: str, resolution: int, split: str = "eval", *, data_dir: str | Path = "data",
                   batch_size: int = 64, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Inception pool features (N, 2048) and labels (N,) of every image of a split of ``dataset``,
    computed once and cached under ``data_dir``/fidelity_cache/ with the key of what they depend on
    (pixels, split, resolution, network weights): a stale cache is rebuilt, never read."""
    ds = load_dataset(dataset, resolution, split, data_dir=data_dir, progress=False)
    images = Images(ds)
    weights_path, _ = extractors.resolve_weights(INCEPTION, None, data_dir)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(dataset)).name) or "images"
    path, key = _feature_cache(f"{slug}-{resolution}px-{split}", images, weights_path, data_dir,
                               {"dataset": str(dataset), "resolution": resolution, "split": split})
    cached = read_cache(path, key)
    if cached is None:
        if ds.images is not None:
            feats = features(ds.images, data_dir=data_dir, batch_size=batch_size, device=device)
        else:  # an ImageFolder: decoded lazily, in torch-fidelity's loader
            net, layer = extractors.build(INCEPTION, weights_path, torch.device(device).type == "cuda")
            feats = get_featuresdict_from_dataset(images, net, batch_size, torch.device(device).type == "cuda",
                                                  True, False)[layer]
        cached = save_cache(path, key, {"features": feats.float(), "labels": ds.labels.clone()})
    return cached["features"], cached["labels"]


def _feature_cache(stem: str, images: Images, weights_path, data_dir, extra: dict) -> tuple[Path, dict]:
    """Where Inception features of ``images`` are cached, and the key of what they depend on (the pixels,
    the network's weights, this format)."""
    key = extra | {"n": len(images), "sha256": images.sha256(), "extractor": INCEPTION,
                   "weights": extractors.weights_id(INCEPTION, weights_path), "version": FORMAT_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(data_dir) / "fidelity_cache" / f"{stem}-inception-{digest}.pt", key


def image_features(images: torch.Tensor, stem: str, *, data_dir: str | Path = "data", batch_size: int = 64,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Inception pool features (N, 2048) of uint8 images, computed once and cached under
    ``data_dir``/fidelity_cache/``stem``-... with the key of the pixels and the network (as `split_features`)."""
    weights_path, _ = extractors.resolve_weights(INCEPTION, None, data_dir)
    path, key = _feature_cache(stem, Images(images), weights_path, data_dir, {})
    cached = read_cache(path, key)
    if cached is None:
        feats = features(images, data_dir=data_dir, batch_size=batch_size, device=device)
        cached = save_cache(path, key, {"features": feats.float()})
    return cached["features"]


def score(fake: torch.Tensor, real: torch.Tensor, *, prc: bool = True, kid_subset_size: int | None = None,
          seed: int = 0) -> dict:
    """FID, KID (mean and std over random subsets) and precision/recall of generated features ``fake``
    against real features ``real`` (both (N, D), e.g. from `features`), through torch-fidelity."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric
    fake, real = fake.double(), real.double()
    if len(fake) < 2 or len(real) < 2:
        raise ValueError(f"need at least 2 generated and 2 real features, got {len(fake)} and {len(real)}")
    with threadpool_limits(limits=1, user_api="blas"):  # see compute_metrics
        fid = fid_statistics_to_metric(fid_features_to_statistics(fake), fid_features_to_statistics(real), False)
        kid = kid_features_to_metric(fake, real, kid_subsets=KID_SUBSETS, rng_seed=seed, verbose=False,
                                     kid_subset_size=min(kid_subset_size or 1000, len(fake), len(real)))
        out = {"fid": float(fid[torch_fidelity.KEY_METRIC_FID]),
               "kid_mean": float(kid[torch_fidelity.KEY_METRIC_KID_MEAN]),
               "kid_std": float(kid[torch_fidelity.KEY_METRIC_KID_STD]), "n_fake": len(fake), "n_real": len(real)}
        if prc:
            pr = prc_features_to_metric(fake.float(), real.float(), prc_neighborhood=PRC_NEIGHBORHOOD,
                                        save_cpu_ram=True, verbose=False)
            out |= {"precision": float(pr[torch_fidelity.KEY_METRIC_PRECISION]),
                    "recall": float(pr[torch_fidelity.KEY_METRIC_RECALL])}
    return out


def memorisation(fake: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor, seed: int = 0) -> dict:
    """Nearest-neighbour distances (in the features' space) from each sample to the training images and
    to held-out images, with the training set cut at random to the held-out set's size (a larger set is
    closer by chance alone). A model that generalises is as close to one as to the other
    (``closer_to_train`` near 0.5, ``nn_ratio`` near 1); one that copies its training images is closer
    to them (``closer_to_train`` towards 1, ``nn_ratio`` below 1)."""
    n = min(len(train), len(heldout))
    if n < 1 or len(fake) < 1:
        raise ValueError("memorisation needs samples, training and held-out features")
    g = torch.Generator().manual_seed(seed)
    train = train[torch.randperm(len(train), generator=g)[:n]].float()
    heldout = heldout[torch.randperm(len(heldout), generator=g)[:n]].float()
    d_train = torch.cdist(fake.float(), train).min(dim=1).values
    d_held = torch.cdist(fake.float(), heldout).min(dim=1).values
    return {"nn_train": float(d_train.median()), "nn_heldout": float(d_held.median()),
            "nn_ratio": float(d_train.median() / d_held.median()),
            "closer_to_train": float((d_train < d_held).float().mean()), "nn_n": n}


def evaluate_model(net: nn.Module, *, dataset: str, resolution: int, num_classes: int, n: int, sampler,
                   sample_seed: int, data_dir: str | Path = "data", n_real: int = 0,
                   train_features: torch.Tensor | None = None, device: str | torch.device = "cpu",
                   progress: bool = False) -> dict:
    """The study's one evaluation: ``n`` samples of ``net`` whose labels follow the reference set's class
    frequencies (the held-out split, or its first ``n_real`` images), their noise drawn from
    ``sample_seed`` alone (independent of the training seed), scored by `score`; with
    ``train_features``, the `memorisation` check against them too. The record says what it measured."""
    from .flow import generate, matched_labels
    ref, ref_labels = split_features(dataset, resolution, "eval", data_dir=data_dir, device=device)
    if n_real:
        ref, ref_labels = ref[:n_real], ref_labels[:n_real]
    labels = matched_labels(n, torch.bincount(ref_labels, minlength=num_classes))
    imgs, _ = generate(net, n, num_classes, (3, resolution, resolution), sampler, seed=sample_seed, device=device,
                       progress=progress, labels=labels)
    fake = features(imgs, data_dir=data_dir, device=device)
    out = score(fake, ref) | {"n": n, "sample_seed": sample_seed, "sample_steps": sampler.steps,
                              "cfg_scale": sampler.cfg_scale,
                              "reference": f"{Path(str(dataset)).name} eval split at {resolution} px (N={len(ref)})"}
    if train_features is not None:
        out |= memorisation(fake, train_features, ref, seed=sample_seed)
    return out

