"""The Ray Train + DeepSpeed ZeRO-3 trainer: real workers (gloo on CPU), DPO, what it refuses before they start.

(A training stage killed -9 and resumed from its checkpoint: tests/test_prepare_job.py and test_wspo.py; a
training worker killed and restarted by Ray Train: test_macpo_cluster.py.)
"""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from actors.trainer import TrainConfig, train
from w2s.modeling import ModelLoadError, ModelSpec, load_model, response_logprobs
from w2s.world import World, WorldConfig

ROOT = Path(__file__).resolve().parents[1]



def _scored_pairs(model_path, out: Path, n: int = 48) -> Path:
    """Gold pairs with the reference's per-token log-probs, as the scoring stage writes them."""
    rows = World(WorldConfig(n_entities=6, n_pair_prompts=n)).preference_pairs()
    model, tokenizer = load_model(ModelSpec(path=str(model_path)))
    prompts = [r["prompt"] for r in rows]
    chosen = response_logprobs(model, tokenizer, prompts, [r["chosen"] for r in rows], 96)
    rejected = response_logprobs(model, tokenizer, prompts, [r["rejected"] for r in rows], 96)
    table = pa.Table.from_pylist(rows).append_column("base_chosen_logps", pa.array(chosen)).append_column(
        "base_rejected_logps", pa.array(rejected))
    pq.write_table(table, out)
    return out


def _margins(model_path, data: Path) -> list[float]:
    """Implicit DPO reward margin of each pair: chosen log-ratio minus rejected log-ratio."""
    rows = pq.read_table(data).to_pylist()
    model, tokenizer = load_model(ModelSpec(path=str(model_path)))
    prompts = [r["prompt"] for r in rows]
    chosen = response_logprobs(model, tokenizer, prompts, [r["chosen"] for r in rows], 96)
    rejected = response_logprobs(model, tokenizer, prompts, [r["rejected"] for r in rows], 96)
    return [(sum(c) - sum(r["base_chosen_logps"])) - (sum(j) - sum(r["base_rejected_logps"]))
            for c, j, r in zip(chosen, rejected, rows)]


