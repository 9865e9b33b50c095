"""The study's statistics (stats.py) on hand-computed cases.

The t distribution with 2 degrees of freedom has the closed form F(t) = 1/2 + t / (2 sqrt(2 + t^2)),
so three-seed cases are checked against arithmetic done here, not against scipy.
"""
import json
import math

import numpy as np
import pytest

from pixelrepa import stats

T975_DF2 = 4.302653  # the 97.5% quantile of t with 2 df (any t table)


def F2(t):
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


def test_paired_test_three_seeds_by_hand():
    r = stats.paired_test([2.0, 4.0, 6.0], expect=+1, margin=10.0)
    se = 2 / math.sqrt(3)
    assert r["diff"] == pytest.approx(4.0) and r["sd"] == pytest.approx(2.0) and r["df"] == 2
    assert r["lo"] == pytest.approx(4 - T975_DF2 * se, abs=1e-5)
    assert r["hi"] == pytest.approx(4 + T975_DF2 * se, abs=1e-5)
    assert r["p_paper"] == pytest.approx(1 - F2(4 / se), rel=1e-9)  # 0.0371
    assert r["p_other"] == pytest.approx(F2(4 / se) - 0, rel=1e-9)
    p_equiv = max(1 - F2((4 + 10) / se), F2((4 - 10) / se))  # two one-sided tests against +-10
    assert r["p_equiv"] == pytest.approx(p_equiv, rel=1e-9) and r["p_equiv"] == pytest.approx(0.01755, abs=1e-4)


def test_paired_test_agrees_with_statsmodels():
    from statsmodels.stats.weightstats import ttost_paired
    x, y = np.array([3.1, 0.4, 2.2, 5.0, 1.7]), np.array([1.0, 0.9, 0.2, 2.5, 1.1])
    r = stats.paired_test(x - y, expect=+1, margin=2.5)
    assert r["p_equiv"] == pytest.approx(ttost_paired(x, y, -2.5, 2.5)[0], rel=1e-9)


def test_minimum_detectable_effect_has_80_percent_power():
    from statsmodels.stats.power import TTestPower
    for n in (3, 5, 20):
        d = stats.mde(2.0, n, n - 1)
        assert stats.power(d, 2.0, n, n - 1) == pytest.approx(0.8, abs=1e-6)
        assert d == pytest.approx(2.0 * TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8), rel=1e-6)
    assert stats.mde(2.0, 20, 19) < stats.mde(2.0, 5, 4)  # more seeds see smaller effects


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, 2 x 0.03, max(0.06, 1 x 0.04)
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(stats.holm([0.2, float("nan")])[1])


def _rows(values: dict, where=64):
    return [{"arm": a, "where": where, "seed": s, "value": v} for a, vs in values.items() for s, v in enumerate(vs)]


def test_pooled_sd_by_hand():
    # two arms: the additive model's residual spread is the paired differences' own spread
    two = stats.pooled_sd(_rows({"a": [10, 12, 14], "b": [11, 12, 16]}), ["a", "b"], 64)
    assert two["sd"] == pytest.approx(1.0) and two["df"] == 2
    # three arms: residuals y - arm mean - seed mean + grand mean give SS = 48/9, df = 4,
    # so the residual variance is 4/3 and a difference's SD sqrt(8/3)
    three = stats.pooled_sd(_rows({"a": [0, 0, 0], "b": [1, 2, 3], "c": [0, 3, 0]}), ["a", "b", "c"], 64)
    assert three["df"] == 4 and three["sd"] == pytest.approx(math.sqrt(8 / 3))
    assert 0 <= three["levene_p"] <= 1


