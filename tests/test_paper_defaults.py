"""The defaults the reference code uses: JiT-H's dropout (projection 0.2 in the middle half of the
blocks, attention 0) and the per-iteration warm-up whose first step has learning rate 0."""
import json
import warnings

import pytest
import torch

from pixelrepa.jit import MODELS, build_jit
from pixelrepa.storage import read_checkpoint
from pixelrepa.train import TrainConfig, lr_at, train


@pytest.mark.parametrize("model", ["JiT-H/16", "JiT-H/32", "JiT-B/16", "JiT-L/16"])
def test_dropout_is_the_references(model):
    with torch.device("meta"):  # the architecture only: no memory for JiT-H's 953M parameters
        net = build_jit(model, 256, 1000)
    depth, proj = len(net.blocks), 0.2 if model.startswith("JiT-H") else 0.0
    for i, block in enumerate(net.blocks):
        middle = depth // 4 <= i < depth // 4 * 3
        assert block.attn.attn_drop == 0.0
        assert block.attn.proj_drop.p == block.mlp.drop.p == (proj if middle else 0.0), (model, i)
    assert "attn_drop" not in MODELS[model]


def test_warmup_is_the_references_first_step_at_lr_zero(tmp_path, image_folder):
    cfg = TrainConfig(blr=5e-5, batch_size=1024, warmup_epochs=5)
    warm = 5 * 1251  # ImageNet at batch 1024
    base = 5e-5 * 1024 / 256
    assert lr_at(0, cfg, 1251) == 0.0
    assert lr_at(1, cfg, 1251) == pytest.approx(base / warm)
    assert lr_at(warm // 2, cfg, 1251) == pytest.approx(base * (warm // 2) / warm)
    assert lr_at(warm, cfg, 1251) == lr_at(10 * warm, cfg, 1251) == pytest.approx(base)
    # a real run: its first step leaves the weights as initialised (lr 0), the second moves them
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(TrainConfig(model="JiT-Ti/4", dataset=str(image_folder), resolution=16, data_dir=str(tmp_path / "c"),
                          out_dir=str(out), steps=2, batch_size=8, blr=1e-2, warmup_epochs=1, ckpt_every=1,
                          keep_ckpts=3, log_every=1, num_samples=0, progress=False, seed=4))
    torch.manual_seed(4)
    init = build_jit("JiT-Ti/4", 16, 3).state_dict()
    step1, step2 = (read_checkpoint(out / f"ckpt-{s:08d}.pt")["model"] for s in (1, 2))
    assert all(torch.equal(step1[k], init[k]) for k in init)
    assert not all(torch.equal(step2[k], init[k]) for k in init)
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [0.0, pytest.approx(1e-2 * 8 / 256 / 3)]  # 24 images: 3 steps per epoch
