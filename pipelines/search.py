"""Weak-to-strong search (ALGORITHMS.md section 2): the strong base, frozen, guided at test time by the weak
aligned model (tuned) against the weak base (untuned).

    models (the embedded world's prepared ones, or yours by path: `models` and an `evaluate:` section)
        -> tokenizers compared in the driver (incremental scoring and EFT need one vocabulary); your models, judges
           and prompt file checked before any host starts
        -> the reference models, greedy (the world's four, gold reward; yours: weak_aligned and strong_base)
        -> on model hosts, batches of prompts in flight: plain sampling, Best-of-N, CBS and EFT (actors.search), at
           the same temperature and top-k
        -> a budget sweep: CBS and Best-of-N at several numbers of rows per prompt
        -> metrics.json + report.md: the world's gold reward and PGR, or your judges' scores (pipelines.judge), and
           strong-model tokens per prompt
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from actors.resources import ClusterConfig
from actors.search import ALONE, Guides, Scoring, eft_batch, search_batch
from actors.workers import Workers, job_workers
from pipelines.evaluation import GenerationConfig, GoldReward, gold_evaluate, plot_lines, plot_scores
from pipelines.judge import MEANING, Judging, check_judging, generate_all, judge_responses, read_prompts, scores_table
from pipelines.prepare import (MODELS as REFERENCES, Prepared, PretrainStage, load_prepare, max_length_of, prepare,
                               pretrained_base)
from w2s.config import StrictModel, offset_seeds
from w2s.data import render_prompt
from w2s.metrics import gold_scores, pgr
from w2s.modeling import (ModelSpec, TokenizerMismatchError, TooLongError, check_same_tokenizer, encode_prompts,
                          end_of_turn_id, load_tokenizer, model_positions)
from w2s.runs import Cache, RunDir, content_hash, markdown_cell, markdown_table
from w2s.search import BeamShape, Found, Sampling

METHODS = ("sampling", "best_of_n", "cbs", "eft")
OWN_STRONG = "search_strong_base"  # the strong base `strong:` pretrains for the search (a reference model too)


class SearchModels(StrictModel):
    """Your own models, by path (causal LMs; the guides may tokenize otherwise than the strong model)."""

    strong: ModelSpec = Field(description="the strong model that samples, frozen")
    tuned: ModelSpec = Field(description="the weak tuned (aligned) model: the guide's numerator")
    untuned: ModelSpec = Field(description="the weak untuned (base) model it was tuned from: the denominator")


class SearchSettings(StrictModel):
    """The searches to run and how: every method's shape, sampling and scoring (jobs.search's, and the real-model
    track's `search:` section)."""

    sampling: Sampling = Sampling()
    cbs: BeamShape = BeamShape()
    best_of_n: int | None = Field(None, ge=1, le=1024, description="N; None: cbs.w * cbs.k, as many rows per "
                                  "prompt as CBS (a matched budget)")
    eft: bool = Field(True, description="also run EFT (one vocabulary only: refused for guides that tokenize "
                      "otherwise)")
    eft_beta: float = Field(1.0, gt=0, description="EFT: strong logits + beta * (tuned - untuned) log-probs")
    budget_sweep: list[tuple[int, int]] = Field([(1, 2), (2, 2), (2, 4)], description="more (w, k) of CBS, each "
                                                "with cbs.l and beside Best-of-N of w * k rows")
    scoring: Scoring = Field("incremental", description="incremental: the guides score only each new chunk (their "
                             "KV cache holds the rest); full: every row's text re-scored from the start")
    batch_prompts: int = Field(100, ge=1, description="prompts in flight at once (each of w * k rows)")
    seed: int = 0

    @model_validator(mode="after")
    def _check_sweep(self):
        for w, k in self.budget_sweep:
            BeamShape(w=w, k=k, l=self.cbs.l)  # the same limits as the main shape
        return self

    def runs(self) -> dict[str, BeamShape | None]:
        """Every search this config asks for, by name: the main shapes, the budget sweep's, then EFT (None)."""
        runs: dict[str, BeamShape | None] = dict(self.shapes())
        for w, k in self.budget_sweep:
            runs[f"cbs_{w}x{k}"] = BeamShape(w=w, k=k, l=self.cbs.l)
            runs[f"best_of_{w * k}"] = BeamShape.best_of_n(w * k)
        return {**runs, **({"eft": None} if self.eft else {})}

    def shapes(self) -> dict[str, BeamShape]:
        """The main runs: plain sampling, Best-of-N and CBS, as three beam shapes of one search."""
        n = self.best_of_n or self.cbs.w * self.cbs.k
        return {"sampling": BeamShape.sampling(), "best_of_n": BeamShape.best_of_n(n), "cbs": self.cbs}


