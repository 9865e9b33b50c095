"""Storage: the files pixelrepa writes and must trust when it reads them back.

- Atomic writes: a file is written aside (a unique temporary name, so concurrent writers of one shared
  file never mix), flushed to disk and renamed: a crash leaves the old file or the new, never half.
- Checksums: a checkpoint's sha256 sits beside it in ``PATH.sha256`` (`sha256sum -c` format).
- Keyed caches: a cache file holds the key of what it was made from (``read_cache`` refuses another
  key); files another library writes (torch-fidelity's feature caches) are vouched for by a record of
  their key and sizes beside them (``record_files``, ``record_problem``).
- Run logs: JSON lines, cut back to a step on resume (a line damaged by a kill is dropped).
- Checkpoints: one dict per step (step, config, model, head, emas, opt), written by ``save_checkpoint``;
  read back verified, the newest usable one of a run with a fallback to the previous (``latest_checkpoint``);
  and the JiT of a run without its head (``load_jit``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .jit import JiT, MODELS, jit_config


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, failing its checksum, not a pixelrepa training
    checkpoint, or holding weights of another network. The message names the file."""


# ----------------------------------------------------------------------------- atomic writes, checksums

def atomic_write(path: str | Path, write: Callable, binary: bool = True, before_rename: Callable | None = None) -> None:
    """``write(f)`` into a temporary file beside ``path``, flushed to disk, then renamed over ``path``
    (``before_rename()`` runs in between, once the bytes are on disk); nothing is left on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)  # reopened by name, so that the file object carries it
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; caches and records are shared like any data file
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:  # disk full, interrupted: no half file left behind
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Text (configs, logs, run records) written atomically."""
    atomic_write(path, lambda f: f.write(text), binary=False)


