"""WSPO wall time: this project's pipeline against a loop that does what the official code does (`make bench`).

    python -m benchmarks.wspo                   # full: 1000 gold pairs, 1 and 3 epochs
    python -m benchmarks.wspo --quick           # 64 pairs, smaller models, 1 epoch (used by the tests)
    python -m benchmarks.wspo --epochs 1 2 --out x.json

Both sides train the same strong GPT-2 (freshly initialised; weights do not change the speed) with
WSPO (ALGORITHMS.md section 1) on the chosen responses of the embedded world's gold pairs, guided by
the same weak aligned / weak base pair, with the same TrainConfig: ZeRO-3, gloo on CPU, the same
number of Ray Train workers of 1 CPU each, the same micro-batch, optimizer, schedule and step order
(`actors.trainer._batches`), and the same final save (the ZeRO-3 shards gathered into one
safetensors checkpoint by rank 0, returned as a Ray Train checkpoint).

- pipeline (what pipelines/wspo.py does): the three frozen models (weak aligned, weak base, strong
  reference) are started as `ModelHost` actors (`ModelGroup`), the chosen responses are scored once
  through them (`score_preferences`, Ray Data) and the per-token log-probs written as the training
  table; then `actors.trainer.train()` runs with only the policy resident.
    scoring s    = ModelGroup start (actors + model loads: "host start s", also shown alone) +
                   scoring + closing the group + writing the training table;
    train wall s = the whole `train()` call (Ray Train worker start-up, DeepSpeed set-up, the steps,
                   the final save, copying the model out).
- official (what the official LLaMA-Factory/TRL-based WSPO trainer does each step): one Ray Train
  `TorchTrainer` whose workers each hold the ZeRO-3 policy AND the three frozen models (eval mode,
  whole copies: the official code also shards them under ZeRO-3, which on CPU would only add
  gathers). Each step tokenizes chosen and rejected together, runs all four models forward on both
  halves (the frozen ones under no_grad, the policy with grad), computes `wspo_loss` on the chosen
  half only (the rejected half is discarded), then backward and step.
    scoring s    = 0 (there is no scoring stage);
    train wall s = the whole `fit()` call, as above, plus loading the three frozen models.

total s = scoring s + train wall s. loop s = rank 0's own clock from the first step to the saved
final model (for the pipeline, the trainer's summary `seconds`; the same span in the official loop):
training without the fixed start-up costs. final loss = rank 0's WSPO loss on the last step: both
sides train the same model on the same batches, so it agrees up to float rounding (a check that the
two sides do the same work, not a timing). Ratios are official / pipeline: above 1 means the
pipeline is faster. With two or more epochs values, the cost of one more epoch is, per side,
(total s at the most epochs - total s at the fewest) / (the difference in epochs): the fixed
start-up cancels out, but start-up noise does not. Every number is measured in this run; each epochs value is a separate, complete
run of both sides (the pipeline scores again each time), pipeline first. The machine load average
is recorded before and after: other work on the machine slows whichever side runs beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from benchmarks.run import MAX_LENGTH, write_results

if TYPE_CHECKING:
    from actors.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(work: Path, quick: bool) -> tuple[Path, dict[str, Path], int]:
    """The gold pairs as JSONL, fresh GPT-2 checkpoints by role (the weak pair: two seeds of one size; the
    strong one is both the policy's start and the frozen reference) and the number of pairs."""
    from w2s.modeling import GPTSize, init_gpt2
    from w2s.world import World, WorldConfig, build_tokenizer

    if quick:
        world = WorldConfig(n_entities=20, n_pair_prompts=64)
        weak, strong = GPTSize(n_layer=1, n_embd=16, n_head=1), GPTSize(n_layer=2, n_embd=32, n_head=2)
    else:  # the default world's pair count and the sizes of configs/prepare.yaml
        world = WorldConfig()
        prepare = yaml.safe_load((ROOT / "configs" / "prepare.yaml").read_text())
        weak, strong = (GPTSize(**prepare[name]["size"]) for name in ("weak", "strong"))
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in World(world).preference_pairs()]
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    tokenizer = build_tokenizer()
    models = {role: init_gpt2(size, tokenizer, work / role, seed)
              for role, size, seed in (("weak_aligned", weak, 1), ("weak_base", weak, 2), ("strong", strong, 3))}
    return data, models, len(pairs)


