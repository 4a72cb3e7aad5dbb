"""MACPO end to end on multi-node Ray clusters started on this machine with Ray's own tools:

- an uninterrupted run submitted with `ray job submit` to an autoscaling cluster (Ray's fake multi-node
  provider, tests/ray_heads.py): the head has no room for the job's workers, and two worker node types
  scale from zero, one for model hosts and one for training workers (custom resources stand in for the GPUs
  of cluster.yaml's node types). The autoscaler must add nodes of both types, the stages must run on them,
  and the idle nodes must be removed after the job;
- a run killed for real twice: first the whole job, driver and fixed two-node cluster
  (ray.cluster_utils.Cluster), during a round's DPO (after its first checkpoint); then the same job runs again
  (on the tests' own Ray and workers) and one of its training workers is killed once the killed stage has
  resumed. It must skip the finished stages, resume the killed one from its checkpoint, and end with the same
  numbers as the autoscaled run.
Both runs share the tests' cache of the tiny world, so it is prepared once; the killed run starts with the
uninterrupted run's finished stages before round 1's training (they are deterministic: the numbers of the
round-0 models are evaluated again and must agree too), so the kills land where the resume is tested.
"""

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, job_env, job_in_process
from ray_heads import RAY, local_head, run

JOB = [sys.executable, str(ROOT / "tests/scripts/two_node_job.py"), "jobs.macpo", "--config", "configs/tiny_macpo.yaml"]


def _overrides(root: Path, cache: Path, name: str) -> list[str]:
    # One round, its DPO stages long enough (3 steps, a checkpoint after each but the last) to be killed half-way,
    # and a student SFT long enough that the student's round-1 pairs are not all set aside (chosen == rejected).
    student_sft = "{mode: sft, lr: 1.0e-3, epochs: 3, batch_size: 8, num_workers: 2}"
    return ["--set", f"run_name={name}", "--set", f"runs_dir={root / 'runs'}", "--set", f"cache_dir={cache}",
            "--set", "rounds=1", "--set", f"student_sft={student_sft}", "--set", "dpo.epochs=3",
            "--set", "dpo.checkpoint_every=1"]


def _command(root: Path, cache: Path, name: str) -> list[str]:
    return [*JOB, *_overrides(root, cache, name)]


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


