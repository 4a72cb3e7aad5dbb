"""The GPU path end to end on one GPU, in a few minutes (`make gpu-smoke`; CI never runs it).

    python -m benchmarks.gpu_smoke                 # on a machine with a CUDA GPU
    python -m benchmarks.gpu_smoke --allow-cpu     # the same steps without one, to try the script itself

1. Tiny WSPO on the tiny world with the GPU asked for (`cluster.hosts.gpus: 0.25`, so the three scoring
   models share it, and `cluster.train.use_gpu`): training on the GPU with NCCL in bf16, the frozen
   reference scored in bf16 too (the dtype the policy trains in).
2. One MACPO round on the tiny world, the same way: every training stage and every host on the GPU.
3. SmolLM2-135M-Instruct in bf16 on the GPU: tokens/s of scoring (Ray Data through one host), of generation,
   and of training (one SFT stage), and the training MFU against the bf16 matmul peak measured here first.

Every check is printed as a table (ok / FAILED; `no GPU` with --allow-cpu), numbers go to
bench_results/gpu_smoke.json, and the exit code is 1 when a check failed. One GPU: every stage trains
with one worker (num_workers 1); hosts and training workers take turns on the GPU (actors.workers).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_PAIRS = {True: 256, False: 32}  # on a GPU; on a CPU (--allow-cpu), to keep it to minutes


def one_worker(tree):
    """A config tree with every training stage on one worker (one GPU)."""
    if isinstance(tree, dict):
        return {k: 1 if k == "num_workers" else one_worker(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [one_worker(v) for v in tree]
    return tree


def gpu_config(path: str, work: Path, on_gpu: bool, **fields) -> dict:
    """`path` (and the prepare config it names, copied into `work`) on one worker, the GPU asked for."""
    tree = one_worker(yaml.safe_load((ROOT / path).read_text()))
    if isinstance(tree.get("prepare"), str):
        prepare = work / Path(tree["prepare"]).name
        prepare.write_text(yaml.safe_dump(one_worker(yaml.safe_load((ROOT / tree["prepare"]).read_text()))))
        tree["prepare"] = str(prepare)
    cluster = tree.get("cluster", {})
    if on_gpu:
        cluster.update(hosts={"gpus": 0.25}, train={"use_gpu": True})
    return {**tree, "cluster": cluster, "runs_dir": str(work / "runs"), "cache_dir": str(work / "cache"), **fields}


def matmul_peak(on_gpu: bool) -> dict:
    """bf16 (GPU) or fp32 (CPU) matmul TFLOP/s: the best of ten n x n products after warm-ups."""
    import torch

    n, dtype, device = (8192, torch.bfloat16, "cuda") if on_gpu else (1024, torch.float32, "cpu")
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    times = []
    for i in range(13):
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if on_gpu:
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * n**3 / min(times) / 1e12}


def train_summaries(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("train_summary.json"))]


def placements(folder: Path) -> list[dict]:
    return [h for p in sorted(folder.rglob("placement.json")) for h in json.loads(p.read_text())]


def check(name: str, seen, ok: bool, on_gpu: bool) -> dict:
    """One row of the table: `ok` None (not checked) without a GPU."""
    return {"check": name, "seen": seen, "ok": ok if on_gpu else None}


def stage_checks(name: str, summaries: list[dict], hosts: list[dict], on_gpu: bool, host_dtypes: list[str]
                 ) -> list[dict]:
    """Every training stage on the GPU with NCCL in bf16; every host on the GPU, holding its model in the dtype
    of `host_dtypes` (sorted): a frozen reference in the dtype its policy trains in."""
    rows = [check(f"{name}: {len(summaries)} training stages, {key} {value}", sorted({s[key] for s in summaries}),
                  bool(summaries) and all(s[key] == value for s in summaries), on_gpu)
            for key, value in (("device", "cuda"), ("backend", "nccl"), ("dtype", "bfloat16"))]
    seen = sorted(f"{h['device']} {h['dtype']}" for h in hosts)
    rows.append(check(f"{name}: hosts on cuda holding {', '.join(host_dtypes)}", seen,
                      seen == [f"cuda {dtype}" for dtype in host_dtypes], on_gpu))
    return rows


def tiny_method(method: str, work: Path, on_gpu: bool) -> tuple[list[dict], dict]:
    """Tiny WSPO (no gamma sweep) or one MACPO round on the tiny world, the GPU asked for."""
    from pipelines.macpo import MACPOConfig, run_macpo
    from pipelines.wspo import WSPOConfig, run_wspo
    from w2s.runs import RunDir

    work.mkdir(parents=True)
    if method == "wspo":
        config = WSPOConfig(**gpu_config("configs/tiny_wspo.yaml", work, on_gpu, gamma_sweep=[]))
        run = run_wspo
    else:
        # sampled: on one worker the tiny agents' greedy answers came out equal, pairs that teach nothing
        config = MACPOConfig(**gpu_config("configs/tiny_macpo.yaml", work, on_gpu, rounds=1, generation={
            "max_new_tokens": 16, "batch_size": 16, "do_sample": True}))
        run = run_macpo
    start = time.perf_counter()
    metrics = run(config, RunDir(config.runs_dir, config.run_name))
    seconds = time.perf_counter() - start
    hosts = placements(work)
    if method == "wspo":  # the weak models as configured (float32), the strong reference as the policy trains
        label, total, dtypes = "tiny WSPO", metrics["methods"]["wspo"]["total"], ["bfloat16", "float32", "float32"]
    else:  # every agent as it trains: its DPO reference is itself
        label, total = "MACPO, 1 round", metrics["methods"]["macpo"]["rounds"][-1]["student"]["total"]
        dtypes = ["bfloat16"] * len(hosts)
    return (stage_checks(label, train_summaries(work), hosts, on_gpu, dtypes),
            {"seconds": seconds, "gold_total": total})


def smollm2_pairs(path: Path, n: int) -> Path:
    """`n` chat pairs about made-up countries (a right and a wrong capital)."""
    syllables = ["vel", "mor", "ost", "ra", "tam", "sin", "kad", "ri", "bren", "holt", "cy", "ren"]
    rows = []
    for i in range(n):
        country = (syllables[i % 12] + syllables[(i // 12) % 12] + syllables[(i // 144) % 12]).title()
        right, wrong = syllables[(i * 5) % 12].title() + "ia", syllables[(i * 7 + 3) % 12].title() + "o"
        rows.append({"prompt": [{"role": "user", "content": f"What is the capital of {country}?"}],
                     "chosen": [{"role": "assistant", "content": f"The capital of {country} is {right}."}],
                     "rejected": [{"role": "assistant", "content": f"The capital of {country} is {wrong}."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def smollm2_throughput(work: Path, on_gpu: bool, peak_tflops: float) -> tuple[list[dict], dict]:
    """Scoring, generation and training tokens/s of SmolLM2 in bf16 on the GPU; the training MFU."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from actors.resources import ClusterConfig
    from actors.stages import score_preferences
    from actors.trainer import TrainConfig
    from actors.workers import Workers
    from w2s.data import load_pairs
    from w2s.modeling import ModelSpec, encode, load_tokenizer
    from w2s.smollm2 import convert

    work.mkdir(parents=True)
    model = convert()
    spec = ModelSpec(path=str(model), dtype="bfloat16" if on_gpu else "float32")
    data, tokenizer = smollm2_pairs(work / "pairs.jsonl", SMOLLM2_PAIRS[on_gpu]), load_tokenizer(model)
    good, _ = load_pairs(data, tokenizer, 256)
    cluster = ClusterConfig(**({"hosts": {"gpus": 1}, "train": {"use_gpu": True}} if on_gpu else {}))
    numbers = {}
    with Workers(work / "ray_train", cluster) as workers:
        hosts = workers.host({"smollm2": spec})
        (where,) = workers.hosts.where(hosts)
        start = time.perf_counter()
        score_preferences(data, hosts, work / "scored", tokenizer_path=str(model), batch_size=64)
        scored_tokens = sum(len(p) + len(r) for p, r in _pair_lengths(tokenizer, good))
        numbers["scoring_tokens_per_s"] = scored_tokens / (time.perf_counter() - start)
        start = time.perf_counter()
        out = workers.generate(pa.table({"prompt": good["prompt"]}), {"smollm2": spec}, batch_size=64,
                               max_new_tokens=32)
        generated = sum(len(ids) + 1 for ids in encode(tokenizer, out["smollm2_response"].to_pylist()))
        numbers["generation_tokens_per_s"] = generated / (time.perf_counter() - start)  # new tokens (+ end of turn)
        pq.write_table(good.select(["prompt", "chosen"]).rename_columns(["prompt", "response"]), work / "sft.parquet")
        sft = TrainConfig(mode="sft", lr=1e-5, epochs=2 if on_gpu else 1, batch_size=16, num_workers=1)
        summary = workers.train(sft, model, work / "sft.parquet", work / "trained", "smollm2-sft", work / "storage",
                                256)
    train_tps = summary["tokens_per_worker"] * summary["world_size"] / summary["seconds"]
    numbers.update(training_tokens_per_s=train_tps, parameters=summary["parameters"],
                   training_mfu=6 * summary["parameters"] * train_tps / (peak_tflops * 1e12))
    return stage_checks("SmolLM2", [summary], [where], on_gpu, ["bfloat16"]), numbers


