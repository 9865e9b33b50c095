"""The study's statistics: every table and verdict, computed from the run logs and nothing else.

A results folder holds one directory per training run, ``runs/<arm>-<res>px-s<seed>/``, with
``metrics.jsonl`` (the training log; the FID-curve points among it) and ``evals.jsonl`` (evaluation
records: ``score`` at a step with N samples, ``subset`` for feature hacking, ``probe`` for the
mechanism probe). Notebooks display what this module returns, the runner writes it to ``tables/``;
no table is ever read back to make another. The rules (README, "Protocol"):

- Every comparison is seed-paired: a seed fixes initial weights, batches and noise for every arm, and
  the samples' noise is one fixed stream for every run. Differences are in FID (lower is better).
- Variance: at one resolution, the arms' scores follow an additive arm + seed model (seeds are blocks);
  its residual variance, pooled over the arms with (A - 1)(S - 1) degrees of freedom, gives every
  pairwise difference's standard error when Levene's test does not reject equal residual spread
  across arms (p >= 0.05); otherwise each comparison uses its own paired variance (S - 1 df).
- Each paper prediction is a component with an expected sign. Three one-sided families are tested for
  every component: as the paper (t-test in the expected direction), the other way (the opposite
  direction) and equivalence within the margin (two one-sided tests, TOST: |difference| < margin).
  Holm's correction runs over all components within each family. The margin is ``margin`` times the
  FID of the comparison's baseline above the evaluation's floor (the real-vs-real FID at that N,
  from the calibration), fixed before the runs.
- A claim is *reproduced* when every component goes as the paper; *not reproduced* when one goes the
  other way or is equivalent within the margin; *inconclusive* otherwise. The minimum detectable
  effect (two-sided, 5%, 80% power) says what each comparison could have seen.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
from scipy import optimize, stats as sps

ALPHA, POWER = 0.05, 0.80
RUN_NAME = re.compile(r"^(?P<arm>[a-z]+(?:_x[0-9.]+)?)-(?P<res>\d+)px-s(?P<seed>\d+)$")


# ----------------------------------------------------------------------------- reading the logs

def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def load_runs(folder: str | Path) -> list[dict]:
    """Every run directory under ``folder``: arm, resolution, seed, its training log and evaluations."""
    out = []
    for d in sorted(Path(folder).glob("*")):
        m = RUN_NAME.match(d.name)
        if d.is_dir() and m:
            out.append({"arm": m["arm"], "resolution": int(m["res"]), "seed": int(m["seed"]), "dir": d,
                        "metrics": read_jsonl(d / "metrics.jsonl"), "evals": read_jsonl(d / "evals.jsonl")})
    return out


def scores(runs: list[dict], step: int, key: str = "fid") -> list[dict]:
    """One row per run: ``key`` of its ``score`` records at ``step`` (mean over sampling seeds), or, for
    runs without such records (profiles before evaluation records existed), the training log's
    ``eval_<key>`` curve point at that step."""
    rows = []
    for r in runs:
        recs = [e for e in r["evals"] if e.get("kind") == "score" and e.get("step") == step and key in e]
        if recs:
            v, n, src = float(np.mean([e[key] for e in recs])), recs[0]["n"], f"{len(recs)} sampling seed(s)"
        else:
            curve = [e for e in r["metrics"] if e.get("step") == step and f"eval_{key}" in e]
            if not curve:
                continue
            v, n, src = float(curve[-1][f"eval_{key}"]), curve[-1].get("eval_n"), "training-log curve point"
        rows.append({"arm": r["arm"], "where": r["resolution"], "seed": r["seed"], "value": v, "n": n,
                     "source": src})
    return rows


def subset_scores(runs: list[dict], key: str = "fid") -> list[dict]:
    """Feature-hacking rows: the subset FID of each run's reconstructions, ``where`` = the subset."""
    return [{"arm": r["arm"], "where": e["subset"], "seed": r["seed"], "value": float(e[key]),
             "resolution": r["resolution"], "n": e.get("n")}
            for r in runs for e in r["evals"] if e.get("kind") == "subset" and key in e]


def curves(runs: list[dict], key: str = "eval_fid") -> list[dict]:
    """One row per (run, logged step) that has ``key``: the convergence curves."""
    return [{"method": r["arm"], "resolution": r["resolution"], "seed": r["seed"], "step": e["step"],
             "images": e.get("images"), key: e[key]} for r in runs for e in r["metrics"] if key in e]


