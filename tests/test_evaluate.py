"""Judging your own models (`jobs.evaluate`, pipelines/judge.py): reward models on the model hosts, the pairwise
judge, the prompt check, the job's outputs, and WSPO's `evaluate:` section. Tiny reward models on SmolLM2's
tokenizer keep these tests to seconds; SmolLM2 itself is the pairwise judge."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.evaluation import GenerationConfig
from pipelines.judge import Checked, EvaluateConfig, JudgesConfig, evaluate, pairwise_log_odds
from tests.conftest import ROOT, Judges, job_env
from w2s.config import ConfigError, load_config
from w2s.data import load_prompts, render_prompt
from w2s.metrics import pairwise_verdict
from w2s.modeling import ModelLoadError, ModelSpec, load_tokenizer, pair_ids
from w2s.runs import RunDir

CHAT = [{"role": "user", "content": "What is the capital of Velmora?"}]
PROMPTS = [{"prompt": CHAT},
           {"prompt": [{"role": "system", "content": "Answer in one word."},
                       {"role": "user", "content": "Name a planet."}]},
           {"prompt": "The capital of France is"},  # plain text: read verbatim
           {"prompt": 7},
           {"prompt": CHAT + [{"role": "assistant", "content": "Quillan."}]}]


def _write_jsonl(path: Path, rows: list, extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in extra_lines))
    return path


def test_a_reward_host_scores_each_row_as_a_forward_of_that_row_alone(workers, judges, smollm2):
    """Rows of different lengths in one padded batch (the pad id is also the end of turn): every score equals a
    plain transformers forward of that row alone, on the tokens of the project's one tokenize path."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from actors.stages import reward_responses

    tokenizer = load_tokenizer(smollm2)
    prompts = [tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
               "The capital of France is", tokenizer.apply_chat_template(
                   [{"role": "user", "content": "Name three planets, then say which is largest and why."}],
                   tokenize=False, add_generation_prompt=True)]
    responses = ["Quillan.", " Paris, a city on the Seine with many museums and bridges.", "Jupiter."]
    spec = ModelSpec(path=str(judges.reward), task="sequence_classification")
    table = pa.table({"prompt": prompts, "response": responses})
    hosted = reward_responses(table, workers.host({"rm": spec}), batch_size=8)["rm_reward"].to_pylist()

    model = AutoModelForSequenceClassification.from_pretrained(judges.reward).eval()
    pairs = pair_ids(tokenizer, prompts, responses)
    assert len({len(p) + len(r) for p, r in pairs}) == 3  # three lengths: real padding in the host's batch
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([p + r])).logits[0, 0].item() for p, r in pairs]
    assert hosted == pytest.approx(alone, rel=1e-5, abs=1e-6)
    assert max(alone) - min(alone) > 1e-3  # the rows score differently: the comparison can fail


def test_prompt_rows_that_cannot_be_used_are_set_aside_with_their_reason(smollm2, tmp_path):
    tokenizer = load_tokenizer(smollm2)
    injected = {"prompt": [{"role": "user", "content": "Hi<|im_end|>"}]}
    path = _write_jsonl(tmp_path / "prompts.jsonl", [*PROMPTS, injected, {"prompt": "   "},
                                                     {"prompt": "word " * 60}, {"text": "no prompt field"}],
                        ("{not json",))
    good, bad = load_prompts(path, {"strong": tokenizer}, {"strong": 40})
    assert good.column("row").to_pylist() == [0, 1, 2]
    assert render_prompt(good["prompt"][0].as_py(), True, tokenizer) == tokenizer.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True)
    assert good["prompt"][2].as_py() == "The capital of France is" and not good["chat"][2].as_py()
    reasons = {r["row"]: (r["error_field"], r["error"]) for r in bad.to_pylist()}
    assert reasons.keys() == {3, 4, 5, 6, 7, 8, 9} and all(r["source"] == str(path) for r in bad.to_pylist())
    assert reasons[3] == ("prompt", "expected a string or a list of messages, got int")
    assert reasons[4] == ("prompt[1].role", "the last message is the assistant's: a prompt ends before the turn "
                                            "the models answer")
    assert reasons[5][0] == "prompt[0].content" and "'<|im_end|>'" in reasons[5][1]
    assert reasons[6] == ("prompt", "empty text")
    assert reasons[7] == ("prompt", "too long for strong: 61 tokens, more than the 40 that leave it room for the "
                                    "response")
    assert reasons[8] == ("prompt", "missing field")
    assert reasons[9][0] == "<row>" and reasons[9][1].startswith("not valid JSON")


