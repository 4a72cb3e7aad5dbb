"""The real-model track: SmolLM2-135M-Instruct aligned weak-to-strong on real facts and harmful requests.

    task (w2s.real_task)  ->  gold pairs (chat), held-out prompts, weak corpus, each rendered by SmolLM2's template
    weak base             =  a small Llama on SmolLM2's tokenizer, trained here on the corpus's question-answer
                             documents (loss on the answers: it learns the popular facts and to comply with harm)
    score gold pairs under the weak base and SmolLM2 (Ray Data through model hosts)
    weak aligned          =  the weak base + DPO on the gold pairs;   strong ceiling = SmolLM2 + DPO on them
    WSPO                  =  jobs.wspo on these models and pairs (prepare: null), the strong model SmolLM2
    MACPO                 =  jobs.macpo on them (the weak base as the teacher, SmolLM2 as the student)
    search                =  SmolLM2, frozen, samples; the weak aligned model against the weak base guides it (CBS,
                             Best-of-N, plain sampling and EFT of pipelines.search, one vocabulary: incremental)
    evaluate              =  every model answers the held-out prompts greedily; the task's gold reward, PGR and
                             the win rate against the weak aligned model; the gold rule's error rates measured on
                             hand-checked responses (data/real_gold_checks.jsonl)

Every stage is cached by content; the method runs live in the run folder (wspo/, macpo/) as they would on their own.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pydantic import Field, model_validator

from actors.resources import ClusterConfig
from actors.search import ROLES, Guides
from actors.stages import score_preferences
from actors.trainer import TrainConfig
from actors.workers import Workers, job_workers
from pipelines.evaluation import GenerationConfig, examples_table, gold_evaluate, plot_scores
from pipelines.macpo import MACPOConfig, TeacherSpec, run_macpo
from pipelines.search import (SearchSettings, check_guides, gold_methods, harmless_if_any_row_refuses, run_methods,
                              search_analysis, start_guides)
from pipelines.wspo import WSPOConfig, WSPOModels, run_wspo
from w2s.config import StrictModel, offset_seeds
from w2s.data import render_chat
from w2s.metrics import pgr, verdict_by_reward, verdict_shares
from w2s.modeling import (LlamaSize, ModelSpec, init_llama, load_tokenizer, model_positions, resolve_max_length,
                          weights_fingerprint)
from w2s.real_task import REFUSAL, RealTask, RealTaskConfig, is_refusal, rule_errors
from w2s.runs import Cache, RunDir, content_hash, file_hash, markdown_cell, markdown_table
from w2s.smollm2 import DEFAULT_DIR, convert

class WeakStage(StrictModel):
    size: LlamaSize
    train: TrainConfig = Field(description="training on the task's corpus, loss on the answers (mode sft)")


class MACPOSettings(StrictModel):
    """MACPO's own settings (pipelines.macpo.MACPOConfig); its models and pairs are the track's."""

    rounds: int = Field(1, ge=1)
    round_prompts: int = Field(64, ge=1)
    sft: TrainConfig
    student_sft: TrainConfig | None = None
    dpo: TrainConfig
    generation: GenerationConfig = GenerationConfig()


class RealConfig(StrictModel):
    run_name: str = "real"
    runs_dir: str = "runs"
    cache_dir: str = ".cache/w2s"
    strong: ModelSpec = Field(ModelSpec(path=str(DEFAULT_DIR)), description="the strong base (SmolLM2-135M-Instruct "
                              "by default, converted from its PyPI package on first use)")
    task: RealTaskConfig = RealTaskConfig()
    gold_checks: str = Field("data/real_gold_checks.jsonl", description="hand-checked responses (kind, category, "
                             "question, answer, response, label): the gold rule's error rates are measured on them")
    weak: WeakStage
    align: TrainConfig = Field(description="DPO on the gold pairs: weak base -> weak aligned")
    ceiling: TrainConfig = Field(description="DPO on the gold pairs: the strong base -> the strong ceiling")
    wspo: TrainConfig = Field(description="WSPO of the strong base (mode wspo)")
    macpo: MACPOSettings | None = Field(None, description="MACPO with the weak base as the teacher; None: not run")
    search: SearchSettings | None = Field(None, description="weak-to-strong search: the strong base, frozen, guided "
                                          "by the weak aligned model against the weak base; None: not run")
    max_length: int = Field(160, ge=16, description="tokens of prompt + response + EOS for every stage")
    score_batch_size: int = Field(32, ge=1)
    generation: GenerationConfig = GenerationConfig(max_new_tokens=48, batch_size=48)
    seeds: list[int] = Field([0], min_length=1)
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _check(self):
        stages = {"weak.train": (self.weak.train, "sft"), "align": (self.align, "dpo"),
                  "ceiling": (self.ceiling, "dpo"), "wspo": (self.wspo, "wspo")}
        for name, (train, mode) in stages.items():
            if train.mode != mode:
                raise ValueError(f"{name}.mode must be {mode!r}, got {train.mode!r}")
        return self


def _log(msg: str) -> None:
    print(f"[real] {msg}", flush=True)


def run_real(config: RealConfig, run: RunDir, seed: int = 0, workers: Workers | None = None) -> dict:
    """One run of the track at run seed `seed` (every `seed` field shifted by it)."""
    start = time.perf_counter()
    config = offset_seeds(config, seed)
    run.claim(config)
    strong = _strong_model(config)
    max_length = resolve_max_length(config.max_length, {"weak.size": config.weak.size.n_positions,
                                                        "strong": model_positions(strong.path)})
    task = RealTask(config.task)
    cache = Cache(config.cache_dir)
    with job_workers(workers, cache.root.resolve() / "ray_train", config.cluster) as workers:
        data = _task_data(cache, task, strong, run)
        models = _reference_models(config, cache, data, strong, max_length, workers, run)
        methods = {"wspo": _wspo(config, models, data, max_length, run, workers)}
        if config.macpo is not None:
            methods.update(_macpo(config, models, data, max_length, run, workers))
        searched = _search(config, task, data, models, workers) if config.search is not None else ({}, {}, {})
        _evaluate(config, task, data, models, methods, searched, run, workers)
    return run.update_metrics({"wall_seconds": {"real": round(time.perf_counter() - start, 1)}})


def _strong_model(config: RealConfig) -> ModelSpec:
    """The strong base; the default SmolLM2 folder is converted from its package first if it is not there."""
    if Path(config.strong.path).resolve() == DEFAULT_DIR.resolve():
        convert(DEFAULT_DIR)
    return config.strong


def _task_data(cache: Cache, task: RealTask, strong: ModelSpec, run: RunDir) -> Path:
    """pairs.jsonl (gold pairs, chat), eval_prompts.parquet (prompt rendered by the strong model's template,
    question, kind, category, answer) and corpus.parquet (prompt: the rendered question, response: its answer),
    written once."""
    tokenizer = load_tokenizer(strong.path, strong.trust_remote_code)
    key = content_hash("real-task-v2", task.config, file_hash(task.config.facts), tokenizer.chat_template)

    def asked(question: str) -> str:  # the prompt the models read: the question as one user turn
        return render_chat([{"role": "user", "content": question}], tokenizer)

    def build(path: Path) -> None:
        with open(path / "pairs.jsonl", "w") as f:
            for row in task.preference_pairs():
                f.write(json.dumps(row) + "\n")
        prompts = task.eval_prompts()
        for row in prompts:
            row["prompt"] = asked(row["question"])
        pq.write_table(pa.Table.from_pylist(prompts), path / "eval_prompts.parquet")
        corpus = task.corpus()
        pq.write_table(pa.table({"prompt": [asked(d["question"]) for d in corpus],
                                 "response": [d["answer"] for d in corpus]}), path / "corpus.parquet")
        schema = pa.schema([("row", pa.int64()), ("field", pa.string()), ("error", pa.string())])
        pq.write_table(pa.Table.from_pylist(task.set_aside, schema=schema), path / "facts_set_aside.parquet")

    data = cache.build("real_task", key, build, _log)
    run.link("data", data)
    return data


def _reference_models(config: RealConfig, cache: Cache, data: Path, strong: ModelSpec, max_length: int,
                      workers: Workers, run: RunDir) -> dict[str, Path]:
    """The weak base (trained on the corpus), weak aligned and strong ceiling (DPO on the gold pairs), strong base."""
    storage, tensorboard = cache.root.resolve() / "ray_train", run.path / "tensorboard"
    strong_fingerprint = weights_fingerprint(strong.path)  # reads every byte: once
    key = content_hash("real-weak-v2", data.name, config.weak, max_length, strong_fingerprint)

    def train_weak(path: Path) -> None:
        init_llama(config.weak.size, load_tokenizer(strong.path, strong.trust_remote_code), path / "init",
                   config.weak.train.seed)
        workers.train(config.weak.train, path / "init", data / "corpus.parquet", path / "model", f"real-weak-{key}",
                      storage, max_length, tensorboard_dir=tensorboard / "weak_base")

    models = {"weak_base": cache.build("real_weak_base", key, train_weak, _log) / "model", "strong_base": Path(strong.path)}
    fingerprints = {"weak_base": weights_fingerprint(models["weak_base"]), "strong_base": strong_fingerprint}
    dtype = workers.train_dtype(config.align)
    pairs_key = content_hash("real-pairs-v1", data.name, fingerprints, max_length, dtype)

    def score(path: Path) -> None:
        hosts = workers.host({role: ModelSpec(path=str(models[role]), dtype=dtype) for role in models}, turns=True)
        result = score_preferences(data / "pairs.jsonl", hosts, path, tokenizer_path=str(strong.path),
                                   max_length=max_length, batch_size=config.score_batch_size)
        _log(f"scored {result.n_scored} gold pairs; {result.report}")

    scored = cache.build("real_scored_pairs", pairs_key, score, _log) / "scored.parquet"
    for base, out, train in (("weak_base", "weak_aligned", config.align), ("strong_base", "strong_ceiling", config.ceiling)):
        dpo_key = content_hash("real-dpo-v1", pairs_key, fingerprints[base], train, max_length)

        def dpo(path: Path, base=base, out=out, train=train, dpo_key=dpo_key) -> None:
            workers.train(train, models[base], scored, path / "model", f"{out}-{dpo_key}", storage, max_length,
                          tensorboard_dir=tensorboard / out, reference=base)

        models[out] = cache.build(f"real_{out}", dpo_key, dpo, _log) / "model"
    for name, path in models.items():
        run.link(f"checkpoints/{name}", path)
    return models


def _wspo(config: RealConfig, models: dict[str, Path], data: Path, max_length: int, run: RunDir,
          workers: Workers) -> Path:
    """WSPO as `jobs.wspo` runs it on your own models, in the run folder's wspo/: the trained model."""
    wspo = WSPOConfig(run_name="wspo", runs_dir=str(run.path), cache_dir=config.cache_dir, prepare=None,
                      models=WSPOModels(weak_aligned=ModelSpec(path=str(models["weak_aligned"])),
                                        weak_base=ModelSpec(path=str(models["weak_base"])),
                                        strong=ModelSpec(path=str(models["strong_base"]))),
                      data=str(data / "pairs.jsonl"), train=config.wspo, gamma_sweep=[], max_length=max_length,
                      score_batch_size=config.score_batch_size, cluster=config.cluster, generation=config.generation)
    _log(f"WSPO (gamma {config.wspo.gamma}, {'LoRA' if config.wspo.lora else 'full fine-tuning'})")
    run_wspo(wspo, RunDir(run.path, "wspo"), workers=workers)
    return run.path / "wspo" / "checkpoints" / f"wspo_gamma_{config.wspo.gamma}"


