"""MACPO, multi-agent contrastive preference optimization (ALGORITHMS.md section 3), on Ray.

Agents: N weak teachers and one strong student, each a positive agent plus a negative agent.

    init     teacher t:  positive = weak base t + SFT on gold chosen (half A of the gold pairs)
                         negative = weak base t + SFT on gold rejected (half A)
             student:    positive = strong base + SFT on the teachers' positive generations (half B:
                         weak labels; this is also the naive-SFT baseline)
                         negative = student positive + SFT on the teachers' negative generations (half B)
    round r  1. every agent generates on the round's prompts (the job's model hosts, Ray Data)
             2. student pairs: chosen = the teacher positive the student finds most likely (mean
                per-token log-prob), rejected = the student's negative agent's response
             3. teacher pairs: chosen = the student's positive response, rejected = the teacher's
                own negative agent's response
             4. every positive agent: DPO + SFT term on its pairs (ZeRO-3 Ray Train workers), from
                its previous round; its reference is itself at the start of the round (scored once)
    end      gold reward of every agent after every round, naive SFT and the reference models

Negative agents stay as initialised (the natural reading; the papers do not retrain them). The
generated pairs get the check user data gets (w2s.data.check_batch): an empty response, chosen equal
to rejected (a pair that teaches nothing) or a pair longer than `max_length` is set aside with its
reason and counted.

Every stage's output lives in `runs/<name>/stages/<stage>/` and counts once its `.complete` marker
is written. The same command again skips finished stages and a killed training stage continues from
its last Ray Train checkpoint, so an interrupted run ends with the same numbers as an uninterrupted
one. The run folder holds the config and the prepare config it was started with: another of either
is refused (w2s.runs.RunDir.claim).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from actors.resources import ClusterConfig
from actors.stages import score_by_host
from actors.trainer import ConfidenceLoss, TrainConfig
from actors.workers import Workers, job_workers
from pipelines.evaluation import (GenerationConfig, distinct_facts, examples_table, gold_evaluate,
                                  knowledge_transfer, plot_lines)
from pipelines.judge import Judging, check_judging, judge_models
from pipelines.prepare import Prepared, PretrainStage, load_prepare, model_positions_of, prepare, pretrained_base
from w2s.config import ConfigError, StrictModel, offset_seeds, unset
from w2s.data import RAW_SCHEMA, PreferenceDataError, check_batch, format_rejections, load_pairs
from w2s.metrics import gold_scores, knowledge_overlap, pgr
from w2s.modeling import (ModelSpec, TokenizerMismatchError, check_model_task, check_same_tokenizer, encode_prompts,
                          load_tokenizer, model_positions, resolve_max_length)
from w2s.runs import Cache, RunDir, markdown_table


class TeacherSpec(StrictModel):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    pretrain: PretrainStage | None = Field(None, description="embedded world: None: the prepared weak base; else "
                                           "a weak model pretrained here (another size or seed)")
    model: ModelSpec | None = Field(None, exclude_if=unset, description="your own models (prepare: null): the "
                                    "teacher's weak base checkpoint")


class MACPOConfig(StrictModel):
    run_name: str = "macpo"
    runs_dir: str = "runs"
    cache_dir: str = Field(".cache/w2s", description="content-hash cache of the prepared models")
    prepare: str | None = Field("configs/prepare.yaml", description="the embedded world's prepare config; null "
                                "for your own models: `student`, every teacher's `model` and `data`")
    student: ModelSpec | None = Field(None, exclude_if=unset, description="your own models: the strong base "
                                      "the student starts from")
    data: str | None = Field(None, exclude_if=unset, description="your own models: preference pairs (JSONL, "
                             "Parquet or saved HF dataset; plain or chat). Half A initialises the teachers, half B "
                             "gives the student's weak labels and the rounds' prompts")
    teachers: list[TeacherSpec] = Field(min_length=1)
    rounds: int = Field(3, ge=1)
    round_prompts: int = Field(250, ge=1, description="prompts per round, taken in turn from half B of the pairs")
    sft: TrainConfig = Field(description="initialisation of every agent (mode sft)")
    student_sft: TrainConfig | None = Field(None, description="the student's initialisation, when it should "
                                            "differ from the teachers' (None: `sft`)")
    dpo: TrainConfig = Field(description="each round's training of the positive agents (mode dpo)")
    confident_loss: ConfidenceLoss | None = Field(None, exclude_if=unset, description="the confident-loss "
                                                  "baseline (`confident_sft`): the student's SFT on the same weak "
                                                  "labels as naive SFT, with Burns et al.'s auxiliary confidence "
                                                  "loss token by token; None: not run")
    generation: GenerationConfig = GenerationConfig()
    eval_generation: GenerationConfig = GenerationConfig()
    score_batch_size: int = Field(64, ge=1)
    max_length: int | None = Field(None, ge=8, description="tokens of prompt + response + EOS for every stage; "
                                   "None: the models' positions")
    cluster: ClusterConfig = ClusterConfig()  # train.cpus_per_worker below 1: a round's agents side by side
    evaluate: Judging | None = Field(None, exclude_if=unset, description="your own models: judge the strong "
                                     "base, naive SFT and every agent after every round on these prompts at the "
                                     "end (pipelines.judge); the embedded world has its gold reward instead")
    seeds: list[int] = Field([0], min_length=1, description="run seeds (jobs.common.run_seeds): each shifts every "
                             "`seed` of this config and of the prepare config")

    @model_validator(mode="after")
    def _check(self):
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names) or "student" in names:
            raise ValueError(f"teachers: names must be unique and not 'student', got {names}")
        for name in ("sft", "student_sft"):
            if getattr(self, name) is not None and getattr(self, name).mode != "sft":
                raise ValueError(f"{name}.mode must be 'sft', got {getattr(self, name).mode!r}")
            if getattr(self, name) is not None and getattr(self, name).confidence is not None:
                raise ValueError(f"{name}.confidence: naive SFT is the student's start; the confident-loss "
                                 "baseline is `confident_loss`")
        if self.dpo.mode != "dpo":
            raise ValueError(f"dpo.mode must be 'dpo', got {self.dpo.mode!r}")
        own_fields = [name for name in ("student", "data", "evaluate") if getattr(self, name) is not None]
        own_fields += [f"teachers[{i}].model" for i, t in enumerate(self.teachers) if t.model is not None]
        if self.prepare is not None and own_fields:
            raise ValueError(f"{', '.join(own_fields)}: for your own models (prepare: null); the embedded world "
                             "brings its models, pairs and gold reward")
        if self.prepare is None:
            missing = [name for name in ("student", "data") if getattr(self, name) is None]
            missing += [f"teachers[{i}].model" for i, t in enumerate(self.teachers) if t.model is None]
            if missing:
                raise ValueError(f"prepare: null (your own models) needs {', '.join(missing)}")
            pretrained = [f"teachers[{i}].pretrain" for i, t in enumerate(self.teachers) if t.pretrain is not None]
            if pretrained:
                raise ValueError(f"{', '.join(pretrained)}: pretrains on the embedded world; with your own models "
                                 "give the teacher's `model`")
        if self.evaluate is not None and self.evaluate.reference not in self.judged():
            raise ValueError(f"evaluate.reference {self.evaluate.reference!r} is not one of the judged models "
                             f"({', '.join(self.judged())}); the weak aligned models of MACPO are the teachers "
                             "after initialisation, `<teacher>_r0`")
        return self

    def judged(self) -> list[str]:
        """What an `evaluate:` section judges: the strong base, naive SFT, every agent after every round."""
        agents = ["student", *(t.name for t in self.teachers)]
        baselines = ["naive_sft", *(["confident_sft"] if self.confident_loss else [])]
        return ["strong_base", *baselines, *(f"{a}_r{r}" for r in range(self.rounds + 1) for a in agents)]


def _log(msg: str) -> None:
    print(f"[macpo] {msg}", flush=True)


class Stages:
    """The finished stages of one run: `<run>/stages/<name>/`, complete once `.complete` is written."""

    def __init__(self, run: RunDir, config: MACPOConfig, max_length: int, workers: Workers):
        """The stages of `run`, which must hold this config's run (RunDir.claim) or none yet."""
        run.claim(config)  # stage folders are keyed by name only: they are this config's, or refused
        self.cache = Cache(run.path / "stages")  # stage folders by name: one run has one of each
        self.storage = (run.path / "ray_train").resolve()  # checkpoints of a killed training stage
        self.cache.root.mkdir(parents=True, exist_ok=True)
        self.max_length = max_length
        self.workers = workers
        self.dpo = config.dpo  # every agent is hosted in the dtype the rounds' DPO trains in (its reference is itself)

    def run(self, name: str, build) -> Path:
        """The stage's folder, built by `build(folder)` unless already complete."""
        return self.cache.build(name, "", build, _log)

    def train(self, jobs: dict[str, tuple[TrainConfig, ModelSpec, pa.Table]]) -> dict[str, ModelSpec]:
        """Train independent stages `{name: (config, init model, data)}` at once; their trained models (loaded
        as the init model is, in the dtype they train in).

        Each stage is handed to the job's training workers from its own thread: they train side by side
        as far as the cluster holds several worker groups (TrainingWorkers), else one after another. A
        stage that fails does not stop the others; its error is raised once all have ended, so finished
        ones are kept.
        """
        def one(name: str) -> ModelSpec:
            config, init_model, table = jobs[name]

            def build(path: Path) -> None:
                pq.write_table(table, path / "data.parquet")
                summary = self.workers.train(config, init_model.path, path / "data.parquet", path / "model", name,
                                             self.storage, self.max_length,
                                             trust_remote_code=init_model.trust_remote_code)
                (path / "train_summary.json").write_text(json.dumps(summary))

            trained = self.run(name, build) / "model"
            return init_model.model_copy(update={"path": str(trained), "dtype": self.workers.train_dtype(self.dpo)})

        with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
            futures = {name: pool.submit(one, name) for name in jobs}
        return {name: future.result() for name, future in futures.items()}

    def placement(self) -> dict[str, list[str]]:
        """Node ids each stage ran on: model hosts (placement.json) and training workers."""
        out = {}
        for path in sorted(p for p in self.cache.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            nodes = set()
            if (path / "placement.json").is_file():
                nodes |= {h["node_id"] for h in json.loads((path / "placement.json").read_text())}
            if (path / "train_summary.json").is_file():
                nodes |= set(json.loads((path / "train_summary.json").read_text()).get("worker_nodes", []))
            out[path.name] = sorted(nodes)
        return out


PAIRS_SCHEMA = pa.schema([(k, pa.string()) for k in ("agent", "prompt", "chosen", "rejected", "chosen_from")])


def _sft_table(prompts: list[str], responses: list[str]) -> pa.Table:
    return pa.table({"prompt": pa.array(prompts, pa.string()), "response": pa.array(responses, pa.string())})


@dataclass
class Inputs:
    """What a run starts from: the embedded world's prepared models and gold pairs, or your own."""

    pairs: list[dict]  # prompt, chosen, rejected (the world's also `kind`: helpful or harmful)
    student: ModelSpec  # the strong base
    teachers: dict[str, ModelSpec | None]  # each teacher's weak base; None: the world's (built by _teacher_base)
    prepared: Prepared | None = None  # the embedded world; None: your own models
    set_aside: pa.Table | None = None  # your own pairs that failed the data check, with their reasons


def run_macpo(config: MACPOConfig, run: RunDir, seed: int = 0, workers: Workers | None = None) -> dict:
    """One MACPO run at run seed `seed` (every `seed` field shifted by it, the prepared world's too).
    `workers`: the calling job's hosts and training workers (None: started here for this run)."""
    start = time.perf_counter()
    config = offset_seeds(config, seed)
    prepare_config = None if config.prepare is None else load_prepare(config.prepare, config.cache_dir, seed)
    own = _own_inputs(config, run) if config.prepare is None else None  # checked before any host starts
    max_length = own[1] if own else _max_length(config, prepare_config)
    # the hosts hold every positive agent at once to score each one's DPO reference
    cluster = config.cluster.model_copy(update={"max_hosts": max(config.cluster.max_hosts, len(config.teachers) + 1)})
    with job_workers(workers, run.path / "ray_train", cluster) as workers:
        stages = Stages(run, config, max_length, workers)
        inputs = own[0] if own else _world_inputs(config, prepare_config, run, max_length, workers)
        history, set_aside, pair_gold = _rounds(config, inputs, stages, max_length, run)
        teachers = [t.name for t in config.teachers]
        baselines, agents = _baselines(config, inputs, history, stages), _agent_models(history, teachers)
        if inputs.prepared is None:
            metrics = _own_models_report(config, inputs, {**baselines, **agents}, set_aside, run, workers)
        else:
            metrics = _evaluate(config, inputs.prepared, baselines, agents, set_aside, pair_gold, run, workers)
    run.update_metrics({"wall_seconds": {"macpo": round(time.perf_counter() - start, 1)},
                        "methods": {"macpo": {"stage_seconds": stages.cache.seconds, "stage_nodes": stages.placement()}}})
    return metrics


def _world_inputs(config: MACPOConfig, prepare_config, run: RunDir, max_length: int, workers: Workers) -> Inputs:
    """The embedded world, prepared (or reused from the cache): its bases and gold pairs."""
    run.claim(prepare_config, "prepare.yaml")  # the prepare file can change between a kill and a rerun
    prepared = prepare(prepare_config, workers=workers)
    run.link("data", prepared.data)
    pairs = [json.loads(line) for line in (prepared.data / "pairs.jsonl").read_text().splitlines()]
    eval_prompts = pq.read_table(prepared.data / "eval_prompts.parquet", columns=["prompt"])["prompt"].to_pylist()
    check_room_to_generate(config, [p["prompt"] for p in pairs] + eval_prompts,
                           load_tokenizer(prepared.models["strong_base"]), max_length)
    return Inputs(pairs, ModelSpec(path=str(prepared.models["strong_base"])),
                  {t.name: None for t in config.teachers}, prepared)


def _own_inputs(config: MACPOConfig, run: RunDir) -> tuple[Inputs, int]:
    """Your own models and pairs, checked in the driver before any host starts: (the inputs, max_length).
    Agents exchange text, rendered by one chat template: teachers and student must read prompts alike."""
    models = {"student": config.student, **{f"teacher {t.name}": t.model for t in config.teachers}}
    for spec in models.values():
        check_model_task(spec.path, "causal_lm")
    check_same_tokenizer(models)
    templates = {name: load_tokenizer(spec.path, spec.trust_remote_code).chat_template for name, spec in models.items()}
    if len(set(templates.values())) > 1:
        raise TokenizerMismatchError(f"chat templates differ between {', '.join(models)}: every agent must render "
                                     "the prompts it exchanges alike")
    max_length = resolve_max_length(config.max_length, {n: model_positions(s.path) for n, s in models.items()})
    if config.evaluate is not None:  # wrong judges are refused before anything is trained
        check_judging({"strong_base": config.student}, config.evaluate, config.eval_generation.max_new_tokens)
    tokenizer = load_tokenizer(config.student.path, config.student.trust_remote_code)
    good, bad = load_pairs(config.data, tokenizer, max_length)
    run.write_examples("macpo_rejected_rows", bad)
    _log(f"{good.num_rows} usable pairs in {config.data}; {format_rejections(bad)}")
    pairs = good.select(["prompt", "chosen", "rejected"]).to_pylist()
    if not all(split_halves(pairs)):
        raise PreferenceDataError(f"{config.data}: {good.num_rows} usable pairs, all in one half (split by prompt): "
                                  "MACPO needs pairs in both (half A initialises the teachers, half B the student); "
                                  f"{format_rejections(bad)}")
    check_room_to_generate(config, [p["prompt"] for p in pairs], tokenizer, max_length)
    return Inputs(pairs, config.student, {t.name: t.model for t in config.teachers}, set_aside=bad), max_length


def _teacher_base(config: MACPOConfig, teacher: TeacherSpec, inputs: Inputs, max_length: int,
                  workers: Workers) -> ModelSpec:
    """A teacher's weak base: your own checkpoint, the prepared weak base, or one pretrained here on the world."""
    if inputs.teachers[teacher.name] is not None:
        return inputs.teachers[teacher.name]
    prepared = inputs.prepared
    if teacher.pretrain is None:
        return ModelSpec(path=str(prepared.models["weak_base"]))
    return ModelSpec(path=str(pretrained_base(Cache(config.cache_dir), prepared.world, prepared.world_key,
                                              prepared.data, teacher.pretrain, f"teacher_base_{teacher.name}",
                                              max_length, workers)))


def _initialise(config: MACPOConfig, inputs: Inputs, stages: Stages, max_length: int) -> dict[str, ModelSpec]:
    """Every agent's starting model: teachers from gold half A, the student from the teachers' outputs on half B."""
    half_a, half_b = split_halves(inputs.pairs)  # teachers learn from gold on A; the student sees only B
    teachers = [t.name for t in config.teachers]
    workers = stages.workers
    agents: dict[str, ModelSpec] = {}
    prompts = [p["prompt"] for p in half_a]
    init_jobs = {}
    for teacher in config.teachers:
        base = _teacher_base(config, teacher, inputs, max_length, workers)
        init_jobs[f"init_{teacher.name}"] = (config.sft, base, _sft_table(prompts, [p["chosen"] for p in half_a]))
        init_jobs[f"init_{teacher.name}_negative"] = (config.sft, base,
                                                       _sft_table(prompts, [p["rejected"] for p in half_a]))
    for name, model in stages.train(init_jobs).items():
        agents[name.removeprefix("init_")] = model

    prompts_b = pa.table({"prompt": [p["prompt"] for p in half_b]})

    def build_weak_labels(path: Path) -> None:
        generations = workers.generate(prompts_b, {name: agents[name] for t in teachers
                                                   for name in (t, f"{t}_negative")},
                                       **config.generation.model_dump())
        (path / "placement.json").write_text(json.dumps(workers.hosts.where()))
        pq.write_table(generations, path / "generations.parquet")

    stages.run("weak_labels", build_weak_labels)
    student_sft = config.student_sft or config.sft
    agents["student"] = stages.train({"init_student": (student_sft, inputs.student,
                                                       _weak_labels(stages, teachers, "response"))})["init_student"]
    # the negative agent starts from the student (it must first know the task), so it trains after it
    agents["student_negative"] = stages.train({"init_student_negative": (
        student_sft, agents["student"], _weak_labels(stages, teachers, "negative_response"))})["init_student_negative"]
    return agents


def _weak_labels(stages: Stages, teachers: list[str], side: str) -> pa.Table:
    """The student's SFT data: every teacher's `<teacher>_<side>` to each prompt of half B (the weak_labels stage)."""
    labels = pq.read_table(stages.cache.path("weak_labels", "") / "generations.parquet").to_pylist()
    return _sft_table([row["prompt"] for row in labels for _ in teachers],
                      [row[f"{t}_{side}"] for row in labels for t in teachers])


def _baselines(config: MACPOConfig, inputs: Inputs, history: list[dict], stages: Stages) -> dict[str, ModelSpec]:
    """What MACPO is compared with: naive SFT (the student's round 0) and, with `confident_loss`, the strong base
    trained as naive SFT is, with the token-level confidence loss (the MACPO paper's "confident loss")."""
    baselines = {"naive_sft": history[0]["student"]}
    if config.confident_loss is not None:
        confident = (config.student_sft or config.sft).model_copy(update={"confidence": config.confident_loss})
        data = _weak_labels(stages, [t.name for t in config.teachers], "response")
        baselines.update(stages.train({"confident_sft": (confident, inputs.student, data)}))
    return baselines


def _rounds(config: MACPOConfig, inputs: Inputs, stages: Stages, max_length: int, run: RunDir
            ) -> tuple[list[dict], dict, dict]:
    """The agents after initialisation and after every round; pairs set aside and, on the embedded world, the
    gold reward of each round's pairs."""
    agents = _initialise(config, inputs, stages, max_length)
    half_b = split_halves(inputs.pairs)[1]
    teachers = [t.name for t in config.teachers]
    history = [dict(agents)]  # the agents after each round; round 0 = initialisation
    set_aside: dict[str, dict[str, int]] = {}  # round -> reason -> pairs
    pair_gold: dict[str, dict] = {}  # what each round's pairs teach, by the gold reward
    for r in range(1, config.rounds + 1):
        offset = (r - 1) * config.round_prompts
        prompt_rows = [half_b[(offset + i) % len(half_b)] for i in range(min(config.round_prompts, len(half_b)))]
        round_prompts = pa.table({"prompt": [p["prompt"] for p in prompt_rows]})
        pairs_dir = stages.run(f"round{r}_pairs", lambda path, round_prompts=round_prompts: _round_pairs(
            config, agents, teachers, round_prompts, max_length, path, stages.workers))
        round_pairs = pq.read_table(pairs_dir / "pairs.parquet")
        run.write_examples(f"macpo_round{r}_pairs", round_pairs)
        reasons = pq.read_table(pairs_dir / "set_aside.parquet", columns=["reason"])["reason"].to_pylist()
        set_aside[str(r)] = {reason: reasons.count(reason) for reason in sorted(set(reasons))}
        if inputs.prepared is not None:
            pair_gold[str(r)] = pairs_gold_reward(inputs.prepared.world, round_pairs)
        round_jobs = {}
        for agent in ["student", *teachers]:
            mine = round_pairs.filter(pc.equal(round_pairs["agent"], agent))
            if mine.num_rows == 0:  # every pair of this agent was set aside: nothing to learn this round
                _log(f"round{r}_{agent}: no usable pairs, the agent stays as it was")
                continue
            round_jobs[f"round{r}_{agent}"] = (config.dpo, agents[agent], mine)
        for name, model in stages.train(round_jobs).items():  # the agents of a round are independent
            agents[name.removeprefix(f"round{r}_")] = model
        history.append(dict(agents))
    return history, set_aside, pair_gold


def _max_length(config: MACPOConfig, prepare_config) -> int:
    """The run's one max_length on the embedded world, checked against every model size before anything is built."""
    sizes = {f"prepare {field}": n for field, n in model_positions_of(prepare_config).items()}
    sizes.update({f"teacher {t.name} size": t.pretrain.size.n_positions for t in config.teachers if t.pretrain})
    return resolve_max_length(config.max_length, sizes)


def check_room_to_generate(config: MACPOConfig, prompts: list[str], tokenizer, max_length: int) -> None:
    """Refuse, before any training, generation settings whose responses could not fit max_length."""
    longest = max(len(ids) for ids in encode_prompts(tokenizer, prompts))
    for name in ("generation", "eval_generation"):
        new = getattr(config, name).max_new_tokens
        if longest + new + 1 > max_length:
            raise ConfigError(f"{name}.max_new_tokens {new}: the longest prompt ({longest} tokens) + {new} new tokens "
                              f"+ end of turn > max_length {max_length}; lower it or raise max_length")


def check_pairs(rows: list[dict], tokenizer, max_length: int, source: str) -> tuple[list[dict], list[dict]]:
    """Generated pairs through the check of user data (w2s.data.check_batch): (usable rows, rows set
    aside with their `reason`: an empty response, chosen equal to rejected, too long)."""
    raw = pa.table({"source": [source] * len(rows), "row": list(range(len(rows))),
                    "raw": [json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) for r in rows]},
                   schema=RAW_SCHEMA)
    checked = check_batch(raw, tokenizer, max_length).to_pylist()
    usable = [row for row, c in zip(rows, checked) if not c["error"]]
    aside = [{**row, "reason": f"{c['error_field']}: {c['error']}"} for row, c in zip(rows, checked) if c["error"]]
    return usable, aside


