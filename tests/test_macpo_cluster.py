"""MACPO end to end on a two-node Ray cluster started on this machine (ray.cluster_utils):

- an uninterrupted run, whose stages must have used both nodes;
- a run killed for real twice, the driver during the student's initialisation (after its first
  checkpoint) and one training worker during a round, then the same command is run again: it must
  skip the finished stages, resume the killed one from its checkpoint, and end with the same numbers.
Both runs share the tests' cache of the tiny world, so it is prepared once; the killed run starts with the
uninterrupted run's finished teacher stages.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, job_env

JOB = [sys.executable, str(ROOT / "tests/scripts/two_node_job.py"), "jobs.macpo", "--config", "configs/tiny_macpo.yaml"]


def _command(root: Path, cache: Path, name: str, *extra: str) -> list[str]:
    # One round, and a student SFT long enough (12 steps, a checkpoint after each) to be killed half-way.
    student_sft = "{mode: sft, lr: 1.0e-3, epochs: 3, batch_size: 8, num_workers: 2, checkpoint_every: 1}"
    return [*JOB, "--set", f"run_name={name}", "--set", f"runs_dir={root / 'runs'}", "--set", f"cache_dir={cache}",
            "--set", "rounds=1", "--set", f"student_sft={student_sft}", *extra]


def _start(command: list[str], log: Path, checkpoint_pause: float = 0) -> subprocess.Popen:
    with open(log, "w") as out:  # its own process group: one killpg takes the driver and both nodes
        return subprocess.Popen(command, env=job_env(checkpoint_pause), cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(what: str, ready, process: subprocess.Popen, log: Path, timeout: float = 1200):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = ready()
        if found:
            return found
        assert process.poll() is None, f"the job ended before {what}:\n" + log.read_text()[-5000:]
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail(f"no {what} within {timeout}s:\n" + log.read_text()[-5000:])


def _finish(process: subprocess.Popen, log: Path, timeout: float = 1400) -> str:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # take the cluster down with it, not leave it running
        pytest.fail(f"the job took over {timeout}s:\n" + log.read_text()[-5000:])
    text = log.read_text()
    assert process.returncode == 0, text[-5000:]
    return text


def _macpo_numbers(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    return {"rounds": metrics["methods"]["macpo"]["rounds"], "naive_sft": metrics["methods"]["naive_sft"]}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("macpo_cluster")


@pytest.fixture(scope="module")
def uninterrupted(work, tiny_cache):
    log = work / "uninterrupted.log"
    _finish(_start(_command(work, tiny_cache, "uninterrupted"), log), log)
    return work / "runs" / "uninterrupted"


def test_macpo_runs_across_two_nodes(uninterrupted):
    metrics = json.loads((uninterrupted / "metrics.json").read_text())
    rounds = metrics["methods"]["macpo"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert all({"helpful", "harmless", "total", "pgr"} <= set(r["student"]) for r in rounds)
    assert [t["name"] for t in rounds[-1]["teachers"]] == ["weak_a", "weak_b"]
    assert "pgr" in metrics["methods"]["naive_sft"]

    nodes = metrics["methods"]["macpo"]["stage_nodes"]
    # the agents' model hosts are spread over both nodes...
    assert len(nodes["weak_labels"]) == 2 and len(nodes["round1_pairs"]) == 2, nodes
    # ...and so is every training stage: its 2 ZeRO-3 workers need the one CPU of each node
    # (a round-1 agent whose pairs were all set aside as chosen == rejected has no stage: tiny models)
    training = [stage for stage in nodes if stage.startswith(("init_", "round1_")) and stage != "round1_pairs"]
    assert {"init_weak_a", "init_weak_a_negative", "init_weak_b", "init_weak_b_negative", "init_student",
            "init_student_negative", "round1_student"} <= set(training), nodes
    assert all(len(nodes[stage]) == 2 for stage in training), nodes
    assert (uninterrupted / "examples" / "macpo_round1_pairs.parquet").is_file()
    assert "![rounds](plots/macpo_rounds.png)" in (uninterrupted / "report.md").read_text()
    assert (uninterrupted / "plots" / "macpo_rounds.png").stat().st_size > 10_000


def _train_workers(job: subprocess.Popen) -> list[psutil.Process]:
    """This job's Ray Train workers (its descendants), never those of another run on the machine."""
    found = []
    for p in psutil.Process(job.pid).children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def test_killed_macpo_resumes_to_the_same_numbers(uninterrupted, work, tiny_cache):
    import shutil

    run = work / "runs" / "killed"
    stages, checkpoints = run / "stages", run / "ray_train"
    # the teachers' stages, finished as the uninterrupted run left them (they are deterministic): the kill
    # lands in the student's initialisation without training them again
    for stage in ("init_weak_a", "init_weak_a_negative", "init_weak_b", "init_weak_b_negative", "weak_labels"):
        shutil.copytree(uninterrupted / "stages" / stage, stages / stage)

    # 1. kill the driver (and with it the whole two-node cluster) once the student's SFT has a checkpoint
    first_log = work / "killed_first.log"
    first = _start(_command(work, tiny_cache, "killed"), first_log, checkpoint_pause=30)  # killed in the pause
    # a complete checkpoint (a `.partial` one is never resumed from)
    _wait_for("a checkpoint of init_student",
              lambda: [p for p in (checkpoints / "init_student").glob("step_*") if not p.name.endswith(".partial")],
              first, first_log)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert (stages / "init_weak_a" / ".complete").is_file()
    assert not (stages / "init_student" / ".complete").is_file(), "the stage ended before the kill"

    # 2. resume, and kill one training worker while the first round trains
    second_log = work / "killed_second.log"
    second = _start(_command(work, tiny_cache, "killed"), second_log)
    victims = _wait_for("a round-1 training worker",
                        lambda: (checkpoints / "round1_student").is_dir() and _train_workers(second), second, second_log)
    victims[0].kill()
    text = _finish(second, second_log)

    assert "init_weak_a: cached" in text and "weak_labels: cached" in text  # finished stages are not redone
    assert "[train] resumed from step" in text  # init_student went on from its checkpoint
    assert "worker process has died" in text  # Ray Train saw the killed worker and restarted the group
    assert "round1_student: done" in text
    assert _macpo_numbers(run) == _macpo_numbers(uninterrupted)
