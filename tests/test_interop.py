"""Reference checkpoints (the reference code's layout) read into pixelrepa: the test writes one from a
pixelrepa run (tests/reference_layout.py: renamed keys, prefixes, the frozen pos_embed, the encoder
inside, two EMAs with and without the net. prefix, AdamW in two groups, a pickled Namespace) and checks
the same outputs after loading, the step, and that training resumed from it equals the run it came from."""
import json
import pickle
import shlex
import subprocess
import warnings

import pytest
import torch
from torch import nn

from conftest import PYTHON, ROOT, make_image_folder, run_env
from pixelrepa import encoders, interop
from pixelrepa import train as trainmod
from pixelrepa.storage import CheckpointError, checkpoints, read_checkpoint
from pixelrepa.train import TrainConfig, train
from reference_layout import reference_checkpoint


class FakeDINOv2(nn.Module):
    """A deterministic stand-in for the frozen target (the real encoders are tested in test_encoders.py)."""
    name = "dinov2-b14"

    def __init__(self, grid, dim):
        super().__init__()
        self.grid, self.dim = grid, dim
        self.proj = nn.Linear(3, dim).requires_grad_(False)
        with torch.no_grad():  # its own seed: the same weights whatever the global generator did before
            self.proj.weight.copy_(torch.randn(dim, 3, generator=torch.Generator().manual_seed(5)))
            self.proj.bias.zero_()

    def forward(self, x):
        return self.proj(nn.functional.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2))


@pytest.fixture
def fake_encoder(monkeypatch):
    def use(dim):
        monkeypatch.setattr(encoders, "build_encoder", lambda name, grid, **kw: FakeDINOv2(grid, dim))
    return use


def run_args(data_path, out, steps, **extra):
    # batch 8 = 2 processes x 4 in the reference's arguments; 24 images: 3 steps per epoch either way
    args = dict(model="JiT-Ti/4", dataset=str(data_path / "train"), resolution=16, data_dir=str(out.parent / "cache"),
                out_dir=str(out), steps=steps, batch_size=8, blr=1e-2, warmup_epochs=1, ckpt_every=6, log_every=1,
                num_samples=0, progress=False, seed=3, method="pixelrepa", encoder="dinov2-b14", cfg_scale=2.5,
                sample_steps=7, ema_decays=(0.9, 0.95))
    return {**args, **extra}


def assert_same(a: dict, b: dict, what: str):
    assert set(a) == set(b), f"{what}: keys differ: {set(a) ^ set(b)}"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}.{k} differs"


def assert_same_opt(a: dict, b: dict):
    assert set(a["state"]) == set(b["state"])
    for i in a["state"]:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][i][k].float(), b["state"][i][k].float()), f"opt state {i}.{k}"


def write_reference(tmp_path, ckpt, data_path, name="checkpoint-last.pth", **kw):
    state = read_checkpoint(ckpt)
    ref = reference_checkpoint(state["config"], state, data_path=data_path, n_images=24, **kw)
    path = tmp_path / name
    torch.save(ref, path)
    return path, state, ref


@pytest.fixture
def original(tmp_path, fake_encoder):
    """A pixelrepa run of 12 steps (checkpoints at 6 and 12), on 24 images."""
    def make(enc_dim):
        fake_encoder(enc_dim)
        data_path = tmp_path / "imagenet"
        make_image_folder(data_path / "train", classes=3, per_class=8)
        out = tmp_path / "original"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(TrainConfig(**run_args(data_path, out, 12)))
        return data_path, out
    return make


