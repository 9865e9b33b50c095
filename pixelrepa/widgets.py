"""Interactive explorers for JupyterLab (ipywidgets + plotly ``FigureWidget``), and the computations
behind them as plain functions that run without any widget.

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

The head is applied to the raw weights' hidden state (``weights="model"``), the network it was
trained with; the EMA copies ("ema0", ...) can be chosen for the head-free maps.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from plotly.subplots import make_subplots

from . import data as datalib
from . import encoders
from .align import AlignConfig, build_head, probe_alignment, token_mask
from .config import shared
from .flow import add_noise
from .jit import JiT, JiTConfig
from .storage import checkpoints, jit_from_state, read_run

PROBE_TS = (0.1, 0.3, 0.5, 0.7, 0.9)  # the alignment explorer's t grid (its t slider and the CKA probe)
HEAD_NAMES = {"repa": "REPA projector", "adapter": "unmasked adapter", "pixelrepa": "masked adapter (MTA)"}


# ----------------------------------------------------------------------------- loading, cached

@dataclass
class LoadedRun:
    """One checkpoint's JiT, alignment head (or None) and frozen encoder, ready on the CPU."""
    path: Path  # the checkpoint file
    step: int
    cfg: dict  # the run's TrainConfig as saved
    jit: JiT
    jit_cfg: JiTConfig
    align: AlignConfig
    head: torch.nn.Module | None
    encoder: torch.nn.Module

    @property
    def name(self) -> str:
        return self.path.parent.name

    @property
    def head_block(self) -> int | None:
        """The block count whose output the head reads, or None for a run without a head."""
        return self.align.depth(self.jit_cfg) if self.head is not None else None

    @property
    def noise_scale(self) -> float:
        return float(self.cfg.get("noise_scale", 1.0))

    @property
    def grid(self) -> int:
        return self.jit_cfg.grid


def checkpoint_step(path: str | Path) -> int:
    m = re.search(r"ckpt-(\d+)\.pt$", str(path))
    return int(m.group(1)) if m else -1


class ModelCache:
    """Checkpoints, encoders and encoder targets loaded once (one per explorer, or shared)."""

    def __init__(self):
        self._runs: dict = {}
        self._encoders: dict = {}
        self._targets: dict = {}
        self._probes: dict = {}

    def encoder(self, name: str, grid: int, weights: str = ""):
        key = (name, grid, weights)
        if key not in self._encoders:
            self._encoders[key] = encoders.build_encoder(name, grid, weights=weights or None)
        return self._encoders[key]

    def run(self, path: str | Path, weights: str = "model") -> LoadedRun:
        """``path``: a run directory (its newest checkpoint) or a ``ckpt-*.pt`` file; ``weights``:
        "model" (raw, what the head was trained with) or "ema0", "ema1", ..."""
        path = Path(path).resolve()
        if path.is_dir():  # the newest file now: a run that trains on is seen at its new step
            files = checkpoints(path)
            if not files:
                raise FileNotFoundError(f"no checkpoint (ckpt-*.pt) in {path}")
            key = (str(files[-1]), weights)
        else:
            key = (str(path), weights)
        if key not in self._runs:
            f, state = read_run(path)
            net, cfg = jit_from_state(state, weights, f)
            jcfg = net.cfg
            align = AlignConfig(**shared(cfg, AlignConfig))  # what the run saved; defaults for what it lacks
            enc = self.encoder(align.encoder, jcfg.grid, cfg.get("encoder_weights", ""))
            head = build_head(align, jcfg, enc.dim)
            if head is not None:
                head.load_state_dict(state["head"])
                head.eval()
            self._runs[key] = LoadedRun(f, int(state.get("step", checkpoint_step(f))), cfg, net.eval(), jcfg,
                                        align, head, enc)
            self._runs[(str(f), weights)] = self._runs[key]
        return self._runs[key]

    def targets(self, run: LoadedRun, images: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's tokens (N, T, D) of the clean uint8 ``images``."""
        images = _as_images(images)
        key = (id(run.encoder), images.data_ptr(), tuple(images.shape), int(images.int().sum()))
        if key not in self._targets:
            self._targets[key] = run.encoder(datalib.to_model_range(images)).float()
        return self._targets[key]

    def probe(self, run: LoadedRun, images, labels, ts=PROBE_TS, noise_seed: int = 0) -> list[dict]:
        key = (str(run.path), id(run.jit), tuple(ts), noise_seed, _as_images(images).data_ptr(), len(images))
        if key not in self._probes:
            self._probes[key] = cka_probe(run, images, labels, ts, noise_seed=noise_seed, cache=self)
        return self._probes[key]


def _as_images(images) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.ndim == 3:
        images = images[None]
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, R, R) or (3, R, R), got {images.dtype} {tuple(images.shape)}")
    return images


