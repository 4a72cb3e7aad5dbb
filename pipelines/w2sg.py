"""Weak-to-strong generalization (Burns et al. 2024; ALGORITHMS.md section 4) on the embedded world, or on your
own weak and strong checkpoints and preference pairs (`prepare: null`: the task `pairs`).

    per task and seed:  the world's rows -> three splits (w2s.w2sg.split_groups)
      weak supervisor   = the weak base + a classification head, trained on train_gold's gold labels
                          (a pairwise task: the head scores both responses, mode compare)
      weak labels       = its probabilities on train_weak (through the model hosts)
      strong ceiling    = the strong base + a head, trained on train_weak's gold labels
      weak-to-strong    = the strong base + a head, trained on train_weak's weak labels, once per loss
                          (naive cross-entropy, the auxiliary confidence loss, the product loss)
    every model scored on test (accuracy); PGR = (w2s - weak) / (ceiling - weak)

Every head trains on the job's ZeRO-3 Ray Train workers (mode `classify`, or `compare` for a pairwise task). A
linear head is saved as a one-label AutoModelForSequenceClassification: a reward model any job's hosts or judges
can load. A likelihood head (the LM's own log-likelihood of the response, scaled and shifted: what a small LM knows
is there, not in its last token's state) starts from the logistic fit of its training labels on the init LM's
log-likelihoods and is saved as the LM and its two scalars; hosts read it as task likelihood_classification.
Splits and trained heads are cached by content. Seeds draw other splits and train with other seeds; the world and its two base models
stay those of the prepare config.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from actors.resources import ClusterConfig
from actors.stages import reward_responses, score_responses
from actors.trainer import ConfidenceLoss, HeadLoss, NaiveLoss, ProductLoss, TrainConfig
from actors.workers import Workers, job_workers
from pipelines.prepare import Prepared, PretrainStage, load_prepare, max_length_of, prepare, pretrained_base
from w2s.config import StrictModel, offset_seeds, unset
from w2s.metrics import mean_and_spread, median_pgr, pgr
from w2s.data import PreferenceDataError, format_rejections, load_pairs
from w2s.modeling import (LIKELIHOOD_HEAD, ModelSpec, check_model_task, check_same_tokenizer, classifier_task, load_tokenizer,
                          model_positions, resolve_max_length, weights_fingerprint)
from w2s.runs import Cache, RunDir, content_hash, file_hash, markdown_table
from w2s.w2sg import SPLITS, accuracy, accuracy_by_band, fit_logistic, imitation, pair_groups, split_groups

TASKS = ("correct", "harmless", "pairs")
PAIRWISE = ("pairs",)  # tasks whose rows are two responses (response_a, response_b): heads train in mode compare
POPULARITY_BANDS = ("1_head", "2_middle", "3_tail")  # sorted as named: the weak model knows the head
PROBE = "probe"  # a likelihood head's start on the weak labels: their logistic fit on the strong LM, nothing trained
# with `bootstrap`: the strong model trained on the intermediate model's labels, and on the weak ones of the same rows
BOOTSTRAPPED = ("bootstrapped", "direct_half")
# with `generative`: the ceiling and the first loss's weak-to-strong model on the generatively finetuned strong base
GENERATIVE_CEILING = "generative_ceiling"
HEAD = TrainConfig(mode="classify", head_loss=NaiveLoss(), lr=1e-3, epochs=4, batch_size=16, num_workers=2)


class W2SGConfig(StrictModel):
    run_name: str = "w2sg"
    runs_dir: str = "runs"
    cache_dir: str = Field(".cache/w2s", description="content-hash cache of every stage, the prepared models included")
    prepare: str | None = Field("configs/prepare.yaml", description="the prepare config whose world and weak / "
                                "strong base models to use; null: your own `weak`, `strong` and `data`")
    weak: ModelSpec | None = Field(None, exclude_if=unset, description="your own models: the weak base (its head, "
                                   "trained on gold labels, is the weak supervisor)")
    strong: ModelSpec | None = Field(None, exclude_if=unset, description="your own models: the strong base; the "
                                     "same tokenizer as `weak`")
    data: str | None = Field(None, exclude_if=unset, description="your own models: preference pairs (JSONL, "
                             "Parquet or saved HF dataset; plain or chat), the task `pairs`: which of two responses "
                             "is the better, the chosen one by gold label")
    max_length: int | None = Field(None, ge=8, exclude_if=unset, description="your own models: tokens of prompt + "
                                   "response + end of turn (None: the models' positions); the world's is its prepare "
                                   "config's")
    tasks: list[Literal["correct", "harmless", "pairs"]] = Field(list(TASKS), min_length=1,
                                                            description="w2s.world.World.classification_groups")
    losses: list[HeadLoss] = Field([NaiveLoss(), ConfidenceLoss(), ProductLoss()], min_length=1,
                                   description="the weak-to-strong models' losses on the weak labels, one model each")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="each draws other splits and shifts every training "
                             "seed; the world and its base models stay")
    test_share: float = Field(0.2, gt=0, lt=1, description="groups (a fact, a request) held out for the test split; "
                              "the rest is halved into train_gold and train_weak")
    weak_train: TrainConfig = Field(HEAD, description="the weak supervisor's training, on gold labels (its head_loss)")
    strong_train: TrainConfig = Field(HEAD, description="the strong models' training: the ceiling with its head_loss "
                                      "on gold labels, the weak-to-strong models with each of `losses` on weak ones")
    pgr_min_gap: float = Field(0.05, ge=0, description="a seed's PGR is reported only where the ceiling beats the "
                               "weak supervisor by at least this much test accuracy: below it the ratio is noise over "
                               "noise (one row of a 120-row test is 0.008)")
    bootstrap: PretrainStage | None = Field(None, description="an intermediate model (a size between the weak and "
                                            "the strong one, pretrained on the world's corpus): the chain weak -> "
                                            "intermediate -> strong, each trained on the labels of the one before, "
                                            "against the strong model trained on the weak labels of the same rows")
    generative: TrainConfig | None = Field(None, description="generative finetuning (mode lm): the strong base "
                                           "first trained with the LM loss on the task's training texts, no label "
                                           "(train_gold and train_weak: prompt + response), then the ceiling and the "
                                           "weak-to-strong model with the first of `losses` on it, as "
                                           "`generative_<loss>`, whose PGR is against that ceiling")
    score_batch_size: int = Field(64, ge=1)
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="before")
    @classmethod
    def _own_task(cls, data):
        """Your own pairs make one task, `pairs`: it is the default of `tasks` there."""
        if isinstance(data, dict) and "prepare" in data and data["prepare"] is None:
            data.setdefault("tasks", list(PAIRWISE))
        return data

    @model_validator(mode="after")
    def _check(self):
        own = [name for name in ("weak", "strong", "data", "max_length") if getattr(self, name) is not None]
        if self.prepare is not None and own:
            raise ValueError(f"{', '.join(own)}: for your own models (prepare: null); the embedded world brings its "
                             "models and rows")
        if self.prepare is None:
            missing = [name for name in ("weak", "strong", "data") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"prepare: null (your own models) needs {', '.join(missing)}")
            if self.tasks != list(PAIRWISE):
                raise ValueError(f"tasks: your own pairs make the task {PAIRWISE[0]!r} only, got {self.tasks}")
            if self.bootstrap is not None:
                raise ValueError("bootstrap pretrains its intermediate model on the embedded world; with your own "
                                 "models it is not available")
        if self.generative is not None and self.generative.mode != "lm":
            raise ValueError(f"generative.mode must be 'lm', got {self.generative.mode!r}")
        for field in ("weak_train", "strong_train"):
            if getattr(self, field).mode != "classify":
                raise ValueError(f"{field}.mode must be 'classify', got {getattr(self, field).mode!r}")
        kinds = [loss.kind for loss in self.losses]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"losses: each kind once (a model per loss), got {kinds}")
        if len(set(self.tasks)) != len(self.tasks) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("tasks and seeds: each once")
        return self


def _log(msg: str) -> None:
    print(f"[w2sg] {msg}", flush=True)


def run_w2sg(config: W2SGConfig, run: RunDir, workers: Workers | None = None) -> dict:
    """Every task, seed and loss; metrics.json gets `methods.w2sg.<task>.<loss>` and report.md the PGR table."""
    start = time.perf_counter()
    run.claim(config)
    with job_workers(workers, Path(config.cache_dir).resolve() / "ray_train", config.cluster) as workers:
        inputs = _world_inputs(config, workers) if config.prepare else _own_inputs(config, run)
        job = _Job(config, inputs, run, workers)
        per_seed = {task: [job.one_seed(task, seed) for seed in config.seeds] for task in config.tasks}
    # likelihood heads: also the strong model's probe of the weak labels alone (PROBE: no weight of the LM trained)
    kinds = [loss.kind for loss in config.losses] + ([PROBE] if config.strong_train.head == "likelihood" else [])
    kinds += list(BOOTSTRAPPED) if config.bootstrap else []
    ceilings = {generative_kind(config): GENERATIVE_CEILING} if config.generative else {}
    kinds += list(ceilings)
    section = {task: summarize(runs, kinds, config.pgr_min_gap, ceilings) for task, runs in per_seed.items()}
    metrics = run.update_metrics({"methods": {"w2sg": section}, "per_seed": {"w2sg": per_seed},
                                  "wall_seconds": {"w2sg": round(time.perf_counter() - start, 1)}})
    plot_accuracies(section, run.path / "plots" / "w2sg_accuracy.png")
    title = "on the embedded world" if config.prepare else f"on {config.data}"
    run.write_report(f"Weak-to-strong generalization {title}", report_sections(config, inputs, section, per_seed))
    return metrics


@dataclass
class Inputs:
    """What a job trains on: the two base models and each task's rows, in groups that go to one split together."""

    bases: dict[str, Path]  # weak, strong
    groups: Callable[[str], list[list[dict]]]  # task -> its rows' groups
    key: str  # the rows' content key (the world's, or your data file's)
    max_length: int
    prepared: Prepared | None = None  # the embedded world (bootstrapping, popularity bands); None: your own
    usable_rows: int = 0  # your own pairs: the usable ones, and those set aside with their reasons
    set_aside_rows: int = 0


