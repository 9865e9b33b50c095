"""Every committed table is re-derived from the committed run logs (papermill_runs/<profile>/runs/)."""
import dataclasses
import json

import pytest

from pixelrepa import stats, study

COMMITTED = [p for p in study.profiles() if (study.ROOT / "papermill_runs" / p / "tables" / "verdicts.json").exists()]


@pytest.mark.parametrize("profile", COMMITTED)
def test_committed_tables_recompute_from_the_committed_logs(profile):
    folder = study.ROOT / "papermill_runs" / profile
    P = dataclasses.replace(study.load_profile(profile), results_dir=str(folder))
    assert any((folder / "runs").glob("*/evals.jsonl")) or any((folder / "runs").glob("*/metrics.jsonl")), \
        f"{profile}: tables are committed but no run log is"
    recomputed = stats.rounded(study.tables(P, collect=False))
    for name, rows in recomputed.items():
        committed = json.loads((folder / "tables" / f"{name}.json").read_text())
        assert committed == json.loads(json.dumps(rows)), f"{profile}/tables/{name}.json differs from its logs"
