"""Checkpoints written by the reference code (JiT, PixelREPA) read into pixelrepa.

    python -m pixelrepa.interop checkpoint-last.pth --out_dir runs/pixelrepa-b16 [--dataset /data/imagenet/train]

turns a reference checkpoint into a pixelrepa run directory: ``ckpt-<step>.pt`` (with its ``.sha256``)
holding the JiT, the adapter, both EMAs and the AdamW state re-ordered to pixelrepa's parameter order,
at the step the reference run had reached, plus the frozen encoder saved inside it as a weights file.
Sampling, ``python -m pixelrepa.evaluate``, the explorers and ``python -m pixelrepa.train --out_dir``
(resuming, in pixelrepa's own format from then on) all read that directory; the command prints the
exact resume command. ``reference_state(path)`` gives the same state in memory, without files, and
``python -m pixelrepa.evaluate`` takes a reference file directly.

The reference layout (../shared/REFERENCE.md, "Interoperability facts"; the facts only, no code): a
dict from torch.save with ``model``, the whole denoiser (the JiT under ``net.``, the adapter under
``masked_transformer_adapter.``, the frozen encoder under ``repa_model.``, normalisation buffers),
``model_ema1`` and ``model_ema2`` (the JiT's state dict, with or without the ``net.`` prefix),
``optimizer`` (two AdamW groups over the denoiser's trainable parameters in module order: the 1-d
ones and biases first, then the rest), ``epoch`` (the last finished, counted from 0) and ``args``
(a pickled argparse Namespace: allowed by name here, so the file loads with weights_only=True).
Key names differ from pixelrepa's in a few places (`RENAMES`); ``pos_embed`` is a frozen parameter,
checked against our fixed sin-cos table and dropped; the adapter's mask token lives in the JiT
(``net.mask_token``); the adapter's projection head is unused, and dropped, when the JiT's width
equals the encoder's (B/16 with DINOv2-B: 768).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import torch

from .align import DEFAULT_MASK_RATIO, Trainable, build_head
from .jit import JiT, MODELS, jit_config, sincos_2d
from .storage import CheckpointError, atomic_save, atomic_write_text, load_weights, save_checkpoint
from .train import TrainConfig, training_set

JIT_PREFIX, ADAPTER_PREFIX, ENCODER_PREFIX = "net.", "masked_transformer_adapter.", "repa_model."
# reference name -> pixelrepa name, at the start of a key inside the JiT or the adapter
RENAMES = (("y_embedder.embedding_table.", "y_embedder."), ("x_embedder.proj1.", "patch1."),
           ("x_embedder.proj2.", "patch2."), ("in_context_posemb", "in_context_pos"),
           ("final_layer.norm_final.", "final_layer.norm."), ("projection_layer.mlp.", "head."))
EMA_KEYS = ("model_ema1", "model_ema2")  # decays args.ema_decay1, args.ema_decay2: pixelrepa's ema0, ema1
REFERENCE_KEYS = ("model", "args")
ENCODERS = {"vit_base_patch14_dinov2": "dinov2-b14"}  # the reference's timm name (before the tag) -> ours
ENCODER_FILE = "reference-encoder.pt"
POS_EMBED_TOL = 1e-5


def rename(key: str) -> str:
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def is_reference(state) -> bool:
    """True for a dict in the reference layout (not a pixelrepa checkpoint)."""
    return (isinstance(state, dict) and all(k in state for k in REFERENCE_KEYS) and "config" not in state
            and isinstance(state["model"], dict) and any(k.startswith(JIT_PREFIX) for k in state["model"]))


def load_reference(path: str | Path, trusted: bool = False) -> dict:
    """The reference checkpoint at ``path``, memory-mapped. Its pickled argparse Namespace is allowed by
    name, so loading runs no other pickled code; ``trusted=True`` loads with full pickle (only for
    files you trust) if the file holds anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no reference checkpoint at {path}")
    try:
        if trusted:
            state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        hint = "" if trusted else ("; if you trust the file, pass trusted=True (--trusted) to load it with full "
                                   "pickle")
        raise CheckpointError(f"{path} is unreadable as a reference checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:300]}){hint}") from err
    if not is_reference(state):
        raise CheckpointError(f"{path} is not in the reference layout (a dict with {', '.join(REFERENCE_KEYS)} and "
                              f"the JiT under '{JIT_PREFIX}'); pixelrepa's own checkpoints load with storage.load_jit")
    return state


