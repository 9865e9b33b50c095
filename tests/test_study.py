"""The study layer: profiles, notebooks' parameters cells, the runner's resume and failure report."""
import dataclasses
import os
import json
import subprocess
import time

import nbformat
import papermill as pm
import pytest

from conftest import PYTHON, run_env
from pixelrepa import plots, runner, stats, study

NOTEBOOKS = runner.notebooks()


def test_every_profile_loads_and_the_notebooks_exist():
    assert set(study.profiles()) >= {"smoke", "quick", "cpu", "gpu", "paper"}
    assert [nb.name[:2] for nb in NOTEBOOKS] == ["00", "01", "02", "03", "04", "05", "06"]
    for name in study.profiles():
        P = study.load_profile(name)
        assert P.profile == name
        assert study.plan(P), name


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_every_notebook_accepts_every_profile(nb, tmp_path):
    """papermill injects each profile into the notebook; running the parameters cells then building the
    config gives exactly the profile's StudyParams (nothing dropped, nothing mistyped)."""
    runner.check_notebook_parameters([nb])
    for name in study.profiles():
        params = {k: list(v) if isinstance(v, tuple) else v
                  for k, v in study.asdict(study.load_profile(name)).items()}
        out = tmp_path / f"{name}.ipynb"
        pm.execute_notebook(str(nb), str(out), parameters=params, prepare_only=True, progress_bar=False)
        injected = nbformat.read(out, as_version=4)
        ns = {}
        for cell in injected.cells:
            tags = cell.metadata.get("tags", [])
            if "parameters" in tags or "injected-parameters" in tags:
                exec(cell.source, ns)
        assert study.StudyParams.from_namespace(ns) == study.load_profile(name), (nb.name, name)


def test_unknown_or_ill_typed_parameters_are_errors_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: bad\nstepz: 10\n")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['stepz'\]"):
        study.load_profile(str(bad))
    bad.write_text("profile: bad\nsteps: ten\n")
    with pytest.raises(ValueError, match="StudyParams.steps='ten'"):
        study.load_profile(str(bad))
    bad.write_text("profile: bad\nhigh_res: 48\n")  # 48/8 = 6 tokens a side against 32/4 = 8
    with pytest.raises(ValueError, match="one token count"):
        study.load_profile(str(bad))
    with pytest.raises(ValueError, match="unknown profile 'nope'"):
        study.load_profile("nope")
    # the command line: a clear one-line error and exit status 2, nothing run
    bad.write_text("profile: bad\nmethods: [jit, dino]\n")
    r = subprocess.run([PYTHON, "-m", "pixelrepa.study", "--profile", str(bad)], capture_output=True, text=True,
                       env=run_env(), timeout=120)
    assert r.returncode == 2 and "StudyParams.methods" in r.stderr and "Traceback" not in r.stderr
    # a value papermill passes into a notebook (-p steps abc) is refused by the config cell
    ns = {k: v for k, v in study.asdict(study.load_profile("smoke")).items()}
    ns["steps"] = "abc"
    with pytest.raises(ValueError, match="StudyParams.steps"):
        study.StudyParams.from_namespace(ns)
    del ns["steps"]
    with pytest.raises(NameError, match="steps"):
        study.StudyParams.from_namespace(ns)


def test_paper_profile_builds_the_papers_configs():
    P = study.load_profile("paper")
    assert P.nproc == 8 and P.dataset.endswith("imagenet/train")
    jit = study.run_config(P, "jit", 256, 0)
    assert (jit.model, jit.resolution, jit.batch_size, jit.blr, jit.warmup_epochs) == ("JiT-B/16", 256, 1024, 5e-5, 5.0)
    assert jit.ema_decays == (0.9999, 0.9996) and jit.noise_scale == 1.0 and jit.cfg_scale == 3.0
    assert jit.steps == 750684  # 600 epochs of ImageNet's 1,281,167 images at batch 1024
    high = study.run_config(P, "jit", 512, 0)
    assert (high.model, high.noise_scale) == ("JiT-B/32", 2.0)
    from pixelrepa.jit import jit_config
    pix = study.run_config(P, "pixelrepa", 256, 0)
    a, jc = pix.align, jit_config("JiT-B/16", 256, 1000)
    assert (pix.encoder, a.depth(jc), a.loss_coef, a.ratio) == ("dinov2-b14", 4, 0.1, 0.2)
    repa = study.run_config(P, "repa", 256, 0).align
    assert (repa.depth(jc), repa.loss_coef, repa.proj_hidden) == (4, 0.5, 2048)


def test_run_configs_take_the_shared_fields_and_errors_name_the_profiles_field():
    P = study.StudyParams(eval_every=5, eval_samples=7, cfg_scale=1.5, encoder_weights="w.pt")
    cfg = study.run_config(P, "repa", P.high_res, 0)
    shared = {f.name for f in dataclasses.fields(study.StudyParams)} & {f.name for f in dataclasses.fields(cfg)}
    assert {"steps", "blr", "ema_decays", "eval_samples", "cfg_scale", "encoder_weights"} <= shared
    assert all(getattr(cfg, k) == getattr(P, k) for k in shared - {"data_dir"})
    assert (cfg.model, cfg.resolution, cfg.method, cfg.ckpt_every) == (P.model_high, P.high_res, "repa", 5)
    # a value only TrainConfig refuses is reported as the field of the profile it came from
    for fields, match in [(dict(eval_samples=1), r"^StudyParams.eval_samples=1: must be >= 2"),
                          (dict(noise_scale_high=0.0), r"^StudyParams.noise_scale_high=0.0: must be > 0"),
                          (dict(seeds=[2 ** 31]), r"^StudyParams.seeds=\(2147483648,\): must be in \[0, 2\*\*31\)")]:
        with pytest.raises(ValueError, match=match):
            study.StudyParams(**fields)


