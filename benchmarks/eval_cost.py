"""What one evaluation costs, in seconds per 1,000 samples: sampling, Inception features, and the
scores (FID, KID, precision/recall) against the held-out reference; it sets how large N can be.

    python -m benchmarks.eval_cost --n 200            # JiT-Ti/8 at 64 px, the decisive profile's sampler

Each part is timed on the study's own code path (flow.generate, metrics.features, metrics.score) with
``n`` samples and scaled to 1,000 (sampling and features are linear in N; the score's k-NN part is
quadratic, so it is also timed at N = 1000 directly). One JSON object on stdout: the process's CPU
seconds (time.process_time, which other work on the machine barely changes) and its wall seconds
(trustworthy on a quiet machine only), single-threaded unless --threads says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from pixelrepa import metrics, study
from pixelrepa.flow import SamplerConfig, matched_labels, generate
from pixelrepa.jit import build_jit


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.eval_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="decisive")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    P = study.load_profile(a.profile)
    res, data_dir = P.high_res, str(study.repo_path(P.data_dir))
    ref, ref_labels = metrics.split_features(P.dataset, res, "eval", data_dir=data_dir)
    net = build_jit(P.model_high, res, int(ref_labels.max()) + 1).eval()
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.02)  # a non-constant output, as a trained net
    scfg = SamplerConfig(steps=P.eval_steps, cfg_scale=P.cfg_scale)
    labels = matched_labels(a.n, torch.bincount(ref_labels))
    clock = time.process_time
    w0, t0 = time.perf_counter(), clock()
    imgs, _ = generate(net, a.n, net.cfg.num_classes, (3, res, res), scfg, seed=0, progress=False, labels=labels)
    w1, t1 = time.perf_counter(), clock()
    feats = metrics.features(imgs, data_dir=data_dir)
    w2, t2 = time.perf_counter(), clock()
    metrics.score(feats, ref)
    w3, t3 = time.perf_counter(), clock()
    big = torch.cat([feats] * (1000 // a.n + 1))[:1000] + 1e-3 * torch.randn(1000, feats.shape[1])
    metrics.score(big, ref)
    w4, t4 = time.perf_counter(), clock()
    per = 1000 / a.n
    print(json.dumps({"what": "evaluation cost, seconds per 1000 samples", "model": P.model_high, "resolution": res,
                      "sample_steps": P.eval_steps, "cfg_scale": P.cfg_scale, "n_timed": a.n, "threads": a.threads,
                      "cores": os.cpu_count(), "load": os.getloadavg()[0],
                      "cpu_s": {"sampling": round((t1 - t0) * per, 1), "inception": round((t2 - t1) * per, 1),
                                "scores_at_1000": round(t4 - t3, 1)},
                      "wall_s": {"sampling": round((w1 - w0) * per, 1), "inception": round((w2 - w1) * per, 1),
                                 "scores_at_1000": round(w4 - w3, 1)}, "reference_n": len(ref)}))


if __name__ == "__main__":
    main()