def split_model(sd: dict, path="the checkpoint") -> dict:
    """The reference denoiser's state dict in pixelrepa's names: ``jit``, ``head`` (the adapter, with
    the JiT's mask token), ``encoder`` (the frozen encoder's own state dict), ``pos_embed`` and the
    ``ignored`` keys (normalisation buffers)."""
    out = {"jit": {}, "head": {}, "encoder": {}, "pos_embed": None, "ignored": []}
    for k, v in sd.items():
        if k == JIT_PREFIX + "pos_embed":
            out["pos_embed"] = v
        elif k == JIT_PREFIX + "mask_token":
            out["head"]["mask_token"] = v
        elif k.startswith(JIT_PREFIX):
            out["jit"][rename(k[len(JIT_PREFIX):])] = v
        elif k.startswith(ADAPTER_PREFIX):
            out["head"][rename(k[len(ADAPTER_PREFIX):])] = v
        elif k.startswith(ENCODER_PREFIX):
            out["encoder"][k[len(ENCODER_PREFIX):]] = v
        else:
            out["ignored"].append(k)
    if "y_embedder.weight" not in out["jit"]:
        raise CheckpointError(f"{path}: no '{JIT_PREFIX}y_embedder.embedding_table.weight': not a JiT denoiser")
    return out


def ema_weights(sd: dict) -> dict:
    """A reference EMA state dict (the JiT's keys, with or without 'net.') in pixelrepa's names, without
    pos_embed and the mask token (pixelrepa's EMAs hold the JiT alone)."""
    if all(k.startswith(JIT_PREFIX) for k in sd):
        sd = {k[len(JIT_PREFIX):]: v for k, v in sd.items()}
    return {rename(k): v for k, v in sd.items() if k not in ("pos_embed", "mask_token")}


def reference_params(sd: dict) -> list[str]:
    """The reference optimizer's parameters, by name, in its order: the denoiser's trainable parameters
    (the JiT but its frozen pos_embed, and the adapter; the frozen encoder and buffers are not) in
    module order, the no-decay group (1-d and biases) first."""
    trainable = [k for k in sd if (k.startswith(JIT_PREFIX) and k != JIT_PREFIX + "pos_embed")
                 or k.startswith(ADAPTER_PREFIX)]
    no_decay = [k for k in trainable if sd[k].ndim == 1 or k.endswith(".bias")]
    return no_decay + [k for k in trainable if k not in set(no_decay)]


def our_name(ref_key: str) -> str:
    """A reference denoiser key as a pixelrepa `Trainable` parameter name ('jit.*', 'head.*')."""
    if ref_key == JIT_PREFIX + "mask_token":
        return "head.mask_token"
    if ref_key.startswith(JIT_PREFIX):
        return "jit." + rename(ref_key[len(JIT_PREFIX):])
    return "head." + rename(ref_key[len(ADAPTER_PREFIX):])


def remap_optimizer(ref_opt: dict, model_sd: dict, trainable: Trainable, opt: torch.optim.Optimizer, path) -> dict:
    """The reference AdamW state re-ordered for ``opt`` (pixelrepa's one group over ``trainable``),
    checked: group sizes, every state's shape against its parameter. Parameters the reference never
    updated (the unused projection head) have no state and are dropped."""
    order = reference_params(model_sd)
    groups = ref_opt.get("param_groups", [])
    sizes = [len(g["params"]) for g in groups]
    n_no_decay = sum(1 for k in order if model_sd[k].ndim == 1 or k.endswith(".bias"))
    if sizes != [n_no_decay, len(order) - n_no_decay]:
        raise CheckpointError(f"{path}: the optimizer has groups of {sizes} parameters, but the denoiser's trainable "
                              f"parameters make [{n_no_decay}, {len(order) - n_no_decay}] (no decay, decay): "
                              "not the reference layout this reader knows")
    index = [i for g in groups for i in g["params"]]  # the saved ids, in parameter order
    ours = {name: i for i, (name, _) in enumerate(trainable.named_parameters())}
    params = dict(trainable.named_parameters())
    state = {}
    for ref_key, saved_id in zip(order, index):
        s = ref_opt["state"].get(saved_id)
        name = our_name(ref_key)
        if name not in ours:
            if s is not None and ref_key.split(".")[1] != "projection_layer":
                raise CheckpointError(f"{path}: optimizer state for {ref_key}, which has no pixelrepa parameter")
            continue
        if s is None:
            continue
        for k in ("exp_avg", "exp_avg_sq"):
            if k in s and tuple(s[k].shape) != tuple(params[name].shape):
                raise CheckpointError(f"{path}: optimizer {k} of {ref_key} has shape {tuple(s[k].shape)}, its "
                                      f"parameter {tuple(params[name].shape)}")
        state[ours[name]] = s
    return {"state": state, "param_groups": opt.state_dict()["param_groups"]}


