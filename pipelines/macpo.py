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

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from actors.resources import ClusterConfig
from actors.stages import score_by_host
from actors.trainer import TrainConfig
from actors.workers import Workers, job_workers
from pipelines.evaluation import (GenerationConfig, distinct_facts, examples_table, gold_evaluate,
                                  knowledge_transfer, plot_lines)
from pipelines.prepare import PretrainStage, load_prepare, model_positions_of, prepare, pretrained_base
from w2s.config import ConfigError, StrictModel, offset_seeds
from w2s.metrics import gold_scores, knowledge_overlap, pgr
from w2s.data import RAW_SCHEMA, check_batch
from w2s.modeling import ModelSpec, encode_prompts, load_tokenizer, resolve_max_length
from w2s.runs import Cache, RunDir, markdown_table


class TeacherSpec(StrictModel):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    pretrain: PretrainStage | None = Field(None, description="None: the prepared weak base; else a weak "
                                           "model pretrained here (another size or seed)")


class MACPOConfig(StrictModel):
    run_name: str = "macpo"
    runs_dir: str = "runs"
    cache_dir: str = Field(".cache/w2s", description="content-hash cache of the prepared models")
    prepare: str = Field("configs/prepare.yaml", description="the embedded world's prepare config")
    teachers: list[TeacherSpec] = Field(min_length=1)
    rounds: int = Field(3, ge=1)
    round_prompts: int = Field(250, ge=1, description="prompts per round, taken in turn from half B of the pairs")
    sft: TrainConfig = Field(description="initialisation of every agent (mode sft)")
    student_sft: TrainConfig | None = Field(None, description="the student's initialisation, when it should "
                                            "differ from the teachers' (None: `sft`)")
    dpo: TrainConfig = Field(description="each round's training of the positive agents (mode dpo)")
    generation: GenerationConfig = GenerationConfig()
    eval_generation: GenerationConfig = GenerationConfig()
    score_batch_size: int = Field(64, ge=1)
    max_length: int | None = Field(None, ge=8, description="tokens of prompt + response + EOS for every stage; "
                                   "None: the models' positions")
    cluster: ClusterConfig = ClusterConfig()  # train.cpus_per_worker below 1: a round's agents side by side
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
        if self.dpo.mode != "dpo":
            raise ValueError(f"dpo.mode must be 'dpo', got {self.dpo.mode!r}")
        return self


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

    def run(self, name: str, build) -> Path:
        """The stage's folder, built by `build(folder)` unless already complete."""
        return self.cache.build(name, "", build, _log)

    def train(self, jobs: dict[str, tuple[TrainConfig, Path, pa.Table]]) -> dict[str, Path]:
        """Train independent stages `{name: (config, init model, data)}` at once; their trained models.

        Each stage is handed to the job's training workers from its own thread: they train side by side
        as far as the cluster holds several worker groups (TrainingWorkers), else one after another. A
        stage that fails does not stop the others; its error is raised once all have ended, so finished
        ones are kept.
        """
        def one(name: str) -> Path:
            config, init_model, table = jobs[name]

            def build(path: Path) -> None:
                pq.write_table(table, path / "data.parquet")
                summary = self.workers.train(config, init_model, path / "data.parquet", path / "model", name,
                                             self.storage, self.max_length)
                (path / "train_summary.json").write_text(json.dumps(summary))

            return self.run(name, build) / "model"

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


def run_macpo(config: MACPOConfig, run: RunDir, seed: int = 0, workers: Workers | None = None) -> dict:
    """One MACPO run at run seed `seed` (every `seed` field shifted by it, the prepared world's too).
    `workers`: the calling job's hosts and training workers (None: started here for this run)."""
    start = time.perf_counter()
    config = offset_seeds(config, seed)
    prepare_config = load_prepare(config.prepare, config.cache_dir, seed)
    max_length = _max_length(config, prepare_config)
    # the hosts hold every positive agent at once to score each one's DPO reference
    cluster = config.cluster.model_copy(update={"max_hosts": max(config.cluster.max_hosts, len(config.teachers) + 1)})
    with job_workers(workers, run.path / "ray_train", cluster) as workers:
        stages = Stages(run, config, max_length, workers)
        run.claim(prepare_config, "prepare.yaml")  # the prepare file can change between a kill and a rerun
        prepared = prepare(prepare_config, workers=workers)
        run.link("data", prepared.data)
        history, set_aside, pair_gold = _rounds(config, prepared, stages, max_length, run)
        metrics = _evaluate(config, prepared, history, [t.name for t in config.teachers], set_aside, pair_gold,
                            run, workers)
    run.update_metrics({"wall_seconds": {"macpo": round(time.perf_counter() - start, 1)},
                        "methods": {"macpo": {"stage_seconds": stages.cache.seconds, "stage_nodes": stages.placement()}}})
    return metrics


