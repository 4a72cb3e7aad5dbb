"""`python -m jobs.prepare` end to end on the tiny world, as a user runs it: uninterrupted (the tests' shared
tiny world, tests/conftest.py), killed and run again, from cache, and refused (another config, a max_length the
models cannot take)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from conftest import ROOT, job_in_process, job_env

CMD = [sys.executable, "-m", "jobs.prepare", "--config", str(ROOT / "configs/tiny.yaml")]


def _kill_once_checkpointed(cwd: Path, extra: list[str], stage: str, log: Path) -> None:
    """Start the job, and kill -9 it (driver, Ray and workers) once `stage` has a complete checkpoint."""
    with open(log, "w") as out:
        job = subprocess.Popen([*CMD, *extra], cwd=cwd, env=job_env(checkpoint_pause=30), stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while not [p for p in (cwd / "cache/ray_train").glob(f"{stage}-*/step_*") if not p.name.endswith(".partial")]:
        assert job.poll() is None and time.time() < deadline, log.read_text()[-4000:]
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()


def test_prepare_writes_its_run_folder_and_reuses_the_cache(tiny_prepared, workers):
    first, run = tiny_prepared.output, tiny_prepared.run
    for stage in ("weak_base", "strong_base", "scored_pairs", "weak_aligned", "strong_ceiling"):
        assert f"{stage}: building" in first
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["models"]) == {"weak_base", "weak_aligned", "strong_base", "strong_ceiling"}
    report = (run / "report.md").read_text()
    assert "| model" in report and "strong_ceiling" in report and "plots/gold_reward.png" in report
    assert (run / "plots" / "gold_reward.png").stat().st_size > 1000
    assert (run / "config.yaml").is_file() and "| weak_base" in (run / "job.log").read_text()
    generations = pq.read_table(run / "examples" / "eval_generations.parquet")
    assert generations.num_rows == 16 and "strong_ceiling_response" in generations.column_names
    assert (run / "checkpoints" / "weak_aligned" / "model.safetensors").is_file()
    assert "| weak_base" in first  # the table is printed

    # all from the cache (on the tests' Ray and workers: a process of its own would add only its start-up)
    second = job_in_process("prepare", CMD[-1], tiny_prepared.cwd, workers, f"cache_dir={tiny_prepared.cache}")
    for stage in ("weak_base", "strong_base", "scored_pairs", "weak_aligned", "strong_ceiling"):
        assert f"{stage}: cached" in second
    assert "building" not in second
    assert json.loads((run / "metrics.json").read_text())["models"] == metrics["models"]


def test_prepare_killed_mid_training_continues_to_the_same_numbers(tiny_prepared, workers, tmp_path):
    """kill -9 once the strong ceiling's DPO has a checkpoint; the same job again reuses the models before it,
    resumes it from its checkpoint and ends with the numbers of the uninterrupted run. (The second run is the
    job's code on the tests' Ray and workers: a process of its own would add only its start-up.)"""
    shutil.copytree(tiny_prepared.cache, tmp_path / "cache",
                    ignore=lambda folder, names: [n for n in names if n.startswith(
                        ("strong_ceiling", ".strong_ceiling", "workers-"))])
    # a checkpoint after every step (it changes no number); the workers wait after it, and are killed there
    extra = ["cache_dir=cache", "align.checkpoint_every=1"]
    _kill_once_checkpointed(tmp_path, [arg for e in extra for arg in ("--set", e)], "strong_ceiling",
                            tmp_path / "killed.log")
    again = job_in_process("prepare", CMD[-1], tmp_path, workers, *extra)
    assert "weak_aligned: cached" in again and "strong_ceiling: building" in again, again[-3000:]
    [ceiling] = (tmp_path / "cache").glob("strong_ceiling-*/model/.train_summary.json")
    assert json.loads(ceiling.read_text())["resumed_from_step"] > 0  # it went on from the killed run's checkpoint
    uninterrupted = json.loads((tiny_prepared.run / "metrics.json").read_text())["models"]
    assert json.loads((tmp_path / "runs/tiny/metrics.json").read_text())["models"] == uninterrupted


def test_prepare_refuses_another_config_or_a_max_length_the_models_cannot_take(tiny_prepared):
    """The run folder belongs to its config: another is refused, one line and exit code 2, unless --overwrite;
    a value the models cannot take is refused before any work, on screen and in the run's job.log."""
    cwd = tiny_prepared.cwd
    refused = subprocess.run([*CMD, "--set", f"cache_dir={tiny_prepared.cache}", "--set", "align.lr=0.002"], cwd=cwd,
                             env=job_env(), capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "holds a run of another config" in refused.stderr and "--overwrite" in refused.stderr
    too_long = subprocess.run([*CMD, "--set", "run_name=too_long", "--set", "max_length=200"], cwd=cwd, env=job_env(),
                              capture_output=True, text=True)
    assert too_long.returncode == 2 and "Traceback" not in too_long.stderr, too_long.stderr[-3000:]
    line = "error: max_length 200 is more than weak.size can take (96 positions)"
    assert line in too_long.stderr and line in (cwd / "runs/too_long/job.log").read_text()
