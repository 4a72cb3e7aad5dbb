"""`python -m jobs.prepare` end to end on the tiny world, as a user runs it, then again from cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path):
    # From another working directory, with the config's relative runs/ and .cache/ folders.
    env = {**os.environ, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "jobs.prepare", "--config", str(ROOT / "configs/tiny.yaml")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def test_prepare_writes_run_folder_and_reuses_cache(tmp_path):
    first = _run(tmp_path)
    run = tmp_path / "runs" / "tiny"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["models"]) == {"weak_base", "weak_aligned", "strong_base", "strong_ceiling"}
    for scores in metrics["models"].values():
        assert set(scores) == {"helpful", "harmless", "total"}
        assert 0 <= scores["helpful"] <= 1 and scores["total"] == (scores["helpful"] + scores["harmless"]) / 2
    report = (run / "report.md").read_text()
    assert "| model" in report and "strong_ceiling" in report and "plots/gold_reward.png" in report
    assert (run / "plots" / "gold_reward.png").stat().st_size > 1000
    assert (run / "config.yaml").is_file()
    generations = pq.read_table(run / "examples" / "eval_generations.parquet")
    assert generations.num_rows == 16 and "strong_ceiling_response" in generations.column_names
    assert (run / "checkpoints" / "weak_aligned" / "model.safetensors").is_file()
    assert "| weak_base" in first  # the table is printed

    second = _run(tmp_path)
    for stage in ("weak_base", "strong_base", "scored_pairs", "weak_aligned", "strong_ceiling"):
        assert f"{stage}: cached" in second
    assert "building" not in second
    assert json.loads((run / "metrics.json").read_text())["models"] == metrics["models"]  # same numbers
