"""The scoring pipeline (`jobs.score`) refuses models that do not share a tokenizer."""

import json

import pyarrow.parquet as pq
import pytest

from pipelines.score import ScoreConfig, score
from w2s.modeling import TokenizerMismatchError
from w2s.modeling import ModelLoadError, ModelSpec
from w2s.runs import RunDir

ROW = {"prompt": "q: zorb color?\na:", "chosen": " red.", "rejected": " blue."}


def test_score_job_refuses_mismatched_tokenizers_before_scoring(workers, checkpoints, mismatched_checkpoint, tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps(ROW) + "\n")
    config = ScoreConfig(data=str(data), models={"weak": ModelSpec(path=str(checkpoints["weak"])),
                                                 "strong": ModelSpec(path=str(mismatched_checkpoint))})
    run = RunDir(tmp_path / "runs", "score")
    with pytest.raises(TokenizerMismatchError, match="models 'weak' and 'strong' tokenize 'q: zorb color"):
        score(config, run, workers)
    assert not (run.path / "examples" / "scored.parquet").exists()

    config.models["strong"] = ModelSpec(path=str(checkpoints["strong"]))
    assert score(config, run, workers)["scoring"] == {"data": str(data), "scored_rows": 1, "set_aside_rows": 0}


def test_score_job_takes_the_models_positions_and_refuses_more(workers, checkpoints, tmp_path):
    """The world's models take 96 positions: a longer row is set aside (it used to reach the model), and a
    max_length above 96 is refused before anything is scored."""
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps(ROW) + "\n" + json.dumps({**ROW, "chosen": " " + "r" * 90}) + "\n")
    models = {"weak": ModelSpec(path=str(checkpoints["weak"])), "strong": ModelSpec(path=str(checkpoints["strong"]))}
    run = RunDir(tmp_path / "runs", "score")
    with pytest.raises(ModelLoadError, match=r"max_length 512 is more than weak can take \(96 positions\)"):
        score(ScoreConfig(data=str(data), models=models, max_length=512), run, workers)
    assert not (run.path / "examples" / "scored.parquet").exists()
    assert score(ScoreConfig(data=str(data), models=models), run, workers)["scoring"]["set_aside_rows"] == 1
    rejected = pq.read_table(run.path / "examples" / "rejected_rows.parquet").to_pylist()
    assert rejected[0]["error"] == "too long: 109 tokens > max_length 96"