def _write_runs(folder, runs):
    for (arm, res, seed), recs in runs.items():
        d = folder / f"{arm}-{res}px-s{seed}"
        d.mkdir(parents=True)
        (d / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def _study(tmp_path, jit64, repa64, jit32, repa32, most=None, least=None, steps=100):
    runs = {}
    for arm, res, vals in (("jit", 64, jit64), ("repa", 64, repa64), ("jit", 32, jit32), ("repa", 32, repa32)):
        for s, v in enumerate(vals):
            runs[(arm, res, s)] = [{"kind": "score", "step": steps, "n": 100, "sample_seed": 1, "fid": v}]
    for arm, vals in (most or {}).items():
        for s, v in enumerate(vals):
            runs[(arm, 64, s)].append({"kind": "subset", "subset": "most", "fid": v})
    for arm, vals in (least or {}).items():
        for s, v in enumerate(vals):
            runs[(arm, 64, s)].append({"kind": "subset", "subset": "least", "fid": v})
    _write_runs(tmp_path / "runs", runs)
    cal = tmp_path / "cal.jsonl"
    cal.write_text("".join(json.dumps({"kind": "floor", "resolution": r, "n": 100, "subset": 0, "fid": f}) + "\n"
                           for r, f in ((32, 40.0), (64, 50.0))))
    return stats.tables(tmp_path / "runs", low_res=32, high_res=64, steps=steps, margin=0.10, calibration=cal)


def test_claim_1_reproduced_when_both_components_go_as_the_paper(tmp_path):
    t = _study(tmp_path, jit64=[100, 102, 104], repa64=[110, 113, 113], jit32=[80, 81, 82], repa32=[70, 72, 71])
    c1 = [c for c in t["components"] if c["claim"] == 1]
    assert [round(c["diff"], 6) for c in c1] == [-10.0, 10.0]
    assert c1[1]["margin"] == pytest.approx(0.10 * (102 - 50))  # 10% of JiT's FID above the floor
    assert all(c["outcome"].startswith("as the paper") for c in c1)
    assert t["verdicts"][0]["verdict"] == "reproduced"


def test_equivalence_decides_a_claim_not_reproduced(tmp_path):
    # REPA - JiT is 0 +- 0.1 at 64 px: far inside a margin of 5.2 FID, so equivalent
    t = _study(tmp_path, jit64=[100, 102, 104], repa64=[100.1, 101.9, 104.0], jit32=[80, 81, 82], repa32=[70, 72, 71])
    c = [c for c in t["components"] if c["claim"] == 1][1]
    assert c["p_equiv_holm"] < 0.05 and c["outcome"] == "equivalent within the margin"
    assert t["verdicts"][0]["verdict"] == "not reproduced: equivalent within the margin"


def test_nothing_decides_a_noisy_claim(tmp_path):
    t = _study(tmp_path, jit64=[100, 102, 104], repa64=[105, 97, 105], jit32=[80, 81, 82], repa32=[85, 76, 82])
    assert [c["outcome"] for c in t["components"] if c["claim"] == 1] == ["inconclusive", "inconclusive"]
    assert t["verdicts"][0]["verdict"] == "inconclusive"
    assert all(c["mde"] > abs(c["diff"]) for c in t["components"] if c["claim"] == 1)


def test_evidence_says_when_one_seed_has_no_interval(tmp_path):
    # 32 px: three seeds (an interval and an MDE); 64 px: one seed of REPA (no interval, no MDE: not "nan")
    t = _study(tmp_path, jit64=[100, 102, 104], repa64=[110], jit32=[80, 81, 82], repa32=[70, 72, 71])
    low, high = [c for c in t["components"] if c["claim"] == 1]
    assert high["n_seeds"] == 1 and math.isnan(high["lo"])
    assert stats.component_words(high) == (f"{high['component']}: 10.00 (no interval), margin 5.00, no MDE, "
                                           f"1 seed -> inconclusive (1 seed)")
    words = stats.component_words(low, ".1f")
    assert words.startswith(f"{low['component']}: -10.0 [{low['lo']:.1f}, {low['hi']:.1f}], margin ")
    assert f"MDE {low['mde']:.1f}, 3 seeds -> " in words
    assert "nan" not in t["verdicts"][0]["evidence"] and stats.component_words(high) in t["verdicts"][0]["evidence"]
    # the verdict's sentence written anew from the components: the same at two decimals, one decimal on request
    for v in t["verdicts"]:
        assert stats.describe(v, t["components"]) == stats.describe(v)
    one = stats.describe(t["verdicts"][0], t["components"], ".1f")
    assert one.endswith(f"{stats.component_words(low, '.1f')}; {stats.component_words(high, '.1f')}.")
    assert "10.0 (no interval), margin 5.0" in one and "10.00" not in one
    # the end-of-training table likewise: REPA's one seed at 64 px prints no interval, JiT's three their bounds
    final = {(r["arm"], r["resolution"]): r for r in t["final"]}
    assert stats.interval_words(final[("repa", 64)]["fid_lo"], final[("repa", 64)]["fid_hi"]) == "(no interval)"
    jit = final[("jit", 64)]
    assert jit["fid_lo"] < jit["fid"] < jit["fid_hi"]
    assert stats.interval_words(jit["fid_lo"], jit["fid_hi"]) == f"[{jit['fid_lo']:.1f}, {jit['fid_hi']:.1f}]"
    assert stats.interval_words(None, None) == "(no interval)"


def test_claim_2_is_the_interaction(tmp_path):
    most = {"jit": [30, 31, 32], "repa": [35, 37, 36]}  # REPA - JiT: 5, 6, 4
    least = {"jit": [40, 41, 42], "repa": [39, 41, 41]}  # REPA - JiT: -1, 0, -1
    t = _study(tmp_path, jit64=[100, 102, 104], repa64=[110, 113, 113], jit32=[80, 81, 82], repa32=[70, 72, 71],
               most=most, least=least)
    c2 = [c for c in t["components"] if c["claim"] == 2]
    assert len(c2) == 1 and c2[0]["diff"] == pytest.approx(np.mean([6, 6, 5]))
    assert c2[0]["sd"] == pytest.approx(np.std([6, 6, 5], ddof=1))
    assert c2[0]["outcome"].startswith("as the paper")


def test_speed_is_non_inferiority_at_half_the_steps(tmp_path):
    runs = {}
    for s in range(3):
        runs[("jit", 64, s)] = [{"kind": "score", "step": 100, "n": 100, "fid": 100.0 + s}]
        runs[("pixelrepa", 64, s)] = [{"kind": "score", "step": 100, "n": 100, "fid": 90.0 + s},
                                      {"kind": "score", "step": 50, "n": 100, "fid": 130.0 + 2 * s}]
    _write_runs(tmp_path / "runs", runs)
    comps = stats.components(stats.load_runs(tmp_path / "runs"), low_res=32, high_res=64, steps=100,
                             floors={64: 50.0}, margin=0.1)
    speed = [c for c in comps if c["claim"] == 4 and "steps -" in c["component"]][0]
    assert speed["diff"] == pytest.approx(30 + 1)  # 130, 133, 136 against 100, 101, 102
    stats.decide(comps)
    assert speed["outcome"] == "the other way"  # 31 FID worse, well beyond a margin of 5.1: not 2x faster


def test_scores_fall_back_to_the_training_log_and_average_sampling_seeds(tmp_path):
    d = tmp_path / "runs" / "jit-32px-s0"
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text(json.dumps({"step": 10, "eval_fid": 55.5, "eval_n": 64}) + "\n")
    d2 = tmp_path / "runs" / "repa-32px-s0"
    d2.mkdir()
    (d2 / "evals.jsonl").write_text("".join(json.dumps({"kind": "score", "step": 10, "n": 99, "fid": f}) + "\n"
                                            for f in (40.0, 44.0)))
    rows = {r["arm"]: r for r in stats.scores(stats.load_runs(tmp_path / "runs"), 10)}
    assert rows["jit"]["value"] == 55.5 and rows["jit"]["source"] == "training-log curve point"
    assert rows["repa"]["value"] == 42.0 and rows["repa"]["n"] == 99


# ----------------------------------------------------------------------------- a figure in words

def _curve_runs(tmp_path, curves: dict, res=64):
    """Runs whose training logs hold FID curve points: curves[(arm, seed)] = [(step, fid), ...]."""
    for (arm, seed), pts in curves.items():
        d = tmp_path / "runs" / f"{arm}-{res}px-s{seed}"
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "images": 10 * s, "eval_fid": f}) + "\n"
                                                 for s, f in pts))
    return stats.load_runs(tmp_path / "runs")


