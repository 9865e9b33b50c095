"""The FID protocol command: class-balanced samples that do not depend on the number of processes, FID
through torch-fidelity against an .npz the test writes (and against an image folder), a guidance sweep,
PNG and .npz outputs, reference checkpoints, bf16 autocast on the CPU."""
import json
import subprocess
import warnings

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image

from conftest import PYTHON, ROOT, make_image_folder, run_env
from pixelrepa import evaluate as ev
from pixelrepa.data import load_dataset
from pixelrepa.flow import SamplerConfig, generate
from pixelrepa.extractors import INCEPTION, inception_weights
from pixelrepa.metrics import Images, features
from pixelrepa.storage import checkpoints, jit_from_state, read_checkpoint
from pixelrepa.train import TrainConfig, train
from reference_layout import reference_checkpoint

RES, CLASSES, PER_CLASS = 16, 3, 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A briefly trained JiT (3 classes, 16 px), real images at 16 px as a folder, and an .npz of their
    Inception statistics written here from torch-fidelity's features (mu, and sigma as np.cov)."""
    root = tmp_path_factory.mktemp("eval")
    data_path = root / "imagenet"
    make_image_folder(data_path / "train", classes=CLASSES, per_class=8)
    run = root / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(TrainConfig(model="JiT-Ti/4", dataset=str(data_path / "train"), resolution=RES, data_dir=str(root / "data"),
                          out_dir=str(run), steps=6, batch_size=8, blr=1e-2, warmup_epochs=1, ckpt_every=6,
                          num_samples=0, progress=False, seed=1, ema_decays=(0.5, 0.7), cfg_scale=2.5))
    ds = load_dataset(str(data_path / "train"), RES)
    reals = torch.stack([ds[i][0] for i in range(len(ds))])
    folder = root / "reference"
    folder.mkdir()
    for i, img in enumerate(reals):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    data_dir = str(root / "data")
    pool = features(reals, data_dir=data_dir).double().numpy()
    npz = root / "stats.npz"
    np.savez(npz, mu=pool.mean(0), sigma=np.cov(pool, rowvar=False))
    return {"root": root, "run": run, "reals": reals, "folder": folder, "npz": npz, "data_dir": data_dir,
            "data_path": data_path}


def config(setup, out, **kw):
    base = dict(checkpoint=str(setup["run"]), ref_stats=str(setup["npz"]), per_class=PER_CLASS, steps=3, batch_size=5,
                out_dir=str(out), data_dir=setup["data_dir"], progress=False)
    return ev.EvalConfig(**{**base, **kw})


def test_samples_are_balanced_flow_generate_and_the_fid_is_torch_fidelitys(setup, tmp_path):
    rows = ev.evaluate(config(setup, tmp_path, cfg_sweep=(1.0, 2.5), save_npz=True, save_png=True))
    assert [r["cfg_scale"] for r in rows] == [1.0, 2.5] and all(r["num_images"] == CLASSES * PER_CLASS for r in rows)
    logged = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["fid"] for r in logged] == [r["fid"] for r in rows]
    with np.load(tmp_path / "samples-cfg2.5.npz") as f:
        images, labels = torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2), torch.from_numpy(f["arr_1"])
    assert images.shape == (9, 3, RES, RES) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [PER_CLASS] * CLASSES  # 50 per class, here 3
    # the same images as flow.generate with this batch size and seed, from the first EMA
    net, cfg = jit_from_state(read_checkpoint(checkpoints(setup["run"])[-1]), "ema0")
    want, _ = generate(net, 9, CLASSES, (3, RES, RES), SamplerConfig(steps=3, cfg_scale=2.5), batch_size=5, seed=0,
                       progress=False)
    assert torch.equal(images, want)
    with np.load(tmp_path / "samples-cfg1.npz") as f:
        assert not np.array_equal(f["arr_0"], images.permute(0, 2, 3, 1).numpy())  # guidance changes them
    pngs = sorted((tmp_path / "samples-cfg2.5").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(9)]
    assert torch.equal(torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in pngs]), images)
    # the score: torch-fidelity's own FID of the same samples against the same real images
    weights, has_logits = inception_weights(setup["data_dir"])
    m = torch_fidelity.calculate_metrics(input1=Images(images), input2=Images(setup["reals"]), fid=True, cuda=False,
                                         feature_extractor=INCEPTION, feature_extractor_weights_path=str(weights),
                                         verbose=False, cache=False, save_cpu_ram=True)
    assert rows[1]["fid"] == pytest.approx(m["frechet_inception_distance"], rel=1e-4)
    assert not has_logits and rows[1]["isc_mean"] is None and "no Inception Score" in rows[1]["isc_note"]


