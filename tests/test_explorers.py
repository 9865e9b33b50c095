"""The explorers (pixelrepa/widgets.py): their computations (pixelrepa/probes.py), their in-place figure
updates, and the notebook in a real JupyterLab driven by headless chromium (marked ``browser``)."""
import dataclasses
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, run_env
from pixelrepa import align, data, encoders, probes, storage, study, widgets
from pixelrepa.config import shared
from pixelrepa.flow import add_noise

NOTEBOOK = "notebooks/06_explorers.ipynb"
# Under the test run's output folder, not the committed papermill_runs/screenshots/explorers.png (a
# result: refresh it by copying this file there, or by running the test with PIXELREPA_OUTPUT_ROOT=.)
SCREENSHOT = study.output_path("papermill_runs/screenshots/explorers.png")
CHROMIUM = Path("/usr/bin/chromium")


# ----------------------------------------------------------------------------- computations

@pytest.mark.parametrize("ratio,seed", [(0.2, 0), (0.2, 7), (0.5, 1), (0.0, 3)])
def test_masked_view_greys_exactly_the_tokens_token_mask_draws(ratio, seed):
    grid, p = 8, 4
    mask = probes.mask_for(grid, ratio, seed)
    expected = align.token_mask(1, grid * grid, ratio, torch.Generator().manual_seed(seed))
    assert torch.equal(mask, expected[0] if expected is not None else torch.zeros(grid * grid, dtype=torch.bool))
    image = torch.randint(0, 100, (3, grid * p, grid * p), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    view = probes.masked_view(image, mask, grid)
    assert view.shape == (grid * p, grid * p, 3) and view.dtype == np.uint8
    changed = (view != image.numpy().transpose(1, 2, 0)).any(-1)  # dark pixels: every greyed one changes
    tokens = changed.reshape(grid, p, grid, p).any((1, 3)).reshape(-1)
    assert tokens.sum() == int(mask.sum())
    assert np.array_equal(np.nonzero(tokens)[0], mask.nonzero().flatten().numpy())
    assert (changed.reshape(grid, p, grid, p).all((1, 3)).reshape(-1) == tokens).all()  # whole patches
    assert np.array_equal(probes.masked_view(image, mask, grid), view)  # deterministic


def test_linear_map_recovers_an_affine_map():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 16, 5, generator=g)
    target = h @ torch.randn(5, 7, generator=g) + 0.5
    assert torch.allclose(probes.linear_map(h, target), target, atol=1e-4)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke profile's runs at high_res, trained into a temporary folder, and four images."""
    P = dataclasses.replace(study.load_profile("smoke"), runs_dir=str(tmp_path_factory.mktemp("runs")))
    runs = {m: study.ensure_run(P, m, P.high_res, P.seeds[0]) for m in ("pixelrepa", "jit")}
    ds = data.load_dataset(P.dataset, P.high_res, "train", data_dir=study.ROOT / P.data_dir, progress=False)
    ds = data.take(ds, P.train_images)
    return P, runs, ds.images[:4], ds.labels[:4], probes.ModelCache()


def manual_head_cosine(run_dir, images, labels, t, mask=None, noise_seed=0):
    """The head's per-token cosine computed from the checkpoint by hand (not through probes)."""
    state = storage.load_latest(Path(run_dir))
    cfg = state["config"]
    net, _ = storage.load_jit(run_dir, which="model")
    acfg = align.AlignConfig(**shared(cfg, align.AlignConfig))
    enc = encoders.build_encoder(cfg["encoder"], net.cfg.grid)
    head = align.build_head(acfg, net.cfg, enc.dim)
    head.load_state_dict(state["head"])
    head.eval()
    x = data.to_model_range(images)
    tt = torch.full((len(x),), t)
    e = cfg["noise_scale"] * torch.randn(x.shape, generator=torch.Generator().manual_seed(noise_seed))
    with torch.no_grad():
        _, (h,) = net(add_noise(x, tt, e), tt, labels, hidden_at=(acfg.depth(net.cfg),))
        pred = head(h, tt, labels, mask)
        return F.cosine_similarity(pred, enc(x), dim=-1), acfg.depth(net.cfg)


def test_head_aligned_block_cosine_equals_a_manual_computation(smoke):
    P, runs, images, labels, cache = smoke
    expected, depth = manual_head_cosine(runs["pixelrepa"], images, labels, 0.5)
    res = probes.hidden_token_cosine(runs["pixelrepa"], images, labels, 0.5, depth, cache=cache)
    assert res["source"] == "head" and res["cos"].shape == (4, res["grid"] ** 2)
    torch.testing.assert_close(res["cos"], expected, atol=1e-5, rtol=1e-5)
    assert res["cos"].abs().max() <= 1 + 1e-6