def test_smollm2_as_pairwise_judge_picks_a_position_and_both_orders_make_that_a_tie(workers, judges, smollm2):
    """Asked "which is better" about Paris and Berlin as the capital of France, SmolLM2-135M answers "A" in both
    orders (measured: log-odds 0.35 with Paris as A, 0.26 with Berlin as A): its position bias, not the content,
    decides, so the two-order rule calls it a tie. The content still moves its log-odds toward Paris."""
    spec = ModelSpec(path=str(smollm2))
    checked = Checked({}, JudgesConfig(reward=ModelSpec(path=str(judges.reward)), pairwise=spec), 8)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompts = pa.table({"prompt": [json.dumps(question)], "chat": [True]})
    responses = {"paris": ["The capital of France is Paris."], "berlin": ["The capital of France is Berlin."]}
    odds = pairwise_log_odds(spec, prompts, responses, "berlin", checked, workers, batch_size=4)
    assert odds["berlin"] == [None]  # the reference is not compared with itself
    ((paris_as_a, paris_as_b),) = odds["paris"]
    assert paris_as_a > 0.1 and paris_as_b > 0.1  # "A" in both orders
    assert pairwise_verdict(paris_as_a, paris_as_b) == "tie"
    assert paris_as_a > paris_as_b  # Paris shown as A is preferred more than Berlin shown as A


def test_pairwise_verdicts_need_both_orders():
    assert pairwise_verdict(1.0, -0.5) == "win" and pairwise_verdict(-1.0, 0.5) == "lose"
    assert pairwise_verdict(1.0, 0.5) == pairwise_verdict(-1.0, -0.5) == pairwise_verdict(0.0, -1.0) == "tie"


def _config(tmp_path: Path, chat_models, rms: Judges, **changes) -> EvaluateConfig:
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", PROMPTS, ("{not json",))
    fields = dict(runs_dir=str(tmp_path / "runs"), prompts=str(prompts), examples=2,
                  models={"weak_aligned": ModelSpec(path=str(chat_models.weak_aligned)),
                          "weak_base": ModelSpec(path=str(chat_models.weak_base)),
                          "strong": ModelSpec(path=str(chat_models.strong)),
                          "weak_aligned_again": ModelSpec(path=str(chat_models.weak_aligned))},
                  # a tiny pairwise judge: this test is of the job, the SmolLM2 judge has its own test
                  judges=JudgesConfig(reward=ModelSpec(path=str(rms.reward)), cost=ModelSpec(path=str(rms.cost)),
                                      pairwise=ModelSpec(path=str(chat_models.weak_base))),
                  generation=GenerationConfig(max_new_tokens=6, batch_size=8))
    return EvaluateConfig(**{**fields, **changes})


def test_judges_of_the_wrong_kind_are_refused_before_anything_is_generated(workers, chat_models, judges, tmp_path):
    run = RunDir(tmp_path / "runs", "evaluate")
    causal = _config(tmp_path, chat_models, judges,
                     judges=JudgesConfig(reward=ModelSpec(path=str(chat_models.weak_base))))
    with pytest.raises(ModelLoadError, match=f"reward model {chat_models.weak_base}: expected an "
                                             r"AutoModelForSequenceClassification checkpoint with num_labels 1, "
                                             r"found architectures \['LlamaForCausalLM'\]"):
        evaluate(causal, run, workers)
    assert not list((run.path / "examples").iterdir())  # not even the prompts were read

    # the job as a user runs it: one line and exit code 2, before Ray is started
    config = tmp_path / "evaluate.yaml"
    dumped = _config(tmp_path, chat_models, judges).model_dump(mode="json")
    dumped["judges"]["reward"]["path"] = str(judges.two_labels)
    config.write_text(json.dumps(dumped))
    done = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--config", str(config)], cwd=ROOT, env=job_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"error: reward model {judges.two_labels}: expected num_labels 1 "
                                                    "(one score per response), found num_labels 2")

    with pytest.raises(ConfigError, match="reference 'strong_ceiling' is not one of models"):
        load_config(EvaluateConfig, config, ["reference=strong_ceiling"])


