"""WSPO on the Ray backbone: the training table, the ZeRO-3 trainer (full and LoRA), tokenizer refusal."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from actors.trainer import LoraSettings, TrainConfig, train
from pipelines.wspo import WSPOConfig, WSPOModels, run_wspo, training_table
from w2s.losses import wspo_loss
from w2s.modeling import ModelSpec, TokenizerMismatchError, load_model, response_logprobs
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


def _wspo_data(checkpoint, out, weak_ratio, n=32):
    """Gold chosen responses scored as the Ray Data stage would, with a weak aligned-vs-base log-ratio
    of `weak_ratio` on every token; the policy starts from (and is referenced to) `checkpoint`."""
    rows = [{"prompt": r["prompt"], "response": r["chosen"]}
            for r in World(WorldConfig(n_entities=6, n_pair_prompts=n)).preference_pairs()]
    ref = _logps(checkpoint, rows)
    weak_base = [[-2.0] * len(r) for r in ref]
    table = pa.Table.from_pylist(rows).append_column("strong_ref_logps", pa.array(ref))
    table = table.append_column("weak_aligned_logps", pa.array([[v + weak_ratio for v in r] for r in weak_base]))
    pq.write_table(table.append_column("weak_base_logps", pa.array(weak_base)), out)
    return out


def _loss_and_ratio(policy, data, gamma) -> tuple[float, float]:
    """Mean WSPO loss over the rows and the mean per-token log-ratio policy / reference."""
    rows = pq.read_table(data).to_pylist()
    losses, ratios = [], []
    for p, r in zip(_logps(policy, rows), rows):
        p, ref = torch.tensor([p]), torch.tensor([r["strong_ref_logps"]])
        losses.append(wspo_loss(p, ref, torch.tensor([r["weak_aligned_logps"]]), torch.tensor([r["weak_base_logps"]]),
                                torch.ones_like(p), gamma).item())
        ratios.append((p - ref).mean().item())
    return sum(losses) / len(losses), sum(ratios) / len(ratios)


def test_wspo_trainer_full_and_lora_amplify_the_weak_ratio(workers, checkpoints, tmp_path):
    gamma, weak_ratio = 0.5, 0.25  # target: the policy's log-ratio -> 0.25 / 0.5 = 0.5 nat per token
    data = _wspo_data(checkpoints["weak"], tmp_path / "train.parquet", weak_ratio)
    before, ratio = _loss_and_ratio(checkpoints["weak"], data, gamma)
    assert before == pytest.approx(weak_ratio**2) and ratio == pytest.approx(0.0, abs=1e-5)

    full = TrainConfig(mode="wspo", gamma=gamma, lr=1e-2, epochs=4, batch_size=8, num_workers=2, log_every=4)
    summary = workers.train(full, checkpoints["weak"], data, tmp_path / "full", "wspo-full", tmp_path / "storage", 96,
                            reference="strong_ref")
    assert summary["world_size"] == 2 and summary["steps"] == 4 * (32 // 16)
    assert summary["last"]["weak_log_ratio"] == pytest.approx(weak_ratio, abs=1e-5)
    assert summary["last"]["amplification"] > 0  # the slope of policy on weak log-ratio, 1/gamma = 2 at the optimum
    after, ratio = _loss_and_ratio(tmp_path / "full", data, gamma)
    assert after < 0.5 * before and ratio > 0.2, (before, after, ratio)

    # LoRA: no strong reference column needed (the adapter-disabled policy is the reference)
    lora_data = tmp_path / "lora.parquet"
    pq.write_table(pq.read_table(data).drop_columns(["strong_ref_logps"]), lora_data)
    with pytest.raises(ValueError, match=r"missing \['strong_ref_logps'\]"):
        train(full, checkpoints["weak"], lora_data, tmp_path / "x", "x", tmp_path / "storage", 96,
              reference="strong_ref")
    lora = full.model_copy(update={"lora": LoraSettings(r=4, alpha=8, target_modules=["c_attn", "c_fc"]),
                                   "lr": 5e-2, "epochs": 8})
    workers.train(lora, checkpoints["weak"], lora_data, tmp_path / "lora", "wspo-lora", tmp_path / "storage", 96,
                  reference="strong_ref")
    assert (tmp_path / "lora" / "lora_adapter" / "adapter_config.json").is_file()
    after, ratio = _loss_and_ratio(tmp_path / "lora", data, gamma)
    assert after < 0.8 * before and ratio > 0.1, (before, after, ratio)
    # merged: the adapted projections changed, every other weight is the base's
    init, merged = load_file(checkpoints["weak"] / "model.safetensors"), load_file(tmp_path / "lora" / "model.safetensors")
    assert set(merged) == set(init)
    changed = {k for k in init if not torch.equal(init[k], merged[k])}
    assert changed and all(".c_attn." in k or ".c_fc." in k for k in changed), changed


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


def test_wspo_on_your_own_models_keeps_them_in_the_run_folder(workers, checkpoints, tmp_path):
    """Trained from a user's checkpoints, the model is copied into the run folder: `make clean` (the cache)
    does not take it. The same config again reuses the cache; another max_length than the models take is refused."""
    import shutil

    from w2s.modeling import ModelLoadError

    data = tmp_path / "prefs.jsonl"
    rows = World(WorldConfig(n_entities=6, n_pair_prompts=32)).preference_pairs()
    data.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in rows))
    config = WSPOConfig(prepare=None, data=str(data), cache_dir=str(tmp_path / "cache"), runs_dir=str(tmp_path / "runs"),
                        models=WSPOModels(weak_aligned=ModelSpec(path=str(checkpoints["weak"])),
                                          weak_base=ModelSpec(path=str(checkpoints["weak"])),
                                          strong=ModelSpec(path=str(checkpoints["strong"]))),
                        train=TrainConfig(mode="wspo", epochs=1, batch_size=8, num_workers=2), gamma_sweep=[])
    with pytest.raises(ModelLoadError, match="max_length 200 is more than"):
        run_wspo(config.model_copy(update={"max_length": 200}), RunDir(tmp_path / "refused", "wspo"))
    assert not (tmp_path / "cache").exists()  # refused before anything was scored

    metrics = run_wspo(config, RunDir(config.runs_dir, "wspo"), workers=workers)
    assert metrics["methods"]["wspo"]["train_rows"] == len(rows)
    kept = tmp_path / "runs" / "wspo" / "checkpoints" / "wspo_gamma_0.1"
    assert kept.is_dir() and not kept.is_symlink()
    shutil.rmtree(tmp_path / "cache")  # what `make clean` does
    model, _ = load_model(ModelSpec(path=str(kept)))  # still there, and loads
    assert model.config.n_layer == 2


def test_wspo_killed_mid_training_continues_to_the_same_numbers(tiny_wspo, tiny_cache, workers, tmp_path):
    """kill -9 of `jobs.wspo` (driver, Ray and workers) once gamma 0.1 has a checkpoint; the same command again
    resumes it and ends with the numbers of the uninterrupted run (the tests' `tiny_wspo`). (The second run is the
    job's code on the tests' Ray and workers: a process of its own would add only its start-up.)"""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT, job_env, job_in_process

    cache = tmp_path / "cache"  # the same prepared world and scores, without the WSPO models
    shutil.copytree(tiny_cache, cache, ignore=shutil.ignore_patterns("wspo-*", "*.lock", "workers-*"))
    # a checkpoint after every step (it changes no number); the workers wait after it, and are killed there
    overrides = [f"runs_dir={tmp_path / 'runs'}", f"cache_dir={cache}", "train.checkpoint_every=1"]
    command = [sys.executable, "-m", "jobs.wspo", "--config", "configs/tiny_wspo.yaml",
               *(arg for o in overrides for arg in ("--set", o))]
    with open(tmp_path / "killed.log", "w") as log:
        job = subprocess.Popen(command, cwd=ROOT, env=job_env(checkpoint_pause=30), stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    # a complete checkpoint (a `.partial` one is never resumed from)
    while not [p for p in (cache / "ray_train").glob("wspo-*/step_*") if not p.name.endswith(".partial")]:
        assert job.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()[-4000:]
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    text = job_in_process("wspo", "configs/tiny_wspo.yaml", ROOT, workers, *overrides)
    assert "weak_base: cached" in text, text[-3000:]
    resumed = [json.loads(p.read_text())["resumed_from_step"] for p in cache.glob("wspo-*/model/.train_summary.json")]
    assert max(resumed) > 0, resumed  # the killed gamma went on from the killed run's checkpoint

    def numbers(run: Path) -> dict:
        metrics = json.loads((run / "metrics.json").read_text())
        return {"models": metrics["models"], "sweep": metrics["methods"]["wspo"]["sweep"]}

    assert numbers(tmp_path / "runs" / "tiny_wspo") == numbers(tiny_wspo)
