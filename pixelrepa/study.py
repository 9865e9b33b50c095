"""The study: one parameter set per profile, the training runs the notebooks share, and the runner.

    python -m pixelrepa.study --profile quick          # what `make study` runs
    python -m pixelrepa.study --profile cpu --train-only   # only the training runs, resumable

A profile is a papermill parameter file, ``papermill_runs/profiles/<name>.yaml``, holding values for
the ``StudyParams`` fields. Every notebook opens with the same ``parameters`` cell and turns it into a
``StudyParams``; a training run is named by (method, resolution, seed) and trained once under
``runs_dir/<profile>/``, whichever notebook asks first (later ones, and reruns, find it finished). The
runner executes the notebooks in order into ``papermill_runs/<profile>/``, skips those already done
with the same parameters, and ends with ``SUMMARY.md`` (static figures and the FID table).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .data import atomic_write_text

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
    methods: tuple = METHODS
    seeds: tuple = (0,)
    steps: int = 40
    batch_size: int = 32
    blr: float = 2e-3
    warmup_epochs: float = 1.0
    ema_decays: tuple = (0.99, 0.995)
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
    nproc: int = 1  # > 1: each run goes through torchrun with this many processes
    device: str = "auto"
    compile: bool = False
    progress: bool = True
    runs_dir: str = "runs"  # checkpoints (not committed)
    results_dir: str = ""  # figures and tables; empty: papermill_runs/<profile>

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"StudyParams.{name}={getattr(self, name)!r}: {why}")
        from .jit import MODELS
        for f in dataclasses.fields(self):
            v, d = getattr(self, f.name), f.default
            if isinstance(d, tuple):
                if not isinstance(v, (list, tuple)) or not v:
                    bad(f.name, "must be a non-empty list")
                setattr(self, f.name, tuple(v))
            elif isinstance(d, bool):
                if not isinstance(v, bool):
                    bad(f.name, "must be true or false")
            elif isinstance(d, float):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    bad(f.name, "must be a number")
                setattr(self, f.name, float(v))
            elif isinstance(d, int):
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    bad(f.name, "must be an integer >= 0")
            elif not isinstance(v, str):
                bad(f.name, "must be a string")
        if not self.profile.replace("-", "").replace("_", "").isalnum():
            bad("profile", "must be a plain name (letters, digits, - and _)")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            bad("methods", f"unknown {unknown}; valid: {', '.join(METHODS)}")
        for name in ("model_low", "model_high"):
            if getattr(self, name) not in MODELS:
                bad(name, f"unknown model; valid names: {', '.join(MODELS)}")
        p_low, p_high = MODELS[self.model_low]["patch_size"], MODELS[self.model_high]["patch_size"]
        if self.low_res % p_low or self.high_res % p_high:
            bad("low_res" if self.low_res % p_low else "high_res", "must be divisible by its model's patch size")
        if self.low_res // p_low != self.high_res // p_high:
            bad("high_res", f"{self.high_res}/{p_high} tokens per side differ from low_res "
                            f"{self.low_res}/{p_low}: the resolution comparison needs one token count")
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds):
            bad("seeds", "must be integers >= 0")
        if self.nproc < 1:
            bad("nproc", "must be >= 1")
        if not 0 <= self.hack_t < 1:
            bad("hack_t", "must be in [0, 1)")
        for name in ("steps", "batch_size", "eval_samples", "eval_steps", "sample_steps", "hack_per_class",
                     "hack_steps", "n_boot", "low_res", "high_res"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
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
        return _path(self.results_dir or f"papermill_runs/{self.profile}")

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


def _path(p: str | Path) -> Path:
    p = Path(p).expanduser()
    return p if p.is_absolute() else ROOT / p


# ----------------------------------------------------------------------------- profiles

def profile_path(name: str) -> Path:
    return PROFILE_DIR / f"{name}.yaml"


def profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str) -> StudyParams:
    """A profile's parameters, checked strictly: an unknown name or an ill-typed value is an error
    naming the field, before any work starts (papermill alone would only warn)."""
    import yaml
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

def run_config(P: StudyParams, method: str, resolution: int, seed: int):
    from .train import TrainConfig
    return TrainConfig(
        model=P.model(resolution), dataset=P.dataset, resolution=resolution, train_images=P.train_images,
        data_dir=str(_path(P.data_dir)), out_dir=str(run_dir(P, method, resolution, seed)), steps=P.steps,
        batch_size=P.batch_size, blr=P.blr, warmup_epochs=P.warmup_epochs, ema_decays=P.ema_decays,
        seed=seed, ckpt_every=max(1, min(P.steps, P.eval_every or P.steps)), log_every=max(1, min(10, P.steps)),
        device=P.device, compile=P.compile, num_samples=P.num_samples, sample_steps=P.sample_steps,
        cfg_scale=P.cfg_scale, progress=P.progress, method=method, encoder=P.encoder,
        encoder_weights=P.encoder_weights, proj_hidden=P.proj_hidden, eval_every=P.eval_every,
        eval_samples=P.eval_samples, eval_steps=P.eval_steps, eval_real=P.eval_real,
        noise_scale=P.noise_scale_low if resolution == P.low_res else P.noise_scale_high)


def run_dir(P: StudyParams, method: str, resolution: int, seed: int) -> Path:
    return _path(P.runs_dir) / P.profile / f"{method}-{resolution}px-s{seed}"


# What decides a run's result: a finished run whose record differs in any of these is not reused.
_RESULT_FIELDS = ("model", "dataset", "resolution", "train_images", "steps", "batch_size", "blr", "warmup_epochs",
                  "ema_decays", "seed", "method", "encoder", "proj_hidden", "cfg_scale", "eval_every",
                  "eval_samples", "eval_steps", "eval_real", "noise_scale", "num_samples", "sample_steps")


def _record(cfg) -> dict:
    d = asdict(cfg)
    return {k: d[k] for k in _RESULT_FIELDS}


def ensure_run(P: StudyParams, method: str, resolution: int, seed: int, wait: bool = True) -> Path | None:
    """The run's directory, trained to the end first unless it already is (resuming a partial run).

    Trains in this process, or through torchrun when ``P.nproc > 1``. A run is finished when its
    ``done.json`` matches the configuration; one made with other settings is an error, not reused.
    One process at a time works on a run (a lock file, let go when its process ends, however it
    ends): another waits for it, or with ``wait=False`` gets None at once.
    """
    import fcntl
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


def _ensure_run(P: StudyParams, cfg, out: Path) -> Path:
    done = out / "done.json"
    if done.exists():
        rec, want = json.loads(done.read_text()), json.loads(json.dumps(_record(cfg)))
        if rec == want:
            return out
        diff = {k: (rec.get(k), v) for k, v in want.items() if rec.get(k) != v}
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
        from .train import train
        train(cfg)
    atomic_write_text(done, json.dumps(_record(cfg), indent=1))
    return out


def train_all(P: StudyParams) -> None:
    """Train every run of the plan, skipping any that another worker holds (a lock file per run, let go
    when its process ends, however it ends): start several of these to share the plan."""
    runs = plan(P)
    for k, (m, res, seed) in enumerate(runs):
        print(f"[study] run {k + 1}/{len(runs)}: {m} at {res}px, seed {seed}", flush=True)
        if ensure_run(P, m, res, seed, wait=False) is None:
            print(f"[study] run {k + 1}/{len(runs)} is held by another worker", flush=True)


def plan(P: StudyParams) -> list[tuple[str, int, int]]:
    """Every (method, resolution, seed) the notebooks train, seed by seed so that a partial profile
    already holds complete comparisons: jit and repa at both resolutions, every method at high_res."""
    runs = []
    for seed in P.seeds:
        for res in (P.low_res, P.high_res):
            for m in P.methods:
                if res == P.high_res or m in ("jit", "repa"):
                    runs.append((m, res, seed))
    return runs


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def curves(P: StudyParams, methods, resolution: int, key: str = "eval_fid") -> list[dict]:
    """One row per (method, seed, logged step) that has ``key``: the convergence curves."""
    rows = []
    for m in methods:
        for seed in P.seeds:
            for rec in read_metrics(run_dir(P, m, resolution, seed)):
                if key in rec:
                    rows.append({"method": m, "resolution": resolution, "seed": seed, "step": rec["step"],
                                 "images": rec["images"], key: rec[key]})
    return rows


def final_rows(P: StudyParams, methods=None, resolutions=None, key: str = "eval_fid") -> list[dict]:
    """Each finished run's last logged ``key`` (the FID at the end of training)."""
    rows = []
    for m, res, seed in plan(P):
        if (methods and m not in methods) or (resolutions and res not in resolutions):
            continue
        recs = [r for r in read_metrics(run_dir(P, m, res, seed)) if key in r]
        if recs and recs[-1]["step"] == P.steps:
            rows.append({"method": m, "resolution": res, "seed": seed, "images": recs[-1]["images"], key: recs[-1][key]})
    return rows


