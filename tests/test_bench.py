"""The benchmark (benchmarks/) on a tiny setting: one JSON object per figure with what a reader needs
to trust it, the checks it reports (samples of both paths agree, no head runs while sampling), and its
reference-style contenders: the same maths as ours, with the reference's work."""
import copy
import json

import pytest
import torch

from benchmarks import bench
from benchmarks.reference import (ReferenceAttention, ReferenceBlock, reference_guided_velocity, reference_sample,
                                  reference_style)
from conftest import randomised
from pixelrepa.align import AlignConfig, build_head
from pixelrepa.flow import SamplerConfig, guidance_weight, sample, velocity
from pixelrepa.jit import build_jit

TINY = ["--model", "JiT-Ti/4", "--resolution", "32", "--batch", "2", "--steps", "1", "--rounds", "1",
        "--sample_batch", "2", "--sample_steps", "2", "--sample_rounds", "1", "--no_compile", "--device", "cpu",
        "--threads", "1"]  # one thread: on a loaded 2-core machine two threads wait for each other


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    import contextlib
    import io
    out = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out):
            # memory: one fresh process per contender, 5-15 s each; measured once in its own test
            bench.main(TINY + ["--figures", "train", "sample", "methods", "--encoder", "none", "--no_memory"])
    finally:
        torch.set_num_threads(threads)
    lines = out.getvalue().strip().splitlines()
    recs = [json.loads(line) for line in lines]  # every line is one JSON object
    return {r["figure"]: r for r in recs}


def check_common(rec):
    assert rec["device"] and rec["device_type"] == "cpu" and rec["cores"] >= 1 and rec["threads"] >= 1
    assert len(rec["load_avg_1_5_15min"]) == 3
    assert set(rec["versions"]) >= {"torch", "timm", "python"} and rec["versions"]["torch"] == torch.__version__
    assert rec["model"] == "JiT-Ti/4" and rec["resolution"] == 32 and isinstance(rec["settings"], dict)
    assert all(v > 0 for v in rec["images_per_s"].values())


def test_one_json_object_per_figure(records):
    assert set(records) == {"train", "sample", "methods"}
    assert all(r["threads"] == 1 for r in records.values())


def test_train_figure(records):
    rec = records["train"]
    check_common(rec)
    rates = rec["images_per_s"]
    assert set(rates) == {"pixelrepa", "reference_style", "timm_vit"}  # --no_compile: no compiled contenders
    assert rec["speedup_vs_reference_style"] == pytest.approx(rates["pixelrepa"] / rates["reference_style"], rel=0.01)
    assert rec["ratio_vs_timm_vit"] == pytest.approx(rates["pixelrepa"] / rates["timm_vit"], rel=0.01)
    assert rec["peak_memory"] is None  # --no_memory
    # JiT-Ti/4 at 32 px by hand: 442,368 multiply-adds per token and block in the linears, 64 tokens in
    # blocks 1-2 and 96 in blocks 3-6, attention 384 N^2 per block, ~3M in embeddings and adaLN:
    # 0.494 GFLOP forward; the backward is about twice that (no gradient for the input images)
    assert 2.5 * 0.494e9 < rec["model_flops_per_image"] < 3 * 0.494e9
    assert rec["mfu"] is None and rec["bf16_peak_tflops"] is None  # no known peak on a CPU
    t_ref, t_timm = rec["targets"]
    assert t_timm["target"] == 1.0 and t_timm["measured"] == rec["ratio_vs_best_timm_vit"]
    assert t_ref["target"] == 1.3 and t_ref["measured"] == rec["speedup_vs_reference_style"]
    assert t_ref["met"] == (t_ref["measured"] >= 1.3)


def test_sample_figure_and_its_checks(records):
    rec = records["sample"]
    check_common(rec)
    assert set(rec["images_per_s"]) == {"pixelrepa", "reference_style"}
    assert rec["settings"]["steps"] == 2 and rec["settings"]["cfg_scale"] == 2.0
    # Heun, 2 steps: evaluations at t = 0 (unguided), 0.5 and 0.5 (guided). The reference runs two
    # forwards at each; ours skips the unconditional one at t = 0 and, on the CPU (max_batch = batch),
    # runs its batched guidance as two calls
    assert rec["settings"]["ours_max_batch"] == 2
    assert rec["network_calls_per_sampling_call"] == {"pixelrepa": 5, "reference_style": 6}
    assert rec["network_images_per_sampled_image"] == {"pixelrepa": 5, "reference_style": 6}
    agree = rec["agreement_with_reference_style"]["pixelrepa"]
    assert agree["agree"] and agree["relative_rms_diff"] < 1e-5
    head = rec["alignment_head"]
    assert head["head_calls_in_one_training_forward"] == 1 and head["head_calls_while_sampling"] == 0
    assert head["sampling_overhead"] == 0