def test_curve_words_pair_by_seed_and_judge_the_last_point_against_the_paper(tmp_path):
    # seed 0: repa - jit = +4 then -2; seed 1: +2 then -6; seed 2 has no jit run, so it is left out
    R = _curve_runs(tmp_path, {("jit", 0): [(100, 50), (200, 40)], ("repa", 0): [(100, 54), (200, 38)],
                               ("jit", 1): [(100, 60), (200, 50)], ("repa", 1): [(100, 62), (200, 44)],
                               ("repa", 2): [(100, 0), (200, 0)]})
    text = stats.curve_words(R, "repa", "jit", 64, +1, paper="behind later")
    assert "(mean over the 2 seeds with both): +3.0 at 1,000 images, -4.0 (95% interval" in text
    assert "repa is below jit at 1 of 2 evaluations" in text
    assert text.endswith("The paper expects repa higher than jit late in training (behind later): "
                         "the last evaluation goes the other way.")
    assert stats.curve_words(R, "repa", "jit", 64, -1).endswith("the last evaluation goes that way.")
    # the last point's interval over the two seeds: -4 +- t(0.975, 1) * sd(-2, -6) / sqrt(2) = -4 +- 12.706 * 2
    assert "-4.0 (95% interval -29.4 to 21.4) at 2,000" in text
    assert "no FID evaluation with both" in stats.curve_words(R, "repa", "jit", 32)
    alone = stats.curve_words(R, "jit", None, 64)  # jit's mean: 55 then 45
    assert alone == "At 64 px, jit's FID (mean over 2 seeds) goes from 55.0 at 1,000 images to 45.0 at 2,000; lowest 45.0 at 2,000."


