"""The study: one parameter set per profile, and the training runs the notebooks share.

    python -m pixelrepa.study --profile quick          # what `make study` runs
    python -m pixelrepa.study --profile cpu --train-only   # only the training runs, resumable
    python -m pixelrepa.study --profile decisive --report  # the notebooks on the runs finished so far

A profile is a papermill parameter file, ``papermill_runs/profiles/<name>.yaml``, holding values for
the ``StudyParams`` fields. Every notebook opens with the same ``parameters`` cell and turns it into a
``StudyParams``; a training run is named by (method, resolution, seed) and trained once under
``runs_dir/<profile>/``, whichever notebook asks first (later ones, and reruns, find it finished). The
runner (`runner.py`) trains the runs, executes the notebooks in order into ``papermill_runs/<profile>/``,
skips those already done with the same parameters, and ends with ``SUMMARY.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from . import encoders, stats
from .config import ConfigError, check_types, refuse, shared
from .align import DEFAULT_COEF
from .jit import MODELS, jit_config
from .storage import append_log, atomic_write_text, load_jit
from .train import TrainConfig, cached_targets, train, training_set

ROOT = Path(__file__).resolve().parents[1]
PROFILE_DIR = ROOT / "papermill_runs" / "profiles"
NOTEBOOK_DIR = ROOT / "notebooks"
METHODS = ("jit", "repa", "adapter", "pixelrepa")


@dataclass
class StudyParams:
    """Everything a profile sets. Relative paths are relative to the repository root."""
    profile: str = "smoke"
    dataset: str = "openclipart"
    data_dir: str = "data"
    train_images: int = 256  # a fixed subset of the train split: many passes in little time (0: all)
    low_res: int = 32  # the resolution pair with one token count: low_res / patch_low == high_res / patch_high
    high_res: int = 64
    model_low: str = "JiT-Ti/4"
    model_high: str = "JiT-Ti/8"
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0,)
    steps: int = 40
    batch_size: int = 32
    blr: float = 2e-3
    warmup_epochs: float = 1.0
    ema_decays: tuple[float, ...] = (0.99, 0.995)
    encoder: str = "effnet-lite0"
    encoder_weights: str = ""
    proj_hidden: int = 2048
    cfg_scale: float = 2.0
    noise_scale_low: float = 1.0  # JiT: 1.0 at 256 px, 2.0 at 512 px
    noise_scale_high: float = 1.0
    eval_every: int = 20  # FID/KID against the held-out split during training: the convergence curves
    eval_samples: int = 64
    eval_steps: int = 10
    eval_real: int = 0  # held-out images in the FID reference (0: the whole eval split)
    num_samples: int = 16  # the sample grid saved by every run
    sample_steps: int = 20
    hack_per_class: int = 4  # feature hacking: images per class in the most/least similar subsets
    hack_t: float = 0.5
    hack_steps: int = 10
    n_boot: int = 200
    # evaluation records of every finished run (evals.jsonl): what the statistics (stats.py) read
    eval_seed: int = 2026  # the samples' noise: one fixed stream for every run, independent of its training seed
    final_samples: int = 0  # > 0: each run scored at its end with this many samples (0: the curve's last point)
    final_sample_seeds: int = 1  # sampling seeds the end score is averaged over (eval_seed, eval_seed + 1, ...)
    half_scores: tuple[str, ...] | None = None  # arms also scored at steps // 2 (claim 4's speed); None: none
    dose_seeds: tuple[int, ...] | None = None  # seeds of the dose arms (method_xK); None: seeds
    probe_images: int = 0  # > 0: the pixel probe fits on this many training images (tests on held-out ones)
    probe_ts: tuple[float, ...] = (0.25, 0.5, 0.75)
    margin: float = 0.10  # equivalence margin: this share of the baseline's FID above the floor
    calibration: str = "papermill_runs/calibration/records.jsonl"  # the floor (real-vs-real FID) per N
    nproc: int = 1  # > 1: each run goes through torchrun with this many processes
    device: str = "auto"
    compile: bool = False
    progress: bool = True
    runs_dir: str = "runs"  # checkpoints (not committed)
    results_dir: str = ""  # figures and tables; empty: papermill_runs/<profile>

    def __post_init__(self):
        check_types(self)
        for f in dataclasses.fields(self):
            if type(getattr(self, f.name)) is int and getattr(self, f.name) < 0:
                refuse(self, f.name, "must be an integer >= 0")
        if not self.profile.replace("-", "").replace("_", "").isalnum():
            refuse(self, "profile", "must be a plain name (letters, digits, - and _)")
        unknown = [m for m in self.methods if split_arm(m) is None]
        if unknown:
            refuse(self, "methods", f"unknown {unknown}; valid: {', '.join(METHODS)}, or a method with its "
                                    f"alignment coefficient scaled, e.g. repa_x4 (four times the paper's)")
        for name in ("half_scores",):
            if getattr(self, name) and not set(getattr(self, name)) <= set(self.methods):
                refuse(self, name, "must name arms of methods")
        if not self.final_sample_seeds >= 1:
            refuse(self, "final_sample_seeds", "must be >= 1")
        if not self.margin > 0:
            refuse(self, "margin", "must be > 0")
        for name in ("model_low", "model_high"):
            if getattr(self, name) not in MODELS:
                refuse(self, name, f"unknown model; valid names: {', '.join(MODELS)}")
        p_low, p_high = MODELS[self.model_low]["patch_size"], MODELS[self.model_high]["patch_size"]
        if self.low_res % p_low or self.high_res % p_high:
            refuse(self, "low_res" if self.low_res % p_low else "high_res", "must be divisible by its model's patch size")
        if self.low_res // p_low != self.high_res // p_high:
            refuse(self, "high_res", f"{self.high_res}/{p_high} tokens per side differ from low_res "
                                     f"{self.low_res}/{p_low}: the resolution comparison needs one token count")
        if not all(s >= 0 for s in self.seeds):
            refuse(self, "seeds", "must be integers >= 0")
        if self.nproc < 1:
            refuse(self, "nproc", "must be >= 1")
        if not 0 <= self.hack_t < 1:
            refuse(self, "hack_t", "must be in [0, 1)")
        for name in ("steps", "batch_size", "eval_samples", "eval_steps", "sample_steps", "hack_per_class",
                     "hack_steps", "n_boot", "low_res", "high_res"):
            if getattr(self, name) < 1:
                refuse(self, name, "must be >= 1")
        for res in (self.low_res, self.high_res):  # every run's config must build: fail here, not an hour in
            for m in self.methods:
                run_config(self, m, res, self.seeds[0])

    @classmethod
    def from_namespace(cls, ns: dict) -> "StudyParams":
        """From a notebook's globals after its parameters cell: every field must be defined there."""
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in ns]
        if missing:
            raise NameError(f"the parameters cell does not define {missing}")
        return cls(**{f.name: ns[f.name] for f in dataclasses.fields(cls)})

    @property
    def results(self) -> Path:
        return output_path(self.results_dir or f"papermill_runs/{self.profile}")

    def model(self, resolution: int) -> str:
        if resolution not in (self.low_res, self.high_res):
            raise ValueError(f"resolution {resolution} is neither low_res {self.low_res} nor high_res {self.high_res}")
        return self.model_low if resolution == self.low_res else self.model_high

    def __str__(self):
        return "\n".join(f"{f.name:>15} = {getattr(self, f.name)!r}" for f in dataclasses.fields(self))


