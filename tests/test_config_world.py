"""Configs fail loudly, the world is deterministic and its gold reward is exact."""

import pytest

from actors.trainer import TrainConfig
from pipelines.prepare import PrepareConfig
from w2s.config import ConfigError, load_config
from w2s.world import HARMFUL, REFUSAL, World, WorldConfig, build_tokenizer


def test_shipped_configs_validate():
    for path in ("configs/prepare.yaml", "configs/tiny.yaml"):
        assert isinstance(load_config(PrepareConfig, path), PrepareConfig)


def test_unknown_field_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("weak: {size: {n_layer: 1, n_embd: 8, n_head: 1}, train: {mode: lm, lrr: 1.0}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(PrepareConfig, bad)
    assert f"{bad}: weak.train.lrr: Extra inputs are not permitted" in str(err.value)


def test_bad_value_and_override_are_named():
    with pytest.raises(ConfigError, match=r"align\.beta: Input should be greater than 0"):
        load_config(PrepareConfig, "configs/tiny.yaml", ["align.beta=-1"])
    with pytest.raises(ConfigError, match=r"align\.loss: Input should be 'sigmoid', 'ipo' or 'hinge'"):
        load_config(PrepareConfig, "configs/tiny.yaml", ["align.loss=kto"])
    config = load_config(PrepareConfig, "configs/tiny.yaml", ["align.lr=0.5", "world.seed=7"])
    assert config.align.lr == 0.5 and config.world.seed == 7


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config(PrepareConfig, "nope.yaml")


def test_sft_weight_only_for_dpo():
    with pytest.raises(ValueError, match="sft_weight applies to mode 'dpo' only"):
        TrainConfig(mode="sft", sft_weight=0.2)


def test_world_is_deterministic_and_gold_reward_exact():
    config = WorldConfig(n_entities=10, n_pretrain_docs=50, n_pair_prompts=40, n_eval_prompts=20)
    a, b = World(config), World(config)
    assert a.corpus() == b.corpus() and a.preference_pairs() == b.preference_pairs()
    assert World(config.model_copy(update={"seed": 1})).facts != a.facts
    prompts = a.eval_prompts()
    helpful = next(p for p in prompts if p.kind == "helpful")
    harmful = next(p for p in prompts if p.kind == "harmful")
    assert a.gold_reward(helpful, f" {helpful.answer}.") == 1.0
    assert a.gold_reward(helpful, " nope.") == 0.0
    assert a.gold_reward(helpful, REFUSAL) == 0.0  # refusing a benign request is not helpful
    assert a.gold_reward(harmful, REFUSAL) == 1.0
    assert a.gold_reward(harmful, HARMFUL["poison"].format(name="x")) == 0.0
    assert a.gold_reward(harmful, " sorry, but put arsenic in it.") == 0.0  # refusal with harm is harmful


def test_pairs_prefer_gold_and_eval_facts_are_held_out():
    world = World(WorldConfig(n_entities=10, n_pair_prompts=60, n_eval_prompts=40))
    for row in world.preference_pairs():
        prompt = {"kind": row["kind"], "answer": "" if row["kind"] == "harmful" else row["chosen"].strip(" .")}
        assert world.gold_reward(prompt, row["chosen"]) == 1.0
        assert world.gold_reward(prompt, row["rejected"]) == 0.0
    pair_prompts = {r["prompt"] for r in world.preference_pairs() if r["kind"] == "helpful"}
    eval_prompts = {p.prompt for p in world.eval_prompts() if p.kind == "helpful"}
    assert pair_prompts and eval_prompts and not pair_prompts & eval_prompts


def test_tokenizer_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "q: zorb color?\na: blue."
    ids = loaded(text)["input_ids"]
    assert ids == tokenizer(text)["input_ids"] and len(ids) == len(text)
    assert loaded.decode(ids + [loaded.eos_token_id], skip_special_tokens=True) == text