def test_dpo_with_sft_term_on_two_zero3_workers(workers, checkpoints, tmp_path):
    data = _scored_pairs(checkpoints["weak"], tmp_path / "pairs.parquet")
    # micro-batches of 4 rows, 2 per optimizer step: each step still trains 2 workers x 8 rows
    config = TrainConfig(mode="dpo", beta=0.1, sft_weight=0.2, lr=1e-2, epochs=4, batch_size=4,
                         gradient_accumulation_steps=2, num_workers=2, checkpoint_every=5, log_every=5)
    summary = workers.train(config, checkpoints["weak"], data, tmp_path / "aligned", "dpo-test", tmp_path / "storage",
                            96, tensorboard_dir=tmp_path / "tb", reference="base")
    assert summary["world_size"] == 2 and summary["steps"] == 4 * (48 // 16)
    assert summary["optimizer_steps"] == summary["steps"]  # DeepSpeed stepped once per 2 micro-batches
    assert summary["torch_threads"] == 1  # one reserved CPU per worker: one thread, on any machine
    memory = summary["worker_memory_gb"]  # each worker's peak during the stage and what it holds after
    assert len(memory) == 2 and all(0 < m["after"] <= m["peak"] for m in memory)
    assert (tmp_path / "aligned" / "model.safetensors").is_file()  # gathered from the ZeRO-3 shards
    assert (tmp_path / "aligned" / ".trained_by_w2s").is_file()
    margins = _margins(tmp_path / "aligned", data)
    assert sum(m > 0 for m in margins) / len(margins) > 0.8  # the policy now prefers the chosen responses
    assert list((tmp_path / "tb").iterdir())  # TensorBoard events written

    assert not list((tmp_path / "storage" / "dpo-test").glob("step_*"))  # the model is out: no checkpoint kept

    # stopped after the model was written, before it was taken: the same call again trains nothing
    (tmp_path / "aligned").rename(tmp_path / "again.partial")
    again = workers.train(config, checkpoints["weak"], data, tmp_path / "again", "dpo-test", tmp_path / "storage", 96,
                          reference="base")
    assert again["seconds"] == summary["seconds"]  # the written model's own summary: no step was run again
    assert (tmp_path / "again" / "model.safetensors").is_file() and not (tmp_path / "again.partial").exists()


def test_every_row_is_trained_on_each_epoch_and_the_repeats_are_counted():
    """The step stream of all ranks against data_use's counts: 250 rows in steps of 2 x 8 used to lose 10 an epoch."""
    from actors.trainer import _batches, data_use

    rows = list(range(250))
    for epochs in (1.0, 2.0, 0.5):
        config = TrainConfig(mode="sft", epochs=epochs, batch_size=8, num_workers=2)
        fed = [rows[i] for rank in range(2) for _, _, batch in _batches(len(rows), config, rank, 2) for i in batch]
        use = data_use(len(rows), config, 2)
        assert len(fed) == use["rows_fed"]
        assert len(rows) - len(set(fed)) == use["rows_unused"]
        assert len(fed) - len(set(fed)) * (1 if epochs < 1 else int(epochs)) == use["rows_repeated"]
        if epochs >= 1:
            assert set(fed) == set(range(250))  # nothing left out
    # with gradient accumulation a step's rows are its micro-batches': still every row once an epoch
    config = TrainConfig(mode="sft", epochs=1.0, batch_size=4, gradient_accumulation_steps=3, num_workers=2)
    steps = [sorted(i for rank in range(2) for i in list(_batches(250, config, rank, 2))[s][2]) for s in range(11)]
    assert [len(set(rows)) for rows in steps] == [24] * 11 and set().union(*steps) == set(range(250))
    # a resumed stream goes on exactly where the uninterrupted one was
    config = TrainConfig(mode="sft", epochs=2.0, batch_size=8, num_workers=2)
    assert list(_batches(250, config, 1, 2, start_step=20)) == list(_batches(250, config, 1, 2))[20:]


def test_a_row_too_long_or_a_reference_of_another_length_is_refused(checkpoints, tmp_path):
    from actors.trainer import _per_token
    from w2s.modeling import TooLongError

    pq.write_table(pa.table({"prompt": ["q: a?"], "response": [" " + "x" * 100]}), tmp_path / "long.parquet")
    with pytest.raises(TooLongError, match=r"long\.parquet: row 0 field 'response': 107 tokens .* > max_length 96"):
        train(TrainConfig(mode="sft"), checkpoints["weak"], tmp_path / "long.parquet", tmp_path / "o", "n", tmp_path, 96)
    mask = torch.tensor([[False, True, True], [False, False, True]])
    with pytest.raises(ValueError, match="ref_chosen_logps: 1 stored log-probs for a response of 2 tokens"):
        _per_token(pa.array([[-1.0], [-2.0]], pa.list_(pa.float32())), mask, "ref_chosen_logps")
    placed = _per_token(pa.array([[-1.0, -2.0], [-3.0]], pa.list_(pa.float32())), mask, "ok")
    assert placed.tolist() == [[0.0, -1.0, -2.0], [0.0, 0.0, -3.0]]  # each value on its response position


def test_checkpoints_of_another_run_are_not_resumed_from(checkpoints, tmp_path):
    """Checkpoints under a stage's name carry the fingerprint of its config, model and data."""
    from actors.trainer import FINGERPRINT, CheckpointMismatchError

    pq.write_table(pa.table({"text": ["q: a?\na: red."] * 4}), tmp_path / "corpus.parquet")
    (tmp_path / "storage" / "stage").mkdir(parents=True)
    (tmp_path / "storage" / "stage" / FINGERPRINT).write_text("a run of another config")
    with pytest.raises(CheckpointMismatchError, match="storage/stage holds checkpoints of another config"):
        train(TrainConfig(mode="lm"), checkpoints["weak"], tmp_path / "corpus.parquet", tmp_path / "out", "stage",
              tmp_path / "storage", 96)


def test_bad_inputs_fail_before_workers_start(checkpoints, tmp_path):
    pq.write_table(pa.table({"prompt": ["a"], "chosen": ["b"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"x\.parquet: mode 'dpo' needs columns .* missing \['rejected', 'ref_chosen_logps', 'ref_rejected_logps'\]"):
        train(TrainConfig(mode="dpo"), checkpoints["weak"], tmp_path / "x.parquet", tmp_path / "o", "n", tmp_path, 96)
    with pytest.raises(ModelLoadError, match="does not exist"):
        train(TrainConfig(mode="lm"), tmp_path / "no-model", tmp_path / "x.parquet", tmp_path / "o", "n", tmp_path, 96)
    mine = tmp_path / "my_models"  # a user's folder: never replaced by a trained model
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"my_models exists and was not written by train\(\)"):
        train(TrainConfig(mode="lm"), checkpoints["weak"], tmp_path / "x.parquet", mine, "n", tmp_path, 96)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_workers_the_cluster_cannot_give_stop_the_stage_with_a_clear_error(ray_local, checkpoints, tmp_path):
    """An autoscaling cluster that never starts the node type a config asks for: the stage waits `wait_s`,
    then one message names what was asked for, instead of Ray Train waiting for ever."""
    from actors.resources import ResourcesUnavailableError, TrainResources
    from actors.trainer import TrainingWorkers

    pq.write_table(pa.table({"text": ["a b c"] * 4}), tmp_path / "lm.parquet")
    asks = TrainResources(accelerator_type="H100")
    with TrainingWorkers(tmp_path / "storage", asks, wait_s=2) as workers:
        with pytest.raises(ResourcesUnavailableError, match=r"training workers: 2 x \{'CPU': 1.0, "
                           r"'accelerator_type:H100': 0.001\} asked for, not provided within 2s"):
            workers.train(TrainConfig(mode="lm", num_workers=2), checkpoints["weak"], tmp_path / "lm.parquet",
                          tmp_path / "out", "lm", tmp_path / "stages", 96)
    assert not (tmp_path / "out").exists()


def test_a_lora_stage_is_saved_as_the_base_from_disk_with_its_trained_adapter_merged(checkpoints, tmp_path):
    """The final save of a LoRA stage takes only the adapter's weights from the workers and reads the base from
    disk: the merged model is base + scale * B A on each adapted weight, and the adapter alone is kept beside it;
    an adapter that is not the one the settings build is refused."""
    from actors.trainer import LoraSettings, _add_lora, _save_merged_lora
    from transformers import AutoModelForCausalLM

    lora = LoraSettings(r=2, alpha=4)
    trained = _add_lora(AutoModelForCausalLM.from_pretrained(checkpoints["strong"]), lora)
    adapter = {name: torch.randn_like(p) for name, p in trained.named_parameters() if p.requires_grad}
    _save_merged_lora(str(checkpoints["strong"]), lora, adapter, str(tmp_path / "merged"), False)

    base = AutoModelForCausalLM.from_pretrained(checkpoints["strong"]).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    name = "transformer.h.0.attn.c_attn.weight"  # GPT-2's Conv1D: the update is (B A) transposed
    a, b = (adapter[f"base_model.model.{name.removesuffix('.weight')}.lora_{x}.default.weight"] for x in "AB")
    assert torch.allclose(merged[name], base[name] + (lora.alpha / lora.r) * (b @ a).T, atol=1e-6)
    assert (tmp_path / "merged" / "lora_adapter" / "adapter_model.safetensors").is_file()
    with pytest.raises(RuntimeError, match="do not match the adapter"):
        _save_merged_lora(str(checkpoints["strong"]), LoraSettings(r=2, alpha=4, target_modules=["c_proj"]), adapter,
                          str(tmp_path / "other"), False)


def test_a_finished_stage_leaves_no_engine_or_optimizer_in_its_worker(checkpoints, tmp_path):
    """A training worker lives for the whole job: what one stage leaves alive, every later stage adds to (DeepSpeed's
    cache of which parameters to release kept each stage's model, engine and optimizer: 1.3 GB per SmolLM2 stage)."""
    data = _scored_pairs(checkpoints["weak"], tmp_path / "pairs.parquet", n=16)
    done = subprocess.run([sys.executable, str(ROOT / "tests/scripts/stage_memory.py"), str(checkpoints["weak"]),
                           str(data), "base", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    after = json.loads(done.stdout.strip().splitlines()[-1])
    assert after == [{"engines": 0, "optimizers": 0}] * 2
    assert all((tmp_path / "out" / f"model{i}.partial" / "model.safetensors").is_file() for i in range(2))  # written