def parameters_cell(P: StudyParams) -> str:
    """The source of a notebook's ``parameters`` cell: one flat literal per field."""
    lines = ["# Parameters (papermill replaces them from papermill_runs/profiles/<profile>.yaml)"]
    for f in dataclasses.fields(P):
        v = getattr(P, f.name)
        lines.append(f"{f.name} = {list(v) if isinstance(v, tuple) else v!r}")
    return "\n".join(lines)


def repo_path(p: str | Path) -> Path:
    p = Path(p).expanduser()
    return p if p.is_absolute() else ROOT / p


def output_path(p: str | Path) -> Path:
    """Where a relative ``runs_dir`` or ``results_dir`` lies: under $PIXELREPA_OUTPUT_ROOT where it is set
    (the test run sets it to a temporary folder, so that the notebooks nbval executes train and write
    nowhere in the checkout), else under the repository root."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else Path(os.environ.get("PIXELREPA_OUTPUT_ROOT") or ROOT) / p


# ----------------------------------------------------------------------------- profiles

def profile_path(name: str) -> Path:
    return PROFILE_DIR / f"{name}.yaml"


def profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str) -> StudyParams:
    """A profile's parameters, checked strictly: an unknown name or an ill-typed value is an error
    naming the field, before any work starts (papermill alone would only warn)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = profile_path(name_or_path)
        if not path.exists():
            raise ValueError(f"unknown profile {name_or_path!r}; valid profiles: {', '.join(profiles())}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a profile is a mapping of parameter: value, got {type(raw).__name__}")
    fields = {f.name for f in dataclasses.fields(StudyParams)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"{path}: unknown parameter(s) {unknown}; valid names: {', '.join(sorted(fields))}")
    try:
        return StudyParams(**raw)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


