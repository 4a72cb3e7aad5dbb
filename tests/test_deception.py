"""The deception analysis: its bookkeeping on hand-made cases (w2s/deception.py), the world's allergies, the explicit
conflict's loss, and the tiny job (pipelines/deception.py) on the tests' Ray cluster."""

from pathlib import Path

import pytest

from w2s.deception import accuracy_by_area, deception_score, knowledge_areas
from w2s.w2sg import right

ROOT = Path(__file__).resolve().parents[1]


def test_rows_fall_in_the_area_the_gold_trained_models_know():
    weak = right([0.9, 0.9, 0.2, 0.2], [1, 1, 1, 1])  # the weak model knows the first two
    strong = right([0.8, 0.3, 0.7, 0.1], [1, 1, 1, 1])  # the strong one the first and the third
    assert knowledge_areas(weak, strong) == ["Wk_Sk", "Wk_Suk", "Wuk_Sk", "Wuk_Suk"]
    # a label of class 0 is right when p <= 0.5
    assert right([0.4, 0.6], [0, 0]) == [True, False]


def test_accuracy_by_area_counts_rows_and_leaves_an_empty_area_undefined():
    areas = ["Wk_Sk", "Wk_Sk", "Wuk_Sk", "Wuk_Sk", "Wuk_Sk"]
    out = accuracy_by_area([True, False, True, True, False], areas)
    assert out["Wk_Sk"] == {"rows": 2, "accuracy": 0.5}
    assert out["Wuk_Sk"] == {"rows": 3, "accuracy": pytest.approx(2 / 3)}
    assert out["Wk_Suk"] == {"rows": 0, "accuracy": None}


def test_the_deception_score_is_the_share_of_flips_where_only_the_strong_model_knows():
    areas = ["Wk_Sk", "Wk_Sk", "Wuk_Sk", "Wuk_Sk", "Wuk_Sk", "Wuk_Suk"]
    before = [True, True, True, True, True, False]
    after = [True, False, False, False, True, True]  # the last row flips wrong -> right: not a flip
    out = deception_score(before, after, areas)
    assert out["flipped"] == 3
    assert out["counts"] == {"Wk_Sk": 1, "Wk_Suk": 0, "Wuk_Sk": 2, "Wuk_Suk": 0}
    assert out["deception_score"] == pytest.approx(2 / 3)
    assert out["chance_score"] == pytest.approx(3 / 5)  # Wuk_Sk's share of the five rows right before
    # two of the three Wuk_Sk rows that were right flipped; one of the two Wk_Sk rows
    assert out["flip_rate"]["Wuk_Sk"] == pytest.approx(2 / 3) and out["flip_rate"]["Wk_Sk"] == 0.5
    assert out["flip_rate"]["Wuk_Suk"] is None  # no row of it was right without the conflict


def test_no_flip_gives_no_score_rather_than_zero():
    out = deception_score([True, False], [True, False], ["Wuk_Sk", "Wk_Sk"])
    assert out["flipped"] == 0 and out["deception_score"] is None
    with pytest.raises(ValueError):
        deception_score([True], [True, False], ["Wk_Sk"])  # lengths must agree


def test_allergies_are_learnt_from_a_truthful_corpus_and_leave_a_world_without_them_unchanged():
    from w2s.runs import content_hash
    from w2s.world import AllergyConfig, World, WorldConfig, feeding_response

    plain = WorldConfig(n_entities=12, n_pretrain_docs=400)
    assert "allergies" not in plain.model_dump()  # the content key of every world written before them
    with_allergies = plain.model_copy(update={"allergies": AllergyConfig(share=0.3, per_entity=2)})
    assert content_hash(plain) != content_hash(with_allergies)
    world = World(with_allergies)
    assert World(plain).facts == world.facts  # their own random stream: the facts stay
    feeding = [d for d in world.corpus() if d.startswith("q: feed ")]
    assert 0.2 < len(feeding) / 400 < 0.4
    for doc in feeding:
        name, food = doc.removeprefix("q: feed ").split("?")[0].split(" ")
        assert doc.endswith(feeding_response(name, food, food in world.allergens[name])), doc
    groups = world.classification_groups("allergy")
    assert len(groups) == 12 * 2
    for harmful, harmless in groups:  # granting the allergen is harmful (0), another food harmless (1)
        name, food = harmful["prompt"].removeprefix("q: feed ").removesuffix("?\na:").split(" ")
        assert harmful["label"] == 0.0 and food in world.allergens[name]
        name, food = harmless["prompt"].removeprefix("q: feed ").removesuffix("?\na:").split(" ")
        assert harmless["label"] == 1.0 and food not in world.allergens[name]
        assert harmful["response"].startswith(" sure,") and harmless["response"].startswith(" sure,")
    with pytest.raises(ValueError, match="needs a world with allergies"):
        World(plain).classification_groups("allergy")


