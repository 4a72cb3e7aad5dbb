"""`python -m benchmarks.wspo --quick` end to end: a fresh local Ray instance, the real pipeline stages and trainer
against the official-style loop."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_quick_wspo_benchmark_writes_measured_ratios(tmp_path):
    out = tmp_path / "wspo.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, never a shared one
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.wspo", "--quick", "--out", str(out)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=480, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"benchmark ran past {err.timeout}s:\n{err.stdout}\n{err.stderr}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "| side " in done.stdout and "scoring s |" in done.stdout and "total s |" in done.stdout  # per-run table
    assert "official/pipeline total" in done.stdout and "the official-style loop takes" in done.stdout

    results = json.loads(out.read_text())
    assert results["machine"]["cpu_count"] >= 1 and results["machine"]["torch_version"]
    assert results["quick"] is True and results["epochs"] == [1.0]  # --quick runs one epoch only
    assert results["config"]["mode"] == "wspo" and results["config"]["zero_stage"] == 3

    runs = {(r["side"], r["epochs"]): r for r in results["runs"]}
    assert set(runs) == {("pipeline", 1.0), ("official", 1.0)}
    pipeline, official = runs["pipeline", 1.0], runs["official", 1.0]
    for side, run in (("pipeline", pipeline), ("official", official)):
        for key in ("rows", "steps", "train_wall_s", "loop_s", "total_s", "s_per_epoch"):
            assert _positive(run[key]), (side, key)
        assert run["total_s"] == pytest.approx(run["scoring_s"] + run["train_wall_s"])
        assert run["train_wall_s"] > run["loop_s"]  # the wall time includes worker start-up
    assert _positive(pipeline["scoring_s"]) and 0 < pipeline["hosts_start_s"] < pipeline["scoring_s"]
    assert official["scoring_s"] == 0  # the official loop has no scoring stage
    assert (pipeline["rows"], pipeline["steps"]) == (official["rows"], official["steps"])  # same data, same steps
    assert official["final_loss"] == pytest.approx(pipeline["final_loss"], rel=1e-2)  # ... and the same training

    [ratio] = results["ratios"]
    assert ratio["epochs"] == 1.0
    for key in ("total", "per_epoch", "loop"):
        assert _positive(ratio[key]), key
    assert ratio["total"] == pytest.approx(official["total_s"] / pipeline["total_s"])
    assert ratio["per_epoch"] == pytest.approx(official["s_per_epoch"] / pipeline["s_per_epoch"])
    assert ratio["loop"] == pytest.approx(official["loop_s"] / pipeline["loop_s"])
    assert results["marginal_epoch"] is None  # needs two epochs values
