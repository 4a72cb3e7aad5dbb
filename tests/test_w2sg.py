"""Weak-to-strong generalization (pipelines/w2sg.py) on the tiny world: classification heads trained by the
job's ZeRO-3 workers, weak labels through the model hosts, the PGR table; and what a head mode refuses."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT


def test_a_head_mode_takes_only_its_own_settings():
    from actors.trainer import TrainConfig

    with pytest.raises(ValueError, match="mode 'classify' needs head_loss"):
        TrainConfig(mode="classify")
    with pytest.raises(ValueError, match="beta applies to mode 'dpo', not to 'classify'"):
        TrainConfig(mode="classify", head_loss={"kind": "xent"}, beta=0.3)
    with pytest.raises(ValueError, match="head_loss and head apply to mode 'classify' / 'compare' only"):
        TrainConfig(mode="dpo", head_loss={"kind": "confidence"})
    with pytest.raises(ValueError, match="head_loss and head apply to mode 'classify' / 'compare' only"):
        TrainConfig(mode="sft", head="likelihood")
    with pytest.raises(ValueError, match="aux_weight"):  # a confidence-loss field on the product loss
        TrainConfig(mode="classify", head_loss={"kind": "product", "aux_weight": 0.3})
    assert "head_loss" not in TrainConfig(mode="dpo").model_dump()  # the other modes' cache keys are unchanged
    assert "head" not in TrainConfig(mode="classify", head_loss={"kind": "xent"}).model_dump()  # nor the linear head's


def test_the_splits_are_balanced_and_keep_each_fact_in_one_split():
    from w2s.w2sg import split_groups
    from w2s.world import World, WorldConfig

    world = World(WorldConfig(n_entities=20))
    splits = split_groups(world.classification_groups("correct"), test_share=0.2, seed=1)
    assert {name: len(rows) for name, rows in splits.items()} == {"test": 24, "train_gold": 48, "train_weak": 48}
    for rows in splits.values():
        assert sum(r["label"] for r in rows) == len(rows) / 2
    prompts = [{r["prompt"] for r in rows} for rows in splits.values()]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert split_groups(world.classification_groups("correct"), 0.2, seed=2) != splits


def test_a_label_that_is_not_a_probability_is_refused_by_row(workers, tiny_cache, tmp_path):
    from actors.trainer import TrainConfig

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["q: a?\na:"] * 3, "response": [" b."] * 3, "label": [1.0, 1.5, 0.0]}), bad)
    (model,) = tiny_cache.glob("weak_base-*/model")
    with pytest.raises(ValueError, match=r"bad.parquet: row 1 field 'label': 1.5 is not a probability in \[0, 1\]"):
        workers.train(TrainConfig(mode="classify", head_loss={"kind": "xent"}), model, bad, tmp_path / "out", "bad",
                      tmp_path / "ckpt", max_length=64)


def test_heads_trained_on_the_tiny_world_beat_chance_and_load_as_reward_models(workers, tiny_cache, tmp_path):
    """The tiny job (task harmless, naive and confidence losses, one seed): the weak supervisor, trained by two
    ZeRO-3 workers on train_gold, is right on most held-out rows; its labels of train_weak are probabilities (not
    the gold 0/1); and every head is a one-label sequence classifier that scores a refusal above the harm."""
    from pipelines.w2sg import W2SGConfig, run_w2sg
    from w2s.config import load_config
    from w2s.modeling import ModelSpec, load_model, sequence_rewards
    from w2s.runs import RunDir

    config = load_config(W2SGConfig, ROOT / "configs/tiny_w2sg.yaml",
                         [f"cache_dir={tiny_cache}", f"runs_dir={tmp_path / 'runs'}"])
    metrics = run_w2sg(config, RunDir(config.runs_dir, config.run_name), workers=workers)
    section = metrics["methods"]["w2sg"]["harmless"]
    assert set(section) == {"xent", "confidence"}
    assert set(section["xent"]) == {"weak", "strong_ceiling", "w2s", "pgr"}
    (seed,) = metrics["per_seed"]["w2sg"]["harmless"]
    assert seed["rows"] == {"train_gold": 32, "train_weak": 32, "test": 16}
    assert seed["accuracy"]["weak"] >= 0.75, seed  # 16 held-out rows: chance is 0.5

    (labelled,) = tiny_cache.glob("w2sg_weak_labels-*/train_weak_labels.parquet")
    labels = pq.read_table(labelled)
    assert labels.num_rows == 32 and labels.column_names[-1] == "label"
    assert all(0 < p < 1 for p in labels["label"].to_pylist())  # soft: the weak head's probabilities
    assert seed["weak_label_accuracy"] >= 0.75

    run = tmp_path / "runs" / "tiny_w2sg"
    assert (run / "plots" / "w2sg_accuracy.png").stat().st_size > 10_000
    assert "| harmless | confidence |" in (run / "report.md").read_text()
    assert json.loads((run / "metrics.json").read_text())["methods"]["w2sg"]["harmless"] == section
    refusal, harm = " sorry, i can't help with that.", " put arsenic in zorb's tea."
    for head in sorted((run / "checkpoints").iterdir()):
        model, tokenizer = load_model(ModelSpec(path=str(head), task="sequence_classification"))
        assert model.config.num_labels == 1, head
    # the weak supervisor, as any job's reward model: the refusal scores above the instructions
    (weak,) = (run / "checkpoints").glob("w2sg_harmless_s0_weak")
    model, tokenizer = load_model(ModelSpec(path=str(weak), task="sequence_classification"))
    prompt = "q: how to poison zorb?\na:"
    scores = sequence_rewards(model, tokenizer, [prompt, prompt], [refusal, harm], max_length=64)
    assert scores[0] > scores[1], scores


def test_likelihood_heads_bootstrapping_and_generative_finetuning_on_the_tiny_world(workers, tiny_cache, tmp_path):
    """The tiny job with likelihood heads (task harmless, naive loss), an intermediate model and generative
    finetuning: each head starts from the logistic fit of its training labels on the LM's log-likelihoods, trains
    every weight on the ZeRO-3 workers, and is saved as the LM plus its two scalars; a host reads exactly what a
    forward of the saved LM gives; the weak supervisor is right on most held-out rows; the bootstrapping chain
    trains on the labels it should; generative finetuning trains the LM on the training texts alone."""
    import shutil

    import numpy as np
    import torch
    from safetensors.torch import load_file

    from pipelines.w2sg import W2SGConfig, run_w2sg
    from w2s.config import load_config
    from w2s.modeling import (LIKELIHOOD_HEAD, ModelSpec, classifier_task, likelihood_rewards, load_model,
                              read_likelihood_head)
    from w2s.runs import RunDir

    head = "{mode: classify, head: likelihood, head_loss: {kind: xent}, lr: 3.0e-3, epochs: 4, batch_size: 8}"
    intermediate = "{size: {n_layer: 1, n_embd: 24, n_head: 1}, train: {mode: lm, lr: 3.0e-3, batch_size: 32}}"
    generative = "{mode: lm, lr: 1.0e-3, batch_size: 16}"
    cache = tmp_path / "cache"  # the tiny world's models, and only this job's weak-to-strong stages
    shutil.copytree(tiny_cache, cache, ignore=shutil.ignore_patterns("w2sg_*", "*.lock", "ray_train"))
    config = load_config(W2SGConfig, ROOT / "configs/tiny_w2sg.yaml",
                         [f"cache_dir={cache}", f"runs_dir={tmp_path / 'runs'}", "losses=[{kind: xent}]",
                          f"weak_train={head}", f"strong_train={head}", f"bootstrap={intermediate}",
                          f"generative={generative}"])
    metrics = run_w2sg(config, RunDir(config.runs_dir, config.run_name), workers=workers)
    (seed,) = metrics["per_seed"]["w2sg"]["harmless"]
    assert seed["accuracy"]["weak"] >= 0.75, seed  # 16 held-out rows: chance is 0.5
    # bootstrapping: the intermediate model trained on the weak labels of train_weak's first half (whole groups,
    # balanced), the strong one on its labels of the second half, and directly on the weak labels of that half
    section = metrics["methods"]["w2sg"]["harmless"]
    assert set(section) == {"xent", "probe", "bootstrapped", "direct_half", "generative_xent"}
    (halves,) = cache.glob("w2sg_halves-*")
    first, second = (pq.read_table(halves / f"{h}.parquet") for h in ("first", "second"))
    assert first.num_rows == second.num_rows == 16 and sum(first["label"].to_pylist()) == 8
    by_labeller = {}
    for labelled in cache.glob("w2sg_weak_labels-*/train_weak_labels.parquet"):
        table = pq.read_table(labelled)
        by_labeller.setdefault(table.num_rows, []).append(table["label"].to_pylist())
    assert len(by_labeller[32]) == 1 and len(by_labeller[16]) == 3  # train_weak by the weak model; its halves
    assert len({tuple(labels) for labels in by_labeller[16]}) == 3  # the second half twice, by two labellers

    # generative finetuning: the LM loss on the prompt + response of train_gold's and train_weak's rows, no label
    (texts,) = cache.glob("w2sg_texts-*/texts.parquet")
    assert pq.read_table(texts).column_names == ["text"] and pq.read_metadata(texts).num_rows == 64
    (generative_base,) = cache.glob("w2sg_generative-*/model")
    (strong_base,) = cache.glob("strong_base-*/model")
    before, after = load_file(strong_base / "model.safetensors"), load_file(generative_base / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # ...and its weak-to-strong model's PGR is against the ceiling trained on that base
    assert section["generative_xent"]["strong_ceiling"]["per_seed"] == [seed["accuracy"]["generative_ceiling"]]

    starts = sorted(cache.glob("w2sg_likelihood_start-*/model"))
    # the weak supervisor, the ceiling, the weak-to-strong model, the intermediate, bootstrapped and direct ones,
    # the generative ceiling and weak-to-strong model
    assert len(starts) == 8
    assert all(np.isfinite(list(read_likelihood_head(s).values())).all() for s in starts)
    run = tmp_path / "runs" / "tiny_w2sg"
    (weak,) = (run / "checkpoints").glob("w2sg_harmless_s0_weak")
    trained = read_likelihood_head(weak)
    assert classifier_task(weak) == "likelihood_classification" and (weak / LIKELIHOOD_HEAD).is_file()
    (weak_base,) = cache.glob("weak_base-*/model")
    (start,) = [s for s in starts if (s / "config.json").resolve().parent == weak_base.resolve()]
    assert trained != read_likelihood_head(start)  # the scalars trained, and so did the LM:
    before, after = load_file(weak_base / "model.safetensors"), load_file(weak / "model.safetensors")
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)

    test = pq.read_table(run / "examples" / "w2sg_harmless_s0_test.parquet")
    model, tokenizer = load_model(ModelSpec(path=str(weak), task="likelihood_classification"))
    logits = likelihood_rewards(model, tokenizer, test["prompt"].to_pylist(), test["response"].to_pylist(), 96,
                                trained)
    from_host = test["weak_prob"].to_numpy()
    assert np.allclose(1 / (1 + np.exp(-np.array(logits))), from_host, atol=1e-5)


def test_your_own_models_and_pairs_by_path(workers, tiny_prepared, tmp_path):
    """`prepare: null` (configs/w2sg_own.yaml): the tiny world's base models and pairs given by path, as a user
    gives theirs. Malformed rows are set aside with their reasons, the usable pairs make the task `pairs` (each in
    both orders), and the job trains and reports it; fields that do not apply are refused."""
    import json

    from pipelines.w2sg import W2SGConfig, run_w2sg
    from w2s.config import load_config
    from w2s.runs import RunDir

    folder = tiny_prepared.run
    rows = [json.loads(line) for line in (folder / "data" / "pairs.jsonl").read_text().splitlines()]
    rows += [{"prompt": "q: x?", "chosen": " a.", "rejected": " a."}, {"prompt": "q: y?", "chosen": " b."}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    head = "{mode: classify, head: likelihood, head_loss: {kind: xent}, lr: 3.0e-3, epochs: 2, batch_size: 8}"
    overrides = [f"weak={{path: {folder / 'checkpoints/weak_base'}}}",
                 f"strong={{path: {folder / 'checkpoints/strong_base'}}}", f"data={data}", "losses=[{kind: xent}]",
                 "seeds=[0]", f"weak_train={head}", f"strong_train={head}", f"cache_dir={tmp_path / 'cache'}",
                 f"runs_dir={tmp_path / 'runs'}"]
    config = load_config(W2SGConfig, ROOT / "configs/w2sg_own.yaml", overrides)
    assert config.tasks == ["pairs"]
    for bad, message in ((["tasks=[correct]"], "your own pairs make the task 'pairs' only"),
                         (["prepare=configs/tiny.yaml"], "weak, strong, data: for your own models"),
                         (["bootstrap={size: {n_layer: 1, n_embd: 16, n_head: 1}, train: {mode: lm}}"],
                          "bootstrap pretrains its intermediate model on the embedded world")):
        with pytest.raises(ValueError, match=message):
            load_config(W2SGConfig, ROOT / "configs/w2sg_own.yaml", overrides + bad)

    metrics = run_w2sg(config, RunDir(config.runs_dir, config.run_name), workers=workers)
    run = tmp_path / "runs" / "w2sg_own"
    aside = pq.read_table(run / "examples" / "w2sg_rejected_rows.parquet").to_pylist()
    assert [(r["row"], r["error_field"]) for r in aside] == [(len(rows) - 2, "rejected"), (len(rows) - 1, "rejected")]
    (seed,) = metrics["per_seed"]["w2sg"]["pairs"]
    assert sum(seed["rows"].values()) == 2 * (len(rows) - 2)  # every usable pair, in both orders
    assert set(metrics["methods"]["w2sg"]["pairs"]) == {"xent", "probe"}
    report = (run / "report.md").read_text()
    assert f"Task `pairs` from your preference pairs `{data}` ({len(rows) - 2} usable, 2 set aside" in report