# ----------------------------------------------------------------------------- training runs

def run_config(P: StudyParams, method: str, resolution: int, seed: int) -> TrainConfig:
    """One run's TrainConfig: every field it shares with StudyParams as the profile sets it, and the
    few below. A value TrainConfig refuses is reported as the StudyParams field it came from."""
    low = resolution == P.low_res
    own = {  # TrainConfig field: (value, the StudyParams field it comes from)
        "model": (P.model(resolution), "model_low" if low else "model_high"),
        "resolution": (resolution, "low_res" if low else "high_res"),
        "noise_scale": (P.noise_scale_low if low else P.noise_scale_high, "noise_scale_low" if low else "noise_scale_high"),
        "method": (split_arm(method)[0], "methods"),
        "align_coef": (None if split_arm(method)[1] is None else split_arm(method)[1] * DEFAULT_COEF[split_arm(method)[0]],
                       "methods"),
        "ckpt_every": (P.steps // 2 if P.half_scores and P.steps % 2 == 0 else
                       max(1, min(P.steps, P.eval_every or P.steps)), "eval_every"),
        "seed": (seed, "seeds"),
        "data_dir": (str(repo_path(P.data_dir)), "data_dir"),
        "out_dir": (str(run_dir(P, method, resolution, seed)), "runs_dir"),
        "log_every": (max(1, min(10, P.steps)), "steps"),
    }
    try:
        return TrainConfig(**{**shared(P, TrainConfig), **{k: v for k, (v, _) in own.items()}})
    except ConfigError as err:
        source = own[err.field][1] if err.field in own else err.field
        if not hasattr(P, source):
            raise
        raise ConfigError(type(P).__name__, source, getattr(P, source), err.why) from None


def split_arm(arm: str) -> tuple[str, float | None] | None:
    """An arm's (method, factor on the paper's alignment coefficient): "repa" -> ("repa", None),
    "repa_x4" -> ("repa", 4.0) (the dose-response arms); None if it is not a valid arm name."""
    method, _, factor = arm.partition("_x")
    if method not in METHODS or (factor and method == "jit"):
        return None
    try:
        return (method, float(factor)) if factor else (method, None)
    except ValueError:
        return None


def run_dir(P: StudyParams, method: str, resolution: int, seed: int) -> Path:
    return output_path(P.runs_dir) / P.profile / f"{method}-{resolution}px-s{seed}"


# What decides a run's result: a finished run whose record differs in any of these is not reused.
_RESULT_FIELDS = ("model", "dataset", "resolution", "train_images", "steps", "batch_size", "blr", "warmup_epochs",
                  "ema_decays", "seed", "method", "align_coef", "eval_seed", "encoder", "proj_hidden", "cfg_scale", "eval_every",
                  "eval_samples", "eval_steps", "eval_real", "noise_scale", "num_samples", "sample_steps")


def _record(cfg) -> dict:
    d = asdict(cfg)
    return {k: d[k] for k in _RESULT_FIELDS}


