"""The runner: a profile's training runs, then its notebooks executed in order by papermill into
``papermill_runs/<profile>/`` (resumable: a notebook done earlier with the same parameters is skipped),
then ``SUMMARY.md``. The terminal shows what is happening the whole time: the run being trained (method,
resolution, seed, its step out of the total) and the notebook being executed, each with the time the
profile has taken and an estimate of what is left; the notebooks themselves keep their outputs clean.

    python -m pixelrepa.study --profile quick      # the command line (study.main)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import yaml
from jupyter_client.manager import AsyncKernelManager

from . import study
from .storage import atomic_write_text, checkpoints


def notebooks() -> list[Path]:
    return sorted(study.NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def check_notebook_parameters(nbs: list[Path]) -> None:
    """Every notebook's parameters cell must define every StudyParams field, and nothing else."""
    import papermill as pm
    fields = {f.name for f in dataclasses.fields(study.StudyParams)}
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


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


class Clock:
    """The profile's elapsed time and an estimate of what is left: the mean duration of the tasks of a
    kind measured so far, times the number of that kind still to do."""

    def __init__(self) -> None:
        self.start, self.took = time.monotonic(), {}

    def done(self, kind: str, seconds: float) -> None:
        self.took.setdefault(kind, []).append(seconds)

    def status(self, left: dict[str, int]) -> str:
        known = {k: n for k, n in left.items() if n}
        if any(not self.took.get(k) for k in known):
            tail = "time left estimated once one of each is done"
        else:
            tail = "about " + minutes(sum(n * sum(self.took[k]) / len(self.took[k]) for k, n in known.items())) + " left"
        return f"{minutes(time.monotonic() - self.start)} so far, {tail}"


def stop_file(P: study.StudyParams) -> Path:
    """``runs/<profile>/STOP``: while it exists, no training process starts another run; those under way
    finish (with their evaluations). For a session that ends before the next run could finish."""
    return study.output_path(P.runs_dir) / P.profile / "STOP"


# ----------------------------------------------------------------------------- a session's deadline

def parse_until(text: str, now: float | None = None) -> float:
    """``--until``: the time (seconds since the epoch) after which no run should still be going: ``HH:MM``
    (local time, the next such time), ``+MINUTES`` from now, or ``@SECONDS`` since the epoch."""
    now = time.time() if now is None else now
    try:
        if text.startswith("+"):
            return now + 60 * float(text[1:])
        if text.startswith("@"):
            return float(text[1:])
        hh, mm = (int(v) for v in text.split(":"))
        if not (0 <= hh < 24 and 0 <= mm < 60):
            raise ValueError(text)
    except ValueError:
        raise ValueError(f"--until takes HH:MM (a clock time), +MINUTES or @SECONDS since the epoch, not {text!r}") from None
    day = time.localtime(now)
    at = time.mktime((day.tm_year, day.tm_mon, day.tm_mday, hh, mm, 0, 0, 0, -1))
    return at if at > now else time.mktime((day.tm_year, day.tm_mon, day.tm_mday + 1, hh, mm, 0, 0, 0, -1))


def run_minutes(P: study.StudyParams, folder: Path) -> tuple[float, float | None]:
    """The measured wall minutes of a finished run: (training, evaluations). Training from its metrics log
    (each logged interval's images over its rate: the curve's scores and checkpoints included, a
    restart's set-up too); evaluations from its timing records (`study.TIMES`), None for runs finished
    before those were written."""
    from .stats import read_jsonl
    seconds, images = 0.0, 0
    for rec in read_jsonl(folder / "metrics.jsonl"):
        if rec.get("images_per_s"):
            seconds += (rec["images"] - images) / rec["images_per_s"]
            images = rec["images"]
    evals = [r["seconds"] for r in read_jsonl(folder / study.TIMES) if r.get("phase") == "evals"]
    return seconds / 60, sum(evals) / 60 if evals else None


