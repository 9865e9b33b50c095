"""The processes a command runs in: one on a CPU or a GPU, or several under torchrun.

`train` and `evaluate` run the same code in every process; these helpers tell a process its rank and
device, hold the process group for the duration of a command, and gather what every rank computed.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist


def dist_info() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' asked for but torch sees no CUDA device")
    if name == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


@contextlib.contextmanager
def process_group(device: str, timeout_s: int):
    """Under torchrun (WORLD_SIZE > 1), the process group for the duration: nccl on CUDA (each rank on
    its LOCAL_RANK device), gloo on the CPU; torn down however the block ends. A lost process makes
    the others' collectives fail after ``timeout_s`` instead of hanging. Nothing in one process."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        backend = "nccl" if resolve_device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def gather(obj, world: int) -> list:
    """Every rank's ``obj``, in rank order (through the process group whenever there is one)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out
