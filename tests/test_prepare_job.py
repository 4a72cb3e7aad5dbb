"""`python -m jobs.prepare` end to end on the tiny world, as a user runs it: uninterrupted, killed and run
again, from cache, and refused (another config, a max_length the models cannot take)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


CMD = [sys.executable, "-m", "jobs.prepare", "--config", str(ROOT / "configs/tiny.yaml")]


def _env() -> dict:
    env = {**os.environ, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return env


def _run(tmp_path, *extra: str):
    # From another working directory, with the config's relative runs/ and .cache/ folders.
    done = subprocess.run([*CMD, *extra], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def _kill_once_checkpointed(cwd: Path, stage: str, log: Path) -> None:
    """Start the job, and kill -9 it (driver, Ray and workers) once Ray Train has recorded a checkpoint of `stage`."""
    with open(log, "w") as out:
        job = subprocess.Popen(CMD, cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while not list((cwd / ".cache/w2s/ray_train").glob(f"{stage}-*/checkpoint_manager_snapshot.json")):
        assert job.poll() is None and time.time() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()


def test_prepare_writes_run_folder_resumes_after_a_kill_and_reuses_cache(tmp_path):
    calm, killed = tmp_path / "calm", tmp_path / "killed"
    calm.mkdir(), killed.mkdir()
    first = _run(calm)
    run = calm / "runs" / "tiny"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["models"]) == {"weak_base", "weak_aligned", "strong_base", "strong_ceiling"}
    for scores in metrics["models"].values():
        assert set(scores) == {"helpful", "harmless", "total"}
        assert 0 <= scores["helpful"] <= 1 and scores["total"] == (scores["helpful"] + scores["harmless"]) / 2
    report = (run / "report.md").read_text()
    assert "| model" in report and "strong_ceiling" in report and "plots/gold_reward.png" in report
    assert (run / "plots" / "gold_reward.png").stat().st_size > 1000
    assert (run / "config.yaml").is_file() and "| weak_base" in (run / "job.log").read_text()
    generations = pq.read_table(run / "examples" / "eval_generations.parquet")
    assert generations.num_rows == 16 and "strong_ceiling_response" in generations.column_names
    assert (run / "checkpoints" / "weak_aligned" / "model.safetensors").is_file()
    assert "| weak_base" in first  # the table is printed

    # kill -9 once the strong base has a checkpoint: the same command again reuses the weak base, resumes
    # the strong base from its checkpoint and ends with the numbers of the uninterrupted run
    _kill_once_checkpointed(killed, "strong_base", tmp_path / "killed.log")
    again = _run(killed)
    assert "weak_base: cached" in again and "[train] resumed from step" in again
    assert json.loads((killed / "runs/tiny/metrics.json").read_text())["models"] == metrics["models"]

    second = _run(calm)  # everything from the cache, the same numbers
    for stage in ("weak_base", "strong_base", "scored_pairs", "weak_aligned", "strong_ceiling"):
        assert f"{stage}: cached" in second
    assert "building" not in second
    assert json.loads((run / "metrics.json").read_text())["models"] == metrics["models"]

    # the run folder belongs to its config: another is refused, one line and exit code 2, unless --overwrite
    refused = subprocess.run([*CMD, "--set", "align.lr=0.002"], cwd=calm, env=_env(), capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "holds a run of another config" in refused.stderr and "--overwrite" in refused.stderr
    # a value the models cannot take: refused before any work, one line on screen and in the run's job.log
    too_long = subprocess.run([*CMD, "--set", "run_name=too_long", "--set", "max_length=200"], cwd=calm, env=_env(),
                              capture_output=True, text=True)
    assert too_long.returncode == 2 and "Traceback" not in too_long.stderr, too_long.stderr[-3000:]
    line = "error: max_length 200 is more than weak.size can take (96 positions)"
    assert line in too_long.stderr and line in (calm / "runs/too_long/job.log").read_text()