def test_adapter_token_cosine_masks_like_token_mask_and_matches_by_hand(smoke):
    P, runs, images, labels, cache = smoke
    res = probes.adapter_token_cosine(runs["pixelrepa"], images[1], int(labels[1]), 0.3, 0.2, seed=5, cache=cache)
    T = res["grid"] ** 2
    assert torch.equal(res["mask"], align.token_mask(1, T, 0.2, torch.Generator().manual_seed(5))[0])
    assert res["cos"].shape == (T,) and res["cos"].abs().max() <= 1 + 1e-6
    expected, _ = manual_head_cosine(runs["pixelrepa"], images[1:2], labels[1:2], 0.3, res["mask"][None])
    torch.testing.assert_close(res["cos"], expected[0], atol=1e-5, rtol=1e-5)
    again = probes.adapter_token_cosine(runs["pixelrepa"], images[1], int(labels[1]), 0.3, 0.2, seed=5, cache=cache)
    assert torch.equal(again["cos"], res["cos"]) and torch.equal(again["mask"], res["mask"])
    other = probes.adapter_token_cosine(runs["pixelrepa"], images[1], int(labels[1]), 0.3, 0.2, seed=6, cache=cache)
    assert not torch.equal(other["mask"], res["mask"])
    plain = probes.adapter_token_cosine(runs["jit"], images[1], int(labels[1]), 0.3, 0.2, seed=5, cache=cache)
    assert plain["cos"] is None and torch.equal(plain["mask"], res["mask"])


def test_other_blocks_use_a_linear_map_and_cka_comes_from_probe_alignment(smoke):
    P, runs, images, labels, cache = smoke
    for name, block in (("pixelrepa", 4), ("jit", 2)):
        res = probes.hidden_token_cosine(runs[name], images, labels, 0.7, block, cache=cache)
        assert res["source"] == "linear" and res["cos"].abs().max() <= 1 + 1e-5
    run = cache.run(runs["pixelrepa"])
    recs = probes.cka_probe(run, images, labels, ts=(0.3, 0.7), cache=cache)
    expected = align.probe_alignment(run.jit, data.to_model_range(images), labels, cache.targets(run, images),
                                     ts=(0.3, 0.7), noise_scale=run.noise_scale, seed=0)
    assert recs == expected and len(recs) == 2 * run.jit_cfg.depth
    blocks, ts, z = probes.cka_grid(recs)
    assert blocks == list(range(1, run.jit_cfg.depth + 1)) and ts == [0.3, 0.7] and len(z[0]) == 2


def test_moving_a_control_updates_the_figure_in_place(smoke):
    P, runs, images, labels, cache = smoke
    ex = widgets.masking_explorer(runs["pixelrepa"], images, labels, cache=cache).explorer
    fig = ex.figure
    before = (np.array(fig.data[0].z).copy(), fig.data[1].z, fig.data[2].x, fig.layout.title.text)
    ex.controls["seed"].value = 1
    assert ex.figure is fig  # the same FigureWidget, updated
    assert fig.layout.title.text != before[3] and "seed 1" in fig.layout.title.text
    assert fig.data[2].x != before[2] and fig.data[1].z != before[1]
    assert not np.array_equal(np.array(fig.data[0].z), before[0])
    n = int(probes.mask_for(ex.run.grid, ex.controls["mask_ratio"].value, 1).sum())
    assert len(fig.data[2].x) == n and f"{n} of {ex.run.grid ** 2} tokens masked" in fig.layout.title.text

    ax = widgets.alignment_explorer(runs, images, labels, cache=cache).explorer
    fig = ax.figure
    head_block = ax.run.head_block
    assert ax.controls["block"].value == head_block and "trained head" in fig.layout.title.text
    z = fig.data[1].z
    ax.controls["block"].value = head_block + 1
    assert ax.figure is fig and "least-squares linear map" in fig.layout.title.text and fig.data[1].z != z
    assert list(fig.data[3].y) == [head_block + 1]
    ax.controls["checkpoint"].value = next(v for k, v in ax.controls["checkpoint"].options if k.startswith("jit"))
    assert fig.layout.title.text.startswith("jit-") and "least-squares" in fig.layout.title.text


# ----------------------------------------------------------------------------- the notebook in a browser

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lab_settings(folder: Path) -> Path:
    """User settings for the test's JupyterLab: no autosave (the committed notebook stays as it is),
    every cell rendered (no windowing), no news or update checks."""
    for plugin, text in {
        "@jupyterlab/docmanager-extension/plugin": '{"autosave": false}',
        "@jupyterlab/notebook-extension/tracker": '{"windowingMode": "none"}',
        "@jupyterlab/apputils-extension/notification": '{"fetchNews": "false", "checkForUpdates": false}',
    }.items():
        path = folder / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


def _dismiss_dialogs(page) -> None:
    """Accept whatever modal JupyterLab shows (kernel selection, trust, ...): its default button."""
    for dialog in page.locator(".jp-Dialog").all():
        button = dialog.locator(".jp-Dialog-button.jp-mod-accept")
        if button.count():
            button.first.click(timeout=5_000)


