"""The paper's FID protocol on any checkpoint: class-balanced samples, Inception through torch-fidelity,
scored against reference statistics.

    python -m pixelrepa.evaluate runs/pixelrepa-b16 --ref_stats fid_stats/jit_in256_stats.npz --cfg_scale 3.1
    torchrun --nproc_per_node=8 -m pixelrepa.evaluate checkpoint-last.pth --ref_stats jit_in256_stats.npz \\
        --cfg_sweep 2.8 3.0 3.2 --save_npz true

A checkpoint is a pixelrepa run directory or ``ckpt-*.pt`` file, or a reference checkpoint
(``checkpoint-last.pth``, read through `interop`). By default 50 samples per class for every class
(50,000 for ImageNet), from the first EMA (``--ema ema0``: decay 0.9999, the reference's ``model_ema1``),
Heun with 50 steps, guidance ``cfg_scale`` (default: the run's) inside ``cfg_interval`` (0.1, 1.0),
under bf16 autocast on CUDA as the reference samples. Labels cycle through the classes, so every
class has ``per_class`` samples and any prefix is balanced too.

Under torchrun the samples are cut into chunks of ``batch_size`` by their global index; chunk k goes
to rank k mod world and draws its noise from (seed, its first index), so the images do not depend on
the number of processes. Each rank runs Inception on its own chunks; the features are gathered and
rank 0 scores them with torch-fidelity's own functions: FID against ``--ref_stats`` (an .npz with
``mu`` and ``sigma``, e.g. the reference's ``jit_in256_stats.npz``) or the images of ``--ref_images``
(``--write_ref_stats PATH`` keeps their statistics for next time), and the Inception Score where the
Inception weights have their logits (torch-fidelity's standard file, see extractors.inception_weights).
Each guidance scale (``--cfg_sweep``) gives one JSON row, printed and appended to
``OUT/results.jsonl``; ``--save_png`` writes its samples as ``OUT/samples-cfgS/NNNNN.png`` and
``--save_npz`` as ``OUT/samples-cfgS.npz`` (``arr_0``: N x H x W x 3 uint8, ``arr_1``: labels; the
layout other evaluators read). PNGs are written by each rank (a folder all ranks see).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch_fidelity import FeatureExtractorInceptionV3
from torch_fidelity.datasets import ImagesPathDataset
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.utils import get_featuresdict_from_dataset
from tqdm import tqdm

from . import interop
from .config import check_types, cli_errors, config_parser, refuse
from .data import from_model_range
from .distributed import dist_info, gather, process_group, resolve_device
from .extractors import INCEPTION, ISC_NOTE, inception_weights
from .flow import SamplerConfig, balanced_labels, sample
from .storage import CheckpointError, atomic_write, append_log, jit_from_state, read_run

POOL, LOGITS = "2048", "logits_unbiased"  # torch-fidelity's layers for FID and for IS
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class EvalConfig:
    """The FID protocol of the paper (REFERENCE.md): 50 samples per class, an EMA, guidance in an interval."""
    checkpoint: str = ""  # a pixelrepa run directory or checkpoint, or a reference checkpoint
    ema: str = "ema0"  # "model", "ema0" (decay 0.9999), "ema1" (0.9996)
    per_class: int = 50
    num_images: int | None = None  # None: per_class x classes; else that many, classes cycling
    cfg_scale: float | None = None  # None: the run's
    cfg_interval: tuple[float, ...] = (0.1, 1.0)
    cfg_sweep: tuple[float, ...] | None = None  # several scales, one result row each (instead of cfg_scale)
    steps: int = 50
    sampler: str = "heun"
    batch_size: int = 128  # images per network call, per process
    seed: int = 0
    ref_stats: str = ""  # .npz with mu and sigma (Inception pool features of the reference images)
    ref_images: str = ""  # or a folder of reference images
    write_ref_stats: str = ""  # with ref_images: save their mu and sigma here (.npz)
    inception_weights: str = ""  # default: extractors.inception_weights (standard file, else the offline copy)
    out_dir: str = ""  # default: beside the checkpoint, <run>/eval
    save_png: bool = False
    save_npz: bool = False
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU; or bf16, fp32
    device: str = "auto"
    compile: bool = False
    data_dir: str = "data"
    progress: bool = True
    trusted: bool = False  # reference checkpoints: full pickle (only files you trust)
    dist_timeout: int = 1800

    def __post_init__(self):
        check_types(self)
        if not self.checkpoint:
            refuse(self, "checkpoint", "give a run directory, a ckpt-*.pt file or a reference checkpoint")
        for name in ("per_class", "steps", "batch_size", "dist_timeout"):
            if getattr(self, name) < 1:
                refuse(self, name, "must be a positive integer")
        if self.num_images is not None and self.num_images < 2:
            refuse(self, "num_images", "must be >= 2 (or None: per_class x classes)")
        if bool(self.ref_stats) == bool(self.ref_images):
            refuse(self, "ref_stats", "give exactly one of ref_stats (.npz with mu, sigma) and ref_images (a folder)")
        if self.write_ref_stats and not self.ref_images:
            refuse(self, "write_ref_stats", "needs ref_images, whose statistics it saves")
        if len(self.cfg_interval) != 2 or not 0 <= self.cfg_interval[0] <= self.cfg_interval[1] <= 1:
            refuse(self, "cfg_interval", "two numbers 0 <= lo <= hi <= 1")
        for s in (self.cfg_sweep or ()) + ((self.cfg_scale,) if self.cfg_scale is not None else ()):
            if s < 0:
                refuse(self, "cfg_sweep" if self.cfg_sweep else "cfg_scale", "scales must be >= 0")
        if self.sampler not in ("heun", "euler"):
            refuse(self, "sampler", "must be heun or euler")
        if self.precision not in ("auto", "bf16", "fp32"):
            refuse(self, "precision", "must be auto, bf16 or fp32")
        if self.device not in ("auto", "cpu", "cuda"):
            refuse(self, "device", "must be auto, cpu or cuda")


# ----------------------------------------------------------------------------- loading

def load_checkpoint(path: str | Path, which: str = "ema0", trusted: bool = False):
    """(JiT in eval mode, the run's config dict, step or None) of a pixelrepa run or checkpoint, or of a
    reference checkpoint."""
    path = Path(path)
    if path.is_file():
        try:
            found = path, interop.reference_state(path, optimizer=False, trusted=trusted)
        except CheckpointError as err:
            if "not in the reference layout" not in str(err):
                raise
            found = read_run(path)
    else:
        found = read_run(path)
    net, cfg = jit_from_state(found[1], which, found[0])
    return net, cfg, found[1].get("step")


# ----------------------------------------------------------------------------- features and scores

def inception(weights: str | Path | None, data_dir, device) -> tuple[FeatureExtractorInceptionV3, bool, Path]:
    """torch-fidelity's InceptionV3 with the pool layer (and the logits, where the weights have them)."""
    path, has_logits = inception_weights(data_dir, weights or None)
    net = FeatureExtractorInceptionV3(INCEPTION, [POOL, LOGITS] if has_logits else [POOL],
                                      feature_extractor_weights_path=str(path))
    return net.eval().to(device), has_logits, path


def extract(net: FeatureExtractorInceptionV3, images: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """torch-fidelity's features (pool, and logits where extracted) of a batch of uint8 images, on the CPU."""
    with torch.no_grad():
        return {k: v.cpu() for k, v in net.convert_features_tuple_to_dict(net(images.to(device))).items()}


def extract_dataset(net: FeatureExtractorInceptionV3, ds, device, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """The same for a dataset of uint8 images (torch-fidelity's loop)."""
    return get_featuresdict_from_dataset(ds, net, batch_size, torch.device(device).type == "cuda", True, False)


def statistics(pool: torch.Tensor) -> dict[str, np.ndarray]:
    """mu and sigma of pool features, as torch-fidelity computes them (float64)."""
    stats = fid_features_to_statistics(pool.double())
    return {k: np.asarray(v, dtype=np.float64) for k, v in stats.items()}


def read_statistics(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise ValueError(f"{path} has no {', '.join(missing)} (it holds {', '.join(f.files)}): FID reference "
                             "statistics are an .npz with the arrays mu and sigma")
        return {k: np.asarray(f[k], dtype=np.float64) for k in ("mu", "sigma")}


def write_statistics(path: str | Path, stats: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez(f, mu=stats["mu"], sigma=stats["sigma"]))


def image_files(folder: str | Path) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise FileNotFoundError(f"no reference images (at least 2 of {', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files


def fid(fake: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> float:
    if fake["mu"].shape != ref["mu"].shape:
        raise ValueError(f"reference statistics have {ref['mu'].shape[0]} features, the samples' "
                         f"{fake['mu'].shape[0]}: not Inception pool features")
    return fid_statistics_to_metric(fake, ref, False)[KEY_METRIC_FID]


def inception_score(logits: torch.Tensor) -> dict[str, float]:
    m = isc_features_to_metric(logits, DEFAULTS["isc_splits"], DEFAULTS["samples_shuffle"], DEFAULTS["rng_seed"])
    return {"isc_mean": m[KEY_METRIC_ISC_MEAN], "isc_std": m[KEY_METRIC_ISC_STD]}


# ----------------------------------------------------------------------------- sampling, sharded

def chunks(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[tuple[int, int]]:
    """(start, stop) of this rank's chunks: chunk k of the n global indices goes to rank k mod world."""
    return [(s, min(s + batch_size, n)) for k, s in enumerate(range(0, n, batch_size)) if k % world == rank]


def bf16(device: torch.device, precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16(device, precision))


def generate_share(net, labels: torch.Tensor, scfg: SamplerConfig, *, seed: int, batch_size: int, device,
                   precision: str = "auto", rank: int = 0, world: int = 1, on_chunk=None, progress: bool = False):
    """This rank's samples of a JiT ``net`` (or its compiled wrapper), chunk by chunk: ``on_chunk(start,
    uint8 images, labels)`` for each. A chunk's noise comes from (seed, its first index), as in
    flow.generate, so that one process with this batch size gives flow.generate's images."""
    res, C = net.cfg.input_size, net.cfg.num_classes
    mine = chunks(len(labels), batch_size, rank, world)
    for start, stop in tqdm(mine, desc=f"sample cfg {scfg.cfg_scale:g}", disable=not progress, dynamic_ncols=True):
        y = labels[start:stop].to(device)
        g = torch.Generator().manual_seed(seed * 1_000_003 + start)
        with torch.inference_mode(), autocast(device, precision):
            x = sample(net, y, (3, res, res), C, scfg, generator=g)
        on_chunk(start, from_model_range(x.float().cpu()), y.cpu())


def save_png(folder: Path, start: int, images: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{start + i:05d}.png")


def evaluate(cfg: EvalConfig) -> list[dict]:
    """One row per guidance scale (on every rank; rank 0 also prints and logs them)."""
    rank, world = dist_info()
    device = resolve_device(cfg.device)
    net, run_cfg, step = load_checkpoint(cfg.checkpoint, cfg.ema, cfg.trusted)
    net = net.to(device)
    fwd = torch.compile(net) if cfg.compile else net
    C = net.cfg.num_classes
    n = cfg.num_images or cfg.per_class * C
    labels = balanced_labels(n, C)
    out = Path(cfg.out_dir or (Path(cfg.checkpoint) if Path(cfg.checkpoint).is_dir() else Path(cfg.checkpoint).parent)
               / "eval")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    extractor, has_logits, weights = inception(cfg.inception_weights, cfg.data_dir, device)
    ref = reference(cfg, extractor, device) if rank == 0 else None
    scales = cfg.cfg_sweep or (cfg.cfg_scale if cfg.cfg_scale is not None else float(run_cfg.get("cfg_scale", 1.0)),)
    rows = []
    for scale in scales:
        scfg = SamplerConfig(steps=cfg.steps, method=cfg.sampler, cfg_scale=scale, cfg_interval=tuple(cfg.cfg_interval),
                             noise_scale=float(run_cfg.get("noise_scale", 1.0)), t_eps=float(run_cfg.get("t_eps", 0.05)))
        name = f"samples-cfg{scale:g}"
        mine, kept = [], []

        def on_chunk(start, images, y):
            mine.append((start, extract(extractor, images, device)))
            if cfg.save_png:
                save_png(out / name, start, images)
            if cfg.save_npz:
                kept.append((start, images, y))
        t0 = time.perf_counter()
        generate_share(fwd, labels, scfg, seed=cfg.seed, batch_size=cfg.batch_size, device=device,
                       precision=cfg.precision, rank=rank, world=world, on_chunk=on_chunk,
                       progress=cfg.progress and rank == 0)
        seconds = time.perf_counter() - t0
        parts = sorted((p for ps in gather(mine, world) for p in ps), key=lambda p: p[0])
        if cfg.save_npz:
            shard = out / f".{name}.rank{rank}.pt"
            torch.save(kept, shard)
            if dist.is_initialized():
                dist.barrier()
            if rank == 0:
                write_npz(out / f"{name}.npz", [out / f".{name}.rank{r}.pt" for r in range(world)])
        feats = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
        assert len(feats[POOL]) == n
        row = {"checkpoint": str(cfg.checkpoint), "step": step, "model": run_cfg.get("model"),
               "method": run_cfg.get("method", "jit"), "ema": cfg.ema, "cfg_scale": scale,
               "cfg_interval": list(cfg.cfg_interval), "sampler": cfg.sampler, "steps": cfg.steps,
               "num_images": n, "num_classes": C, "per_class": None if cfg.num_images else cfg.per_class,
               "seed": cfg.seed, "precision": "bf16 autocast" if bf16(device, cfg.precision) else "fp32",
               "world_size": world,
               "inception_weights": weights.name, "seconds": round(seconds, 2),  # sampling and Inception features
               "images_per_s": round(n / seconds, 3)}
        if rank == 0:
            row["fid"] = fid(statistics(feats[POOL]), ref["stats"])
            row["reference"] = ref["what"]
            row.update(inception_score(feats[LOGITS]) if has_logits else
                       {"isc_mean": None, "isc_std": None, "isc_note": ISC_NOTE})
            print(json.dumps(row), flush=True)
            append_log(out / "results.jsonl", row)
        rows.append(row)
        if dist.is_initialized():
            dist.barrier()
    return rows


def reference(cfg: EvalConfig, extractor, device) -> dict:
    """The reference statistics: read from ``ref_stats``, or computed from ``ref_images``."""
    if cfg.ref_stats:
        return {"stats": read_statistics(cfg.ref_stats), "what": {"ref_stats": str(cfg.ref_stats)}}
    files = image_files(cfg.ref_images)
    pool = extract_dataset(extractor, ImagesPathDataset([str(f) for f in files]), device)[POOL]
    stats = statistics(pool)
    if cfg.write_ref_stats:
        write_statistics(cfg.write_ref_stats, stats)
    return {"stats": stats, "what": {"ref_images": str(cfg.ref_images), "n": len(files)}}


def write_npz(path: Path, shards: list[Path]) -> None:
    """The ranks' samples in index order as one .npz (arr_0 N x H x W x 3 uint8, arr_1 labels)."""
    parts = sorted((p for s in shards for p in torch.load(s, weights_only=True)), key=lambda p: p[0])
    images = torch.cat([p[1] for p in parts]).permute(0, 2, 3, 1).numpy()
    labels = torch.cat([p[2] for p in parts]).numpy()
    atomic_write(path, lambda f: np.savez(f, arr_0=images, arr_1=labels))
    for s in shards:
        s.unlink()


def main(argv=None):
    p = config_parser(EvalConfig, prog="python -m pixelrepa.evaluate")
    p.add_argument("path", nargs="?", default=None, help="the checkpoint (instead of --checkpoint)")
    a = vars(p.parse_args(argv))
    path = a.pop("path")
    with cli_errors("pixelrepa.evaluate", (ValueError, FileNotFoundError, CheckpointError)):
        cfg = EvalConfig(**{**a, "checkpoint": path or a["checkpoint"]})
        with process_group(cfg.device, cfg.dist_timeout):
            evaluate(cfg)


if __name__ == "__main__":
    main()
