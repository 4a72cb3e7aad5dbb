"""The scoring pipeline (`jobs.score`) refuses models that do not share a tokenizer."""

import json
import shutil

import pytest

from pipelines.score import ScoreConfig, TokenizerMismatchError, score
from w2s.modeling import ModelSpec
from w2s.runs import RunDir

ROW = {"prompt": "q: zorb color?\na:", "chosen": " red.", "rejected": " blue."}


def test_score_job_refuses_mismatched_tokenizers_before_scoring(ray_local, checkpoints, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(checkpoints["strong"], other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["q"], vocab["z"] = vocab["z"], vocab["q"]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps(ROW) + "\n")
    config = ScoreConfig(data=str(data), models={"weak": ModelSpec(path=str(checkpoints["weak"])),
                                                 "strong": ModelSpec(path=str(other))})
    run = RunDir(tmp_path / "runs", "score")
    with pytest.raises(TokenizerMismatchError, match="models 'weak' and 'strong' tokenize 'q: zorb color"):
        score(config, run)
    assert not (run.path / "examples" / "scored.parquet").exists()

    config.models["strong"] = ModelSpec(path=str(checkpoints["strong"]))
    assert score(config, run)["scoring"] == {"data": str(data), "scored_rows": 1, "set_aside_rows": 0}