def test_peak_memory_of_a_contender_in_a_fresh_process():
    spec = dict(kind="train", name="x", model="JiT-Ti/4", resolution=32, num_classes=22, batch=8, method="jit",
                compile=False)
    mem = bench.memory_in_subprocess(spec)
    assert "error" not in mem, mem
    # 4.2M parameters: weights, gradients, two AdamW moments and two EMAs are ~100 MiB in fp32
    assert 60 < mem["peak_mib"] < 1000 and 0 < mem["step_peak_mib"] < mem["peak_mib"]


def test_methods_figure(records):
    rec = records["methods"]
    check_common(rec)
    assert set(rec["step_time_vs_jit"]) == {"jit", "repa", "adapter", "pixelrepa"}
    assert rec["step_time_vs_jit"]["jit"] == 1.0
    assert rec["mta_overhead_cached_targets"] == pytest.approx(rec["step_time_vs_jit"]["pixelrepa"] - 1, abs=1e-3)


def test_sampling_paths_agree_on_a_trained_looking_network():
    """Ours (fused attention, batched guidance, unconditional pass skipped where its weight is 1,
    inference_mode) and the reference-style path (hand-written fp32 attention, two forwards at every
    step) give the same samples in fp32 from the same weights, noise and labels."""
    base = dict(kind="sample", model="JiT-Ti/4", resolution=32, num_classes=5, batch=3, steps=6, cfg_scale=3.0)
    ours = bench.make_contender(dict(base, name="ours", compile=False), torch.device("cpu"))
    ref = bench.make_contender(dict(base, name="ref", reference=True, compile=False), torch.device("cpu"))
    ours.step()
    ref.step()
    a, b = ours.out["x"], ref.out["x"]
    assert b.abs().mean() > 0.1 and (b - b[:1]).abs().max() > 0.1  # not a constant output
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert bench.sample_agreement(a, b, torch.device("cpu"))["agree"]
    # the sampled labels matter: a different class gives a different image
    assert (a[0] - a[1]).abs().max() > 1e-3