def test_a_finished_run_is_reused_and_one_with_other_settings_refused(tmp_path):
    P = study.StudyParams(runs_dir=str(tmp_path), methods=["jit"], progress=False)
    out = study.run_dir(P, "jit", P.low_res, 0)
    out.mkdir(parents=True)
    (out / "done.json").write_text(json.dumps(study._record(study.run_config(P, "jit", P.low_res, 0))))
    assert study.ensure_run(P, "jit", P.low_res, 0) == out  # no data, no training: returned at once
    P2 = study.StudyParams(runs_dir=str(tmp_path), methods=["jit"], steps=P.steps - 1, progress=False)
    with pytest.raises(ValueError, match="other settings.*'steps'"):  # fewer steps than it ran
        study.ensure_run(P2, "jit", P.low_res, 0)
    P3 = study.StudyParams(runs_dir=str(tmp_path), methods=["jit"], steps=P.steps + 1, blr=P.blr / 2, progress=False)
    with pytest.raises(ValueError, match="other settings.*'blr'"):  # more steps, but not only that
        study.ensure_run(P3, "jit", P.low_res, 0)


def test_a_run_another_process_holds_is_skipped_or_waited_for(tmp_path):
    """A notebook asking for a run a train-only worker is training waits for it, then reuses it; a
    worker skips it. (Two processes training one run directory would corrupt it.)"""
    import threading
    import time
    P = study.StudyParams(runs_dir=str(tmp_path), methods=["jit"], progress=False)
    out = study.run_dir(P, "jit", P.low_res, 0)
    out.mkdir(parents=True)
    holder = subprocess.Popen([PYTHON, "-c", f"import fcntl,time; f=open({str(out / '.lock')!r},'w'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert study.ensure_run(P, "jit", P.low_res, 0, wait=False) is None
        got = []
        waiter = threading.Thread(target=lambda: got.append(study.ensure_run(P, "jit", P.low_res, 0)))
        waiter.start()
        time.sleep(1.0)
        assert waiter.is_alive() and not got  # still waiting for the holder
        (out / "done.json").write_text(json.dumps(study._record(study.run_config(P, "jit", P.low_res, 0))))
        holder.kill()  # the lock goes with its process, however it ends
        waiter.join(30)
        assert got == [out]
    finally:
        holder.kill()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["jit", "pixelrepa"])
def test_a_finished_run_extended_to_more_steps_equals_the_longer_run(tmp_path, method):
    """Asking a finished run for more steps resumes it from its last checkpoint, and what comes out is
    the run that was asked for from the start: the same weights, alignment head, EMAs, optimizer state
    and logged losses, cosines and FIDs. (The cpu-long profile extended the cpu runs this way; PixelREPA
    adds the head, its optimizer state, the token masks and the cached encoder targets.)"""
    import dataclasses
    import torch
    base = dataclasses.replace(study.load_profile("smoke"), methods=[method], eval_every=10, eval_samples=4, steps=10)
    res = base.high_res
    short = dataclasses.replace(base, runs_dir=str(tmp_path / "a"))
    study.ensure_run(short, method, res, 0)
    extended = study.ensure_run(dataclasses.replace(short, steps=20), method, res, 0)
    direct = study.ensure_run(dataclasses.replace(base, steps=20, runs_dir=str(tmp_path / "b")), method, res, 0)
    assert json.loads((extended / "done.json").read_text())["steps"] == 20
    a, b = (torch.load(d / "ckpt-00000020.pt", weights_only=False) for d in (extended, direct))
    assert bool(a["head"]) == (method != "jit") and a["opt"]["state"]
    for key in ("model", "head", "emas", "opt"):
        fa, fb = flat(a[key]), flat(b[key])
        assert fa.keys() == fb.keys(), key
        for k in fa:
            same = torch.equal(fa[k], fb[k]) if isinstance(fa[k], torch.Tensor) else fa[k] == fb[k]
            assert same, f"{key}.{k}"
    la, lb = ([{k: v for k, v in r.items() if k != "images_per_s"} for r in stats.read_jsonl(d / "metrics.jsonl")]
              for d in (extended, direct))
    assert [r["step"] for r in la] == [10, 10, 20, 20] and "eval_fid" in la[-1] and la == lb
    if method == "pixelrepa":
        assert "align_cos" in la[-2] and "align_cos_masked" in la[-2]


def flat(tree, prefix="") -> dict:
    """A checkpoint entry (state dicts, lists of them, the optimizer's nested state) as path: leaf."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in flat(sub, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): tree}


def test_runs_and_results_lie_under_the_output_root_and_this_session_writes_outside_the_checkout(
        tmp_path, monkeypatch):
    import dataclasses
    import os
    from pathlib import Path
    session = Path(os.environ["PIXELREPA_OUTPUT_ROOT"]).resolve()  # set by the Makefile or conftest
    assert not session.is_relative_to(study.ROOT.resolve())
    P = study.load_profile("smoke")
    assert all(p.resolve().is_relative_to(session) for p in (P.results, study.run_dir(P, "jit", 32, 0)))
    monkeypatch.setenv("PIXELREPA_OUTPUT_ROOT", str(tmp_path))
    assert P.results == tmp_path / "papermill_runs" / "smoke"
    assert study.run_dir(P, "repa", 64, 2) == tmp_path / "runs" / "smoke" / "repa-64px-s2"
    assert study.run_config(P, "jit", 32, 0).out_dir == str(tmp_path / "runs" / "smoke" / "jit-32px-s0")
    given = dataclasses.replace(P, runs_dir=str(tmp_path / "r"), results_dir="out")  # absolute stays, relative moves
    assert study.run_dir(given, "jit", 32, 0).parent == tmp_path / "r" / "smoke" and given.results == tmp_path / "out"
    monkeypatch.delenv("PIXELREPA_OUTPUT_ROOT")  # the study's own runs: into the repository
    assert P.results == study.ROOT / "papermill_runs" / "smoke"
    assert study.run_dir(P, "jit", 32, 0).parent == study.ROOT / "runs" / "smoke"


def _tiny_notebook(path, body):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell(study.parameters_cell(study.StudyParams()))
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)


@pytest.mark.slow
def test_runner_names_the_failing_notebook_and_cell_then_resumes(tmp_path, monkeypatch, capfd):
    nbdir, flag = tmp_path / "nbs", tmp_path / "flag"
    nbdir.mkdir()
    _tiny_notebook(nbdir / "00_first.ipynb", f"open({str(tmp_path / 'count')!r}, 'a').write('x')")
    _tiny_notebook(nbdir / "01_second.ipynb", f"import os\nassert os.path.exists({str(flag)!r}), 'flag missing'")
    monkeypatch.setattr(study, "NOTEBOOK_DIR", nbdir)
    P = study.StudyParams(profile="t", results_dir=str(tmp_path / "out"), runs_dir=str(tmp_path / "runs"))
    with pytest.raises(RuntimeError, match=r"notebook 01_second.ipynb failed in cell 3 .*AssertionError: flag missing"):
        runner.run_profile(P, train=False)
    assert (tmp_path / "out" / "01_second.ipynb").exists()  # the executed notebook shows the error
    said = capfd.readouterr()  # the file descriptors: the kernel's own stderr too
    assert "[study] notebook 1/2: 00_first.ipynb" in said.out and "time left estimated once" in said.out
    assert "[study] notebook 2/2: 01_second.ipynb" in said.out and "min left)" in said.out
    assert "without encryption" not in said.out + said.err  # the kernel runs over a local socket
    flag.write_text("")
    summary = runner.run_profile(P, train=False)  # resumes: the first notebook is not executed again
    assert (tmp_path / "count").read_text() == "x"
    assert summary.read_text().startswith("# Study summary: profile `t`")
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    assert set(state) == {"00_first.ipynb", "01_second.ipynb"}
    runner.run_profile(P, force=True, train=False)
    assert (tmp_path / "count").read_text() == "xx"


def test_the_runner_names_each_run_it_trains_and_estimates_the_time_left(tmp_path, monkeypatch, capsys):
    P = study.StudyParams(runs_dir=str(tmp_path), methods=("jit", "repa"), progress=False)
    done = study.run_dir(P, "jit", P.low_res, 0)
    done.mkdir(parents=True)
    (done / "done.json").write_text("{}")
    trained = []
    monkeypatch.setattr(study, "ensure_run", lambda P, m, res, seed, wait=True: trained.append((m, res)) or tmp_path)
    prepared = []
    monkeypatch.setattr(study, "prepare_data", lambda P: prepared.append(P.profile))
    clock = runner.Clock()
    runner.train_runs(P, clock)
    said = capsys.readouterr().out
    assert prepared == [P.profile]  # both resolutions' data caches first, in one decoding pass
    assert trained == [("jit", 32), ("repa", 32), ("jit", 64), ("repa", 64)]  # the finished one: evaluations only
    assert "run 1/4" not in said and "[study] run 2/4: repa at 32 px, seed 0" in said
    assert "run 2/4: repa at 32 px, seed 0 (0.0 min so far, time left estimated once" in said
    assert "[study] run 4/4: repa at 64 px, seed 0 (0.0 min so far, about 0.0 min left)" in said
    assert len(clock.took["run"]) == 3
    clock.took["run"] = [60.0, 120.0]
    assert clock.status({"run": 3, "notebook": 0}).endswith("about 4.5 min left")


def test_dose_arms_scale_the_papers_coefficient_and_train_with_their_own_seeds():
    P = study.StudyParams(methods=("jit", "repa", "pixelrepa", "repa_x4"), seeds=(0, 1), dose_seeds=(1,))
    c = study.run_config(P, "repa_x4", P.high_res, 1)
    assert (c.method, c.align_coef) == ("repa", 2.0) and c.out_dir.endswith("repa_x4-64px-s1")
    assert study.run_config(P, "repa", P.high_res, 1).align_coef is None  # the paper's 0.5
    assert [r for r in study.plan(P) if r[0] == "repa_x4"] == [("repa_x4", P.high_res, 1)]
    assert study.plan(P)[-1] == ("repa_x4", P.high_res, 1)  # after every main arm's seeds
    D = study.load_profile("decisive")
    first_dose = next(k for k, r in enumerate(study.plan(D)) if "_x" in r[0])
    assert len(study.plan(D)) == 36 and first_dose == 36 - 2 * 3  # 30 main runs, then the 6 dose runs
    assert study.plan(D)[:3] == [("jit", 32, 0), ("repa", 32, 0), ("jit", 64, 0)]
    with pytest.raises(ValueError, match="methods"):
        study.StudyParams(methods=("jit", "jit_x2"))


def test_curves_name_each_method_once_in_the_legend_even_when_a_panel_lacks_it():
    from pixelrepa import plots
    rows = [{"method": m, "resolution": r, "seed": s, "images": i, "eval_fid": float(i + s)}
            for m in ("jit", "repa") for r in (32, 64) for s in (0, 1) for i in (1, 2)]
    rows += [{"method": "pixelrepa", "resolution": 64, "seed": s, "images": i, "eval_fid": 1.0} for s in (0, 1) for i in (1, 2)]
    fig = plots.curves(rows)
    legend = [t.name for t in fig.data if t.showlegend]
    assert legend == ["JiT", "JiT + REPA", "PixelREPA (MTA)"]
    assert all(t.mode == "lines" for t in fig.data if t.fill == "toself")  # seed bands draw no markers


@pytest.mark.slow
def test_a_finished_run_is_scored_at_its_end_and_half_way_each_checkpoint_read_once(tmp_path, monkeypatch):
    """ensure_evals: the end score with the memorisation check (against a fixed draw of the run's own
    training images, as many as the reference's held-out ones at most), the half-way score of a half_scores arm, the
    records appended to evals.jsonl; asked again, nothing is recomputed."""
    import dataclasses
    P = dataclasses.replace(study.load_profile("smoke"), methods=["jit"], steps=10, eval_every=10, eval_samples=4,
                            final_samples=6, half_scores=["jit"], probe_images=0,  # subsets: high_res only
                            runs_dir=str(tmp_path))
    loaded = []
    real_load = study.load_jit
    monkeypatch.setattr(study, "load_jit", lambda path, **k: loaded.append(path.name) or real_load(path, **k))
    out = study.ensure_run(P, "jit", P.low_res, 0)
    recs = stats.read_jsonl(out / "evals.jsonl")
    assert [(r["kind"], r["step"], r["n"], r["sample_seed"]) for r in recs] == [("score", 5, 6, 2026), ("score", 10, 6, 2026)]
    assert loaded == ["ckpt-00000005.pt", "ckpt-00000010.pt"]
    assert "nn_ratio" in recs[1] and "nn_ratio" not in recs[0] and recs[1]["nn_n"] == min(P.train_images, P.eval_real)
    assert recs[1]["fid"] > 0 and recs[1]["reference"].startswith("openclipart eval split at 32 px")
    times = stats.read_jsonl(out / study.TIMES)  # how long they took, for a session's plan (--until)
    assert len(times) == 1 and times[0]["phase"] == "evals" and times[0]["seconds"] > 0
    assert runner.run_minutes(P, out)[1] == pytest.approx(times[0]["seconds"] / 60)
    study.ensure_run(P, "jit", P.low_res, 0)
    assert len(stats.read_jsonl(out / "evals.jsonl")) == 2 and len(loaded) == 2
    assert len(stats.read_jsonl(out / study.TIMES)) == 1  # nothing evaluated, nothing timed


def _tables(folder, fids: dict, steps=100):
    """stats.tables of runs whose end FIDs are ``fids[(arm, resolution)]`` (one value per seed)."""
    for (arm, res), vals in fids.items():
        for s, v in enumerate(vals):
            d = folder / f"{arm}-{res}px-s{s}"
            d.mkdir(parents=True)
            (d / "evals.jsonl").write_text(json.dumps({"kind": "score", "step": steps, "n": 100, "sample_seed": 1,
                                                       "fid": v}) + "\n")
    return stats.tables(folder, low_res=32, high_res=64, steps=steps, margin=0.10)


def test_the_summary_opens_with_the_reference_verdicts_and_places_this_run_inside_or_outside_them(tmp_path):
    # reference: REPA - JiT at 64 px = 10, 11, 12 (mean 11, t-interval 11 +- 4.303 * 1 / sqrt(3) = [8.52, 13.48]);
    # at 32 px a single seed (no interval)
    ref = _tables(tmp_path / "ref", {("jit", 64): [100, 101, 102], ("repa", 64): [110, 112, 114],
                                     ("jit", 32): [80], ("repa", 32): [75]})
    inside = _tables(tmp_path / "in", {("jit", 64): [90], ("repa", 64): [99], ("jit", 32): [70], ("repa", 32): [60]})
    outside = _tables(tmp_path / "out", {("jit", 64): [90], ("repa", 64): [104], ("jit", 32): [70], ("repa", 32): [60]})
    lines = runner.headline(inside, ref, "decisive", 10, 36, figures=["../decisive/figures/f.png"])
    text = "\n".join(lines)
    assert lines[0] == "## What the study found: the `decisive` protocol (10 of 36 runs finished)"
    assert f"**1. {stats.CLAIMS[1]}**: {ref['verdicts'][0]['verdict']}" in text and "![f](../decisive/figures/f.png)" in text
    assert text.index("What the study found") < text.index("This run beside")
    row64 = next(l for l in lines if l.startswith("| 1 | REPA - JiT at 64 px"))
    assert row64.endswith("| 11.00 [8.52, 13.48], 3 | 9.00, 1 | yes |")
    row32 = next(l for l in lines if l.startswith("| 1 | REPA - JiT at 32 px"))
    assert row32.endswith("| -5.00 (no interval), 1 | -10.00, 1 | - |")
    row64 = next(l for l in runner.headline(outside, ref, "decisive", 10, 36) if l.startswith("| 1 | REPA - JiT at 64 px"))
    assert row64.endswith("| 14.00, 1 | no |")


def test_a_profile_summary_starts_with_the_committed_decisive_verdicts(tmp_path):
    P = dataclasses.replace(study.load_profile("smoke"), results_dir=str(tmp_path / "results"), runs_dir=str(tmp_path / "runs"))
    text = runner.write_summary(P).read_text()
    H = study.load_profile(runner.HEADLINE)
    finished = len(list((study.ROOT / "papermill_runs" / "decisive" / "runs").glob("*/done.json")))
    assert finished >= 2  # committed logs of the decisive protocol exist
    assert f"the `decisive` protocol ({finished} of {len(study.plan(H))} runs finished)" in text
    assert text.index("What the study found") < text.index("Verdicts of this profile")
    if finished < len(study.plan(H)):  # until the protocol is complete: the earlier profile's verdicts
        assert "Until it is complete, what the earlier, smaller `cpu-long` profile found" in text
        assert text.index("`cpu-long` profile found") < text.index("**1. REPA helps", text.index("`cpu-long` profile found"))


def test_the_quick_profile_is_a_miniature_of_the_decisive_protocol():
    """`make study`'s numbers are put beside the decisive intervals: everything that defines a run's
    model, data source, method and scoring must be decisive's; only the sizes may shrink."""
    q, d = study.load_profile("quick"), study.load_profile("decisive")
    same = ("dataset", "low_res", "high_res", "model_low", "model_high", "batch_size", "blr", "warmup_epochs",
            "encoder", "encoder_weights", "proj_hidden", "cfg_scale", "noise_scale_low", "noise_scale_high",
            "eval_steps", "eval_real", "eval_seed", "hack_t", "hack_steps", "probe_ts", "margin", "calibration")
    assert {k: getattr(q, k) for k in same} == {k: getattr(d, k) for k in same}
    assert set(q.methods) == {m for m in d.methods if study.split_arm(m)[1] is None}  # every method, no dose arms
    assert set(q.seeds) < set(d.seeds) and q.steps < d.steps and 0 < q.train_images < 6208
    assert 0 < q.probe_images <= d.probe_images and 0 < q.hack_per_class <= d.hack_per_class
    for res in (q.low_res, q.high_res):  # the same alignment depth and coefficient per method
        for m in q.methods:
            a, b = study.run_config(q, m, res, 0), study.run_config(d, m, res, 0)
            assert (a.model, a.method, a.align_coef, a.align) == (b.model, b.method, b.align_coef, b.align)


QUICK_PLAN = [("jit", 32, 0), ("repa", 32, 0), ("jit", 64, 0), ("repa", 64, 0), ("adapter", 64, 0), ("pixelrepa", 64, 0)]


def test_parallel_workers_start_at_each_resolutions_first_unfinished_run_then_in_the_plans_order():
    assert runner.worker_starts(QUICK_PLAN, QUICK_PLAN, 1) == [0]
    assert runner.worker_starts(QUICK_PLAN, QUICK_PLAN, 2) == [0, 2]  # one builds the 32 px caches, one the 64 px
    assert runner.worker_starts(QUICK_PLAN, QUICK_PLAN, 3) == [0, 2, 1]
    assert runner.worker_starts(QUICK_PLAN, QUICK_PLAN[3:], 2) == [3, 4]  # one resolution left: its next runs
    assert runner.worker_starts(QUICK_PLAN, [QUICK_PLAN[1], QUICK_PLAN[5]], 2) == [1, 5]
    # a protocol part-way, one resolution left: the arms of the next seed side by side, not a later seed's
    plan = [(m, 64, s) for s in range(5) for m in ("jit", "repa", "adapter", "pixelrepa")]
    todo = plan[3:]  # seed 0 done but PixelREPA's
    assert runner.worker_starts(plan, todo, 2) == [3, 4]
    assert [plan[k] for k in runner.worker_starts(plan, todo, 3)] == [("pixelrepa", 64, 0), ("jit", 64, 1), ("repa", 64, 1)]


def test_the_parallel_status_line_reads_each_workers_run_step_and_phase_from_its_files(tmp_path):
    P = study.StudyParams(runs_dir=str(tmp_path), methods=("jit", "repa"), steps=100, progress=False)
    runs = study.plan(P)  # jit 32, repa 32, jit 64, repa 64
    study.run_dir(P, *runs[0]).mkdir(parents=True)
    (study.run_dir(P, *runs[0]) / "done.json").write_text("{}")
    metrics = study.run_dir(P, *runs[1])
    metrics.mkdir(parents=True)
    log = metrics / "metrics.jsonl"
    log.write_text('{"step": 30}\n{"step": 40, "loss": 1.0}\n{"step": 5')  # a line being written
    assert runner.last_step(log) == (40, False) and runner.last_step(tmp_path / "none.jsonl") == (0, False)
    assert runner.last_step(log, eval_every=20) == (40, True)  # its curve score at step 40 not written yet
    log.write_text('{"step": 40, "loss": 1.0}\n{"step": 40, "eval_fid": 90.0}\n')
    assert runner.last_step(log, eval_every=20) == (40, False)
    logs = ["[study] run 1/4: jit at 32 px, seed 0 (0.0 min so far)\n[study] run 2/4: repa at 32 px, seed 0 (x)\n",
            "[study] run 3/4: jit at 64 px, seed 0 (0.0 min so far)\n[study] jit-64px-s0: scoring step 100, 64 samples\n",
            "[study] run 2/4: repa at 32 px, seed 0 (x)\n[study] run 2/4 is held by another worker\n", ""]
    assert [runner.worker_activity(x) for x in logs] == [(1, "training"), (2, "evaluating"), None, None]
    line, shape = runner.parallel_status(P, runs, logs, elapsed=150.0)
    # done: 1 + 0.55 x 0.4 (repa 32 at step 40 of 100) + 0.55 + 0.45 / 2 (jit 64 evaluating) = 1.995 of 4 runs
    left = 150.0 * (4 - 1.995) / 1.995 / 60
    assert f"about {150.0 * (4 - 1.995) / 0.995 / 60:.1f} min" in runner.parallel_status(P, runs, logs, 150.0, before=1)[0]
    assert line == (f"[study] runs 1/4 done, 2.5 min so far, about {left:.1f} min of training left | "
                    "repa 32 px s0: step 40/100 | jit 64 px s0: evaluating | idle | starting")
    assert shape == "[study] runs 1/4 done | repa 32 px s0 training | jit 64 px s0 evaluating | idle | starting"
    assert "estimated once a run is under way" in runner.parallel_status(P, runs, ["", ""], 9.0, before=1)[0]
    # a worker still on a run whose training is done is evaluating it: the run is not finished yet
    line, _ = runner.parallel_status(P, runs, [logs[0].split("[study] run 2")[0], ""], 60.0, alive=[True, False])
    assert line.startswith("[study] runs 0/4 done") and line.endswith("| jit 32 px s0: evaluating | finished")


def _tiny(tmp_path, **kw):
    return study.StudyParams(profile="t", runs_dir=str(tmp_path / "runs"), methods=("jit",), steps=2, batch_size=4,
                             train_images=8, ema_decays=(0.5, 0.6), eval_every=0, num_samples=2, sample_steps=2,
                             hack_per_class=1, progress=False, **kw)


def test_parallel_workers_train_the_plan_in_their_own_processes_and_a_failing_one_is_reported(tmp_path, capsys):
    P = _tiny(tmp_path)
    until = runner.parse_until("+600")  # no finished run to time them by: both are started
    runner.train_parallel(P, 2, runner.Clock(), interval=0.2, until=until)
    said = capsys.readouterr().out
    assert all((study.run_dir(P, *r) / "done.json").exists() for r in study.plan(P))
    logs = [(tmp_path / "runs" / "t" / "workers" / f"worker-{k}.log").read_text() for k in (1, 2)]
    assert "run 1/2: jit at 32 px" in logs[0] and "run 2/2: jit at 64 px" in logs[1]  # one run each, side by side
    assert all(f"--until {runner.clock_time(until)}: runs are started only when" in log for log in logs)
    assert "in 2 worker processes (1 thread each" in said and "runs 2/2 done" in said
    Q = _tiny(tmp_path / "q")  # a worker that fails: a run directory holding a run with other settings
    bad = study.run_dir(Q, "jit", Q.high_res, 0)
    bad.mkdir(parents=True)
    (bad / "done.json").write_text(json.dumps({**study._record(study.run_config(Q, "jit", Q.high_res, 0)), "blr": 1.0}))
    with pytest.raises(RuntimeError, match=r"(?s)training worker 1 failed \(exit 1\).*other settings"):
        runner.train_parallel(Q, 2, runner.Clock(), interval=0.2)
    with pytest.raises(ValueError, match="nproc = 2"):
        runner.train_parallel(_tiny(tmp_path, nproc=2), 2, runner.Clock())


def test_workers_must_be_at_least_one(capsys):
    with pytest.raises(SystemExit):
        study.main(["--profile", "smoke", "--workers", "0"])
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("args, said", [
    (["--start", "3"], "--start applies to --train-only with one worker"),
    (["--train-only", "--workers", "2", "--start", "3"], "--start applies to --train-only with one worker"),
    (["--train-only", "--start", "0"], "--start takes a run of the plan, 1 to 6 for profile smoke, not 0"),
    (["--train-only", "--start", "7"], "--start takes a run of the plan, 1 to 6 for profile smoke, not 7"),
])
def test_start_names_a_run_of_the_plan_counted_as_the_logs_count(args, said, capsys):
    # (that --start N begins at the log's "run N/..." is checked end to end by the parallel workers' test,
    # which starts its second worker so)
    with pytest.raises(SystemExit):
        study.main(["--profile", "smoke", *args])
    assert said in capsys.readouterr().err


def test_a_report_trains_nothing_and_uses_the_finished_runs_here_or_committed(tmp_path, monkeypatch):
    P = study.StudyParams(runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "results"), methods=["jit"],
                          progress=False)
    record = json.dumps(study._record(study.run_config(P, "jit", P.low_res, 0)))
    here = study.run_dir(P, "jit", P.low_res, 0)  # finished in this session: its checkpoints are here
    here.mkdir(parents=True)
    (here / "done.json").write_text(record)
    (here / study.TIMES).write_text(json.dumps({"phase": "evals", "seconds": 60.0, "threads": 1}) + "\n")
    committed = P.results / "runs" / "jit-64px-s0"  # finished in an earlier session: only its committed logs
    committed.mkdir(parents=True)
    (committed / "done.json").write_text(json.dumps(study._record(study.run_config(P, "jit", P.high_res, 0))))
    monkeypatch.setattr(study, "train", lambda cfg: pytest.fail("a report must not train"))
    monkeypatch.setenv(study.REPORT_ONLY, "1")
    assert study.ensure_run(P, "jit", P.low_res, 0) == here
    # trained but not yet evaluated (its subset scores at high_res are missing): neither reported nor collected
    assert study.ensure_run(P, "jit", P.high_res, 0) is None
    (committed / "evals.jsonl").write_text(json.dumps({"kind": "subset", "subset": "most", "fid": 1.0}) + "\n")
    assert study.ensure_run(P, "jit", P.high_res, 0) == committed
    assert study.ensure_run(P, "jit", P.low_res, 1) is None and not study.run_dir(P, "jit", P.low_res, 1).exists()
    assert runner.finished_runs(dataclasses.replace(P, seeds=(0, 1))) == [here, committed]
    Q = dataclasses.replace(P, seeds=(0, 1))
    busy = study.run_dir(Q, "jit", Q.high_res, 1)  # trained here, its evaluations not written yet
    busy.mkdir(parents=True)
    (busy / "done.json").write_text(json.dumps(study._record(study.run_config(Q, "jit", Q.high_res, 1))))
    study.collect_runs(Q)
    assert (P.results / "runs" / here.name / "done.json").exists() and not (P.results / "runs" / busy.name).exists()
    assert (P.results / "runs" / here.name / study.TIMES).exists()  # its timing committed with its logs
    (committed / "done.json").write_text(json.dumps({**json.loads(record), "blr": 1.0}))
    with pytest.raises(ValueError, match="other settings.*'blr'"):
        study.ensure_run(P, "jit", P.high_res, 0)
    monkeypatch.setenv(study.REPORT_ONLY, "0")  # "0" is off: the run would be trained
    with pytest.raises(pytest.fail.Exception, match="must not train"):
        study.ensure_run(P, "jit", P.low_res, 1)


@pytest.mark.slow
def test_a_report_executes_its_notebooks_again_when_the_finished_runs_change(tmp_path, monkeypatch, capsys):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    body = (f"import os\nassert os.environ.get('PIXELREPA_REPORT_ONLY') == '1'\n"
            f"open({str(tmp_path / 'count')!r}, 'a').write('x')")
    _tiny_notebook(nbdir / "00_first.ipynb", body)
    _tiny_notebook(nbdir / "06_explorers.ipynb", "raise SystemExit('not in a report')")
    monkeypatch.setattr(study, "NOTEBOOK_DIR", nbdir)
    P = study.StudyParams(profile="t", methods=["jit"], results_dir=str(tmp_path / "out"), runs_dir=str(tmp_path / "runs"))
    run = P.results / "runs" / "jit-32px-s0"
    run.mkdir(parents=True)
    (run / "done.json").write_text(json.dumps(study._record(study.run_config(P, "jit", P.low_res, 0))))
    monkeypatch.setattr(runner, "train_runs", lambda *a, **k: pytest.fail("a report must not train"))
    summary = runner.run_profile(P, report=True).read_text()
    assert "report only: 1 of 2 planned runs finished" in capsys.readouterr().out
    assert "**Interim: 1 of the 2 planned runs are finished.**" in summary
    runner.run_profile(P, report=True)  # nothing changed: skipped
    assert (tmp_path / "count").read_text() == "x" and study.REPORT_ONLY not in os.environ
    (run / "evals.jsonl").write_text(json.dumps({"kind": "score", "step": P.steps, "n": 10, "fid": 5.0}) + "\n")
    runner.run_profile(P, report=True)  # a run's records changed: executed again
    assert (tmp_path / "count").read_text() == "xx"


def test_report_and_train_only_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        study.main(["--profile", "smoke", "--report", "--train-only"])
    assert "--report trains nothing and --train-only only trains" in capsys.readouterr().err


def test_a_picture_figure_shows_a_png_file_and_refuses_anything_else(tmp_path):
    from PIL import Image
    Image.new("RGB", (6, 4), (255, 0, 0)).save(tmp_path / "s.png")
    fig = plots.picture(tmp_path / "s.png", title="grid")
    assert fig.data[0].source.startswith("data:image/png;base64,") and fig.layout.title.text == "grid"
    (tmp_path / "s.txt").write_text("not an image")
    with pytest.raises(ValueError, match="is not a PNG file"):
        plots.picture(tmp_path / "s.txt")


def test_a_stop_file_lets_the_runs_under_way_finish_and_starts_no_other(tmp_path, monkeypatch, capsys):
    P = study.StudyParams(runs_dir=str(tmp_path), methods=("jit", "repa"), progress=False)
    monkeypatch.setattr(study, "prepare_data", lambda P: None)
    trained = []

    def ensure(P, m, res, seed, wait=True):  # the first run asks for the stop while it trains
        trained.append((m, res))
        runner.stop_file(P).parent.mkdir(parents=True, exist_ok=True)
        runner.stop_file(P).write_text("")
        return tmp_path
    monkeypatch.setattr(study, "ensure_run", ensure)
    runner.train_runs(P, runner.Clock())
    assert trained == [("jit", 32)] and runner.stop_file(P) == tmp_path / P.profile / "STOP"
    assert f"{runner.stop_file(P)} exists: no further run is started" in capsys.readouterr().out


def test_until_reads_a_clock_time_minutes_from_now_or_epoch_seconds_and_refuses_anything_else():
    now = time.mktime((2026, 12, 7, 12, 0, 0, 0, 0, -1))
    assert runner.parse_until("14:30", now) - now == 2.5 * 3600
    assert runner.parse_until("11:00", now) - now == 23 * 3600  # past today: tomorrow's
    assert runner.parse_until("+90", now) - now == 5400 and runner.parse_until("@123.5", now) == 123.5
    for bad in ("1430", "25:00", "12:60", "+x", "soon", ""):
        with pytest.raises(ValueError, match="--until takes HH:MM"):
            runner.parse_until(bad, now)
    assert runner.clock_time(runner.parse_until("09:05", now)) == "09:05"


def _timed_run(P, folder, train_minutes, eval_minutes=None):
    """A finished run folder of ``P`` whose metrics log says it trained ``train_minutes`` (two intervals)
    and, where given, whose timing record says its evaluations took ``eval_minutes``."""
    folder.mkdir(parents=True)
    (folder / "done.json").write_text(json.dumps(study._record(study.run_config(P, *study.parse_run(folder.name)))))
    (folder / "evals.jsonl").write_text(json.dumps({"kind": "subset"}) + "\n")  # what a 64 px run needs
    half = 60 * train_minutes / 2
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 1, "images": 600, "images_per_s": 600 / half}, {"step": 1, "images": 600, "eval_fid": 1.0},
        {"step": 2, "images": 1200, "images_per_s": 600 / half})))
    if eval_minutes is not None:
        (folder / study.TIMES).write_text(json.dumps({"phase": "evals", "seconds": 60 * eval_minutes, "threads": 1}) + "\n")


