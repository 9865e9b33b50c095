"""The GPU check script's own pieces, on the CPU (the script itself runs where a GPU is lent:
`python3 scripts/gpu_check.py --dry_run` runs all of it here at toy sizes in about two minutes)."""
import importlib.util

import torch
from torch_fidelity import FeatureExtractorInceptionV3

from conftest import ROOT
from pixelrepa import evaluate as ev

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_random_inception_weights_load_and_give_logits(tmp_path):
    path = gpu_check.random_inception(tmp_path / "inception.pth")
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=str(path))
    pool, logits = net(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008) and torch.isfinite(logits).all()


def test_the_timing_checkpoint_is_a_reference_checkpoint_of_perturbed_weights(tmp_path):
    path = gpu_check.reference_jit_checkpoint(tmp_path / "checkpoint-last.pth", "JiT-Ti/4", 32, 10)
    net, cfg, step = ev.load_checkpoint(path, "ema1")
    assert (net.cfg.num_classes, cfg["model"], cfg["batch_size"], cfg["cfg_scale"]) == (10, "JiT-Ti/4", 1024, 2.9)
    assert net.final_layer.linear.weight.abs().sum() > 0  # not the zero-initialised output layer


def test_output_parsers():
    out = 'noise\n{"figure": "train", "mfu": 0.41, "other": 1}\n{bad\n== 5 passed, 2 skipped in 3.1s ==\n'
    assert gpu_check.bench_rows(out) == {"rows": [{"figure": "train", "mfu": 0.41}]}
    assert gpu_check.pytest_summary(out) == {"summary": "5 passed, 2 skipped in 3.1s"}