class _HashingWriter:
    """A file object for torch.save that hashes the bytes on their way to disk."""

    def __init__(self, f, sha):
        self.f, self.name, self.sha = f, f.name, sha

    def write(self, b):
        self.sha.update(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def atomic_save(obj, path: str | Path, checksum: bool = False) -> str | None:
    """``torch.save(obj)`` written atomically. With ``checksum``, the sha256 of the bytes goes to
    ``PATH.sha256``, renamed into place *before* the file itself, so every file at ``path`` has its
    checksum beside it (a kill in between leaves only a stray sidecar); returns the hex digest."""
    path, sha = Path(path), hashlib.sha256()

    def sidecar():
        atomic_write_text(checksum_path(path), f"{sha.hexdigest()}  {path.name}\n")
    atomic_write(path, lambda f: torch.save(obj, _HashingWriter(f, sha) if checksum else f),
                 before_rename=sidecar if checksum else None)
    return sha.hexdigest() if checksum else None


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checksum_path(path: str | Path) -> Path:
    """The sidecar holding a file's sha256, in `sha256sum` format (`sha256sum -c` checks it)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ----------------------------------------------------------------------------- run logs

def append_log(path: str | Path, rec: dict) -> None:
    """One record as a line of the JSON-lines log ``path``."""
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def truncate_log(path: str | Path, step: int) -> None:
    """Keep the records of steps up to ``step`` (a resumed run logs the later ones again)."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:  # a line cut short by a kill mid-write
            print(f"warning: dropping a damaged line of {path}: {line[:80]!r}", file=sys.stderr)
            continue
        if rec is not None and rec.get("step", math.inf) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# ----------------------------------------------------------------------------- keyed caches

def read_cache(path: str | Path, key: dict) -> dict | None:
    """The cached dict at ``path`` if it was made for ``key``; else None (with a warning unless the file
    is absent): it must be rebuilt."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or corrupt: torch raises various types
        warnings.warn(f"cache {path} is unreadable ({type(err).__name__}: {err}); rebuilding", stacklevel=3)
        return None
    if isinstance(data, dict) and data.get("key") == key:
        return data
    warnings.warn(f"cache {path} is stale (other sources, resolution or format); rebuilding", stacklevel=3)
    return None


def save_cache(path: str | Path, key: dict, payload: dict) -> dict:
    """``payload`` with its ``key``, written atomically for `read_cache`; returns what was written."""
    data = {**payload, "key": key}
    atomic_save(data, path)
    return data


def record_files(record: str | Path, key: dict, files: list[Path]) -> None:
    """Vouch for cache files another library wrote: their key and each one's size, in ``record``."""
    atomic_write_text(record, json.dumps({"key": key, "files": {f.name: f.stat().st_size for f in files}},
                                         sort_keys=True))


def record_problem(record: str | Path, key: dict, files: list[Path], describe: Callable = repr) -> str | None:
    """Why ``files`` cannot be taken as made for ``key`` by their ``record`` (another key, described by
    ``describe``, or a file that changed size since), or None when they can."""
    try:
        saved = json.loads(Path(record).read_text())
    except (OSError, ValueError):
        saved = {}
    if not isinstance(saved, dict) or saved.get("key") != key:
        return f"it was made for {describe(saved.get('key') if isinstance(saved, dict) else None)}, not {describe(key)}"
    sizes = saved.get("files", {})
    changed = [f.name for f in files if sizes.get(f.name) != f.stat().st_size]
    return f"{changed[0]} changed size after it was written (truncated or replaced)" if changed else None


# ----------------------------------------------------------------------------- checkpoints

CKPT_KEYS = ("step", "config", "model", "emas", "opt")
# Checkpoints written before None meant "the registry's or the paper's value" hold -1 in these fields.
_SENTINEL_FIELDS = ("attn_drop", "proj_drop", "align_depth", "align_coef", "mask_ratio")


def checkpoints(out_dir: str | Path) -> list[Path]:
    return sorted(Path(out_dir).glob("ckpt-*.pt"))


def save_checkpoint(out_dir: str | Path, state: dict, keep: int) -> Path:
    """``state`` (a dict of `CKPT_KEYS`, plus the head) as ``ckpt-<step>.pt``, atomic and checksummed;
    all but the newest ``keep`` checkpoints of ``out_dir`` are then removed."""
    path = Path(out_dir) / f"ckpt-{state['step']:08d}.pt"
    atomic_save(state, path, checksum=True)
    for old in checkpoints(out_dir)[:-keep]:
        old.unlink()
        checksum_path(old).unlink(missing_ok=True)
    return path


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A training checkpoint, verified: its sha256 against the sidecar (when there is one; files
    written before checksums existed have none and are checked by loading only), then loaded, then
    checked to hold a pixelrepa training state. Raises `CheckpointError` naming the file."""
    path = Path(path)
    side = checksum_path(path)
    if side.is_file():
        want = (side.read_text().split() or [""])[0].lower()
        got = sha256_file(path)
        if got != want:
            raise CheckpointError(f"checkpoint {path} fails its checksum (sha256 {got[:16]}..., but "
                                  f"{side.name} records {want[:16] or 'nothing'}...): the file is corrupt or truncated")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated zip, bad pickle, ...
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from err
    missing = [k for k in CKPT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a pixelrepa training checkpoint (it has no {', '.join(missing)} "
                              "entries); move it out of the run directory")
    if isinstance(state["config"], dict):
        state["config"] = {k: None if k in _SENTINEL_FIELDS and v == -1 else v for k, v in state["config"].items()}
    return state


def latest_checkpoint(out_dir: str | Path, map_location="cpu", verbose: bool = True) -> tuple[Path, dict] | None:
    """(path, state) of the newest usable checkpoint in ``out_dir``, or None. A corrupt, truncated or
    foreign one is reported on stderr (file and reason) and the previous one used."""
    for path in reversed(checkpoints(out_dir)):
        try:
            return path, read_checkpoint(path, map_location)
        except CheckpointError as err:
            if verbose:
                print(f"warning: {err}; trying the previous one", file=sys.stderr, flush=True)
    return None


def load_latest(out_dir: str | Path, map_location="cpu") -> dict | None:
    """The newest checkpoint that passes `read_checkpoint`; a bad one is reported and the previous one used."""
    found = latest_checkpoint(out_dir, map_location)
    return None if found is None else found[1]


def read_run(path: str | Path, map_location="cpu") -> tuple[Path, dict]:
    """(file, state) of a checkpoint file, or of a run directory's newest usable checkpoint."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path, map_location)
        if found is None:
            raise FileNotFoundError(f"no readable checkpoint (ckpt-*.pt) in {path}")
        return found
    if path.is_file():
        return path, read_checkpoint(path, map_location)
    raise FileNotFoundError(f"no checkpoint file or run directory at {path}")


def clean_partial_writes(out_dir: str | Path):
    """Remove what a process killed while saving leaves behind: temporary files and stray sidecars."""
    out_dir = Path(out_dir)
    for tmp in sorted(out_dir.glob(".*.tmp")):  # checkpoints, and text records
        print(f"note: removing {tmp}, a write that was interrupted", file=sys.stderr, flush=True)
        tmp.unlink(missing_ok=True)
    for side in out_dir.glob("ckpt-*.pt.sha256"):
        if not side.with_name(side.name.removesuffix(".sha256")).exists():
            side.unlink(missing_ok=True)


def _state_dict_diff(module: nn.Module, sd: dict) -> str:
    """What keeps ``sd`` from loading into ``module``, in a line: missing, unexpected and reshaped entries."""
    if not isinstance(module, nn.Module) or not isinstance(sd, dict):
        return ""
    own = module.state_dict()
    missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
    shaped = [f"{k}: checkpoint {tuple(sd[k].shape)} vs network {tuple(own[k].shape)}" for k in own
              if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)]
    parts = [f"{len(v)} {what} (e.g. {', '.join(v[:2])})" for v, what in
             ((shaped, "of another shape"), (missing, "missing"), (unexpected, "unexpected")) if v]
    return "; ".join(parts)