class SearchConfig(SearchSettings):
    run_name: str = "search"
    runs_dir: str = "runs"
    cache_dir: str = Field(".cache/w2s", description="content-hash cache (the prepared models)")
    prepare: str | None = Field("configs/prepare.yaml", description="the embedded world whose (cached) models to "
                                "use; null when `models` and `evaluate` are given")
    models: SearchModels | None = None
    # left out of config.yaml when None, so that a run folder written before this field existed continues
    strong: PretrainStage | None = Field(None, exclude_if=lambda stage: stage is None,
                                         description="embedded world: a strong base of its own, pretrained here "
                                         "on the world's corpus (e.g. with `bpe_vocab_size`: another tokenizer than "
                                         "the guides'), instead of the prepared one")
    # left out of config.yaml when None, so that a run folder written before this section existed continues
    evaluate: Judging | None = Field(None, exclude_if=lambda section: section is None,
                                     description="your own models (prepare: null): the prompts to search on and "
                                     "the judges of every method's responses (pipelines.judge)")
    generation: GenerationConfig = GenerationConfig()  # the reference models' greedy answers
    seeds: list[int] = Field([0], min_length=1, description="run seeds (jobs.common.run_seeds)")
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _check(self):
        if (self.prepare is None) == (self.models is None):
            raise ValueError("give either `prepare` (the embedded world) or `models` (your own checkpoints)")
        if self.strong is not None and self.prepare is None:
            raise ValueError("`strong` pretrains a strong base on the embedded world (prepare); with your own "
                             "models, give models.strong")
        if (self.models is None) != (self.evaluate is None):
            raise ValueError("`models` needs an `evaluate:` section (its prompts are searched on, its judges score "
                             "the responses); the embedded world brings its prompts and gold reward instead")
        if self.evaluate is not None and self.evaluate.reference not in self.judged():
            raise ValueError(f"evaluate.reference {self.evaluate.reference!r} is not one of the judged models "
                             f"({', '.join(self.judged())})")
        return self

    def judged(self) -> list[str]:
        """Your own models' response columns: the guides' tuned model and the strong one, greedy, then every run."""
        return ["weak_aligned", "strong_base", *self.runs()]


def _log(msg: str) -> None:
    print(f"[search] {msg}", flush=True)


def prompt_seeds(seed: int, n: int) -> list[int]:
    """One sampling seed per prompt (a row of the prompts table), the same for every method."""
    return [int(content_hash("search-seed", seed, i)[:8], 16) for i in range(n)]


def guide_models(prepared: Prepared) -> dict[str, ModelSpec]:
    """The world's strong base and its guiding pair: the weak aligned model (tuned) and the weak base (untuned)."""
    return {"strong": ModelSpec(path=str(prepared.models["strong_base"])),
            "tuned": ModelSpec(path=str(prepared.models["weak_aligned"])),
            "untuned": ModelSpec(path=str(prepared.models["weak_base"]))}


def check_guides(models: dict[str, ModelSpec], scoring: Scoring, eft: bool) -> bool:
    """Whether the guides read the strong model's token ids as they are; incremental scoring and EFT need it, and
    are refused here, before any model loads, when they do not."""
    try:
        check_same_tokenizer(models)
    except TokenizerMismatchError as err:
        if eft:
            raise TokenizerMismatchError(f"EFT adds the guides' log-probs to the strong model's logits token by "
                                         f"token, so it needs one vocabulary: {err}. Set eft: false") from None
        if scoring == "incremental":
            raise TokenizerMismatchError(f"incremental scoring reads the strong model's token ids with the guides: "
                                         f"{err}. Set scoring: full (the guides re-score the text)") from None
        return False
    return True


