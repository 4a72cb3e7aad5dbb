"""Weak-to-strong search: the beam bookkeeping (pure), CBS's special cases against transformers' own sampling,
incremental against full-prefix scoring, EFT's vocabulary check, and the job on the tiny world and on models given
by path (judged by your judges)."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from w2s.search import BeamShape, Chunk, chunk_beam_search, select_parents

ROOT = Path(__file__).resolve().parents[1]


def test_select_parents_keeps_the_best_w_of_each_prompt_and_copies_them_k_times():
    scores = np.array([0.1, 0.9, 0.5, 0.9,   # prompt 0: rows 1 and 3 tie at the top: the lower index first
                       3.0, 1.0, 2.0, 0.0])  # prompt 1: rows 4 and 6
    assert select_parents(scores, 2, w=2, k=2).tolist() == [1, 3, 1, 3, 4, 6, 4, 6]
    assert select_parents(scores, 2, w=1, k=4).tolist() == [1, 1, 1, 1, 4, 4, 4, 4]


class _Toy:
    """A strong model whose row at position i samples the token 10 + i at each step, or its end (token 0) at the
    steps `ends` gives it; a finished row samples nothing."""

    def __init__(self, n_rows: int, ends: set[tuple[int, int]] = frozenset()):
        self.ends, self.step, self.calls = ends, 0, []
        self.finished = np.zeros(n_rows, dtype=bool)

    def propose(self, parents, n_tokens):
        self.calls.append((None if parents is None else parents.tolist(), n_tokens))
        if parents is not None:
            self.finished = self.finished[parents]
        tokens = []
        for i, done in enumerate(self.finished):
            ends = (i, self.step) in self.ends
            tokens.append([] if done else [0] if ends else [10 + i] * n_tokens)
            self.finished[i] |= ends
        self.step += 1
        return Chunk(tokens, self.finished.copy())


def _sum(parents, chunk, rows, complete, previous):
    return np.array([float(sum(r)) for r in rows])


def _finished_first(parents, chunk, rows, complete, previous):
    return np.array([100.0 if 0 in r else float(sum(r)) for r in rows])


def test_cbs_keeps_the_best_w_and_returns_the_best_of_the_final_pool():
    # one prompt, W=1, K=2: row 0 ends at once with a low score and is dropped; the kept row is copied and grows
    toy = _Toy(2, ends={(0, 0)})
    [found] = chunk_beam_search(1, BeamShape(w=1, k=2, l=2), 6, toy.propose, _sum)
    assert toy.calls == [(None, 2), ([1, 1], 2), ([1, 1], 2)]
    assert found.tokens == [11] * 6 and not found.finished
    assert found.strong_tokens == 1 + 2 + 4 + 4  # row 0 sampled its end only; then two rows of 2 tokens, twice


def test_a_finished_candidate_stays_in_the_pool():
    # the descendant at position 0 ends at step 1; scored best, it is kept (copied K times) and returned
    toy = _Toy(2, ends={(0, 1)})
    [found] = chunk_beam_search(1, BeamShape(w=1, k=2, l=2), 6, toy.propose, _finished_first)
    assert toy.calls == [(None, 2), ([1, 1], 2), ([0, 0], 2)]
    assert found.tokens == [11, 11, 0] and found.finished and found.strong_tokens == 4 + 3
    # scored below the unfinished one, it is dropped
    toy = _Toy(2, ends={(0, 1)})
    [found] = chunk_beam_search(1, BeamShape(w=1, k=2, l=2), 6, toy.propose, _sum)
    assert found.tokens == [11] * 6


def test_best_of_n_and_sampling_are_one_chunk():
    toy = _Toy(3)
    [found] = chunk_beam_search(1, BeamShape.best_of_n(3), 5, toy.propose, _sum)
    assert toy.calls == [(None, 5)] and found.tokens == [12] * 5 and found.strong_tokens == 15


# ---- on the tiny world's models, hosted by the tests' shared Ray workers -------------------------------------

@pytest.fixture(scope="module")
def tiny_search(workers, tiny_guide_models):
    """The tiny world's strong base and its guides (weak aligned, weak base) on hosts, its held-out prompts."""
    from pipelines.search import start_guides

    models, prompts = tiny_guide_models
    return start_guides(models, True, workers), models, prompts[:8]