def _initialise(config: MACPOConfig, prepared, stages: Stages, pairs: list[dict], max_length: int) -> dict[str, Path]:
    """Every agent's starting model: teachers from gold half A, the student from the teachers' outputs on half B."""
    half_a, half_b = split_halves(pairs)  # teachers learn from gold on A; the student sees only B
    teachers = [t.name for t in config.teachers]
    workers = stages.workers
    agents: dict[str, Path] = {}
    prompts = [p["prompt"] for p in half_a]
    init_jobs = {}
    for teacher in config.teachers:
        base = (prepared.models["weak_base"] if teacher.pretrain is None else
                pretrained_base(Cache(config.cache_dir), prepared.world, prepared.world_key, prepared.data,
                                teacher.pretrain, f"teacher_base_{teacher.name}", max_length, workers))
        init_jobs[f"init_{teacher.name}"] = (config.sft, base, _sft_table(prompts, [p["chosen"] for p in half_a]))
        init_jobs[f"init_{teacher.name}_negative"] = (config.sft, base,
                                                       _sft_table(prompts, [p["rejected"] for p in half_a]))
    for name, model in stages.train(init_jobs).items():
        agents[name.removeprefix("init_")] = model

    prompts_b = pa.table({"prompt": [p["prompt"] for p in half_b]})

    def build_weak_labels(path: Path) -> None:
        generations = workers.generate(prompts_b, _specs({name: agents[name] for t in teachers
                                                          for name in (t, f"{t}_negative")}),
                                       **config.generation.model_dump())
        (path / "placement.json").write_text(json.dumps(workers.hosts.where()))
        pq.write_table(generations, path / "generations.parquet")

    labels = pq.read_table(stages.run("weak_labels", build_weak_labels) / "generations.parquet").to_pylist()
    label_prompts = [row["prompt"] for row in labels for _ in teachers]
    student_sft = config.student_sft or config.sft
    agents["student"] = stages.train({"init_student": (student_sft, prepared.models["strong_base"], _sft_table(
        label_prompts, [row[f"{t}_response"] for row in labels for t in teachers]))})["init_student"]
    # the negative agent starts from the student (it must first know the task), so it trains after it
    agents["student_negative"] = stages.train({"init_student_negative": (student_sft, agents["student"], _sft_table(
        label_prompts, [row[f"{t}_negative_response"] for row in labels for t in teachers]))})["init_student_negative"]
    return agents


def _rounds(config: MACPOConfig, prepared, stages: Stages, max_length: int, run: RunDir) -> tuple[list[dict], dict, dict]:
    """The agents after initialisation and after every round; pairs set aside and the gold reward of each round's pairs."""
    pairs = [json.loads(line) for line in (prepared.data / "pairs.jsonl").read_text().splitlines()]
    eval_prompts = pq.read_table(prepared.data / "eval_prompts.parquet", columns=["prompt"])["prompt"].to_pylist()
    check_room_to_generate(config, [p["prompt"] for p in pairs] + eval_prompts,
                           load_tokenizer(prepared.models["strong_base"]), max_length)
    agents = _initialise(config, prepared, stages, pairs, max_length)
    half_b = split_halves(pairs)[1]
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
        pair_gold[str(r)] = pairs_gold_reward(prepared.world, round_pairs)
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
    """The run's one max_length, checked against every model size before anything is built."""
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


def _specs(models: dict[str, Path]) -> dict[str, ModelSpec]:
    return {name: ModelSpec(path=str(path)) for name, path in models.items()}