def _as_run(run, cache: ModelCache | None, weights: str = "model") -> tuple[LoadedRun, ModelCache]:
    cache = cache or ModelCache()
    return (run if isinstance(run, LoadedRun) else cache.run(run, weights)), cache


def _noise(shape, noise_scale: float, seed: int) -> torch.Tensor:
    """The probe's noise: one draw for the whole batch from ``seed`` (align.probe_alignment)."""
    return noise_scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- computations

def mask_for(grid: int, ratio: float, seed: int) -> torch.Tensor:
    """The (grid * grid,) bool mask ``align.token_mask`` draws for one image from ``seed``."""
    m = token_mask(1, grid * grid, ratio, torch.Generator().manual_seed(seed))
    return torch.zeros(grid * grid, dtype=torch.bool) if m is None else m[0]


def masked_view(image, mask, grid: int, keep: float = 0.25, grey: int = 128) -> np.ndarray:
    """(R, R, 3) uint8 picture of ``image`` (uint8 (3, R, R)) with the tokens of ``mask`` ((T,) bool,
    row-major over the grid x grid tokens) faded to grey: ``keep`` of the image shows through."""
    img = np.asarray(torch.as_tensor(image)).transpose(1, 2, 0).astype(np.float32)
    r = img.shape[0]
    if img.shape[:2] != (r, r) or r % grid:
        raise ValueError(f"image of {img.shape[:2]} px does not split into a {grid} x {grid} token grid")
    p = r // grid
    m = np.zeros(grid * grid, bool) if mask is None else np.asarray(torch.as_tensor(mask)).astype(bool)
    if m.shape != (grid * grid,):
        raise ValueError(f"mask must have {grid * grid} entries, got shape {m.shape}")
    pix = np.kron(m.reshape(grid, grid), np.ones((p, p), bool))[..., None]
    out = np.where(pix, keep * img + (1 - keep) * grey, img)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@torch.no_grad()
def adapter_token_cosine(run, image, label: int, t: float, mask_ratio: float, seed: int, noise_seed: int = 0,
                         cache: ModelCache | None = None, weights: str = "model") -> dict:
    """The head's per-token cosine with the encoder's tokens of the clean image, for one image noised
    to ``t`` (noise from ``noise_seed``) and its hidden state masked by ``mask_for(grid, mask_ratio,
    seed)``. A REPA projector ignores the mask. ``run``: a run directory, a checkpoint or a LoadedRun.

    Returns ``mask`` (T,) bool, ``cos`` (T,) float tensor (None for a run without a head), ``grid``
    and the run's ``method``.
    """
    run, cache = _as_run(run, cache, weights)
    image = _as_images(image)[:1]
    mask = mask_for(run.grid, mask_ratio, seed)
    out = {"mask": mask, "cos": None, "grid": run.grid, "method": run.align.method, "t": float(t)}
    if run.head is None:
        return out
    x = datalib.to_model_range(image)
    tt = torch.full((1,), float(t))
    y = torch.tensor([int(label)])
    z = add_noise(x, tt, _noise(x.shape, run.noise_scale, noise_seed))
    _, (h,) = run.jit(z, tt, y, hidden_at=(run.head_block,))
    pred = run.head(h, tt, y, mask[None] if mask.any() else None)
    out["cos"] = F.cosine_similarity(pred.float(), cache.targets(run, image), dim=-1)[0]
    return out