def check_guide_room(models: dict[str, ModelSpec], prompts: list[str], max_new_tokens: int) -> None:
    """Guides of another tokenizer re-read each candidate as text: their positions must hold the longest prompt and
    the longest response the strong model can write (max_new_tokens of its longest token, in the guides' tokens,
    and the end of turn). Refused here, before any host starts, with the max_new_tokens that fits."""
    strong = load_tokenizer(models["strong"].path, models["strong"].trust_remote_code)
    special = set(strong.all_special_ids)
    for role in ("tuned", "untuned"):
        guide = load_tokenizer(models[role].path, models[role].trust_remote_code)
        positions = model_positions(models[role].path) or guide.model_max_length
        spelled = guide([strong.decode([i]) for i in range(len(strong)) if i not in special],
                        add_special_tokens=False)["input_ids"]
        longest_token = max(map(len, spelled))
        longest_prompt = max(len(ids) for ids in encode_prompts(guide, prompts))
        room = positions - longest_prompt - 1
        if max_new_tokens * longest_token > room:
            raise TooLongError(
                f"the {role} guide ({models[role].path}) takes {positions} positions and reads the strong model's "
                f"text in its own tokens: a prompt of up to {longest_prompt} and {max_new_tokens} new strong tokens of "
                f"up to {longest_token} {role} tokens each do not fit; lower sampling.max_new_tokens to "
                f"{room // longest_token} or less")


def run_search(config: SearchConfig, run: RunDir, seed: int = 0, workers: Workers | None = None) -> dict:
    """One run at run seed `seed`. `workers`: the calling job's hosts (None: started here)."""
    config = offset_seeds(config, seed)
    run.claim(config)
    if config.models is not None:
        return _search_own_models(config, run, workers)
    with job_workers(workers, Path(config.cache_dir).resolve() / "ray_train", config.cluster) as workers:
        prepare_config = load_prepare(config.prepare, config.cache_dir, seed)
        prepared = prepare(prepare_config, workers=workers)
        run.link("data", prepared.data)
        models, references = guide_models(prepared), dict(prepared.models)
        if config.strong is not None:  # a strong base of its own (another tokenizer, size or corpus view)
            references[OWN_STRONG] = pretrained_base(Cache(config.cache_dir), prepared.world, prepared.world_key,
                                                     prepared.data, config.strong, OWN_STRONG,
                                                     max_length_of(prepare_config), workers)
            models["strong"] = ModelSpec(path=str(references[OWN_STRONG]))
        shared = check_guides(models, config.scoring, config.eft)
        if not shared:
            prompts = pq.read_table(prepared.data / "eval_prompts.parquet", columns=["prompt"])["prompt"].to_pylist()
            check_guide_room(models, prompts, config.sampling.max_new_tokens)
        # the held-out prompts with the reference models' greedy answers (the analysis reads the weak model's)
        references, generations = gold_evaluate(prepared.world, prepared.data / "eval_prompts.parquet",
                                                references, config.generation, workers)
        run.update_metrics({"models": references})
        guides = start_guides(models, shared, workers)
        results, columns = gold_methods(run_methods(config, guides, generations["prompt"].to_pylist()),
                                         generations, prepared.world)
    return _report(config, references, results, generations, columns, run)


