"""A checkpoint in the reference code's layout, written from a pixelrepa model, for the interop tests
and the GPU check. Written from the layout facts (../shared/REFERENCE.md) by hand, independently of
pixelrepa.interop: names listed one by one in the reference's module order, not derived from its
renaming table, so that a wrong entry there makes a test fail."""
from __future__ import annotations

import argparse
import math

import torch

from pixelrepa.jit import sincos_2d

BLOCK = ("norm1.weight", "attn.q_norm.weight", "attn.k_norm.weight", "attn.qkv.weight", "attn.qkv.bias",
         "attn.proj.weight", "attn.proj.bias", "norm2.weight", "mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight",
         "mlp.w3.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias")
EMBEDDERS = [("t_embedder.mlp.0.weight",) * 2, ("t_embedder.mlp.0.bias",) * 2, ("t_embedder.mlp.2.weight",) * 2,
             ("t_embedder.mlp.2.bias",) * 2, ("y_embedder.embedding_table.weight", "y_embedder.weight")]


def jit_names(depth: int) -> list[tuple[str, str | None]]:
    """(reference name inside ``net.``, pixelrepa name: 'jit.*', 'head.*' or None) in module order."""
    names = EMBEDDERS + [("x_embedder.proj1.weight", "patch1.weight"), ("x_embedder.proj2.weight", "patch2.weight"),
                         ("x_embedder.proj2.bias", "patch2.bias"), ("pos_embed", None),
                         ("in_context_posemb", "in_context_pos")]
    names += [(f"blocks.{i}.{n}",) * 2 for i in range(depth) for n in BLOCK]
    names += [("final_layer.norm_final.weight", "final_layer.norm.weight"), ("final_layer.linear.weight",) * 2,
              ("final_layer.linear.bias",) * 2, ("final_layer.adaLN_modulation.1.weight",) * 2,
              ("final_layer.adaLN_modulation.1.bias",) * 2]
    return [(r, None if o is None else "jit." + o) for r, o in names] + [("mask_token", "head.mask_token")]


def adapter_names(depth: int, projection_used: bool) -> list[tuple[str, str | None]]:
    names = EMBEDDERS + [("in_context_posemb", "in_context_pos")]
    names += [(f"blocks.{i}.{n}",) * 2 for i in range(depth) for n in BLOCK]
    names += [(f"projection_layer.mlp.{i}.{p}", f"head.{i}.{p}" if projection_used else None)
              for i in (0, 1, 3) for p in ("weight", "bias")]
    return [(r, None if o is None else "head." + o) for r, o in names]