def ensure_run(P: StudyParams, method: str, resolution: int, seed: int, wait: bool = True) -> Path | None:
    """The run's directory, trained to the end first unless it already is (resuming a partial run).

    Trains in this process, or through torchrun when ``P.nproc > 1``. A run is finished when its
    ``done.json`` matches the configuration; one made with other settings is an error, not reused.
    One process at a time works on a run (a lock file, let go when its process ends, however it
    ends): another waits for it, or with ``wait=False`` gets None at once. Under `report_only`, it
    trains nothing: `finished_run`.
    """
    if report_only():
        return finished_run(P, method, resolution, seed)
    cfg = run_config(P, method, resolution, seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                return None
            print(f"[study] {out.name}: another process is training it; waiting", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_run(P, cfg, out)


# Set (to anything but 0) by `--report`: ensure_run trains nothing and evaluates nothing; the notebooks
# use the runs already finished, here or as committed copies (a protocol that spans sessions, whose
# checkpoints do not outlive the session that trained them, is reported from its logs).
REPORT_ONLY = "PIXELREPA_REPORT_ONLY"


def report_only() -> bool:
    return os.environ.get(REPORT_ONLY, "") not in ("", "0")


def finished_run(P: StudyParams, method: str, resolution: int, seed: int) -> Path | None:
    """The finished run's folder (trained and evaluated: `evaluated`): under ``runs_dir`` (with its
    checkpoints), else its committed copy next to the results (logs, evaluation records and sample grid
    only); None if neither is. A finished run made with other settings is an error, as in `ensure_run`."""
    want = json.loads(json.dumps(_record(run_config(P, method, resolution, seed))))
    here = run_dir(P, method, resolution, seed)
    for folder in (here, P.results / "runs" / here.name):
        done = folder / "done.json"
        if done.exists():
            rec = json.loads(done.read_text())
            if rec != want:
                raise ValueError(f"{folder} holds a finished run with other settings {_differences(rec, want)} "
                                 f"(finished vs asked)")
            if evaluated(P, folder):
                return folder
    return None


def _differences(rec: dict, want: dict) -> dict:
    """{field: (finished, asked)} where a finished run's record differs from the one asked for."""
    return {k: (rec.get(k), v) for k, v in want.items() if rec.get(k) != v}


def _ensure_run(P: StudyParams, cfg, out: Path) -> Path:
    done = out / "done.json"
    if done.exists():
        rec, want = json.loads(done.read_text()), json.loads(json.dumps(_record(cfg)))
        if rec == want:
            ensure_evals(P, out)
            return out
        diff = _differences(rec, want)
        # Only more steps: the learning rate is constant after warm-up and batches and noise are a
        # function of (seed, step), so resuming from the last checkpoint is the longer run itself.
        if set(diff) != {"steps"} or rec["steps"] > cfg.steps:
            raise ValueError(f"{out} holds a finished run with other settings {diff} (finished vs asked); "
                             f"delete it or use another runs_dir")
        print(f"[study] extending {out.name} from {rec['steps']} to {cfg.steps} steps", flush=True)
    if P.nproc > 1:
        args = [a for k, v in asdict(cfg).items() for a in ([f"--{k}", *map(str, v)] if isinstance(v, tuple) else [f"--{k}", str(v)])]
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={P.nproc}",
                        "-m", "pixelrepa.train", *args], check=True)
    else:
        train(cfg)
    atomic_write_text(done, json.dumps(_record(cfg), indent=1))
    ensure_evals(P, out)
    return out


