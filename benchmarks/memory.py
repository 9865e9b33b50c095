"""Peak memory of one contender: the allocator's peaks on CUDA, the resident set of a fresh process on the CPU.

On the CPU the benchmark runs each contender in a process of its own (``python -m benchmarks.bench
--memory_child SPEC``), with glibc's mmap threshold fixed at 64 KiB so that freed tensors leave the
RSS at once, and resets Linux's VmHWM after the warm-up (``/proc/self/clear_refs``).
"""
from __future__ import annotations

import gc
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc: freed tensors leave the RSS at once

WHAT = {
    "cuda": "torch.cuda.max_memory_allocated, in this process, contenders built one at a time: peak_mib is "
            "the peak over building, warm-up and one step above what was allocated before building "
            "(weights, optimiser state, EMAs, activations); step_peak_mib the peak of one step above "
            "what was allocated just before it",
    "cpu": "resident set size of a fresh process per contender (glibc mmap threshold 64 KiB, so freed "
           "tensors leave it), /proc VmHWM reset after the warm-up: peak_mib is the peak over one step "
           "above the RSS after imports (weights, optimiser state, EMAs, activations, and for compiled "
           "contenders the compiler's resident memory); step_peak_mib the peak of the step above the "
           "RSS just before it; sampling contenders: one call of 2 steps (a call's peak does not grow "
           "with its step count)",
}


def status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        return True
    except OSError:
        return False


def warm_up(c) -> None:
    if c.warmup is not None:
        c.warmup()
    else:
        c.step()


def cpu_peak(build: Callable) -> dict:
    """In the fresh process, after its imports: build and warm up a contender, then one step's peaks."""
    rss0 = status_kib("VmRSS")
    c = build()
    warm_up(c)
    gc.collect()
    rss1 = status_kib("VmRSS")
    reset = reset_peak_rss()
    c.step()
    peak = status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": round((peak - rss0) / 1024, 1), "step_peak_mib": round((peak - rss1) / 1024, 1),
            "peak_rss_reset_after_warmup": reset}


def in_subprocess(spec: dict, timeout: float = 1800) -> dict:
    """``cpu_peak`` of the contender ``spec`` describes, in a fresh process with this one's thread count."""
    env = {**os.environ, **CHILD_ENV,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--memory_child", json.dumps(spec),
                        "--threads", str(torch.get_num_threads())],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode or not lines:
        return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def cuda_peak(build: Callable, device: torch.device):
    """CUDA: build, warm up and step one contender, reading the allocator's peaks; (contender, peaks)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    c = build()
    warm_up(c)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    peak_build = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    c.step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return c, {"peak_mib": round((max(peak, peak_build) - base) / 2**20, 1),
               "step_peak_mib": round((peak - before) / 2**20, 1)}