def _macpo_numbers(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    return {"rounds": metrics["methods"]["macpo"]["rounds"], "naive_sft": metrics["methods"]["naive_sft"]}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("macpo_cluster")


# Worker node types of the autoscaling cluster, like cluster.yaml's GPU types: `host_slot` and `train_slot`
# stand in for their GPUs, one model host or one training worker per node.
NODE_TYPES = {"host_node": {"resources": {"CPU": 1, "host_slot": 1}, "max_workers": 4},
              "train_node": {"resources": {"CPU": 1, "train_slot": 1}, "max_workers": 2}}
ASKS = ["--set", "cluster.hosts.resources={host_slot: 1}", "--set", "cluster.train.resources={train_slot: 1}"]


def _alive_nodes(head) -> list[dict]:
    out = run([RAY, "list", "nodes", f"--address={head.url}", "--filter", "state=ALIVE", "--format", "json"],
              head.env, 60)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def _events(log: str) -> list[str]:
    """The autoscaler's own account: `Adding 2 node(s) of type train_node.`, `Removing ... (idle).`"""
    return [line.split(":event_summary:")[1] for line in log.splitlines()
            if ":event_summary:" in line and ("Adding" in line or "Removing" in line)]


@pytest.fixture(scope="module")
def autoscaled(work, tiny_cache):
    """The uninterrupted run, submitted to the autoscaling cluster: (run folder, autoscaler events, nodes
    alive at the end)."""
    with local_head(work / "home", num_cpus=0, node_types=NODE_TYPES) as head:
        # No --working-dir here (users pass one): the fake provider's nodes share one session folder, and each
        # node unpacking the job's package into it would delete the one another node's workers run in.
        job = shlex.join(["python", "-m", "jobs.macpo", "--config", "configs/tiny_macpo.yaml",
                          *_overrides(work, tiny_cache, "uninterrupted"), *ASKS])
        submit = [RAY, "job", "submit", f"--address={head.url}",
                  "--runtime-env-json", json.dumps({"env_vars": {"PYTHONPATH": str(ROOT)}}), "--", "bash", "-c",
                  f"cd {ROOT} && {job}"]
        done = run(submit, head.env, 1400)
        (work / "uninterrupted.log").write_text(done.stdout + done.stderr)
        assert done.returncode == 0 and "succeeded" in done.stdout, (done.stdout + done.stderr)[-5000:]
        deadline = time.time() + 120  # idle nodes go after the config's idle timeout (15 s)
        while len(alive := _alive_nodes(head)) > 1 and time.time() < deadline:
            time.sleep(3)
        events = _events(head.autoscaler_log())
    (work / "autoscaler_events.txt").write_text("\n".join(events))
    return work / "runs" / "uninterrupted", events, alive


@pytest.fixture(scope="module")
def uninterrupted(autoscaled):
    return autoscaled[0]


def test_autoscaler_starts_nodes_for_hosts_and_training_and_removes_them(autoscaled):
    run_folder, events, alive = autoscaled
    for node_type in NODE_TYPES:
        assert any(e.startswith("Adding") and f"of type {node_type}" in e for e in events), events
        assert any(e.startswith("Removing") and f"of type {node_type} (idle)" in e for e in events), events
    assert len(alive) == 1 and alive[0]["is_head_node"], alive  # every worker node removed once idle
    # every stage ran on nodes the autoscaler started (the fake provider's node ids), never on the head
    nodes = json.loads((run_folder / "metrics.json").read_text())["methods"]["macpo"]["stage_nodes"]
    used = {node for stage in nodes.values() for node in stage}
    assert used and alive[0]["node_id"] not in used, nodes


def test_macpo_runs_across_two_nodes(uninterrupted):
    metrics = json.loads((uninterrupted / "metrics.json").read_text())
    rounds = metrics["methods"]["macpo"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert all({"helpful", "harmless", "total", "pgr"} <= set(r["student"]) for r in rounds)
    assert [t["name"] for t in rounds[-1]["teachers"]] == ["weak_a", "weak_b"]
    assert "pgr" in metrics["methods"]["naive_sft"] and "pgr" in metrics["methods"]["confident_sft"]
    # the confident-loss baseline trained with its loss: the weight warmed up to 0.5 by the last step
    last = json.loads((uninterrupted / "stages/confident_sft/train_summary.json").read_text())["last"]
    assert last["aux_weight"] == 0.5 and 0 <= last["label_is_own_argmax"] <= 1, last
    assert metrics["methods"]["confident_sft"]["label_is_own_argmax"] == last["label_is_own_argmax"]
    assert "the student's own argmax on" in (uninterrupted / "report.md").read_text()

    nodes = metrics["methods"]["macpo"]["stage_nodes"]
    # every model host on a node of its own (a host node has one host_slot): the 4 weak-label generators, and
    # the round's student and 2 teachers...
    assert len(nodes["weak_labels"]) == 4 and len(nodes["round1_pairs"]) == 3, nodes
    # ...and every training stage on two nodes: its 2 ZeRO-3 workers need the one train_slot of each
    # (a round-1 agent whose pairs were all set aside as chosen == rejected has no stage: tiny models)
    training = [stage for stage in nodes if stage.startswith(("init_", "round1_", "confident_sft"))
                and stage != "round1_pairs"]
    assert {"init_weak_a", "init_weak_a_negative", "init_weak_b", "init_weak_b_negative", "init_student",
            "init_student_negative", "round1_student", "confident_sft"} <= set(training), nodes
    assert all(len(nodes[stage]) == 2 for stage in training), nodes
    assert (uninterrupted / "examples" / "macpo_round1_pairs.parquet").is_file()
    assert "![rounds](plots/macpo_rounds.png)" in (uninterrupted / "report.md").read_text()
    assert (uninterrupted / "plots" / "macpo_rounds.png").stat().st_size > 10_000


def _train_workers() -> list[psutil.Process]:
    """The Ray Train workers of the tests' own Ray (this process's descendants), never another run's."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


BEFORE_ROUND1_TRAINING = ("init_weak_a", "init_weak_a_negative", "init_weak_b", "init_weak_b_negative", "weak_labels",
                          "init_student", "init_student_negative", "round1_pairs")


def test_killed_macpo_resumes_to_the_same_numbers(uninterrupted, work, tiny_cache, workers):
    import shutil

    run = work / "runs" / "killed"
    stages, checkpoints = run / "stages", run / "ray_train"
    # the stages before round 1's training, finished as the uninterrupted run left them
    for stage in BEFORE_ROUND1_TRAINING:
        shutil.copytree(uninterrupted / "stages" / stage, stages / stage)

    # 1. kill the driver (and with it the whole two-node cluster) once a round-1 DPO stage has a checkpoint
    shared = sorted(p.pid for p in _train_workers())  # the tests' own training workers, alive all along
    first_log = work / "killed_first.log"
    first = _start(_command(work, tiny_cache, "killed"), first_log, checkpoint_pause=30)  # killed in the pause
    # a complete checkpoint (a `.partial` one is never resumed from)
    killed_in = _wait_for("a checkpoint of a round-1 stage",
                          lambda: [p.parent.name for p in checkpoints.glob("round1_*/step_*")
                                   if not p.name.endswith(".partial")], first, first_log)[0]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (stages / killed_in / ".complete").is_file(), "the stage ended before the kill"
    # another Ray on the machine (that cluster, with its dashboard) did not tear down this one's worker group
    # (jobs.common._own_state_api: Ray Train's cleaner once asked the newest cluster for its controller)
    assert shared and sorted(p.pid for p in _train_workers()) == shared

    # 2. the same job again, on the tests' Ray and workers (a process of its own would add only its start-up): it
    # resumes; one training worker is killed once the killed stage has resumed from its checkpoint
    screen = io.StringIO()
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(job_in_process, "macpo", "configs/tiny_macpo.yaml", ROOT, workers,
                             *_overrides(work, tiny_cache, "killed")[1::2], screen=screen)
        deadline = time.time() + 600
        while not ("[train] resumed from step" in screen.getvalue() and (victims := _train_workers())):
            assert not second.done() and time.time() < deadline, screen.getvalue()[-5000:]
            time.sleep(0.5)
        victims[0].kill()
        text = second.result(timeout=900)

    assert all(f"{stage}: cached" in text for stage in BEFORE_ROUND1_TRAINING)  # finished stages are not redone
    assert "[train] resumed from step" in text  # the killed stage went on from its checkpoint
    assert "worker process has died" in text  # Ray Train saw the killed worker and restarted the group
    assert all(f"{stage}: done" in text for stage in ("round1_student", "round1_weak_a", "round1_weak_b"))
    assert _macpo_numbers(run) == _macpo_numbers(uninterrupted)