def missing_evals(P: StudyParams, name: str, have: list[dict]) -> tuple[list[tuple[int, int]], bool, bool]:
    """What the evaluation records ``have`` of run ``name`` still lack: the (step, sampling seed) end
    scores, whether the feature-hacking subsets, whether the pixel probe (`ensure_evals` adds them)."""
    arm, res, _ = parse_run(name)

    def missing(**kw):
        return not any(all(r.get(k) == v for k, v in kw.items()) for r in have)
    todo = [(step, P.eval_seed + k) for step in [P.steps] + ([P.steps // 2] if arm in (P.half_scores or ()) else [])
            for k in range(P.final_sample_seeds)
            if P.final_samples and missing(kind="score", step=step, n=P.final_samples, sample_seed=P.eval_seed + k)]
    return (todo, bool(P.hack_per_class and res == P.high_res and missing(kind="subset")),
            bool(P.probe_images and missing(kind="probe")))


def evaluated(P: StudyParams, folder: Path) -> bool:
    """A run folder with ``done.json`` and every evaluation record the profile asks for: what is reported
    and committed (training ends before the evaluations are written)."""
    from .stats import read_jsonl
    return (folder / "done.json").exists() and not any(missing_evals(P, folder.name, read_jsonl(folder / "evals.jsonl")))


def ensure_evals(P: StudyParams, out: Path) -> list[dict]:
    """The evaluation records of a finished run (``evals.jsonl``), computed where missing, while its
    checkpoints are still here (they are not committed; the records are): the score at the end with
    ``final_samples`` samples per sampling seed (with the memorisation check), at ``steps // 2`` for
    the ``half_scores`` arms, the feature-hacking subsets at ``high_res``, and the pixel probe."""
    import torch
    from . import diagnostics, metrics
    from .data import load_dataset
    from .flow import SamplerConfig
    from .stats import read_jsonl, rounded
    arm, res, seed = parse_run(out.name)
    cfg = run_config(P, arm, res, seed)
    path = out / "evals.jsonl"
    have = read_jsonl(path)

    def add(rec):
        rec = rounded(rec, 6)
        append_log(path, rec)  # one line per record: a kill loses at most the record being written
        have.append(rec)

    device = "cuda" if P.device == "cuda" else "cpu"
    todo, need_subset, need_probe = missing_evals(P, out.name, have)
    if not (todo or need_subset or need_probe):
        return have
    started = time.perf_counter()
    ds, targets = study_data(P, res)
    if todo:
        scfg = SamplerConfig(steps=P.eval_steps, cfg_scale=P.cfg_scale, noise_scale=cfg.noise_scale, t_eps=cfg.t_eps)
        # The memorisation check compares with as many training images as there are held-out ones: a
        # fixed random draw of the run's training images, so only those need Inception features.
        n_held = len(load_dataset(P.dataset, res, "eval", cfg.data_dir, progress=False))
        n_held = min(P.eval_real or n_held, n_held)
        pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(P.eval_seed))[:n_held]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(P.dataset)).name)
        train_features = metrics.image_features(ds.images[pick], f"{slug}-{res}px-train{len(pick)}",
                                                data_dir=cfg.data_dir, device=device)
    net, at = None, None  # the model loaded, and its step: each checkpoint is read once
    for step, sseed in sorted(todo):  # the end last: the diagnostics below use it too
        print(f"[study] {out.name}: scoring step {step}, {P.final_samples} samples, sampling seed {sseed}", flush=True)
        if at != step:
            (net, _), at = load_jit(out / f"ckpt-{step:08d}.pt", device=device), step
        m = metrics.evaluate_model(net, dataset=P.dataset, resolution=res, num_classes=ds.num_classes,
                                   n=P.final_samples, sampler=scfg, sample_seed=sseed, data_dir=cfg.data_dir,
                                   n_real=P.eval_real, device=device,
                                   train_features=train_features if step == P.steps else None)
        add({"kind": "score", "step": step, **m})
    if at != P.steps:
        net, _ = load_jit(out / f"ckpt-{P.steps:08d}.pt", device=device)
    if need_subset:
        print(f"[study] {out.name}: feature-hacking subsets", flush=True)
        dcfg = diagnostics.DiagnosticConfig(n_per_class=P.hack_per_class, t=P.hack_t, steps=P.hack_steps,
                                            n_boot=P.n_boot, encoder=P.encoder, data_dir=cfg.data_dir, seed=seed)
        for r in diagnostics.feature_hacking({arm: net}, ds.images, ds.labels, targets.float(), dcfg):
            add({"kind": "subset", "step": P.steps, **{k: v for k, v in r.items() if k != "model"}})
    if need_probe:
        print(f"[study] {out.name}: pixel probe", flush=True)
        held = load_dataset(P.dataset, res, "eval", cfg.data_dir, progress=False)
        n, m = min(P.probe_images, len(ds)), min(max(2, P.probe_images // 2), len(held))
        for r in diagnostics.pixel_probe(net, cfg.align.depth(net.cfg), (ds.images[:n], ds.labels[:n]),
                                         (held.images[:m], held.labels[:m]), targets[:n], ts=P.probe_ts,
                                         noise_scale=cfg.noise_scale, seed=seed):
            add({"kind": "probe", "step": P.steps, **r})
    # How long they took (what `runner.expected_minutes` plans a session's runs by; a kill loses the line
    # of the part it cut, and the resumed evaluations write their own).
    append_log(out / TIMES, {"phase": "evals", "seconds": round(time.perf_counter() - started, 1),
                             "threads": torch.get_num_threads()})
    return have


# A run's timing records (``{"phase": "evals", "seconds": ..., "threads": ...}`` per evaluation pass),
# committed with its logs. Training's own time is in its metrics log (images over images_per_s).
TIMES = "times.jsonl"


def parse_run(name: str) -> tuple[str, int, int]:
    """(arm, resolution, seed) of a run directory's name, ``<arm>-<res>px-s<seed>``."""
    from .stats import RUN_NAME
    m = RUN_NAME.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a run directory name (<arm>-<res>px-s<seed>)")
    return m["arm"], int(m["res"]), int(m["seed"])


def arm_seeds(P: StudyParams, arm: str) -> tuple[int, ...]:
    """The seeds an arm is trained with: ``dose_seeds`` for the dose arms (where set), else ``seeds``."""
    return (P.dose_seeds or P.seeds) if split_arm(arm)[1] is not None else P.seeds


def plan(P: StudyParams) -> list[tuple[str, int, int]]:
    """Every (arm, resolution, seed) the profile trains: jit and repa at both resolutions, every arm at
    high_res; the dose arms (method_xK) with ``dose_seeds``. Seed by seed, so that a partial profile
    already holds complete comparisons, and the main arms' seeds before the dose arms' (the verdicts
    rest on the main arms; the dose arms are a secondary analysis)."""
    runs = [(m, res, seed) for seed in sorted(set(P.seeds) | set(P.dose_seeds or ())) for res in (P.low_res, P.high_res)
            for m in P.methods if seed in arm_seeds(P, m) and (res == P.high_res or m in ("jit", "repa"))]
    return sorted(runs, key=lambda r: split_arm(r[0])[1] is not None)  # a stable sort: seed order kept


def runs(P: StudyParams) -> list[dict]:
    """Every run log of the profile (stats.load_runs over its committed copies), after copying the
    finished runs' logs there (`collect_runs`)."""
    collect_runs(P)
    return stats.load_runs(P.results / "runs")


def tables(P: StudyParams, collect: bool = True) -> dict[str, list[dict]]:
    """Every table and verdict of the profile, computed from its run logs (stats.tables); with
    ``collect``, after copying the finished runs' logs next to the results (`collect_runs`)."""
    if collect:
        collect_runs(P)
    return stats.tables(P.results / "runs", low_res=P.low_res, high_res=P.high_res, steps=P.steps, margin=P.margin,
                        calibration=repo_path(P.calibration), n_eval=P.final_samples or P.eval_samples)


def write_tables(P: StudyParams) -> dict[str, list[dict]]:
    """The tables as JSON under the results folder (what the summary shows and a test recomputes);
    tables of an older layout there are removed (git keeps them)."""
    t = tables(P)
    folder = P.results / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.json"):
        if old.stem not in t:
            old.unlink()
    for name, rows in t.items():
        atomic_write_text(folder / f"{name}.json", json.dumps(stats.rounded(rows), indent=1) + "\n")
    return t


def prepare_data(P: StudyParams) -> None:
    """The data caches of both resolutions, built where missing in one decoding pass (a built-in
    dataset; an ImageFolder is read as it is)."""
    from . import data as datalib
    if P.dataset in datalib.DATASETS:
        datalib.build_caches(P.dataset, (P.low_res, P.high_res), run_config(P, "jit", P.low_res, P.seeds[0]).data_dir,
                             progress=P.progress)


def study_data(P: StudyParams, resolution: int):
    """The training images at ``resolution`` (the profile's subset) and their encoder tokens (N, T, D),
    read from the same cache training uses."""
    cfg = run_config(P, "jit", resolution, P.seeds[0])  # the data fields are the same for every run
    ds = training_set(cfg, progress=P.progress)
    grid = jit_config(cfg.model, resolution, ds.num_classes).grid
    enc = encoders.build_encoder(P.encoder, grid, weights=P.encoder_weights or None)
    feats = cached_targets(cfg, enc, ds, progress=P.progress)
    return ds, feats[0]


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns


def collect_runs(P: StudyParams) -> None:
    """Copy each finished run's small results (training log, evaluation records, config, sample grid)
    next to the notebooks, where they are committed: every table is computed from these copies."""
    for m, res, seed in plan(P):
        src = run_dir(P, m, res, seed)
        if not evaluated(P, src):  # still training or evaluating
            continue
        dst = P.results / "runs" / src.name
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "evals.jsonl", TIMES, "config.json", "samples.png", "done.json"):
            a, b = src / name, dst / name
            if a.exists() and not (b.exists() and _same_file(a.stat(), b.stat())):
                shutil.copy2(a, b)  # keeps the time stamp: copied once, however often asked



def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pixelrepa.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="quick", help=f"a name ({', '.join(profiles())}) or a .yaml path")
    p.add_argument("--notebooks", nargs="*", help="only these (by prefix, e.g. 00 02)")
    p.add_argument("--train-only", action="store_true",
                   help="train every run the notebooks need, nothing else; workers started alike share the "
                        "plan (e.g. one single-threaded process per core: small models train faster that way)")
    p.add_argument("--report", action="store_true",
                   help="train and evaluate nothing: execute the notebooks (00-05 unless --notebooks) on the runs "
                        "finished so far, here or committed (a protocol that spans sessions), and write the summary")
    p.add_argument("--force", action="store_true", help="re-execute notebooks already done")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="train the runs in N processes side by side, each with cores/N threads (small CPU "
                        "models train faster so: one per core; `make study` uses every core); default 1")
    p.add_argument("--until", metavar="TIME",
                   help="with --train-only: start only the runs expected to end by TIME (HH:MM, or +MINUTES), "
                        "timed by the profile's finished runs: a session's end filled with the runs that fit")
    p.add_argument("--start", type=int, metavar="N",
                   help="with --train-only and one worker: begin at the plan's run N (1-based, as the logs "
                        "number them: 'run 12/36'), go on in order and wrap around; e.g. a process for a core "
                        "that --until workers left idle (the parallel workers are started so)")
    a = p.parse_args(argv)
    if a.workers < 1:
        p.error(f"--workers must be at least 1, got {a.workers}")
    if a.report and a.train_only:
        p.error("--report trains nothing and --train-only only trains: choose one")
    from . import runner
    if a.until is not None and not a.train_only:
        p.error("--until applies to --train-only (the notebooks train what they need, whatever the time)")
    if a.start is not None and not (a.train_only and a.workers == 1):
        p.error("--start applies to --train-only with one worker (the parallel workers choose their own)")
    try:
        P = load_profile(a.profile)
        until = runner.parse_until(a.until) if a.until is not None else None
    except ValueError as err:
        p.error(str(err))
    if a.start is not None and not 1 <= a.start <= len(plan(P)):
        p.error(f"--start takes a run of the plan, 1 to {len(plan(P))} for profile {P.profile}, not {a.start}")
    print(P, flush=True)
    if until is not None:
        print(f"[study] --until {runner.clock_time(until)}: runs are started only when expected to end by then", flush=True)
    try:
        if a.train_only and a.workers > 1:
            runner.train_parallel(P, a.workers, runner.Clock(), until=until)
        elif a.train_only:
            runner.train_runs(P, runner.Clock(), wait=False, start=(a.start or 1) - 1, until=until)
        else:
            runner.run_profile(P, a.notebooks, a.force, workers=a.workers, report=a.report)
    except (RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