def expected_minutes(P: study.StudyParams, arm: str, res: int) -> tuple[float, float] | None:
    """How long a run of ``arm`` at ``res`` takes, (training, evaluations) in minutes, from the profile's
    finished runs at ``res`` (`finished_runs`: here or committed): the median over those of the same
    arm, else of its method at another alignment coefficient (a dose arm as its method), else of any
    arm. Evaluations likewise over the runs that timed theirs; where none did, the training time's
    share of a run (TRAIN_SHARE). None where no run at ``res`` is finished."""
    found = []  # (arm, (training, evaluations)) of each finished run at res
    for d in finished_runs(P):
        a, r, _ = study.parse_run(d.name)
        if r == res:
            found.append((a, run_minutes(P, d)))
    base = (study.split_arm(arm) or (arm,))[0]
    tiers = (lambda a: a == arm, lambda a: (study.split_arm(a) or (a,))[0] == base, lambda a: True)

    def median_of(k):
        for same in tiers:
            values = [t[k] for a, t in found if same(a) and t[k] is not None]
            if values:
                return statistics.median(values)
        return None
    train, evals = median_of(0), median_of(1)
    if train is None:
        return None
    return train, evals if evals is not None else train * (1 - TRAIN_SHARE) / TRAIN_SHARE


def minutes_left(P: study.StudyParams, arm: str, res: int, seed: int) -> float | None:
    """The expected minutes a run still needs (`expected_minutes`, its training counted from its newest
    checkpoint, where it resumes); None where no finished run tells."""
    t = expected_minutes(P, arm, res)
    if t is None:
        return None
    saved = checkpoints(study.run_dir(P, arm, res, seed))
    step = int(saved[-1].stem.split("-")[-1]) if saved else 0
    return t[0] * (1 - min(step, P.steps) / P.steps) + t[1]


def clock_time(at: float) -> str:
    return time.strftime("%H:%M", time.localtime(at))


def train_runs(P: study.StudyParams, clock: Clock, wait: bool = True, start: int = 0,
               until: float | None = None) -> None:
    """Train (and evaluate) every run of the plan in this process, printing which one and the profile's
    time. With ``wait``, a run another process holds is waited for; without, it is skipped (workers
    started alike share the plan that way). The pass over the plan begins at its run ``start`` and
    wraps around (`train_parallel` starts its workers at different runs). With ``until`` (seconds since
    the epoch), a run is started only when it is expected to end by then (`minutes_left`; a run no
    finished one can time is started): a session's end is filled with the runs that fit."""
    runs = study.plan(P)
    todo = [r for r in runs if not (study.run_dir(P, *r) / "done.json").exists()]
    if todo:
        study.prepare_data(P)
    order = list(range(len(runs)))
    stop = stop_file(P)
    for k in order[start:] + order[:start]:
        m, res, seed = runs[k]
        if (m, res, seed) in todo and stop.exists():
            print(f"[study] {stop} exists: no further run is started (delete it to go on)", flush=True)
            return
        if (m, res, seed) not in todo or (study.run_dir(P, m, res, seed) / "done.json").exists():
            if (m, res, seed) in todo:  # finished meanwhile, by another worker
                todo.remove((m, res, seed))
            study.ensure_run(P, m, res, seed, wait=wait)  # finished: its evaluations, if missing
            continue
        if until is not None:
            need = minutes_left(P, m, res, seed)
            if need is not None and time.time() + 60 * need > until:
                print(f"[study] run {k + 1}/{len(runs)}: {m} at {res} px, seed {seed} needs about {minutes(60 * need)}: "
                      f"it would end after {clock_time(until)} (--until), not started", flush=True)
                continue
        todo.remove((m, res, seed))
        print(f"[study] run {k + 1}/{len(runs)}: {m} at {res} px, seed {seed} "
              f"({clock.status({'run': len(todo) + 1})})", flush=True)
        t = time.monotonic()
        if study.ensure_run(P, m, res, seed, wait=wait) is None:
            print(f"[study] run {k + 1}/{len(runs)} is held by another worker", flush=True)
        else:
            clock.done("run", time.monotonic() - t)


# ----------------------------------------------------------------------------- parallel training

