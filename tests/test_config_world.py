"""Configs fail loudly, the world is deterministic and its gold reward is exact."""

from pathlib import Path

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
    with pytest.raises(ValueError, match="confidence applies to mode 'sft' only"):
        TrainConfig(mode="dpo", confidence={"kind": "confidence"})
    # plain SFT keeps its cache keys: an unset confidence is not in the dump
    assert "confidence" not in TrainConfig(mode="sft").model_dump()


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


def _fact_docs_per_entity(world: World, view: int) -> dict[str, int]:
    counts = dict.fromkeys(world.names, 0)
    for doc in world.corpus(view):
        if not doc.startswith("q: how to "):
            counts[doc.split(" ")[1]] += 1
    return counts


def test_corpus_frequency_follows_popularity():
    world = World(WorldConfig(n_entities=20, n_pretrain_docs=20_000, zipf_exponent=1.0))
    counts = _fact_docs_per_entity(world, 0)
    ranked = world.popularity(0)
    # Zipf with s = 1: the top entity is written about about 20x as often as the 20th
    assert 12 < counts[ranked[0]] / counts[ranked[-1]] < 30
    head, tail = ranked[:5], ranked[-5:]
    assert min(counts[e] for e in head) > max(counts[e] for e in tail)
    flat = _fact_docs_per_entity(World(WorldConfig(n_entities=20, n_pretrain_docs=20_000, zipf_exponent=0.0)), 0)
    assert max(flat.values()) / min(flat.values()) < 1.5  # s = 0: every entity equally often
    assert sorted(world.popularity(0)) == sorted(world.names)


def test_corpus_views_share_part_of_their_head():
    world = World(WorldConfig(n_entities=40, n_pretrain_docs=20_000, view_share=0.5))
    assert world.corpus(0) == world.corpus(0) and world.corpus(1) != world.corpus(0)
    top = {view: set(sorted(c := _fact_docs_per_entity(world, view), key=c.get, reverse=True)[:8]) for view in (0, 1)}
    assert top[0] & top[1] and top[0] != top[1]  # overlapping but different heads
    # the view's own favourite is written about far more often in the view than in the shared corpus
    own_head = world.popularity(1)[0]
    assert own_head not in world.popularity(0)[:8]
    assert _fact_docs_per_entity(world, 1)[own_head] > 3 * _fact_docs_per_entity(world, 0)[own_head]
    same = World(WorldConfig(n_entities=40, n_pretrain_docs=5_000, view_share=0.0))
    counts = [_fact_docs_per_entity(same, view) for view in (0, 1)]  # no own share: the same distribution
    assert [e for e in same.popularity(0)[:3]] == sorted(counts[1], key=counts[1].get, reverse=True)[:3]


def test_parse_prompt_recovers_kind_and_answer():
    world = World(WorldConfig(n_entities=10))
    for prompt in world.eval_prompts():
        assert world.parse_prompt(prompt.prompt) == prompt
    with pytest.raises(ValueError, match="not a prompt of this world"):
        world.parse_prompt("q: who are you?\na:")


def test_knowledge_overlap():
    from w2s.metrics import knowledge_overlap, mean_and_spread

    known = {"weak_a": {1: True, 2: True, 3: False, 4: False}, "weak_b": {1: True, 2: False, 3: True, 4: False}}
    assert knowledge_overlap(known) == {"weak_a": 0.5, "weak_b": 0.5, "any": 0.75, "all": 0.25}
    with pytest.raises(ValueError, match="same, non-empty set of facts"):
        knowledge_overlap({"weak_a": {1: True}, "weak_b": {2: True}})
    assert mean_and_spread([0.5, 0.7, 0.6]) == pytest.approx(
        {"mean": 0.6, "std": 0.1, "median": 0.6, "min": 0.5, "max": 0.7})


def test_over_seeds_folds_every_number_and_keeps_the_shape():
    from w2s.metrics import over_seeds

    runs = [{"models": {"weak": {"total": 0.4}}, "sweep": [{"gamma": 0.1, "pgr": 0.2}], "name": "a", "round": 1},
            {"models": {"weak": {"total": 0.6}}, "sweep": [{"gamma": 0.1, "pgr": None}], "name": "a", "round": 1}]
    folded = over_seeds(runs)
    assert folded["models"]["weak"]["total"]["mean"] == pytest.approx(0.5)
    assert folded["models"]["weak"]["total"]["n"] == 2
    assert folded["sweep"][0]["gamma"]["std"] == 0.0
    assert folded["sweep"][0]["pgr"]["n"] == 1  # an undefined PGR is left out, and the count says so
    assert folded["name"] == "a" and folded["round"] == 1


def test_offset_seeds_shifts_every_seed_at_any_depth():
    from pipelines.macpo import MACPOConfig
    from w2s.config import offset_seeds

    config = load_config(MACPOConfig, "configs/macpo.yaml")
    shifted = offset_seeds(config, 2)
    assert shifted.dpo.seed == config.dpo.seed + 2
    assert shifted.teachers[1].pretrain.train.seed == config.teachers[1].pretrain.train.seed + 2
    assert shifted.seeds == config.seeds and offset_seeds(config, 0) == config
    prepared = offset_seeds(load_config(PrepareConfig, "configs/prepare.yaml"), 1)
    assert prepared.world.seed == 1 and prepared.weak.train.seed == 1 and prepared.align.seed == 1


def test_every_shipped_config_loads_as_its_jobs_config():
    """An example config that no longer matches its job's fields would fail only when a user runs it."""
    from pipelines.deception import DeceptionConfig
    from pipelines.judge import EvaluateConfig
    from jobs.serve import load_serve_file
    from pipelines.macpo import MACPOConfig
    from pipelines.score import ScoreConfig
    from pipelines.real import RealConfig
    from pipelines.search import SearchConfig
    from pipelines.w2sg import W2SGConfig
    from pipelines.wspo import WSPOConfig

    jobs = {"prepare": PrepareConfig, "tiny": PrepareConfig, "score": ScoreConfig, "evaluate": EvaluateConfig,
            "wspo": WSPOConfig, "tiny_wspo": WSPOConfig, "macpo": MACPOConfig, "tiny_macpo": MACPOConfig,
            "macpo_own": MACPOConfig, "search": SearchConfig, "tiny_search": SearchConfig,
            "search_own": SearchConfig, "w2sg": W2SGConfig, "tiny_w2sg": W2SGConfig, "w2sg_own": W2SGConfig,
            "deception": DeceptionConfig, "tiny_deception": DeceptionConfig, "real": RealConfig,
            "tiny_real": RealConfig}
    shipped = sorted(p.stem for p in Path("configs").glob("*.yaml"))
    assert shipped == sorted([*jobs, "serve"]), "a config without its job here, or one listed that is gone"
    for name, cls in jobs.items():
        load_config(cls, f"configs/{name}.yaml")
    http, served = load_serve_file("configs/serve.yaml")  # a Ray Serve config file: its application's args
    assert http["host"] == "127.0.0.1" and served.strong.path.endswith("strong_base")
    own = load_config(MACPOConfig, "configs/macpo_own.yaml")
    assert own.prepare is None and own.teachers[0].model.path.endswith("weak_base")