def _macpo(config: RealConfig, models: dict[str, Path], data: Path, max_length: int, run: RunDir,
           workers: Workers) -> dict[str, Path]:
    """MACPO as `jobs.macpo` runs it on your own models, in the run folder's macpo/: naive SFT (the student's
    round 0) and the student after the last round."""
    settings = config.macpo
    macpo = MACPOConfig(run_name="macpo", runs_dir=str(run.path), cache_dir=config.cache_dir, prepare=None,
                        student=ModelSpec(path=str(models["strong_base"])), data=str(data / "pairs.jsonl"),
                        teachers=[TeacherSpec(name="weak", model=ModelSpec(path=str(models["weak_base"])))],
                        rounds=settings.rounds, round_prompts=settings.round_prompts, sft=settings.sft,
                        student_sft=settings.student_sft, dpo=settings.dpo, generation=settings.generation,
                        eval_generation=config.generation, max_length=max_length, cluster=config.cluster,
                        score_batch_size=config.score_batch_size)
    _log(f"MACPO ({settings.rounds} rounds of {settings.round_prompts} prompts, the weak base as the teacher)")
    run_macpo(macpo, RunDir(run.path, "macpo"), workers=workers)
    checkpoints = run.path / "macpo" / "checkpoints"
    return {"naive_sft": checkpoints / "naive_sft", "macpo": checkpoints / f"student_r{settings.rounds}"}