def test_a_run_is_timed_by_the_finished_runs_of_its_arm_else_its_method_else_its_resolution(tmp_path):
    P = study.StudyParams(profile="t", runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "out"),
                          methods=("jit", "repa", "repa_x4"), seeds=(0, 1, 2), steps=2)
    here, committed = tmp_path / "runs" / "t", tmp_path / "out" / "runs"
    _timed_run(P, here / "jit-32px-s0", 40, 10)
    _timed_run(P, committed / "jit-32px-s1", 60)  # committed before timing records: its evaluations untimed
    _timed_run(P, committed / "jit-32px-s2", 50, 20)
    _timed_run(P, committed / "repa-64px-s0", 70)
    (here / "repa-64px-s1").mkdir(parents=True)  # under way: not finished, not counted
    assert runner.run_minutes(P, committed / "jit-32px-s1") == (pytest.approx(60), None)
    assert runner.expected_minutes(P, "jit", 32) == (pytest.approx(50), pytest.approx(15))  # medians
    assert runner.expected_minutes(P, "repa", 32) == (pytest.approx(50), pytest.approx(15))  # any arm at 32 px
    share = (1 - runner.TRAIN_SHARE) / runner.TRAIN_SHARE
    assert runner.expected_minutes(P, "repa_x4", 64) == (pytest.approx(70), pytest.approx(70 * share))  # as repa
    assert runner.expected_minutes(P, "jit", 128) is None
    _timed_run(P, here / "repa_x4-64px-s0", 90, 30)
    assert runner.expected_minutes(P, "repa_x4", 64) == (pytest.approx(90), pytest.approx(30))
    (here / "jit-32px-s3").mkdir()
    (here / "jit-32px-s3" / "metrics.jsonl").write_text(json.dumps({"step": 2, "images": 1200}) + "\n")
    assert runner.minutes_left(P, "jit", 32, 3) == pytest.approx(50 + 15)  # no checkpoint: from the start
    (here / "jit-32px-s3" / "ckpt-00000001.pt").write_bytes(b"")
    assert runner.minutes_left(P, "jit", 32, 3) == pytest.approx(50 / 2 + 15)  # resumes at step 1 of 2