def worker_starts(runs: list[tuple[str, int, int]], todo: list[tuple[str, int, int]], n: int) -> list[int]:
    """Where each of ``n`` workers begins its pass over the plan (indices into ``runs``): at the first
    unfinished run of each resolution in turn, so that the first runs build different resolutions'
    one-time caches (reference features, encoder targets), then at the next unfinished runs in the
    plan's order. The plan lists the runs seed by seed, so workers side by side train the arms of one
    seed together: a protocol that spans sessions completes its seeds in turn, and its interim
    comparisons (paired by seed) gain a seed at a time rather than scattered runs."""
    firsts = [runs.index(next(r for r in todo if r[1] == res)) for res in dict.fromkeys(r[1] for r in todo)]
    rest = [k for k in (runs.index(r) for r in todo) if k not in firsts]
    return (firsts[:n] + rest)[:n]


# A run's share of its wall time spent training, the rest evaluating (measured on the quick and decisive
# profiles on the CPU: 0.5-0.6): weighs a run's progress in the time-left estimate.
TRAIN_SHARE = 0.55
_RUN_LINE = re.compile(r"\[study\] run (\d+)/\d+: (\S+) at (\d+) px, seed (\d+)")
_HELD_LINE = re.compile(r"\[study\] run (\d+)/\d+ is held by another worker")


def worker_activity(log: str) -> tuple[int, str] | None:
    """What a worker's log says it is doing: (plan index of its run, "training" or "evaluating"), or
    None before its first run or after one it found held by another worker."""
    run, phase = None, None
    for line in log.splitlines():
        if m := _RUN_LINE.search(line):
            run, phase = int(m[1]) - 1, "training"
        elif (m := _HELD_LINE.search(line)) and run == int(m[1]) - 1:
            run = None
        elif run is not None and re.search(r"\[study\] \S+: (scoring|feature-hacking|pixel probe)", line):
            phase = "evaluating"
    return None if run is None else (run, phase)