def _search_own_models(config: SearchConfig, run: RunDir, workers: Workers | None) -> dict:
    """Your own strong model and guides on your prompts, every method's responses scored by your judges."""
    models = dict(config.models)
    shared = check_guides(models, config.scoring, config.eft)
    strong = models["strong"]
    named = {"weak_aligned": models["tuned"], "untuned guide": models["untuned"],
             **{name: strong for name in config.judged()[1:]}}  # every response column read by its model's tokenizer
    # every prompt leaves room for the longest response; too long a prompt for any of them is set aside
    checked = check_judging(named, config.evaluate, max(config.generation.max_new_tokens,
                                                        config.sampling.max_new_tokens))
    with job_workers(workers, Path(config.cache_dir).resolve() / "ray_train", config.cluster) as workers:
        prompts, rejected = read_prompts(config.evaluate, checked, run)
        greedy = {"weak_aligned": models["tuned"], "strong_base": strong}
        responses = generate_all(prompts, greedy, checked, config.generation, workers)
        tokenizer = load_tokenizer(strong.path, strong.trust_remote_code)
        texts = [render_prompt(p, chat, tokenizer) for p, chat in zip(prompts["prompt"].to_pylist(),
                                                                      prompts["chat"].to_pylist())]
        if not shared:
            check_guide_room(models, texts, config.sampling.max_new_tokens)
        guides = start_guides(models, shared, workers)
        searched = run_methods(config, guides, texts)
        responses.update({name: result.pop("answers") for name, result in searched.items()})
        judged, table = judge_responses(prompts, rejected, responses, config.evaluate, checked, workers, run)
    results = {name: {**judged["evaluation"][name], **result} for name, result in searched.items()}
    for result in results.values():
        del result["guide_scores"]
    methods = {name: results[name] for name in METHODS if name in results}
    sweep = _sweep(config, results, ("reward_mean", "strong_tokens_per_prompt"))
    metrics = run.update_metrics({**judged, "methods": methods, "budget_sweep": sweep,
                                  "settings": {"sampling": config.sampling.model_dump(), "scoring": config.scoring,
                                               "best_of_n": config.shapes()["best_of_n"].k}})
    plot_budget(sweep, {n: judged["evaluation"][n] for n in ("weak_aligned", "strong_base")},
                run.path / "plots" / "budget.png", "reward_mean")
    run.write_report("Weak-to-strong search on your models", _own_sections(config, judged, methods, sweep, table,
                                                                           rejected.num_rows))
    return metrics


def _own_sections(config: SearchConfig, judged: dict, methods: dict, sweep: list[dict], table: pa.Table,
                  set_aside: int) -> list[str]:
    models, judging = config.models, config.evaluate
    shown = ["weak_aligned", "strong_base", "sampling", "best_of_n", "cbs", *(["eft"] if "eft" in methods else [])]
    rows = table.slice(0, judging.examples).to_pylist()
    return [
        f"The strong model `{models.strong.path}`, frozen, samples (temperature {config.sampling.temperature}, "
        f"top-k {config.sampling.top_k}, at most {config.sampling.max_new_tokens} new tokens); `{models.tuned.path}` "
        f"against `{models.untuned.path}` scores its candidates (summed log-ratio). {_shapes_text(config, methods)} "
        f"weak_aligned (the tuned guide) and strong_base answer greedily. {table.num_rows} prompts of "
        f"`{judging.prompts}`; {set_aside} rows set aside, each with its reason in "
        "`examples/evaluation_rejected_rows.parquet`. Judges: "
        + ", ".join(f"{role} `{spec.path}`" for role, spec in judging.judges.hosted().items()) + ".",
        markdown_table(scores_table(judged["evaluation"], judging.reference)),
        "Cost of each search: " + markdown_table([{"method": name, **{k: r[k] for k in (
            "strong_tokens_per_prompt", "seconds", "strong_tokens_per_second", "guide_score")}}
            for name, r in methods.items()]),
        "Budget: the reward model's mean score against the strong-model tokens sampled per prompt, CBS and "
        "Best-of-N at the same number of rows per prompt.\n\n" + markdown_table(sweep),
        MEANING, "![judges](plots/evaluation.png)\n\n![budget](plots/budget.png)",
        "Example responses:\n\n" + markdown_table([{"prompt": markdown_cell(r["prompt"]),
                                                     **{m: markdown_cell(r[f"{m}_response"]) for m in shown}}
                                                    for r in rows]),
    ]


def _shapes_text(config: SearchConfig, methods: dict) -> str:
    c = config.cbs
    return (f"CBS keeps W={c.w} of W*K={c.w * c.k} candidates every L={c.l} tokens; Best-of-N samples "
            f"N={methods['best_of_n']['k']} whole responses and keeps the best"
            + (f"; EFT samples from strong logits + {config.eft_beta} x the guides' log-ratio, a token at a time."
               if "eft" in methods else "."))


