"""Shared fixtures: a real local Ray cluster and tiny real checkpoints saved by the tests."""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",  # Ray Train polls its state API
             log_to_driver=True)  # never a cluster already running here
    yield ray
    ray.shutdown()


ROOT = Path(__file__).resolve().parents[1]


def job_env(checkpoint_pause: float = 0) -> dict:
    """The environment a job started by a test runs in: this checkout, and its own local Ray.
    `checkpoint_pause`: seconds its training workers wait after each checkpoint (to be killed there)."""
    from actors.trainer import CHECKPOINT_PAUSE

    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
           CHECKPOINT_PAUSE: str(checkpoint_pause)}
    env.pop("RAY_ADDRESS", None)
    return env


@dataclass
class TinyPrepared:
    cache: Path  # the content-hash cache every method job's test shares
    cwd: Path  # where the job ran (its relative runs/ folder is here)
    output: str  # what it printed
    run: Path  # its run folder


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> TinyPrepared:
    """`python -m jobs.prepare` on the tiny world, as a user runs it from another working directory, into the
    cache the method jobs' tests share: the tiny world is prepared once for all of them."""
    cwd = tmp_path_factory.mktemp("tiny_prepare")
    cache = cwd / "cache"
    done = subprocess.run([sys.executable, "-m", "jobs.prepare", "--config", str(ROOT / "configs/tiny.yaml"),
                           "--set", f"cache_dir={cache}"], cwd=cwd, env=job_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return TinyPrepared(cache, cwd, done.stdout + done.stderr, cwd / "runs" / "tiny")


@pytest.fixture(scope="session")
def tiny_cache(tiny_prepared) -> Path:
    return tiny_prepared.cache


@pytest.fixture(scope="session")
def workers(ray_local, tmp_path_factory):
    """One set of model hosts and training workers shared by the in-process tests, as a job shares its own."""
    from actors.workers import Workers

    with Workers(tmp_path_factory.mktemp("workers")) as shared:
        yield shared


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Two tiny GPT-2 checkpoints of different seeds sharing the world tokenizer."""
    from w2s.modeling import GPTSize, init_gpt2
    from w2s.world import build_tokenizer

    root = tmp_path_factory.mktemp("ckpt")
    tokenizer = build_tokenizer()
    return {
        "weak": init_gpt2(GPTSize(n_layer=1, n_embd=16, n_head=1), tokenizer, root / "weak", seed=1),
        "strong": init_gpt2(GPTSize(n_layer=2, n_embd=32, n_head=2), tokenizer, root / "strong", seed=2),
    }


@pytest.fixture(scope="session")
def mismatched_checkpoint(checkpoints, tmp_path_factory):
    """The strong checkpoint with 'q' and 'z' swapped in its tokenizer: same vocabulary, other ids."""
    import json
    import shutil

    other = tmp_path_factory.mktemp("mismatch") / "strong"
    shutil.copytree(checkpoints["strong"], other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["q"], vocab["z"] = vocab["z"], vocab["q"]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    return other