def test_the_strong_host_takes_every_cpu_and_the_guides_share_them(tiny_search):
    """The strong model samples while its guides wait and they score while it waits: its host gets the (test)
    cluster's 4 CPUs as torch threads, the two guides 2 each (never more than the machine has)."""
    import os

    import ray

    guides, _, _ = tiny_search
    threads = {role: ray.get(ref.actor.where.remote())["threads"] for role, ref in guides.hosts.items()}
    assert threads == {"strong": min(4, os.cpu_count()), "tuned": min(2, os.cpu_count()),
                       "untuned": min(2, os.cpu_count())}


def _local(spec):
    from w2s.modeling import load_model

    return load_model(spec)[0]


def _generate_ids(model, tokenizer, prompt: str, n: int, seed: int, sampling) -> list[list[int]]:
    """transformers' own sampling of `n` copies of `prompt` after torch.manual_seed(seed): each row's new token ids
    up to its end of turn (included)."""
    import torch

    from w2s.modeling import encode_prompts

    torch.manual_seed(seed)
    ids = torch.tensor(encode_prompts(tokenizer, [prompt] * n))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                         temperature=sampling.temperature, top_k=sampling.top_k,
                         max_new_tokens=sampling.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, use_cache=True)
    rows = out[:, ids.shape[1]:].tolist()
    end = tokenizer.eos_token_id
    return [row[:row.index(end) + 1] if end in row else row for row in rows]


def _ratio(tuned, untuned, tokenizer, prompt: str, rows: list[list[int]]) -> list[float]:
    """The guides' summed log-ratio of each whole response (end of turn appended where it was cut), by the scoring
    and training code's own forward pass (w2s.modeling.token_logprobs)."""
    from w2s.modeling import encode_prompts, pad_pairs, token_logprobs

    end = tokenizer.eos_token_id
    prompt_ids = encode_prompts(tokenizer, [prompt])[0]
    batch = pad_pairs([(prompt_ids, r if r[-1:] == [end] else r + [end]) for r in rows], tokenizer.pad_token_id, 96)
    return (token_logprobs(tuned, batch).sum(1) - token_logprobs(untuned, batch).sum(1)).tolist()


def test_sampling_and_best_of_n_are_cbs_special_cases_on_the_same_seed(tiny_search):
    """W=K=1 samples what transformers' `generate` samples for each prompt alone; W=1, K=N returns the best, by the
    guides' summed log-ratio (end of turn included), of `generate`'s N samples of the prompt alone."""
    from actors.search import search_batch
    from w2s.search import Sampling

    guides, models, prompts = tiny_search
    sampling, seeds = Sampling(max_new_tokens=20), [7 + i for i in range(len(prompts))]
    strong, tuned, untuned = (_local(models[r]) for r in ("strong", "tuned", "untuned"))
    tokenizer = guides.tokenizer
    plain = search_batch(guides, prompts, seeds, BeamShape.sampling(), sampling)
    best = search_batch(guides, prompts, seeds, BeamShape.best_of_n(4), sampling)
    for i, prompt in enumerate(prompts):
        assert plain[i].tokens == _generate_ids(strong, tokenizer, prompt, 1, seeds[i], sampling)[0]
        rows = _generate_ids(strong, tokenizer, prompt, 4, seeds[i], sampling)
        ratio = _ratio(tuned, untuned, tokenizer, prompt, rows)
        assert best[i].tokens == rows[int(np.argmax(ratio))]
        assert best[i].score == pytest.approx(max(ratio), abs=1e-4)
    assert len({tuple(f.tokens) for f in plain}) > 1  # really sampled


def test_incremental_and_full_prefix_scoring_agree(tiny_search):
    from actors.search import search_batch
    from w2s.search import Sampling

    guides, _, prompts = tiny_search
    seeds, shape, sampling = list(range(len(prompts))), BeamShape(w=2, k=3, l=3), Sampling(max_new_tokens=16)
    incremental = search_batch(guides, prompts, seeds, shape, sampling, "incremental")
    full = search_batch(guides, prompts, seeds, shape, sampling, "full")
    assert [f.tokens for f in incremental] == [f.tokens for f in full]
    assert [f.score for f in incremental] == pytest.approx([f.score for f in full], abs=1e-4)