def _world_inputs(config: W2SGConfig, workers: Workers) -> Inputs:
    prepare_config = load_prepare(config.prepare, config.cache_dir)
    prepared = prepare(prepare_config, workers=workers)
    return Inputs({"weak": prepared.models["weak_base"], "strong": prepared.models["strong_base"]},
                  prepared.world.classification_groups, prepared.world_key, max_length_of(prepare_config), prepared)


def _own_inputs(config: W2SGConfig, run: RunDir) -> Inputs:
    """Your own models and pairs, checked in the driver before any worker starts. A row that is not a usable pair
    (a missing or empty field, chosen equal to rejected, too long) is set aside with its reason
    (examples/w2sg_rejected_rows.parquet)."""
    models = {"weak": config.weak, "strong": config.strong}
    for spec in models.values():
        check_model_task(spec.path, "causal_lm")
    check_same_tokenizer(models)
    max_length = resolve_max_length(config.max_length, {n: model_positions(s.path) for n, s in models.items()})
    good, bad = load_pairs(config.data, load_tokenizer(config.strong.path, config.strong.trust_remote_code),
                           max_length)
    run.write_examples("w2sg_rejected_rows", bad)
    _log(f"{good.num_rows} usable pairs in {config.data}; {format_rejections(bad)}")
    groups = pair_groups(good.select(["prompt", "chosen", "rejected"]).to_pylist())
    if len(groups) < 3:
        raise PreferenceDataError(f"{config.data}: {len(groups)} usable pairs; the task needs at least 3 (a test "
                                  f"split and two training halves). {format_rejections(bad)}")
    return Inputs({name: Path(spec.path) for name, spec in models.items()}, lambda task: groups,
                  file_hash(Path(config.data)), max_length, usable_rows=good.num_rows, set_aside_rows=bad.num_rows)


