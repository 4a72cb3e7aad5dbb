"""Run folders and the content-hash cache: one builder at a time, one config per run folder."""

import multiprocessing
import time

import pytest
from pydantic import BaseModel

from w2s.runs import Cache, RunDir, RunExistsError


def _build_slowly(root: str, log: str) -> str:
    def build(path):
        with open(log, "a") as f:
            f.write("start\n")
        time.sleep(1.0)  # long enough for the other job to arrive while this one builds
        (path / "model.bin").write_text("weights")
        with open(log, "a") as f:
            f.write("end\n")

    return str(Cache(root).build("model", "abc", build, log=lambda msg: None))


def test_two_jobs_on_one_cache_build_a_stage_once(tmp_path):
    """`make demo` and `make wspo` side by side: the second waits for the first and reuses its folder."""
    log = tmp_path / "builds.log"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        paths = pool.starmap(_build_slowly, [(str(tmp_path / "cache"), str(log))] * 2)
    assert paths[0] == paths[1]
    assert log.read_text() == "start\nend\n"  # one build, never two interleaved in one folder


class _Config(BaseModel):
    lr: float


def test_a_run_folder_belongs_to_one_config(tmp_path):
    run = RunDir(tmp_path, "run")
    run.claim(_Config(lr=0.1))
    run.claim(_Config(lr=0.1))  # the same config again continues
    (run.path / "metrics.json").write_text("{}")
    with pytest.raises(RunExistsError, match="holds a run of another config"):
        RunDir(tmp_path, "run").claim(_Config(lr=0.2))
    fresh = RunDir(tmp_path, "run", fresh=True)  # --overwrite
    fresh.claim(_Config(lr=0.2))
    assert not (fresh.path / "metrics.json").exists()


def test_cache_keys_follow_what_a_stage_makes_not_how_it_runs():
    """Checkpointing more often or logging less must not retrain a cached model (or refuse its checkpoints);
    any field that changes the model must."""
    from actors.trainer import TrainConfig
    from pipelines.prepare import PretrainStage
    from w2s.modeling import GPTSize
    from w2s.runs import content_hash

    def key(**fields) -> str:
        return content_hash("stage-v1", PretrainStage(size=GPTSize(n_layer=1, n_embd=16, n_head=1),
                                                      train=TrainConfig(mode="lm", **fields)))

    assert key() == key(checkpoint_every=1, log_every=1, max_failures=3)
    assert len({key(), key(lr=1e-3), key(num_workers=1), key(seed=1), key(epochs=2)}) == 5


def test_the_job_log_keeps_every_line_of_stages_printing_side_by_side(tmp_path, capsys):
    """MACPO's agents print from threads of their own: every line reaches the screen and job.log once and whole
    (a run's screen once showed one stage's line twice and lost another's)."""
    import threading

    from jobs.common import keep_log

    run = RunDir(tmp_path, "run")
    run.claim(_Config(lr=0.1))
    lines = {f"[macpo] agent{t}: line {i} " + "x" * (i % 50) for t in range(8) for i in range(200)}

    def say(t: int) -> None:
        for i in range(200):
            print(f"[macpo] agent{t}: line {i} " + "x" * (i % 50), flush=i % 3 == 0)

    with keep_log(run):
        threads = [threading.Thread(target=say, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print("no line end yet", end="")
    screen = capsys.readouterr().out.splitlines()
    assert sorted(screen) == sorted([*lines, "no line end yet"])
    assert sorted((run.path / "job.log").read_text().splitlines()) == sorted(screen)