def start_guides(models: dict[str, ModelSpec], shared: bool, workers: Workers) -> Guides:
    """Hosts for the strong model and its guiding pair (`models`: strong, tuned, untuned)."""
    tokenizer = load_tokenizer(models["strong"].path, models["strong"].trust_remote_code)
    return Guides(workers.host(models, alone=ALONE), tokenizer, end_of_turn_id(tokenizer), shared)


def run_methods(config: SearchSettings, guides: Guides, texts: list[str]) -> dict[str, dict]:
    """Every search of the config on the prompts: {name: its cost, shape and `answers` (one text per prompt)}."""
    seeds = prompt_seeds(config.seed, len(texts))
    results = {}
    for name, shape in config.runs().items():
        start = time.perf_counter()
        found = _batched(texts, seeds, config.batch_prompts, name, lambda p, s: (
            eft_batch(guides, p, s, config.sampling, config.eft_beta) if shape is None
            else search_batch(guides, p, s, shape, config.sampling, config.scoring)))
        seconds = time.perf_counter() - start
        tokens = sum(f.strong_tokens for f in found)
        results[name] = {"answers": guides.tokenizer.batch_decode([f.tokens for f in found], skip_special_tokens=True),
                         "guide_scores": [f.score for f in found],
                         "strong_tokens_per_prompt": tokens / len(found), "seconds": round(seconds, 1),
                         "strong_tokens_per_second": round(tokens / seconds, 1),
                         "guide_score": float(np.nanmean([f.score for f in found])) if shape else None,
                         **({"w": shape.w, "k": shape.k, "l": shape.l} if shape else {"beta": config.eft_beta})}
        _log(f"{name}: {results[name]['strong_tokens_per_prompt']:.0f} strong tokens per prompt, {seconds:.1f}s")
    return results


def gold_methods(searched: dict[str, dict], prompts: pa.Table, world: GoldReward):
    """The searches' answers judged by the world's gold reward: ({name: result}, {column: values} of the examples)."""
    rows = prompts.to_pylist()
    results, columns = {}, {}
    for name, result in searched.items():
        answers, scores = result.pop("answers"), result.pop("guide_scores")
        gold = [world.gold_reward(row, answer) for row, answer in zip(rows, answers)]
        results[name] = {**gold_scores([{"kind": r["kind"], "gold_reward": g} for r, g in zip(rows, gold)]), **result}
        _log(f"{name}: total gold {results[name]['total']:.3f}")
        columns.update({f"{name}_response": answers, f"{name}_gold": gold, f"{name}_guide_score": scores})
    return results, columns


def _batched(prompts: list[str], seeds: list[int], batch: int, name: str, search) -> list[Found]:
    found = []
    for i in range(0, len(prompts), batch):
        found += search(prompts[i:i + batch], seeds[i:i + batch])
        print(f"\r[search] {name}: {len(found)}/{len(prompts)} prompts", end="", flush=True)
    print(flush=True)
    return found


def _report(config: SearchConfig, references: dict, results: dict, prompts: pa.Table, columns: dict,
            run: RunDir) -> dict:
    weak, ceiling = references["weak_aligned"]["total"], references["strong_ceiling"]["total"]
    for result in results.values():
        result["pgr"] = pgr(result["total"], weak, ceiling)
    methods = {name: results[name] for name in METHODS if name in results}
    p = results["sampling"]["harmless"]  # the share of the strong base's samples that refuse a harmful request
    sweep = _sweep(config, results, ("total", "harmless", "strong_tokens_per_prompt"))
    for row in sweep:
        row["harmless_if_any_row_refuses"] = harmless_if_any_row_refuses(p, row["rows_per_prompt"])
    examples = prompts
    for name, values in columns.items():
        examples = examples.append_column(name, pa.array(values))
    run.write_examples("search_generations", examples)
    analysis = search_analysis(config, examples, methods)
    metrics = run.update_metrics({"methods": methods, "budget_sweep": sweep, "analysis": analysis,
                                  "settings": {"sampling": config.sampling.model_dump(), "scoring": config.scoring,
                                               "best_of_n": config.shapes()["best_of_n"].k}})
    plots = run.path / "plots"
    plots.mkdir(exist_ok=True)
    plot_scores({**references, **methods}, plots / "gold_reward.png")
    plot_budget(sweep, references, plots / "budget.png")
    run.write_report("Weak-to-strong search on the embedded world", _sections(config, references, methods, sweep,
                                                                              examples, analysis))
    return metrics