class HeadStages:
    """The stages of a job that trains classification heads (this one, the deception analysis), each cached by
    content: a task's splits, heads trained on the job's workers, a head's labels, predictions through the hosts."""

    def __init__(self, cache: Cache, run: RunDir, workers: Workers, inputs: Inputs, test_share: float,
                 score_batch_size: int, log: Callable[[str], None]):
        self.cache, self.run, self.workers, self.inputs = cache, run, workers, inputs
        self.test_share, self.score_batch_size, self.log = test_share, score_batch_size, log
        self.max_length = inputs.max_length
        self.started: dict[Path, Path] = {}  # a trained likelihood head -> the logistic fit it started from

    def splits(self, task: str, seed: int) -> Path:
        key = content_hash("w2sg-splits-v1", self.inputs.key, task, seed, self.test_share)

        def build(path: Path) -> None:
            parts = split_groups(self.inputs.groups(task), self.test_share, seed)
            for name, rows in parts.items():
                pq.write_table(pa.Table.from_pylist(rows), path / f"{name}.parquet")

        return self.cache.build("w2sg_splits", key, build, self.log)

    def fit(self, head: Path) -> dict:
        """How well a head fit its own training labels: its last training batch's loss and agreement."""
        last = json.loads((head.parent / "train_summary.json").read_text())["last"]
        return {"last_batch_loss": last["loss"], "last_batch_label_agreement": last["label_agreement"]}

    def head(self, name: str, train: TrainConfig, init: Path, data: Path) -> Path:
        """A classification head on `init` trained on `data` (cached by content); a likelihood head starts from
        the logistic regression of `data`'s labels on the init model's log-likelihoods (likelihood_start)."""
        if train.head == "likelihood":
            init = self.likelihood_start(name, init, data)
        key = content_hash("w2sg-head-v1", train, weights_fingerprint(init), file_hash(data), self.max_length)
        model = self.trained("w2sg_head", key, name, train, init, data)
        self.run.link(f"checkpoints/w2sg_{name}", model)
        if train.head == "likelihood":
            self.started[model] = init
        return model

    def trained(self, stage: str, key: str, name: str, train: TrainConfig, init: Path, data: Path) -> Path:
        """`init` trained on `data` by the job's workers into `<stage>-<key>/model` (cached by content), its
        train summary beside the model."""
        def build(path: Path) -> None:
            summary = self.workers.train(train, init, data, path / "model", f"w2sg-{key}", self.cache.root / "ray_train",
                                         self.max_length, tensorboard_dir=self.run.path / "tensorboard" / name)
            (path / "train_summary.json").write_text(json.dumps(summary))

        return self.cache.build(stage, key, build, lambda msg: self.log(f"{name}: {msg}")) / "model"

    def likelihood_start(self, name: str, init: Path, data: Path) -> Path:
        """`init` (its files linked) with the likelihood head that best fits `data`'s labels before any weight of
        the LM changes: the logistic regression of the labels on the LM's log-likelihood of each row (linear
        probing, then fine-tuning everything: a head that starts at random undoes what the LM knows first)."""
        key = content_hash("w2sg-likelihood-start-v1", weights_fingerprint(init), file_hash(data))

        def build(path: Path) -> None:
            import numpy as np

            table = pq.read_table(data)
            (host,) = self.workers.host({"init": ModelSpec(path=str(init))}).values()
            sums = [np.array([row.sum(dtype=np.float64) for row in score_responses(
                        _one_side(table, side), {"init": host}, self.score_batch_size)["init_response_logps"]
                        .to_numpy(zero_copy_only=False)]) for side in _sides(table)]
            features = sums[0] - sums[1] if len(sums) == 2 else sums[0]  # a pair: its log-likelihood ratio
            scale, bias = fit_logistic(features, table["label"].to_pylist())
            model = path / "model"
            model.mkdir()
            for file in init.iterdir():
                if file.is_file() and not file.name.startswith("."):
                    (model / file.name).symlink_to(file.resolve())
            (model / LIKELIHOOD_HEAD).write_text(json.dumps({"scale": scale, "bias": bias}))

        return self.cache.build("w2sg_likelihood_start", key, build, lambda msg: self.log(f"{name} start: {msg}")) / "model"

    def labels(self, model: Path, data: Path) -> Path:
        """`data` (gold labels) with `model`'s probability of class 1 as its label, the gold one set apart as
        `gold_label` (cached by content)."""
        key = content_hash("w2sg-weak-labels-v1", weights_fingerprint(model), file_hash(data))

        def build(path: Path) -> None:
            table = pq.read_table(data)
            (probs,) = self.predict(table, {"labeller": model}).values()
            table = table.rename_columns(["gold_label" if c == "label" else c for c in table.column_names])
            pq.write_table(table.append_column("label", pa.array(probs, pa.float64())), path / "train_weak_labels.parquet")

        return self.cache.build("w2sg_weak_labels", key, build, self.log) / "train_weak_labels.parquet"

    def halves(self, data: Path) -> tuple[Path, Path]:
        """`data`'s rows in two halves, whole groups each (a group is two consecutive rows, one of each class)."""
        key = content_hash("w2sg-halves-v1", file_hash(data))

        def build(path: Path) -> None:
            table = pq.read_table(data)
            cut = table.num_rows // 4 * 2
            pq.write_table(table.slice(0, cut), path / "first.parquet")
            pq.write_table(table.slice(cut), path / "second.parquet")

        path = self.cache.build("w2sg_halves", key, build, self.log)
        return path / "first.parquet", path / "second.parquet"

    def predict(self, table: pa.Table, heads: dict[str, Path]) -> dict[str, list[float]]:
        """Each head's probability of class 1 on every row (of a pair: that response_a is the better, from the
        difference of its two scores), the heads streamed through the job's hosts."""
        import torch

        names, out = list(heads), {}
        for i in range(0, len(names), self.workers.hosts.max_hosts):
            hosts = self.workers.host({n: ModelSpec(path=str(heads[n]), task=classifier_task(heads[n]))
                                       for n in names[i:i + self.workers.hosts.max_hosts]})
            scored = [reward_responses(_one_side(table, side), hosts, self.score_batch_size)
                      for side in _sides(table)]
            for n in hosts:
                logits = [torch.from_numpy(s[f"{n}_reward"].to_numpy().astype("float64")) for s in scored]
                # torch's sigmoid: math.exp(-z) overflows for a logit below -709
                out[n] = torch.sigmoid(logits[0] - logits[1] if len(logits) == 2 else logits[0]).tolist()
        return out


