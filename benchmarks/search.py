"""CBS throughput: this pipeline against a loop doing what the official implementation does (`make bench`).

    python -m benchmarks.search [--prompts 64] [--w 4 --k 4 --l 5] [--out bench_results/search.json]

Same models (the embedded world's strong base, weak aligned and weak base: `python -m jobs.prepare` first, or they
are built), same prompts, same settings and seeds:

- pipeline: actors.search.search_batch on three model hosts, every prompt of a batch in flight at once, the guides
  scoring only each new chunk (their KV cache holds the prefix).
- official-style loop, in this process: one prompt at a time; the strong model samples with its KV cache (as the
  official code does), and at every chunk the guides re-score every row's whole response from the start (its
  token ids, where the official code re-tokenizes the decoded text: the same work, and numbers that can be
  compared).

Both sample each prompt's rows from a generator seeded by the prompt's seed, so with the same seeds they must give
the same responses: the share that agree is reported (rows can differ only where padding changes a float's last
bit). Tokens/s = strong-model tokens sampled per wall-clock second; the ratio is measured side by side.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from w2s.modeling import ModelSpec
from w2s.search import BeamShape, Chunk, Found, Sampling, chunk_beam_search


def official_style(models: dict, positions: int, prompt: str, seed: int, shape: BeamShape,
                   sampling: Sampling) -> Found:
    """One prompt: strong rows with a KV cache; every chunk, every row's whole response re-scored by both guides.
    `models`: role -> (model, tokenizer), loaded in this process; `positions`: what the models can take."""
    from w2s.decoding import DecodeRows
    from w2s.modeling import encode_prompts, pad_pairs, token_logprobs

    strong, tokenizer = models["strong"]
    rows = DecodeRows(strong, tokenizer, [prompt], shape.w * shape.k, [seed], sampling.max_new_tokens + 1, positions)
    prompt_ids, end = encode_prompts(tokenizer, [prompt])[0], tokenizer.eos_token_id

    def propose(parents, n_tokens) -> Chunk:
        rows.select(parents)
        return Chunk(rows.sample(n_tokens, sampling.temperature, sampling.top_k), rows.finished.cpu().numpy())

    @torch.no_grad()
    def score(parents, chunk, tokens, complete, previous) -> np.ndarray:
        # token ids re-scored (not decoded text): the same numbers as the pipeline's, so the outputs can be compared
        pairs = [(prompt_ids, t + [end] if c and t[-1:] != [end] else t) for t, c in zip(tokens, complete)]
        batch = pad_pairs(pairs, tokenizer.pad_token_id, positions)
        tuned, untuned = (token_logprobs(models[r][0], batch).sum(1).double().numpy() for r in ("tuned", "untuned"))
        return tuned - untuned

    return chunk_beam_search(1, shape, sampling.max_new_tokens, propose, score)[0]


def compare(prompts: list[str], seeds: list[int], models: dict[str, ModelSpec], shape: BeamShape, sampling: Sampling,
            batch: int, workers) -> dict:
    from actors.search import search_batch
    from pipelines.search import start_guides
    from w2s.modeling import load_model, model_positions

    local = {role: load_model(spec) for role, spec in models.items()}  # the official-style loop's, in this process
    positions = min(model_positions(spec.path) for spec in models.values())
    guides = start_guides(models, True, workers)
    search_batch(guides, prompts[:2], seeds[:2], shape, sampling)  # warm-up: hosts loaded, first calls made
    start = time.perf_counter()
    pipeline = []
    for i in range(0, len(prompts), batch):
        pipeline += search_batch(guides, prompts[i:i + batch], seeds[i:i + batch], shape, sampling)
    pipeline_s = time.perf_counter() - start

    official_style(local, positions, prompts[0], seeds[0], shape, sampling)  # warm-up
    start = time.perf_counter()
    official = [official_style(local, positions, p, s, shape, sampling) for p, s in zip(prompts, seeds)]
    official_s = time.perf_counter() - start

    def tokens(found: list[Found]) -> int:
        return sum(f.strong_tokens for f in found)

    same = sum(a.tokens == b.tokens for a, b in zip(pipeline, official)) / len(prompts)
    return {"prompts": len(prompts), "w": shape.w, "k": shape.k, "l": shape.l, "batch_prompts": batch,
            "pipeline_s": round(pipeline_s, 2), "official_s": round(official_s, 2),
            "pipeline_tokens_per_s": round(tokens(pipeline) / pipeline_s, 1),
            "official_tokens_per_s": round(tokens(official) / official_s, 1),
            "ratio": round((tokens(pipeline) / pipeline_s) / (tokens(official) / official_s), 2),
            "same_responses": same, "torch_threads_official": torch.get_num_threads(),
            "host_threads": [h["threads"] for h in workers.hosts.where(guides.hosts)]}


def main() -> None:
    import pyarrow.parquet as pq

    from actors.workers import Workers
    from jobs.common import connect_ray
    from pipelines.prepare import PrepareConfig, prepare
    from pipelines.search import guide_models, prompt_seeds
    from w2s.config import load_config
    from w2s.runs import markdown_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", default="configs/prepare.yaml")
    parser.add_argument("--cache-dir", help="the prepare config's cache_dir, if not its own")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64, help="prompts in flight at once in the pipeline")
    parser.add_argument("--w", type=int, default=4)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--l", type=int, default=5)
    parser.add_argument("--out", default="bench_results/search.json")
    args = parser.parse_args()
    connect_ray()
    config = load_config(PrepareConfig, args.prepare, [f"cache_dir={args.cache_dir}"] if args.cache_dir else [])
    with Workers(Path(config.cache_dir).resolve() / "ray_train", config.cluster) as workers:
        prepared = prepare(config, workers=workers)
        prompts = pq.read_table(prepared.data / "eval_prompts.parquet")["prompt"].to_pylist()[:args.prompts]
        result = compare(prompts, prompt_seeds(0, len(prompts)), guide_models(prepared),
                         BeamShape(w=args.w, k=args.k, l=args.l),
                         Sampling(), args.batch, workers)
    print(markdown_table([result]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