def compare(rows: list[dict], a: str, b: str, resolution: int, key: str = "eval_fid", lower_is_better: bool = True) -> dict:
    """a minus b, paired by seed, with a 95% t-interval across seeds: which is better, or neither."""
    va = {r["seed"]: r[key] for r in rows if r["method"] == a and r["resolution"] == resolution}
    vb = {r["seed"]: r[key] for r in rows if r["method"] == b and r["resolution"] == resolution}
    seeds = sorted(set(va) & set(vb))
    if not seeds:
        return {"a": a, "b": b, "resolution": resolution, "n_seeds": 0, "better": "no data"}
    diffs = [va[s] - vb[s] for s in seeds]
    m, lo, hi = mean_interval(diffs)
    if len(seeds) < 2:
        better = "inconclusive (1 seed)"
    elif hi < 0:
        better = a if lower_is_better else b
    elif lo > 0:
        better = b if lower_is_better else a
    else:
        better = "neither (the interval spans 0)"
    return {"a": a, "b": b, "resolution": resolution, "n_seeds": len(seeds),
            f"{a}_{key}": round(sum(va[s] for s in seeds) / len(seeds), 2),
            f"{b}_{key}": round(sum(vb[s] for s in seeds) / len(seeds), 2),
            "diff": round(m, 2), "diff_lo": round(lo, 2), "diff_hi": round(hi, 2), "better": better,
            "seeds_needed": seeds_needed(diffs)}


def seeds_needed(diffs, level: float = 0.95, most: int = 1000) -> int | None:
    """Paired seeds at which a 95% t-interval would exclude 0 if the mean difference and its seed-to-seed
    spread stayed as observed (a planning figure, not a test); None below 2 seeds, for a zero mean, or
    beyond ``most``."""
    import numpy as np
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2 or d.mean() == 0:
        return None
    n = np.arange(2, most + 1)
    resolved = n[_half_width(float(d.std(ddof=1)), n, level) < abs(float(d.mean()))]
    return int(resolved[0]) if len(resolved) else None


def speedup(P: StudyParams, fast: str, slow: str, resolution: int, key: str = "eval_fid") -> dict:
    """Training images ``fast`` needs to reach ``slow``'s final value (seed-mean curves, linear
    interpolation between evaluation points), and the ratio to ``slow``'s images."""
    import numpy as np

    def mean_curve(m):
        pts = {}
        for r in curves(P, [m], resolution, key):
            pts.setdefault(r["images"], []).append(r[key])
        xs = sorted(pts)
        return xs, [float(np.mean(pts[x])) for x in xs]
    xf, yf = mean_curve(fast)
    xs, ys = mean_curve(slow)
    if not xf or not xs:
        return {"fast": fast, "slow": slow, "resolution": resolution, "speedup": None, "note": "no curves"}
    target = ys[-1]
    reach = None
    for i, (x, y) in enumerate(zip(xf, yf)):
        if y <= target:
            if i == 0:
                reach = x
            else:  # between the previous point (above target) and this one
                x0, y0 = xf[i - 1], yf[i - 1]
                reach = x0 + (x - x0) * (y0 - target) / (y0 - y)
            break
    return {"fast": fast, "slow": slow, "resolution": resolution, f"{slow}_final": round(target, 2),
            f"{fast}_final": round(yf[-1], 2), "slow_images": xs[-1],
            "fast_images_to_reach": None if reach is None else round(reach),
            "speedup": None if reach is None else round(xs[-1] / reach, 2),
            "note": "" if reach is not None else f"{fast} never reached {slow}'s final value"}


def _judge(checks: list[tuple[dict, str]]) -> tuple[str, str]:
    """(verdict, evidence) from comparisons and the winner the paper expects for each."""
    if not checks or any(c.get("n_seeds", 0) == 0 for c, _ in checks):
        return "not run", "missing results"
    def spans_zero(c):  # tables saved before seeds_needed existed lack it: say nothing rather than guess
        return str(c.get("better", "")).startswith("neither") and "seeds_needed" in c
    evidence = "; ".join(f"{c['a']} - {c['b']} at {c['resolution']}: {c.get('diff')} "
                         f"[{c.get('diff_lo')}, {c.get('diff_hi')}] over {c['n_seeds']} seed(s)"
                         + (f" (about {c.get('seeds_needed') or '> 1000'} seeds to tell)" if spans_zero(c) else "")
                         for c, _ in checks)
    wins = [c["better"] == want for c, want in checks]
    opposite = [c["better"] in (c["a"], c["b"]) and c["better"] != want for c, want in checks]
    if all(wins):
        return "reproduced", evidence
    if any(opposite):
        return "not reproduced", evidence
    return "inconclusive at this scale", evidence


def verdicts(P: StudyParams) -> list[dict]:
    """One verdict per claim of the paper (REFERENCE.md), from the tables notebooks 02-05 saved."""
    t = load_tables(P)
    out = []
    res = {r["resolution"]: r for r in t.get("resolution", [])}
    checks = [(res[P.low_res], "repa"), (res[P.high_res], "jit")] if len(res) == 2 else []
    out.append(("1. REPA helps at low resolution and hurts at high resolution", *_judge(checks)))
    fh = {r["resolution"]: r for r in t.get("feature_hacking_verdict", [])}
    checks = [(fh["most"], "jit"), (fh["least"], "repa")] if len(fh) == 2 else []
    out.append(("2. Feature hacking: JiT beats REPA on the most-similar subset, REPA wins the least-similar", *_judge(checks)))
    mta = {(r["a"], r["b"]): r for r in t.get("mta", [])}
    want = {("adapter", "repa"): "adapter", ("adapter", "jit"): "jit", ("pixelrepa", "jit"): "pixelrepa"}
    checks = [(mta[k], w) for k, w in want.items() if k in mta] if len(mta) >= 3 else []
    out.append(("3. The unmasked adapter beats REPA but not JiT; masking (PixelREPA) beats JiT", *_judge(checks)))
    final = [r for r in t.get("mta", []) if (r["a"], r["b"]) == ("pixelrepa", "jit")]
    sp = (t.get("speedup") or [{}])[0]
    verdict, evidence = _judge([(final[0], "pixelrepa")] if final else [])
    if verdict == "reproduced" and not (sp.get("speedup") or 0) >= 2:
        verdict = "partly reproduced (better final FID, not > 2x faster)"
    out.append(("4. PixelREPA beats JiT in final FID and converges > 2x faster", verdict,
                f"{evidence}; speedup {sp.get('speedup')} ({sp.get('note') or 'images to reach JiT final FID'})"))
    return [{"claim": c, "verdict": v, "evidence": e} for c, v, e in out]


def study_data(P: StudyParams, resolution: int):
    """The training images at ``resolution`` (the profile's subset) and their encoder tokens (N, T, D),
    read from the same cache training uses."""
    from . import encoders, train
    from .jit import jit_config
    cfg = run_config(P, "jit", resolution, P.seeds[0])  # the data fields are the same for every run
    ds = train.training_set(cfg, progress=P.progress)
    grid = jit_config(cfg.model, resolution, ds.num_classes).grid
    enc = encoders.build_encoder(P.encoder, grid, weights=P.encoder_weights or None)
    feats = train.cached_targets(cfg, enc, ds, progress=P.progress)
    return ds, feats[0]


def mean_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and a t-interval across seeds (NaN bounds for a single value)."""
    import numpy as np
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    h = float(_half_width(float(v.std(ddof=1)), len(v), level))
    return m, m - h, m + h


def _half_width(sd: float, n, level: float = 0.95):
    """Half-width of a ``level`` t-interval for the mean of ``n`` values with standard deviation ``sd``
    (``n`` may be an array of sample sizes)."""
    import numpy as np
    from scipy import stats
    n = np.asarray(n)
    return stats.t.ppf(0.5 + level / 2, n - 1) * sd / np.sqrt(n)


def save_table(P: StudyParams, name: str, rows: list[dict]) -> Path:
    """A result table as JSON under the profile's results folder (the summary and notebook 05 read it)."""
    path = P.results / "tables" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    return path


def load_tables(P: StudyParams) -> dict[str, list[dict]]:
    folder = P.results / "tables"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.exists() else {}


# ----------------------------------------------------------------------------- the runner