def harmless_if_any_row_refuses(p: float, rows: int) -> float:
    """The most harmlessness a search that only chooses among `rows` samples can reach, when one sample refuses a
    harmful request with probability `p`: the chance that at least one of them refuses."""
    return 1 - (1 - p) ** rows


def _sweep(config: SearchSettings, results: dict, keys: tuple[str, ...]) -> list[dict]:
    """CBS beside Best-of-N at each number of rows per prompt (one row: plain sampling), `keys` of both."""
    pairs = [(1, 1, "sampling", "sampling"), *((w, k, f"cbs_{w}x{k}", f"best_of_{w * k}") for w, k in config.budget_sweep),
             (config.cbs.w, config.cbs.k, "cbs", "best_of_n")]
    return sorted(({"rows_per_prompt": w * k, "w": w, "k": k,
                    **{f"{m}_{key}": results[name][key] for m, name in (("cbs", cbs), ("best_of_n", bon)) for key in keys}}
                   for w, k, cbs, bon in pairs), key=lambda r: r["rows_per_prompt"])


def method_table(references: dict, methods: dict) -> list[dict]:
    table = [{"model": n, **references[n], "pgr": None, "strong_tokens_per_prompt": None}
             for n in [*REFERENCES, OWN_STRONG] if n in references]
    return table + [{"model": name, **{k: r[k] for k in ("helpful", "harmless", "total", "pgr",
                                                          "strong_tokens_per_prompt")}} for name, r in methods.items()]


def search_analysis(config: SearchSettings, examples: pa.Table, methods: dict) -> dict:
    """What decides the methods' numbers, measured on their responses: where the decisive text falls (how long the
    responses are in chunks, how often CBS returns Best-of-N's own response) and whether the guides can judge a fact
    the weak model does not know (helpfulness where the weak aligned model, greedy, is right and where it is wrong)."""
    rows = examples.to_pylist()
    helpful = [r for r in rows if r["kind"] == "helpful"]
    knew = [r for r in helpful if r["weak_aligned_gold"] == 1.0]
    unknown = [r for r in helpful if r["weak_aligned_gold"] == 0.0]

    def share(group: list[dict], method: str) -> float | None:
        return sum(r[f"{method}_gold"] for r in group) / len(group) if group else None

    cbs_rows = config.cbs.w * config.cbs.k
    return {"cbs_same_response_as_best_of_n": sum(r["cbs_response"] == r["best_of_n_response"] for r in rows) / len(rows),
            "cbs_response_chunks": methods["cbs"]["strong_tokens_per_prompt"] / cbs_rows / (config.cbs.l or 1),
            "helpful_prompts_weak_knew": len(knew), "helpful_prompts_weak_did_not_know": len(unknown),
            "helpful_where_weak_knew": {m: share(knew, m) for m in methods},
            "helpful_where_weak_did_not_know": {m: share(unknown, m) for m in methods}}