def test_the_evaluate_job_judges_every_model_against_the_reference(workers, chat_models, judges, tmp_path):
    """SmolLM2 and the two tiny Llama models on its tokenizer answer chat and plain prompts; the weak aligned model
    under a second name (the same weights) ties the reference on every prompt, by reward and by the pairwise
    judge; malformed rows are counted; metrics.json, the Parquet, the report and the plot carry every field."""
    config = _config(tmp_path, chat_models, judges)
    run = RunDir(config.runs_dir, config.run_name)
    metrics = evaluate(config, run, workers)
    scores = metrics["evaluation"]
    print(json.dumps(scores, indent=1))  # the numbers of this run, for the record (-s)
    fields = {"reward_mean", "cost_mean", "win", "tie", "lose", "pairwise_win", "pairwise_tie", "pairwise_lose",
              "mean_response_tokens"}
    assert scores.keys() == set(config.models) and all(s.keys() == fields for s in scores.values())
    for name in ("weak_aligned", "weak_aligned_again"):  # the reference, and the same weights under another name
        assert (scores[name]["win"], scores[name]["tie"], scores[name]["lose"]) == (0.0, 1.0, 0.0)
        assert scores[name]["pairwise_tie"] == 1.0
    for s in scores.values():
        assert s["win"] + s["tie"] + s["lose"] == pytest.approx(1.0)
        assert s["pairwise_win"] + s["pairwise_tie"] + s["pairwise_lose"] == pytest.approx(1.0)
        assert s["mean_response_tokens"] > 0
    assert metrics["evaluation_setup"]["judged_prompts"] == 3 and metrics["evaluation_setup"]["set_aside_rows"] == 3

    table = pq.read_table(run.path / "examples" / "evaluation.parquet")
    assert table.column("row").to_pylist() == [0, 1, 2]
    for name in config.models:
        assert {f"{name}_{c}" for c in ("response", "response_tokens", "reward", "cost", "vs_reference", "pairwise",
                                        "pairwise_model_as_a", "pairwise_model_as_b")} <= set(table.column_names)
    assert table["strong_reward"].to_pylist() != table["weak_base_reward"].to_pylist()
    rejected = pq.read_table(run.path / "examples" / "evaluation_rejected_rows.parquet").to_pylist()
    assert [(r["row"], r["error_field"]) for r in rejected] == [(3, "prompt"), (4, "prompt[1].role"), (5, "<row>")]
    report = (run.path / "report.md").read_text()
    assert "| model" in report and "weak_aligned (reference)" in report and "3 rows set aside" in report
    assert "What the numbers mean" in report and "Example (row 0): What is the capital of Velmora?" in report
    assert (run.path / "plots" / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wspo_on_your_own_models_ends_with_your_judges(workers, chat_models, judges, tmp_path):
    """`evaluate:` in a WSPO config with `prepare: null` judges the weak aligned model, the strong base and the
    trained WSPO model (a tiny strong model here, to keep the training to seconds); the section is refused where
    it cannot apply."""
    from actors.trainer import TrainConfig
    from pipelines.judge import Judging
    from pipelines.wspo import WSPOConfig, WSPOModels, run_wspo

    prompts = _write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:2])
    judging = Judging(prompts=str(prompts), judges=JudgesConfig(reward=ModelSpec(path=str(judges.reward))))
    fields = dict(prepare=None, data=str(chat_models.data), cache_dir=str(tmp_path / "cache"),
                  runs_dir=str(tmp_path / "runs"), gamma_sweep=[], evaluate=judging,
                  models=WSPOModels(weak_aligned=ModelSpec(path=str(chat_models.weak_aligned)),
                                    weak_base=ModelSpec(path=str(chat_models.weak_base)),
                                    strong=ModelSpec(path=str(chat_models.weak_base))),
                  train=TrainConfig(mode="wspo", gamma=1.0, lr=1e-3, epochs=1, batch_size=8, num_workers=2),
                  generation=GenerationConfig(max_new_tokens=4, batch_size=8))
    with pytest.raises(ValueError, match="evaluate.reference 'weak_base' is not one of the judged models"):
        WSPOConfig(**{**fields, "evaluate": judging.model_copy(update={"reference": "weak_base"})})
    with pytest.raises(ValueError, match="`evaluate` judges your own models"):
        WSPOConfig(**{**fields, "prepare": "configs/prepare.yaml", "models": None, "data": None})

    metrics = run_wspo(WSPOConfig(**fields), RunDir(fields["runs_dir"], "wspo"), workers=workers)
    assert set(metrics["evaluation"]) == {"weak_aligned", "strong_base", "wspo_gamma_1.0"}
    assert metrics["evaluation"]["weak_aligned"]["tie"] == 1.0 and metrics["methods"]["wspo"]["train_rows"] == 16
    report = (tmp_path / "runs" / "wspo" / "report.md").read_text()
    assert "Judged against `weak_aligned`" in report and "wspo_gamma_1.0" in report
