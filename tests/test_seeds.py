"""A job at several seeds: one run folder per seed, the mean and spread of every number, one report."""

import json

from jobs.common import run_seeds
from w2s.config import StrictModel, offset_seeds
from w2s.runs import RunDir


class Config(StrictModel):
    run_name: str = "toy"
    runs_dir: str = "runs"
    seed: int = 0
    seeds: list[int] = [0]


def _run_one(config: Config, run: RunDir, seed: int, workers=None) -> dict:
    config = offset_seeds(config, seed)
    run.claim(config)
    return run.update_metrics({"models": {"weak": {"total": 0.5 + config.seed / 10}}, "name": "toy"})


def _tables(metrics: dict):
    return [("Models", [{"model": name, **s} for name, s in metrics["models"].items()])]


def test_several_seeds_give_per_seed_runs_and_their_spread(tmp_path, ray_local, capsys):
    config = Config(runs_dir=str(tmp_path), seeds=[0, 1, 2])
    seen = []
    metrics = run_seeds(config, _run_one, _tables, lambda per_seed, mean, std, folder: seen.append(mean) or ["extra"])
    run = tmp_path / "toy"
    assert [json.loads((run / f"seed_{s}" / "metrics.json").read_text())["models"]["weak"]["total"]
            for s in (0, 1, 2)] == [0.5, 0.6, 0.7]
    assert "seed: 2" in (run / "seed_2" / "config.yaml").read_text()
    saved = json.loads((run / "metrics.json").read_text())
    total = saved["over_seeds"]["models"]["weak"]["total"]
    assert round(total["mean"], 6) == 0.6 and round(total["std"], 6) == 0.1 and total["n"] == 3
    assert set(saved["seeds"]) == {"0", "1", "2"} and metrics["mean"]["models"]["weak"]["total"] == total["mean"]
    report = (run / "report.md").read_text()
    assert "0.600 ± 0.100" in report and "extra" in report and seen
    assert "0.600 ± 0.100" in capsys.readouterr().out  # and on screen


def test_one_seed_is_a_plain_run(tmp_path, ray_local):
    metrics = run_seeds(Config(runs_dir=str(tmp_path)), _run_one, _tables)
    assert metrics["models"]["weak"]["total"] == 0.5
    assert (tmp_path / "toy" / "metrics.json").is_file() and not (tmp_path / "toy" / "seed_0").exists()