def _figure_state(plot) -> dict:
    """What identifies a rendered plotly figure's state: its title and the heatmaps' rasters."""
    return plot.evaluate("""el => ({
        title: (el.querySelector('.gtitle') || {}).textContent || '',
        heatmaps: Array.from(el.querySelectorAll('.hm image')).map(i => i.getAttribute('href') || ''),
        points: el.querySelectorAll('.scatterlayer .point').length})""")


@pytest.mark.browser
def test_explorer_notebook_runs_in_jupyterlab_and_follows_a_slider(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    nb_path = ROOT / NOTEBOOK
    original = nb_path.read_bytes()
    # The notebook's runs, trained here first (into the output folder its kernel inherits), so that the
    # deadline below times JupyterLab and the explorers, not training and the runs' evaluations (more
    # than two minutes on two cores); the notebooks nbval executes afterwards reuse them.
    P = study.load_profile("smoke")
    for m in ("pixelrepa", "repa", "jit"):
        study.ensure_run(P, m, P.high_res, P.seeds[0])
    port, token = _free_port(), secrets.token_hex(16)
    env = run_env()
    env.update(JUPYTERLAB_SETTINGS_DIR=str(_lab_settings(tmp_path / "settings")),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--allow-root",
           "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={ROOT}", f"--FileCheckpoints.checkpoint_dir={tmp_path / 'checkpoints'}",
           "--ServerApp.open_browser=False"]
    log = open(tmp_path / "jupyterlab.log", "wb")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 170
    try:
        while True:  # the server answers
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline - 140:
                pytest.fail(f"JupyterLab did not start: {(tmp_path / 'jupyterlab.log').read_text()[-2000:]}")
            time.sleep(0.5)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, timeout=60_000, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            try:
                page = browser.new_page(viewport={"width": 1500, "height": 1900})
                page.set_default_timeout(30_000)
                page.goto(f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK}?token={token}", timeout=60_000)
                page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=60_000)
                idle = page.locator(".jp-StatusBar-Item", has_text="| Idle")
                while not idle.count():  # the kernel is up: run requests sent before are lost at times
                    _dismiss_dialogs(page)
                    if time.monotonic() > deadline - 120:
                        pytest.fail("the notebook's kernel did not start")
                    page.wait_for_timeout(500)
                plots = page.locator(".jp-OutputArea .js-plotly-plot")
                started = page.locator(".jp-InputPrompt", has_text=re.compile(r"\[(\*|\d+)\]"))
                for attempt in range(3):  # Run > Run All Cells, again if no cell started within 20 s
                    page.locator(".jp-NotebookPanel .jp-Cell").first.click(position={"x": 5, "y": 5})
                    page.locator(".lm-MenuBar-item", has_text="Run").first.click()
                    page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()
                    t_run = time.monotonic()
                    while not started.count() and time.monotonic() - t_run < 20:
                        _dismiss_dialogs(page)
                        page.wait_for_timeout(500)
                    if started.count():
                        break
                while plots.count() < 2 or "tokens masked" not in _figure_state(plots.first)["title"]:
                    _dismiss_dialogs(page)
                    if time.monotonic() > deadline - 40:
                        page.screenshot(path=str(tmp_path / "timeout.png"))
                        pytest.fail(f"the explorers did not render in time (screenshot {tmp_path / 'timeout.png'})")
                    page.wait_for_timeout(1_000)
                masking = page.locator(".widget-vbox", has=page.locator(".widget-label", has_text="mask seed")).first
                plot = masking.locator(".js-plotly-plot").first
                before = _figure_state(plot)
                slider = masking.locator(".widget-slider", has=page.locator(".widget-label", has_text="mask seed"))
                readout = slider.locator(".widget-readout")
                seed0 = readout.inner_text().strip()
                slider.locator(".noUi-handle").first.focus()
                for _ in range(3):
                    page.keyboard.press("ArrowRight")
                seed = str(int(seed0) + 3)
                page.wait_for_function(
                    "([el, want]) => el.textContent.trim() === want", arg=[readout.element_handle(), seed], timeout=10_000)
                page.wait_for_function(  # the kernel recomputes and the figure follows
                    "([el, want]) => ((el.querySelector('.gtitle') || {}).textContent || '').includes(want)",
                    arg=[plot.element_handle(), f"seed {seed}:"],
                    timeout=max(5_000, 1000 * (deadline - time.monotonic() - 15)))
                after = _figure_state(plot)
                assert f"seed {seed0}:" in before["title"] and f"seed {seed}:" in after["title"]
                assert after["heatmaps"] != before["heatmaps"] or after["points"] != before["points"]
                masking.evaluate("el => el.scrollIntoView({block: 'start'})")  # both explorers in view
                page.wait_for_timeout(500)
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SCREENSHOT))
            finally:
                browser.close()
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        if nb_path.read_bytes() != original:  # belt and braces: autosave is off
            nb_path.write_bytes(original)
