"""Property tests (hypothesis): any valid TrainConfig builds and trains a step; any invalid one is
refused with a ValueError naming the field. Tiny models on a tiny ImageFolder; the frozen encoder is a
fast stand-in (the real ones are tested in test_encoders.py), so each example takes about a second."""
import json
import math
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st
from torch import nn

from conftest import make_image_folder
from pixelrepa import encoders
from pixelrepa.align import METHODS
from pixelrepa.storage import checkpoints, read_checkpoint
from pixelrepa.train import TrainConfig, train

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


class FakeEncoder(nn.Module):
    """grid x grid tokens of width 16 from average-pooled pixels: what make_targets needs of an encoder."""
    name, dim = "effnet-lite0", 16

    def __init__(self, grid):
        super().__init__()
        self.grid = grid
        self.proj = nn.Linear(3, self.dim).requires_grad_(False)

    def forward(self, x):
        return self.proj(nn.functional.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2))


@pytest.fixture(scope="module", autouse=True)
def subnormal_floats():
    """train() flushes denormals process-wide (an earlier test may have called it); hypothesis's float
    strategies refuse to run without them."""
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("props") / "folder", classes=3, per_class=6, size=16)


unit = st.floats(0.0, 0.5)
default_or = lambda s: st.one_of(st.just(None), s)  # noqa: E731 (None: the method's or registry's default)


@st.composite
def valid_configs(draw, method):
    model, resolution = draw(st.sampled_from([("JiT-Ti/4", 16), ("JiT-Ti/4", 32), ("JiT-Ti/8", 16), ("JiT-S/8", 32)]))
    depth = 8 if model.startswith("JiT-S") else 6
    return dict(
        model=model, resolution=resolution, method=method, batch_size=draw(st.sampled_from([8, 16])),
        blr=draw(st.floats(1e-6, 1e-1)), warmup_epochs=draw(st.floats(0, 3)),
        ema_decays=tuple(draw(st.lists(st.floats(0.5, 0.9999), min_size=1, max_size=2))),
        P_mean=draw(st.floats(-2, 2)), P_std=draw(st.floats(0.1, 2)), noise_scale=draw(st.floats(0.5, 2)),
        t_eps=draw(st.floats(0, 0.2)), label_drop=draw(unit), attn_drop=draw(default_or(unit)),
        proj_drop=draw(default_or(unit)), seed=draw(st.integers(0, 2 ** 31 - 1)),
        align_depth=draw(default_or(st.integers(1, depth))), align_coef=draw(default_or(st.floats(0, 1))),
        mask_ratio=draw(st.sampled_from([None, 0.0]) if method == "adapter" else default_or(st.floats(0, 0.9))),
        proj_hidden=draw(st.integers(1, 32)), cfg_scale=draw(st.floats(0, 4)),
        num_samples=draw(st.integers(0, 3)), sample_steps=draw(st.integers(1, 2)))


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=3, **SETTINGS)
@given(data=st.data())
def test_any_valid_config_trains_a_step(folder, method, data):
    params = data.draw(valid_configs(method), label="config")
    event(f"{params['method']} {params['model']} {params['resolution']} px")
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short EMAs, one step: the warnings are expected
        mp.setattr(encoders, "build_encoder", lambda name, grid, **kw: FakeEncoder(grid))
        out = Path(tmp) / "run"
        cfg = TrainConfig(dataset=str(folder), data_dir=tmp, out_dir=str(out), steps=1, ckpt_every=1,
                          log_every=1, progress=False, **params)
        try:
            train(cfg)
        finally:  # train() flushes denormals process-wide; hypothesis's float strategies need them
            torch.set_flush_denormal(False)
        (ckpt,) = checkpoints(out)
        state = read_checkpoint(ckpt)
        assert state["step"] == 1 and bool(state["head"]) == (params["method"] != "jit")
        assert all(torch.isfinite(v).all() for v in state["model"].values())
        (rec,) = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        assert math.isfinite(rec["loss"])
        if params["num_samples"]:
            imgs = torch.load(out / "samples.pt")["images"]
            assert imgs.shape == (params["num_samples"], 3, params["resolution"], params["resolution"])


