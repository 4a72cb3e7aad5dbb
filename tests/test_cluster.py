"""Checks for cluster.yaml and for token-authenticated job submission on a real local Ray head.

The integration test drives Ray only through CLI subprocesses with its own ports, temp dir and
HOME, so it cannot collide with clusters that other tests start in this pytest process. It does
NOT use `ray stop`: that kills every Ray process on the machine, not just ours.
"""

import copy
import ipaddress
import json
import re
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray_heads import RAY, http_status, local_head, run

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


# --------------------------------------------------------------------------- cluster.yaml


def _ray_up_validate(cfg):
    """What `ray up` does before touching the cloud: merge provider defaults, then Ray's
    JSON-schema + sanity checks (unknown keys, missing resources, bad head type...)."""
    validate_config(prepare_config(copy.deepcopy(cfg)))


@pytest.fixture(scope="module")
def cfg():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_ray_validator(cfg):
    _ray_up_validate(cfg)

    types = cfg["available_node_types"]
    assert "GPU" not in types[cfg["head_node_type"]]["resources"]
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert {"gpu_small", "gpu_large"} <= set(gpu_types)
    for t in gpu_types.values():  # autoscaled from zero, capped
        assert t["min_workers"] == 0 and 0 < t["max_workers"] <= cfg["max_workers"]


def test_cluster_yaml_node_types_offer_what_a_gpu_job_asks_for(cfg):
    """The README's GPU settings: hosts fit the A10G type only, training workers the A100 type only, and
    nothing fits the head (the autoscaler must start nodes for them)."""
    from actors.resources import ClusterConfig

    cluster = ClusterConfig.model_validate({"hosts": {"gpus": 1, "accelerator_type": "A10G"},
                                            "train": {"use_gpu": True, "accelerator_type": "A100"}})
    types = cfg["available_node_types"]

    def fits(bundle: dict) -> set[str]:
        return {name for name, t in types.items() if all(t["resources"].get(k, 0) >= v for k, v in bundle.items())}

    assert fits(cluster.hosts.bundle()) == {"gpu_small"}
    assert fits(cluster.train.bundle()) == {"gpu_large"}


def _drop_resources(c):
    del c["available_node_types"]["gpu_small"]["resources"]


def _drop_node_config(c):
    del c["available_node_types"]["gpu_large"]["node_config"]


def _unknown_head(c):
    c["head_node_type"] = "no_such_type"


@pytest.mark.parametrize(
    "breakage",
    [lambda c: c.update(bogus_key=1), _drop_resources, _drop_node_config, _unknown_head],
    ids=["unknown-top-level-key", "missing-resources", "missing-node_config", "bad-head-type"],
)
def test_ray_validator_rejects_broken_copies(cfg, breakage):
    broken = copy.deepcopy(cfg)
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _ray_up_validate(broken)


def test_start_commands_use_token_auth_and_loopback_dashboard(cfg):
    head = " ".join(cfg["head_start_ray_commands"])
    workers = " ".join(cfg["worker_start_ray_commands"])
    for cmds in (head, workers):
        assert "RAY_AUTH_MODE=token ray start" in cmds
    hosts = re.findall(r"--dashboard-host[= ](\S+)", head)
    assert hosts and all(ipaddress.ip_address(h).is_loopback for h in hosts)
    # Every node gets the same token file that `ray start` reads in token mode.
    assert "~/.ray/auth_token" in cfg["file_mounts"]


# --------------------------------------------------------------------------- live head

TINY_JOB = """
import ray

ray.init()  # RAY_ADDRESS is set by the job manager
print("W2S_RESULT", ray.get(ray.remote(lambda: 1).remote()))
"""


@pytest.fixture
def token_head(tmp_path):
    """A Ray head on 127.0.0.1 with RAY_AUTH_MODE=token (tests/ray_heads.py).

    Yields (dashboard_url, env with token auth, env without it, the token)."""
    with local_head(tmp_path / "home", num_cpus=2) as head:
        assert (tmp_path / "home" / ".ray" / "auth_token").read_text().strip() == head.token
        yield head.url, head.env, head.no_auth_env, head.token


def test_job_submit_with_token_auth(token_head, tiny_cache, tiny_wspo, tmp_path):
    url, env, no_auth_env, token = token_head
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "tiny_job.py").write_text(textwrap.dedent(TINY_JOB))
    submit = [RAY, "job", "submit", f"--address={url}", f"--working-dir={job_dir}",
              "--", "python", "tiny_job.py"]

    # Without a token (no RAY_AUTH_MODE, empty HOME) the dashboard must refuse the job.
    empty_home = tmp_path / "empty_home"
    empty_home.mkdir()
    refused = run(submit, dict(no_auth_env, HOME=str(empty_home)), 60)
    assert refused.returncode != 0
    assert re.search(r"401|Unauthorized|Authentication required", refused.stdout + refused.stderr)
    # A wrong token is refused too; the right one is accepted.
    assert http_status(url + "/api/jobs/", token="0" * 64) == 403
    assert http_status(url + "/api/jobs/", token=token) == 200

    # With the token, a method job of the project, as a user submits it: WSPO on the tiny world (its stages are in
    # the tests' cache, built by the same job run locally: tiny_wspo), ending with the same numbers.
    runs, cache = tmp_path / "runs", tiny_cache
    wspo = run([RAY, "job", "submit", f"--address={url}", f"--working-dir={ROOT}", "--", "python", "-m", "jobs.wspo",
                 "--config", "configs/tiny_wspo.yaml", "--set", f"runs_dir={runs}", "--set", f"cache_dir={cache}"],
                env, 900)
    out = wspo.stdout + wspo.stderr
    assert wspo.returncode == 0 and "succeeded" in out, out[-5000:]
    assert "gamma sweep" in out  # the job's table reaches the submitter
    metrics = json.loads((runs / "tiny_wspo" / "metrics.json").read_text())
    section = metrics["methods"]["wspo"]
    assert {"helpful", "harmless", "total", "pgr", "sweep"} <= set(section) and section["gamma"] == 0.1
    assert [row["gamma"] for row in section["sweep"]] == [0.1, 0.5] and section["train_rows"] == 64
    assert set(metrics["models"]) == {"weak_base", "weak_aligned", "strong_base", "strong_ceiling"}
    local = json.loads((tiny_wspo / "metrics.json").read_text())
    assert metrics["models"] == local["models"] and section["sweep"] == local["methods"]["wspo"]["sweep"]
    report = (runs / "tiny_wspo" / "report.md").read_text()
    assert "Gamma sweep" in report and (runs / "tiny_wspo" / "plots" / "wspo_gamma_sweep.png").stat().st_size > 1000
