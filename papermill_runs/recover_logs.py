"""Recover per-run evaluation records of the old `cpu` and `cpu-long` profiles from what survives.

The per-run logs behind those profiles' tables (``runs/<profile>/<run>/metrics.jsonl``) were never
committed (``.gitignore``'s ``runs/`` also matched ``papermill_runs/*/runs/``) and are lost. This script
rebuilds, as far as the committed material allows and with each run's seed identity, the evaluation
records the statistics module (``pixelrepa/stats.py``) reads, and writes

    papermill_runs/<profile>/runs/<method>-<res>px-s<seed>/evals.jsonl
    papermill_runs/<profile>/runs/RECOVERED.md

Sources (all read from git at fixed commits, so the output does not depend on the working tree):

- the FID-curve figures of the executed notebooks (plotly JSON): per evaluation step, the seed mean
  and the min-max band over the 3 seeds. The logged FIDs have 4 decimals (``train.evaluate`` rounded
  them), so the three values of a step are exact: min, max and 3 x mean - min - max. They say nothing
  about which seed had which value;
- seed identity from per-seed numbers printed in earlier README versions (rounded: integers, or 0.1
  FID). A value is assigned to a seed only when exactly one of the step's three exact values rounds to
  the printed number;
- where a seed is still unknown at the end of training: the committed seed-paired tables
  (``tables/resolution.json``, ``tables/mta.json``). Every assignment of the remaining values to the
  remaining seeds is tried; a value is assigned only when all assignments that reproduce every paired
  row (means, difference, interval, seeds_needed) agree on it;
- feature-hacking rows: ``tables/feature_hacking.json`` (full precision, saved by notebook 03 cell 5,
  one row per seed, model and subset), checked against the rows that cell printed (2 decimals).

Nothing is assigned by guess: a value whose seed cannot be identified is not written (RECOVERED.md
lists it). Run:  .venv/bin/python papermill_runs/recover_logs.py   (exit status 1 if a check fails).
"""
from __future__ import annotations

import ast
import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
SOURCE_COMMIT = "a51e570"  # the last commit that changed papermill_runs/cpu and papermill_runs/cpu-long
FIRST_COMMIT = {"cpu": "c9ace45", "cpu-long": "6494450"}  # the commits that first added each profile
PROFILES = {"cpu": 300, "cpu-long": 600}  # profile: training steps
BATCH = 64  # images per step in both profiles (profiles/*.yaml batch_size)
EVAL_N = 192  # samples per FID (profiles/*.yaml eval_samples)
SEEDS = (0, 1, 2)
LOW, HIGH = 32, 64
RUNS = [(m, LOW) for m in ("jit", "repa")] + [(m, HIGH) for m in ("jit", "repa", "adapter", "pixelrepa")]
LABELS = {"JiT": "jit", "JiT + REPA": "repa", "unmasked adapter": "adapter", "PixelREPA (MTA)": "pixelrepa"}
# FID-curve figures: (notebook, cell index, resolution of a single panel or None when faceted by resolution)
CURVE_FIGURES = [("01_jit_baseline.ipynb", 8, None), ("02_repa_failure.ipynb", 6, None),
                 ("04_mta_fix.ipynb", 5, HIGH), ("05_final_fid.ipynb", 5, None)]
MAIN_FIGURE = ("05_final_fid.ipynb", 5)  # every method at both resolutions: the values come from here