class _Job(HeadStages):
    """One job's world, hosts, workers and cache: the stages of one (task, seed)."""

    def __init__(self, config: W2SGConfig, inputs: Inputs, run: RunDir, workers: Workers):
        super().__init__(Cache(config.cache_dir), run, workers, inputs, config.test_share, config.score_batch_size,
                         _log)
        self.config = config
        # the world's entities in thirds by how often the corpus writes of them (none for your own rows)
        ranked = inputs.prepared.world.popularity(0) if inputs.prepared else []
        self.band_of = {name: POPULARITY_BANDS[3 * rank // len(ranked)] for rank, name in enumerate(ranked)}

    def one_seed(self, task: str, seed: int) -> dict:
        """The weak supervisor, its labels, the ceiling and a weak-to-strong model per loss; their test accuracy."""
        _log(f"task {task!r}, seed {seed}")
        splits = self.splits(task, seed)
        bases = self.inputs.bases
        mode = {"mode": "compare" if task in PAIRWISE else "classify"}  # one response's class, or which of two
        weak_train, strong_train = (offset_seeds(c, seed).model_copy(update=mode)
                                    for c in (self.config.weak_train, self.config.strong_train))
        weak = self.head(f"{task}_s{seed}_weak", weak_train, bases["weak"], splits / "train_gold.parquet")
        labelled = self.labels(weak, splits / "train_weak.parquet")  # the weak labels
        heads = {"strong_ceiling": self.head(f"{task}_s{seed}_ceiling", strong_train, bases["strong"],
                                              splits / "train_weak.parquet")}
        for loss in self.config.losses:
            heads[loss.kind] = self.head(f"{task}_s{seed}_{loss.kind}", strong_train.model_copy(update={"head_loss": loss}),
                                          bases["strong"], labelled)
        if self.config.bootstrap:
            heads.update(self._bootstrap(task, seed, weak, splits, weak_train, strong_train))
        if self.config.generative:
            heads.update(self._generative(task, seed, splits, strong_train, labelled))
        models = {"weak": weak, **heads}
        starts = {f"{name}_start": self.started[path] for name, path in models.items() if path in self.started}
        test = pq.read_table(splits / "test.parquet")
        probs = self.predict(test, {**models, **starts})
        for name, p in probs.items():  # every model's probability of class 1, row by row
            test = test.append_column(f"{name}_prob", pa.array(p, pa.float32()))
        self.run.write_examples(f"w2sg_{task}_s{seed}_test", test)
        probe = f"{self.config.losses[0].kind}_start"  # likelihood heads' common start: the weak labels' probe
        if probe in probs:
            probs[PROBE] = probs[probe]
        students = ["strong_ceiling", *(loss.kind for loss in self.config.losses), *([PROBE] if probe in probs else []),
                    *(BOOTSTRAPPED if self.config.bootstrap else []),
                    *((GENERATIVE_CEILING, generative_kind(self.config)) if self.config.generative else ())]
        gold = test["label"].to_pylist()
        label_probs = pq.read_table(labelled, columns=["label"])["label"].to_pylist()
        return {"seed": seed, "rows": {s: pq.read_metadata(splits / f"{s}.parquet").num_rows for s in SPLITS},
                "weak_label_accuracy": accuracy(label_probs,
                                                pq.read_table(splits / "train_weak.parquet")["label"].to_pylist()),
                "accuracy": {name: accuracy(probs[name], gold)
                             for name in ["weak", *students, *(["intermediate"] if self.config.bootstrap else [])]},
                # a likelihood head before fine-tuning: the logistic fit of its labels on what the LM knows
                "start_accuracy": {name.removesuffix("_start"): accuracy(probs[name], gold) for name in starts},
                "train_fit": {name: self.fit(head) for name, head in models.items()},
                "imitation": {kind: imitation(probs[kind], probs["weak"], gold) for kind in students},
                "by_popularity": accuracy_by_band(test.to_pylist(), {n: probs[n] for n in ["weak", *students]},
                                                  self.band_of)}

    def _bootstrap(self, task: str, seed: int, weak: Path, splits: Path, weak_train: TrainConfig,
                   strong_train: TrainConfig) -> dict[str, Path]:
        """Bootstrapping: train_weak's first half labelled by the weak supervisor trains the intermediate model,
        which labels the second half for the strong one (`bootstrapped`); `direct_half` is the strong model on the
        weak labels of that same second half. Naive loss and the weak head's settings for the intermediate."""
        prepared = self.inputs.prepared  # the config refuses bootstrap without the world
        mid_base = pretrained_base(self.cache, prepared.world, prepared.world_key, prepared.data,
                                   self.config.bootstrap, "w2sg_intermediate_base",  # one for every seed
                                   self.max_length, self.workers)
        first, second = self.halves(splits / "train_weak.parquet")
        naive = {"head_loss": NaiveLoss()}
        mid = self.head(f"{task}_s{seed}_intermediate", weak_train.model_copy(update=naive), mid_base,
                         self.labels(weak, first))
        strong = strong_train.model_copy(update=naive)
        return {"intermediate": mid,
                "bootstrapped": self.head(f"{task}_s{seed}_bootstrapped", strong, self.inputs.bases["strong"],
                                           self.labels(mid, second)),
                "direct_half": self.head(f"{task}_s{seed}_direct_half", strong, self.inputs.bases["strong"],
                                          self.labels(weak, second))}

    def _generative(self, task: str, seed: int, splits: Path, strong_train: TrainConfig, labelled: Path
                    ) -> dict[str, Path]:
        """Generative finetuning: the strong base trained with the LM loss on the task's training texts (no label),
        then the ceiling on gold labels and the weak-to-strong model (first loss) on the weak ones, from it."""
        texts = self._texts(splits)
        train = offset_seeds(self.config.generative, seed)
        key = content_hash("w2sg-generative-v1", train, weights_fingerprint(self.inputs.bases["strong"]),
                           file_hash(texts), self.max_length)
        base = self.trained("w2sg_generative", key, f"{task}_s{seed}_generative", train,
                             self.inputs.bases["strong"], texts)
        loss = self.config.losses[0]
        return {GENERATIVE_CEILING: self.head(f"{task}_s{seed}_generative_ceiling", strong_train, base,
                                               splits / "train_weak.parquet"),
                generative_kind(self.config): self.head(f"{task}_s{seed}_{generative_kind(self.config)}",
                                                         strong_train.model_copy(update={"head_loss": loss}),
                                                         base, labelled)}

    def _texts(self, splits: Path) -> Path:
        """The task's training texts for the LM loss: prompt + response of every row of train_gold and train_weak
        (each response of a pair), without labels; the test split is left out."""
        key = content_hash("w2sg-texts-v1", *(file_hash(splits / f"{s}.parquet") for s in ("train_gold", "train_weak")))

        def build(path: Path) -> None:
            texts = []
            for split in ("train_gold", "train_weak"):
                table = pq.read_table(splits / f"{split}.parquet")
                texts += [p + r for side in _sides(table) for p, r in zip(table["prompt"].to_pylist(),
                                                                           table[side].to_pylist())]
            pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), path / "texts.parquet")

        return self.cache.build("w2sg_texts", key, build, _log) / "texts.parquet"


