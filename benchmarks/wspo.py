"""WSPO wall time: this project's pipeline against a loop that does what the official code does (`make bench`).

    python -m benchmarks.wspo                          # sizes "today" and "large", 1 and 3 epochs each
    python -m benchmarks.wspo --sizes today --epochs 1  # one size, one epochs value
    python -m benchmarks.wspo --sizes quick             # seconds-scale (the tests call compare() on it)

Sizes (GPT-2s freshly initialised on the world's tokenizer: weights do not change the speed):
- today: the models of configs/prepare.yaml (strong 210K parameters, weak 36K) on the world's 1000 gold
  pairs: fixed costs dominate;
- large: a 10.7M-parameter strong model (6 layers, d384) and 1.2M-parameter weak ones (2 layers, d224) on
  2000 gold pairs: compute dominates (an official-style epoch takes minutes on 2 CPU cores).

Both sides train the same strong GPT-2 with WSPO (ALGORITHMS.md section 1) on the chosen responses of the
world's gold pairs, guided by the same weak aligned / weak base pair, with the same TrainConfig: ZeRO-3,
gloo on CPU, 2 Ray Train workers of 1 CPU each, the same micro-batch, optimizer, schedule and step order
(`actors.trainer._batches`), and the ZeRO-3 shards gathered into one safetensors checkpoint at the end.

- pipeline (what pipelines/wspo.py does, with the start-up a job pays): the job's model hosts load the three
  frozen models (weak aligned, weak base, strong reference), the chosen responses are scored once through
  them (`score_preferences`, Ray Data) into the training table; then the job's training workers (started by
  this first stage) train with only the policy resident; then the job's workers are shut down.
    scoring s    = host start and model loads ("host start s", also shown alone) + scoring + the table;
    train wall s = the rest: worker start-up, DeepSpeed set-up, the steps, the final save, the shutdown.
- official (what the official LLaMA-Factory/TRL-based WSPO trainer does each step): one Ray Train
  `TorchTrainer` whose workers each hold the ZeRO-3 policy AND the three frozen models (eval mode,
  whole copies: the official code also shards them under ZeRO-3, which on CPU would only add
  gathers). Each step tokenizes chosen and rejected together, runs all four models forward on both
  halves (the frozen ones under no_grad, the policy with grad), computes `wspo_loss` on the chosen
  half only (the rejected half is discarded), then backward and step.
    scoring s    = 0 (there is no scoring stage);
    train wall s = the whole `fit()` call, as above, plus loading the three frozen models.

total s = scoring s + train wall s. loop s = rank 0's own clock from the first step to the saved final
model: training without the fixed start-up costs. final loss = rank 0's WSPO loss on the last step: both
sides train the same model on the same batches, so it agrees up to float rounding (a check that the two
sides do the same work, not a timing). Ratios are official / pipeline: above 1 means the pipeline is faster.

Fixed against per-token cost, per side: one more epoch costs (total s at 3 epochs - total s at 1) / 2 (the
fixed start-up cancels out); per token = that / the tokens of one epoch (prompt + chosen response + EOS of
every pair); fixed = total s at 1 epoch - one epoch's cost. The FLOP bound says what the arithmetic alone
allows: per pair-token the official loop runs the policy forward and backward on chosen and rejected
(3 x 2 x F_strong) and three frozen models forward on both (2 x (F_strong + 2 F_weak)); the pipeline runs the
policy on chosen only (3 F_strong) and scores once (F_strong + 2 F_weak), so at E epochs official/pipeline
<= E (8 F_strong + 4 F_weak) / (3 E F_strong + F_strong + 2 F_weak) (less where padding or start-up differ).
Every number is measured in this run; each epochs value is a separate, complete run of both sides,
pipeline first. The machine load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.run import MAX_LENGTH, forward_flops_per_token, write_results

if TYPE_CHECKING:
    from actors.trainer import TrainConfig
    from actors.workers import Workers

ROOT = Path(__file__).resolve().parents[1]


def sizes() -> dict:
    """name -> (WorldConfig, weak GPTSize, strong GPTSize)."""
    import yaml

    from w2s.modeling import GPTSize
    from w2s.world import WorldConfig

    prepare = yaml.safe_load((ROOT / "configs" / "prepare.yaml").read_text())
    return {
        "quick": (WorldConfig(n_entities=20, n_pair_prompts=64), GPTSize(n_layer=1, n_embd=16, n_head=1),
                  GPTSize(n_layer=2, n_embd=32, n_head=2)),
        "today": (WorldConfig(), GPTSize(**prepare["weak"]["size"]), GPTSize(**prepare["strong"]["size"])),
        "large": (WorldConfig(n_pair_prompts=2000), GPTSize(n_layer=2, n_embd=224, n_head=4),
                  GPTSize(n_layer=6, n_embd=384, n_head=6)),
    }


def make_inputs(work: Path, size: str) -> tuple[Path, dict[str, Path], int]:
    """The gold pairs as JSONL, fresh GPT-2 checkpoints by role (the weak pair: two seeds of one size; the
    strong one is both the policy's start and the frozen reference) and the tokens of one epoch."""
    from w2s.modeling import init_gpt2, pair_ids
    from w2s.world import World, build_tokenizer

    world, weak, strong = sizes()[size]
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in World(world).preference_pairs()]
    work.mkdir(parents=True, exist_ok=True)
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    tokenizer = build_tokenizer()
    models = {role: init_gpt2(s, tokenizer, work / role, seed)
              for role, s, seed in (("weak_aligned", weak, 1), ("weak_base", weak, 2), ("strong", strong, 3))}
    tokens = sum(len(p) + len(r) for p, r in pair_ids(tokenizer, [r["prompt"] for r in pairs],
                                                      [r["chosen"] for r in pairs]))
    return data, models, tokens