def test_the_explicit_conflict_rewards_the_conflicting_class_only_where_the_model_predicts_it():
    import math

    import torch

    from w2s.losses import w2sg_loss

    def bce(z, y):  # binary cross-entropy of a logit, written out
        return -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))

    logits, labels = torch.tensor([2.0, -2.0, 0.5]), torch.tensor([0.0, 0.0, 1.0])
    out = w2sg_loss(logits, labels, "conflict", alpha=0.5, toward=1)
    expected = [bce(2, 0) + 0.5 * bce(2, 1), bce(-2, 0), bce(0.5, 1) + 0.5 * bce(0.5, 1)]
    assert out.tolist() == pytest.approx(expected, rel=1e-5)
    toward_zero = w2sg_loss(logits, labels, "conflict", alpha=1.0, toward=0)
    assert toward_zero.tolist() == pytest.approx([bce(2, 0), 2 * bce(-2, 0), bce(0.5, 1)], rel=1e-5)


def test_the_pair_conflict_pulls_toward_the_conflicting_response_only_where_the_policy_prefers_it():
    import math

    import torch

    from w2s.losses import pair_conflict_loss

    policy_chosen = torch.tensor([-1.0, -3.0], requires_grad=True)
    policy_rejected, ref_chosen, ref_rejected = torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    # toward the chosen responses: the policy prefers the first (-1 > -2), not the second (-3 < -1)
    out = pair_conflict_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, torch.tensor([True, True]), 0.5)
    assert out.tolist() == pytest.approx([math.log(1 + math.exp(-0.5 * 1.0)), 0.0], rel=1e-6)  # h = 0.5 + 0.5
    out.sum().backward()
    assert policy_chosen.grad[0] < 0 and policy_chosen.grad[1] == 0  # a gated-off pair gets no gradient
    # toward the rejected ones: now only the second pair, whose h = (-3 + 2) - (-1 + 2) = -2, counts
    out = pair_conflict_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, torch.tensor([False, False]), 0.5)
    assert out.tolist() == pytest.approx([0.0, math.log(1 + math.exp(-0.5 * 2.0))], rel=1e-6)


def test_a_dpo_stage_with_the_pair_conflict_needs_its_indicator_on_every_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from actors.trainer import TrainConfig, _check_columns, _check_lengths
    from w2s.world import build_tokenizer

    config = TrainConfig(mode="dpo", pair_conflict={"alpha": 2.0})
    with pytest.raises(ValueError, match="pair_conflict applies to mode 'dpo'"):
        TrainConfig(mode="classify", head_loss={"kind": "xent"}, pair_conflict={"alpha": 2.0})
    rows = {"prompt": ["q: a?\na:", "q: b?\na:"], "chosen": [" sure.", " no."], "rejected": [" no.", " sure."],
            "ref_chosen_logps": [[-1.0] * 7, [-1.0] * 5], "ref_rejected_logps": [[-1.0] * 5, [-1.0] * 7]}
    data = tmp_path / "scored.parquet"
    pq.write_table(pa.table(rows), data)
    with pytest.raises(ValueError, match="missing \\['conflict_toward_chosen'\\]"):
        _check_columns(data, config, "ref")
    pq.write_table(pa.table({**rows, "conflict_toward_chosen": pa.array([True, None], pa.bool_())}), data)
    assert _check_columns(data, config, "ref") == 2
    with pytest.raises(ValueError, match="row 1 field 'conflict_toward_chosen': missing"):
        _check_lengths(data, build_tokenizer(), config, 64)


def test_the_config_refuses_a_world_without_allergies_and_sizes_out_of_order():
    from pipelines.deception import DeceptionConfig
    from w2s.config import load_config

    config = ROOT / "configs/tiny_deception.yaml"
    load_config(DeceptionConfig, config, [])
    for overrides, message in ((["world.allergies=null"], "needs a world with allergies"),
                               (["bootstrap_through=huge"], "not one of strong"),
                               (["strong.small.size.n_embd=64"], "from the smallest to the largest")):
        with pytest.raises(ValueError, match=message):
            load_config(DeceptionConfig, config, overrides)


