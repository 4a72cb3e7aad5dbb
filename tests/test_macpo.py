"""MACPO: the contrastive pairs of a round, the config, and the resumable stages (no Ray needed)."""

import pytest
import yaml

from pipelines.macpo import MACPOConfig, Stages, check_pairs, contrastive_pairs, split_halves
from pipelines.prepare import load_prepare
from w2s.runs import RunDir, RunExistsError
from w2s.world import build_tokenizer

ROOT_CONFIG = "configs/tiny_macpo.yaml"


def _config(**overrides) -> MACPOConfig:
    data = yaml.safe_load(open(ROOT_CONFIG))
    data.update(overrides)
    return MACPOConfig(**data)


def test_pairs_both_ways_with_selection_by_mean_student_log_prob():
    generations = [
        {"prompt": "p0", "student_response": " s0", "student_negative_response": " sn0",
         "ta_response": " a0", "ta_negative_response": " an0", "tb_response": " b0", "tb_negative_response": " s0"},
        {"prompt": "p1", "student_response": " s1", "student_negative_response": " b1",
         "ta_response": " a1", "ta_negative_response": " an1", "tb_response": " b1", "tb_negative_response": " bn1"},
    ]
    candidates = [
        # prompt 0: ta has the higher sum (-3 > -4) but tb the higher mean (-1 > -1.5): the mean decides
        {"i": 0, "teacher": "ta", "response": " a0", "student_response_logps": [-1.5, -1.5]},
        {"i": 0, "teacher": "tb", "response": " b0", "student_response_logps": [-1.0, -1.0, -1.0, -1.0]},
        {"i": 1, "teacher": "ta", "response": " a1", "student_response_logps": [-2.0]},
        {"i": 1, "teacher": "tb", "response": " b1", "student_response_logps": [-0.5]},
    ]
    rows = contrastive_pairs(generations, candidates, ["ta", "tb"])
    assert len(rows) == 2 * 3  # a student pair and one per teacher, for every prompt
    usable, aside = check_pairs(rows, build_tokenizer(), max_length=96, source="round1_pairs")
    by = {(r["agent"], r["prompt"]): r for r in usable}
    assert by[("student", "p0")] == {"agent": "student", "prompt": "p0", "chosen": " b0", "rejected": " sn0",
                                     "chosen_from": "tb"}
    # teachers learn the student's positive against their own negative
    assert by[("ta", "p0")]["chosen"] == " s0" and by[("ta", "p0")]["rejected"] == " an0"
    assert by[("tb", "p1")]["chosen"] == " s1" and by[("tb", "p1")]["rejected"] == " bn1"
    # equal chosen and rejected teach nothing: set aside with the reason, not dropped
    assert {(r["agent"], r["prompt"]): r["reason"] for r in aside} == {
        ("tb", "p0"): "rejected: equal to chosen: the pair prefers nothing",
        ("student", "p1"): "rejected: equal to chosen: the pair prefers nothing"}
    assert len(usable) + len(aside) == len(rows)


def test_generated_pairs_get_the_check_of_user_data():
    """An empty generation or one too long for max_length is set aside with its reason, as a user's row would be."""
    rows = [{"agent": "student", "prompt": "q: a?", "chosen": " red.", "rejected": "", "chosen_from": "ta"},
            {"agent": "ta", "prompt": "q: a?", "chosen": " " + "x" * 40, "rejected": " red.", "chosen_from": "student"},
            {"agent": "tb", "prompt": "q: a?", "chosen": " red.", "rejected": " blue.", "chosen_from": "student"}]
    usable, aside = check_pairs(rows, build_tokenizer(), max_length=32, source="round2_pairs")
    assert [r["agent"] for r in usable] == ["tb"]
    assert [(r["agent"], r["reason"]) for r in aside] == [
        ("student", "rejected: empty text"), ("ta", "chosen: too long: 47 tokens > max_length 32")]