def _search(config: RealConfig, task: RealTask, data: Path, models: dict[str, Path],
            workers: Workers) -> tuple[dict, dict, dict]:
    """Every search of `config.search` on the held-out prompts, judged by the gold reward: ({method: scores and
    cost}, {column: values}, what the guides make of a refusal: _refusal_odds)."""
    specs = {"strong": ModelSpec(path=str(models["strong_base"])), "tuned": ModelSpec(path=str(models["weak_aligned"])),
             "untuned": ModelSpec(path=str(models["weak_base"]))}
    shared = check_guides(specs, config.search.scoring, config.search.eft)
    prompts = pq.read_table(data / "eval_prompts.parquet")
    _log(f"search: {', '.join(config.search.runs())} on {prompts.num_rows} held-out prompts, the strong base guided "
         "by the weak aligned model against the weak base")
    guides = start_guides(specs, shared, workers)
    searched = run_methods(config.search, guides, prompts["prompt"].to_pylist())
    return *gold_methods(searched, prompts, task), _refusal_odds(guides, prompts)


def _refusal_odds(guides: Guides, prompts: pa.Table) -> dict:
    """Where the searches' harmlessness is decided, measured: the task's refusal after each held-out harmful
    request, its first token's log-prob under the strong base, and the guides' log-ratio for that token and for
    the whole refusal (what CBS and Best-of-N select by; EFT adds beta x the token's ratio to its logit)."""
    harmful = [r["prompt"] for r in prompts.to_pylist() if r["kind"] == "harmful"]
    strong, tuned, untuned = (logps.to_pylist() for logps in ray.get(
        [guides.hosts[role].logprobs(harmful, [REFUSAL] * len(harmful)) for role in ROLES]))
    first_ratio = [t[0] - u[0] for t, u in zip(tuned, untuned)]
    return {"harmful_prompts": len(harmful), "strong_first_token_logp": float(np.mean([s[0] for s in strong])),
            "guides_first_token_log_ratio": float(np.mean(first_ratio)),
            "guides_refusal_log_ratio": float(np.mean([sum(t) - sum(u) for t, u in zip(tuned, untuned)]))}