def load_weights(module, sd: dict, path, what: str) -> None:
    """``module.load_state_dict(sd)`` (a network or an optimizer), or `CheckpointError` naming the
    file ``path``, ``what`` was loaded and which entries do not fit."""
    try:
        module.load_state_dict(sd)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
        why = _state_dict_diff(module, sd) or "; ".join(l.strip() for l in str(err).splitlines() if l.strip())[:400]
        raise CheckpointError(f"the {what} weights in {path} do not fit this network ({why}); was the checkpoint "
                              "made with another model size, method or number of classes?") from None


def load_jit(path: str | Path, which: str = "ema0", device: str | torch.device = "cpu") -> tuple[JiT, dict]:
    """A trained JiT from a checkpoint file or run directory (its newest checkpoint), without any head.

    ``which``: "model" (raw weights) or "ema0", "ema1" (the EMA copies, decays in config order).
    Returns the network in eval mode and the run's config dict. A file failing its checksum, not a
    pixelrepa checkpoint, or holding weights of another size raises `CheckpointError`.
    """
    path, state = read_run(path)
    net, cfg = jit_from_state(state, which, path)
    return net.to(device), cfg


def jit_from_state(state: dict, which: str = "ema0", path: str | Path = "the checkpoint") -> tuple[JiT, dict]:
    """The JiT (eval mode, on the CPU) of a loaded checkpoint ``state`` and the run's config dict;
    ``which`` as in `load_jit`, ``path`` only names the file in errors."""
    cfg = state["config"]
    names = ["model"] + [f"ema{i}" for i in range(len(state["emas"]))]
    if which not in names:
        raise ValueError(f"which={which!r}: {path} holds {', '.join(names)}")
    sd = state["model"] if which == "model" else state["emas"][int(which.removeprefix("ema"))]
    if not isinstance(cfg, dict) or cfg.get("model") not in MODELS or "y_embedder.weight" not in sd:
        raise CheckpointError(f"{path}: its config names no known model ({cfg.get('model') if isinstance(cfg, dict) else cfg!r}) "
                              "or its weights are not a JiT's")
    num_classes = sd["y_embedder.weight"].shape[0] - 1
    net = JiT(jit_config(cfg["model"], cfg["resolution"], num_classes, attn_drop=cfg.get("attn_drop"),
                         proj_drop=cfg.get("proj_drop")))
    load_weights(net, sd, path, f"{which} ({cfg['model']} at {cfg['resolution']} px)")
    return net.eval(), cfg