def split_halves(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Two halves with the same share of every prompt `kind`: rows of each kind go to A and B in turn.
    (The world lists its pairs helpful, harmful, helpful, ...: a plain even/odd split would give one
    half only helpful prompts and the other only harmful ones.)"""
    seen: dict = {}
    halves: tuple[list, list] = ([], [])
    for row in rows:
        kind = row.get("kind")
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


def _round_pairs(config: MACPOConfig, agents: dict[str, Path], teachers: list[str], prompts: pa.Table,
                 max_length: int, path: Path, workers: Workers) -> None:
    """Generate with every agent, build the contrastive pairs both ways, score their references."""
    gen = workers.generate(prompts, _specs(agents), **config.generation.model_dump()).to_pylist()
    # the student's likelihood of the teachers' answers, and each positive agent's as the DPO reference
    hosts = workers.host(_specs({agent: agents[agent] for agent in ["student", *teachers]}))
    (path / "placement.json").write_text(json.dumps(workers.hosts.where(hosts)))
    # the student's likelihood of each teacher's positive response picks its chosen one
    candidates = pa.Table.from_pylist([{"prompt": row["prompt"], "response": row[f"{t}_response"],
                                        "host": "student", "teacher": t, "i": i}
                                       for i, row in enumerate(gen) for t in teachers])
    scored = score_by_host(candidates, hosts, "host", ("response",), "student_", config.score_batch_size).to_pylist()
    usable, aside = check_pairs(contrastive_pairs(gen, scored, teachers), load_tokenizer(agents["student"]),
                                max_length, f"{path.name}/pairs")
    table = pa.Table.from_pylist(usable, schema=PAIRS_SCHEMA)
    # DPO reference = each positive agent as it starts the round, scored once here
    table = score_by_host(table, hosts, "agent", ("chosen", "rejected"), "ref_", config.score_batch_size)
    pq.write_table(pa.Table.from_pylist(gen), path / "generations.parquet")
    pq.write_table(table, path / "pairs.parquet")
    pq.write_table(pa.Table.from_pylist(aside, schema=PAIRS_SCHEMA.append(pa.field("reason", pa.string()))),
                   path / "set_aside.parquet")
    _log(f"{path.name}: {table.num_rows} pairs, {len(aside)} set aside (empty, equal or too long)")


def _evaluate(config: MACPOConfig, prepared, history: list[dict], teachers: list[str], set_aside: dict,
              pair_gold: dict, run: RunDir, workers: Workers) -> dict:
    references = ("weak_aligned", "strong_ceiling", "strong_base")
    models = {name: prepared.models[name] for name in references}
    models["naive_sft"] = history[0]["student"]
    for r, agents in enumerate(history):
        for agent in ["student", *teachers]:
            models[f"{agent}_r{r}"] = agents[agent]
    scores, generations = gold_evaluate(prepared.world, prepared.data / "eval_prompts.parquet", models,
                                        config.eval_generation, workers)
    run.write_examples("eval_generations", generations)
    for name, path in models.items():
        run.link(f"checkpoints/{name}", path)
    weak, ceiling = scores["weak_aligned"]["total"], scores["strong_ceiling"]["total"]

    def with_pgr(s: dict) -> dict:
        return {**s, "pgr": pgr(s["total"], weak, ceiling)}

    rounds = [{"round": r, "student": with_pgr(scores[f"student_r{r}"]),
               "teachers": [{"name": t, **scores[f"{t}_r{r}"]} for t in teachers]} for r in range(len(history))]
    knowledge = teacher_knowledge(generations, teachers)
    transfer = [knowledge_transfer(generations, name) for name in ("naive_sft", f"student_r{len(history) - 1}")]
    section = {"rounds": rounds, "teachers": teachers, "set_aside_pairs": set_aside, "pairs_gold_reward": pair_gold,
               "knowledge": knowledge, "transfer": transfer}
    metrics = run.update_metrics({"models": {n: scores[n] for n in references},
                                  "methods": {"macpo": section, "naive_sft": with_pgr(scores["naive_sft"])}})

    plot_rounds(rounds, scores, run.path / "plots" / "macpo_rounds.png")
    plot_pairs_gold(pair_gold, run.path / "plots" / "macpo_pairs_gold.png")
    table = [{"round": row["round"], "agent": "student", **row["student"]} for row in rounds]
    table += [{"round": row["round"], "agent": t["name"], **{k: t[k] for k in ("helpful", "harmless", "total")},
               "pgr": None} for row in rounds for t in row["teachers"]]
    refs = [{"model": n, **scores[n], "pgr": with_pgr(scores[n])["pgr"] if n == "naive_sft" else None}
            for n in (*references, "naive_sft")]
    run.write_report("MACPO on the embedded world", [
        f"{len(teachers)} weak teachers ({', '.join(teachers)}) and the strong student, {config.rounds} rounds of "
        f"{config.round_prompts} prompts. Round 0 is the initialisation (the student then equals naive SFT on "
        "the teachers' outputs). Gold reward on held-out prompts; PGR on total against weak aligned and strong "
        "ceiling.",
        markdown_table(refs),
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
        "Example generations:\n\n" + examples_table(generations, ["naive_sft", f"student_r{len(history) - 1}",
                                                                  "strong_ceiling"]),
    ])
    return metrics


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
    series = {}
    for agent in pair_gold[rounds[0]]:
        for side, style in (("chosen", "o-"), ("rejected", "x:")):
            series[f"{agent} {side}"] = ([pair_gold[r][agent][side]["helpful"] for r in rounds], style,
                                         [std[r][agent][side]["helpful"] for r in rounds] if std else None)
    plot_lines([int(r) for r in rounds], series, {}, "round (helpful gold reward of the pairs' responses)", path)


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
                (("naive_sft", "tab:brown"), ("strong_ceiling", "black"), ("weak_aligned", "tab:gray"))},
               "round (0 = initialisation)", path)