def reference_checkpoint(cfg: dict, state: dict, *, data_path, n_images: int, world: int = 2, encoder_sd: dict | None = None,
                         adapter: bool = True, emas_prefixed: bool = False, projection_out: int | None = None) -> dict:
    """The reference layout of a pixelrepa checkpoint ``state`` (its TrainConfig dict ``cfg``): the
    denoiser under net. / repa_model. / masked_transformer_adapter., two EMAs, AdamW in two groups
    (no decay first), the epoch and a Namespace of the reference's arguments."""
    model, head = state["model"], state["head"]
    depth = sum(1 for k in model if k.endswith(".attn.qkv.weight"))
    width = model["y_embedder.weight"].shape[1]
    patch = math.isqrt(model["final_layer.linear.weight"].shape[0] // 3)
    pos = sincos_2d(width, int(cfg["resolution"]) // patch)[None]
    ours = {"jit." + k: v for k, v in model.items()}
    ours.update({"head." + k: v for k, v in head.items()})
    g = torch.Generator().manual_seed(0)
    if adapter and "head.head.0.weight" not in ours:  # the reference's projection head exists, unused
        out = projection_out or width
        for name, shape in (("0.weight", (width, width)), ("0.bias", (width,)), ("1.weight", (width,)),
                            ("1.bias", (width,)), ("3.weight", (out, width)), ("3.bias", (out,))):
            ours[f"unused.{name}"] = torch.randn(shape, generator=g)
    names = [("net." + r, o) for r, o in jit_names(depth) if adapter or r != "mask_token"]
    if adapter:
        used = "head.head.0.weight" in ours
        adepth = sum(1 for k in head if k.endswith(".attn.qkv.weight"))
        names += [("masked_transformer_adapter." + r,
                   o if o is not None or not r.startswith("projection") else "unused." + r.split("mlp.")[1])
                  for r, o in adapter_names(adepth, used)]
    sd, trainable = {}, []
    for ref, our in names:
        if ref.startswith("masked_transformer_adapter.") and not any(k.startswith("masked_transformer_adapter.")
                                                                      for k in sd):
            for k, v in (encoder_sd or {}).items():  # the frozen encoder sits between the JiT and the adapter
                sd["repa_model." + k] = v
            for buf in ("de_scale.mean", "de_scale.std", "scale.mean", "scale.std"):
                sd[buf] = torch.full((1, 3, 1, 1), 0.5)
        sd[ref] = pos if our is None and ref.endswith("pos_embed") else ours[our]
        if not ref.endswith("pos_embed"):
            trainable.append((ref, our))
    # AdamW: groups [no decay (1-d, biases), decay], ids counted across groups, state for updated params
    no_decay = [(r, o) for r, o in trainable if sd[r].ndim == 1 or r.endswith(".bias")]
    decay = [(r, o) for r, o in trainable if (r, o) not in no_decay]
    # pixelrepa's optimizer order: Trainable's parameters, the JiT's then the head's (their state dicts hold
    # parameters only: the fixed tables are non-persistent buffers)
    our_index = {name: i for i, name in enumerate(["jit." + k for k in model] + ["head." + k for k in head])}
    opt_state, groups, i = {}, [], 0
    for members in (no_decay, decay):
        ids = []
        for ref, our in members:
            if our in our_index and our_index[our] in state["opt"]["state"]:
                opt_state[i] = {k: v.clone() for k, v in state["opt"]["state"][our_index[our]].items()}
            ids.append(i)
            i += 1
        groups.append({"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
                       "foreach": None, "maximize": False, "capturable": False, "differentiable": False,
                       "fused": None, "params": ids})
    spe = math.ceil(n_images / world) // (int(cfg["batch_size"]) // world)
    emas = []
    for ema in state["emas"]:
        e = {}
        for ref, our in jit_names(depth):
            if ref == "pos_embed":
                e[ref] = pos
            elif our == "head.mask_token":
                if adapter:
                    e[ref] = head["mask_token"]
            else:
                e[ref] = ema[our.removeprefix("jit.")]
        emas.append({("net." + k if emas_prefixed else k): v for k, v in e.items()})
    batch = int(cfg["batch_size"]) // world
    args = argparse.Namespace(
        model=cfg["model"], mta=cfg["model"].replace("JiT", "MTA"), img_size=cfg["resolution"],
        attn_dropout=0.0, proj_dropout=0.0, patch_mask_ratio=0.2, epochs=int(cfg["steps"]) // spe,
        warmup_epochs=cfg["warmup_epochs"], batch_size=batch, lr=cfg["blr"] * cfg["batch_size"] / 256,
        blr=cfg["blr"], min_lr=0.0, lr_schedule="constant", weight_decay=0.0, ema_decay1=cfg["ema_decays"][0],
        ema_decay2=cfg["ema_decays"][1], P_mean=cfg["P_mean"], P_std=cfg["P_std"], noise_scale=cfg["noise_scale"],
        t_eps=cfg["t_eps"], label_drop_prob=cfg["label_drop"], seed=cfg["seed"], start_epoch=0, num_workers=12,
        pin_mem=True, repa_model="vit_base_patch14_dinov2.lvd142m", repa_image_size=256, repa_patch_size=16,
        sampling_method="heun", num_sampling_steps=cfg["sample_steps"], cfg=cfg["cfg_scale"], interval_min=0.1,
        interval_max=1.0, num_images=50000, eval_freq=40, online_eval=False, evaluate_gen=False, gen_bsz=256,
        data_path=str(data_path), class_num=model["y_embedder.weight"].shape[0] - 1, output_dir="out",
        resume="out", save_last_freq=5, log_freq=100, device="cuda", world_size=world, local_rank=-1,
        dist_on_itp=False, dist_url="env://", rank=0, gpu=0, distributed=True, dist_backend="nccl")
    return {"model": sd, "optimizer": {"state": opt_state, "param_groups": groups}, "epoch": state["step"] // spe - 1,
            "args": args, "model_ema1": emas[0], "model_ema2": emas[1]}