def run_pipeline(config: TrainConfig, models: dict[str, Path], data: Path, work: Path,
                 workers: Workers | None = None) -> dict:
    """Score once with the three frozen models on the job's hosts, then train with only the policy resident.
    `workers`: already started ones to share (the tests); None: this run starts and stops its own."""
    from actors.stages import score_preferences
    from actors.resources import ClusterConfig
    from actors.workers import job_workers
    from pipelines.wspo import write_training_table
    from w2s.modeling import ModelSpec

    hosts = {"weak_aligned": models["weak_aligned"], "weak_base": models["weak_base"], "strong_ref": models["strong"]}
    start = time.perf_counter()
    with job_workers(workers, work / "ray_train", ClusterConfig()) as workers:  # CPUs, as the official side
        refs = workers.host({role: ModelSpec(path=str(p)) for role, p in hosts.items()}, turns=True)  # as jobs.wspo
        hosts_start = time.perf_counter() - start  # actors started, models loaded
        scored = score_preferences(data, refs, work / "scores", tokenizer_path=str(models["strong"]),
                                   max_length=MAX_LENGTH, batch_size=64, responses=("chosen",))
        assert scored.n_rejected == 0, scored.report  # both sides must train on the same rows
        train_data = work / "train.parquet"
        write_training_table(scored.scored_path, "chosen", train_data)
        scoring = time.perf_counter() - start
        summary = workers.train(config, models["strong"], train_data, work / "model", "pipeline", work / "storage",
                                MAX_LENGTH, reference="strong_ref")
    return {"rows": scored.n_scored, "steps": summary["steps"], "hosts_start_s": hosts_start, "scoring_s": scoring,
            "train_wall_s": time.perf_counter() - start - scoring,
            # from the first step to the saved final model, as the official side's clock runs
            "loop_s": summary["seconds"] + summary["save_seconds"],
            "final_loss": summary["last"]["loss"]}