def last_step(metrics: Path, eval_every: int = 0) -> tuple[int, bool]:
    """The last training step a run's metrics log records (0: none yet), and whether the run is scoring
    its curve there: a step that is a multiple of ``eval_every`` without its evaluation record yet."""
    try:
        with open(metrics, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return 0, False
    for line in reversed(lines):
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (ValueError, KeyError, TypeError):
            continue
        return step, bool(eval_every) and step > 0 and step % eval_every == 0 and "eval_fid" not in rec
    return 0, False


def parallel_status(P: study.StudyParams, runs, logs: list[str], elapsed: float, before: int = 0,
                    alive: list[bool] | None = None) -> tuple[str, str]:
    """The status line of `train_parallel`: runs finished, each worker's run (method, resolution, seed,
    step out of the total, or evaluating: the run's scores, subsets and probe after its training), the
    time so far and an estimate of the training time left (from the work done in ``elapsed``, beyond the
    ``before`` runs finished earlier: a run counts TRAIN_SHARE of itself when trained). A worker whose
    process has ended (``alive``) is "finished". Also the same line without the times and steps (what
    changes when something new starts)."""
    done = [(study.run_dir(P, *r) / "done.json").exists() for r in runs]
    acts = [worker_activity(log) if alive is None or alive[k] else None for k, log in enumerate(logs)]
    busy = {a[0] for a in acts if a is not None}
    finished = sum(d and k not in busy for k, d in enumerate(done))  # trained and evaluated
    work, parts, shape = float(finished), [], []
    for k, (log, act) in enumerate(zip(logs, acts)):
        if act is None:
            parts.append("finished" if alive is not None and not alive[k] else "idle" if _RUN_LINE.search(log) else "starting")
            shape.append(parts[-1])
            continue
        (m, res, seed), phase = runs[act[0]], "evaluating" if done[act[0]] else act[1]
        step, scoring = last_step(study.run_dir(P, m, res, seed) / "metrics.jsonl", P.eval_every)
        name = f"{m} {res} px s{seed}"
        if phase == "training":
            work += TRAIN_SHARE * min(1.0, step / P.steps)
            # before its first logged step: data, encoder targets, the first run's one-time caches
            parts.append(f"{name}: step {step}/{P.steps}" + (" (scoring)" if scoring else "") if step
                         else f"{name}: setting up")
        else:
            work += TRAIN_SHARE + (1 - TRAIN_SHARE) / 2
            parts.append(f"{name}: evaluating")
        shape.append(f"{name} {phase}")
    left, work = len(runs) - work, work - before
    eta = (f"about {minutes(elapsed * left / work)} of training left" if work >= 0.25 and left > 0
           else "training time left estimated once a run is under way" if left > 0 else "training done")
    head = f"[study] runs {finished}/{len(runs)} done"
    return f"{head}, {minutes(elapsed)} so far, {eta} | " + " | ".join(parts), head + " | " + " | ".join(shape)


def train_parallel(P: study.StudyParams, workers: int, clock: Clock, interval: float = 5.0,
                   until: float | None = None) -> None:
    """Train the profile's unfinished runs in ``workers`` processes (`train_runs` in each, single-threaded
    when there are as many workers as cores, sharing the plan through the runs' lock files), showing their
    progress here on one line: rewritten in place on a terminal, a new line when something changes (or
    each minute) otherwise. The workers' own output goes to ``<runs_dir>/<profile>/workers/``. A worker
    that fails stops the others (every run resumes later) and is an error with the end of its log.
    ``until``: each worker starts only the runs expected to end by then (`train_runs`)."""
    if P.nproc > 1:
        raise ValueError("workers > 1 trains runs side by side on the CPU; this profile trains each run "
                         f"through torchrun with nproc = {P.nproc}: use one worker")
    runs = study.plan(P)
    todo = [r for r in runs if not (study.run_dir(P, *r) / "done.json").exists()]
    if not todo:
        return
    study.prepare_data(P)  # once, before the workers (each would otherwise decode the dataset)
    n = min(workers, len(todo))
    folder = study.output_path(P.runs_dir) / P.profile / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(P).items()}
    atomic_write_text(folder / "profile.yaml", yaml.safe_dump({**params, "progress": False}, sort_keys=False))
    threads = str(max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) // n))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    paths = [folder / f"worker-{k + 1}.log" for k in range(n)]
    print(f"[study] training {len(todo)} run{'s' * (len(todo) > 1)} in {n} worker process{'es' * (n > 1)} "
          f"({threads} thread{'s' * (threads != '1')} "
          f"each; their logs: {folder})", flush=True)
    procs = []
    tty = sys.stdout.isatty()
    t0, shown, printed = time.monotonic(), None, 0.0
    try:
        for k, start in enumerate(worker_starts(runs, todo, n)):
            with open(paths[k], "w") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "pixelrepa.study", "--profile", str(folder / "profile.yaml"),
                                               "--train-only", "--start", str(start + 1),
                                               *(["--until", f"@{until}"] if until is not None else [])], stdout=log,
                                              stderr=subprocess.STDOUT, env=env, cwd=str(study.ROOT)))
        while True:
            codes = [p.poll() for p in procs]
            logs = [p.read_text(errors="replace") if p.exists() else "" for p in paths]
            line, what = parallel_status(P, runs, logs, time.monotonic() - t0, before=len(runs) - len(todo),
                                         alive=[c is None for c in codes])
            if tty:
                width = shutil.get_terminal_size().columns
                print("\r" + line[:width - 1].ljust(width - 1), end="", flush=True)
            elif what != shown or time.monotonic() - printed >= 60:
                print(line, flush=True)
                shown, printed = what, time.monotonic()
            failed = [k for k, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                k = failed[0]
                tail = "\n".join(logs[k].splitlines()[-15:])
                raise RuntimeError(f"training worker {k + 1} failed (exit {codes[k]}); the end of its log {paths[k]}:\n{tail}")
            if all(c == 0 for c in codes):
                break
            time.sleep(interval)
    finally:
        if tty:
            print(flush=True)
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
    clock.done("training", time.monotonic() - t0)


class _QuietKernelManager(AsyncKernelManager):
    """The notebooks' kernel over a local socket (IPC transport): the TCP transport makes ipykernel print
    a warning about unencrypted traffic into the user's terminal for every notebook."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        # the socket files are <ip>-<port>, removed with the kernel
        self.transport, self.ip = "ipc", str(Path(tempfile.gettempdir()) / f"pixelrepa-kernel-{os.getpid()}-{id(self)}")


# What `--report` executes when no notebook is named: the explorers need checkpoints, which a
# protocol spanning sessions no longer has.
REPORT_NOTEBOOKS = ("00", "01", "02", "03", "04", "05")


def finished_runs(P: study.StudyParams) -> list[Path]:
    """The planned runs that are finished (`study.finished_run`), in plan order."""
    return [f for f in (study.finished_run(P, *r) for r in study.plan(P)) if f is not None]


def run_profile(P: study.StudyParams, only: list[str] | None = None, force: bool = False,
                train: bool = True, workers: int = 1, report: bool = False) -> Path:
    """Train the profile's runs (with ``train``, when every notebook is asked for: in this process, or
    in ``workers`` processes side by side, with progress), then execute the notebooks in order into the
    results folder; resume where an earlier call stopped. With ``report``: nothing is trained or
    evaluated; the notebooks (`REPORT_NOTEBOOKS` unless ``only``) show the runs finished so far, and
    run again when that set or their logs change."""
    import papermill as pm
    if report:
        only, train = list(only or REPORT_NOTEBOOKS), False
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
    logs = []  # a report's notebooks depend on which runs are finished and on their logs
    if report:
        runs = finished_runs(P)
        print(f"[study] report only: {len(runs)} of {len(study.plan(P))} planned runs finished; the notebooks "
              f"show those and train nothing", flush=True)
        logs = [f.name.encode() + (f / n).read_bytes() for f in runs for n in ("done.json", "metrics.jsonl", "evals.jsonl")
                if (f / n).exists()]
    keys = {nb.name: _digest(key_params, nb.read_bytes(), *logs) for nb in nbs}
    todo = [nb for nb in nbs if force or _key(state.get(nb.name)) != keys[nb.name] or not (out / nb.name).exists()]
    clock = Clock()
    if train and not only and todo:  # the notebooks would train these one by one, out of the terminal's sight
        if workers > 1:
            train_parallel(P, workers, clock)
        train_runs(P, clock)  # after the workers: only what they left (nothing, unless a run needs evaluations)
    for k, nb in enumerate(nbs):
        target = out / nb.name
        if nb not in todo:
            print(f"[study] {nb.name}: done earlier with these parameters, skipped")
            continue
        todo.remove(nb)
        print(f"[study] notebook {k + 1}/{len(nbs)}: {nb.name} -> {target} "
              f"({clock.status({'notebook': len(todo) + 1})})", flush=True)
        t = time.monotonic()
        try:
            if report:  # the notebook's kernel inherits it: study.ensure_run then trains nothing
                os.environ[study.REPORT_ONLY] = "1"
            pm.execute_notebook(str(nb), str(target), parameters=params, cwd=str(study.NOTEBOOK_DIR),
                                kernel_name="python3", progress_bar=False, log_output=False,
                                kernel_manager_class=_QuietKernelManager)
        except pm.PapermillExecutionError as err:
            raise RuntimeError(f"notebook {nb.name} failed in cell {err.cell_index + 1} (counting from 1 in the "
                               f"executed notebook, papermill's injected-parameters cell included; execution "
                               f"count {err.exec_count}): {err.ename}: {err.evalue}; the executed notebook, error "
                               f"included, is {target}; rerun to resume from this notebook") from None
        finally:
            if report:
                os.environ.pop(study.REPORT_ONLY, None)
        clock.done("notebook", time.monotonic() - t)
        drop_widget_state(target)
        state[nb.name] = {"key": keys[nb.name], "seconds": round(time.monotonic() - t, 1)}
        atomic_write_text(state_path, json.dumps(state, indent=1))
    print(f"[study] profile {P.profile} done in {minutes(time.monotonic() - clock.start)}", flush=True)
    summary = write_summary(P)
    if report and P.profile == HEADLINE and P.results == committed(HEADLINE):
        refresh_headlines()
    return summary


def committed(profile: str) -> Path:
    """The profile's committed results folder, ``papermill_runs/<profile>`` in the checkout."""
    return study.ROOT / "papermill_runs" / profile


