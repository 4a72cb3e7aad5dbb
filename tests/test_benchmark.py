"""The scoring benchmark (benchmarks/run.py) at its seconds-scale size: the Ray Data stage through a model host
must give exactly the log-probs of the plain loop it is timed against, or the timing compares different work."""

from benchmarks.run import bench_scoring
from w2s.modeling import GPTSize, init_gpt2
from w2s.world import World, WorldConfig, build_tokenizer


def test_ray_scoring_gives_the_plain_loops_log_probs(ray_local, tmp_path):
    model = init_gpt2(GPTSize(n_layer=2, n_embd=32, n_head=2), build_tokenizer(), tmp_path / "model")
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")}
             for r in World(WorldConfig(n_entities=20, n_pair_prompts=96)).preference_pairs()]
    result = bench_scoring(model, pairs, (32, 96), tmp_path, batch_size=32, repeats=1)
    assert result["max_abs_logprob_diff"] < 1e-5
