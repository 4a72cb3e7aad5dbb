"""Run a job module on a two-node Ray cluster started on this machine with Ray's own utilities.

    python tests/scripts/two_node_job.py jobs.macpo --config configs/tiny_macpo.yaml ...
Each node has one CPU, so a 2-worker training stage needs both nodes.
"""

import os
import socket
import subprocess
import sys

from ray.cluster_utils import Cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The dashboard serves the state API Ray Train's controller polls; on a port of its own (8265 may be another
# Ray instance's on this machine, and this start does not move to the next free one).
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                     "dashboard_host": "127.0.0.1", "dashboard_port": free_port()})
try:
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    done = subprocess.run([sys.executable, "-m", *sys.argv[1:]], env=env)
finally:
    cluster.shutdown()
sys.exit(done.returncode)