def _sides(table: pa.Table) -> tuple[str, ...]:
    """The response columns of a task's rows: one, or a pair's two."""
    return ("response_a", "response_b") if "response_a" in table.column_names else ("response",)


def _one_side(table: pa.Table, side: str) -> pa.Table:
    """(prompt, response) of one response column: what the hosts score."""
    return pa.table({"prompt": table["prompt"], "response": table[side]})


def generative_kind(config: W2SGConfig) -> str:
    """The weak-to-strong model on the generatively finetuned strong base (its loss: the first of `losses`)."""
    return f"generative_{config.losses[0].kind}"


def summarize(runs: list[dict], kinds: list[str], min_gap: float = 0.0, ceilings: dict[str, str] | None = None
              ) -> dict:
    """Per loss over the seeds: {weak, strong_ceiling, w2s, pgr}, each with its median and spread; a seed's PGR is
    None where its ceiling does not beat its weak supervisor by at least `min_gap` (left out of the median; `n`
    counts the seeds that have one). `ceilings`: a kind's own ceiling, where not `strong_ceiling`."""
    def spread(values: list[float]) -> dict:
        return {**mean_and_spread(values), "per_seed": values}

    out = {}
    for kind in kinds:
        ceiling = (ceilings or {}).get(kind, "strong_ceiling")
        pgrs = [pgr(r["accuracy"][kind], r["accuracy"]["weak"], r["accuracy"][ceiling])
                if r["accuracy"][ceiling] - r["accuracy"]["weak"] >= max(min_gap, 1e-12) else None for r in runs]
        defined = [p for p in pgrs if p is not None]
        out[kind] = {"weak": spread([r["accuracy"]["weak"] for r in runs]),
                     "strong_ceiling": spread([r["accuracy"][ceiling] for r in runs]),
                     "w2s": spread([r["accuracy"][kind] for r in runs]),
                     "pgr": {"median": median_pgr(pgrs), "min": min(defined, default=None),
                             "max": max(defined, default=None), "n": len(defined), "per_seed": pgrs}}
    return out