# ----------------------------------------------------------------------------- the tests

def mean_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and a t-interval across seeds (NaN bounds for a single value)."""
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    h = float(sps.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - h, m + h


def power(effect: float, sd: float, n: int, df: int, alpha: float = ALPHA) -> float:
    """Power of a two-sided level-``alpha`` t-test of a mean difference ``effect`` with ``n`` paired
    seeds, standard deviation ``sd`` and ``df`` degrees of freedom (non-central t)."""
    crit, ncp = sps.t.ppf(1 - alpha / 2, df), effect * math.sqrt(n) / sd
    # the far tail as sf at -ncp: scipy's nct.cdf returns NaN there for large ncp
    return float(sps.nct.sf(crit, df, ncp) + sps.nct.sf(crit, df, -ncp))


def mde(sd: float, n: int, df: int, alpha: float = ALPHA, target: float = POWER) -> float:
    """The minimum detectable effect: the difference a two-sided level-``alpha`` test detects with
    probability ``target`` (80%) at this spread and number of seeds."""
    if not (sd > 0 and n >= 2 and df >= 1):
        return float("nan")
    hi = 2 * (sps.t.ppf(1 - alpha / 2, df) + 4) * sd / math.sqrt(n)  # well past 80% power
    return float(optimize.brentq(lambda d: power(d, sd, n, df, alpha) - target, 1e-12 * sd, hi, xtol=1e-10 * sd))


def paired_test(diffs, *, expect: int, margin: float, sd: float | None = None, df: int | None = None,
                noninferiority: bool = False, alpha: float = ALPHA) -> dict:
    """One component: the mean of seed-paired differences ``diffs`` and its three one-sided p-values.

    ``expect`` is the sign the paper predicts (+1: the first arm's FID is higher). ``sd``/``df`` replace
    the differences' own spread when a pooled estimate applies. With ``noninferiority`` (a "reaches at
    least" claim, expect = -1), *as the paper* is H0: diff >= +margin rejected and *the other way* is
    H0: diff <= +margin rejected (worse by more than the margin); there is no equivalence branch."""
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    out = {"n_seeds": n, "diff": float(d.mean()) if n else float("nan"), "margin": margin, "pooled": sd is not None}
    if n < 2:
        return out | {"sd": float("nan"), "df": 0, "lo": float("nan"), "hi": float("nan"), "p_paper": float("nan"),
                      "p_other": float("nan"), "p_equiv": float("nan"), "mde": float("nan")}
    if sd is None:
        sd, df = float(d.std(ddof=1)), n - 1
    se = sd / math.sqrt(n)
    if se == 0:  # identical differences: a degenerate case the t-test cannot handle; treat as exact
        se = 1e-12
    m = out["diff"]
    h = sps.t.ppf(1 - alpha / 2, df) * se
    if noninferiority:
        p_paper = float(sps.t.cdf((m - margin) / se, df))  # H0: diff >= margin
        p_other = float(sps.t.sf((m - margin) / se, df))  # H0: diff <= margin
        p_equiv = float("nan")
    else:
        p_paper = float(sps.t.sf(expect * m / se, df))
        p_other = float(sps.t.sf(-expect * m / se, df))
        p_equiv = max(float(sps.t.sf((m + margin) / se, df)), float(sps.t.cdf((m - margin) / se, df)))
    return out | {"sd": sd, "df": int(df), "lo": float(m - h), "hi": float(m + h), "p_paper": p_paper, "p_other": p_other,
                  "p_equiv": p_equiv, "mde": mde(sd, n, df, alpha)}


def pooled_sd(rows: list[dict], arms: list[str], where) -> dict:
    """The residual spread of the additive arm + seed model over ``arms`` at ``where`` (seeds that have
    every arm), as the standard deviation of one paired difference, with Levene's test of equal
    residual spread across arms: {"sd", "df", "levene_p", "justified"}."""
    import pandas as pd
    import statsmodels.formula.api as smf
    sel = [r for r in rows if r["arm"] in arms and r["where"] == where]
    seeds = sorted(set.intersection(*[{r["seed"] for r in sel if r["arm"] == a} for a in arms])) if arms else []
    df_ = pd.DataFrame([r for r in sel if r["seed"] in seeds])
    A, S = len(arms), len(seeds)
    if A < 2 or S < 3:
        return {"sd": None, "df": None, "levene_p": None, "justified": False, "arms": A, "seeds": S}
    fit = smf.ols("value ~ C(arm) + C(seed)", data=df_).fit()
    resid = {a: fit.resid[df_["arm"] == a].to_numpy() for a in arms}
    levene_p = float(sps.levene(*resid.values()).pvalue) if A >= 2 else None
    dof = (A - 1) * (S - 1)
    sd_diff = math.sqrt(2 * fit.ssr / dof)  # a difference of two arms' scores: twice the residual variance
    return {"sd": sd_diff, "df": dof, "levene_p": levene_p, "justified": bool(levene_p is not None and levene_p >= 0.05),
            "arms": A, "seeds": S}


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (statsmodels), NaN entries kept as NaN and not counted."""
    from statsmodels.stats.multitest import multipletests
    p = np.asarray(pvalues, dtype=float)
    out = np.full(len(p), np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out.tolist()


# ----------------------------------------------------------------------------- the claims

def _paired(rows, a, b, where, rows_b=None):
    """(the seeds both arms have at ``where``, a - b per seed, b per seed); b's values come from
    ``rows_b`` where given (another step's scores), else from ``rows``."""
    va = {r["seed"]: r["value"] for r in rows if r["arm"] == a and r["where"] == where}
    vb = {r["seed"]: r["value"] for r in (rows if rows_b is None else rows_b) if r["arm"] == b and r["where"] == where}
    seeds = sorted(set(va) & set(vb))
    return seeds, np.array([va[s] - vb[s] for s in seeds]), np.array([vb[s] for s in seeds])


def _subset_pairs(rows, a, b):
    """(the seeds with both subsets of both arms, a - b on the most-similar subset and on the
    least-similar per seed, b's mean over the two subsets per seed): claim 2's interaction."""
    s_most, d_most, b_most = _paired(rows, a, b, "most")
    s_least, d_least, b_least = _paired(rows, a, b, "least")
    common = sorted(set(s_most) & set(s_least))
    im, il = [s_most.index(s) for s in common], [s_least.index(s) for s in common]
    return common, d_most[im], d_least[il], (b_most[im] + b_least[il]) / 2


def components(runs: list[dict], *, low_res: int, high_res: int, steps: int, floors: dict, margin: float) -> list[dict]:
    """Every paper prediction as a seed-paired component (claim, label, expected sign, test)."""
    final = scores(runs, steps)
    half = scores(runs, steps // 2)
    subsets = subset_scores(runs)
    main_arms = {res: sorted({r["arm"] for r in final if r["where"] == res and "_x" not in r["arm"]})
                 for res in (low_res, high_res)}
    pools = {res: pooled_sd(final, arms, res) | {"arm_list": arms} for res, arms in main_arms.items()}
    out = []

    def add(claim, label, a, b, where, expect, rows=final, diffs=None, base=None, floor=None, noninferiority=False):
        pool = None
        if diffs is None:  # a plain difference of two arms' scores: the pooled spread may serve
            seeds, diffs, base = _paired(rows, a, b, where)
            pool = pools.get(where) if rows is final else None
        base_excess = float(np.mean(base)) - (floor or 0.0) if len(base) else float("nan")
        use = pool is not None and pool["justified"] and {a, b} <= set(pool["arm_list"])
        t = paired_test(diffs, expect=expect, margin=margin * base_excess, noninferiority=noninferiority,
                        sd=pool["sd"] if use else None, df=pool["df"] if use else None)
        out.append({"claim": claim, "component": label, "a": a, "b": b, "where": where, "expect": expect,
                    "baseline_excess": base_excess, "floor": floor, **t,
                    "levene_p": pool["levene_p"] if pool else None,
                    "mde_rel": t["mde"] / base_excess if base_excess and base_excess > 0 else float("nan")})

    add(1, f"REPA - JiT at {low_res} px (paper: REPA better)", "repa", "jit", low_res, -1, floor=floors.get(low_res))
    add(1, f"REPA - JiT at {high_res} px, end of training (paper: REPA worse)", "repa", "jit", high_res, +1,
        floor=floors.get(high_res))
    # claim 2, the interaction: (REPA - JiT) on the most-similar subset minus the same on the least-similar
    _, d_most, d_least, base = _subset_pairs(subsets, "repa", "jit")
    inter = d_most - d_least
    add(2, "(REPA - JiT) on the most-similar subset minus on the least-similar (paper: > 0)", "repa", "jit",
        "most - least", +1, rows=subsets, diffs=inter, base=base)
    add(3, f"adapter - REPA at {high_res} px (paper: adapter better)", "adapter", "repa", high_res, -1,
        floor=floors.get(high_res))
    add(3, f"adapter - JiT at {high_res} px (paper: adapter worse)", "adapter", "jit", high_res, +1,
        floor=floors.get(high_res))
    add(3, f"PixelREPA - JiT at {high_res} px (paper: PixelREPA better)", "pixelrepa", "jit", high_res, -1,
        floor=floors.get(high_res))
    add(4, f"PixelREPA - JiT at {high_res} px, final (paper: PixelREPA better)", "pixelrepa", "jit", high_res, -1,
        floor=floors.get(high_res))
    # claim 4's speed: PixelREPA after half the steps against JiT after all of them (non-inferiority)
    _, d_speed, b_speed = _paired(half, "pixelrepa", "jit", high_res, rows_b=final)
    add(4, f"PixelREPA at {steps // 2} steps - JiT at {steps} steps at {high_res} px (paper: <= 0, > 2x faster)",
        "pixelrepa", "jit", high_res, -1, diffs=d_speed, base=b_speed, floor=floors.get(high_res), noninferiority=True)
    return out


def decide(comps: list[dict], alpha: float = ALPHA) -> list[dict]:
    """Holm-adjusted outcome of every component (in place) and one verdict per claim."""
    for fam in ("p_paper", "p_other", "p_equiv"):
        for c, p in zip(comps, holm([c[fam] for c in comps])):
            c[fam + "_holm"] = p
    for c in comps:
        if c["n_seeds"] < 2:
            c["outcome"] = "no data" if c["n_seeds"] == 0 else "inconclusive (1 seed)"
        elif c["p_other_holm"] < alpha:
            c["outcome"] = "the other way"
        elif c["p_paper_holm"] < alpha:
            c["outcome"] = "as the paper" + (" (and within the margin)" if c["p_equiv_holm"] < alpha else "")
        elif c["p_equiv_holm"] < alpha:
            c["outcome"] = "equivalent within the margin"
        else:
            c["outcome"] = "inconclusive"
    out = []
    for claim in sorted({c["claim"] for c in comps}):
        cs = [c for c in comps if c["claim"] == claim]
        oc = [c["outcome"] for c in cs]
        if any(o == "no data" for o in oc):
            v = "not run"
        elif any(o == "the other way" for o in oc):
            v = "not reproduced: the other way"
        elif all(o.startswith("as the paper") for o in oc):
            v = "reproduced"
        elif any(o == "equivalent within the margin" for o in oc):
            v = "not reproduced: equivalent within the margin"
        else:
            v = "inconclusive"
        out.append({"claim": claim, "title": CLAIMS[claim], "verdict": v,
                    "evidence": evidence_words(cs)})
    return out


def interval_words(lo: float | None, hi: float | None, f: str = ".1f") -> str:
    """A 95% interval over seeds as "[lo, hi]", or "(no interval)" where there is none: one seed
    (`mean_interval`'s NaN bounds) or no value (None). What the notebooks print, rather than nan."""
    return "(no interval)" if lo is None or hi is None or math.isnan(lo) else f"[{lo:{f}}, {hi:{f}}]"


def component_words(c: dict, f: str = ".2f") -> str:
    """One comparison of `components` in a line: its paired difference with the 95% interval over seeds,
    margin, MDE, seeds and outcome. With one seed there is no interval or MDE, and the line says so
    (rather than printing nan)."""
    def num(x):
        return "-" if math.isnan(x) else f"{x:{f}}"
    spread = interval_words(c["lo"], c["hi"], f)
    mde_text = "no MDE" if math.isnan(c["mde"]) else f"MDE {num(c['mde'])}"
    return (f"{c['component']}: {num(c['diff'])} {spread}, margin {num(c['margin'])}, {mde_text}, "
            f"{_seeds(c['n_seeds'])} -> {c['outcome']}")


def evidence_words(components: list[dict], f: str = ".2f") -> str:
    """A claim's evidence: its comparisons (`component_words`), one after another."""
    return "; ".join(component_words(c, f) for c in components)


CLAIMS = {1: "REPA helps at low resolution and hurts at high resolution late in training",
          2: "Feature hacking: REPA's penalty is larger on images tightly clustered in the encoder's space",
          3: "The unmasked adapter beats REPA but not JiT; masking (PixelREPA) beats JiT",
          4: "PixelREPA beats JiT in final FID and converges > 2x faster"}


# ----------------------------------------------------------------------------- tables

def calibration_table(records: list[dict], runs: list[dict] | None = None, steps: int | None = None) -> list[dict]:
    """Per resolution and N: the floor (mean, SD over subsets), the estimation SD (over sampling seeds,
    of the latest checkpoint step measured at that resolution; pooled within checkpoints where more
    than one run was scored, so that the runs' own differences are not counted as noise) and, where
    the profile's runs are given, the seed-to-seed SD of JiT's end scores at that N and the training
    SD by subtraction (NaN where the estimation variance exceeds the total)."""
    out = []
    keys = sorted({(r["resolution"], r["n"]) for r in records if r.get("kind") in ("floor", "sampling")})
    end = scores(runs, steps) if runs else []
    latest = {}
    for r in records:
        if r.get("kind") == "sampling":
            latest[r["resolution"]] = max(latest.get(r["resolution"], 0), r["step"])
    for res, n in keys:
        fl = [r["fid"] for r in records if r.get("kind") == "floor" and (r["resolution"], r["n"]) == (res, n)]
        sm = [r for r in records if r.get("kind") == "sampling" and (r["resolution"], r["n"]) == (res, n)
              and r["step"] == latest[res]]
        per_run = {}
        for r in sm:
            per_run.setdefault(r.get("run"), []).append(r["fid"])
        dof = len(sm) - len(per_run)
        within = sum(float(np.sum((np.array(v) - np.mean(v)) ** 2)) for v in per_run.values())
        row = {"resolution": res, "n": n, "floor_subsets": len(fl),
               "floor_fid": float(np.mean(fl)) if fl else None,
               "floor_sd": float(np.std(fl, ddof=1)) if len(fl) > 1 else None,
               "floor_kid": float(np.mean([r["kid_mean"] for r in records if r.get("kind") == "floor"
                                           and (r["resolution"], r["n"]) == (res, n)])) if fl else None,
               "sampling_seeds": len(sm), "sampling_step": latest.get(res) if sm else None,
               "sampling_runs": ", ".join(sorted(str(k) for k in per_run)) if sm else None,
               "model_fid": float(np.mean([r["fid"] for r in sm])) if sm else None,
               "estimation_sd": math.sqrt(within / dof) if dof > 0 else None}
        seeds = [r["value"] for r in end if r["arm"] == "jit" and r["where"] == res and r["n"] == n]
        if len(seeds) > 1:
            total = float(np.var(seeds, ddof=1))
            est = row["estimation_sd"] ** 2 if row["estimation_sd"] is not None else float("nan")
            row |= {"jit_seeds": len(seeds), "seed_sd": math.sqrt(total),
                    "training_sd": math.sqrt(total - est) if total > est else float("nan")}
        out.append(row)
    return out


def floors_from(calibration: str | Path, n: int | None) -> dict:
    """{resolution: mean real-vs-reference FID at the calibrated N nearest to ``n``} (the floor)."""
    recs = [r for r in read_jsonl(calibration) if r.get("kind") == "floor"]
    out = {}
    for res in sorted({r["resolution"] for r in recs}):
        ns = sorted({r["n"] for r in recs if r["resolution"] == res})
        if ns and n:
            best = min(ns, key=lambda k: abs(k - n))
            out[res] = float(np.mean([r["fid"] for r in recs if r["resolution"] == res and r["n"] == best]))
    return out


def final_table(runs: list[dict], steps: int, keys=("fid", "kid_mean", "precision", "recall")) -> list[dict]:
    """Per arm and resolution: the mean and 95% t-interval over seeds of each score at the end."""
    rows = []
    per = {k: scores(runs, steps, k) for k in keys}
    for arm, res in sorted({(r["arm"], r["where"]) for r in per["fid"]}, key=lambda x: (x[1], x[0])):
        row = {"arm": arm, "resolution": res}
        for k, rs in per.items():
            v = [r["value"] for r in rs if r["arm"] == arm and r["where"] == res]
            if v:
                m, lo, hi = mean_interval(v)
                row |= {"seeds": len(v), k: m, f"{k}_lo": lo, f"{k}_hi": hi}
        row["n"] = next(r["n"] for r in per["fid"] if r["arm"] == arm and r["where"] == res)
        rows.append(row)
    return rows


def tables(folder: str | Path, *, low_res: int, high_res: int, steps: int, margin: float,
           calibration: str | Path | None = None, n_eval: int | None = None) -> dict[str, list[dict]]:
    """Every table of a profile, from the run logs under ``folder`` (``papermill_runs/<profile>/runs``)."""
    runs = load_runs(folder)
    final = scores(runs, steps)
    n = n_eval or next((r["n"] for r in final if r["n"]), None)
    floors = floors_from(calibration, n) if calibration and Path(calibration).exists() else {}
    comps = components(runs, low_res=low_res, high_res=high_res, steps=steps, floors=floors, margin=margin)
    verdicts = decide(comps)
    return {"final": final_table(runs, steps), "components": comps, "verdicts": verdicts,
            "subsets": _subset_table(runs), "dose": dose_table(runs, high_res, steps, floors.get(high_res), margin),
            "probe": record_table(runs, "probe", ("pixel_r2", "cka"), by=("t",)),
            "memorisation": record_table([dict(r, evals=[e for e in r["evals"] if e.get("step") == steps])
                                          for r in runs], "score", ("closer_to_train", "nn_ratio")),
            "floors": [{"resolution": k, "n": n, "fid_floor": v} for k, v in floors.items()]}


def dose_table(runs: list[dict], high_res: int, steps: int, floor: float | None, margin: float) -> list[dict]:
    """The dose-response arms (secondary, not in the verdicts): each x-K arm against its method at the
    paper's coefficient, seed-paired, two-sided (the account predicts REPA_xK - REPA > 0 and
    PixelREPA_xK - PixelREPA near 0)."""
    final = scores(runs, steps)
    out = []
    for arm in sorted({r["arm"] for r in final if "_x" in r["arm"] and r["where"] == high_res}):
        base = arm.split("_x")[0]
        seeds, d, b = _paired(final, arm, base, high_res)
        excess = float(np.mean(b)) - (floor or 0.0) if len(b) else float("nan")
        t = paired_test(d, expect=+1, margin=margin * excess)
        out.append({"a": arm, "b": base, "where": high_res, **t})
    return out


def record_table(runs: list[dict], kind: str, keys: tuple, by: tuple = ()) -> list[dict]:
    """Mean and 95% t-interval over seeds of ``keys`` of the ``kind`` records, per arm, resolution
    and the ``by`` fields (e.g. the probe's t)."""
    cells = {}
    for r in runs:
        for e in r["evals"]:
            if e.get("kind") == kind and all(k in e for k in keys):
                cells.setdefault((r["arm"], r["resolution"], *(e.get(b) for b in by)), {}).setdefault(r["seed"], []).append(e)
    out = []
    for cell, per_seed in sorted(cells.items()):
        row = dict(zip(("arm", "resolution", *by), cell)) | {"seeds": len(per_seed)}
        for k in keys:
            m, lo, hi = mean_interval([np.mean([e[k] for e in es]) for es in per_seed.values()])
            row |= {k: m, f"{k}_lo": lo, f"{k}_hi": hi}
        out.append(row)
    return out


def describe(verdict: dict, components: list[dict] | None = None, f: str = ".2f") -> str:
    """One plain sentence per claim: what the data say, and whether it agrees with the paper. Its
    evidence is the verdict's own (its comparisons at two decimals), or, given the `tables`'
    ``components``, the claim's comparisons written anew at precision ``f`` (the notebooks print one
    decimal: what a tiny model's scores keep from one CPU to another)."""
    v = verdict["verdict"]
    agree = {"reproduced": "agrees with the paper", "inconclusive": "cannot tell at this scale",
             "not run": "has no data yet"}.get(v, "does not agree with the paper")
    mine = [c for c in components or () if c["claim"] == verdict["claim"]]
    evidence = evidence_words(mine, f) if mine else verdict["evidence"]
    return f"Claim {verdict['claim']} ({verdict['title']}): {v}; this profile {agree}. {evidence}."


# ----------------------------------------------------------------------------- what a figure shows, in words

_SIGN_WORD = {-1: "lower", +1: "higher"}


def _ci(values, f: str) -> str:
    """' (95% interval lo to hi)' over seeds, or nothing for a single seed."""
    m, lo, hi = mean_interval(values)
    return "" if math.isnan(lo) else f" (95% interval {lo:{f}} to {hi:{f}})"


def _seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def curve_words(runs: list[dict], a: str, b: str | None, resolution: int, expect: int = 0,
                key: str = "eval_fid", paper: str = "") -> str:
    """One sentence on a convergence figure at one resolution. With ``b``: a - b at the first and the
    last evaluation (each the mean over the seeds both arms have there) and at how many evaluations a
    is below b; with ``expect`` (+1 or -1, the sign of a - b the paper expects late in training),
    whether the last evaluation agrees. Without ``b``: a's first and last value, and its lowest."""
    rows = [r for r in curves(runs, key) if r["resolution"] == resolution]
    name = key.removeprefix("eval_").replace("_", " ")
    name = "FID" if name == "fid" else name
    f = ".1f" if name == "FID" else ".3f"  # the precision the notebooks print (and nbval compares) elsewhere

    def at(arm):  # step -> (images, {seed: value})
        out = {}
        for r in rows:
            if r["method"] == arm:
                out.setdefault(r["step"], (r["images"], {}))[1][r["seed"]] = r[key]
        return out
    pa = at(a)
    if b is None:
        if not pa:
            return f"At {resolution} px, {a} has no {name} evaluations yet."
        steps = sorted(pa)
        mean = {s: float(np.mean(list(pa[s][1].values()))) for s in steps}
        low = min(steps, key=mean.get)
        return (f"At {resolution} px, {a}'s {name} (mean over {_seeds(len(pa[steps[-1]][1]))}) goes from "
                f"{mean[steps[0]]:{f}} at {pa[steps[0]][0]:,} images to {mean[steps[-1]]:{f}} at "
                f"{pa[steps[-1]][0]:,}; lowest {mean[low]:{f}} at {pa[low][0]:,}.")
    pb = at(b)
    diffs = {}
    for s in sorted(set(pa) & set(pb)):
        common = sorted(set(pa[s][1]) & set(pb[s][1]))
        if common:
            diffs[s] = (pa[s][0], [pa[s][1][k] - pb[s][1][k] for k in common])
    if not diffs:
        return f"At {resolution} px there is no {name} evaluation with both {a} and {b} yet."
    steps = sorted(diffs)
    (i0, v0), (i1, v1) = diffs[steps[0]], diffs[steps[-1]]
    d0, d1 = float(np.mean(v0)), float(np.mean(v1))
    below = sum(np.mean(diffs[s][1]) < 0 for s in steps)
    text = (f"At {resolution} px, {a} - {b} in {name} (mean over the {_seeds(len(v1))} with both): {d0:+{f}} at "
            f"{i0:,} images, {d1:+{f}}{_ci(v1, f)} at {i1:,}; {a} is below {b} at {below} of {len(steps)} evaluations.")
    if expect:
        text += (f" The paper expects {a} {_SIGN_WORD[expect]} than {b} late in training"
                 + (f" ({paper})" if paper else "") + ": the last evaluation goes "
                 + ("that way." if d1 * expect > 0 else "the other way."))
    elif paper:
        text += f" The paper: {paper}."
    return text


def probe_words(runs: list[dict], a: str, b: str, resolution: int, t: float,
                expect: dict[str, int] | None = None, paper: str = "") -> str:
    """One sentence on the probe figure: a's linear CKA with the encoder and pixel R^2 at ``t`` against
    b's (a - b paired by seed, mean over the seeds both have), and for each key in ``expect`` (its sign
    of a - b by the paper's account) whether it agrees; ``paper``: what the account says otherwise."""
    cell = {}
    for r in runs:
        if r["resolution"] == resolution and r["arm"] in (a, b):
            for e in r["evals"]:
                if e.get("kind") == "probe" and e.get("t") == t:
                    cell.setdefault(r["arm"], {})[r["seed"]] = e
    common = sorted(set(cell.get(a, {})) & set(cell.get(b, {})))
    if not common:
        return f"At {resolution} px and t = {t} there is no probe of both {a} and {b} yet."
    parts, verdicts = [], []
    for key, name in (("cka", "CKA with the encoder"), ("pixel_r2", "pixel R^2")):
        va = float(np.mean([cell[a][s][key] for s in common]))
        vb = float(np.mean([cell[b][s][key] for s in common]))
        d = [cell[a][s][key] - cell[b][s][key] for s in common]
        parts.append(f"{name} {va:.3f} against {vb:.3f} ({va - vb:+.3f}{_ci(d, '.3f')})")
        if expect and expect.get(key):
            verdicts.append(f"{name} {_SIGN_WORD[expect[key]]} ({'so it is' if (va - vb) * expect[key] > 0 else 'it is not'})")
    text = f"At {resolution} px and t = {t}, {a} against {b} ({_seeds(len(common))}): " + "; ".join(parts) + "."
    if verdicts:
        text += f" The paper's account predicts {' and '.join(verdicts)}."
    if paper:
        text += f" The paper's account: {paper}."
    return text


def subset_words(runs: list[dict], a: str = "repa", b: str = "jit") -> str:
    """One sentence on the subset-FID figure: a - b on the most and on the least centroid-similar
    images (mean over the seeds that have both subsets of both arms) and their difference, the
    interaction the paper expects to be positive."""
    common, d_most, d_least, _ = _subset_pairs(subset_scores(runs), a, b)
    if not common:
        return f"There is no seed with subset scores of both {a} and {b} yet."
    most, least = float(np.mean(d_most)), float(np.mean(d_least))
    return (f"{a} - {b} in subset FID ({_seeds(len(common))}): {most:+.1f} on the most-similar images, {least:+.1f} "
            f"on the least-similar; the interaction (most - least) is {most - least:+.1f}. The paper expects it "
            f"positive ({a}'s penalty larger on tight clusters): " + ("it is." if most - least > 0 else "it is not."))


def loss_words(runs: list[dict], arm: str, resolution: int, key: str = "loss") -> str:
    """One sentence on a training-loss figure: the mean logged loss over the first and the last tenth
    of training, and the change from the third quarter to the last (is it still falling?), mean over
    the arm's seeds."""
    logs = [[e for e in r["metrics"] if key in e] for r in runs if r["arm"] == arm and r["resolution"] == resolution]
    logs = [g for g in logs if len(g) >= 2]
    if not logs:
        return f"At {resolution} px, {arm} has no training log yet."

    def window(g, lo, hi):
        n = len(g)
        part = g[int(lo * n):max(int(hi * n), int(lo * n) + 1)]
        return float(np.mean([e[key] for e in part]))
    first, last = (float(np.mean([window(g, lo, hi) for g in logs])) for lo, hi in ((0, 0.1), (0.9, 1.0)))
    q3, q4 = (float(np.mean([window(g, lo, hi) for g in logs])) for lo, hi in ((0.5, 0.75), (0.75, 1.0)))
    change = (q4 - q3) / q3
    state = "still falling" if change < -0.02 else ("rising" if change > 0.02 else "flat within 2%")
    return (f"At {resolution} px, {arm}'s training loss (mean over {_seeds(len(logs))}) goes from {first:.3f} in "
            f"the first tenth of training to {last:.3f} in the last; from the third quarter to the last it "
            f"changes by {change:+.1%}: {state}.")


def _subset_table(runs: list[dict]) -> list[dict]:
    rows = subset_scores(runs)
    out = []
    for arm, sub in sorted({(r["arm"], r["where"]) for r in rows}):
        m, lo, hi = mean_interval([r["value"] for r in rows if r["arm"] == arm and r["where"] == sub])
        out.append({"arm": arm, "subset": sub, "seeds": sum(r["arm"] == arm and r["where"] == sub for r in rows),
                    "fid": m, "fid_lo": lo, "fid_hi": hi})
    return out


def rounded(obj, digits: int = 4):
    """Tables as written: floats rounded (so that recomputation compares exactly), NaN as None."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj
