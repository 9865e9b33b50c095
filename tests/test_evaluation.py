"""The study's evaluation: one class mix on both sides, scores through torch-fidelity from features,
the memorisation check, the calibration's floor records."""

import math

import numpy as np
import pytest
import torch

from pixelrepa import calibration, extractors, metrics, stats, study
from pixelrepa.flow import SamplerConfig, matched_labels


def test_matched_labels_follow_the_reference_class_frequencies():
    counts = torch.tensor([216, 0, 3, 1, 164, 111, 40])  # openclipart-like: very unbalanced, one class absent
    for n in (1, 7, 192, 1000, 2000):
        y = matched_labels(n, counts)
        got = torch.bincount(y, minlength=len(counts)).double()
        want = n * counts.double() / counts.sum()
        assert len(y) == n and (got - want).abs().max() < 1  # every class within one label of n * p
        assert got[1] == 0
    # interleaved: a prefix has nearly the same mix as the whole
    y = matched_labels(1000, counts)
    head = torch.bincount(y[:100], minlength=len(counts)).double()
    assert (head - 100 * counts.double() / counts.sum()).abs().max() <= 2
    with pytest.raises(ValueError):
        matched_labels(10, torch.zeros(3))


def test_score_matches_torch_fidelity_and_a_direct_frechet_distance():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 16, generator=g), torch.randn(400, 16, generator=g) * 1.3 + 0.5
    s = metrics.score(a, b)
    # FID by hand: |mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa Sb)^1/2)
    from scipy import linalg
    A, B = a.double().numpy(), b.double().numpy()
    Sa, Sb = np.cov(A, rowvar=False), np.cov(B, rowvar=False)
    fid = ((A.mean(0) - B.mean(0)) ** 2).sum() + np.trace(Sa + Sb - 2 * linalg.sqrtm(Sa @ Sb).real)
    assert s["fid"] == pytest.approx(fid, rel=1e-6)
    assert s["kid_mean"] > 0 and s["kid_std"] > 0 and 0 <= s["precision"] <= 1 and 0 <= s["recall"] <= 1
    same = metrics.score(a[:150], a[150:])
    assert same["fid"] < s["fid"] and same["precision"] > 0.5 and same["recall"] > 0.5


def test_memorisation_tells_copies_from_new_samples():
    g = torch.Generator().manual_seed(1)
    train, held = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g)
    fresh = torch.randn(100, 8, generator=g)
    copies = train[:100] + 0.01 * torch.randn(100, 8, generator=g)
    new = metrics.memorisation(fresh, train, held)
    cop = metrics.memorisation(copies, train, held)
    assert 0.3 < new["closer_to_train"] < 0.7 and 0.8 < new["nn_ratio"] < 1.25
    assert cop["closer_to_train"] > 0.95 and cop["nn_ratio"] < 0.1
    # a larger training set is not closer by chance alone: it is cut to the held-out size
    big = metrics.memorisation(fresh, torch.cat([train, torch.randn(2000, 8, generator=g)]), held)
    assert big["nn_n"] == 200 and 0.3 < big["closer_to_train"] < 0.7


def test_evaluate_model_labels_samples_with_the_reference_mix(monkeypatch):
    ref_labels = torch.tensor([0] * 30 + [2] * 9 + [3] * 1)
    ref = torch.randn(40, 8)
    monkeypatch.setattr(metrics, "split_features", lambda *a, **k: (ref, ref_labels))
    seen = {}

    def fake_generate(net, n, num_classes, shape, cfg, seed=0, device="cpu", progress=False, labels=None, **kw):
        seen["labels"], seen["seed"] = labels, seed
        return torch.zeros(n, *shape, dtype=torch.uint8), labels
    monkeypatch.setattr("pixelrepa.flow.generate", fake_generate)
    monkeypatch.setattr(metrics, "features", lambda imgs, **k: torch.randn(len(imgs), 8))
    out = metrics.evaluate_model(torch.nn.Identity(), dataset="x", resolution=8, num_classes=4, n=20,
                                 sampler=SamplerConfig(steps=1), sample_seed=77)
    # 20 x (30, 0, 9, 1) / 40 = 15, 0, 4.5, 0.5: the one label left goes to the first of the tied remainders
    assert torch.bincount(seen["labels"], minlength=4).tolist() == [15, 0, 5, 0]
    assert seen["seed"] == 77 and out["n"] == 20 and out["n_real"] == 40 and "precision" in out


def test_sampling_seed_is_independent_of_the_training_seed():
    P = study.load_profile("decisive")
    a, b = study.run_config(P, "jit", 64, 0), study.run_config(P, "jit", 64, 3)
    assert a.eval_seed == b.eval_seed == P.eval_seed  # one stream for every run: paired across methods and seeds


def test_floor_records_are_disjoint_class_matched_subsets(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    train_labels = torch.tensor([0] * 90 + [1] * 27 + [2] * 9)
    train = torch.randn(len(train_labels), 8, generator=g) + train_labels[:, None].float()
    ref_labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 1)
    ref = torch.randn(len(ref_labels), 8, generator=g) + ref_labels[:, None].float()
    monkeypatch.setattr(metrics, "split_features",
                        lambda ds, res, split, **k: (train, train_labels) if split == "train" else (ref, ref_labels))
    used = []
    real_score = metrics.score
    monkeypatch.setattr(metrics, "score", lambda f, r, **k: used.append(f.clone()) or real_score(f, r))
    P = study.StudyParams()
    path = tmp_path / "records.jsonl"
    calibration.floor(P, 32, path, n_values=(14, 28))
    recs = stats.read_jsonl(path)
    assert [(r["n"], r["subset"]) for r in recs] == [(14, i) for i in range(9)] + [(28, i) for i in range(4)]
    first = [f for f, r in zip(used, recs) if r["n"] == 14]
    rows = {tuple(x.tolist()) for f in first for x in f}
    assert len(rows) == 9 * 14  # disjoint
    calibration.floor(P, 32, path, n_values=(14, 28))  # resumable: nothing recomputed
    assert len(stats.read_jsonl(path)) == len(recs)
    table = stats.calibration_table(recs)
    assert [(r["n"], r["floor_subsets"]) for r in table] == [(14, 9), (28, 4)]


def test_image_features_are_cached_by_their_pixels(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(extractors, "resolve_weights", lambda name, path, data_dir: (tmp_path / "w.pth", None))
    monkeypatch.setattr(extractors, "weights_id", lambda name, path: "w")
    monkeypatch.setattr(metrics, "features", lambda imgs, **k: calls.append(len(imgs)) or imgs.flatten(1)[:, :4].float())
    a = torch.randint(0, 255, (5, 3, 4, 4), dtype=torch.uint8)
    first = metrics.image_features(a, "toy-train5", data_dir=tmp_path)
    again = metrics.image_features(a.clone(), "toy-train5", data_dir=tmp_path)
    assert calls == [5] and torch.equal(first, again)  # read back, not recomputed
    b = a.clone()
    b[0, 0, 0, 0] ^= 1
    other = metrics.image_features(b, "toy-train5", data_dir=tmp_path)  # other pixels, same name: recomputed
    assert calls == [5, 5] and not torch.equal(other, first)


def test_calibration_table_uses_the_latest_checkpoint_and_subtracts_the_estimation_noise():
    recs = [{"kind": "floor", "resolution": 32, "n": 4, "fid": f, "kid_mean": 0.0} for f in (1.0, 3.0)]
    recs += [{"kind": "sampling", "resolution": 32, "n": 4, "step": 600, "fid": f} for f in (10.0, 20.0)]
    recs += [{"kind": "sampling", "resolution": 32, "n": 4, "step": 1200, "fid": f} for f in (5.0, 7.0, 9.0)]
    runs = [{"arm": "jit", "resolution": 32, "seed": s, "metrics": [],
             "evals": [{"kind": "score", "step": 1200, "n": 4, "fid": f}]} for s, f in enumerate((3.0, 7.0, 11.0))]
    (row,) = stats.calibration_table(recs, runs, 1200)
    assert row["floor_fid"] == 2.0 and row["sampling_step"] == 1200 and row["sampling_seeds"] == 3
    assert row["model_fid"] == 7.0 and row["estimation_sd"] == pytest.approx(2.0)  # step 600's seeds left out
    # seed-to-seed variance 16 = training + estimation (4): training SD sqrt(12)
    assert row["seed_sd"] == pytest.approx(4.0) and row["training_sd"] == pytest.approx(12 ** 0.5)
    noisy = [dict(r, fid=r["fid"] * 10) if r.get("step") == 1200 else r for r in recs]
    assert math.isnan(stats.calibration_table(noisy, runs, 1200)[0]["training_sd"])  # more noise than spread


def test_calibration_table_pools_the_estimation_noise_within_checkpoints():
    # two checkpoints 100 FID apart: their difference is not sampling noise. Within s0: 1, 3 (SS 2);
    # within s1: 100, 102, 104 (SS 8); pooled variance (2 + 8) / (5 - 2) = 10 / 3
    recs = [{"kind": "sampling", "resolution": 64, "n": 8, "step": 1200, "run": "jit-64px-s0", "fid": f} for f in (1.0, 3.0)]
    recs += [{"kind": "sampling", "resolution": 64, "n": 8, "step": 1200, "run": "jit-64px-s1", "fid": f}
             for f in (100.0, 102.0, 104.0)]
    (row,) = stats.calibration_table(recs)
    assert row["sampling_seeds"] == 5 and row["sampling_runs"] == "jit-64px-s0, jit-64px-s1"
    assert row["estimation_sd"] == pytest.approx((10 / 3) ** 0.5)
    one_each = [recs[0], recs[2]]  # one seed per checkpoint: no within-checkpoint spread to measure
    assert stats.calibration_table(one_each)[0]["estimation_sd"] is None


def test_sampling_records_each_checkpoint_apart_and_reuse_its_own_end_score(tmp_path, monkeypatch):
    P = study.StudyParams(steps=10, eval_seed=7)
    runs = {}
    for seed in (0, 1):
        d = tmp_path / f"jit-32px-s{seed}"
        d.mkdir()
        (d / "ckpt-00000010.pt").write_bytes(b"")
        (d / "evals.jsonl").write_text('{"kind": "score", "step": 10, "n": 4, "sample_seed": 7, "fid": %d.5}\n' % seed)
        runs[seed] = d
    monkeypatch.setattr(study, "ensure_run", lambda P, m, res, seed: runs[seed])
    net = type("Net", (), {"cfg": type("C", (), {"num_classes": 3})})()
    monkeypatch.setattr(calibration, "load_jit", lambda path, device: (net, None))
    scored = []
    monkeypatch.setattr(metrics, "evaluate_model",
                        lambda net, sample_seed, **k: scored.append(sample_seed) or {"fid": 100.0 + sample_seed, "n": k["n"]})
    path = tmp_path / "records.jsonl"
    calibration.sampling(P, 32, path, plan={4: 2}, seed=0)
    calibration.sampling(P, 32, path, plan={4: 2}, seed=1)  # same N and sampling seeds, another checkpoint
    recs = stats.read_jsonl(path)
    assert [(r["run"], r["sample_seed"], r["fid"]) for r in recs] == [
        ("jit-32px-s0", 7, 0.5), ("jit-32px-s0", 8, 108.0), ("jit-32px-s1", 7, 1.5), ("jit-32px-s1", 8, 108.0)]
    assert scored == [8, 8]  # seed 7 is each run's own end score, read from its evals
    calibration.sampling(P, 32, path, plan={4: 2}, seed=1)  # resumable: nothing again
    assert len(stats.read_jsonl(path)) == 4 and scored == [8, 8]
    (runs[1] / "ckpt-00000010.pt").unlink()
    with pytest.raises(FileNotFoundError, match="ckpt-00000010"):
        calibration.sampling(P, 32, path, plan={4: 3}, seed=1)