def test_halves_keep_the_share_of_every_prompt_kind():
    from w2s.world import World, WorldConfig

    pairs = World(WorldConfig(n_entities=8, n_pair_prompts=64)).preference_pairs()
    half_a, half_b = split_halves(pairs)
    assert sorted(map(id, half_a + half_b)) == sorted(map(id, pairs))  # a partition: nothing lost
    for kind in ("helpful", "harmful"):
        total = sum(p["kind"] == kind for p in pairs)
        assert total > 0
        assert abs(sum(p["kind"] == kind for p in half_a) - sum(p["kind"] == kind for p in half_b)) <= 1


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="names must be unique"):
        _config(teachers=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValueError, match="not 'student'"):
        _config(teachers=[{"name": "student"}])
    with pytest.raises(ValueError, match="student_sft.mode must be 'sft'"):
        _config(student_sft={"mode": "dpo"})
    with pytest.raises(ValueError, match="dpo.mode must be 'dpo'"):
        _config(dpo={"mode": "sft"})
    with pytest.raises(ValueError, match="confident_loss.kind"):
        _config(confident_loss={"kind": "product"})  # a head's loss: no token-level form
    with pytest.raises(ValueError, match="student_sft.confidence: naive SFT is the student's start"):
        _config(student_sft={"mode": "sft", "confidence": {"kind": "confidence"}})
    with pytest.raises(ValueError, match="at least 1 item"):
        _config(teachers=[])


def test_stages_skip_finished_work_and_guard_the_run(tmp_path):
    config = _config(runs_dir=str(tmp_path))
    run = RunDir(tmp_path, config.run_name)
    stages = Stages(run, config, max_length=96, workers=None)
    built = []
    stages.run("one", lambda path: built.append(path.name))
    with pytest.raises(ZeroDivisionError):  # a stage killed half-way leaves no marker...
        stages.run("two", lambda path: 1 / 0)

    with pytest.raises(RunExistsError, match="holds a run of another config .*add --overwrite"):
        Stages(RunDir(tmp_path, config.run_name), config.model_copy(update={"rounds": 5}), max_length=96, workers=None)
    resumed = Stages(RunDir(tmp_path, config.run_name), config, max_length=96, workers=None)  # the same config again continues
    resumed.run("one", lambda path: built.append("again"))  # finished: skipped
    resumed.run("two", lambda path: built.append(path.name))  # ...so it runs again
    assert built == ["one", "two"]

    # the prepare config a run was started with is part of it: changed between a kill and a rerun, refused
    run.claim(load_prepare(config.prepare, config.cache_dir), "prepare.yaml")
    with pytest.raises(RunExistsError, match="prepare.yaml differs"):
        run.claim(load_prepare(config.prepare, config.cache_dir, seed=1), "prepare.yaml")
    fresh = RunDir(tmp_path, config.run_name, fresh=True)  # --overwrite: the folder starts afresh
    Stages(fresh, config.model_copy(update={"rounds": 5}), max_length=96, workers=None)
    assert not (fresh.path / "stages" / "one").exists()


def test_pairs_are_judged_by_the_gold_reward_and_teacher_knowledge_overlaps():
    import pyarrow as pa

    from pipelines.macpo import pairs_gold_reward, teacher_knowledge
    from w2s.world import REFUSAL, World, WorldConfig

    world = World(WorldConfig(n_entities=8, n_eval_prompts=12))
    helpful = [p for p in world.eval_prompts() if p.kind == "helpful"][:2]
    harmful = next(p for p in world.eval_prompts() if p.kind == "harmful")
    pairs = pa.Table.from_pylist([
        {"agent": "student", "prompt": helpful[0].prompt, "chosen": f" {helpful[0].answer}.", "rejected": REFUSAL},
        {"agent": "student", "prompt": harmful.prompt, "chosen": " put arsenic in it.", "rejected": REFUSAL},
        {"agent": "weak_a", "prompt": helpful[1].prompt, "chosen": " zzz.", "rejected": f" {helpful[1].answer}."},
    ])
    gold = pairs_gold_reward(world, pairs)
    assert gold["student"]["pairs"] == 2 and gold["weak_a"]["pairs"] == 1
    assert gold["student"]["chosen"]["helpful"] == 1.0 and gold["student"]["chosen"]["harmless"] == 0.0
    assert gold["student"]["rejected"]["harmless"] == 1.0  # a pair that teaches the wrong way shows as such
    assert gold["weak_a"]["chosen"]["helpful"] == 0.0 and gold["weak_a"]["rejected"]["helpful"] == 1.0

    generations = pa.Table.from_pylist([  # the same fact asked twice counts once
        {"prompt": "f1", "kind": "helpful", "ta_r0_gold": 1.0, "tb_r0_gold": 0.0, "strong_base_gold": 1.0},
        {"prompt": "f1", "kind": "helpful", "ta_r0_gold": 1.0, "tb_r0_gold": 0.0, "strong_base_gold": 1.0},
        {"prompt": "f2", "kind": "helpful", "ta_r0_gold": 1.0, "tb_r0_gold": 1.0, "strong_base_gold": 1.0},
        {"prompt": "f3", "kind": "helpful", "ta_r0_gold": 0.0, "tb_r0_gold": 0.0, "strong_base_gold": 0.0},
        {"prompt": "h", "kind": "harmful", "ta_r0_gold": 0.0, "tb_r0_gold": 0.0, "strong_base_gold": 0.0},
    ])
    knowledge = teacher_knowledge(generations, ["ta", "tb"])
    assert knowledge["facts"] == 3
    assert abs(knowledge["ta_r0"] - 2 / 3) < 1e-9 and abs(knowledge["tb_r0"] - 1 / 3) < 1e-9
    assert abs(knowledge["any"] - 2 / 3) < 1e-9 and abs(knowledge["all"] - 1 / 3) < 1e-9
    assert abs(knowledge["strong_base"] - 2 / 3) < 1e-9


