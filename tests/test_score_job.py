"""The scoring pipeline (`jobs.score`) refuses models that do not share a tokenizer."""

import json

import pytest

from pipelines.score import ScoreConfig, TokenizerMismatchError, score
from w2s.modeling import ModelSpec
from w2s.runs import RunDir

ROW = {"prompt": "q: zorb color?\na:", "chosen": " red.", "rejected": " blue."}


def test_score_job_refuses_mismatched_tokenizers_before_scoring(ray_local, checkpoints, mismatched_checkpoint, tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps(ROW) + "\n")
    config = ScoreConfig(data=str(data), models={"weak": ModelSpec(path=str(checkpoints["weak"])),
                                                 "strong": ModelSpec(path=str(mismatched_checkpoint))})
    run = RunDir(tmp_path / "runs", "score")
    with pytest.raises(TokenizerMismatchError, match="models 'weak' and 'strong' tokenize 'q: zorb color"):
        score(config, run)
    assert not (run.path / "examples" / "scored.parquet").exists()

    config.models["strong"] = ModelSpec(path=str(checkpoints["strong"]))
    assert score(config, run)["scoring"] == {"data": str(data), "scored_rows": 1, "set_aside_rows": 0}
