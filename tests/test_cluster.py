"""Checks for cluster.yaml and for token-authenticated job submission on a real local Ray head.

The integration test drives Ray only through CLI subprocesses with its own ports, temp dir and
HOME, so it cannot collide with clusters that other tests start in this pytest process. It does
NOT use `ray stop`: that kills every Ray process on the machine, not just ours.
"""

import copy
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import psutil
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
RAY = str(Path(sys.executable).with_name("ray"))


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


@ray.remote
def square(x):
    return x * x


print("W2S_RESULT", sum(ray.get([square.remote(i) for i in range(10)])))
"""
EXPECTED = "W2S_RESULT 285"


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:  # all bound at once, so the ports are distinct
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _run(args, env, timeout):
    return subprocess.run(
        args, env=env, timeout=timeout, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )


def _kill_processes_mentioning(marker):
    """End the Ray processes of *our* head only: each one names our unique temp dir in its
    command line or runs inside it (job drivers run in the unpacked working_dir)."""
    ours = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        if p.pid != os.getpid() and (
            marker in " ".join(p.info["cmdline"] or []) or marker in (p.info["cwd"] or "")
        ):
            ours.append(p)
    for p in ours:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    # gcs_server and the autoscaler monitor tend to linger after SIGTERM: don't wait long.
    _, alive = psutil.wait_procs(ours, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def token_head(tmp_path):
    """A Ray head on 127.0.0.1 with RAY_AUTH_MODE=token.

    Yields (dashboard_url, env with token auth, env without it, the token)."""
    # Sandboxed HOME: `ray get-auth-token --generate` writes $HOME/.ray/auth_token, and Ray
    # turns token auth on for `ray start`/`ray.init` whenever that file exists, so writing the
    # real one would change other Ray users on this machine (and a real one would leak into
    # the no-token check below).
    home = tmp_path / "home"
    home.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS
    # Our venv first on PATH, so the job's `python` is the one that has Ray.
    path = os.pathsep.join([os.path.dirname(RAY), os.environ.get("PATH", "")])
    base.update(HOME=str(home), PATH=path, RAY_USAGE_STATS_ENABLED="0")
    env = dict(base, RAY_AUTH_MODE="token")

    gen = _run([RAY, "get-auth-token", "--generate"], env, 60)
    assert gen.returncode == 0, gen.stderr
    assert (home / ".ray" / "auth_token").read_text() == gen.stdout.strip()

    # Short temp dir: Ray's unix socket paths live under it and must stay < 108 chars.
    temp_dir = tempfile.mkdtemp(prefix="w2sray", dir="/tmp")
    gcs, dash, client, agent = _free_ports(4)
    try:
        start = _run(
            [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             # Fixed defaults (10001, 52365) would clash with other local clusters.
             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
             "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env, 120,
        )
        assert start.returncode == 0, start.stdout + start.stderr
        url = f"http://127.0.0.1:{dash}"
        _wait_for_http(url + "/api/version", timeout=60)
        yield url, env, base, gen.stdout.strip()
    finally:
        _kill_processes_mentioning(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _http_status(url, token=None):
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _wait_for_http(url, timeout):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _http_status(url)  # any HTTP answer (even 401) means the server is up
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


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
    refused = _run(submit, dict(no_auth_env, HOME=str(empty_home)), 60)
    assert refused.returncode != 0
    assert re.search(r"401|Unauthorized|Authentication required", refused.stdout + refused.stderr)
    # A wrong token is refused too; the right one is accepted.
    assert _http_status(url + "/api/jobs/", token="0" * 64) == 403
    assert _http_status(url + "/api/jobs/", token=token) == 200

    ok = _run(submit, env, 150)
    out = ok.stdout + ok.stderr
    assert ok.returncode == 0, out
    assert "succeeded" in out and EXPECTED in out, out

    # A method job of the project, as a user submits it: WSPO on the tiny world (its stages are in the tests'
    # cache, built by the same job run locally: tiny_wspo), ending with the same numbers.
    runs, cache = tmp_path / "runs", tiny_cache
    wspo = _run([RAY, "job", "submit", f"--address={url}", f"--working-dir={ROOT}", "--", "python", "-m", "jobs.wspo",
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
