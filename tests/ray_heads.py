"""Ray heads of the tests' own, started with the `ray` CLI: token auth on, loopback dashboard, free ports, a
temp dir and HOME of their own, so they never collide with the tests' in-process cluster or another run on
the machine. Never `ray stop` (nor ray.cluster_utils.AutoscalingCluster, which calls `ray stop --force`):
it kills every Ray process on the machine. A head is ended by killing the processes that name its temp dir or
its GCS address, and their children.

An autoscaling head runs Ray's fake multi-node provider (`fake_multinode`, shipped with Ray for laptop
testing): the autoscaler starts and stops worker nodes as local raylets, of the node types given.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:  # all bound at once, so the ports are distinct
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run(args, env, timeout):
    return subprocess.run(args, env=env, timeout=timeout, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def _signal(processes, sig) -> None:
    for p in processes:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def kill_head(temp_dir: str, gcs_port: int) -> None:
    """End the Ray processes of *our* head only: each one names our unique temp dir in its command line or runs
    inside it (job drivers run in the unpacked working_dir), names our GCS address (the Ray client server), or
    descends from one that does. The raylet's agents rename themselves (`ray::DashboardAgent`): left behind, they
    outlive their raylet by a minute, one spinning a core (seen in the test suite). Every one is stopped before
    any is killed: a dashboard that sees one of its modules die starts another."""
    address = re.compile(rf"--address=\S+:{gcs_port}(\s|$)")
    ours = {}
    for p in psutil.process_iter(["cmdline", "cwd"]):
        command = " ".join(p.info["cmdline"] or [])
        if p.pid != os.getpid() and (temp_dir in command or temp_dir in (p.info["cwd"] or "")
                                     or address.search(command)):
            ours[p.pid] = p
    stopped = {}
    while len(stopped) < len(ours):  # until no stopped process has a child not yet stopped
        _signal([p for pid, p in ours.items() if pid not in stopped], signal.SIGSTOP)
        stopped.update(ours)
        for p in list(ours.values()):
            try:
                ours.update((child.pid, child) for child in p.children(recursive=True) if child.pid != os.getpid())
            except psutil.Error:
                pass
    _signal(ours.values(), signal.SIGKILL)
    psutil.wait_procs(list(ours.values()), timeout=10)


def processes_using(directory: str) -> dict[int, str]:
    """Processes with a file open under `directory` ({pid: name}): every process of a head writes its logs into
    the head's temp dir, whatever name it gives itself."""
    found = {}
    for p in psutil.process_iter(["name"]):
        try:
            if any(f.path.startswith(directory) for f in p.open_files()):
                found[p.pid] = p.info["name"]
        except psutil.Error:
            pass
    return found


def http_status(url, token=None):
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def wait_for_http(url, timeout):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return http_status(url)  # any HTTP answer (even 401) means the server is up
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@dataclass
class Head:
    url: str  # the dashboard (job submission)
    env: dict  # an environment with the cluster's token (RAY_AUTH_MODE=token)
    no_auth_env: dict  # the same without token auth
    token: str
    temp_dir: Path

    def autoscaler_log(self) -> str:
        """What the autoscaler did: its monitor log (every node it added or removed, and why)."""
        logs = list(self.temp_dir.glob("session_*/logs/monitor.log"))
        return logs[0].read_text() if logs else ""


def _autoscaling_config(node_types: dict, head_cpus: float, gcs_port: int, idle_timeout_minutes: float) -> dict:
    """A cluster config for the fake multi-node provider: the head (no room for the job's workers) and
    `node_types` ({name: {"resources": ..., "max_workers": n}}, each scaling from zero)."""
    types = {name: {"node_config": {}, "min_workers": 0, **spec} for name, spec in node_types.items()}
    types["ray.head.default"] = {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}
    return {"cluster_name": "w2s-fake", "max_workers": sum(t["max_workers"] for t in node_types.values()),
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs_port}"},
            "available_node_types": types, "head_node_type": "ray.head.default", "auth": {},
            "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes, "docker": {},
            **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                   "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                                   "cluster_synced_files", "rsync_exclude", "rsync_filter")},
            "file_mounts": {}, "file_mounts_sync_continuously": False}


@contextlib.contextmanager
def local_head(home: Path, num_cpus: float = 2, node_types: dict | None = None, idle_timeout_minutes: float = 0.25):
    """A Ray head on 127.0.0.1 with RAY_AUTH_MODE=token; with `node_types`, an autoscaling one."""
    # Sandboxed HOME: `ray get-auth-token --generate` writes $HOME/.ray/auth_token, and Ray turns token auth on
    # for `ray start`/`ray.init` whenever that file exists, so writing the real one would change other Ray users
    # on this machine (and a real one would leak into the no-token checks).
    home.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS
    # Our venv first on PATH, so the job's `python` is the one that has Ray.
    path = os.pathsep.join([os.path.dirname(RAY), os.environ.get("PATH", "")])
    base.update(HOME=str(home), PATH=path, RAY_USAGE_STATS_ENABLED="0")
    env = dict(base, RAY_AUTH_MODE="token")
    gen = run([RAY, "get-auth-token", "--generate"], env, 60)
    assert gen.returncode == 0, gen.stderr
    token = gen.stdout.strip()

    # Short temp dir: Ray's unix socket paths live under it and must stay < 108 chars.
    temp_dir = Path(tempfile.mkdtemp(prefix="w2sray", dir="/tmp"))
    gcs, dash, client, agent = free_ports(4)
    args = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            # Fixed defaults (10001, 52365) would clash with other local clusters.
            f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
            f"--num-cpus={num_cpus:g}", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    head_env = env
    if node_types:
        config = temp_dir / "autoscaling.yaml"
        config.write_text(yaml.safe_dump(_autoscaling_config(node_types, num_cpus, gcs, idle_timeout_minutes)))
        args.append(f"--autoscaling-config={config}")
        head_env = dict(env, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    try:
        start = run(args, head_env, 120)
        assert start.returncode == 0, start.stdout + start.stderr
        url = f"http://127.0.0.1:{dash}"
        wait_for_http(url + "/api/version", timeout=60)
        yield Head(url, env, base, token, temp_dir)
    finally:
        kill_head(str(temp_dir), gcs)
        left = processes_using(str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"the head's processes outlived it: {left}"