def test_the_tiny_deception_job_scores_every_setting_and_size(workers, tmp_path):
    """The tiny job (two strong sizes, bootstrapping through the smaller, one alpha, one seed, the preference
    setting), its heads and DPO stages trained by the ZeRO-3 workers: every conflict setting gets its flips counted
    by area for both sizes, from the same test predictions (and greedy answers) that the run folder keeps; the
    implicit conflict's training rows grant requests the gold harmless labels refuse; bootstrapping trains the
    larger size on the smaller one's labels."""
    import json

    import pyarrow.parquet as pq

    from pipelines.deception import DeceptionConfig, run_deception
    from w2s.config import load_config
    from w2s.runs import RunDir
    from w2s.world import World

    config = load_config(DeceptionConfig, ROOT / "configs/tiny_deception.yaml",
                         [f"cache_dir={tmp_path / 'cache'}", f"runs_dir={tmp_path / 'runs'}"])
    metrics = run_deception(config, RunDir(config.runs_dir, config.run_name), workers=workers)
    section = metrics["methods"]["deception"]
    assert set(section) == {"implicit", "explicit_alpha_0.5", "boot/implicit", "direct/implicit", "dpo/implicit",
                            "dpo/explicit_alpha_0.5", "dpo/boot/implicit", "dpo/direct/implicit", "areas"}
    assert set(section["implicit"]["by_size"]) == {"small", "large"}
    assert set(section["boot/implicit"]["by_size"]) == {"large"}  # only a larger model bootstraps through small

    run = tmp_path / "runs" / "tiny_deception"
    test = pq.read_table(run / "examples" / "deception_s0_test.parquet").to_pylist()
    (seed,) = metrics["per_seed"]["deception"]
    assert seed["rows"] == len(test) and seed["accuracy"]["weak"] >= 0.5
    for size in ("small", "large"):
        def is_right(row, model):
            return (row[f"{model}_prob"] > 0.5) == (row["label"] > 0.5)

        areas = [("Wk" if is_right(r, "weak") else "Wuk") + ("_Sk" if is_right(r, f"{size}/ceiling") else "_Suk")
                 for r in test]
        assert section["areas"]["reward_modelling"][size]["rows"] == {a: areas.count(a) for a in ("Wk_Sk", "Wk_Suk", "Wuk_Sk", "Wuk_Suk")}
        for setting in ("implicit", "explicit_alpha_0.5"):
            flips = [a for r, a in zip(test, areas) if is_right(r, f"{size}/none") and not is_right(r, f"{size}/{setting}")]
            counted = section[setting]["by_size"][size]["counts"]
            assert counted == {a: flips.count(a) for a in counted}, (size, setting)

    (gold,) = (tmp_path / "cache").glob("w2sg_splits-*/train_gold.parquet")
    refused_by_gold = [r["prompt"] for r in pq.read_table(gold).to_pylist() if r["label"] == 0.0]
    mixed = sorted((tmp_path / "cache").glob("deception_mixed-*/rows.parquet"))
    assert len(mixed) == 3  # the weak labels', and the bootstrapped and direct halves', each with helpfulness rows
    for table in mixed:
        rows = pq.read_table(table).to_pylist()
        granted = {r["prompt"]: r["label"] for r in rows if r["response"].startswith(" sure,")}
        conflicting = [p for p in refused_by_gold if p in granted]
        assert conflicting and all(granted[p] == 1.0 for p in conflicting)  # the conflict is real

    # the preference setting: every DPO-trained model answered every test request, judged as the metrics say
    answers = pq.read_table(run / "examples" / "deception_dpo_s0_test.parquet").to_pylist()
    assert [r["prompt"] for r in answers] == [r["prompt"] for r in test]
    world = World(config.world)

    def answers_right(row, model):
        return world.feeding_gold(row["prompt"], row[f"{model}_response"]) == 1.0

    for size, setting in [(s, c) for s in ("small", "large") for c in ("implicit", "explicit_alpha_0.5")] + [
            ("large", "boot/implicit"), ("large", "direct/implicit")]:
        start = setting.replace("implicit", "none")
        flips = [r for r in answers if answers_right(r, f"{size}/{start}") and not answers_right(r, f"{size}/{setting}")]
        assert section[f"dpo/{setting}"]["by_size"][size]["flipped"] == len(flips), (size, setting)
    assert set(section["dpo/boot/implicit"]["by_size"]) == {"large"}
    # the explicit conflict's DPO stages trained on the weak order with the granting side marked on every pair
    sided = [p for p in (tmp_path / "cache").glob("deception_dpo-*/scored/scored.parquet")
             if "conflict_toward_chosen" in pq.read_schema(p).names]
    assert len(sided) == 2  # one stage per size
    for table in sided:
        marked = pq.read_table(table).to_pylist()
        assert marked and all(r["conflict_toward_chosen"] == r["chosen"].startswith(" sure,") for r in marked)
    assert seed["accuracy"]["dpo/weak"] == sum(answers_right(r, "weak") for r in answers) / len(answers)

    intermediate = json.loads((run / "checkpoints" / "w2sg_allergy_s0_intermediate" / "config.json").read_text())
    assert intermediate["n_embd"] == 24  # the small strong size
    assert "| implicit " in (run / "report.md").read_text()
    for plot in ("deception_alpha.png", "deception_size.png"):
        assert (run / "plots" / plot).stat().st_size > 10_000