def test_probe_subset_and_loss_words_by_hand(tmp_path):
    runs = {("jit", 64, 0): [{"kind": "probe", "t": 0.5, "cka": 0.20, "pixel_r2": 0.80},
                             {"kind": "subset", "subset": "most", "fid": 30.0}, {"kind": "subset", "subset": "least", "fid": 40.0}],
            ("repa", 64, 0): [{"kind": "probe", "t": 0.5, "cka": 0.30, "pixel_r2": 0.82},
                              {"kind": "subset", "subset": "most", "fid": 35.0}, {"kind": "subset", "subset": "least", "fid": 39.0}]}
    _write_runs(tmp_path / "runs", runs)
    R = stats.load_runs(tmp_path / "runs")
    text = stats.probe_words(R, "repa", "jit", 64, 0.5, {"cka": +1, "pixel_r2": -1})
    assert "CKA with the encoder 0.300 against 0.200 (+0.100); pixel R^2 0.820 against 0.800 (+0.020)" in text
    assert text.endswith("predicts CKA with the encoder higher (so it is) and pixel R^2 lower (it is not).")
    assert "no probe of both" in stats.probe_words(R, "repa", "jit", 64, 0.25)
    sub = stats.subset_words(R)  # most: +5, least: -1, interaction +6
    assert "+5.0 on the most-similar images, -1.0 on the least-similar; the interaction (most - least) is +6.0" in sub
    assert sub.endswith("tight clusters): it is.")
    d = tmp_path / "runs" / "jit-64px-s0"  # a loss of 1.0 for 50 steps, then 0.9, 0.8 in the third and last quarter
    losses = [1.0] * 50 + [0.9] * 25 + [0.8] * 25
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": v}) + "\n" for i, v in enumerate(losses)))
    words = stats.loss_words(stats.load_runs(tmp_path / "runs"), "jit", 64)
    assert "goes from 1.000 in the first tenth of training to 0.800 in the last" in words
    assert words.endswith(f"changes by {(0.8 - 0.9) / 0.9:+.1%}: still falling.")
    assert "no training log" in stats.loss_words(R, "repa", 64)
