"""One DPO stage against TRL's `DPOTrainer`, the library users would pick (`make bench`; needs the `bench` extra).

    python -m benchmarks.trl_dpo                  # size "large" (benchmarks/wspo.py): a 10.7M-parameter model
    python -m benchmarks.trl_dpo --size today

Both sides train the same freshly initialised strong GPT-2 with sigmoid DPO (beta 0.1, no SFT term) on the
world's gold pairs, one epoch, the same global batch (16 pairs a step), the same number of steps, AdamW at
the same learning rate with warm-up and cosine decay, fp32 on this CPU, all of its cores:

- this project: the frozen reference scored once through a model host (`score_preferences`), then one DPO
  stage on the job's training workers (2 Ray Train workers of 1 CPU each, DeepSpeed ZeRO-3, micro-batch 8),
  with the start-up a job pays (Ray is up before: a job has it too);
- TRL: `DPOTrainer` in this process with the reference model it makes itself, run on the fly each step (its
  default), micro-batch 16, torch on every core.

Tokens are the data's own (prompt + chosen + EOS and prompt + rejected + EOS of every pair), the same count
for both sides; tokens/s = tokens / seconds, for the training loop alone and for the whole stage. The final
loss of each is measured the same way after training: the mean DPO loss of the trained model on the first
256 pairs, against the initial model as reference (the training logs of the two sides average over
different batches).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from benchmarks.run import MAX_LENGTH, write_results

EVAL_PAIRS = 256


def run_project(model: Path, data: Path, work: Path, lr: float) -> dict:
    from actors.stages import score_preferences
    from actors.trainer import TrainConfig
    from actors.workers import Workers
    from w2s.modeling import ModelSpec

    config = TrainConfig(mode="dpo", loss="sigmoid", beta=0.1, lr=lr, epochs=1, batch_size=8, num_workers=2,
                         warmup_ratio=0.1, checkpoint_every=10**6, log_every=10**6)
    start = time.perf_counter()
    with Workers(work / "ray_train") as workers:
        scored = score_preferences(data, workers.host({"ref": ModelSpec(path=str(model))}), work / "scores",
                                   tokenizer_path=str(model), max_length=MAX_LENGTH, batch_size=64)
        scoring = time.perf_counter() - start
        summary = workers.train(config, model, scored.scored_path, work / "trained", "dpo", work / "storage",
                                MAX_LENGTH, reference="ref")
    return {"steps": summary["steps"], "scoring_s": scoring, "loop_s": summary["seconds"],
            "total_s": time.perf_counter() - start, "model": work / "trained"}


def run_trl(model: Path, pairs: list[dict], work: Path, lr: float) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from w2s.modeling import load_tokenizer

    torch.set_num_threads(os.cpu_count())
    start = time.perf_counter()
    args = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=16, num_train_epochs=1,
                     learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0.1, beta=0.1, loss_type=["sigmoid"],
                     max_length=MAX_LENGTH, use_cpu=True, bf16=False, save_strategy="no", report_to=[],
                     logging_steps=10**6, seed=0, dataloader_drop_last=False, disable_tqdm=True)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model, use_safetensors=True), args=args,
                         train_dataset=Dataset.from_list(pairs), processing_class=load_tokenizer(model))
    loop_start = time.perf_counter()
    result = trainer.train()
    loop = time.perf_counter() - loop_start
    trainer.save_model(str(work / "trl_trained"))
    return {"steps": result.global_step, "scoring_s": 0.0, "loop_s": loop, "total_s": time.perf_counter() - start,
            "model": work / "trl_trained"}


def final_loss(trained: Path, initial: Path, pairs: list[dict], beta: float = 0.1) -> float:
    """Mean sigmoid DPO loss of `trained` on `pairs` against `initial` as reference (the same for both sides)."""
    import torch

    from w2s.losses import dpo_loss
    from w2s.modeling import ModelSpec, load_model, response_logprobs

    prompts = [p["prompt"] for p in pairs]
    sums = {}
    for name, path in (("policy", trained), ("ref", initial)):
        model, tokenizer = load_model(ModelSpec(path=str(path)))
        for side in ("chosen", "rejected"):
            sums[name, side] = torch.tensor([float(x.sum()) for x in response_logprobs(
                model, tokenizer, prompts, [p[side] for p in pairs], MAX_LENGTH)])
    losses, _ = dpo_loss(sums["policy", "chosen"], sums["policy", "rejected"], sums["ref", "chosen"],
                         sums["ref", "rejected"], beta)
    return losses.mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="large", choices=["quick", "today", "large"])
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--out", default="bench_results/trl_dpo.json")
    args = parser.parse_args()

    from benchmarks.wspo import _parameters, sizes
    from jobs.common import connect_ray
    from w2s.modeling import init_gpt2, pair_ids
    from w2s.runs import markdown_table
    from w2s.world import World, build_tokenizer

    connect_ray()
    import ray
    import trl

    world, _, strong = sizes()[args.size]
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in World(world).preference_pairs()]
    tokenizer = build_tokenizer()
    tokens = sum(len(p) + len(r) for side in ("chosen", "rejected")
                 for p, r in pair_ids(tokenizer, [x["prompt"] for x in pairs], [x[side] for x in pairs]))
    with tempfile.TemporaryDirectory(prefix="w2s-bench-trl-") as tmp:
        work = Path(tmp)
        model = init_gpt2(strong, tokenizer, work / "initial")
        data = work / "pairs.jsonl"
        data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        runs = {"project": run_project(model, data, work, args.lr)}
        ray.shutdown()  # TRL gets the machine to itself, as the project's stage had it
        runs["trl"] = run_trl(model, pairs, work, args.lr)
        for run in runs.values():
            run["final_loss"] = final_loss(run.pop("model"), model, pairs[:EVAL_PAIRS])
        parameters = _parameters(model)
    rows = [{"side": side, "steps": r["steps"], "scoring s": r["scoring_s"], "loop s": r["loop_s"],
             "total s": r["total_s"], "loop tokens/s": tokens / r["loop_s"], "total tokens/s": tokens / r["total_s"],
             "final loss": r["final_loss"]} for side, r in runs.items()]
    print(f"\n## DPO, {args.size}: {parameters / 1e6:.2f}M parameters, {len(pairs)} pairs, {tokens} tokens an epoch\n")
    print(markdown_table(rows, floatfmt=(".1f",) * 7 + (".4f",)))
    ratios = {"loop": runs["trl"]["loop_s"] / runs["project"]["loop_s"],
              "total": runs["trl"]["total_s"] / runs["project"]["total_s"]}
    print(f"\nproject/TRL tokens/s: {ratios['loop']:.2f}x for the training loop, {ratios['total']:.2f}x for the whole "
          f"stage (TRL {trl.__version__}; the project's total includes scoring the reference once and starting its "
          "workers). Final loss: mean DPO loss on the first 256 pairs against the initial model, after training.")
    write_results({"machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
                   "size": args.size, "parameters": parameters, "pairs": len(pairs), "tokens": tokens,
                   "trl_version": trl.__version__, "runs": runs, "ratios": ratios}, args.out)


if __name__ == "__main__":
    main()
