"""Interactive explorers for JupyterLab (ipywidgets + plotly ``FigureWidget``), built on the plain
functions of `probes` (what they show, computed without any widget).

- Masking explorer: pick an image, a mask ratio and a seed; see which tokens ``align.token_mask``
  masks and, for a run with an alignment head, the per-token cosine between the head's prediction
  (from the masked hidden state) and the frozen encoder's tokens of the clean image.
- Alignment explorer: pick a checkpoint, t and block; see the per-token cosine between that block's
  hidden state, mapped to the encoder's space, and the encoder's tokens, next to the linear CKA
  probe (``align.probe_alignment``) of every block and t. The map is the trained head where the run
  has one reading that block, else a least-squares linear map fitted on the displayed images
  (in-sample: an upper bound on what a linear read-out finds); the figure's title says which.

Everything is deterministic given the seeds and runs on the CPU. An explorer loads each checkpoint,
the encoder and the encoder's targets once (``ModelCache``) and updates its figure in place when a
control moves. ``FigureWidget`` needs the ``anywidget`` package; without it the explorers fall back
to re-drawing a static figure inside an ``Output`` widget (same controls, same data).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from .probes import (PROBE_TS, LoadedRun, ModelCache, adapter_token_cosine, as_images, checkpoint_step, cka_grid,
                     hidden_token_cosine, mask_for, masked_view)
from .storage import checkpoints

HEAD_NAMES = {"repa": "REPA projector", "adapter": "unmasked adapter", "pixelrepa": "masked adapter (MTA)"}


# ----------------------------------------------------------------------------- widgets

def _figure_view(fig: go.Figure):
    """(figure to update, widget to show, refresh): a FigureWidget updates itself; without anywidget
    a static figure is re-drawn into an Output widget by ``refresh``."""
    import ipywidgets as W
    try:
        fw = go.FigureWidget(fig)
        return fw, fw, lambda: None
    except ImportError:  # plotly's FigureWidget needs anywidget
        out = W.Output()
        fig = go.Figure(fig)

        def refresh():
            from IPython.display import clear_output, display
            with out:
                clear_output(wait=True)
                display(fig)
        return fig, out, refresh


def _mean(v: torch.Tensor) -> float:
    return float(v.float().mean()) if v.numel() else float("nan")


def _token_axes(fig, row, col, grid):
    fig.update_xaxes(range=[-0.5, grid - 0.5], constrain="domain", showgrid=False, zeroline=False,
                     title_text="token column", row=row, col=col)
    fig.update_yaxes(range=[grid - 0.5, -0.5], scaleanchor=f"x{col if col > 1 else ''}", showgrid=False,
                     zeroline=False, title_text="token row", row=row, col=col)


def _names(labels, class_names):
    return [class_names[int(l)] if class_names is not None else str(int(l)) for l in labels]


class _Explorer:
    """Shared bits: the guard against re-entrant updates and the observers."""

    def _watch(self, controls):
        for c in controls:
            c.observe(self._changed, names="value")

    def _changed(self, change=None):
        if self._busy:
            return
        self._busy = True
        try:
            self.update()
        finally:
            self._busy = False


def _import_widgets():
    import ipywidgets as W
    return W


class MaskingExplorer(_Explorer):
    """See ``masking_explorer``. ``box`` is the widget; ``figure``, ``controls`` and ``update`` are for
    scripts and tests (set a control's ``value`` and the figure follows)."""

    def __init__(self, run, images, labels, class_names=None, t: float = 0.5, mask_ratio: float | None = None,
                 seed: int = 0, noise_seed: int = 0, cache: ModelCache | None = None, weights: str = "model"):
        W = _import_widgets()
        self.cache = cache or ModelCache()
        self.run = self.cache.run(run, weights)
        self.images, self.labels = as_images(images), torch.as_tensor(labels).long().view(-1)
        self.names = _names(self.labels, class_names)
        self.noise_seed, self._busy = noise_seed, False
        if mask_ratio is None:
            mask_ratio = self.run.align.ratio or 0.2
        style = {"description_width": "initial"}
        self.controls = {
            "image": W.IntSlider(value=0, min=0, max=len(self.images) - 1, description="image", style=style),
            "mask_ratio": W.FloatSlider(value=mask_ratio, min=0.0, max=0.9, step=0.05, description="mask ratio",
                                        readout_format=".2f", style=style),
            "seed": W.IntSlider(value=seed, min=0, max=99, description="mask seed", style=style),
            "t": W.FloatSlider(value=t, min=0.05, max=0.95, step=0.05, description="t (1 = clean)",
                               readout_format=".2f", style=style),
        }
        g = self.run.grid
        has_head = self.run.head is not None
        fig = make_subplots(1, 2, horizontal_spacing=0.12, subplot_titles=(
            "image, masked tokens greyed",
            f"{HEAD_NAMES.get(self.run.align.method, 'head')}: cosine with the encoder's tokens"
            if has_head else "mask (this run has no alignment head)"))
        fig.add_trace(go.Image(z=np.zeros((g, g, 3), np.uint8), name="image"), 1, 1)
        fig.add_trace(go.Heatmap(z=[[-2.0]], zmin=-1 if has_head else 0, zmax=1,  # placeholder: see AlignmentExplorer
                                 colorscale="RdBu" if has_head else "Greys", reversescale=not has_head,
                                 colorbar=dict(title="cos" if has_head else "masked", len=0.9),
                                 hovertemplate="row %{y}, col %{x}: %{z:.3f}<extra></extra>", name="cosine"), 1, 2)
        fig.add_trace(go.Scatter(x=[], y=[], mode="markers", name="masked",
                                 marker=dict(symbol="x-thin", size=9, line=dict(width=2, color="black")),
                                 hoverinfo="skip", showlegend=False), 1, 2)
        _token_axes(fig, 1, 2, g)
        fig.update_xaxes(visible=False, row=1, col=1)
        fig.update_yaxes(visible=False, row=1, col=1)
        fig.update_layout(width=880, height=430, margin=dict(l=20, r=20, t=90, b=40), template="plotly_white",
                          title=dict(text="", font=dict(size=13)))
        self.figure, fig_widget, self._refresh = _figure_view(fig)
        self.box = W.VBox([W.HBox(list(self.controls.values())[:2]), W.HBox(list(self.controls.values())[2:]),
                           fig_widget])
        self.box.explorer = self
        self._watch(self.controls.values())
        self.update()

    def state(self) -> dict:
        c = self.controls
        i = c["image"].value
        res = adapter_token_cosine(self.run, self.images[i], int(self.labels[i]), round(c["t"].value, 4),
                                   round(c["mask_ratio"].value, 4), c["seed"].value, self.noise_seed, self.cache)
        res["image"] = i
        return res

    def update(self):
        s = self.state()
        g, mask, cos = s["grid"], s["mask"], s["cos"]
        c = self.controls
        i = s["image"]
        rows, cols = np.divmod(np.nonzero(mask.numpy())[0], g)
        n = int(mask.sum())
        title = (f"{self.run.name}, step {self.run.step} · image {i} ({self.names[i]}) · mask ratio "
                 f"{c['mask_ratio'].value:.2f}, seed {c['seed'].value}: {n} of {g * g} tokens masked")
        if cos is not None:
            title += (f"<br>t = {s['t']:.2f} · mean cosine: masked {_mean(cos[mask]):.3f}, "
                      f"visible {_mean(cos[~mask]):.3f}, all {_mean(cos):.3f}")
            z = cos.view(g, g).tolist()
        else:
            z = mask.float().view(g, g).tolist()
        with self.figure.batch_update():
            self.figure.data[0].z = masked_view(self.images[i], mask, g)
            self.figure.data[1].z = z
            self.figure.data[2].x = cols.tolist()
            self.figure.data[2].y = rows.tolist()
            self.figure.layout.title.text = title
        self._refresh()


class AlignmentExplorer(_Explorer):
    """See ``alignment_explorer``."""

    def __init__(self, runs, images, labels, class_names=None, t: float = 0.5, block: int | None = None,
                 ts=PROBE_TS, noise_seed: int = 0, cache: ModelCache | None = None, weights: str = "model"):
        W = _import_widgets()
        self.cache = cache or ModelCache()
        self.weights = weights
        self.images, self.labels = as_images(images), torch.as_tensor(labels).long().view(-1)
        self.names = _names(self.labels, class_names)
        self.ts, self.noise_seed, self._busy = tuple(ts), noise_seed, False
        options = checkpoint_options(runs)
        if not options:
            raise FileNotFoundError(f"no checkpoints in {runs}")
        first = self.cache.run(options[0][1], weights)
        style = {"description_width": "initial"}
        step = round(self.ts[1] - self.ts[0], 6) if len(self.ts) > 1 else 0.1
        self.controls = {
            "checkpoint": W.Dropdown(options=options, value=options[0][1], description="checkpoint",
                                     style=style, layout=W.Layout(width="360px")),
            "t": W.FloatSlider(value=min(self.ts, key=lambda v: abs(v - t)), min=self.ts[0], max=self.ts[-1],
                               step=step, description="t (1 = clean)", readout_format=".2f", style=style),
            "block": W.IntSlider(value=block or first.head_block or first.jit_cfg.in_context_start, min=1,
                                 max=first.jit_cfg.depth, description="block", style=style),
            "image": W.IntSlider(value=0, min=0, max=len(self.images) - 1, description="image", style=style),
        }
        g = first.grid
        fig = make_subplots(1, 3, column_widths=[0.24, 0.36, 0.40], horizontal_spacing=0.11,
                            subplot_titles=("image", "per-token cosine with the encoder",
                                            "linear CKA (pooled): block (rows) x t"))
        # Placeholders that differ from every real value (shape, or empty): FigureWidget sends only what
        # an update changes, and an initial value that the first update repeated never reached the browser.
        fig.add_trace(go.Image(z=np.zeros((g, g, 3), np.uint8), name="image"), 1, 1)
        fig.add_trace(go.Heatmap(z=[[-2.0]], zmin=-1, zmax=1, colorscale="RdBu", name="cosine",
                                 colorbar=dict(title="cos", x=0.605, len=0.9, thickness=14),
                                 hovertemplate="row %{y}, col %{x}: %{z:.3f}<extra></extra>"), 1, 2)
        fig.add_trace(go.Heatmap(z=[[0.0]], zmin=0, zmax=1, colorscale="Viridis", name="CKA",
                                 colorbar=dict(title="CKA", x=1.0, len=0.9, thickness=14),
                                 hovertemplate="block %{y}, t %{x}: CKA %{z:.3f}<extra></extra>"), 1, 3)
        fig.add_trace(go.Scatter(x=[], y=[], mode="markers", name="selected", showlegend=False,
                                 marker=dict(symbol="square-open", size=18, color="red", line=dict(width=3)),
                                 hoverinfo="skip"), 1, 3)
        _token_axes(fig, 1, 2, g)
        fig.update_xaxes(visible=False, row=1, col=1)
        fig.update_yaxes(visible=False, row=1, col=1)
        fig.update_xaxes(title_text="t (1 = clean)", row=1, col=3)
        fig.update_yaxes(autorange="reversed", dtick=1, row=1, col=3)
        fig.update_layout(width=1060, height=430, margin=dict(l=20, r=20, t=100, b=40), template="plotly_white",
                          title=dict(text="", font=dict(size=13)))
        self.figure, fig_widget, self._refresh = _figure_view(fig)
        c = list(self.controls.values())
        self.box = W.VBox([W.HBox(c[:2]), W.HBox(c[2:]), fig_widget])
        self.box.explorer = self
        self._watch(c)
        self.update()

    @property
    def run(self) -> LoadedRun:
        return self.cache.run(self.controls["checkpoint"].value, self.weights)

    def state(self) -> dict:
        run, c = self.run, self.controls
        if c["block"].max != run.jit_cfg.depth:
            c["block"].max = run.jit_cfg.depth
        t = min(self.ts, key=lambda v: abs(v - c["t"].value))
        res = hidden_token_cosine(run, self.images, self.labels, t, c["block"].value, self.noise_seed, self.cache)
        res["probe"] = self.cache.probe(run, self.images, self.labels, self.ts, self.noise_seed)
        res["image"] = c["image"].value
        return res

    def update(self):
        run, s = self.run, self.state()
        g, i, cos = s["grid"], s["image"], s["cos"]
        blocks, ts, z = cka_grid(s["probe"])
        cka_here = z[blocks.index(s["block"])][ts.index(s["t"])] if s["t"] in ts else float("nan")
        if s["source"] == "head":
            how = f"the trained head's prediction ({HEAD_NAMES.get(run.align.method, run.align.method)})"
        else:
            how = f"a least-squares linear map fitted on these {len(self.images)} images (in-sample)"
        title = (f"{run.name}, step {run.step} · block {s['block']}, t = {s['t']:.2f} · hidden state to encoder "
                 f"via {how}<br>image {i} ({self.names[i]}): mean cosine {_mean(cos[i]):.3f} · all images "
                 f"{s['mean_cos']:.3f} · linear CKA (pooled) {cka_here:.3f}")
        with self.figure.batch_update():
            self.figure.data[0].z = self.images[i].numpy().transpose(1, 2, 0)
            self.figure.data[1].z = cos[i].view(g, g).tolist()
            self.figure.data[2].update(z=z, x=ts, y=blocks)
            self.figure.data[3].update(x=[s["t"]], y=[s["block"]])
            self.figure.layout.title.text = title
        self._refresh()


def checkpoint_options(runs) -> list[tuple[str, str]]:
    """Dropdown options (label, checkpoint file) for every checkpoint of ``runs``: a run directory,
    a list of them, or a dict name -> directory; newest first within each run."""
    if isinstance(runs, (str, Path)):
        runs = [runs]
    items = runs.items() if isinstance(runs, dict) else [(Path(r).name, r) for r in runs]
    out = []
    for name, r in items:
        r = Path(r)
        files = [r] if r.is_file() else list(reversed(checkpoints(r)))
        out += [(f"{name} · step {checkpoint_step(f)}", str(f.resolve())) for f in files]
    return out


def masking_explorer(run, images, labels, class_names=None, **kw):
    """An ipywidgets box: image, mask ratio, mask seed and t sliders over a plotly FigureWidget with
    the image (masked tokens greyed) and, for a run with a head, each token's cosine between the
    head's prediction and the encoder's tokens (crosses mark the masked tokens).

    ``run``: a run directory or checkpoint; ``images`` uint8 (N, 3, R, R) at the run's resolution,
    ``labels`` (N,). Keywords: t, mask_ratio (default: the run's), seed, noise_seed, cache, weights.
    The ``MaskingExplorer`` is ``box.explorer``."""
    return MaskingExplorer(run, images, labels, class_names, **kw).box


def alignment_explorer(runs, images, labels, class_names=None, **kw):
    """An ipywidgets box: checkpoint dropdown, t, block and image sliders over a plotly FigureWidget
    with the image, the per-token cosine between the block's hidden state (through the run's head
    where it reads that block, else a fitted linear map) and the encoder's tokens, and the linear
    CKA probe of every block and t (the red square is the selection).

    ``runs``: a run directory, a list of them or a dict name -> directory (every kept checkpoint is
    offered). Keywords: t, block, ts, noise_seed, cache, weights. The ``AlignmentExplorer`` is
    ``box.explorer``."""
    return AlignmentExplorer(runs, images, labels, class_names, **kw).box


# the notebooks build a ModelCache and draw masks through this module, beside the explorers
__all__ = ["ModelCache", "mask_for", "checkpoint_options", "MaskingExplorer", "AlignmentExplorer",
           "masking_explorer", "alignment_explorer"]