# Per-seed numbers printed in earlier README versions. Each: the commit, a quote that must occur in
# that README (whitespace-normalised), what it says: {(method, res, seed, step): printed value}, and the
# printed precision (decimals). The cpu-long runs extended the cpu runs (copies of their checkpoints
# and logs), so statements about steps <= 300 hold for both profiles.
README_CLAIMS = [
    {"commit": "57abc19", "decimals": 0, "profiles": ("cpu", "cpu-long"),
     "what": "seed-0 table (FID after 6,400 / 12,800 / 19,200 images = steps 100 / 200 / 300, integer FID)",
     "quote": "| JiT | 362 / 354 / 279 | 398 / 376 / 360 | | JiT + REPA | 362 / 352 / 266 | 403 / 346 / 332 | "
              "| unmasked adapter | - | 399 / 369 / 365 | | PixelREPA (MTA) | - | 400 / 376 / 365 |",
     "values": {("jit", 32, 0): (362, 354, 279), ("jit", 64, 0): (398, 376, 360),
                ("repa", 32, 0): (362, 352, 266), ("repa", 64, 0): (403, 346, 332),
                ("adapter", 64, 0): (399, 369, 365), ("pixelrepa", 64, 0): (400, 376, 365)},
     "steps": (100, 200, 300)},
    {"commit": "9226b12", "decimals": 0, "profiles": ("cpu", "cpu-long"),
     "what": "per-seed JiT 32 px curve (FID at 100 / 200 / 300 steps, seeds 0, 1, 2 in order, integer FID)",
     "quote": "(per seed, FID at 100 / 200 / 300 steps, e.g. JiT 32 px 362 / 354 / 279, 343 / 346 / 253, "
              "361 / 342 / 260)",
     "values": {("jit", 32, 0): (362, 354, 279), ("jit", 32, 1): (343, 346, 253), ("jit", 32, 2): (361, 342, 260)},
     "steps": (100, 200, 300)},
    {"commit": "6494450", "decimals": 1, "profiles": ("cpu-long",),
     "what": "per-seed finals at 600 steps (seeds 0 / 1 / 2 in order, 0.1 FID)",
     "quote": "at 600 steps the seeds give JiT 211.2 / 213.9 / 216.8 and REPA 210.5 / 220.2 / 209.8 at 32 px; "
              "at 64 px JiT 260.9 / 260.2 / 273.2, REPA 261.7 / 260.9 / 261.4, adapter 255.2 / 268.1 / 263.1, "
              "PixelREPA 253.2 / 264.0 / 263.2.",
     "values": {("jit", 32): (211.2, 213.9, 216.8), ("repa", 32): (210.5, 220.2, 209.8),
                ("jit", 64): (260.9, 260.2, 273.2), ("repa", 64): (261.7, 260.9, 261.4),
                ("adapter", 64): (255.2, 268.1, 263.1), ("pixelrepa", 64): (253.2, 264.0, 263.2)},
     "steps": (600,)},
]

FAILURES: list[str] = []


def check(ok: bool, what: str) -> bool:
    if not ok:
        FAILURES.append(what)
    return ok


# ----------------------------------------------------------------------------- reading the sources

def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def show(commit: str, path: str) -> str:
    return git("show", f"{commit}:{path}")


def notebook(commit: str, path: str) -> dict:
    return json.loads(show(commit, path))


def plotly(nb: dict, cell: int) -> list[dict]:
    return [o["data"]["application/vnd.plotly.v1+json"] for o in nb["cells"][cell].get("outputs", [])
            if "application/vnd.plotly.v1+json" in o.get("data", {})]


def stream_text(nb: dict, cell: int) -> str:
    return "".join(o.get("text", "") if isinstance(o.get("text", ""), str) else "".join(o["text"])
                   for o in nb["cells"][cell].get("outputs", []) if o.get("output_type") == "stream")