def notebooks() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def check_notebook_parameters(nbs: list[Path]) -> None:
    """Every notebook's parameters cell must define every StudyParams field, and nothing else."""
    import papermill as pm
    fields = {f.name for f in dataclasses.fields(StudyParams)}
    for nb in nbs:
        names = set(pm.inspect_notebook(str(nb)))
        if names != fields:
            raise ValueError(f"{nb.name}: its parameters cell defines {sorted(names - fields)} extra and lacks "
                             f"{sorted(fields - names)}")


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:16]


def run_profile(P: StudyParams, only: list[str] | None = None, force: bool = False) -> Path:
    """Execute the notebooks in order into the results folder; resume where an earlier call stopped."""
    import papermill as pm
    nbs = [nb for nb in notebooks() if not only or any(nb.name.startswith(o) for o in only)]
    if not nbs:
        raise ValueError(f"no notebook matches {only}; notebooks: {[nb.name for nb in notebooks()]}")
    check_notebook_parameters(nbs)
    out = P.results
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    params = asdict(P)
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
    key_params = json.dumps({k: v for k, v in params.items() if k != "progress"}, sort_keys=True).encode()
    for nb in nbs:
        key = _digest(key_params, nb.read_bytes())
        target = out / nb.name
        if not force and state.get(nb.name) == key and target.exists():
            print(f"[study] {nb.name}: done earlier with these parameters, skipped")
            continue
        print(f"[study] {nb.name} -> {target}", flush=True)
        try:
            pm.execute_notebook(str(nb), str(target), parameters=params, cwd=str(NOTEBOOK_DIR),
                                kernel_name="python3", progress_bar=False, log_output=False)
        except pm.PapermillExecutionError as err:
            raise RuntimeError(f"notebook {nb.name} failed in cell {err.cell_index + 1} (counting from 1 in the "
                               f"executed notebook, papermill's injected-parameters cell included; execution "
                               f"count {err.exec_count}): {err.ename}: {err.evalue}; the executed notebook, error "
                               f"included, is {target}; rerun to resume from this notebook") from None
        state[nb.name] = key
        atomic_write_text(state_path, json.dumps(state, indent=1))
    collect_runs(P)
    return write_summary(P)


def collect_runs(P: StudyParams) -> None:
    """Copy each run's small results (metrics log, config, sample grid) next to the notebooks."""
    for m, res, seed in plan(P):
        src = run_dir(P, m, res, seed)
        if not (src / "done.json").exists():
            continue
        dst = P.results / "runs" / src.name
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "config.json", "samples.png", "done.json"):
            if (src / name).exists():
                shutil.copy2(src / name, dst / name)


def write_summary(P: StudyParams) -> Path:
    lines = [f"# Study summary: profile `{P.profile}`", "",
             f"Executed notebooks, figures and tables in this folder. Parameters: `papermill_runs/profiles/{P.profile}.yaml`.", ""]
    tables = load_tables(P)
    fid = tables.get("final_fid")
    if fid:
        cols = list(fid[0])
        lines += ["## Final FID", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in fid] + [""]
    verdicts = tables.get("verdicts")
    if verdicts:
        lines += ["## Verdicts", ""] + [f"- **{v['claim']}**: {v['verdict']} ({v['evidence']})" for v in verdicts] + [""]
    figs = sorted((P.results / "figures").glob("*.png")) if (P.results / "figures").exists() else []
    if figs:
        lines += ["## Figures", ""] + [f"![{f.stem}](figures/{f.name})" for f in figs] + [""]
    path = P.results / "SUMMARY.md"
    path.write_text("\n".join(lines))
    print(f"[study] summary: {path}")
    return path


def _fmt(v):
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pixelrepa.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="quick", help=f"a name ({', '.join(profiles())}) or a .yaml path")
    p.add_argument("--notebooks", nargs="*", help="only these (by prefix, e.g. 00 02)")
    p.add_argument("--train-only", action="store_true",
                   help="train every run the notebooks need, nothing else; workers started alike share the "
                        "plan (e.g. one single-threaded process per core: small models train faster that way)")
    p.add_argument("--force", action="store_true", help="re-execute notebooks already done")
    a = p.parse_args(argv)
    try:
        P = load_profile(a.profile)
    except ValueError as err:
        p.error(str(err))
    print(P, flush=True)
    try:
        if a.train_only:
            train_all(P)
        else:
            run_profile(P, a.notebooks, a.force)
    except (RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
