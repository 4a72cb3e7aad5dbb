"""Shared fixtures: a real local Ray cluster and tiny real checkpoints saved by the tests."""

import os

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)  # never a cluster already running here
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A content-hash cache shared by the method jobs' tests: the tiny world is prepared once for all."""
    return tmp_path_factory.mktemp("tiny_cache")


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