def reference_steps_per_epoch(n_images: int, args: dict) -> int:
    """Optimizer steps in one reference epoch: each of world_size processes gets ceil(N / world) images
    (DistributedSampler pads) and drops its last partial batch of batch_size."""
    world = int(args.get("world_size") or 1)
    return math.ceil(n_images / world) // int(args["batch_size"])


def adam_step(ref_opt: dict | None) -> int | None:
    """The optimizer steps the reference run took, read off AdamW's per-parameter step counters."""
    steps = {int(s["step"]) for s in (ref_opt or {}).get("state", {}).values() if "step" in s}
    if len(steps) > 1:
        warnings.warn(f"the reference optimizer's step counters differ ({sorted(steps)[:4]}...); using the largest")
    return max(steps) if steps else None


def _method(parts: dict, args: dict) -> str:
    if not parts["head"] or set(parts["head"]) == {"mask_token"}:
        return "jit"
    return "adapter" if float(args.get("patch_mask_ratio", 0.2)) == 0 else "pixelrepa"


def _encoder_name(args: dict, override: str | None) -> str:
    if override:
        return override
    timm_name = str(args.get("repa_model", "vit_base_patch14_dinov2.lvd142m")).split(".")[0]
    if timm_name not in ENCODERS:
        raise CheckpointError(f"the reference run aligned to {timm_name!r}, which pixelrepa has no encoder for "
                              f"(known: {', '.join(ENCODERS)}); pass encoder=... to use another")
    return ENCODERS[timm_name]


def config_from_args(args: dict, method: str, *, steps_per_epoch: int | None, **overrides) -> TrainConfig:
    """The pixelrepa TrainConfig of a reference run's arguments. Values equal to the registry's or the
    paper's defaults are left to them (None); ``overrides`` (TrainConfig fields) win."""
    model = args.get("model")
    if model not in MODELS:
        raise CheckpointError(f"the reference run's model {model!r} is not in pixelrepa's registry ({', '.join(MODELS)})")
    world = int(args.get("world_size") or 1)
    batch = int(args["batch_size"]) * world
    lr = args.get("lr")
    reg = MODELS[model]
    cfg = {"model": model, "resolution": int(args["img_size"]), "batch_size": batch,
           "blr": float(lr) * 256 / batch if lr else float(args["blr"]),
           "warmup_epochs": float(args.get("warmup_epochs", 5)), "seed": int(args.get("seed", 0)),
           "ema_decays": (float(args.get("ema_decay1", 0.9999)), float(args.get("ema_decay2", 0.9996))),
           "P_mean": float(args.get("P_mean", -0.8)), "P_std": float(args.get("P_std", 0.8)),
           "noise_scale": float(args.get("noise_scale", 1.0)), "t_eps": float(args.get("t_eps", 0.05)),
           "label_drop": float(args.get("label_drop_prob", 0.1)), "method": method,
           "cfg_scale": float(args.get("cfg", 1.0)), "sample_steps": int(args.get("num_sampling_steps", 50))}
    if args.get("data_path"):
        cfg["dataset"] = os.path.join(str(args["data_path"]), "train")  # where the reference reads its images
    for ours, theirs in (("attn_drop", "attn_dropout"), ("proj_drop", "proj_dropout")):
        if float(args.get(theirs, 0.0)) != reg.get(ours, 0.0):
            cfg[ours] = float(args[theirs])
    if method != "jit":
        cfg["encoder"] = _encoder_name(args, overrides.pop("encoder", None))
        ratio = float(args.get("patch_mask_ratio", 0.2))
        if method == "pixelrepa" and ratio != DEFAULT_MASK_RATIO["pixelrepa"]:
            cfg["mask_ratio"] = ratio
    if steps_per_epoch and args.get("epochs"):
        cfg["steps"] = int(args["epochs"]) * steps_per_epoch
    for what, ok, note in (("lr_schedule", args.get("lr_schedule", "constant") == "constant",
                            "pixelrepa's learning rate is constant after warm-up"),
                           ("weight_decay", not float(args.get("weight_decay", 0.0)), "pixelrepa trains with 0"),
                           ("sampling_method", args.get("sampling_method", "heun") == "heun", "pixelrepa samples with Heun")):
        if not ok:
            warnings.warn(f"the reference run used {what}={args.get(what)!r}: {note}")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**cfg)