@pytest.mark.parametrize("enc_dim", [768, 192])  # projection head used (L/H-like), unused (width = 192, B/16-like)
def test_reference_checkpoint_loads_and_resumes_as_the_run_it_came_from(tmp_path, original, enc_dim):
    data_path, out = original(enc_dim)
    ckpt6, ckpt12 = checkpoints(out)
    ref_path, state6, ref = write_reference(tmp_path, ckpt6, data_path, emas_prefixed=enc_dim == 192,
                                            encoder_sd={"cls_token": torch.zeros(1, 1, 8)}, projection_out=enc_dim)
    # the layout really is the reference's: renamed keys, prefixes, the frozen tables, groups, Namespace
    assert "net.x_embedder.proj1.weight" in ref["model"] and "net.pos_embed" in ref["model"]
    assert "masked_transformer_adapter.projection_layer.mlp.3.weight" in ref["model"]
    assert "net.mask_token" in ref["model"] and "repa_model.cls_token" in ref["model"]
    assert len(ref["optimizer"]["param_groups"]) == 2 and ref["epoch"] == 1

    got = interop.reference_state(ref_path, dataset=str(data_path / "train"))
    assert got["step"] == state6["step"] == 6  # AdamW's counter, and epoch 1 x 3 steps per epoch agree
    assert_same(got["model"], state6["model"], "model")
    assert_same(got["head"], state6["head"], "head")
    for a, b in zip(got["emas"], state6["emas"]):
        assert_same(a, b, "ema")
    assert_same_opt(got["opt"], state6["opt"])
    for k in ("model", "resolution", "batch_size", "blr", "seed", "ema_decays", "method", "encoder", "warmup_epochs",
              "cfg_scale", "sample_steps", "label_drop", "P_mean", "P_std", "t_eps"):
        assert got["config"][k] == state6["config"][k], k
    assert got["config"]["mask_ratio"] is None and got["config"]["attn_drop"] is None  # the defaults, not copies

    # same outputs: the JiT (raw and EMA) and the adapter on the same input
    from pixelrepa.storage import jit_from_state
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0, 2, 3])
    for which in ("model", "ema0", "ema1"):
        a, _ = jit_from_state(got, which)
        b, _ = jit_from_state(state6, which)
        with torch.no_grad():
            assert torch.equal(a(x, t, y), b(x, t, y)), which

    # imported as a run, it is what the explorers and a resumed `python -m pixelrepa.train` read
    run = tmp_path / "imported"
    written = interop.import_reference(ref_path, run, dataset=str(data_path / "train"), steps=12,
                                       data_dir=str(tmp_path / "cache"), log_every=1, ckpt_every=6, num_samples=0,
                                       progress=False)
    assert written.name == "ckpt-00000006.pt" and written.with_name(written.name + ".sha256").is_file()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["encoder_weights"].endswith(interop.ENCODER_FILE)
    assert torch.load(run / interop.ENCODER_FILE, weights_only=True).keys() == {"cls_token"}
    from pixelrepa.probes import ModelCache
    loaded = ModelCache().run(run)
    assert loaded.step == 6 and loaded.head is not None
    assert_same(loaded.head.state_dict(), state6["head"], "explorer head")

    argv = shlex.split(interop.resume_command(cfg))[3:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainmod.main(argv)
    resumed = read_checkpoint(run / "ckpt-00000012.pt")
    want = read_checkpoint(ckpt12)
    assert resumed["step"] == 12
    assert_same(resumed["model"], want["model"], "resumed model")
    assert_same(resumed["head"], want["head"], "resumed head")
    for a, b in zip(resumed["emas"], want["emas"]):
        assert_same(a, b, "resumed ema")
    assert_same_opt(resumed["opt"], want["opt"])
    logs = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (run, out)]
    strip = lambda r: {k: v for k, v in r.items() if k != "images_per_s"}  # noqa: E731
    assert [strip(r) for r in logs[0]] == [strip(r) for r in logs[1][6:]]


def test_step_from_the_epoch_without_optimizer_and_the_checks(tmp_path, original):
    data_path, out = original(768)
    ckpt6 = checkpoints(out)[0]
    path, state6, ref = write_reference(tmp_path, ckpt6, data_path)
    del ref["optimizer"]
    torch.save(ref, path)
    with pytest.warns(UserWarning, match="no optimizer state"):
        got = interop.reference_state(path, dataset_size=24)
    assert got["step"] == 6 and got["config"]["steps"] == 12  # (epoch 1 + 1) x 3; epochs 4 x 3
    assert interop.reference_state(path, optimizer=False, dataset_size=24)["step"] == 6
    assert interop.reference_state(path, optimizer=False)["step"] is None  # sampling: no folder is indexed
    with pytest.raises(CheckpointError, match="dataset_size"):
        interop.reference_state(path, dataset=str(tmp_path / "nowhere"))
    assert interop.reference_steps_per_epoch(1_281_167, {"world_size": 8, "batch_size": 128}) == 1251  # ImageNet

    ref2 = reference_checkpoint(state6["config"], state6, data_path=data_path, n_images=24)
    ref2["model"]["net.pos_embed"] = ref2["model"]["net.pos_embed"].flip(1)  # not the fixed sin-cos table
    torch.save(ref2, path)
    with pytest.raises(CheckpointError, match="pos_embed"):
        interop.reference_state(path)
    ref3 = reference_checkpoint(state6["config"], state6, data_path=data_path, n_images=24)
    ref3["optimizer"]["param_groups"][0]["params"].pop()  # groups that do not match the parameters
    torch.save(ref3, path)
    with pytest.raises(CheckpointError, match="groups"):
        interop.reference_state(path)
    torch.save(state6, path)  # pixelrepa's own layout is not the reference's
    with pytest.raises(CheckpointError, match="not in the reference layout"):
        interop.reference_state(path)


class Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_only_the_namespace_is_unpickled(tmp_path, original):
    data_path, out = original(768)
    path, state6, ref = write_reference(tmp_path, checkpoints(out)[0], data_path)
    ref["args"].hook = Evil()
    torch.save(ref, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="trusted"):
        interop.reference_state(path)


def test_the_frozen_encoder_inside_is_the_encoder_of_the_imported_run(tmp_path, fake_encoder, monkeypatch):
    """The reference saves its DINOv2 (timm's layout, patch 16, 16 x 16 positions); the imported run's
    encoder_weights point at that copy and build_encoder loads it to the same features."""
    import timm
    dino = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, img_size=256, patch_size=16,
                             depth=2).eval()
    data_path = tmp_path / "imagenet"
    make_image_folder(data_path / "train", classes=3, per_class=8)
    fake_encoder(768)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(TrainConfig(**run_args(data_path, tmp_path / "o", 6, ckpt_every=6)))
    path, _, _ = write_reference(tmp_path, checkpoints(tmp_path / "o")[0], data_path, encoder_sd=dino.state_dict())
    interop.import_reference(path, tmp_path / "run", dataset=str(data_path / "train"))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    monkeypatch.undo()  # the real build_encoder again
    enc = encoders.build_encoder("dinov2-b14", 16, weights=cfg["encoder_weights"], arch_overrides={"depth": 2})
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = torch.tensor(encoders.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(encoders.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = dino.forward_features(((x + 1) / 2 - mean) / std)[:, dino.num_prefix_tokens:]
    assert torch.allclose(enc(x), want, atol=1e-4)


def test_a_jit_only_reference_checkpoint_through_the_command_line(tmp_path):
    """LTH14/JiT's layout has no adapter and no encoder: method jit. `python -m pixelrepa.interop`
    writes the run and prints the command that resumes it; that command trains on to the end."""
    data_path = tmp_path / "imagenet"
    make_image_folder(data_path / "train", classes=3, per_class=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(TrainConfig(**run_args(data_path, tmp_path / "o", 6, method="jit")))
    path, state6, ref = write_reference(tmp_path, checkpoints(tmp_path / "o")[0], data_path, adapter=False)
    assert not any(k.startswith("masked_transformer_adapter.") for k in ref["model"])
    r = subprocess.run([PYTHON, "-m", "pixelrepa.interop", str(path), "--out_dir", str(tmp_path / "run"),
                        "--steps", "7", "--data_dir", str(tmp_path / "cache")], cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.strip().splitlines()[-1].strip()
    assert cmd.startswith("python -m pixelrepa.train") and "--method" not in cmd  # jit is the default
    got = read_checkpoint(tmp_path / "run" / "ckpt-00000006.pt")
    assert got["step"] == 6 and got["config"]["method"] == "jit" and got["head"] == {}
    assert_same(got["model"], state6["model"], "model")
    r = subprocess.run([PYTHON, *shlex.split(cmd)[1:], "--progress", "false"], cwd=ROOT, env=run_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert read_checkpoint(tmp_path / "run" / "ckpt-00000007.pt")["step"] == 7
    r = subprocess.run([PYTHON, "-m", "pixelrepa.interop", str(tmp_path / "nothing.pth"), "--out_dir",
                        str(tmp_path / "x")], cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert r.returncode == 1 and "no reference checkpoint" in r.stderr