def test_bf16_peaks_by_device_name(monkeypatch):
    cuda = torch.device("cuda", 0)
    for name, tflops in [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
                         ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA L4", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        peak = bench.bf16_peak_flops(cuda)
        assert (peak is None) if tflops is None else peak == tflops * 1e12
    assert bench.bf16_peak_flops(torch.device("cpu")) is None


def test_targets_say_by_how_much_they_are_missed():
    assert bench.target("x", 1.17, 1.3) == {"what": "x", "target": 1.3, "measured": 1.17, "met": False, "short_by": 0.1}
    assert bench.target("x", 1.5, 1.3)["met"] and bench.target("x", 1.5, 1.3)["short_by"] is None
    assert bench.target("overhead", 0.2, 0.15, higher_is_better=False)["met"] is False
    assert bench.target("x", None, 1.3)["met"] is None


def test_reference_style_network_does_the_references_work_with_our_maths():
    """The reference-style JiT (hand-written attention, every token through every block) and ours
    (fused attention, the last block computing the image tokens only) give the same outputs and
    hidden states from the same weights; the reference-style one is the reference's code path and
    does the in-context tokens' work in the last block, which ours skips."""
    net = randomised(build_jit("JiT-Ti/4", 32, 22)).eval()
    ref = reference_style(copy.deepcopy(net))
    assert all(type(b) is ReferenceBlock and type(b.attn) is ReferenceAttention for b in ref.blocks)
    assert ref.state_dict().keys() == net.state_dict().keys()
    g = torch.Generator().manual_seed(1)
    z, t, y = torch.randn(3, 3, 32, 32, generator=g), torch.rand(3, generator=g), torch.tensor([0, 5, 22])
    (a, ha), (b, hb) = net(z, t, y, hidden_at=(2, 5, 6)), ref(z, t, y, hidden_at=(2, 5, 6))
    assert torch.allclose(a, b, atol=1e-5) and a.abs().max() > 0.1
    assert all(h.shape == (3, 64, 192) and torch.allclose(h, r, atol=1e-4) for h, r in zip(ha, hb))
    ours, theirs = linear_and_attention_flops(net, z, t, y), linear_and_attention_flops(ref, z, t, y)
    w, hidden, L, T = net.cfg.width, 512, net.cfg.in_context_len, net.cfg.num_patches
    # the linears: the last block's projection and MLP for the 32 in-context tokens too (qkv is
    # computed for every token by both: they are keys and values)
    assert theirs["linear"] - ours["linear"] == 3 * L * 2 * (w * w + 3 * w * hidden)
    # the hand-written attention: every query of every block, QK^T and AV (2 N^2 w multiply-adds),
    # 64 tokens in the 2 blocks before the class tokens are inserted, 96 after
    assert theirs["attention"] == 3 * 2 * 2 * w * (2 * T ** 2 + 4 * (T + L) ** 2)


def linear_and_attention_flops(net, z, t, y) -> dict:
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(z, t, y)
    ops = {str(k).split(".")[-1]: v for k, v in fc.get_flop_counts()["Global"].items()}
    return {"linear": ops.get("mm", 0) + ops.get("addmm", 0), "attention": ops.get("bmm", 0)}


def test_reference_style_adapter_equals_ours():
    jit = build_jit("JiT-Ti/4", 32, 22).cfg
    head = randomised(build_head(AlignConfig("pixelrepa"), jit, 40)).eval()
    ref = reference_style(copy.deepcopy(head))
    g = torch.Generator().manual_seed(2)
    h, t, y = torch.randn(2, 64, 192, generator=g), torch.rand(2, generator=g), torch.tensor([1, 3])
    mask = torch.rand(2, 64, generator=g) < 0.2
    a, b = head(h, t, y, mask), ref(h, t, y, mask)
    assert a.shape == b.shape == (2, 64, 40) and torch.allclose(a, b, atol=1e-5) and a.abs().max() > 0.1


def test_reference_guidance_runs_both_passes_at_every_evaluation_with_our_velocity():
    null = 5
    cond, uncond = torch.ones(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    y, z = torch.tensor([1, 2]), torch.zeros(2, 3, 2, 2)
    calls = []

    def net(z, t, y):
        calls.append(y.tolist())
        return torch.where((y == null).view(-1, 1, 1, 1), uncond, cond)
    cfg = SamplerConfig(cfg_scale=3.0, cfg_interval=(0.1, 0.6))
    for t, w in ((0.5, 3.0), (0.05, 1.0), (0.6, 1.0), (0.9, 1.0)):  # inside the interval, then outside it
        calls.clear()
        v = reference_guided_velocity(net, z, t, y, null, cfg)
        assert calls == [[1, 2], [null, null]]  # two separate forwards whatever t
        assert guidance_weight(t, cfg) == w
        assert torch.allclose(v, w * velocity(cond, z, torch.full((2,), t), 0.05))


@pytest.mark.parametrize("steps", [7, 50])
def test_reference_sampler_runs_both_passes_every_step_and_agrees_with_ours(steps):
    """The reference-style sampler: 2 forwards of B per evaluation whatever t; ours: one, of 2B inside
    the interval and B outside; the samples agree (v_u + 1 (v_c - v_u) = v_c up to rounding)."""
    null, g = 4, torch.Generator().manual_seed(0)
    w = torch.randn(3, 3, generator=g) * 0.3

    def net(z, t, y):  # a nonlinear, class- and time-dependent x-prediction
        sizes.append(z.shape[0])
        return torch.tanh(torch.einsum("ij,bjhw->bihw", w, z)) * (1 + y.float().view(-1, 1, 1, 1) / 4) \
            + t.view(-1, 1, 1, 1)
    y = torch.tensor([0, 1, 2])
    z0 = torch.randn(3, 3, 4, 4, generator=g)
    cfg = SamplerConfig(steps=steps, cfg_scale=2.5)
    sizes = []
    ours = sample(net, y, (3, 4, 4), null, cfg, z=z0.clone())
    ours_sizes, sizes = sizes, []
    with torch.no_grad():
        ref = reference_sample(net, y, z0.clone(), null, cfg)
    evals = 2 * steps - 1
    assert len(sizes) == 2 * evals and set(sizes) == {3}
    assert len(ours_sizes) == evals and 0 < ours_sizes.count(6) < evals
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5) and (ours - z0).abs().max() > 0.1
    assert bench.forward_calls(cfg, 3, reference=True) == (2 * evals, 2 * evals)
    assert bench.forward_calls(cfg, 3) == (evals, len(ours_sizes) + ours_sizes.count(6))


def test_inception_figure_times_every_image_after_the_warm_up():
    r = bench.bench_inception(n=5, batch_size=2)
    s = r["settings"]
    assert r["figure"] == "inception" and r["device_type"] == "cpu"
    # 2 + 2 + 1 images in the timed loop (the warm-up batch is not timed), 2048-d pool features
    assert (s["timed_images"], s["timed_calls"], s["feature_dim"]) == (5, 3, 2048)
    assert r["images_per_s"] == pytest.approx(5 / s["seconds"], abs=0.01)
