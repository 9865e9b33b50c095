"""The benchmark on a tiny setting: one JSON object per figure with what a reader needs to trust
it, and the checks it reports (samples of both paths agree, no head runs while sampling)."""
import json

import pytest
import torch

from pixelrepa import bench

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
                attn_impl="sdpa", compile=False)
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
    ours = bench.make_contender(dict(base, name="ours", attn_impl="sdpa", batched_cfg=True, inference_mode=True,
                                     compile=False), torch.device("cpu"))
    ref = bench.make_contender(dict(base, name="ref", attn_impl="reference", batched_cfg=False,
                                    inference_mode=False, compile=False), torch.device("cpu"))
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