def split_halves(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Two halves. The world's pairs: the same share of every prompt `kind` in each, rows of each kind going to
    A and B in turn (the world lists its pairs helpful, harmful, helpful, ...: a plain even/odd split would give
    one half only helpful prompts). Your own pairs carry no kind: a pair's half is set by its prompt's hash, so
    that it does not follow the file's order (a file sorted by topic) and pairs of one prompt stay together."""
    seen: dict = {}
    halves: tuple[list, list] = ([], [])
    for row in rows:
        if "kind" not in row:
            halves[hashlib.sha256(row["prompt"].encode()).digest()[0] % 2].append(row)
            continue
        kind = row["kind"]
        halves[seen.get(kind, 0) % 2].append(row)
        seen[kind] = seen.get(kind, 0) + 1
    return halves


def contrastive_pairs(generations: list[dict], candidates: list[dict], teachers: list[str]) -> list[dict]:
    """The round's DPO pairs, both ways (check_pairs then sets aside those that teach nothing).

    generations: one row per prompt with `<agent>_response` for every agent.
    candidates: one row per (prompt index `i`, `teacher`) with the teacher's positive `response`
    and the student's per-token log-probs of it, `student_response_logps`.
    Student: chosen = the candidate with the highest mean per-token log-prob (the lowest student
    perplexity), rejected = the student's negative agent's response. Teacher t: chosen = the
    student's positive response, rejected = t's negative agent's response.
    """
    best: dict[int, dict] = {}
    for c in candidates:
        mean = sum(c["student_response_logps"]) / max(1, len(c["student_response_logps"]))
        if c["i"] not in best or mean > best[c["i"]]["mean"]:
            best[c["i"]] = {**c, "mean": mean}
    rows = []
    for i, row in enumerate(generations):
        rows.append({"agent": "student", "prompt": row["prompt"], "chosen": best[i]["response"],
                     "rejected": row["student_negative_response"], "chosen_from": best[i]["teacher"]})
        rows.extend({"agent": t, "prompt": row["prompt"], "chosen": row["student_response"],
                     "rejected": row[f"{t}_negative_response"], "chosen_from": "student"} for t in teachers)
    return rows


def pairs_gold_reward(world, pairs: pa.Table) -> dict[str, dict]:
    """Gold reward of the chosen and of the rejected responses of every agent's pairs:
    `{agent: {"pairs": n, "chosen": {helpful, harmless, total}, "rejected": {...}}}`. A pair teaches
    the right thing only where its chosen response scores above its rejected one."""
    by_agent: dict[str, list[dict]] = {}
    for row in pairs.select(["agent", "prompt", "chosen", "rejected"]).to_pylist():
        by_agent.setdefault(row["agent"], []).append(row)
    out = {}
    for agent, rows in by_agent.items():
        prompts = [world.parse_prompt(row["prompt"]) for row in rows]
        out[agent] = {"pairs": len(rows), **{side: gold_scores([
            {"kind": p.kind, "gold_reward": world.gold_reward(p, row[side])} for p, row in zip(prompts, rows)])
            for side in ("chosen", "rejected")}}
    return out


def _round_pairs(config: MACPOConfig, agents: dict[str, ModelSpec], teachers: list[str], prompts: pa.Table,
                 max_length: int, path: Path, workers: Workers) -> None:
    """Generate with every agent, build the contrastive pairs both ways, score their references."""
    gen = workers.generate(prompts, agents, **config.generation.model_dump()).to_pylist()
    # the student's likelihood of the teachers' answers, and each positive agent's as the DPO reference
    hosts = workers.host({agent: agents[agent] for agent in ["student", *teachers]})
    (path / "placement.json").write_text(json.dumps(workers.hosts.where(hosts)))
    # the student's likelihood of each teacher's positive response picks its chosen one
    candidates = pa.Table.from_pylist([{"prompt": row["prompt"], "response": row[f"{t}_response"],
                                        "host": "student", "teacher": t, "i": i}
                                       for i, row in enumerate(gen) for t in teachers])
    scored = score_by_host(candidates, hosts, "host", ("response",), "student_", config.score_batch_size).to_pylist()
    usable, aside = check_pairs(contrastive_pairs(gen, scored, teachers), load_tokenizer(agents["student"].path),
                                max_length, f"{path.name}/pairs")
    table = pa.Table.from_pylist(usable, schema=PAIRS_SCHEMA)
    # DPO reference = each positive agent as it starts the round, scored once here
    table = score_by_host(table, hosts, "agent", ("chosen", "rejected"), "ref_", config.score_batch_size)
    pq.write_table(pa.Table.from_pylist(gen), path / "generations.parquet")
    pq.write_table(table, path / "pairs.parquet")
    pq.write_table(pa.Table.from_pylist(aside, schema=PAIRS_SCHEMA.append(pa.field("reason", pa.string()))),
                   path / "set_aside.parquet")
    _log(f"{path.name}: {table.num_rows} pairs, {len(aside)} set aside (empty, equal or too long)")


def _agent_models(history: list[dict], teachers: list[str]) -> dict[str, ModelSpec]:
    """Every agent after every round, named `<agent>_r<round>`."""
    return {f"{agent}_r{r}": agents[agent] for r, agents in enumerate(history) for agent in ["student", *teachers]}


def _own_models_report(config: MACPOConfig, inputs: Inputs, models: dict[str, ModelSpec], set_aside: dict,
                       run: RunDir, workers: Workers) -> dict:
    """metrics.json and report.md of MACPO on your own models: the pairs of every round, the trained agents (and
    baselines) and, with `evaluate:`, the judges' verdicts on them."""
    teachers = [t.name for t in config.teachers]
    for name, spec in models.items():
        run.link(f"checkpoints/{name}", spec.path)
    pairs = [{"round": r, "agent": agent, "pairs": n} for r in range(1, config.rounds + 1)
             for agent, n in _pairs_per_agent(run.path / "examples" / f"macpo_round{r}_pairs.parquet").items()]
    section = {"teachers": teachers, "rounds": config.rounds, "data": config.data, "pairs": pairs,
               "train_pairs": len(inputs.pairs), "set_aside_rows": inputs.set_aside.num_rows,
               "set_aside_pairs": set_aside}
    report = [f"{len(teachers)} weak teachers ({', '.join(teachers)}) and the student (`{config.student.path}`), "
              f"{config.rounds} rounds of {config.round_prompts} prompts, from {len(inputs.pairs)} pairs of "
              f"{config.data} ({inputs.set_aside.num_rows} set aside, in examples/macpo_rejected_rows.parquet). "
              "Round 0 is the initialisation: the student then equals naive SFT on the teachers' outputs. Every "
              "agent's model is in `checkpoints/<agent>_r<round>`.",
              "Pairs of every round (after the check of user data):\n\n" + markdown_table(pairs),
              "Pairs set aside per round, by reason:\n\n" + "\n".join(
                  f"- round {r}: " + (", ".join(f"{n} {reason}" for reason, n in reasons.items()) or "none")
                  for r, reasons in set_aside.items())]
    update = {"methods": {"macpo": section}}
    if config.evaluate is None:
        report[0] += (" No gold reward exists for your own data: judge the checkpoints with your own judges (an "
                      "`evaluate:` section, or `python -m jobs.evaluate`).")
    else:
        judged, sections = judge_models({"strong_base": inputs.student, **models}, config.evaluate,
                                        config.eval_generation, run, workers)
        update.update(judged)
        report += [f"Judged against `{config.evaluate.reference}` (`evaluate:`, pipelines.judge):", *sections]
    metrics = run.update_metrics(update)
    run.write_report("MACPO on your own models", report)
    return metrics


def _pairs_per_agent(path: Path) -> dict[str, int]:
    agents = pq.read_table(path, columns=["agent"])["agent"].to_pylist()
    return {agent: agents.count(agent) for agent in dict.fromkeys(agents)}


def _evaluate(config: MACPOConfig, prepared, baselines: dict[str, ModelSpec], agents: dict[str, ModelSpec],
              set_aside: dict, pair_gold: dict, run: RunDir, workers: Workers) -> dict:
    """Gold reward of the reference models, the baselines and every agent after every round: metrics and report."""
    references = ("weak_aligned", "strong_ceiling", "strong_base")
    teachers = [t.name for t in config.teachers]
    models = {name: prepared.models[name] for name in references}
    models.update({name: Path(spec.path) for name, spec in {**baselines, **agents}.items()})
    scores, generations = gold_evaluate(prepared.world, prepared.data / "eval_prompts.parquet", models,
                                        config.eval_generation, workers)
    run.write_examples("eval_generations", generations)
    for name, path in models.items():
        run.link(f"checkpoints/{name}", path)
    weak, ceiling = scores["weak_aligned"]["total"], scores["strong_ceiling"]["total"]

    def with_pgr(s: dict) -> dict:
        return {**s, "pgr": pgr(s["total"], weak, ceiling)}

    rounds = [{"round": r, "student": with_pgr(scores[f"student_r{r}"]),
               "teachers": [{"name": t, **scores[f"{t}_r{r}"]} for t in teachers]} for r in range(config.rounds + 1)]
    knowledge = teacher_knowledge(generations, teachers)
    transfer = [knowledge_transfer(generations, name) for name in (*baselines, f"student_r{config.rounds}")]
    section = {"rounds": rounds, "teachers": teachers, "set_aside_pairs": set_aside, "pairs_gold_reward": pair_gold,
               "knowledge": knowledge, "transfer": transfer}
    methods = {"macpo": section, **{n: with_pgr(scores[n]) for n in baselines}}
    if "confident_sft" in baselines:
        methods["confident_sft"]["label_is_own_argmax"] = _label_is_own_argmax(run)
    metrics = run.update_metrics({"models": {n: scores[n] for n in references}, "methods": methods})

    plot_rounds(rounds, scores, run.path / "plots" / "macpo_rounds.png")
    plot_pairs_gold(pair_gold, run.path / "plots" / "macpo_pairs_gold.png")
    table = [{"round": row["round"], "agent": "student", **row["student"]} for row in rounds]
    table += [{"round": row["round"], "agent": t["name"], **{k: t[k] for k in ("helpful", "harmless", "total")},
               "pgr": None} for row in rounds for t in row["teachers"]]
    refs = [{"model": n, **scores[n], "pgr": with_pgr(scores[n])["pgr"] if n in baselines else None}
            for n in (*references, *baselines)]
    run.write_report("MACPO on the embedded world", [
        f"{len(teachers)} weak teachers ({', '.join(teachers)}) and the strong student, {config.rounds} rounds of "
        f"{config.round_prompts} prompts. Round 0 is the initialisation (the student then equals naive SFT on "
        "the teachers' outputs). Gold reward on held-out prompts; PGR on total against weak aligned and strong "
        "ceiling.",
        markdown_table(refs),
        *_confident_reading(methods),
        "Every round:\n\n" + markdown_table(table),
        "![rounds](plots/macpo_rounds.png)",
        "What the teachers know: the share of the held-out facts each teacher answers right after its "
        "initialisation, that at least one does (`any`) and that all do (`all`); the strong base for scale:\n\n"
        + markdown_table([knowledge]),
        "What each round's pairs teach: gold reward of the chosen and of the rejected responses of every agent's "
        "pairs (the student's chosen are teacher answers picked by its likelihood; a teacher's chosen are the "
        "student's answers). A pair moves its agent toward the gold reward only where chosen beats rejected.\n\n"
        + markdown_table(pairs_gold_rows(pair_gold)) + "\n\n" + pairs_reading(pair_gold, teachers),
        "![pairs](plots/macpo_pairs_gold.png)",
        "Whose facts the student answers with (distinct held-out fact prompts; `only_strong_knew`: facts the strong "
        "base knows and the weak aligned model does not; `weak_answer_there`: the share where the student writes "
        "the weak aligned model's wrong answer word for word, 0.14 by chance):\n\n" + markdown_table(transfer),
        "Pairs set aside per round, by reason (the check user data gets: an empty response, chosen equal to "
        "rejected, too long):\n\n" + "\n".join(
            f"- round {r}: " + (", ".join(f"{n} {reason}" for reason, n in reasons.items()) or "none")
            for r, reasons in set_aside.items()),
        "Example generations:\n\n" + examples_table(generations, ["naive_sft", f"student_r{config.rounds}",
                                                                  "strong_ceiling"]),
    ])
    return metrics


def _label_is_own_argmax(run: RunDir) -> float:
    """The confident-loss baseline's last training step: the share of response tokens where the weak label's
    token was the student's own argmax (its hardened prediction)."""
    summary = json.loads((run.path / "stages" / "confident_sft" / "train_summary.json").read_text())
    return summary["last"]["label_is_own_argmax"]


def _confident_reading(methods: dict) -> list[str]:
    """What the confident-loss baseline could do, from its own training: the confidence term pulls toward the
    student's argmax, which is the weak label wherever the two agree."""
    if "confident_sft" not in methods:
        return []
    share = methods["confident_sft"]["label_is_own_argmax"]
    return [f"The confident-loss baseline (`confident_sft`): at its last training step the weak label's token was "
            f"the student's own argmax on {share:.1%} of the response tokens. There the confidence term's hardened "
            "target is the weak label itself, and the loss is naive SFT's; it can keep the student's own answer "
            f"against a weak label only on the other {1 - share:.1%}."]


def teacher_knowledge(generations: pa.Table, teachers: list[str]) -> dict[str, float]:
    """knowledge_overlap of the initialised teachers on the distinct held-out fact prompts, and the strong base's share."""
    facts = distinct_facts(generations)
    known = {name: {p: row[f"{name}_gold"] == 1.0 for p, row in facts.items()}
             for name in [f"{t}_r0" for t in teachers] + ["strong_base"]}
    strong = known.pop("strong_base")
    return {"facts": len(facts), **knowledge_overlap(known), "strong_base": sum(strong.values()) / len(facts)}


def pairs_reading(pair_gold: dict, teachers: list[str]) -> str:
    """What the pair figures say about the student's gain, one line per round (helpful prompts)."""
    lines = []
    for r, agents in sorted(pair_gold.items(), key=lambda item: int(item[0])):
        if "student" not in agents or teachers[0] not in agents:
            lines.append(f"- round {r}: every pair of the student or of {teachers[0]} was set aside: nothing to "
                         "compare.")
            continue
        picked, own = agents["student"]["chosen"]["helpful"], agents[teachers[0]]["chosen"]["helpful"]
        verdict = ("above its own answers: the pairs can teach it facts" if picked > own else
                   "not above its own answers: the pairs cannot make it more helpful")
        lines.append(f"- round {r}: the teacher answers the student picked are right on {picked:.0%} of helpful "
                     f"prompts, its own answers on {own:.0%}: {verdict}; its rejected (negative agent) "
                     f"answers are right on {agents['student']['rejected']['helpful']:.0%}.")
    return "\n".join(lines)


def pairs_gold_rows(pair_gold: dict) -> list[dict]:
    return [{"round": int(r), "agent": agent, "pairs": g["pairs"],
             **{f"{side} {k}": g[side][k] for side in ("chosen", "rejected") for k in ("helpful", "harmless")}}
            for r, agents in pair_gold.items() for agent, g in agents.items()]


def plot_pairs_gold(pair_gold: dict, path: Path, std: dict | None = None) -> None:
    """Helpful gold reward of every agent's chosen and rejected responses, per round."""
    rounds = sorted(pair_gold, key=int)

    def helpful(table: dict, r: str, agent: str, side: str) -> float:  # NaN (a gap) where a round had no pairs
        return table[r][agent][side]["helpful"] if agent in table.get(r, {}) else float("nan")

    series = {}
    for agent in dict.fromkeys(agent for r in rounds for agent in pair_gold[r]):
        for side, style in (("chosen", "o-"), ("rejected", "x:")):
            series[f"{agent} {side}"] = ([helpful(pair_gold, r, agent, side) for r in rounds], style,
                                         [helpful(std, r, agent, side) for r in rounds] if std else None)
    plot_lines([int(r) for r in rounds], series, {}, "round (helpful gold reward of the pairs' responses)", path)


BASELINES = ("naive_sft", "confident_sft")  # what MACPO is compared with (_baselines); confident_sft when configured


def plot_rounds(rounds: list[dict], scores: dict, path: Path, std: dict | None = None) -> None:
    """Gold reward (total) of the student and every teacher per round (with `std`, the rounds' and
    references' standard deviations over seeds, as error bars)."""
    series = {"student": ([row["student"]["total"] for row in rounds], "o-",
                          [row["student"]["total"] for row in std["rounds"]] if std else None)}
    for i, teacher in enumerate(rounds[0]["teachers"]):
        series[f"teacher {teacher['name']}"] = ([row["teachers"][i]["total"] for row in rounds], "s--",
                                                [row["teachers"][i]["total"] for row in std["rounds"]] if std else None)
    plot_lines([row["round"] for row in rounds], series,
               {name: (scores[name]["total"], color) for name, color in
                (("naive_sft", "tab:brown"), ("confident_sft", "tab:olive"), ("strong_ceiling", "black"),
                 ("weak_aligned", "tab:gray")) if name in scores},
               "round (0 = initialisation)", path)