def run_pipeline(config: TrainConfig, models: dict[str, Path], data: Path, work: Path) -> dict:
    """Score once with the three frozen models as actors, then train with only the policy resident."""
    import pyarrow.parquet as pq

    from actors.model_host import HostPool
    from actors.stages import score_preferences
    from actors.trainer import train
    from pipelines.wspo import training_table
    from w2s.modeling import ModelSpec

    hosts = {"weak_aligned": models["weak_aligned"], "weak_base": models["weak_base"], "strong_ref": models["strong"]}
    start = time.perf_counter()
    pool = HostPool(max_hosts=len(hosts))
    try:
        refs = pool.hosts({role: ModelSpec(path=str(p)) for role, p in hosts.items()})
        hosts_start = time.perf_counter() - start  # actors started, models loaded
        scored = score_preferences(data, refs, work / "scores", tokenizer_path=str(models["strong"]),
                                   max_length=MAX_LENGTH, batch_size=64, responses=("chosen",))
    finally:
        pool.shutdown()
    assert scored.n_rejected == 0, scored.report  # both sides must train on the same rows
    train_data = work / "train.parquet"
    pq.write_table(training_table(pq.read_table(scored.scored_path), "chosen"), train_data)
    scoring = time.perf_counter() - start

    start = time.perf_counter()
    summary = train(config, models["strong"], train_data, work / "model", "pipeline", work / "storage", MAX_LENGTH,
                    reference="strong_ref")
    train_wall = time.perf_counter() - start
    return {"rows": scored.n_scored, "steps": summary["steps"], "hosts_start_s": hosts_start, "scoring_s": scoring,
            "train_wall_s": train_wall, "loop_s": summary["seconds"], "final_loss": summary["last"]["loss"]}