def test_eft_and_incremental_scoring_refuse_guides_with_another_tokenizer(checkpoints, mismatched_checkpoint):
    from w2s.modeling import TokenizerMismatchError
    from pipelines.search import check_guides
    from w2s.modeling import ModelSpec

    models = {"strong": ModelSpec(path=str(mismatched_checkpoint)), "tuned": ModelSpec(path=str(checkpoints["weak"])),
              "untuned": ModelSpec(path=str(checkpoints["weak"]))}
    with pytest.raises(TokenizerMismatchError, match="EFT .* one vocabulary.*'strong' and 'tuned'.*eft: false"):
        check_guides(models, "full", eft=True)
    with pytest.raises(TokenizerMismatchError, match="incremental scoring.*scoring: full"):
        check_guides(models, "incremental", eft=False)
    assert check_guides(models, "full", eft=False) is False
    same = {**models, "strong": ModelSpec(path=str(checkpoints["strong"]))}
    assert check_guides(same, "incremental", eft=True) is True


@pytest.fixture(scope="module")
def world_search(workers, tiny_cache, tmp_path_factory) -> tuple[str, Path]:
    """The search job on the tiny world: (what it printed, its run folder)."""
    from tests.conftest import job_in_process

    runs = tmp_path_factory.mktemp("search_runs")
    output = job_in_process("search", str(ROOT / "configs/tiny_search.yaml"), ROOT, workers,
                            f"runs_dir={runs}", f"cache_dir={tiny_cache}")
    return output, runs / "tiny_search"


def test_search_job_reports_every_method_at_matched_budgets(world_search):
    output, run = world_search
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"sampling", "best_of_n", "cbs", "eft"}
    for result in metrics["methods"].values():
        assert {"helpful", "harmless", "total", "pgr", "strong_tokens_per_prompt"} <= set(result)
    methods = metrics["methods"]
    assert methods["best_of_n"]["k"] == methods["cbs"]["w"] * methods["cbs"]["k"]  # matched rows per prompt
    assert methods["sampling"]["strong_tokens_per_prompt"] < methods["best_of_n"]["strong_tokens_per_prompt"]
    assert [r["rows_per_prompt"] for r in metrics["budget_sweep"]] == [1, 2, 4]
    examples = pq.read_table(run / "examples" / "search_generations.parquet")
    assert {"cbs_response", "best_of_n_gold", "eft_response"} <= set(examples.column_names)
    assert (run / "plots" / "budget.png").stat().st_size > 0
    assert "Budget: CBS and Best-of-N" in output and "| cbs " in (run / "report.md").read_text()


def test_search_on_your_own_models_is_judged_by_your_judges(workers, tiny_guide_models, judges, world_search,
                                                          tmp_path):
    """The tiny world's models by path, as anyone's checkpoints, on a prompt file (one prompt too long, set aside
    with its reason): the same searches as the world's job on the same prompts, every response scored by the
    reward model; a judge of the wrong kind is refused before any host starts."""
    import yaml

    from pipelines.search import SearchConfig, run_search
    from tests.conftest import job_in_process
    from w2s.modeling import ModelLoadError
    from w2s.runs import RunDir

    models, prompts = tiny_guide_models
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in [*prompts[:5], "q: " + "zorb " * 40]))
    config = {**yaml.safe_load((ROOT / "configs/tiny_search.yaml").read_text()), "run_name": "own", "prepare": None,
              "models": {role: spec.model_dump(mode="json") for role, spec in models.items()},
              "evaluate": {"prompts": str(prompt_file), "judges": {"reward": {"path": str(judges.reward)}}}}
    (tmp_path / "own.yaml").write_text(yaml.safe_dump(config))
    output = job_in_process("search", str(tmp_path / "own.yaml"), tmp_path, workers, f"runs_dir={tmp_path / 'runs'}")
    run = tmp_path / "runs" / "own"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["evaluation_setup"]["judged_prompts"] == 5 and metrics["evaluation_setup"]["set_aside_rows"] == 1
    [reason] = pq.read_table(run / "examples" / "evaluation_rejected_rows.parquet")["error"].to_pylist()
    assert "too long" in reason, reason
    assert set(metrics["evaluation"]) == set(SearchConfig(**config).judged())
    assert metrics["evaluation"]["weak_aligned"]["tie"] == 1.0  # the reference against itself
    for name in ("sampling", "best_of_n", "cbs", "eft"):
        assert {"reward_mean", "win", "lose", "strong_tokens_per_prompt"} <= set(metrics["methods"][name])
    assert [r["rows_per_prompt"] for r in metrics["budget_sweep"]] == [1, 2, 4]
    # by path, the same models sample and select what the world's job did on the same prompts and seeds
    own = pq.read_table(run / "examples" / "evaluation.parquet")
    world = pq.read_table(world_search[1] / "examples" / "search_generations.parquet").slice(0, 5)
    for name in ("sampling", "best_of_n", "cbs", "eft"):
        assert own[f"{name}_response"].to_pylist() == world[f"{name}_response"].to_pylist(), name
    assert "Your judges, against weak_aligned" in output and "Cost of each search" in (run / "report.md").read_text()
    assert (run / "plots" / "budget.png").stat().st_size > 0 and (run / "plots" / "evaluation.png").stat().st_size > 0

    config["evaluate"]["judges"]["reward"]["path"] = str(judges.two_labels)
    with pytest.raises(ModelLoadError, match="expected num_labels 1"):
        run_search(SearchConfig(**config), RunDir(tmp_path / "runs", "refused"), workers=None)


