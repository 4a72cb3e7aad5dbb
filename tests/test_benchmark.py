"""`python -m benchmarks.run --quick` end to end: a fresh local Ray instance, real stages, real trainer."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_benchmark_writes_positive_numbers(tmp_path):
    out = tmp_path / "b.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, never a shared one
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"benchmark ran past {err.timeout}s:\n{err.stdout}\n{err.stderr}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "Ray/plain tokens/s" in done.stdout and "| measurement" in done.stdout

    results = json.loads(out.read_text())
    machine = results["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch_threads"] >= 1 and machine["torch_version"]
    for key in ("gflops", "gflops_1thread"):
        assert _positive(results["matmul"][key]), key
    for key in ("score_forward_flops_per_token", "train_flops_per_token"):
        assert _positive(results["model"][key]), key

    scoring = results["scoring"]
    for path in ("plain", "plain_host_threads", "ray"):
        assert _positive(scoring[path]["tokens_per_s"]) and _positive(scoring[path]["median_seconds"]), path
    assert _positive(scoring["tokens"]) and _positive(scoring["ratio_ray_over_plain"])
    assert scoring["ratio_ray_over_plain"] == pytest.approx(scoring["ray"]["tokens_per_s"] / scoring["plain"]["tokens_per_s"])

    assert list(results["training"]) == ["workers_2"]  # --quick skips the 1-worker run
    for key, run in results["training"].items():
        for field in ("tokens_per_s", "seconds", "wall_seconds", "steps", "tokens"):
            assert _positive(run[field]), (key, field)
        assert run["wall_seconds"] >= run["seconds"]  # wall time includes worker start-up
        assert run["tokens_per_s"] == pytest.approx(run["tokens"] / run["seconds"])

    measured = [r for r in results["rows"] if r["tokens/s"] is not None]
    assert len(measured) == 4  # 3 scoring rows, 1 training row
    assert all(_positive(r[k]) for r in measured for k in ("model GFLOP/s", "utilization %", "wall s"))