def official_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: four models resident, four forward passes on chosen and rejected."""
    import ray.train
    import torch
    from ray.train.torch import get_device
    from transformers import AutoModelForCausalLM

    from actors.trainer import TrainConfig, _batches, deepspeed_engine
    from w2s.data import load_pairs
    from w2s.losses import wspo_loss
    from w2s.modeling import ModelSpec, load_model, load_tokenizer, token_logprobs, tokenize_pairs

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
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = config.use_gpu if config.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
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
    return {"side": side, "epochs": epochs, **run, "total_s": total, "s_per_epoch": total / epochs,
            "loop_s_per_epoch": run["loop_s"] / epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 pairs, smaller models, 1 epoch (a test's budget)")
    parser.add_argument("--epochs", type=float, nargs="+", help="epoch counts to compare (default: 1 3; --quick: 1)")
    parser.add_argument("--out", default="bench_results/wspo.json", help="JSON results (default: %(default)s)")
    args = parser.parse_args()
    epochs = sorted(set(args.epochs or ([1.0] if args.quick else [1.0, 3.0])))

    from jobs.common import connect_ray  # sets RAY_TRAIN_ENABLE_PRINT_PATCH=0 before Ray Train is imported

    connect_ray()
    import deepspeed
    import ray
    import torch

    from actors.trainer import TrainConfig
    from w2s.runs import markdown_table

    ray.data.DataContext.get_current().enable_progress_bars = False  # keep the output a readable table
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    # Checkpoints and progress lines off: the benchmark measures the training itself.
    base = TrainConfig(mode="wspo", gamma=0.1, lr=1e-4, batch_size=16, num_workers=2, zero_stage=3,
                       checkpoint_every=10**6, log_every=10**6)
    load_before = os.getloadavg()
    runs: dict[tuple[str, float], dict] = {}  # (side, epochs) -> measurements
    try:
        with tempfile.TemporaryDirectory(prefix="w2s-bench-wspo-") as tmp:
            work = Path(tmp)
            data, models, n_pairs = make_inputs(work, args.quick)
            for e in epochs:
                config = TrainConfig(**{**base.model_dump(), "epochs": e})  # validated: epochs > 0
                for side, run in (("pipeline", run_pipeline), ("official", run_official)):
                    runs[side, e] = _with_totals(side, e, run(config, models, data, work / f"{side}-{e:g}"))
                same = [(runs[side, e]["rows"], runs[side, e]["steps"]) for side in ("pipeline", "official")]
                assert same[0] == same[1], f"rows, steps differ between the sides: {same}"
    finally:
        ray.shutdown()
    load_after = os.getloadavg()

    ratios = []
    for e in epochs:
        p, o = runs["pipeline", e], runs["official", e]
        ratios.append({"epochs": e, "steps": p["steps"], "total": o["total_s"] / p["total_s"],
                       "per_epoch": o["s_per_epoch"] / p["s_per_epoch"], "loop": o["loop_s"] / p["loop_s"]})
    # The cost of one more epoch, from the fewest and the most epochs run: the fixed start-up cancels out.
    marginal = None
    if len(epochs) > 1:
        lo, hi = min(epochs), max(epochs)
        extra = {side: (runs[side, hi]["total_s"] - runs[side, lo]["total_s"]) / (hi - lo)
                 for side in ("pipeline", "official")}
        marginal = {"from_epochs": [lo, hi], "pipeline_s": extra["pipeline"], "official_s": extra["official"],
                    "ratio": extra["official"] / extra["pipeline"]}

    table = [{"side": r["side"], "epochs": f"{r['epochs']:g}", "steps": r["steps"], "scoring s": r["scoring_s"],
              "of which host start s": r["hosts_start_s"], "train wall s": r["train_wall_s"], "loop s": r["loop_s"],
              "total s": r["total_s"], "s/epoch": r["s_per_epoch"]} for r in runs.values()]
    # (For one epochs value the ratio of s/epoch is the total ratio again: it is in the JSON only.)
    ratio_table = [{"epochs": f"{r['epochs']:g}", "official/pipeline total": r["total"],
                    "official/pipeline loop": r["loop"]} for r in ratios]
    print()
    print(markdown_table(table, floatfmt=".1f"))
    print()
    print(markdown_table(ratio_table, floatfmt=".2f"))
    print()
    most = ratios[-1]
    print(f"With {most['epochs']:g} epoch(s) on {n_pairs} pairs the pipeline is "
          f"{'faster' if most['total'] > 1 else 'slower'}: the official-style loop takes {most['total']:.2f}x its "
          f"total wall time and {most['loop']:.2f}x its training-loop time (four models on chosen and rejected each "
          "step, against one policy on chosen after a single scoring pass).")
    if marginal:
        print(f"One more epoch costs {marginal['official_s']:.1f} s official against {marginal['pipeline_s']:.1f} s "
              f"pipeline ({marginal['ratio']:.2f}x), from the {lo:g}- and {hi:g}-epoch runs.")
    print("Last-step loss (rank 0), pipeline / official: " + ", ".join(
        f"{e:g} epoch(s) {runs['pipeline', e]['final_loss']:.5f} / {runs['official', e]['final_loss']:.5f}"
        for e in epochs) + " (the same training on both sides).")
    print("scoring s: ModelGroup start (host start s: actors up, models loaded) + scoring + training table; "
          "train wall s: the whole train()/fit() call; loop s: rank 0's clock, first step to saved model.")
    print(f"Load average (1 min) before/after: {load_before[0]:.2f}/{load_after[0]:.2f} on {os.cpu_count()} CPUs "
          "(above the CPU count, other work shared the machine).")

    results = {
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch_version": torch.__version__, "ray_version": ray.__version__,
                    "deepspeed_version": deepspeed.__version__, "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine(),
                    "loadavg_before": list(load_before), "loadavg_after": list(load_after)},
        "quick": args.quick,
        "pairs": n_pairs,
        "config": base.model_dump(),
        "epochs": epochs,
        "runs": list(runs.values()),
        "ratios": ratios,
        "marginal_epoch": marginal,
    }
    write_results(results, args.out)


if __name__ == "__main__":
    main()