def official_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: four models resident, four forward passes on chosen and rejected."""
    import ray.train
    import torch
    from ray.train.torch import get_device
    from transformers import AutoModelForCausalLM

    from actors.trainer import TrainConfig, _batches, _quiet_worker, deepspeed_engine
    from w2s.data import load_pairs
    from w2s.losses import wspo_loss
    from w2s.modeling import ModelSpec, load_model, load_tokenizer, token_logprobs, tokenize_pairs

    _quiet_worker()  # as the pipeline's workers: no per-step deprecation lines from the collectives
    config = TrainConfig(**loop_config["train"])
    models = loop_config["models"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config.seed)
    on_gpu = torch.cuda.is_available() and loop_config["use_gpu"]
    dtype = config.dtype or ("bfloat16" if on_gpu else "float32")  # as actors.trainer does

    tokenizer = load_tokenizer(models["strong"])
    policy = AutoModelForCausalLM.from_pretrained(models["strong"], dtype=torch.float32, use_safetensors=True)
    policy.config.use_cache = False
    frozen = {role: load_model(ModelSpec(path=models[path], dtype=dtype), get_device())[0]
              for role, path in (("ref", "strong"), ("weak_aligned", "weak_aligned"), ("weak_base", "weak_base"))}
    good, _ = load_pairs(loop_config["data"])
    rows = good.select(["prompt", "chosen", "rejected"]).to_pylist()
    _, total_steps, _ = next(_batches(len(rows), config, rank, world))  # the real trainer's step count
    engine, _ = deepspeed_engine(policy, config, total_steps, getattr(torch, dtype))

    engine.train()
    start = time.perf_counter()
    for _, _, indices in _batches(len(rows), config, rank, world):
        batch = [rows[i] for i in indices]
        n = len(batch)
        prompts = [r["prompt"] for r in batch]
        tb = tokenize_pairs(tokenizer, prompts + prompts, [r["chosen"] for r in batch] + [r["rejected"] for r in batch],
                            MAX_LENGTH)
        policy_logps = token_logprobs(engine, tb)  # chosen + rejected in one pass, with grad
        with torch.no_grad():
            logps = {role: token_logprobs(model, tb) for role, model in frozen.items()}
        mask = tb.response_mask[:, 1:].bool().to(policy_logps.device)
        # Only the chosen half enters the loss: the rejected half was computed and is discarded.
        loss = wspo_loss(policy_logps[:n], logps["ref"][:n], logps["weak_aligned"][:n], logps["weak_base"][:n],
                         mask[:n], config.gamma).mean()
        engine.backward(loss)
        engine.step()

    state = engine._zero3_consolidated_16bit_state_dict() if config.zero_stage == 3 else engine.module.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            engine.module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        metrics = {"rows": len(rows), "steps": total_steps, "loop_seconds": time.perf_counter() - start,
                   "loss": loss.item()}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


def run_official(config: TrainConfig, models: dict[str, Path], data: Path, work: Path) -> dict:
    """The official-style loop in Ray Train workers placed as actors/trainer.py places its own."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = False  # the pipeline side's default (actors.resources.TrainResources): both train on CPUs
    trainer = TorchTrainer(
        official_loop,
        train_loop_config={"train": config.model_dump(), "models": {r: str(p) for r, p in models.items()},
                           "data": str(data), "use_gpu": use_gpu},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": 1}),
        run_config=RunConfig(name="official", storage_path=str(work / "storage")),
    )
    start = time.perf_counter()
    result = trainer.fit()
    train_wall = time.perf_counter() - start
    if result.error:
        raise RuntimeError("official-style loop failed") from result.error
    return {"rows": result.metrics["rows"], "steps": result.metrics["steps"], "hosts_start_s": 0.0, "scoring_s": 0.0,
            "train_wall_s": train_wall, "loop_s": result.metrics["loop_seconds"], "final_loss": result.metrics["loss"]}


def _with_totals(side: str, epochs: float, run: dict) -> dict:
    total = run["scoring_s"] + run["train_wall_s"]
    return {"side": side, "epochs": epochs, **run, "total_s": total, "s_per_epoch": total / epochs}


def compare(size: str, epochs: list[float], work: Path, workers: Workers | None = None) -> dict:
    """Both sides at `size`, once per epochs value: the runs, their ratios, and (with two epochs values or
    more) each side's fixed and per-token cost."""
    from actors.trainer import TrainConfig

    data, models, epoch_tokens = make_inputs(work, size)
    # Checkpoints and progress lines off: the benchmark measures the training itself.
    base = TrainConfig(mode="wspo", gamma=0.1, lr=1e-4, batch_size=16, num_workers=2, zero_stage=3,
                       checkpoint_every=10**6, log_every=10**6)
    runs: dict[tuple[str, float], dict] = {}
    for e in epochs:
        config = base.model_copy(update={"epochs": e})
        for side, run in (("pipeline", run_pipeline), ("official", run_official)):
            kwargs = {"workers": workers} if side == "pipeline" else {}
            runs[side, e] = _with_totals(side, e, run(config, models, data, work / f"{size}-{side}-{e:g}", **kwargs))
        same = [(runs[side, e]["rows"], runs[side, e]["steps"]) for side in ("pipeline", "official")]
        assert same[0] == same[1], f"rows, steps differ between the sides: {same}"
    ratios = [{"epochs": e, "steps": runs["pipeline", e]["steps"],
               "total": runs["official", e]["total_s"] / runs["pipeline", e]["total_s"],
               "loop": runs["official", e]["loop_s"] / runs["pipeline", e]["loop_s"]} for e in epochs]
    strong, weak = (forward_flops_per_token(models[role], 32) for role in ("strong", "weak_base"))
    bound = [{"epochs": e, "flop_bound": e * (8 * strong + 4 * weak) / (3 * e * strong + strong + 2 * weak)}
             for e in epochs]
    return {"size": size, "pairs": runs["pipeline", epochs[0]]["rows"], "epoch_tokens": epoch_tokens,
            "parameters": {role: _parameters(models[role]) for role in ("strong", "weak_base")},
            "config": base.model_dump(), "runs": list(runs.values()), "ratios": ratios, "flop_bound": bound,
            "split": _split(runs, epochs, epoch_tokens)}