def pgr_table(section: dict) -> list[dict]:
    return [{"task": task, "loss": kind, "weak": s["weak"]["median"], "w2s": s["w2s"]["median"],
             "strong_ceiling": s["strong_ceiling"]["median"], "pgr_median": s["pgr"]["median"],
             "pgr_min": s["pgr"]["min"], "pgr_max": s["pgr"]["max"], "seeds_with_pgr": s["pgr"]["n"]}
            for task, losses in section.items() for kind, s in losses.items()]


def _tasks_paragraph(config: W2SGConfig, inputs: Inputs) -> str:
    """What the tasks are: the world's, or your pairs."""
    if inputs.prepared is None:
        return (f"Task `pairs` from your preference pairs `{config.data}` ({inputs.usable_rows} usable, "
                f"{inputs.set_aside_rows} set aside with their reasons in examples/w2sg_rejected_rows.parquet): "
                "which of two responses is the better (reward modelling), each pair in both orders; weak base "
                f"`{config.weak.path}`, strong base `{config.strong.path}`.")
    return (f"Tasks {', '.join(config.tasks)} of the world (`correct`: is this answer to a fact question right? "
            "`harmless`: is this response to a harmful request harmless? `pairs`: which of two responses is the "
            "better, a fact's right and wrong value or a request's refusal and instructions: reward modelling), "
            "balanced, split by fact / request.")