@torch.no_grad()
def hidden_token_cosine(run, images, labels, t: float, block: int, noise_seed: int = 0,
                        cache: ModelCache | None = None, weights: str = "model") -> dict:
    """Per-token cosine (N, T) between block ``block``'s hidden state, mapped to the encoder's space,
    and the encoder's tokens of the clean images, for the images noised to ``t`` (one noise draw
    for the batch from ``noise_seed``, the same as ``align.probe_alignment``).

    The map (``source``): "head" when the run's head reads this block (its prediction, no mask);
    else "linear", a least-squares affine map fitted on these images' tokens (in-sample).
    """
    run, cache = _as_run(run, cache, weights)
    images = _as_images(images)
    if not 1 <= block <= run.jit_cfg.depth:
        raise ValueError(f"block {block} is not in [1, depth={run.jit_cfg.depth}]")
    x = datalib.to_model_range(images)
    y = torch.as_tensor(labels).long().view(-1)
    tt = torch.full((len(x),), float(t))
    z = add_noise(x, tt, _noise(x.shape, run.noise_scale, noise_seed))
    _, (h,) = run.jit(z, tt, y, hidden_at=(block,))
    target = cache.targets(run, images)
    if run.head is not None and block == run.head_block:
        pred, source = run.head(h, tt, y, None).float(), "head"
    else:
        pred, source = linear_map(h, target), "linear"
    cos = F.cosine_similarity(pred, target, dim=-1)
    return {"cos": cos, "source": source, "grid": run.grid, "block": block, "t": float(t),
            "method": run.align.method, "mean_cos": float(cos.mean())}


def linear_map(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The least-squares affine map from tokens ``h`` (N, T, w) to ``target`` (N, T, D), fitted on
    these N * T tokens and applied to them (float64; minimum-norm when under-determined)."""
    X = h.reshape(-1, h.shape[-1]).double()
    X = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    Y = target.reshape(-1, target.shape[-1]).double()
    W = torch.linalg.lstsq(X, Y, driver="gelsd").solution
    return (X @ W).float().view(*target.shape)


def cka_probe(run, images, labels, ts=PROBE_TS, blocks=None, noise_seed: int = 0,
              cache: ModelCache | None = None, weights: str = "model") -> list[dict]:
    """``align.probe_alignment`` (linear CKA of pooled hidden state vs pooled encoder tokens over
    the images) for every block and t: records {block, t, cka}."""
    run, cache = _as_run(run, cache, weights)
    images = _as_images(images)
    return probe_alignment(run.jit, datalib.to_model_range(images), torch.as_tensor(labels).long().view(-1),
                           cache.targets(run, images), ts=tuple(ts), blocks=blocks,
                           noise_scale=run.noise_scale, seed=noise_seed)


def cka_grid(records: list[dict]) -> tuple[list[int], list[float], list[list[float]]]:
    """(blocks, ts, z[block][t]) from probe records."""
    blocks = sorted({r["block"] for r in records})
    ts = sorted({r["t"] for r in records})
    val = {(r["block"], r["t"]): r["cka"] for r in records}
    return blocks, ts, [[val.get((b, t), float("nan")) for t in ts] for b in blocks]


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
        self.images, self.labels = _as_images(images), torch.as_tensor(labels).long().view(-1)
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
        self.images, self.labels = _as_images(images), torch.as_tensor(labels).long().view(-1)
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


__all__ = ["LoadedRun", "ModelCache", "mask_for", "masked_view", "adapter_token_cosine", "hidden_token_cosine",
           "linear_map", "cka_probe", "cka_grid", "checkpoint_options", "MaskingExplorer", "AlignmentExplorer",
           "masking_explorer", "alignment_explorer"]