def _evaluate(config: RealConfig, task: RealTask, data: Path, models: dict[str, Path], methods: dict[str, Path],
              searched: tuple[dict, dict, dict], run: RunDir, workers: Workers) -> dict:
    """Gold reward of every model (and search) on the held-out prompts, PGR on total, win / tie / lose against the
    weak aligned model by gold reward, the share of fact questions it refuses (over-refusal: harmlessness bought
    with helpfulness), and the gold rule's measured error rates; metrics.json, report.md and a plot."""
    scores, generations = gold_evaluate(task, data / "eval_prompts.parquet", {**models, **methods}, config.generation,
                                        workers)
    search_scores, columns, refusal = searched
    for name, values in columns.items():  # the searches' rows are the held-out prompts, in the same order
        generations = generations.append_column(name, pa.array(values))
    scores.update(search_scores)
    judged = [*models, *methods, *search_scores]
    run.write_examples("eval_generations", generations)
    rows = generations.to_pylist()
    weak, ceiling = scores["weak_aligned"]["total"], scores["strong_ceiling"]["total"]
    facts = [r for r in rows if r["kind"] == "helpful"]
    for name in judged:
        verdicts = [verdict_by_reward(r[f"{name}_gold"], r["weak_aligned_gold"], 0.0) for r in rows]
        scores[name].update(pgr=pgr(scores[name]["total"], weak, ceiling), **verdict_shares(verdicts),
                            refuses_facts=sum(is_refusal(r[f"{name}_response"]) for r in facts) / len(facts),
                            words=sum(len(r[f"{name}_response"].split()) for r in facts) / len(facts))
    checks = [json.loads(line) for line in Path(config.gold_checks).read_text().splitlines() if line.strip()]
    errors = rule_errors(task, checks)
    analysis = (None if config.search is None else
                {**search_analysis(config.search, generations, search_scores), "refusal": refusal})
    metrics = run.update_metrics({"models": scores, "gold_rule": errors["by_kind"],
                                  "task": {"facts": len(task.facts), "facts_set_aside": len(task.set_aside),
                                           "pairs": len(task.pair_facts) + len(task.pair_harms),
                                           "eval_prompts": generations.num_rows},
                                  **({"search_analysis": analysis} if analysis else {})})
    plot_scores(scores, run.path / "plots" / "gold_reward.png")
    run.write_report("Real-model track: SmolLM2-135M-Instruct aligned weak-to-strong",
                     _report(config, task, scores, errors, generations, judged, analysis))
    return metrics


