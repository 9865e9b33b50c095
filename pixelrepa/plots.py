"""The study's figures: plotly (interactive in JupyterLab), each also written as a static PNG.

``show(fig, P, name)`` displays a figure and saves ``<results>/figures/<name>.png`` through kaleido
(headless Chromium; Debian's `chromium` package). Without a browser the PNG is skipped with one
warning and the interactive figure still shows.
"""
from __future__ import annotations

import base64
import io
import math
import warnings
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from PIL import Image
from plotly.subplots import make_subplots

COLORS = {"jit": "#1f77b4", "repa": "#d62728", "adapter": "#ff7f0e", "pixelrepa": "#2ca02c"}
LABELS = {"jit": "JiT", "repa": "JiT + REPA", "adapter": "unmasked adapter", "pixelrepa": "PixelREPA (MTA)"}
_png_ok = True


def save_png(fig: go.Figure, path: Path, width: int = 900, height: int = 450) -> Path | None:
    global _png_ok
    if not _png_ok:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.write_image(str(path), width=width, height=height, scale=1)
        return path
    except Exception as err:  # no Chromium, kaleido missing: the interactive figure still shows
        _png_ok = False
        warnings.warn(f"static PNG export is off ({type(err).__name__}: {err}); "
                      "install Debian's chromium for kaleido to write figures")
        return None


def label(arm: str) -> str:
    """An arm's legend name: "repa_x4" -> "JiT + REPA x4" (the dose-response arms)."""
    method, _, factor = arm.partition("_x")
    return LABELS.get(method, method) + (f" x{factor}" if factor else "")


def color(arm: str) -> str | None:
    """The method's colour; a dose arm a darker shade of it."""
    method, _, factor = arm.partition("_x")
    c = COLORS.get(method)
    if c is None or not factor:
        return c
    r, g, b = (int(c[i:i + 2], 16) // 2 for i in (1, 3, 5))
    return f"#{r:02x}{g:02x}{b:02x}"


def show(fig: go.Figure, P, name: str, width: int = 900, height: int = 450, folder: Path | None = None) -> go.Figure:
    """Save ``name``.png under the profile's figures folder (or ``folder``) and return the figure."""
    fig.update_layout(width=width, height=height, template="plotly_white", margin=dict(l=60, r=20, t=50, b=50))
    save_png(fig, (folder or P.results / "figures") / f"{name}.png", width, height)
    return fig


def image_grid(images, labels=None, class_names=None, ncols: int = 8, title: str = "") -> go.Figure:
    """uint8 (N, 3, R, R) images tiled into one picture."""
    imgs = np.asarray(images)
    n, _, r, _ = imgs.shape
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    canvas = np.full((nrows * (r + 2), ncols * (r + 2), 3), 255, dtype=np.uint8)
    for i, im in enumerate(imgs):
        y0, x0 = (i // ncols) * (r + 2), (i % ncols) * (r + 2)
        canvas[y0:y0 + r, x0:x0 + r] = im.transpose(1, 2, 0)
    buf = io.BytesIO()  # a PNG data URI: a fraction of the size of the pixel array in the figure's JSON
    Image.fromarray(canvas).save(buf, format="PNG")
    return _png_figure(buf.getvalue(), title)


def picture(path: str | Path, title: str = "") -> go.Figure:
    """A PNG file as a figure, e.g. a run's committed sample grid (``samples.png``)."""
    data = Path(path).read_bytes()
    if not data.startswith(b"\x89PNG"):
        raise ValueError(f"{path} is not a PNG file")
    return _png_figure(data, title)


def _png_figure(png: bytes, title: str) -> go.Figure:
    fig = go.Figure(go.Image(source="data:image/png;base64," + base64.b64encode(png).decode()))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(title=title)
    return fig


def curves(rows: list[dict], key: str = "eval_fid", x: str = "images", by: str = "method",
           facet: str | None = "resolution", title: str = "", y_title: str = "FID") -> go.Figure:
    """Mean over seeds with a band from min to max, one line per ``by`` value, one panel per ``facet``."""
    facets = sorted({r[facet] for r in rows}) if facet else [None]
    fig = make_subplots(rows=1, cols=len(facets), shared_yaxes=True,
                        subplot_titles=[f"{facet} {f}" for f in facets] if facet else None)
    shown = set()  # each name in the legend once, from the first panel that has it
    for col, fval in enumerate(facets, start=1):
        sub = [r for r in rows if facet is None or r[facet] == fval]
        for name in dict.fromkeys(r[by] for r in sub):
            pts = {}
            for r in sub:
                if r[by] == name:
                    pts.setdefault(r[x], []).append(r[key])
            xs = sorted(pts)
            mean = [float(np.mean(pts[v])) for v in xs]
            lo, hi = [float(np.min(pts[v])) for v in xs], [float(np.max(pts[v])) for v in xs]
            c = color(str(name))
            if any(len(pts[v]) > 1 for v in xs):
                fig.add_trace(go.Scatter(x=xs + xs[::-1], y=hi + lo[::-1], fill="toself", mode="lines", line=dict(width=0),
                                         fillcolor=_alpha(c), hoverinfo="skip", showlegend=False,
                                         legendgroup=name), row=1, col=col)
            fig.add_trace(go.Scatter(x=xs, y=mean, mode="lines+markers", name=label(str(name)),
                                     line=dict(color=c), legendgroup=name, showlegend=name not in shown),
                          row=1, col=col)
            shown.add(name)
    fig.update_xaxes(title_text="training images seen" if x == "images" else x)
    fig.update_yaxes(title_text=y_title, col=1)
    fig.update_layout(title=title)
    return fig


def bars(rows: list[dict], key: str, by: str, group: str, title: str = "", y_title: str = "") -> go.Figure:
    """Grouped bars of ``key`` (mean over rows) with error bars from ``key_lo``/``key_hi`` when present."""
    fig = go.Figure()
    groups = list(dict.fromkeys(r[group] for r in rows))
    for name in dict.fromkeys(r[by] for r in rows):
        ys, lo, hi = [], [], []
        for g in groups:
            sel = [r for r in rows if r[by] == name and r[group] == g]
            m = float(np.mean([r[key] for r in sel])) if sel else None
            ys.append(m)
            lo.append(m - float(np.mean([r.get(f"{key}_lo", m) for r in sel])) if sel else 0)
            hi.append(float(np.mean([r.get(f"{key}_hi", m) for r in sel])) - m if sel else 0)
        fig.add_trace(go.Bar(x=groups, y=ys, name=label(str(name)), marker_color=color(str(name)),
                             error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo)))
    fig.update_layout(barmode="group", title=title, yaxis_title=y_title)
    return fig


def _alpha(color: str | None, a: float = 0.18) -> str:
    if not color:
        return f"rgba(128,128,128,{a})"
    c = color.lstrip("#")
    return f"rgba({int(c[0:2], 16)},{int(c[2:4], 16)},{int(c[4:6], 16)},{a})"