@pytest.mark.slow
def test_two_gloo_processes_give_the_same_images_and_score_as_one(setup, tmp_path):
    env = {**run_env(), "OMP_NUM_THREADS": "1"}
    args = ["-m", "pixelrepa.evaluate", str(setup["run"]), "--ref_stats", str(setup["npz"]), "--per_class",
            str(PER_CLASS), "--steps", "3", "--batch_size", "5", "--cfg_scale", "2.5", "--save_npz", "true",
            "--save_png", "true", "--data_dir", setup["data_dir"], "--progress", "false"]
    rows = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        launch = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
        r = subprocess.run(launch + args + ["--out_dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert row["world_size"] == world
        rows[world] = row
    a, b = (np.load(tmp_path / f"world{w}" / "samples-cfg2.5.npz") for w in (1, 2))
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    for name in (f"{i:05d}.png" for i in range(9)):  # each rank wrote its own chunks' PNGs
        assert (tmp_path / "world1" / "samples-cfg2.5" / name).read_bytes() == \
            (tmp_path / "world2" / "samples-cfg2.5" / name).read_bytes()
    assert rows[1]["fid"] == rows[2]["fid"]
    assert not list((tmp_path / "world2").glob(".*.pt"))  # the ranks' shards were merged and removed


def test_an_image_folder_reference_its_written_statistics_and_refusals(setup, tmp_path):
    written = tmp_path / "written.npz"
    (by_folder,) = ev.evaluate(config(setup, tmp_path, ref_stats="", ref_images=str(setup["folder"]),
                                      write_ref_stats=str(written), cfg_scale=2.5))
    (by_npz,) = ev.evaluate(config(setup, tmp_path, cfg_scale=2.5))
    assert by_folder["reference"] == {"ref_images": str(setup["folder"]), "n": 24}
    assert by_folder["fid"] == pytest.approx(by_npz["fid"], rel=1e-6)
    mine, theirs = ev.read_statistics(written), ev.read_statistics(setup["npz"])
    assert np.allclose(mine["mu"], theirs["mu"], atol=1e-6) and np.allclose(mine["sigma"], theirs["sigma"], atol=1e-6)
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="mu"):
        ev.evaluate(config(setup, tmp_path, ref_stats=str(tmp_path / "bad.npz")))
    with pytest.raises(ValueError, match="exactly one"):
        config(setup, tmp_path, ref_images=str(setup["folder"]))
    with pytest.raises(ValueError, match="cfg_interval"):
        config(setup, tmp_path, cfg_interval=(0.5, 0.1))
    r = subprocess.run([PYTHON, "-m", "pixelrepa.evaluate", str(setup["run"])], cwd=ROOT, env=run_env(),
                       capture_output=True, text=True)
    assert r.returncode == 1 and "EvalConfig.ref_stats" in r.stderr


def test_a_reference_checkpoint_evaluates_as_the_run_it_came_from(setup, tmp_path):
    state = read_checkpoint(checkpoints(setup["run"])[-1])
    ref = reference_checkpoint(state["config"], state, data_path=setup["data_path"], n_images=24, adapter=False)
    torch.save(ref, tmp_path / "checkpoint-last.pth")
    for ema in ("ema1",):  # the second EMA: model_ema2 in the reference's names
        (a,) = ev.evaluate(config(setup, tmp_path / "a", ema=ema, save_npz=True))
        (b,) = ev.evaluate(config(setup, tmp_path / "b", ema=ema, save_npz=True,
                                  checkpoint=str(tmp_path / "checkpoint-last.pth")))
        assert a["cfg_scale"] == b["cfg_scale"] == 2.5  # the run's own guidance scale, from either layout
        assert np.array_equal(np.load(tmp_path / "a" / "samples-cfg2.5.npz")["arr_0"],
                              np.load(tmp_path / "b" / "samples-cfg2.5.npz")["arr_0"])
        assert a["fid"] == b["fid"] and a["step"] == b["step"] == 6


def test_bf16_autocast_runs_on_the_cpu(setup, tmp_path):
    """The CUDA default (bf16 autocast, as the reference samples) is the same code on the CPU."""
    net, cfg = jit_from_state(read_checkpoint(checkpoints(setup["run"])[-1]), "ema0")
    seen = []
    net.final_layer.linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    got = {}
    for precision in ("fp32", "bf16"):
        seen.clear()
        ev.generate_share(net, torch.arange(6) % CLASSES, SamplerConfig(steps=2, cfg_scale=2.0), seed=0, batch_size=3,
                          device=torch.device("cpu"), precision=precision,
                          on_chunk=lambda s, x, y: got.setdefault(precision, []).append(x))
        assert set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}
    a, b = (torch.cat(got[p]).int() for p in ("fp32", "bf16"))
    assert (a - b).abs().max() <= 16  # bf16 rounding, not another model
    assert ev.chunks(12, 5, 0, 2) == [(0, 5), (10, 12)] and ev.chunks(12, 5, 1, 2) == [(5, 10)]
    assert ev.chunks(9, 5, 1, 3) == [(5, 9)] and ev.chunks(9, 5, 2, 3) == []  # a rank may have nothing to do