def _pair_lengths(tokenizer, good) -> list[tuple[list[int], list[int]]]:
    """Prompt and response tokens of every scored response (chosen and rejected), as the hosts count them."""
    from w2s.modeling import pair_ids

    prompts = good["prompt"].to_pylist()
    return [pair for side in ("chosen", "rejected") for pair in pair_ids(tokenizer, prompts, good[side].to_pylist())]


STEPS = {"wspo": lambda work, on_gpu, _: tiny_method("wspo", work, on_gpu),
         "macpo": lambda work, on_gpu, _: tiny_method("macpo", work, on_gpu),
         "smollm2": smollm2_throughput}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (the GPU checks are not made)")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS), help="what to run (all)")
    parser.add_argument("--out", default="bench_results/gpu_smoke.json")
    args = parser.parse_args()

    from jobs.common import connect_ray

    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.allow_cpu:
        print("error: make gpu-smoke needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False); "
              "--allow-cpu runs the steps on the CPU without the GPU checks", file=sys.stderr)
        sys.exit(2)
    peak = matmul_peak(on_gpu)
    connect_ray()
    checks, numbers = [], {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "matmul_peak": peak}
    with tempfile.TemporaryDirectory(prefix="w2s-gpu-smoke-") as tmp:
        for name in args.steps:
            print(f"\n===== {name} =====", flush=True)
            rows, numbers[name] = STEPS[name](Path(tmp) / name, on_gpu, peak["tflops"])
            checks += rows
    report(checks, numbers, args.out)
    sys.exit(1 if any(c["ok"] is False for c in checks) else 0)


def report(checks: list[dict], numbers: dict, out: str) -> None:
    from benchmarks.run import write_results
    from w2s.runs import markdown_table

    shown = [{**c, "seen": ", ".join(map(str, c["seen"])) if isinstance(c["seen"], list) else c["seen"],
              "ok": {True: "ok", False: "FAILED", None: "no GPU"}[c["ok"]]} for c in checks]
    print(f"\nGPU smoke on {numbers['device']}\n\n{markdown_table(shown)}\n")
    figures = [{"what": f"{step}: {k}", "value": f"{v:,.3g}"} for step in STEPS if step in numbers
               for k, v in numbers[step].items()]
    figures.append({"what": "matmul peak, TFLOP/s", "value": f"{numbers['matmul_peak']['tflops']:.3g} "
                                                          f"({numbers['matmul_peak']['dtype']})"})
    print(markdown_table(figures))
    write_results({"checks": checks, **numbers}, out)


if __name__ == "__main__":
    main()
