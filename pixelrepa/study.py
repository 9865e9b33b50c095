"""The study runner: ``python -m pixelrepa.study --profile NAME`` (what ``make study`` calls).

Until the notebooks land, a profile is one training run of vanilla JiT on the offline default
(openclipart) whose metrics log, config and sample grid are written under
``papermill_runs/<profile>/``. An interrupted profile resumes from its last checkpoint.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from .train import TrainConfig, train

RUNS = Path("papermill_runs")

# Small runs need a larger learning rate than ImageNet's blr 5e-5 (lr = blr * 64 / 256 = 5e-4), and
# shorter EMAs: the paper's 0.9999 still holds 94% of the initial (zero-output) weights after 600 steps.
PROFILES: dict[str, dict] = {
    "smoke": dict(model="JiT-Ti/4", resolution=32, steps=40, batch_size=32, blr=2e-3, warmup_epochs=0.1,
                  ema_decays=(0.9, 0.95), ckpt_every=20, log_every=5, num_samples=8, sample_steps=10),
    "quick": dict(model="JiT-Ti/4", resolution=32, steps=600, batch_size=64, blr=2e-3, warmup_epochs=1,
                  ema_decays=(0.99, 0.995), ckpt_every=100, log_every=10, num_samples=44, sample_steps=50,
                  cfg_scale=2.0),
}


def profile_config(name: str, runs: Path = RUNS, **overrides) -> TrainConfig:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; valid profiles: {', '.join(PROFILES)}")
    return TrainConfig(**{**PROFILES[name], "out_dir": str(runs / name / "jit"), **overrides})


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pixelrepa.study", description=__doc__)
    p.add_argument("--profile", default="quick", help=f"one of {', '.join(PROFILES)}")
    p.add_argument("--runs", default=str(RUNS), help="where results are written")
    a = p.parse_args(argv)
    cfg = profile_config(a.profile, Path(a.runs))
    print(json.dumps(asdict(cfg), indent=1))
    out = train(cfg)
    print(f"profile {a.profile!r} done: metrics {out / 'metrics.jsonl'}, samples {out / 'samples.png'}")


if __name__ == "__main__":
    main()