def curve_bands(fig: dict, single_res: int | None) -> dict:
    """{(method, res): {step: (min, mean, max)}} from a plots.curves figure (a band trace, then its mean)."""
    titles = [a["text"] for a in fig["layout"].get("annotations", []) if a.get("text", "").startswith("resolution ")]
    axis_res = {("x" if i == 0 else f"x{i + 1}"): int(t.split()[1]) for i, t in enumerate(titles)}
    out, band = {}, None
    for t in fig["data"]:
        if t.get("fill") == "toself":
            band = t
            continue
        res = single_res if single_res is not None else axis_res[t.get("xaxis", "x")]
        xs, mean = list(t["x"]), list(t["y"])
        if band is not None:
            n = len(xs)
            assert list(band["x"][:n]) == xs and list(band["x"][n:]) == xs[::-1], "band and mean disagree in x"
            hi, lo = list(band["y"][:n]), list(band["y"][n:])[::-1]
        else:
            lo = hi = mean
        out[(LABELS[t["name"]], res)] = {x // BATCH: (l, m, h) for x, l, m, h in zip(xs, lo, mean, hi)}
        band = None
    return out


def three_values(lo: float, mean: float, hi: float) -> list[float]:
    """The three seeds' logged FIDs (4 decimals) from the band and the mean."""
    mid = round(3 * mean - lo - hi, 4)
    vals = [round(lo, 4), mid, round(hi, 4)]
    check(lo <= mid + 1e-9 and mid <= hi + 1e-9 and abs(float(np.mean(vals)) - mean) < 1e-9,
          f"band ({lo}, {mean}, {hi}) is not three 4-decimal values")
    return vals


def norm(s: str) -> str:
    return " ".join(s.split())


# ----------------------------------------------------------------------------- the statistics of the tables

def half_width(sd: float, n, level: float = 0.95):
    n = np.asarray(n)
    return stats.t.ppf(0.5 + level / 2, n - 1) * sd / np.sqrt(n)


def mean_interval(values) -> tuple[float, float, float]:
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    h = float(half_width(float(v.std(ddof=1)), len(v)))
    return m, m - h, m + h


def seeds_needed(diffs, most: int = 1000):
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2 or d.mean() == 0:
        return None
    n = np.arange(2, most + 1)
    resolved = n[half_width(float(d.std(ddof=1)), n) < abs(float(d.mean()))]
    return int(resolved[0]) if len(resolved) else None


def paired_row(va: dict, vb: dict, a: str, b: str, where, key: str) -> dict:
    """What study.compare wrote for a minus b paired by seed (the fields it rounds to 2 decimals)."""
    seeds = sorted(set(va) & set(vb))
    d = [va[s] - vb[s] for s in seeds]
    m, lo, hi = mean_interval(d)
    return {f"{a}_{key}": round(sum(va[s] for s in seeds) / len(seeds), 2),
            f"{b}_{key}": round(sum(vb[s] for s in seeds) / len(seeds), 2),
            "diff": round(m, 2), "diff_lo": round(lo, 2), "diff_hi": round(hi, 2), "seeds_needed": seeds_needed(d)}


def matches(row: dict, table_row: dict) -> list[str]:
    """Fields of a recomputed row that differ from the committed one (only fields the table has)."""
    return [f"{k}: {v} vs {table_row[k]}" for k, v in row.items() if k in table_row and v != table_row[k]]


# ----------------------------------------------------------------------------- recovery

def recover():
    tables = {p: {name: json.loads(show(SOURCE_COMMIT, f"papermill_runs/{p}/tables/{name}.json"))
                  for name in ("final_fid", "resolution", "mta", "feature_hacking", "feature_hacking_verdict",
                               "speedup")} for p in PROFILES}
    report = {p: {"checks": [], "unidentified": [], "notes": []} for p in PROFILES}

    # 1. the exact per-step value sets, and that every FID figure of a profile (now and when first
    #    committed) shows the same curves; the cpu-long curves at steps <= 300 equal the cpu ones
    values = {}
    for p in PROFILES:
        nb_path = f"papermill_runs/{p}/{MAIN_FIGURE[0]}"
        main = curve_bands(plotly(notebook(SOURCE_COMMIT, nb_path), MAIN_FIGURE[1])[0], None)
        values[p] = {k: {step: three_values(*b) for step, b in v.items()} for k, v in main.items()}
        check(set(main) == set(RUNS), f"{p}: figure lacks runs")
        check(all(max(v) == PROFILES[p] for v in main.values()), f"{p}: curves do not end at step {PROFILES[p]}")
        agree = 0
        for commit in (SOURCE_COMMIT, FIRST_COMMIT[p]):
            for nb_name, cell, res in CURVE_FIGURES:
                other = curve_bands(plotly(notebook(commit, f"papermill_runs/{p}/{nb_name}"), cell)[0], res)
                for k, v in other.items():
                    same = all(np.allclose(v[s], main[k][s], rtol=0, atol=1e-9) for s in v) and set(v) == set(main[k])
                    agree += check(same, f"{p}: {nb_name} cell {cell} at {commit} shows other curves for {k}")
        report[p]["checks"].append(f"the FID curves (band min, seed mean, band max per step) agree across notebooks "
                                   f"01 (cell 8), 02 (cell 6), 04 (cell 5) and 05 (cell 5), at commits "
                                   f"{FIRST_COMMIT[p]} and {SOURCE_COMMIT}: {agree} panel-curves compared, all equal")
    long_early = all(values["cpu-long"][k][s] == values["cpu"][k][s] for k in RUNS for s in (100, 200, 300))
    check(long_early, "cpu-long curves at steps 100-300 differ from the cpu curves")
    report["cpu-long"]["checks"].append("the curves at steps 100, 200 and 300 equal the cpu profile's exactly "
                                        "(the cpu-long runs are extensions of the cpu runs, their logs copied)")

    # 2. seed identity from the README's per-seed numbers
    # assigned[p][(method, res, seed, step)] = (value, identity source)
    assigned = {p: {} for p in PROFILES}
    for claim in README_CLAIMS:
        readme = norm(show(claim["commit"], "README.md"))
        check(norm(claim["quote"]) in readme, f"README.md at {claim['commit']} lacks the quoted text")
        for key, printed in claim["values"].items():
            for i, step in enumerate(claim["steps"]):
                if len(key) == 3:
                    (m, res, seed), value = key, printed[i]
                else:  # per-seed tuple at one step
                    continue
                for p in claim["profiles"]:
                    _assign_printed(p, values, assigned, m, res, seed, step, value, claim)
            if len(key) == 2:
                m, res = key
                for seed, value in zip(SEEDS, printed):
                    for p in claim["profiles"]:
                        _assign_printed(p, values, assigned, m, res, seed, claim["steps"][0], value, claim)

    # 3. the remaining seeds at the end of training: assignments that reproduce the paired tables
    for p, steps in PROFILES.items():
        for res in (LOW, HIGH):
            _assign_by_tables(p, steps, res, values, assigned, tables[p], report[p])
    # the cpu-long runs extended the cpu runs: their step-300 records are the cpu finals
    for (m, res, seed, step), (v, src) in list(assigned["cpu"].items()):
        if step == 300 and (m, res, seed, step) not in assigned["cpu-long"]:
            assigned["cpu-long"][(m, res, seed, step)] = (v, src + " (for the cpu run this cpu-long run extended)")

    # 4. what stays unknown
    for p in PROFILES:
        for (m, res) in RUNS:
            for step, vals in sorted(values[p][(m, res)].items()):
                known = [s for s in SEEDS if (m, res, s, step) in assigned[p]]
                if len(known) < 3:
                    rest = list(vals)
                    for s in known:
                        rest.remove(assigned[p][(m, res, s, step)][0])
                    report[p]["unidentified"].append((m, res, step, [s for s in SEEDS if s not in known], rest))

    # 5. cross-checks of the final scores against the committed tables
    for p, steps in PROFILES.items():
        _check_finals(p, steps, values, assigned, tables[p], report[p])

    # 6. feature-hacking rows
    subsets = {}
    for p, steps in PROFILES.items():
        subsets[p] = _subsets(p, steps, tables[p], report[p])
    return values, assigned, subsets, report


def _assign_printed(p, values, assigned, m, res, seed, step, printed, claim):
    vals = values[p][(m, res)][step]
    d = claim["decimals"]
    hits = sorted({v for v in vals if round(v, d) == printed})
    where = f"README.md Results at commit {claim['commit']}, {claim['what']}: {printed:g}"
    if not check(len(hits) == 1, f"{p} {m} {res} px seed {seed} step {step}: printed {printed} matches "
                                 f"{len(hits)} of the band's values {vals}"):
        return
    v = hits[0]
    prev = assigned[p].get((m, res, seed, step))
    if prev:
        check(prev[0] == v, f"{p} {m} {res} seed {seed} step {step}: two README versions disagree")
        assigned[p][(m, res, seed, step)] = (v, prev[1] + "; again " + where)
        return
    taken = [assigned[p][(m, res, s, step)][0] for s in SEEDS if s != seed and (m, res, s, step) in assigned[p]]
    check(vals.count(v) > taken.count(v), f"{p} {m} {res} step {step}: value {v} given to two seeds")
    assigned[p][(m, res, seed, step)] = (v, where)


def _assign_by_tables(p, steps, res, values, assigned, tables, report):
    methods = [m for (m, r) in RUNS if r == res]
    options = {}
    for m in methods:
        known = {s: assigned[p][(m, res, s, steps)][0] for s in SEEDS if (m, res, s, steps) in assigned[p]}
        rest = list(values[p][(m, res)][steps])
        for v in known.values():
            rest.remove(v)
        free = [s for s in SEEDS if s not in known]
        options[m] = [{**known, **dict(zip(free, perm))} for perm in sorted(set(itertools.permutations(rest)))]
    rows = [r for name in ("resolution", "mta") for r in tables[name] if r["resolution"] == res]
    if all(len(o) == 1 for o in options.values()):
        return
    survivors = []
    for combo in itertools.product(*(options[m] for m in methods)):
        seq = dict(zip(methods, combo))
        if all(not matches(paired_row(seq[r["a"]], seq[r["b"]], r["a"], r["b"], res, "eval_fid"), r) for r in rows):
            survivors.append(seq)
    n_all = math.prod(len(o) for o in options.values())
    report["notes"].append(f"{res} px, step {steps}: {n_all} assignments of the band values to the seeds not named "
                           f"by a README were tried against the {len(rows)} paired row(s) of tables/resolution.json"
                           f" and tables/mta.json at {res} px; {len(survivors)} of them reproduce(s) every row")
    if not check(len(survivors) >= 1, f"{p} {res} px: no assignment reproduces the paired tables"):
        return
    for m in methods:
        for s in SEEDS:
            if (m, res, s, steps) in assigned[p]:
                continue
            vs = {seq[m][s] for seq in survivors}
            if len(vs) == 1:
                names = ", ".join(f"{r['a']} - {r['b']}" for r in rows if m in (r["a"], r["b"]))
                assigned[p][(m, res, s, steps)] = (vs.pop(), (
                    f"elimination: of the {n_all} assignments of the band's values to the seeds the README "
                    f"does not name, every one that reproduces papermill_runs/{p}/tables/"
                    f"{'resolution' if res == LOW else 'resolution.json and mta'}.json at commit "
                    f"{SOURCE_COMMIT} (seed-paired rows {names}: means, difference, 95% interval, seeds_needed) "
                    f"gives this seed this value"))
    if len(survivors) > 1:
        report["pairings"] = [{m: {s: seq[m][s] for s in SEEDS} for m in methods} for seq in survivors]


def _check_finals(p, steps, values, assigned, tables, report):
    per = {(m, res): {s: assigned[p][(m, res, s, steps)][0] for s in SEEDS if (m, res, s, steps) in assigned[p]}
           for (m, res) in RUNS}
    for row in tables["final_fid"]:
        key = (row["method"], row["resolution"])
        vals = values[p][key][steps]
        m, lo, hi = mean_interval(vals)
        got = {"fid": round(m, 2), "fid_lo": round(lo, 2), "fid_hi": round(hi, 2), "images": steps * BATCH,
               "seeds": len(vals)}
        bad = matches(got, row)
        check(not bad, f"{p} final_fid {key}: {bad}")
        known = per[key]
        if len(known) == 3:
            m2, lo2, hi2 = mean_interval([known[s] for s in SEEDS])
            bad2 = matches({"fid": round(m2, 2), "fid_lo": round(lo2, 2), "fid_hi": round(hi2, 2)}, row)
            check(not bad2, f"{p} final_fid {key} from the per-seed records: {bad2}")
            report["checks"].append(f"tables/final_fid.json {key[0]} {key[1]} px: fid {row['fid']}, interval "
                                    f"[{row['fid_lo']}, {row['fid_hi']}] reproduced from the 3 per-seed records"
                                    + ("" if not bad2 else f" -- MISMATCH {bad2}"))
        else:
            report["checks"].append(f"tables/final_fid.json {key[0]} {key[1]} px: fid {row['fid']}, interval "
                                    f"[{row['fid_lo']}, {row['fid_hi']}] reproduced from the figure's three values "
                                    f"(which need no seed labels); per-seed records exist for seed(s) "
                                    f"{', '.join(map(str, sorted(known))) or 'none'} only" + ("" if not bad else f" -- MISMATCH {bad}"))
    for name in ("resolution", "mta"):
        for row in tables[name]:
            va, vb = per[(row["a"], row["resolution"])], per[(row["b"], row["resolution"])]
            label = f"tables/{name}.json {row['a']} - {row['b']} at {row['resolution']} px"
            if len(va) == 3 and len(vb) == 3:
                bad = matches(paired_row(va, vb, row["a"], row["b"], row["resolution"], "eval_fid"), row)
                check(not bad, f"{p} {label}: {bad}")
                report["checks"].append(f"{label}: means {row[row['a'] + '_eval_fid']} / {row[row['b'] + '_eval_fid']}, "
                                        f"diff {row['diff']} [{row['diff_lo']}, {row['diff_hi']}], seeds_needed "
                                        f"{row.get('seeds_needed')} reproduced from the per-seed records"
                                        + ("" if not bad else f" -- MISMATCH {bad}"))
            else:
                pairings = report.get("pairings", [])
                ok = pairings and all(not matches(paired_row(q[row["a"]], q[row["b"]], row["a"], row["b"],
                                                             row["resolution"], "eval_fid"), row) for q in pairings)
                check(bool(ok), f"{p} {label}: not reproduced by the candidate pairings")
                report["checks"].append(f"{label}: diff {row['diff']} [{row['diff_lo']}, {row['diff_hi']}] reproduced "
                                        f"by each of the {len(pairings)} candidate seed labellings (seed 0 known, seeds "
                                        f"1 and 2 swapped jointly); no per-seed records for seeds 1 and 2")
    # speedup: from the seed-mean curves (needs no seed labels)
    sp = tables["speedup"][0]
    xf = sorted(values[p][(sp["fast"], sp["resolution"])])
    yf = [float(np.mean(values[p][(sp["fast"], sp["resolution"])][s])) for s in xf]
    target = float(np.mean(values[p][(sp["slow"], sp["resolution"])][steps]))
    reach = None
    for i, (x, y) in enumerate(zip(xf, yf)):
        if y <= target:
            reach = x * BATCH if i == 0 else (xf[i - 1] + (x - xf[i - 1]) * (yf[i - 1] - target) / (yf[i - 1] - y)) * BATCH
            break
    got = {f"{sp['slow']}_final": round(target, 2), f"{sp['fast']}_final": round(yf[-1], 2),
           "fast_images_to_reach": None if reach is None else round(reach),
           "speedup": None if reach is None else round(steps * BATCH / reach, 2)}
    bad = matches(got, sp)
    check(not bad, f"{p} speedup: {bad}")
    report["checks"].append(f"tables/speedup.json (seed-mean curves): images to reach {sp['fast_images_to_reach']}, "
                            f"speedup {sp['speedup']} reproduced" + ("" if not bad else f" -- MISMATCH {bad}"))


def _subsets(p, steps, tables, report):
    rows = tables["feature_hacking"]
    nb = notebook(SOURCE_COMMIT, f"papermill_runs/{p}/03_feature_hacking.ipynb")
    printed = [ast.literal_eval(line) for line in stream_text(nb, 5).splitlines() if line.startswith("{")]
    check(len(printed) == len(rows), f"{p}: notebook 03 printed {len(printed)} rows, the table has {len(rows)}")
    for pr, row in zip(printed, rows):
        exp = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
        check(pr == exp, f"{p}: printed feature-hacking row {pr} differs from the table row {exp}")
    report["checks"].append(f"tables/feature_hacking.json: its {len(rows)} rows equal, rounded to 2 decimals, the "
                            f"{len(printed)} rows printed by 03_feature_hacking.ipynb cell 5 (same order, seed, model, subset)")
    # the bar figure (cell 6): per model and subset, the mean over seeds
    fig = plotly(nb, 6)[0]
    bars_ok = all(abs(y - np.mean([r["fid"] for r in rows if r["model"] == LABELS[t["name"]] and r["subset"] == x])) < 1e-9
                  for t in fig["data"] for x, y in zip(t["x"], t["y"]))
    check(bars_ok, f"{p}: the subset bar figure disagrees with the table")
    report["checks"].append("03_feature_hacking.ipynb cell 6 bar figure (seed means per model and subset) equals the "
                            "means of those rows")
    # the verdict table, recomputed from the rows by seed
    for vrow in tables["feature_hacking_verdict"]:
        sub = vrow["resolution"]
        va = {r["seed"]: r["fid"] for r in rows if r["model"] == vrow["a"] and r["subset"] == sub}
        vb = {r["seed"]: r["fid"] for r in rows if r["model"] == vrow["b"] and r["subset"] == sub}
        bad = matches(paired_row(va, vb, vrow["a"], vrow["b"], sub, "fid"), vrow)
        check(not bad, f"{p} feature_hacking_verdict {sub}: {bad}")
        report["checks"].append(f"tables/feature_hacking_verdict.json {vrow['a']} - {vrow['b']} on the {sub}-similar "
                                f"subset: diff {vrow['diff']} [{vrow['diff_lo']}, {vrow['diff_hi']}] reproduced from "
                                f"the per-seed subset records" + ("" if not bad else f" -- MISMATCH {bad}"))
    if p == "cpu-long":  # the README's per-seed REPA - JiT differences on the most-similar subset
        quote = "REPA worse in all 3 seeds: +0.6, +1.1, +1.9"
        check(quote in norm(show("6494450", "README.md")), "README.md at 6494450 lacks the subset differences")
        d = [next(r["fid"] for r in rows if r["seed"] == s and r["model"] == "repa" and r["subset"] == "most")
             - next(r["fid"] for r in rows if r["seed"] == s and r["model"] == "jit" and r["subset"] == "most")
             for s in SEEDS]
        printed_d = (0.6, 1.1, 1.9)
        off = [f"seed {s}: {x:.4f} (README {y:+.1f})" for s, x, y in zip(SEEDS, d, printed_d) if round(x, 1) != y]
        report["checks"].append(
            "README.md Results (at 6494450, unchanged since) says of the most-similar subset \"" + quote + "\": "
            f"the subset records give {', '.join(f'{x:+.4f}' for x in d)}"
            + (f"; MISMATCH in the README text (not in any table): {'; '.join(off)} rounds to "
               f"{', '.join(f'{round(x, 1):+.1f}' for x in d)}" if off else ", as printed"))
    src = (f"recovered from papermill_runs/{p}/tables/feature_hacking.json at commit {SOURCE_COMMIT} (full precision; "
           f"written by 03_feature_hacking.ipynb cell 5, which printed the same row rounded to 2 decimals)")
    out = {}
    for r in rows:
        rec = {"kind": "subset", "subset": r["subset"], "step": steps,
               **{k: v for k, v in r.items() if k not in ("seed", "model", "subset")}, "source": src}
        out.setdefault((r["model"], HIGH, r["seed"]), []).append(rec)
    return out


# ----------------------------------------------------------------------------- writing

def score_source(p, m, res, seed, step, identity):
    x = step * BATCH
    nb = f"papermill_runs/{p}/{MAIN_FIGURE[0]}"
    value = (f"recovered from {nb} cell {MAIN_FIGURE[1]} plotly figure at commit {SOURCE_COMMIT} (FID curve of "
             f"{m} at {res} px, {x} images = step {step}: seed band min / max and seed mean; the middle seed's "
             f"value = 3 x mean - min - max; FIDs were logged to 4 decimals)")
    return f"{value}; seed identity: {identity}"


def write(values, assigned, subsets, report):
    for p, steps in PROFILES.items():
        base = ROOT / "papermill_runs" / p / "runs"
        counts = {"final": 0, "curve": 0, "subset": 0, "empty": []}
        for (m, res) in RUNS:
            for seed in SEEDS:
                name = f"{m}-{res}px-s{seed}"
                recs = []
                for step in sorted(values[p][(m, res)]):
                    if (m, res, seed, step) in assigned[p]:
                        v, identity = assigned[p][(m, res, seed, step)]
                        recs.append({"kind": "score", "step": step, "n": EVAL_N, "fid": v,
                                     "source": score_source(p, m, res, seed, step, identity)})
                        counts["final" if step == steps else "curve"] += 1
                subs = sorted(subsets[p].get((m, res, seed), []), key=lambda r: ("most", "least").index(r["subset"]))
                counts["subset"] += len(subs)
                recs += subs
                d = base / name
                d.mkdir(parents=True, exist_ok=True)
                (d / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
                if not recs:
                    counts["empty"].append(name)
        (base / "RECOVERED.md").write_text(recovered_md(p, steps, values, assigned, report[p], counts))
        print(f"{p}: {counts['final']} final scores (step {steps}), {counts['curve']} earlier curve points, "
              f"{counts['subset']} subset records, in 18 run folders under {base.relative_to(ROOT)}"
              + (f"; empty: {', '.join(counts['empty'])}" if counts["empty"] else ""))


def recovered_md(p, steps, values, assigned, report, counts) -> str:
    other = "cpu-long" if p == "cpu" else "cpu"
    L = [f"# Recovered run records: profile `{p}` ({steps} steps)", "",
         f"The per-run logs behind this profile's tables (`runs/{p}/<run>/metrics.jsonl`, the training log with "
         f"the FID curve) were never committed and are lost. The `evals.jsonl` files here were rebuilt by "
         f"`papermill_runs/recover_logs.py` from what the repository still holds; run it again to regenerate them "
         f"(it reads every source from git at fixed commits). Each record's `source` says where its number and "
         f"its seed identity come from. No value was given a seed by guess: where the surviving material does not "
         f"say which seed a value belongs to, the value is not written (listed below).", "",
         "## What was recovered", "",
         f"- **{counts['final']} final scores** (`kind: score`, step {steps}, n = {EVAL_N}: FID of 192 EMA samples "
         f"against the 692 held-out images, as logged at the end of training), "
         f"{'all 18 runs' if counts['final'] == 18 else 'see the table below'}.",
         f"- **{counts['curve']} earlier FID-curve points** (`kind: score` at an earlier step) whose seed is "
         f"identifiable.",
         f"- **{counts['subset']} feature-hacking records** (`kind: subset`, step {steps}): for JiT, REPA and "
         f"PixelREPA at 64 px, seeds 0-2, the most- and least-similar subsets, with every number notebook 03 "
         f"produced for the row (n, t, mean_similarity, fid with its bootstrap interval, fd_effnet with its "
         f"interval) at full precision from `tables/feature_hacking.json`. The adapter was not in that "
         f"diagnostic, so its runs have none.", "",
         "Where the numbers come from:", "",
         f"- **Values.** The FID-curve figure of `papermill_runs/{p}/05_final_fid.ipynb` (cell 5, plotly JSON) holds, "
         f"for every method, resolution and evaluation step (every 100 steps), the mean over the 3 seeds and the "
         f"min-max band. The study logged FIDs to 4 decimals, so a step's three values are exact: min, max and "
         f"3 x mean - min - max. The figure does not say which seed had which value.",
         "- **Seed identity** comes from per-seed numbers printed in earlier README versions "
         "(`git show <commit>:README.md`): at 57abc19 seed 0's FID at steps 100/200/300 for every run (integers; "
         "written when only seed 0 had finished); at 9226b12 JiT 32 px per seed at steps 100/200/300 (integers)"
         + ("; at 6494450 (still the current README) every run's final FID at 600 steps per seed, seeds 0/1/2 in "
            "order (0.1 FID)" if p == "cpu-long" else "") +
         ". A value is given to a seed only when exactly one of the step's three exact values rounds to the "
         "printed number (true for every printed number used).",
         "- Where the README names only seed 0, the seeds 1 and 2 at the end of training were identified by "
         "elimination where possible: of all ways to give the band's two remaining values to seeds 1 and 2 "
         "(jointly for every method at that resolution), only the assignments that reproduce every seed-paired row "
         "of `tables/resolution.json` and `tables/mta.json` (means, difference, 95% interval, seeds_needed) were "
         "kept, and a value was written only where all kept assignments agree.", ""]
    if p == "cpu-long":
        L += ["- The cpu-long runs are the cpu runs extended from their last checkpoints (their logs copied), so "
              "their steps 100-300 are the cpu runs' evaluations: the figures agree exactly, and the records at "
              "those steps are the same as in `papermill_runs/cpu/runs/`.", ""]
    L += ["Records per run (steps with a score record; subset records):", "",
          "| run | score steps | subset records |", "|---|---|---|"]
    for (m, res) in RUNS:
        for seed in SEEDS:
            st = [s for s in sorted(values[p][(m, res)]) if (m, res, seed, s) in assigned[p]]
            n_sub = 2 if (m in ("jit", "repa", "pixelrepa") and res == HIGH) else 0
            L.append(f"| {m}-{res}px-s{seed} | {', '.join(map(str, st)) or '-'} | {n_sub} |")
    L += ["", "## Cross-checks against the committed tables", ""]
    L += [f"- {c}" for c in report["checks"]]
    L += [f"- {n}" for n in report["notes"]]
    L += ["", "## What could not be recovered", ""]
    if report.get("pairings"):
        a, b = report["pairings"][:2]
        L += [f"- **Final FIDs of seeds 1 and 2 at 64 px** (JiT, REPA, unmasked adapter, PixelREPA: 8 values). Their "
              f"values are known exactly and even which of them belong to the same seed, but not whether that seed "
              f"is 1 or 2: the paired tables are unchanged when seeds 1 and 2 swap labels for every method at once, "
              f"and no surviving text names seed 1 or 2 at 64 px. The two labellings that reproduce every table:", "",
              "  | method | labelling A: seed 1 | seed 2 | labelling B: seed 1 | seed 2 |", "  |---|---|---|---|---|"]
        for m in a:
            L.append(f"  | {m} | {a[m][1]} | {a[m][2]} | {b[m][1]} | {b[m][2]} |")
        L += ["", "  Seed 0's values (identified) are in the records. Because these 64 px values cannot be given a "
              "seed, a seed-paired recomputation of this profile at 64 px has seed 0 only (the table's means and "
              "intervals themselves are reproduced above from the value sets).", ""]
    if counts["empty"]:
        L += [f"- Runs with no record at all (their `evals.jsonl` is empty): {', '.join(counts['empty'])}.", ""]
    un = [u for u in report["unidentified"] if not (report.get("pairings") and u[2] == steps and u[1] == HIGH)]
    if un:
        L.append("- **Earlier FID-curve points whose seed is not identifiable** (values exact, seed unknown: the "
                 "figures hold only the mean and the min-max band):")
        L.append("")
        L.append("  | run | step | seeds | the unassigned values |")
        L.append("  |---|---|---|---|")
        for m, res, step, seeds, rest in un:
            L.append(f"  | {m} {res} px | {step} | {', '.join(map(str, seeds))} | {', '.join(f'{v:.4f}' for v in sorted(rest))} |")
        L.append("")
        if p == "cpu-long":
            L += ["  Steps 100-300 are the cpu runs' evaluations (see `papermill_runs/cpu/runs/RECOVERED.md`: at step "
                  "300 the 64 px values of seeds 1 and 2 are paired, with two possible labellings); at steps 400 and "
                  "500 no surviving text names any seed.", ""]
    L += ["- **The training logs** (`metrics.jsonl`: loss and loss per t bin every 10 steps, learning rate, images/s, "
          "`align_cos`): lost. Notebook 01's loss figure and notebook 04's alignment-cosine figure hold only the seed "
          "mean and min-max band (JiT's loss; REPA/adapter/PixelREPA's cosine), no per-run curve, so no per-run "
          "training record is written. `stats.curves` therefore finds no curve for these runs.",
          "- **KID** (`eval_kid`, logged beside every FID) and the other evaluation fields: no surviving output shows "
          "them.",
          "- Checkpoints, sample files (`samples.pt`) and the encoder-target caches: not committed, lost; nothing "
          "here can be re-scored.", "",
          "## How the lost evaluations were made (for whoever reads these numbers)", "",
          f"FID through torch-fidelity with the offline Inception, {EVAL_N} class-balanced EMA samples (Heun, 10 "
          f"steps, guidance 2.0), the sampler's noise seeded with the training seed + 1 (old `train.evaluate`, "
          f"commit {SOURCE_COMMIT}), against all 692 held-out openclipart images, every 100 steps. Feature hacking: "
          f"partial denoising from t = 0.5 (10 steps) of the most- and least-encoder-similar subsets of the "
          f"training images (n = 78 each), "
          f"FID and FD in EfficientNet-Lite0 space with 200-fold bootstrap intervals, diagnostic seed = training "
          f"seed. See `papermill_runs/{other}/runs/RECOVERED.md` for the other profile.", ""]
    return "\n".join(L)


def main() -> int:
    values, assigned, subsets, report = recover()
    write(values, assigned, subsets, report)
    for p in PROFILES:
        for c in report[p]["checks"] + report[p]["notes"]:
            print(f"  [{p}] {c}")
    if FAILURES:
        print("CHECKS FAILED:", *FAILURES, sep="\n  ")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