def test_a_strong_model_of_another_tokenizer_is_guided_by_rescoring_its_text(workers, tiny_cache, tiny_guide_models,
                                                                             tmp_path):
    """`strong:` pretrains a strong base with a BPE tokenizer trained on the world's corpus. The character-level
    guides cannot read its token ids: EFT is refused, and `scoring: full` guides it by re-scoring the decoded text,
    so each response's guide score is the tuned minus the untuned log-prob of that text (and its end of turn) in
    the guides' own tokens."""
    from tests.conftest import job_in_process
    from w2s.modeling import ModelSpec, TokenizerMismatchError, TooLongError, load_model, response_logprobs

    strong = ("{size: {n_layer: 2, n_embd: 32, n_head: 2}, bpe_vocab_size: 128, train: {mode: lm, lr: 3.0e-3, "
              "epochs: 1, batch_size: 32, num_workers: 2}}")
    overrides = [f"runs_dir={tmp_path}", f"cache_dir={tiny_cache}", "run_name=bpe", f"strong={strong}",
                 "scoring=full", "budget_sweep=[]"]
    with pytest.raises(TokenizerMismatchError, match="EFT adds the guides' log-probs"):
        job_in_process("search", str(ROOT / "configs/tiny_search.yaml"), ROOT, workers, *overrides)
    # 24 new tokens of up to 4 characters each do not fit the guides' 96 positions: refused, the fix named
    with pytest.raises(TooLongError, match="lower sampling.max_new_tokens to") as refused:
        job_in_process("search", str(ROOT / "configs/tiny_search.yaml"), ROOT, workers, *overrides, "eft=false",
                       "run_name=bpe_long")
    fits = int(str(refused.value).split("lower sampling.max_new_tokens to ")[1].split()[0])
    assert 0 < fits < 24
    job_in_process("search", str(ROOT / "configs/tiny_search.yaml"), ROOT, workers, *overrides, "eft=false",
                   "run_name=bpe_full", f"sampling.max_new_tokens={fits}")
    metrics = json.loads((tmp_path / "bpe_full" / "metrics.json").read_text())
    assert "search_strong_base" in metrics["models"] and set(metrics["methods"]) == {"sampling", "best_of_n", "cbs"}
    examples = pq.read_table(tmp_path / "bpe_full" / "examples" / "search_generations.parquet").to_pylist()
    # the strong model's tokens are BPE merges: fewer of them than the characters they spell
    chars = sum(len(r["sampling_response"]) + 1 for r in examples) / len(examples)  # + its end of turn
    assert metrics["methods"]["sampling"]["strong_tokens_per_prompt"] < 0.9 * chars
    [strong_path] = tiny_cache.glob("search_strong_base-*/model")
    assert len(load_model(ModelSpec(path=str(strong_path)))[1]) == 128
    summed = {}
    for role in ("tuned", "untuned"):
        model, tokenizer = load_model(tiny_guide_models[0][role])
        summed[role] = np.array([float(np.sum(x, dtype=np.float64)) for x in response_logprobs(
            model, tokenizer, [r["prompt"] for r in examples], [r["cbs_response"] for r in examples], 96)])
    expected = summed["tuned"] - summed["untuned"]
    assert np.allclose([r["cbs_guide_score"] for r in examples], expected, atol=1e-3), expected


def test_the_official_style_loop_gives_the_pipelines_responses(workers, tiny_guide_models):
    """The benchmark's two sides, one prompt at a time with full re-scoring against batched and incremental, sample
    and select the same responses from the same seeds."""
    from benchmarks.search import compare
    from w2s.search import Sampling

    models, prompts = tiny_guide_models
    result = compare(prompts[:6], [5, 6, 7, 8, 9, 10], models, BeamShape(w=2, k=2, l=3), Sampling(max_new_tokens=12),
                     batch=6, workers=workers)
    assert result["same_responses"] == 1.0
    assert result["pipeline_tokens_per_s"] > 0 and result["official_tokens_per_s"] > 0