def reference_state(path: str | Path, *, optimizer: bool = True, trusted: bool = False, dataset_size: int | None = None,
                    encoder_weights: str | None = None, **overrides) -> dict:
    """A reference checkpoint as a pixelrepa checkpoint state (step, config, model, head, emas, opt) in
    memory, plus ``encoder`` (the frozen encoder's state dict, or {}). ``overrides``: TrainConfig fields
    (dataset, steps, encoder, out_dir, ...). The step is AdamW's step counter; without an optimizer it
    is (epoch + 1) x the reference's steps per epoch, which needs the training set's size
    (``dataset_size``, else the images found in the dataset folder), as does the run's total of steps
    (its epochs). ``optimizer=False`` (sampling, evaluation): no AdamW state, the folder is not indexed
    and a step that cannot be told is None."""
    ref = load_reference(path, trusted)
    args = dict(vars(ref["args"]) if isinstance(ref["args"], argparse.Namespace) else ref["args"])
    parts = split_model(ref["model"], path)
    method = _method(parts, args)
    num_classes = parts["jit"]["y_embedder.weight"].shape[0] - 1
    step, spe = adam_step(ref.get("optimizer")), None
    if "epoch" in ref and (step is None or "steps" not in overrides):  # the epoch gives the step and total steps
        if dataset_size is None and optimizer:
            with warnings.catch_warnings():  # the final config below warns once
                warnings.simplefilter("ignore")
                where = config_from_args(args, method, steps_per_epoch=None, **overrides)
            try:
                dataset_size = len(training_set(where, progress=False))
            except (OSError, RuntimeError) as err:  # no such folder here (DatasetError is a RuntimeError)
                if step is None:
                    raise CheckpointError(f"{path} holds no optimizer state, so its step is (epoch + 1) x steps per "
                                          f"epoch, which needs the training set's size: pass dataset=... or "
                                          f"dataset_size=... ({err})") from None
        if dataset_size is not None:
            spe = reference_steps_per_epoch(dataset_size, args)
            by_epoch = (int(ref["epoch"]) + 1) * spe
            if step is not None and step != by_epoch:
                warnings.warn(f"{path}: AdamW counted {step} steps, epoch {ref['epoch']} x {spe} steps per epoch "
                              f"makes {by_epoch}; using AdamW's")
            step = by_epoch if step is None else step
    if step is None and optimizer:
        raise CheckpointError(f"{path}: neither optimizer state nor epoch tells the step it was saved at")
    cfg = config_from_args(args, method, steps_per_epoch=spe, **overrides)
    if step is not None and cfg.steps < step:  # a run asked for fewer steps than it already took: it is finished
        cfg = TrainConfig(**{**asdict(cfg), "steps": step})
    jit_cfg = jit_config(cfg.model, cfg.resolution, num_classes, attn_drop=cfg.attn_drop, proj_drop=cfg.proj_drop)
    if parts["pos_embed"] is not None:
        ours = sincos_2d(jit_cfg.width, jit_cfg.grid)
        diff = (parts["pos_embed"].reshape(ours.shape).float() - ours).abs().max().item()
        if not diff <= POS_EMBED_TOL:
            raise CheckpointError(f"{path}: its pos_embed differs from the fixed 2D sin-cos table by {diff:.3g}: "
                                  "not a JiT of the layout this reader knows")
    model = JiT(jit_cfg)
    load_weights(model, parts["jit"], path, f"JiT ('{JIT_PREFIX}*')")
    head = None
    if method != "jit":
        enc_dim = parts["head"]["head.3.weight"].shape[0] if "head.3.weight" in parts["head"] else jit_cfg.width
        head = build_head(cfg.align, jit_cfg, enc_dim)
        head_sd = parts["head"] if enc_dim != jit_cfg.width else {
            k: v for k, v in parts["head"].items() if not k.startswith("head.")}  # unused projection
        load_weights(head, head_sd, path, f"adapter ('{ADAPTER_PREFIX}*')")
    emas = []
    for key in EMA_KEYS:
        if key in ref:
            ema = copy.deepcopy(model).requires_grad_(False).eval()
            load_weights(ema, ema_weights(ref[key]), path, key)
            emas.append(ema)
    if not emas:
        raise CheckpointError(f"{path} holds no EMA ({', '.join(EMA_KEYS)})")
    if len(emas) != len(cfg.ema_decays):
        cfg = TrainConfig(**{**asdict(cfg), "ema_decays": cfg.ema_decays[:len(emas)]})
    state = {"step": step, "config": asdict(cfg), "model": model.state_dict(),
             "head": head.state_dict() if head is not None else {}, "emas": [e.state_dict() for e in emas],
             "encoder": parts["encoder"], "reference": {"path": str(path), "epoch": ref.get("epoch"), "args": args}}
    if optimizer:
        trainable = Trainable(model, head, cfg.align.depth(jit_cfg))
        opt = torch.optim.AdamW(trainable.parameters(), lr=cfg.blr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
        if ref.get("optimizer"):
            load_weights(opt, remap_optimizer(ref["optimizer"], ref["model"], trainable, opt, path), path, "optimizer")
        else:
            warnings.warn(f"{path} holds no optimizer state: a resumed run starts AdamW's moments from zero")
        state["opt"] = opt.state_dict()
    if encoder_weights is not None:
        state["config"]["encoder_weights"] = str(encoder_weights)
    return state


def import_reference(path: str | Path, out_dir: str | Path, **kw) -> Path:
    """Write the reference checkpoint ``path`` as a pixelrepa run in ``out_dir``: ``ckpt-<step>.pt`` (and
    its .sha256), ``config.json`` and, when the checkpoint holds its frozen encoder and no other encoder
    weights are given, that encoder as ``reference-encoder.pt`` (the run's ``encoder_weights``).
    ``kw``: as `reference_state`. Returns the checkpoint file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = reference_state(path, out_dir=str(out_dir), **kw)
    encoder, cfg = state.pop("encoder"), state["config"]
    if encoder and cfg["method"] != "jit" and not cfg["encoder_weights"]:
        atomic_save(dict(encoder), out_dir / ENCODER_FILE, checksum=True)
        cfg["encoder_weights"] = str((out_dir / ENCODER_FILE).resolve())
    atomic_write_text(out_dir / "config.json", json.dumps(cfg, indent=1))
    return save_checkpoint(out_dir, state, TrainConfig(**cfg).keep_ckpts)


def resume_command(config: dict) -> str:
    """The ``python -m pixelrepa.train`` command that resumes a run of ``config``: every field that
    differs from TrainConfig's default."""
    default = asdict(TrainConfig())
    parts = ["python", "-m", "pixelrepa.train"]
    for f in fields(TrainConfig):
        v = config.get(f.name, default[f.name])
        if v != default[f.name] or f.name == "out_dir":
            parts += [f"--{f.name}"] + ([str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)])
    return shlex.join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pixelrepa.interop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a reference checkpoint (checkpoint-last.pth, checkpoint-<epoch>.pth)")
    p.add_argument("--out_dir", required=True, help="the pixelrepa run directory to write")
    p.add_argument("--dataset", default=None, help="the training images (default: the run's data_path/train)")
    p.add_argument("--dataset_size", type=int, default=None, help="images in the training set (instead of counting)")
    p.add_argument("--steps", type=int, default=None, help="total steps of the resumed run (default: the reference's epochs)")
    p.add_argument("--encoder", default=None, help="target encoder of a resumed run (default: the reference's)")
    p.add_argument("--encoder_weights", default=None, help="its weights (default: the copy inside the checkpoint)")
    p.add_argument("--data_dir", default=None, help="pixelrepa's cache folder")
    p.add_argument("--trusted", action="store_true", help="load with full pickle (only files you trust)")
    a = p.parse_args(argv)
    try:
        kw = {k: getattr(a, k) for k in ("dataset", "steps", "encoder", "data_dir") if getattr(a, k) is not None}
        ckpt = import_reference(a.checkpoint, a.out_dir, dataset_size=a.dataset_size, trusted=a.trusted,
                                encoder_weights=a.encoder_weights, **kw)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"pixelrepa.interop: error: {err}", file=sys.stderr)
        sys.exit(1)
    cfg = json.loads((Path(a.out_dir) / "config.json").read_text())
    print(f"wrote {ckpt} (step {int(ckpt.stem.split('-')[1])}, {cfg['method']}, {cfg['model']} at {cfg['resolution']} px)")
    print(f"sample and score it: python -m pixelrepa.evaluate {a.out_dir}\nresume training with:\n  {resume_command(cfg)}")


if __name__ == "__main__":
    main()
