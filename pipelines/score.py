"""Score a preference dataset with several models: per-token log-probs of chosen and rejected.

This is the first stage of every weak-to-strong method (the weak aligned, weak base and strong
reference models are scored once, then training needs only the policy resident).
"""

from __future__ import annotations

from pydantic import Field

from actors.resources import ClusterConfig
from actors.stages import score_preferences
from actors.workers import Workers, job_workers
from w2s.config import StrictModel
from w2s.modeling import ModelSpec, check_same_tokenizer, model_positions, resolve_max_length
from w2s.runs import RunDir

class ScoreConfig(StrictModel):
    run_name: str = "score"
    runs_dir: str = "runs"
    data: str = Field(description="preference data: JSONL, Parquet or a saved HF dataset")
    models: dict[str, ModelSpec] = Field(min_length=1, description="role -> checkpoint, e.g. weak_aligned, weak_base, strong")
    batch_size: int = Field(32, ge=1)
    max_length: int | None = Field(None, ge=8, description="tokens of prompt + response + EOS: longer rows are set "
                                   "aside; None: the models' positions")
    require_same_tokenizer: bool = True
    cluster: ClusterConfig = ClusterConfig()


def score(config: ScoreConfig, run: RunDir, workers: Workers | None = None) -> dict:
    """`workers`: the calling job's model hosts (None: started here, hosts only: nothing is trained)."""
    if config.require_same_tokenizer:
        check_same_tokenizer(config.models)
    max_length = resolve_max_length(config.max_length, {role: model_positions(spec.path)
                                                        for role, spec in config.models.items()})
    with job_workers(workers, run.path / "ray_train", config.cluster) as workers:
        first = next(iter(config.models.values())).path
        result = score_preferences(config.data, workers.host(config.models, turns=True), run.path / "examples",
                                   tokenizer_path=first, max_length=max_length, batch_size=config.batch_size)
    print(f"[score] scored {result.n_scored} rows -> {result.scored_path}\n[score] {result.report}", flush=True)
    return run.update_metrics({"scoring": {"data": config.data, "scored_rows": result.n_scored,
                                           "set_aside_rows": result.n_rejected}})
