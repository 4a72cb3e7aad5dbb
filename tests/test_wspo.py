"""WSPO on the Ray backbone: the training table, the ZeRO-3 trainer (full and LoRA), tokenizer refusal."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from actors.trainer import LoraSettings, TrainConfig, train
from pipelines.score import TokenizerMismatchError
from pipelines.wspo import WSPOConfig, WSPOModels, run_wspo, training_table
from w2s.losses import wspo_loss
from w2s.modeling import ModelSpec, load_model, response_logprobs
from w2s.runs import RunDir
from w2s.world import World, WorldConfig

MAX_LENGTH = 96


def test_training_table_takes_the_asked_responses():
    scored = pa.table({"row": [0, 1], "prompt": ["p0", "p1"], "chosen": ["c0", "c1"], "rejected": ["r0", "r1"],
                       "weak_aligned_chosen_logps": [[-1.0], [-2.0]], "weak_aligned_rejected_logps": [[-3.0], [-4.0]],
                       "weak_base_chosen_logps": [[-5.0], [-6.0]], "weak_base_rejected_logps": [[-7.0], [-8.0]]})
    chosen = training_table(scored, "chosen")
    assert chosen.column_names == ["row", "prompt", "response", "side", "weak_aligned_logps", "weak_base_logps"]
    assert chosen["response"].to_pylist() == ["c0", "c1"] and chosen["weak_base_logps"].to_pylist() == [[-5.0], [-6.0]]
    rejected = training_table(scored, "rejected")
    assert rejected["response"].to_pylist() == ["r0", "r1"] and rejected["weak_aligned_logps"].to_pylist() == [[-3.0], [-4.0]]
    both = training_table(scored, "both")
    assert both["side"].to_pylist() == ["chosen", "chosen", "rejected", "rejected"]
    assert both["response"].to_pylist() == ["c0", "c1", "r0", "r1"] and both["row"].to_pylist() == [0, 1, 0, 1]


def _logps(path, rows) -> list[list[float]]:
    model, tokenizer = load_model(ModelSpec(path=str(path)))
    return response_logprobs(model, tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows], MAX_LENGTH)


def _wspo_data(checkpoints, out, n=32):
    """Gold chosen responses scored as the Ray Data stage would: weak aligned := the other checkpoint,
    so the weak log-ratio is large; the policy starts from (and is referenced to) the weak checkpoint."""
    rows = [{"prompt": r["prompt"], "response": r["chosen"]}
            for r in World(WorldConfig(n_entities=6, n_pair_prompts=n)).preference_pairs()]
    table = pa.Table.from_pylist(rows)
    base = _logps(checkpoints["weak"], rows)
    table = table.append_column("weak_aligned_logps", pa.array(_logps(checkpoints["strong"], rows)))
    table = table.append_column("weak_base_logps", pa.array(base)).append_column("strong_ref_logps", pa.array(base))
    pq.write_table(table, out)
    return out


def _mean_loss(policy, data, gamma) -> float:
    rows = pq.read_table(data).to_pylist()
    policy_logps = _logps(policy, rows)
    losses = [wspo_loss(torch.tensor([p]), torch.tensor([r["strong_ref_logps"]]), torch.tensor([r["weak_aligned_logps"]]),
                        torch.tensor([r["weak_base_logps"]]), torch.ones(1, len(p)), gamma).item()
              for p, r in zip(policy_logps, rows)]
    return sum(losses) / len(losses)


def test_wspo_trainer_full_and_lora_reduce_the_loss(ray_local, checkpoints, tmp_path):
    data = _wspo_data(checkpoints, tmp_path / "train.parquet")
    gamma = 1.0  # the target is then reachable: policy log-probs -> the other checkpoint's
    before = _mean_loss(checkpoints["weak"], data, gamma)
    assert before > 0.1

    full = TrainConfig(mode="wspo", gamma=gamma, lr=1e-2, epochs=4, batch_size=8, num_workers=2, log_every=4)
    summary = train(full, checkpoints["weak"], data, tmp_path / "full", "wspo-full", tmp_path / "storage",
                    reference="strong_ref")
    assert summary["world_size"] == 2 and summary["steps"] == 4 * (32 // 16)
    assert summary["last"]["weak_log_ratio"] != 0 and "strong_log_ratio" in summary["last"]
    after_full = _mean_loss(tmp_path / "full", data, gamma)
    assert after_full < 0.7 * before, (before, after_full)

    # LoRA: no strong reference column needed (the adapter-disabled policy is the reference)
    lora_data = tmp_path / "lora.parquet"
    pq.write_table(pq.read_table(data).drop_columns(["strong_ref_logps"]), lora_data)
    with pytest.raises(ValueError, match=r"missing \['strong_ref_logps'\]"):
        train(full, checkpoints["weak"], lora_data, tmp_path / "x", "x", tmp_path / "storage", reference="strong_ref")
    lora = full.model_copy(update={"lora": LoraSettings(r=4, alpha=8, target_modules=["c_attn"]), "lr": 3e-2})
    train(lora, checkpoints["weak"], lora_data, tmp_path / "lora", "wspo-lora", tmp_path / "storage", reference="strong_ref")
    assert (tmp_path / "lora" / "lora_adapter" / "adapter_config.json").is_file()
    after_lora = _mean_loss(tmp_path / "lora", data, gamma)
    assert after_lora < 0.9 * before, (before, after_lora)
    # merged: attention projections changed, every other weight is the base's
    init, merged = load_file(checkpoints["weak"] / "model.safetensors"), load_file(tmp_path / "lora" / "model.safetensors")
    assert set(merged) == set(init)
    changed = {k for k in init if not torch.equal(init[k], merged[k])}
    assert changed and all("c_attn" in k for k in changed), changed


def test_wspo_refuses_mismatched_tokenizers_before_scoring(checkpoints, mismatched_checkpoint, tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "q: zorb color?\na:", "chosen": " red.", "rejected": " blue."}) + "\n")
    config = WSPOConfig(prepare=None, data=str(data), cache_dir=str(tmp_path / "cache"),
                        models=WSPOModels(weak_aligned=ModelSpec(path=str(checkpoints["weak"])),
                                          weak_base=ModelSpec(path=str(checkpoints["weak"])),
                                          strong=ModelSpec(path=str(mismatched_checkpoint))))
    with pytest.raises(TokenizerMismatchError, match="models 'weak_aligned' and 'strong' tokenize"):
        run_wspo(config, RunDir(tmp_path / "runs", "wspo"))
    assert not (tmp_path / "cache").exists()  # nothing was scored


def test_wspo_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="either `prepare`"):
        WSPOConfig(prepare=None)
    with pytest.raises(ValueError, match="train.mode must be 'wspo'"):
        WSPOConfig(train=TrainConfig(mode="dpo"))
    with pytest.raises(ValueError, match="every gamma must be > 0"):
        WSPOConfig(gamma_sweep=[0.1, 0.0])
    assert WSPOConfig(train=TrainConfig(mode="wspo", gamma=0.2), gamma_sweep=[0.5, 0.2, 0.05]).gammas() == [0.2, 0.05, 0.5]