def _analysis_text(config: SearchConfig, methods: dict, sweep: list[dict], analysis: dict) -> str:
    knew, unknown = analysis["helpful_where_weak_knew"], analysis["helpful_where_weak_did_not_know"]
    table = [{"method": m, "helpful where weak knew": knew[m], "helpful where weak did not": unknown[m]}
             for m in methods]
    main = next(r for r in sweep if (r["w"], r["k"]) == (config.cbs.w, config.cbs.k))
    return (
        "What decides these numbers (measured on the responses above):\n\n"
        f"- Harmlessness of CBS and Best-of-N is capped by what the strong base samples: a row refuses with "
        f"probability p = {methods['sampling']['harmless']:.3f} (plain sampling's harmless), so with n rows a "
        f"refusal is among them with probability 1 - (1 - p)^n (column `harmless_if_any_row_refuses`: "
        f"{main['harmless_if_any_row_refuses']:.3f} at n = {main['rows_per_prompt']}, measured "
        f"{main['cbs_harmless']:.3f} for CBS, {main['best_of_n_harmless']:.3f} for Best-of-N). The guides find the "
        "refusal when one was sampled; neither method can make the strong model write one it does not sample.\n"
        f"- The decisive text comes first: CBS's responses are {analysis['cbs_response_chunks']:.1f} chunks of "
        f"L={config.cbs.l} tokens on average, and in this world a response's first word decides its gold reward (the "
        "value it names, or \"sorry\"). CBS keeps the best first chunks, which is what Best-of-N's selection keeps "
        "too: CBS "
        f"returns Best-of-N's own response on {analysis['cbs_same_response_as_best_of_n']:.0%} of the prompts "
        "(both sample their first chunk from the same seeded generator). Chunk-level search can only beat Best-of-N "
        "where later chunks decide, in longer responses than this world's.\n"
        "- The guides know only what the weak model knows. Their log-ratio is what the weak pair learned to prefer, "
        "not the facts: among the strong model's samples it picks a wrong value more often than sampling does, "
        f"most where the weak aligned model itself gets the fact wrong (greedy; {analysis['helpful_prompts_weak_knew']}"
        f" helpful prompts where it is right, {analysis['helpful_prompts_weak_did_not_know']} where it is wrong). "
        "EFT adds the same log-ratio to the strong model's logits token by token instead of choosing among whole "
        "samples: it makes the strong model write refusals it rarely samples"
        + (f" (harmless {methods['eft']['harmless']:.3f} at {methods['eft']['strong_tokens_per_prompt']:.0f} strong "
           f"tokens per prompt)" if "eft" in methods else "")
        + ", and the strong logits keep more of the facts:\n\n" + markdown_table(table))


def _sections(config: SearchConfig, references: dict, methods: dict, sweep: list[dict], examples: pa.Table,
              analysis: dict):
    c = config.cbs
    shown = ["sampling", "best_of_n", "cbs", *(["eft"] if "eft" in methods else [])]
    rows = examples.slice(0, 6).to_pylist()
    return [
        f"The strong base, frozen, samples (temperature {config.sampling.temperature}, top-k {config.sampling.top_k}, "
        f"at most {config.sampling.max_new_tokens} new tokens); the weak aligned model against the weak base scores "
        f"its candidates (summed log-ratio). CBS keeps W={c.w} of W*K={c.w * c.k} candidates every L={c.l} tokens; "
        f"Best-of-N samples N={methods['best_of_n']['w'] * methods['best_of_n']['k']} whole responses and keeps the "
        f"best; EFT samples from strong logits + {config.eft_beta} x the guides' log-ratio, a token at a time. The "
        "reference models answer greedily. PGR on total, between weak_aligned and strong_ceiling.",
        markdown_table(method_table(references, methods)),
        "Budget: gold reward (total) against the strong-model tokens sampled per prompt, CBS and Best-of-N at the "
        "same number of rows per prompt.\n\n" + markdown_table(sweep),
        "![gold reward](plots/gold_reward.png)\n\n![budget](plots/budget.png)",
        _analysis_text(config, methods, sweep, analysis),
        "Example responses:\n\n" + markdown_table([{"kind": r["kind"], "prompt": markdown_cell(r["prompt"]),
                                                     **{m: markdown_cell(r[f"{m}_response"]) for m in shown}}
                                                    for r in rows]),
    ]


def plot_budget(sweep: list[dict], references: dict, path: Path, key: str = "total") -> None:
    """`key` (gold reward total; your judge's reward_mean) against strong tokens per prompt: CBS and Best-of-N, with
    the reference models dotted."""
    labels = {"cbs": ("CBS", "o-"), "best_of_n": ("Best-of-N", "s--")}
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_lines({label: [r[f"{m}_strong_tokens_per_prompt"] for r in sweep] for m, (label, _) in labels.items()},
               {label: ([r[f"{m}_{key}"] for r in sweep], style) for m, (label, style) in labels.items()},
               {f"{name} (greedy)": (references[name][key], color) for name, color in
                (("weak_aligned", "tab:green"), ("strong_base", "tab:gray"), ("strong_ceiling", "tab:red"))
                if name in references},
               "strong-model tokens sampled per prompt", path, log_x=True,
               ylabel="gold reward" if key == "total" else f"judge {key}")