def report_sections(config: W2SGConfig, inputs: Inputs, section: dict, per_seed: dict) -> list[str]:
    imitation_rows = [{"task": task, "seed": r["seed"], "weak_label_accuracy": r["weak_label_accuracy"],
                       **{f"{kind}_copied": r["imitation"][kind]["copied"] for kind in r["imitation"]},
                       "weak_wrong_rows": r["imitation"]["strong_ceiling"]["weak_wrong"]}
                      for task, runs in per_seed.items() for r in runs]
    fit_rows = [{"task": task, "seed": r["seed"], "model": name, **fit}
                for task, runs in per_seed.items() for r in runs for name, fit in r["train_fit"].items()]
    return [
        _tasks_paragraph(config, inputs) + f" Heads: weak `{config.weak_train.head}`, strong `{config.strong_train.head}` (linear: a "
        "new one-logit head on the last token; likelihood: the LM's own log-likelihood of the response, scaled and "
        "shifted, started from a logistic fit of the labels). The weak "
        "supervisor (weak base + head, gold labels of train_gold) labels train_weak; the strong base + head is "
        "trained on those weak labels with each loss, and on their gold labels for the ceiling. Test accuracy, "
        f"median over seeds {config.seeds}; PGR = (w2s - weak) / (ceiling - weak), its median over the seeds "
        f"where the ceiling beats the weak supervisor by at least {config.pgr_min_gap} (`pgr_min_gap`).",
        markdown_table(pgr_table(section)),
        *[_why_no_pgr(task, losses, config.pgr_min_gap) for task, losses in section.items()
          if all(s["pgr"]["n"] == 0 for s in losses.values())],
        "![accuracy of the weak supervisor, the weak-to-strong models and the strong ceiling](plots/w2sg_accuracy.png)",
        "How much of the weak supervisor's mistakes each strong model learnt: on the test rows the weak supervisor "
        "gets wrong, `<model>_copied` is the share where the model gives the same wrong answer (the ceiling, "
        "trained on gold, shows how often the strong model errs there on its own).\n\n" + markdown_table(imitation_rows),
        *_bootstrap_table(per_seed),
        *_generative_table(config, per_seed),
        *_popularity_table(per_seed),
        *_start_table(per_seed),
        "How well each head fit its own training labels (its last training batch: loss, where 0.693 is a coin, and "
        "agreement with its labels). A head at chance on test that did not fit its training labels either learnt "
        "nothing; one that fit them and is at chance on test memorised its rows.\n\n" + markdown_table(fit_rows),
    ]


def _generative_table(config: W2SGConfig, per_seed: dict) -> list[str]:
    """With and without generative finetuning, seed by seed: the ceilings and the weak-to-strong models."""
    if not config.generative:
        return []
    kind, generative = config.losses[0].kind, generative_kind(config)
    rows = [{"task": task, "seed": r["seed"], "weak": r["accuracy"]["weak"], "ceiling": r["accuracy"]["strong_ceiling"],
             kind: r["accuracy"][kind], GENERATIVE_CEILING: r["accuracy"][GENERATIVE_CEILING],
             generative: r["accuracy"][generative]} for task, runs in per_seed.items() for r in runs]
    return [f"Generative finetuning (`generative`): the strong base first trained with the LM loss on the task's "
            f"training texts, no label; then the ceiling (`{GENERATIVE_CEILING}`) and the weak-to-strong model with "
            f"the {kind} loss (`{generative}`, its PGR against that ceiling) on it, next to the same without it.\n\n"
            + markdown_table(rows)]


