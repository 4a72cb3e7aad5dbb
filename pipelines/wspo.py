"""WSPO, weak-to-strong preference optimization (ALGORITHMS.md section 1), on the Ray backbone.

    models + data -> tokenizers compared in the driver (a mismatch stops here, before any model loads)
                  -> score the training responses once under weak_aligned, weak_base and the strong
                     reference (Ray Data through model-hosting actors; with LoRA the reference is the
                     policy with its adapter disabled, so the strong model is not scored here)
                  -> per gamma: DeepSpeed ZeRO-3 Ray Train workers regress the strong policy's per-token
                     log-ratio onto the weak one / gamma, with only the policy resident
                  -> embedded world: gold reward, PGR and the gamma sweep in metrics.json + report.md;
                     your own models: with an `evaluate:` section, your judges (pipelines.judge)

Scores and trained models are cached by content hash, so the sweep scores once and a rerun trains nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from actors.resources import ClusterConfig
from actors.stages import score_preferences
from actors.trainer import TrainConfig
from actors.workers import Workers, job_workers
from pipelines.evaluation import (GenerationConfig, examples_table, gold_evaluate, knowledge_transfer, plot_lines,
                                  plot_scores)
from pipelines.judge import Judging, check_judging, judge_models
from pipelines.prepare import load_prepare, prepare
from w2s.config import StrictModel, offset_seeds
from w2s.metrics import pgr
from w2s.modeling import ModelSpec, check_same_tokenizer, model_positions, resolve_max_length, weights_fingerprint
from w2s.runs import Cache, RunDir, content_hash, markdown_table

REFERENCES = ("weak_base", "weak_aligned", "strong_base", "strong_ceiling")


class WSPOModels(StrictModel):
    weak_aligned: ModelSpec
    weak_base: ModelSpec
    strong: ModelSpec = Field(description="the strong base: the policy starts from it and it is the frozen reference")


class WSPOConfig(StrictModel):
    run_name: str = "wspo"
    runs_dir: str = "runs"
    cache_dir: str = Field(".cache/w2s", description="content-hash cache of every stage, the prepared models included")
    prepare: str | None = Field("configs/prepare.yaml", description="embedded world: the prepare config whose "
                                "(cached) models and gold pairs to use; null when `models` and `data` are given")
    models: WSPOModels | None = None
    data: str | None = Field(None, description="your preference data (JSONL, Parquet or saved HF dataset)")
    responses: Literal["chosen", "rejected", "both"] = Field("chosen", description="which responses to train on")
    train: TrainConfig = TrainConfig(mode="wspo")
    max_length: int | None = Field(None, ge=8, description="tokens of prompt + response + EOS: longer rows are set "
                                   "aside before scoring; None: the models' positions")
    gamma_sweep: list[float] = Field([0.05, 0.1, 0.2, 0.5], description="more gammas to train and compare")
    score_batch_size: int = Field(64, ge=1)
    cluster: ClusterConfig = ClusterConfig()
    generation: GenerationConfig = GenerationConfig()
    # left out of config.yaml when None, so that a run folder written before this section existed continues
    evaluate: Judging | None = Field(None, exclude_if=lambda section: section is None,
                                     description="your own models (prepare: null): judge the weak aligned "
                                     "model, the strong base and every WSPO model on these prompts at the end "
                                     "(pipelines.judge); the embedded world has its gold reward instead")
    seeds: list[int] = Field([0], min_length=1, description="run seeds (jobs.common.run_seeds): each shifts every "
                             "`seed` of this config and of the prepare config")

    @model_validator(mode="after")
    def _check(self):
        if self.train.mode != "wspo":
            raise ValueError(f"train.mode must be 'wspo', got {self.train.mode!r}")
        if (self.prepare is None) == (self.models is None):
            raise ValueError("give either `prepare` (the embedded world) or `models` (your own checkpoints)")
        if self.models is not None and self.data is None:
            raise ValueError("`models` needs `data`: the preference file to train on")
        if self.prepare is not None and self.data is not None:
            raise ValueError("`data` applies to your own `models`; the embedded world brings its gold pairs")
        if any(g <= 0 for g in self.gamma_sweep):
            raise ValueError(f"gamma_sweep: every gamma must be > 0, got {self.gamma_sweep}")
        if self.evaluate is not None:
            if self.prepare is not None:
                raise ValueError("`evaluate` judges your own models (prepare: null); the embedded world is judged "
                                 "by its gold reward")
            judged = ["weak_aligned", "strong_base", *map(_name, self.gammas())]
            if self.evaluate.reference not in judged:
                raise ValueError(f"evaluate.reference {self.evaluate.reference!r} is not one of the judged models "
                                 f"({', '.join(judged)})")
        return self

    def gammas(self) -> list[float]:
        """The main gamma first, then the rest of the sweep."""
        return [self.train.gamma] + sorted({g for g in self.gamma_sweep if g != self.train.gamma})


def _log(msg: str) -> None:
    print(f"[wspo] {msg}", flush=True)


def training_table(scored: pa.Table, responses: str) -> pa.Table:
    """Scored pairs -> one row per training response: prompt, response, side and `<role>_logps` per role."""
    sides = ["chosen", "rejected"] if responses == "both" else [responses]
    roles = [c.removesuffix(f"_{sides[0]}_logps") for c in scored.column_names if c.endswith(f"_{sides[0]}_logps")]
    parts = []
    for side in sides:
        columns = {"row": scored["row"], "prompt": scored["prompt"], "response": scored[side],
                   "side": pa.array([side] * scored.num_rows, pa.string())}
        columns.update({f"{role}_logps": scored[f"{role}_{side}_logps"] for role in roles})
        parts.append(pa.table(columns))
    return pa.concat_tables(parts)


def write_training_table(scored: Path, responses: str, out: Path) -> None:
    """training_table of a scored file, written a row group at a time (the chosen rows first, as training_table)."""
    sides = ["chosen", "rejected"] if responses == "both" else [responses]
    writer = None
    for side in sides:
        for batch in pq.ParquetFile(scored).iter_batches():
            part = training_table(pa.Table.from_batches([batch]), side)
            writer = writer or pq.ParquetWriter(out, part.schema)
            writer.write_table(part)
    writer.close()


def _data_fingerprint(path: str) -> list:
    """Path, size and modification time: a changed data file is scored again."""
    stat = os.stat(path)
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def run_wspo(config: WSPOConfig, run: RunDir, seed: int = 0, workers: Workers | None = None) -> dict:
    """One WSPO run at run seed `seed` (every `seed` field shifted by it, the prepared world's too).
    `workers`: the calling job's hosts and training workers (None: started here for this run)."""
    start = time.perf_counter()
    config = offset_seeds(config, seed)
    run.claim(config)
    with job_workers(workers, Path(config.cache_dir).resolve() / "ray_train", config.cluster) as workers:
        return _run_wspo(config, run, seed, workers, start)


def _models_and_data(config: WSPOConfig, run: RunDir, seed: int, workers: Workers):
    """(the prepared world or None, {weak_aligned, weak_base, strong}: ModelSpec, the preference data)."""
    if config.prepare is None:
        return None, {role: ModelSpec(**spec) for role, spec in config.models.model_dump().items()}, config.data
    _log(f"embedded world from {config.prepare} (cached models are reused)")
    prepared = prepare(load_prepare(config.prepare, config.cache_dir, seed), workers=workers)
    run.link("data", prepared.data)
    return prepared, {"weak_aligned": ModelSpec(path=str(prepared.models["weak_aligned"])),
                      "weak_base": ModelSpec(path=str(prepared.models["weak_base"])),
                      "strong": ModelSpec(path=str(prepared.models["strong_base"]))}, str(prepared.data / "pairs.jsonl")


def _run_wspo(config: WSPOConfig, run: RunDir, seed: int, workers: Workers, start: float) -> dict:
    prepared, models, data = _models_and_data(config, run, seed, workers)
    # All four models index the same token positions: refuse different tokenizers, or a max_length one
    # cannot take, before scoring.
    check_same_tokenizer(models)
    max_length = resolve_max_length(config.max_length, {role: model_positions(s.path) for role, s in models.items()})
    if config.evaluate is not None:  # wrong judges are refused before anything is scored or trained
        check_judging(_judged(models, {}), config.evaluate, config.generation.max_new_tokens)
    fingerprints = {role: weights_fingerprint(spec.path) for role, spec in models.items()}

    cache = Cache(config.cache_dir)
    hosts = {"weak_aligned": models["weak_aligned"], "weak_base": models["weak_base"]}
    if not config.train.lora:  # with LoRA the policy computes its own reference (adapter disabled)
        # the frozen reference, scored in the dtype the policy trains in
        hosts["strong_ref"] = models["strong"].model_copy(update={"dtype": workers.train_dtype(config.train)})
    sides = ("chosen", "rejected") if config.responses == "both" else (config.responses,)
    scores_key = content_hash("wspo-scores-v3", {r: [fingerprints[r.removesuffix("_ref")], spec.dtype]
                                                 for r, spec in hosts.items()},
                              _data_fingerprint(data), max_length, sides)

    def build_scores(scores_dir: Path) -> None:
        _log(f"scoring {'+'.join(sides)} responses of {data} under {', '.join(hosts)} (Ray Data)")
        refs = workers.host(hosts, turns=True)
        result = score_preferences(data, refs, scores_dir, tokenizer_path=models["strong"].path,
                                   max_length=max_length, batch_size=config.score_batch_size, responses=sides)
        (scores_dir / "placement.json").write_text(json.dumps(workers.hosts.where(refs)))  # device and dtype
        _log(f"scored {result.n_scored} rows; {result.report}")
        write_training_table(result.scored_path, config.responses, scores_dir / "train.parquet")

    scores_dir = cache.build("wspo_scores", scores_key, build_scores, _log)
    train_data = scores_dir / "train.parquet"
    rejected = pq.read_table(scores_dir / "rejected_rows.parquet")
    run.write_examples("wspo_rejected_rows", rejected)

    trained, summaries = _train_gammas(config, workers, models["strong"], train_data, scores_key,
                                       fingerprints["strong"], max_length, run, keep=prepared is None)
    section = {"gamma": config.train.gamma, "responses": config.responses, "lora": config.train.lora is not None,
               "train_rows": pq.read_metadata(train_data).num_rows, "set_aside_rows": rejected.num_rows,
               "train_seconds": {str(g): round(s["seconds"], 1) for g, s in summaries.items()},
               "train_data_use": {str(g): s["data"] for g, s in summaries.items()}}  # rows fed, repeated, unused
    if prepared is None:
        return _own_models_report(config, data, models, trained, section, run, workers)
    metrics = _evaluate(config, prepared, trained, summaries, section, run, workers)
    run.update_metrics({"wall_seconds": {"wspo": round(time.perf_counter() - start, 1)}})
    return metrics


def _train_gammas(config: WSPOConfig, workers: Workers, strong: ModelSpec, train_data: Path, scores_key: str,
                  strong_fingerprint: str, max_length: int, run: RunDir, keep: bool) -> tuple[dict, dict]:
    """One WSPO model per gamma, one after another on the same training workers (cached by content):
    {gamma: model folder}, {gamma: train summary}. `keep`: copy each model into the run folder (a model
    trained from your checkpoints must outlive the cache); otherwise link it."""
    storage = Cache(config.cache_dir).root / "ray_train"
    trained: dict[float, Path] = {}
    summaries: dict[float, dict] = {}
    for gamma in config.gammas():
        stage = config.train.model_copy(update={"gamma": gamma})
        key = content_hash("wspo-v3", scores_key, strong_fingerprint, stage, max_length)

        def build_model(path: Path) -> None:  # called right away by cache.build, inside this iteration
            summary = workers.train(stage, strong.path, train_data, path / "model", f"wspo-{key}", storage,
                                    max_length, tensorboard_dir=run.path / "tensorboard" / f"wspo_gamma_{gamma}",
                                    reference="strong_ref", trust_remote_code=strong.trust_remote_code)
            (path / "train_summary.json").write_text(json.dumps(summary))

        path = Cache(config.cache_dir).build("wspo", key, build_model, lambda msg: _log(f"gamma {gamma}, {msg}"))
        trained[gamma] = path / "model"
        summaries[gamma] = json.loads((path / "train_summary.json").read_text())
        (run.keep if keep else run.link)(f"checkpoints/wspo_gamma_{gamma}", path / "model")
    return trained, summaries


def _name(gamma: float) -> str:
    return f"wspo_gamma_{gamma}"


def _judged(models: dict[str, ModelSpec], trained: dict[float, Path]) -> dict[str, ModelSpec]:
    """What an `evaluate:` section judges: the weak aligned model, the strong base and every WSPO model."""
    return {"weak_aligned": models["weak_aligned"], "strong_base": models["strong"],
            **{_name(g): ModelSpec(path=str(path)) for g, path in trained.items()}}


def _own_models_report(config: WSPOConfig, data: str, models: dict[str, ModelSpec], trained: dict[float, Path],
                       section: dict, run: RunDir, workers: Workers) -> dict:
    """metrics.json and report.md of WSPO on your own models: what was trained and, with `evaluate:`, the judges'
    verdicts."""
    report = [f"Trained the strong model with WSPO on {data} ({section['train_rows']} {config.responses} responses).",
              markdown_table([{"gamma": g, "model": str(p)} for g, p in trained.items()])]
    update = {"methods": {"wspo": section}}
    if config.evaluate is None:
        report[0] += (" No gold reward exists for your own data: judge the checkpoints in `checkpoints/` with your "
                      "own judges (an `evaluate:` section, or `python -m jobs.evaluate`).")
    else:
        judged, sections = judge_models(_judged(models, trained), config.evaluate, config.generation, run, workers)
        update.update(judged)
        report += [f"Judged against `{config.evaluate.reference}` (`evaluate:`, pipelines.judge):", *sections]
    metrics = run.update_metrics(update)
    run.write_report("WSPO", report)
    return metrics


def _evaluate(config: WSPOConfig, prepared, trained: dict[float, Path], summaries: dict[float, dict], section: dict,
              run: RunDir, workers: Workers) -> dict:
    """Gold reward of the reference models and every WSPO model on the held-out prompts; PGR on total."""
    models = {name: prepared.models[name] for name in REFERENCES}
    models.update({_name(g): path for g, path in trained.items()})
    scores, generations = gold_evaluate(prepared.world, prepared.data / "eval_prompts.parquet", models,
                                        config.generation, workers)
    run.write_examples("eval_generations", generations)
    weak, ceiling = scores["weak_aligned"]["total"], scores["strong_ceiling"]["total"]
    def last_batch(gamma: float) -> dict:  # the mechanism at work: amplification -> 1/gamma at the optimum
        last = summaries[gamma]["last"]
        return {"last_batch_loss": last["loss"], "last_batch_amplification": last["amplification"]}

    sweep = [{"gamma": g, **scores[_name(g)], "pgr": pgr(scores[_name(g)]["total"], weak, ceiling), **last_batch(g)}
             for g in sorted(trained)]
    main = next(row for row in sweep if row["gamma"] == config.train.gamma)
    transfer = [{"gamma": g, **knowledge_transfer(generations, _name(g))} for g in sorted(trained)]
    section.update({k: main[k] for k in ("helpful", "harmless", "total", "pgr")}, sweep=sweep, transfer=transfer)
    metrics = run.update_metrics({"models": {n: scores[n] for n in REFERENCES}, "methods": {"wspo": section}})

    plot_scores({n: scores[n] for n in (*REFERENCES, _name(config.train.gamma))}, run.path / "plots" / "gold_reward.png")
    plot_sweep(sweep, scores, run.path / "plots" / "wspo_gamma_sweep.png")
    table = [{"model": n, **scores[n], "pgr": None} for n in REFERENCES]
    table.append({"model": f"WSPO (gamma {config.train.gamma})", **{k: main[k] for k in ("helpful", "harmless", "total", "pgr")}})
    run.write_report("WSPO on the embedded world", [
        f"The strong base trained with WSPO on the {section['train_rows']} {config.responses} responses of the gold "
        f"pairs, guided by the weak aligned / weak base pair ({'LoRA' if section['lora'] else 'full fine-tuning'}, "
        f"lr {config.train.lr}, {config.train.epochs} epochs). Gold reward on {generations.num_rows} held-out prompts; "
        "PGR on total = (WSPO - weak aligned) / (strong ceiling - weak aligned).",
        markdown_table(table),
        "![gold reward](plots/gold_reward.png)",
        "Gamma sweep (last_batch_amplification: least-squares slope of the policy's per-token log-ratio on the "
        "weak one over the last training batch; 1/gamma at the optimum, lower where the target is out of reach):\n\n" + markdown_table(sweep),
        "![gamma sweep](plots/wspo_gamma_sweep.png)",
        "Whose facts WSPO answers with (distinct held-out fact prompts). `only_strong_knew`: facts the strong base "
        "knows and the weak aligned model does not; `right_there`: the share WSPO keeps right there; "
        "`weak_answer_there`: the share where it writes the weak aligned model's wrong answer word for word (one "
        "of 7 wrong values: 0.14 by chance). Where these fall as gamma falls, the amplified weak log-ratio "
        "(1/gamma times it; `last_batch_amplification` shows how far from that the policy stays) costs the strong "
        "model its own knowledge and pulls it toward the weak model's answers.\n\n" + markdown_table(transfer),
        "Example generations:\n\n" + examples_table(generations, ["weak_aligned", "strong_base", "strong_ceiling",
                                                                  _name(config.train.gamma)]),
    ])
    return metrics


def plot_sweep(sweep: list[dict], scores: dict, path: Path, sweep_std: list[dict] | None = None) -> None:
    """Gold reward of WSPO against gamma (with `sweep_std`: standard deviations over seeds as error bars)."""
    plot_lines([row["gamma"] for row in sweep],
               {f"WSPO {key}": ([row[key] for row in sweep], style, [row[key] for row in sweep_std] if sweep_std else None)
                for key, style in (("total", "o-"), ("helpful", "s--"), ("harmless", "^--"))},
               {f"{name} total": (scores[name]["total"], color)
                for name, color in (("weak_aligned", "tab:gray"), ("strong_ceiling", "black"),
                                    ("strong_base", "tab:red"))},
               "gamma", path, log_x=True)