def _parameters(model: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


def _split(runs: dict, epochs: list[float], epoch_tokens: int) -> list[dict] | None:
    """Per side: the cost of one more epoch (the fixed start-up cancels), per token, and the fixed rest."""
    if len(epochs) < 2:
        return None
    lo, hi = min(epochs), max(epochs)
    out = []
    for side in ("pipeline", "official"):
        epoch_s = (runs[side, hi]["total_s"] - runs[side, lo]["total_s"]) / (hi - lo)
        out.append({"side": side, "epoch_s": epoch_s, "us_per_token": 1e6 * epoch_s / epoch_tokens,
                    "fixed_s": runs[side, lo]["total_s"] - lo * epoch_s})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["today", "large"], choices=["quick", "today", "large"])
    parser.add_argument("--epochs", type=float, nargs="+", default=[1.0, 3.0], help="epoch counts to compare")
    parser.add_argument("--out", default="bench_results/wspo.json", help="JSON results (default: %(default)s)")
    args = parser.parse_args()
    epochs = sorted(set(args.epochs))

    from jobs.common import connect_ray  # sets RAY_TRAIN_ENABLE_PRINT_PATCH=0 before Ray Train is imported

    load_before = os.getloadavg()  # before Ray starts: its own processes would count as other work
    connect_ray()
    import deepspeed
    import ray
    import torch

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="w2s-bench-wspo-") as tmp:
            for size in args.sizes:
                print(f"[bench wspo] size {size}, epochs {', '.join(f'{e:g}' for e in epochs)}", flush=True)
                results.append(compare(size, epochs, Path(tmp) / size))
    finally:
        ray.shutdown()
    load_after = os.getloadavg()
    for result in results:
        print_result(result)
    busy = load_before[0] > (os.cpu_count() or 1)
    print(f"Load average (1 min) before the benchmark: {load_before[0]:.2f} on {os.cpu_count()} CPUs"
          + (": other work was using the machine, the timings are suspect." if busy else "."))
    write_results({"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                               "torch_version": torch.__version__, "ray_version": ray.__version__,
                               "deepspeed_version": deepspeed.__version__, "python": platform.python_version(),
                               "processor": platform.processor() or platform.machine(),
                               "loadavg_before": list(load_before), "loadavg_after": list(load_after)},
                   "epochs": epochs, "sizes": results}, args.out)


def print_result(result: dict) -> None:
    from w2s.runs import markdown_table

    p = result["parameters"]
    print(f"\n## {result['size']}: strong {p['strong'] / 1e6:.2f}M parameters, weak {p['weak_base'] / 1e6:.2f}M, "
          f"{result['pairs']} pairs, {result['epoch_tokens']} tokens an epoch\n")
    print(markdown_table([{"side": r["side"], "epochs": f"{r['epochs']:g}", "steps": r["steps"],
                           "scoring s": r["scoring_s"], "of which host start s": r["hosts_start_s"],
                           "train wall s": r["train_wall_s"], "loop s": r["loop_s"], "total s": r["total_s"],
                           "final loss": r["final_loss"]} for r in result["runs"]],
                         floatfmt=[".1f"] * 8 + [".7f"]))  # the losses agree to float rounding: show the digits
    print()
    bounds = {b["epochs"]: b["flop_bound"] for b in result["flop_bound"]}
    print(markdown_table([{"epochs": f"{r['epochs']:g}", "official/pipeline total": r["total"],
                           "official/pipeline loop": r["loop"], "FLOP bound": bounds[r["epochs"]]}
                          for r in result["ratios"]], floatfmt=".2f"))
    if result["split"]:
        print()
        print(markdown_table([{"side": s["side"], "fixed s": s["fixed_s"], "one epoch s": s["epoch_s"],
                               "us per token": s["us_per_token"]} for s in result["split"]], floatfmt=".1f"))


if __name__ == "__main__":
    main()