def _bootstrap_table(per_seed: dict) -> list[str]:
    """Bootstrapping's chain, seed by seed: each model's test accuracy."""
    names = ("weak", "intermediate", "bootstrapped", "direct_half", "strong_ceiling")
    rows = [{"task": task, "seed": r["seed"], **{n: r["accuracy"][n] for n in names}}
            for task, runs in per_seed.items() for r in runs if "intermediate" in r["accuracy"]]
    if not rows:
        return []
    return ["Bootstrapping (`bootstrap`): the weak supervisor labels the first half of train_weak for the "
            "intermediate model, which labels the second half for the strong one (`bootstrapped`); `direct_half` "
            "is the strong model on the weak labels of that same second half (naive loss for all).\n\n"
            + markdown_table(rows)]


def _popularity_table(per_seed: dict) -> list[str]:
    """Fact questions by how popular their entity is in the pretraining corpus: where the weak supervisor does
    not know (the tail), does the weak-to-strong model keep what the strong model knows?"""
    rows = [{"task": task, "seed": r["seed"], **band} for task, runs in per_seed.items() for r in runs
            for band in r.get("by_popularity", [])]
    if not rows:
        return []
    return ["Test accuracy on fact questions by the popularity of their entity in the pretraining corpus (thirds "
            "of the entities, 1_head the most written about): the weak model knows the head, the strong one the "
            "tail too. A weak-to-strong model that falls to the weak model's accuracy in the tail learnt where the "
            "weak model is ignorant, not only its labels' mistakes on the rows it saw.\n\n" + markdown_table(rows)]


def _start_table(per_seed: dict) -> list[str]:
    """Likelihood heads: test accuracy at their start (the logistic fit of their labels on the LM, no weight of
    the LM changed) and after fine-tuning: whether training on the labels taught the LM, or made it unlearn."""
    rows = [{"task": task, "seed": r["seed"], "model": name, "start": start, "trained": r["accuracy"][name],
             "change": r["accuracy"][name] - start}
            for task, runs in per_seed.items() for r in runs for name, start in r.get("start_accuracy", {}).items()]
    if not rows:
        return []
    return ["Likelihood heads before and after fine-tuning (test accuracy): `start` reads what the LM already "
            "knows through the logistic fit of the head's training labels; `trained` is after every weight trained "
            "on those labels. A weak-to-strong model whose `trained` is below its `start` unlearnt, from the weak "
            "labels, what it knew.\n\n" + markdown_table(rows)]


def _why_no_pgr(task: str, losses: dict, min_gap: float) -> str:
    """The reason a task has no PGR on any seed, from its numbers."""
    first = next(iter(losses.values()))
    weak, ceiling = first["weak"]["median"], first["strong_ceiling"]["median"]
    where = ("both at ceiling accuracy: the task is too easy to show a gap" if weak >= 0.95 else
             "both near chance (0.5): see the training fit below" if ceiling < 0.6 else
             "the strong model learns it no better than the weak one")
    return (f"**{task}: no PGR on any seed.** The strong ceiling ({ceiling:.3f}) does not beat the weak supervisor "
            f"({weak:.3f}) by {min_gap}: {where}.")


def plot_accuracies(section: dict, path: Path) -> None:
    """Per task: test accuracy of the weak supervisor, each weak-to-strong model and the strong ceiling (median
    over seeds, bars from min to max), as the paper's per-task panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(section), figsize=(4.2 * len(section), 3.4), squeeze=False)
    for ax, (task, losses) in zip(axes[0], section.items()):
        first = next(iter(losses.values()))
        bars = {"weak": first["weak"], **{f"w2s {k}": s["w2s"] for k, s in losses.items()},
                "ceiling": first["strong_ceiling"]}
        medians = [b["median"] for b in bars.values()]
        errors = [[m - b["min"] for m, b in zip(medians, bars.values())],
                  [b["max"] - m for m, b in zip(medians, bars.values())]]
        colors = ["tab:gray", *["tab:blue"] * len(losses), "black"]
        ax.bar(range(len(bars)), medians, yerr=errors, color=colors, capsize=3)
        ax.set_xticks(range(len(bars)), list(bars), rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0.4, 1.0)
        ax.axhline(0.5, color="tab:red", linestyle=":", linewidth=1)
        ax.set_title(task)
        ax.set_ylabel("test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
