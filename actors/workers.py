"""What one job runs on, in one place: its model hosts and its training workers, started once.

    Workers
      hosts     HostPool           model hosts for every scoring, generation and evaluation stage
      trainers  TrainingWorkers    Ray Train worker groups (DeepSpeed ZeRO-3) for every training stage

Both live as long as the job and ask for what its config's `cluster` section says (actors.resources). On
CPUs they coexist: training workers reserve their CPUs, and hosts reserve none (they work only while the
training workers wait). When both ask for GPUs they take turns: the hosts are stopped before a training
stage and training workers before hosts start (the next stage that needs them starts them again).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pyarrow as pa

from actors.model_host import HostPool, HostRef
from actors.resources import ClusterConfig
from actors.stages import generate_responses
from actors.trainer import TrainConfig, TrainingWorkers
from w2s.modeling import ModelSpec


class Workers:
    """`cluster.max_hosts`: model hosts at most (a process each): a stage that needs more models streams them
    through the hosts (`generate`). `max_train_groups`: worker groups of one shape training side by side (None: as
    many as the cluster holds, TrainingWorkers)."""

    def __init__(self, train_storage: str | Path, cluster: ClusterConfig = ClusterConfig(),
                 max_train_groups: int | None = None):
        self.hosts = HostPool(cluster.max_hosts, cluster.placement, cluster.hosts, cluster.wait_s)
        self.trainers = TrainingWorkers(train_storage, cluster.train, cluster.wait_s, max_train_groups)
        self.take_turns = cluster.hosts.gpus > 0 and cluster.train.use_gpu

    def host(self, models: dict[str, ModelSpec], alone: tuple[str, ...] = (), turns: bool = False
             ) -> dict[str, HostRef]:
        """Hosts holding `models` (HostPool.hosts; `alone`: roles that compute while the others wait; `turns`:
        a scoring stage, whose hosts may take turns)."""
        if self.take_turns:
            self.trainers.shutdown()
        return self.hosts.hosts(models, alone, turns)

    def generate(self, prompts: pa.Table, models: dict[str, ModelSpec], batch_size: int = 64,
                 **generation) -> pa.Table:
        """`prompts` with a `<name>_response` column per model (generate_responses), models streamed through the
        hosts as many at a time as there are: models with the same weights generate once (naive SFT is the
        student's round 0)."""
        first: dict[tuple, str] = {}  # distinct model -> the first name it goes by
        same = {name: first.setdefault(self.hosts.identity(spec), name) for name, spec in models.items()}
        distinct, responses = list(first.values()), {}
        for i in range(0, len(distinct), self.hosts.max_hosts):
            hosts = self.host({name: models[name] for name in distinct[i:i + self.hosts.max_hosts]})
            table = generate_responses(prompts, hosts, batch_size=batch_size, **generation)
            responses.update({name: table[f"{name}_response"] for name in hosts})
        for name in models:
            prompts = prompts.append_column(f"{name}_response", responses[same[name]])
        return prompts

    def train(self, *args, **kwargs) -> dict:
        """One training stage (TrainingWorkers.train)."""
        if self.take_turns:
            self.hosts.shutdown()
        return self.trainers.train(*args, **kwargs)

    def train_dtype(self, config: TrainConfig) -> str:
        """The dtype `config` trains in on these workers; its frozen reference is scored in it too, so that the
        policy's log-ratio to it starts at zero."""
        return config.compute_dtype(self.trainers.resources.use_gpu)

    def shutdown(self) -> None:
        self.hosts.shutdown()
        self.trainers.shutdown()

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


@contextlib.contextmanager
def job_workers(workers: Workers | None, train_storage: str | Path, cluster: ClusterConfig):
    """`workers` when a caller shares its own; otherwise new ones asking for `cluster`, shut down on exit."""
    if workers is not None:
        yield workers
        return
    with Workers(train_storage, cluster) as own:
        yield own
