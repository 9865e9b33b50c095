"""Calibration of the study's evaluation: how low FID can go, and how much of its spread is noise.

    python -m pixelrepa.calibration --profile decisive              # every part (resumable)
    python -m pixelrepa.calibration --profile decisive --part floor

Three measurements, one record each in ``papermill_runs/calibration/records.jsonl`` (appended, so an
interrupted run resumes where it stopped):

- ``floor``: disjoint subsets of real training images, class-matched to the reference as the samples
  are, scored against the reference (the held-out split) at N in `N_FLOOR`: the FID a perfect model
  would get at that N, and its spread.
- ``sampling``: one trained checkpoint per resolution (the profile's JiT, its first seed unless
  ``--seed`` says another) scored with `SAMPLING` sampling seeds at each N: the estimation noise of
  one run's score. Checkpoints are not committed, so a later session scores the JiT seed it has
  trained; the table pools the seeds' spread within each checkpoint.
- the training noise is the seed-to-seed variance of the profile's end scores minus the estimation
  variance at their N (`stats.calibration_table`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import metrics, stats, study
from .flow import SamplerConfig, matched_labels
from .storage import atomic_write_text, load_jit

N_FLOOR = (192, 500, 1000, 2000)
MAX_SUBSETS = 10
SAMPLING = {192: 10, 1000: 3}  # N: sampling seeds
OUT = study.ROOT / "papermill_runs" / "calibration"


def _append(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(stats.rounded(rec, 6)) + "\n")


def floor(P: study.StudyParams, resolution: int, path: Path, n_values=N_FLOOR, max_subsets: int = MAX_SUBSETS) -> None:
    """Real-vs-reference records at each N: disjoint class-matched subsets of the train split."""
    data_dir = str(study.repo_path(P.data_dir))
    have = {(r["resolution"], r["n"], r["subset"]) for r in stats.read_jsonl(path) if r.get("kind") == "floor"}
    real, real_labels = metrics.split_features(P.dataset, resolution, "train", data_dir=data_dir)
    ref, ref_labels = metrics.split_features(P.dataset, resolution, "eval", data_dir=data_dir)
    if P.eval_real:
        ref, ref_labels = ref[:P.eval_real], ref_labels[:P.eval_real]
    counts = torch.bincount(ref_labels, minlength=int(real_labels.max()) + 1)
    g = torch.Generator().manual_seed(0)
    pools = [torch.nonzero(real_labels == c).flatten() for c in range(len(counts))]
    pools = [p[torch.randperm(len(p), generator=g)] for p in pools]
    for n in n_values:
        k = min(max_subsets, len(real) // n)  # as many disjoint subsets of n as the train split holds
        need = _class_counts(n, counts, torch.tensor([len(p) for p in pools]) // max(k, 1))
        mismatch = float((need / n - counts / counts.sum()).abs().sum() / 2)  # total variation from the reference's mix
        for i in range(k):
            if (resolution, n, i) in have:
                continue
            idx = torch.cat([p[i * int(q):(i + 1) * int(q)] for p, q in zip(pools, need) if q > 0])
            rec = metrics.score(real[idx], ref) | {"kind": "floor", "resolution": resolution, "n": n, "subset": i,
                                                  "class_mismatch": mismatch,
                                                  "reference": f"{P.dataset} eval split (N={len(ref)})"}
            print(f"[calibration] floor {resolution} px N={n} subset {i + 1}/{k}: FID {rec['fid']:.2f}", flush=True)
            _append(path, rec)


def _class_counts(n: int, counts: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """Images per class for a real subset of ``n``: the reference's mix (`matched_labels`), except that
    no class takes more than ``cap`` (its share of the pool per subset); what a small class cannot
    give goes to the classes with room, in proportion to their reference counts."""
    need = torch.bincount(matched_labels(n, counts), minlength=len(counts))
    need = torch.minimum(need, cap)
    while int(need.sum()) < n:
        room = (cap - need).clamp(min=0) * (counts > 0)
        if int(room.sum()) == 0:
            raise ValueError(f"the train split cannot give disjoint subsets of {n} images")
        extra = torch.bincount(matched_labels(n - int(need.sum()), counts.double() * (room > 0)), minlength=len(counts))
        need = torch.minimum(need + extra, cap)
    return need


def sampling(P: study.StudyParams, resolution: int, path: Path, plan=None, step: int | None = None,
             seed: int | None = None) -> None:
    """One checkpoint's score with several sampling seeds at each N (the estimation noise): the profile's
    JiT (its first seed, or ``seed``) at the end of training, or with ``step`` its checkpoint at that
    step (which must be on disk; the run is not waited for)."""
    plan = plan or SAMPLING
    step = step or P.steps
    seed = P.seeds[0] if seed is None else seed
    run = study.ensure_run(P, "jit", resolution, seed) if step == P.steps else study.run_dir(P, "jit", resolution, seed)
    ckpt = run / f"ckpt-{step:08d}.pt"
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt} is missing: train the run first (or score another --step / --seed)")
    have = {(r["resolution"], r["n"], r["sample_seed"], r["step"], r.get("run")) for r in stats.read_jsonl(path)
            if r.get("kind") == "sampling"}
    own = {(r["n"], r["sample_seed"]): r for r in stats.read_jsonl(run / "evals.jsonl")
           if r.get("kind") == "score" and r.get("step") == step}
    cfg = study.run_config(P, "jit", resolution, seed)
    scfg = SamplerConfig(steps=P.eval_steps, cfg_scale=P.cfg_scale, noise_scale=cfg.noise_scale, t_eps=cfg.t_eps)
    net = None
    for n, k in sorted(plan.items()):
        for s in range(P.eval_seed, P.eval_seed + k):
            if (resolution, n, s, step, run.name) in have:
                continue
            if (n, s) in own:  # the run's own end score is one of these measurements
                m = {key: v for key, v in own[(n, s)].items() if key not in ("kind", "step")}
            else:
                if net is None:
                    net, _ = load_jit(ckpt, device="cpu")
                print(f"[calibration] sampling {resolution} px N={n} seed {s}", flush=True)
                m = metrics.evaluate_model(net, dataset=P.dataset, resolution=resolution, num_classes=net.cfg.num_classes,
                                           n=n, sampler=scfg, sample_seed=s, data_dir=cfg.data_dir, n_real=P.eval_real)
            _append(path, m | {"kind": "sampling", "resolution": resolution, "n": n, "sample_seed": s,
                               "run": run.name, "step": step})


def table(P: study.StudyParams, path: Path | None = None) -> list[dict]:
    """The calibration table (`stats.calibration_table`) from the records at ``path`` (default: the
    profile's) and the profile's committed run logs (for the training noise)."""
    path = path or study.repo_path(P.calibration)
    runs = stats.load_runs(P.results / "runs") if (P.results / "runs").exists() else None
    return stats.calibration_table(stats.read_jsonl(path), runs, P.steps)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pixelrepa.calibration", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="decisive")
    p.add_argument("--part", choices=("floor", "sampling", "all", "table"), default="all",
                   help="table: only write table.json from the records")
    p.add_argument("--resolution", type=int, nargs="*", help="default: both of the profile's")
    p.add_argument("--records", default=None, help="default: the profile's `calibration` path")
    p.add_argument("--step", type=int, default=None, help="sampling: score the JiT's checkpoint at this step "
                                                          "(default: the end of its training, trained first if needed)")
    p.add_argument("--n", type=int, nargs="*", choices=sorted(SAMPLING), help="sampling: only these N (default: all)")
    p.add_argument("--seed", type=int, default=None, help="sampling: the JiT training seed whose checkpoint is scored "
                                                          "(default: the profile's first)")
    a = p.parse_args(argv)
    try:
        P = study.load_profile(a.profile)
    except ValueError as err:
        p.error(str(err))
    path = study.repo_path(a.records or P.calibration)
    for res in (a.resolution or (P.low_res, P.high_res)) if a.part != "table" else ():
        if a.part in ("floor", "all"):
            floor(P, res, path)
        if a.part in ("sampling", "all"):
            sampling(P, res, path, plan={n: SAMPLING[n] for n in a.n} if a.n else None, step=a.step, seed=a.seed)
    rows = stats.rounded(table(P, path), 4)
    atomic_write_text(path.parent / "table.json", json.dumps(rows, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
