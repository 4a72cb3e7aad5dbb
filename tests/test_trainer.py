"""The Ray Train + DeepSpeed ZeRO-3 trainer: real workers (gloo on CPU), DPO, kill and resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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


def test_dpo_with_sft_term_on_two_zero3_workers(ray_local, checkpoints, tmp_path):
    data = _scored_pairs(checkpoints["weak"], tmp_path / "pairs.parquet")
    config = TrainConfig(mode="dpo", beta=0.1, sft_weight=0.2, lr=1e-2, epochs=4, batch_size=8, num_workers=2,
                         checkpoint_every=100, log_every=5)
    summary = train(config, checkpoints["weak"], data, tmp_path / "aligned", "dpo-test", tmp_path / "storage",
                    tensorboard_dir=tmp_path / "tb", reference="base")
    assert summary["world_size"] == 2 and summary["steps"] == 4 * (48 // 16)
    assert summary["torch_threads"] == 1  # one reserved CPU per worker: one thread, on any machine
    assert (tmp_path / "aligned" / "model.safetensors").is_file()  # gathered from the ZeRO-3 shards
    assert (tmp_path / "aligned" / ".trained_by_w2s").is_file()
    margins = _margins(tmp_path / "aligned", data)
    assert sum(m > 0 for m in margins) / len(margins) > 0.8  # the policy now prefers the chosen responses
    assert list((tmp_path / "tb").iterdir())  # TensorBoard events written


def test_bad_inputs_fail_before_workers_start(checkpoints, tmp_path):
    pq.write_table(pa.table({"prompt": ["a"], "chosen": ["b"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"x\.parquet: mode 'dpo' needs columns .* missing \['rejected', 'ref_chosen_logps', 'ref_rejected_logps'\]"):
        train(TrainConfig(mode="dpo"), checkpoints["weak"], tmp_path / "x.parquet", tmp_path / "o", "n", tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        train(TrainConfig(mode="lm"), tmp_path / "no-model", tmp_path / "x.parquet", tmp_path / "o", "n", tmp_path)
    mine = tmp_path / "my_models"  # a user's folder: never replaced by a trained model
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"my_models exists and was not written by train\(\)"):
        train(TrainConfig(mode="lm"), checkpoints["weak"], tmp_path / "x.parquet", mine, "n", tmp_path)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_killed_run_resumes_from_last_checkpoint(checkpoints, tmp_path):
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": World(WorldConfig(n_entities=6, n_pretrain_docs=160)).corpus()}), corpus)
    storage = tmp_path / "storage"
    cmd = [sys.executable, str(ROOT / "tests/scripts/train_lm.py"), str(checkpoints["weak"]), str(corpus),
           str(tmp_path / "out"), str(storage)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    env.pop("RAY_ADDRESS", None)
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as log:
        first = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(storage.glob("resume-test/checkpoint_*")):
        assert first.poll() is None, "training ended before its first checkpoint:\n" + first_log.read_text()[-4000:]
        time.sleep(1)
    assert list(storage.glob("resume-test/checkpoint_*")), "no checkpoint within 300s"
    time.sleep(2)
    os.killpg(first.pid, signal.SIGKILL)  # the driver, its local Ray and the workers, all at once
    first.wait()
    assert not (tmp_path / "out").exists()

    second = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    assert "TRAIN_DONE 30" in log  # 6 epochs x (160 docs // (16 per worker x 2 workers))
    resumed = [int(line.split("resumed from step ")[1].split()[0]) for line in log.splitlines() if "resumed from step" in line]
    assert resumed and resumed[0] >= 5, log[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
