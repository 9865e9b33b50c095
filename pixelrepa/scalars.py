"""Training metrics also to TensorBoard, beside the JSON-lines log, where tensorboard is installed (the
reference code logs there). Every number of a log record becomes a scalar at its step, under the
record's own key (loss, lr, loss_t0.00-0.25, align_cos, eval_fid, ...), in ``<out_dir>/tensorboard``:

    tensorboard --logdir runs/

Without the tensorboard package nothing is written and one note says so, once per process; the JSON
log is the record either way. A resumed run purges the events after its checkpoint's step, as its
JSON log drops those lines.
"""
from __future__ import annotations

import numbers
import sys
from pathlib import Path

_noted = False


def writer_class():
    """torch's SummaryWriter, or None without the tensorboard package. The import is lazy: the package
    is optional, and importing it costs about a second that runs without it need not pay."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def open_writer(out_dir: str | Path, start_step: int = 0, note: bool = True):
    """A writer for the run in ``out_dir`` resumed at ``start_step`` (events from that step on are
    purged), or None where tensorboard is not installed (noted once on stderr with ``note``)."""
    global _noted
    cls = writer_class()
    if cls is None:
        if note and not _noted:
            print("note: tensorboard is not installed; metrics go to metrics.jsonl only", file=sys.stderr, flush=True)
            _noted = True
        return None
    return cls(log_dir=str(Path(out_dir) / "tensorboard"), purge_step=start_step or None)


def write(writer, rec: dict) -> None:
    """The numbers of one log record as scalars at ``rec['step']``."""
    if writer is None:
        return
    for key, value in rec.items():
        if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
            writer.add_scalar(key, value, rec["step"])


def close(writer) -> None:
    if writer is not None:
        writer.close()