VALID = dict(model="JiT-Ti/4", resolution=16, steps=1, batch_size=8, progress=False)
nan_inf = st.sampled_from([math.nan, math.inf, -math.inf])
not_a_number = st.one_of(st.text(max_size=3), st.none(), st.lists(st.integers(), max_size=1))
count = lambda lo: st.one_of(st.integers(max_value=lo - 1), st.floats(1.5, 9.5), st.booleans(), not_a_number)  # noqa: E731
INVALID = {
    "model": st.text(max_size=8).filter(lambda s: not s.startswith("JiT")),
    "resolution": st.one_of(count(1), st.sampled_from([6, 18, 30, 34])),
    **{f: count(1) for f in ("steps", "batch_size", "ckpt_every", "keep_ckpts", "log_every", "sample_steps",
                             "dist_timeout")},
    **{f: count(0) for f in ("num_samples", "num_workers", "eval_every", "train_images", "eval_real")},
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2 ** 31), not_a_number),
    "blr": st.one_of(st.floats(max_value=0), nan_inf, not_a_number),
    "warmup_epochs": st.one_of(st.floats(max_value=-1e-9), nan_inf),
    "ema_decays": st.one_of(st.just(()), st.tuples(st.one_of(st.floats(min_value=1), st.floats(max_value=0), nan_inf)),
                            st.just("0.99"), st.just(0.99)),
    "P_mean": nan_inf, "P_std": st.one_of(st.floats(max_value=0), nan_inf),
    "noise_scale": st.one_of(st.floats(max_value=0), nan_inf),
    "t_eps": st.one_of(st.floats(min_value=1), st.floats(max_value=-1e-9), nan_inf),
    "label_drop": st.one_of(st.floats(min_value=1), st.floats(max_value=-1e-9), nan_inf),
    # None is the registry's value; the -1 that once meant it is refused like any negative
    "attn_drop": st.one_of(st.floats(min_value=1), st.floats(max_value=-1e-9), st.just(-1), nan_inf, st.text(max_size=3)),
    "proj_drop": st.one_of(st.floats(min_value=1), st.floats(max_value=-1e-9), st.just(-1)),
    "device": st.text(max_size=5).filter(lambda s: s not in ("auto", "cpu", "cuda")),
    "method": st.text(max_size=8).filter(lambda s: s not in METHODS),
    "encoder": st.text(max_size=8).filter(lambda s: s not in encoders.ENCODERS),
    "align_depth": st.one_of(st.integers(max_value=0), st.integers(min_value=7), st.floats(1.5, 2.5)),
    "align_coef": st.one_of(st.floats(max_value=-1e-9), nan_inf),
    "mask_ratio": st.one_of(st.floats(min_value=1), st.floats(max_value=-1e-9)),
    "proj_hidden": count(1),
    "cfg_scale": nan_inf,
    "compile": st.sampled_from(["yes", 1, None]), "progress": st.sampled_from(["no", 0]),
    "out_dir": st.sampled_from([None, 3, b"runs"]),
}


@pytest.mark.parametrize("field", sorted(INVALID))
@settings(max_examples=5, **SETTINGS)
@given(data=st.data())
def test_any_invalid_value_is_refused_naming_the_field(data, field):
    value = data.draw(INVALID[field], label=field)
    with pytest.raises(ValueError) as err:
        TrainConfig(**{**VALID, field: value})
    assert f"TrainConfig.{field}=" in str(err.value)


def test_invalid_combinations_name_the_field():
    for fields, match in [(dict(method="adapter", mask_ratio=0.3), "TrainConfig.mask_ratio"),
                          (dict(eval_every=5, eval_samples=1), "TrainConfig.eval_samples"),
                          (dict(method="repa", encoder="dino"), "TrainConfig.encoder")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**{**VALID, **fields})
