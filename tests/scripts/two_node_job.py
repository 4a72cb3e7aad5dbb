"""Run a job module on a two-node Ray cluster started on this machine with Ray's own utilities.

    python tests/scripts/two_node_job.py jobs.macpo --config configs/tiny_macpo.yaml ...
Each node has one CPU, so a 2-worker training stage needs both nodes.
"""

import os
import subprocess
import sys

from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                     "dashboard_host": "127.0.0.1"})
try:
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    done = subprocess.run([sys.executable, "-m", *sys.argv[1:]], env=env)
finally:
    cluster.shutdown()
sys.exit(done.returncode)