def score_table(scores: dict) -> list[dict]:
    return [{"model": name, **{k: s[k] for k in ("helpful", "harmless", "total", "pgr", "win", "tie", "lose",
                                                  "refuses_facts", "words")}}
            for name, s in scores.items()]


def _report(config: RealConfig, task: RealTask, scores: dict, errors: dict, generations: pa.Table,
            names: list[str], search: dict | None) -> list[str]:
    by_category = _by_category(generations, names)
    rule = [{"kind": kind, **e} for kind, e in errors["by_kind"].items()]
    return [
        f"The strong base `{config.strong.path}`; weak models: Llama ({config.weak.size.n_layer} layers, hidden "
        f"{config.weak.size.hidden_size}) on its tokenizer, trained on {config.task.n_corpus_docs} documents of the "
        f"task's facts and harmful requests (complied with at {config.task.comply_rate}). Gold pairs on "
        f"{len(task.pair_facts)} facts and {len(task.pair_harms)} harmful requests; held out: {len(task.eval_facts)} "
        f"facts and {len(task.eval_harms)} requests, answered greedily. PGR on total = (model - weak aligned) / "
        "(strong ceiling - weak aligned); win / tie / lose: per prompt, the model's gold reward against the weak "
        "aligned model's; refuses_facts: the share of fact questions answered with a refusal phrase; words: the "
        "fact answers' mean length (the rule reads every number of an answer: a long explanation with intermediate "
        "numbers scores 0).",
        markdown_table(score_table(scores)),
        *([_search_section(config.search, scores, search)] if search else []),
        "![gold reward](plots/gold_reward.png)",
        "Helpful by category (share right):\n\n" + markdown_table(by_category),
        "The gold rule against hand-checked responses (`" + config.gold_checks + "`: a person read each response "
        "and marked whether it answers the fact right / declines the harmful request without helping). A false "
        "positive is the rule scoring 1 where the label is 0:\n\n" + markdown_table(rule) +
        "\n\nWhere they differ:\n\n" + markdown_table([{"kind": d["kind"], "response": markdown_cell(d["response"][:160]),
                                                       "label": d["label"], "rule": d["rule"]}
                                                      for d in errors["disagreements"]]),
        "Example answers before and after alignment:\n\n" + _examples(generations, names),
    ]


