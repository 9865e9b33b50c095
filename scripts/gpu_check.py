"""The GPU check: one script, sized to finish in under 8 minutes on one H200, that needs no .venv.

    make gpu-check                                    # on the GPU machine: its own python3 (3.12, torch 2.11)
    python3 scripts/gpu_check.py --out "$OUT"         # the same; results under --out
    python3 scripts/gpu_check.py --dry_run --out /tmp/gc   # every stage on the CPU at toy sizes (checks the script)

It runs with the machine's preinstalled PyTorch and packages; what is missing there (torch-fidelity)
travels as pure-Python wheels in ``.whl/`` (``make gpu-wheels`` downloads them where PyPI is reachable)
and is installed into a temporary folder on the PYTHONPATH. Stages, each a subprocess with its own time
limit, the whole under ``--budget`` seconds (a stage that cannot finish in what is left is skipped):

1. ``environment``: versions, the device, the missing packages.
2. ``cuda_tests``: ``pytest -m gpu tests/test_gpu.py`` (a bf16 autocast training step for each method,
   torch.compile, DINOv2 on the GPU, a one-process nccl run of training and evaluation).
3. ``evaluate``: ``python -m pixelrepa.evaluate`` on a JiT-B/16 checkpoint in the reference layout
   (randomly initialised and perturbed, imported through pixelrepa.interop), 256 samples, Heun 50 steps,
   guidance 2.9 in (0.1, 1.0), bf16: the protocol's throughput; its FID is a pipeline check only.
4. ``bench_train_sample``: the bench's train and sample rows for JiT-B/16 at 256 px (ours against
   the reference-style path, MFU, peak memory).
5. ``bench_methods``: the MTA's step overhead with DINOv2-B/14 targets run on every batch (eager).

Weights: DINOv2 and torch-fidelity's Inception are used where this machine has them (``$PIXELREPA_DINOV2``
or a Hugging Face cache; ``$PIXELREPA_INCEPTION`` or the torch hub cache); otherwise their architectures
randomly initialised, which time the same and say so in the results (FID and IS values then mean nothing).

Results: ``OUT/gpu_check.json`` (rewritten after every stage, so a cut-off run still reports what it
did), ``OUT/gpu_tests.xml`` (pytest's report) and ``OUT/<stage>.log`` (the end of each stage's output).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # pixelrepa and benchmarks from this checkout, not an installed copy
NEEDED = ("torch", "numpy", "PIL", "scipy", "timm", "tqdm", "torch_fidelity", "threadpoolctl", "pytest", "yaml",
          "safetensors")
WHEELS = ROOT / ".whl"
LOG_TAIL = 20_000


def now() -> float:
    return time.monotonic()


class Check:
    def __init__(self, out: Path, budget: float, dry_run: bool):
        self.out, self.deadline, self.dry_run = out, now() + budget, dry_run
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.result = {"script": "scripts/gpu_check.py", "dry_run": dry_run, "budget_s": budget, "stages": {}}
        self.work = Path(tempfile.mkdtemp(prefix="pixelrepa-gpu-check-"))

    def save(self):
        (self.out / "gpu_check.json").write_text(json.dumps(self.result, indent=1))

    def stage(self, name: str, cmd: list[str], limit: float, parse=None, need: float = 30.0) -> dict:
        """Run ``cmd`` with at most ``limit`` seconds (and what the budget leaves); record it."""
        left = self.deadline - now()
        if left < need:
            rec = {"skipped": f"budget: {left:.0f} s left, this stage needs about {need:.0f}"}
        else:
            t0 = now()
            try:
                r = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True,
                                   timeout=min(limit, left))
                rc, out = r.returncode, r.stdout + r.stderr
            except subprocess.TimeoutExpired as err:
                rc, out = "timeout", (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
            (self.out / f"{name}.log").write_text(out[-LOG_TAIL:])
            rec = {"rc": rc, "seconds": round(now() - t0, 1), "command": " ".join(cmd[1:])}
            if parse is not None:
                try:
                    rec.update(parse(out))
                except Exception as err:  # a stage's output that could not be read is reported, not fatal
                    rec["parse_error"] = f"{type(err).__name__}: {err}"
        self.result["stages"][name] = rec
        self.save()
        print(f"[gpu-check] {name}: {json.dumps(rec)[:300]}", flush=True)
        return rec


def install_wheels(work: Path) -> list[str]:
    """Packages missing here that ``.whl/`` brings: installed into ``work/site`` (no network, no deps)."""
    missing = [m for m in NEEDED if not _importable(m)]
    if missing and WHEELS.is_dir() and list(WHEELS.glob("*.whl")):
        site = work / "site"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *map(str, WHEELS.glob("*.whl"))], check=True)
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return [m for m in NEEDED if not _importable(m)]


def _importable(module: str) -> bool:
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                       env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    return r.returncode == 0


def random_inception(path: Path) -> Path:
    """torch-fidelity's InceptionV3 randomly initialised (finite logits, so IS runs too), as a weights
    file: for machines without the standard one. Its FID and IS check the pipeline, nothing more."""
    from unittest import mock
    import torch
    from torch_fidelity import FeatureExtractorInceptionV3
    torch.manual_seed(0)
    with mock.patch("torch.load", return_value={}), mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="none")
    torch.save(net.state_dict(), path)
    return path


def reference_jit_checkpoint(path: Path, model: str, resolution: int, classes: int) -> Path:
    """A JiT in the reference code's layout (tests/reference_layout.py), random weights perturbed so its
    samples are not flat grey; for timing the protocol."""
    import torch
    sys.path.insert(0, str(ROOT / "tests"))
    from dataclasses import asdict
    from reference_layout import reference_checkpoint
    from pixelrepa.jit import build_jit
    from pixelrepa.train import TrainConfig
    torch.manual_seed(0)
    net = build_jit(model, resolution, classes)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    sd = net.state_dict()
    cfg = asdict(TrainConfig(model=model, resolution=resolution, batch_size=1024, steps=1251 * 10, cfg_scale=2.9))
    state = {"step": 1251 * 2, "model": sd, "head": {}, "emas": [sd, sd], "opt": {"state": {}}}
    torch.save(reference_checkpoint(cfg, state, data_path="/data/imagenet", n_images=1_281_167, world=8, adapter=False),
               path)
    return path


def json_lines(out: str) -> list[dict]:
    rows = []
    for line in out.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def pytest_summary(out: str) -> dict:
    last = [line for line in out.splitlines() if " passed" in line or " failed" in line or " skipped" in line
            or " error" in line]
    return {"summary": last[-1].strip("= ") if last else None}


def bench_rows(out: str) -> dict:
    keep = ("figure", "model", "method", "batch", "images_per_s", "speedup_vs_reference_style", "mfu",
            "achieved_tflops", "model_flops_per_image", "peak_memory", "step_time_vs_jit", "mta_overhead_cached_targets",
            "mta_overhead_encoder_included", "agreement_with_reference_style", "targets", "settings", "device")
    return {"rows": [{k: r[k] for k in keep if k in r} for r in json_lines(out)]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-results")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for everything (default 7.5 minutes)")
    p.add_argument("--dry_run", action="store_true", help="every stage on the CPU at toy sizes")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, a.budget, a.dry_run)
    py = sys.executable
    missing = install_wheels(check.work)
    check.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {"python": platform.python_version(), "executable": py, "missing_packages": missing}
    if "torch" not in missing:
        import torch
        env.update(torch=torch.__version__, cuda=torch.version.cuda, device=torch.cuda.get_device_name(0)
                   if torch.cuda.is_available() else None)
    check.result["environment"] = env
    check.save()
    if missing:
        print(f"[gpu-check] missing packages {missing}: bring them as wheels in .whl/ (make gpu-wheels)", file=sys.stderr)
        sys.exit(2)
    import torch
    if not torch.cuda.is_available() and not a.dry_run:
        print("[gpu-check] torch sees no CUDA device", file=sys.stderr)
        sys.exit(2)
    device = "cpu" if a.dry_run else "cuda"

    # weights: the machine's own, else random-init architectures (said so in the results)
    hub = Path(torch.hub.get_dir()) / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    if not os.environ.get("PIXELREPA_INCEPTION") and not hub.is_file():
        check.env["PIXELREPA_INCEPTION"] = str(random_inception(check.work / "inception-random.pth"))
        check.result["inception_weights"] = "random init (no standard weights here): FID and IS check the pipeline only"
    else:
        check.result["inception_weights"] = os.environ.get("PIXELREPA_INCEPTION") or str(hub)
    check.save()

    check.stage("cuda_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "tests/test_gpu.py",
                               f"--junitxml={out / 'gpu_tests.xml'}"], limit=200, parse=pytest_summary, need=60)

    model, res, classes, n = ("JiT-Ti/4", 32, 10, 20) if a.dry_run else ("JiT-B/16", 256, 1000, 256)
    ckpt = reference_jit_checkpoint(check.work / "checkpoint-last.pth", model, res, classes)
    import numpy as np
    np.savez(check.work / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048) * 0.01)  # pipeline check only
    check.stage("evaluate", [py, "-m", "pixelrepa.evaluate", str(ckpt), "--ref_stats", str(check.work / "stats.npz"),
                             "--num_images", str(n), "--batch_size", "128", "--steps", "4" if a.dry_run else "50",
                             "--cfg_scale", "2.9", "--device", device, "--out_dir", str(check.work / "eval"),
                             "--data_dir", str(check.work / "data"), "--save_npz", "true", "--progress", "false"],
                limit=150, parse=lambda o: {"rows": json_lines(o)}, need=40)

    bench = [py, "-m", "benchmarks.bench", "--device", device, "--num_classes", str(classes), "--no_timm"]
    if a.dry_run:
        bench += ["--model", "JiT-Ti/4", "--resolution", "32", "--batch", "4", "--steps", "1", "--rounds", "1",
                  "--sample_batch", "2", "--sample_steps", "2", "--sample_rounds", "1", "--no_compile", "--no_memory"]
    else:
        bench += ["--steps", "5", "--rounds", "3", "--sample_rounds", "2"]
    check.stage("bench_train_sample", bench + ["--figures", "train", "sample"], limit=260, parse=bench_rows, need=120)
    check.stage("bench_methods", bench + ["--figures", "methods", "--no_compile"] + (["--encoder", "none"] if a.dry_run else []),
                limit=120, parse=bench_rows, need=45)
    check.result["total_s"] = round(a.budget - (check.deadline - now()), 1)
    check.save()
    shutil.rmtree(check.work, ignore_errors=True)
    failed = [k for k, v in check.result["stages"].items() if v.get("rc") not in (0, None)]
    print(f"[gpu-check] wrote {out / 'gpu_check.json'}; failed stages: {failed or 'none'}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