def refresh_headlines() -> list[Path]:
    """Rewrite the committed summaries of the other profiles, whose opening (`_headline_of`) shows the
    HEADLINE protocol's committed verdicts and figures: after a report of it, they show the new ones."""
    done = []
    for name in study.profiles():
        if name not in (HEADLINE, EARLIER) and (committed(name) / "SUMMARY.md").exists():
            done.append(write_summary(dataclasses.replace(study.load_profile(name), results_dir=str(committed(name)))))
    return done


def _key(entry) -> str | None:
    """A notebook's entry in state.json: its key (older files held only the key)."""
    return entry.get("key") if isinstance(entry, dict) else entry


def drop_widget_state(path: Path) -> None:
    """An executed notebook without its widgets' saved state (megabytes of plotly data per explorer):
    the explorers rebuild it when the notebook is run."""
    nb = json.loads(path.read_text())
    if nb.get("metadata", {}).pop("widgets", None) is not None:
        atomic_write_text(path, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


# The profile whose committed verdicts open every other profile's summary: what the study found; until
# all its runs are in, the earlier, smaller profile it supersedes says what was found at that scale.
HEADLINE = "decisive"
EARLIER = "cpu-long"
HEADLINE_FIGURES = ("05_convergence", "03_subset_fid", "04_probe", "04_samples_jit", "04_samples_pixelrepa")


def headline(t: dict, ref: dict, ref_name: str, finished: int, planned: int, figures=()) -> list[str]:
    """The opening of a summary: the ``ref_name`` profile's verdicts (its tables ``ref``, from its
    committed run logs, ``finished`` of ``planned`` runs) with its figures, then this profile's
    comparisons (its tables ``t``) beside the reference's 95% intervals: inside, outside, or no
    interval where the reference has fewer than two seeds of that comparison."""
    lines = [f"## What the study found: the `{ref_name}` protocol ({finished} of {planned} runs finished)", "",
             f"Its verdicts (README, Protocol), computed from its run logs under `papermill_runs/{ref_name}/runs/`:", ""]
    lines += [_verdict_line(v) if v["verdict"] != "not run" else f"- **{v['claim']}. {v['title']}**: no verdict yet "
              f"(a comparison of it has no seed with both arms finished)" for v in ref["verdicts"]] + [""]
    lines += [f"![{Path(f).stem}]({f})" for f in figures] + ([""] if figures else [])
    pairs = [(c, r) for c, r in zip(t["components"], ref["components"])
             if (c["claim"], c["a"], c["b"], c["where"]) == (r["claim"], r["a"], r["b"], r["where"])]
    if not pairs:
        return lines
    lines += [f"## This run beside the `{ref_name}` protocol", "",
              f"Each comparison of this profile (at its own end of training) against the `{ref_name}` profile's "
              f"mean and 95% interval over seeds (at its end): a small profile's difference inside the interval "
              f"agrees with it; outside, it does not (fewer steps or seeds can move it).", "",
              f"| claim | comparison | `{ref_name}`: diff [95% interval], seeds | this run: diff, seeds | inside |",
              "|---|---|---|---|---|"]
    for c, r in pairs:
        has_interval = r["n_seeds"] >= 2 and not math.isnan(r["lo"])
        inside = "-" if not has_interval or c["n_seeds"] == 0 else ("yes" if r["lo"] <= c["diff"] <= r["hi"] else "no")
        ref_cell = (f"{_fmt(r['diff'])} [{_fmt(r['lo'])}, {_fmt(r['hi'])}], {r['n_seeds']}" if has_interval
                    else f"{_fmt(r['diff'])} (no interval), {r['n_seeds']}")
        lines.append(f"| {c['claim']} | {c['component']} | {ref_cell} | {_fmt(c['diff'])}, {c['n_seeds']} | {inside} |")
    return lines + [""]


def _verdict_line(v: dict) -> str:
    return f"- **{v['claim']}. {v['title']}**: {v['verdict']} ({v['evidence']})"


def _headline_of(P: StudyParams, t: dict) -> list[str]:
    """`headline` for a profile other than HEADLINE, from HEADLINE's committed run logs (none: nothing)."""
    if P.profile in (HEADLINE, EARLIER):
        return []
    H, E = (dataclasses.replace(study.load_profile(name), results_dir=str(committed(name)))
            for name in (HEADLINE, EARLIER))  # their committed copies, wherever this profile's outputs go
    finished = len(list((H.results / "runs").glob("*/done.json")))
    if not finished:
        return []
    ref = study.tables(H, collect=False)
    figures = [os.path.relpath(H.results / "figures" / f"{name}.png", P.results) for name in HEADLINE_FIGURES
               if (H.results / "figures" / f"{name}.png").exists()]
    lines = headline(t, ref, HEADLINE, finished, len(study.plan(H)), figures)
    if finished < len(study.plan(H)) and (E.results / "runs").exists():  # the protocol not complete yet
        n = len(list((E.results / "runs").glob("*/evals.jsonl")))  # recovered records: no done.json
        earlier = [f"Until it is complete, what the earlier, smaller `{EARLIER}` profile found at its scale ({E.train_images} "
                   f"training images, {E.steps} steps, {len(E.seeds)} seeds, {E.eval_samples} samples per score, "
                   f"{n} runs; superseded by `{HEADLINE}`; `papermill_runs/{EARLIER}/SUMMARY.md`):", ""]
        earlier += [_verdict_line(v) for v in study.tables(E, collect=False)["verdicts"]] + [""]
        beside = f"## This run beside the `{HEADLINE}` protocol"
        at = lines.index(beside) if beside in lines else len(lines)
        lines[at:at] = earlier
    return lines


def write_summary(P: StudyParams) -> Path:
    """SUMMARY.md: what the study found (the HEADLINE profile's verdicts, this profile's comparisons
    beside them), then this profile's verdicts, end scores and every comparison, from `write_tables`,
    then its figures."""
    t = study.write_tables(P)
    lines = [f"# Study summary: profile `{P.profile}`", "",
             f"Executed notebooks, figures and tables in this folder; run logs under `runs/`. Parameters: "
             f"`papermill_runs/profiles/{P.profile}.yaml`. Every number here is computed from the run logs by "
             f"`pixelrepa.stats` (README, Protocol).", ""]
    lines += _headline_of(P, t)
    finished, planned = len(list((P.results / "runs").glob("*/done.json"))), len(study.plan(P))
    if 0 < finished < planned:
        lines += [f"**Interim: {finished} of the {planned} planned runs are finished.** Every number below is "
                  f"computed from those; the verdicts are final only when all are in (the rules do not change).", ""]
    if t["verdicts"]:
        lines += [f"## Verdicts of this profile (`{P.profile}`)", ""] + [_verdict_line(v) for v in t["verdicts"]] + [""]
    for name, title in (("final", "End scores (mean and 95% t-interval over seeds)"),
                        ("components", "Comparisons (FID differences paired by seed; p-values Holm-adjusted)"),
                        ("dose", "Dose-response arms (secondary)"), ("probe", "Pixel probe and CKA (secondary)"),
                        ("memorisation", "Memorisation check"), ("subsets", "Feature-hacking subset FID"),
                        ("floors", "Floors used (real-vs-reference FID at the evaluation's N)")):
        rows = t.get(name) or []
        if rows:
            cols = SUMMARY_COLUMNS.get(name) or list(rows[0])
            lines += [f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows] + [""]
    figs = sorted((P.results / "figures").glob("*.png")) if (P.results / "figures").exists() else []
    if figs:
        lines += ["## Figures", ""] + [f"![{f.stem}](figures/{f.name})" for f in figs] + [""]
    path = P.results / "SUMMARY.md"
    atomic_write_text(path, "\n".join(lines))
    print(f"[study] summary: {path}")
    return path


SUMMARY_COLUMNS = {"components": ["claim", "component", "n_seeds", "diff", "lo", "hi", "margin", "mde", "pooled",
                                  "p_paper_holm", "p_other_holm", "p_equiv_holm", "outcome"],
                   "dose": ["a", "b", "where", "n_seeds", "diff", "lo", "hi", "mde", "p_paper", "p_other"]}


def _fmt(v):
    if isinstance(v, float):
        return "-" if v != v else (f"{v:.1e}" if 0 < abs(v) < 0.01 else f"{v:.2f}")
    return "-" if v is None else str(v)