def test_knowledge_transfer_tells_copied_ignorance_from_own_knowledge():
    import pyarrow as pa

    from pipelines.evaluation import knowledge_transfer

    def row(prompt, strong, weak, model, weak_text=" red.", model_text=" red."):
        return {"prompt": prompt, "kind": "helpful", "strong_base_gold": strong, "weak_aligned_gold": weak,
                "m_gold": model, "weak_aligned_response": weak_text, "m_response": model_text}

    generations = pa.Table.from_pylist([
        row("a", 1.0, 0.0, 0.0),                          # only the strong base knew; the model copies the weak answer
        row("a", 1.0, 0.0, 0.0),                          # the same fact again: counted once
        row("b", 1.0, 0.0, 1.0, model_text=" blue."),     # only the strong base knew; the model kept it
        row("c", 1.0, 1.0, 0.0, " teal.", " gold."),      # the weak model knew; the model lost it
        {**row("h", 0.0, 0.0, 0.0), "kind": "harmful"},
    ])
    transfer = knowledge_transfer(generations, "m")
    assert transfer == {"model": "m", "only_strong_knew": 2, "right_there": 0.5, "weak_answer_there": 0.5,
                        "weak_knew": 1, "right_where_weak_knew": 0.0}


def test_a_round_whose_pairs_were_all_set_aside_is_reported_not_a_crash(tmp_path):
    """The report reads each round's pair figures; a round with none (every pair equal or empty) says so."""
    from pipelines.macpo import pairs_reading, plot_pairs_gold

    gold = {"chosen": {"helpful": 0.5, "harmless": 1.0, "total": 0.75},
            "rejected": {"helpful": 0.0, "harmless": 1.0, "total": 0.5}}
    pair_gold = {"1": {}, "2": {"student": {"pairs": 3, **gold}, "weak_a": {"pairs": 3, **gold}}}
    lines = pairs_reading(pair_gold, ["weak_a"]).splitlines()
    assert lines[0] == "- round 1: every pair of the student or of weak_a was set aside: nothing to compare."
    assert lines[1].startswith("- round 2: the teacher answers the student picked are right on 50%")
    plot_pairs_gold(pair_gold, tmp_path / "pairs.png")
    assert (tmp_path / "pairs.png").stat().st_size > 0


def test_your_own_pairs_are_split_by_prompt_not_by_file_order():
    """Pairs without a world `kind`: pairs of one prompt land in the same half, whatever their order in the file."""
    rows = [{"prompt": f"question {i % 20}", "chosen": "a", "rejected": f"b{i}"} for i in range(40)]
    half_a, half_b = split_halves(rows)
    prompts_a, prompts_b = {r["prompt"] for r in half_a}, {r["prompt"] for r in half_b}
    assert prompts_a and prompts_b and not prompts_a & prompts_b and len(half_a) + len(half_b) == 40
    again_a, _ = split_halves(rows[::-1])
    assert {r["prompt"] for r in again_a} == prompts_a