def test_until_starts_only_the_runs_expected_to_end_in_time(tmp_path, monkeypatch, capsys):
    P = study.StudyParams(profile="t", runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "out"),
                          methods=("jit", "repa"), seeds=(0, 1), progress=False)
    _timed_run(P, tmp_path / "out" / "runs" / "jit-32px-s0", 20, 10)
    _timed_run(P, tmp_path / "out" / "runs" / "jit-64px-s0", 60, 20)
    monkeypatch.setattr(study, "prepare_data", lambda P: None)
    trained = []
    monkeypatch.setattr(study, "ensure_run", lambda P, m, res, seed, wait=True: trained.append((m, res, seed)) or tmp_path)
    runner.train_runs(P, runner.Clock(), until=time.time() + 60 * 45)
    said = capsys.readouterr().out
    # the 32 px runs (30 min each, as jit's) are started; the 64 px ones (80 min) are not
    assert [r for r in trained if r[2] == 1] == [("jit", 32, 1), ("repa", 32, 1)]
    assert ("repa", 32, 0) in trained and not any(res == 64 and m == "repa" for m, res, _ in trained)
    assert "run 7/8: jit at 64 px, seed 1 needs about 80.0 min: it would end after" in said and "not started" in said
    trained.clear()
    runner.train_runs(P, runner.Clock())  # no deadline: everything unfinished
    assert ("repa", 64, 0) in trained and ("jit", 64, 1) in trained


def test_refreshing_the_headlines_rewrites_only_the_other_profiles_committed_summaries(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "committed", lambda name: tmp_path / name)  # not the checkout's folders
    for name in ("quick", runner.HEADLINE, runner.EARLIER):
        (tmp_path / name).mkdir()
        (tmp_path / name / "SUMMARY.md").write_text("old")
    assert runner.refresh_headlines() == [tmp_path / "quick" / "SUMMARY.md"]
    assert (tmp_path / "quick" / "SUMMARY.md").read_text().startswith("# Study summary: profile `quick`")
    assert (tmp_path / runner.HEADLINE / "SUMMARY.md").read_text() == "old"  # its own is the report's
    assert not (tmp_path / "smoke").exists()  # a profile with no committed summary gets none