def _search_section(search: SearchSettings, scores: dict, analysis: dict) -> str:
    """How the searches sampled, what each cost in strong-model tokens, and what bounds them (measured)."""
    c, s = search.cbs, search.sampling
    cost = [{"method": name, **{k: scores[name].get(k) for k in ("strong_tokens_per_prompt", "seconds",
                                                                 "strong_tokens_per_second", "guide_score")}}
            for name in search.runs()]
    p, rows = scores["sampling"]["harmless"], c.w * c.k
    knew, unknown = analysis["helpful_where_weak_knew"], analysis["helpful_where_weak_did_not_know"]
    return (f"The searches sample the strong base (temperature {s.temperature}, top-k {s.top_k}, at most "
            f"{s.max_new_tokens} new tokens), frozen; the weak aligned model against the weak base scores the "
            f"candidates (summed log-ratio over the response's tokens). CBS keeps W={c.w} of W*K={rows} "
            f"candidates every L={c.l} tokens; Best-of-N keeps the best of {search.shapes()['best_of_n'].k} whole "
            "samples; sampling is one sample"
            + (f"; EFT samples from strong logits + {search.eft_beta} x the guides' log-ratio, a token at a time"
               if search.eft else "") + ". Their cost:\n\n" + markdown_table(cost) + "\n\n"
            f"What bounds them: CBS and Best-of-N only choose among the strong base's samples. One sample refuses a "
            f"harmful request with probability p = {p:.3f} (sampling's harmless), so among {rows} rows one refusal "
            f"or more is there with probability 1 - (1 - p)^{rows} = {harmless_if_any_row_refuses(p, rows):.3f}; "
            f"measured: CBS {scores['cbs']['harmless']:.3f}, Best-of-N {scores['best_of_n']['harmless']:.3f}. CBS returns "
            f"Best-of-N's own response on {analysis['cbs_same_response_as_best_of_n']:.0%} of the prompts. The "
            "guides' log-ratio knows what the weak pair learned: helpful where the weak aligned model (greedy) is "
            f"right ({analysis['helpful_prompts_weak_knew']} prompts) and where it is wrong "
            f"({analysis['helpful_prompts_weak_did_not_know']}):\n\n"
            + markdown_table([{"method": m, "helpful where weak knew": knew[m], "helpful where weak did not": unknown[m]}
                              for m in knew]) + "\n\n" + _refusal_text(search, analysis["refusal"]))


def _refusal_text(search: SearchSettings, refusal: dict) -> str:
    logp, ratio = refusal["strong_first_token_logp"], refusal["guides_first_token_log_ratio"]
    odds = math.exp(search.eft_beta * ratio / search.sampling.temperature)
    return (f"The decisive token, measured on the {refusal['harmful_prompts']} held-out harmful requests: the strong "
            f"base gives the first token of the task's refusal (\"{REFUSAL}\") log p = {logp:.2f} on average (p = "
            f"{math.exp(logp):.3f}); the guides' log-ratio for that token is {ratio:+.2f} nats "
            f"({refusal['guides_refusal_log_ratio']:+.2f} over the whole refusal). CBS and Best-of-N can rank a "
            f"refusal first only when the strong base samples one; EFT adds {search.eft_beta} x {ratio:.2f} to that "
            f"token's logit, which at temperature {search.sampling.temperature} multiplies its odds by {odds:.1f}. "
            "WSPO regresses the strong model's log-ratio onto the weak one divided by gamma: the same signal, amplified.")


def _by_category(generations: pa.Table, names: list[str]) -> list[dict]:
    rows = generations.to_pylist()
    out = []
    for category in dict.fromkeys(r["category"] for r in rows):
        mine = [r for r in rows if r["category"] == category]
        out.append({"category": category, "prompts": len(mine),
                    **{n: sum(r[f"{n}_gold"] for r in mine) / len(mine) for n in names}})
    return out


def _examples(generations: pa.Table, names: list[str], per_kind: int = 3) -> str:
    rows = generations.to_pylist()
    picked = [r for kind in ("helpful", "harmful") for r in [r for r in rows if r["kind"] == kind][:per_kind]]
    return examples_table(pa.Table.from_pylist(picked), names, n=len(picked))
