import io
import os
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "2")

# Tests write only under temporary folders. The study's runs and results (what the notebooks nbval
# executes and the explorer tests train and save) go under $PIXELREPA_OUTPUT_ROOT (study.output_path),
# which the Makefile's test targets set to a fresh temporary folder; without it, one is made here for
# this session (subprocesses and notebook kernels inherit it) and removed at its end.
OWN_OUTPUT_ROOT = None if os.environ.get("PIXELREPA_OUTPUT_ROOT") else tempfile.mkdtemp(prefix="pixelrepa-tests-")
if OWN_OUTPUT_ROOT:
    os.environ["PIXELREPA_OUTPUT_ROOT"] = OWN_OUTPUT_ROOT
# hypothesis's example database and caches too (its default is .hypothesis/ in the working directory)
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(os.environ["PIXELREPA_OUTPUT_ROOT"]) / "hypothesis"))


def pytest_unconfigure(config):
    if OWN_OUTPUT_ROOT:
        shutil.rmtree(OWN_OUTPUT_ROOT, ignore_errors=True)


def make_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 20, seed: int = 0) -> Path:
    """A small ImageFolder of coloured gradient squares, each class with its own hue."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3))
            base[..., c % 3] = np.linspace(0, 255, size)[None, :]
            img = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i}.png")
    return root


def huge_png(path, width=50_000, height=50_000):
    """A valid 1 x 1 PNG whose header claims width x height: a decompression bomb costing 70 bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "folder")


def randomised(net, std=0.05, seed=0):
    """Zero-initialised layers would hide bugs: give every parameter a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def run_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable
