"""What a job asks the cluster for, per role, and how long it waits for it.

An autoscaling cluster (cluster.yaml: GPU node types with `min_workers: 0`) has no GPU when a job starts,
so a job that sized itself from `ray.cluster_resources()` would run everything on the CPU head. Instead
each job's config says what its model hosts and training workers need (the `cluster` section), the job
asks Ray for exactly that (a pending request is what makes the autoscaler start nodes), and when the
cluster has not provided it within `wait_s` the job stops with one message saying what it waited for.
"""

from __future__ import annotations

from typing import Literal

import ray
from pydantic import Field

from w2s.config import StrictModel


class ResourcesUnavailableError(RuntimeError):
    """The cluster did not provide what a stage asked for within the job's `cluster.wait_s`."""


class _Asks(StrictModel):
    accelerator_type: str | None = Field(None, description="a GPU type as Ray names it (e.g. A10G, A100): only "
                                         "nodes with that GPU are used")
    resources: dict[str, float] = Field({}, description="custom Ray resources each one asks for, e.g. a label a "
                                        "node type of cluster.yaml advertises")

    def _extra(self) -> dict[str, float]:
        # Ray's own spelling of an accelerator type: a tiny amount of `accelerator_type:<name>`
        typed = {f"accelerator_type:{self.accelerator_type}": 0.001} if self.accelerator_type else {}
        return {**self.resources, **typed}


class HostResources(_Asks):
    """Each model host: a process holding one model."""

    gpus: float = Field(0, ge=0, le=1, description="GPUs per host: 1 a whole one, 0.5 two hosts share one "
                        "(small models), 0 on CPUs")

    def bundle(self) -> dict[str, float]:
        """What one host reserves (its CPU work happens while training workers wait: it reserves no CPU)."""
        return {**({"GPU": self.gpus} if self.gpus else {}), **self._extra()}


class TrainResources(_Asks):
    """Each Ray Train worker of a training stage (`num_workers` of them: the method's train config)."""

    use_gpu: bool = Field(False, description="one GPU per worker, NCCL between workers; False: CPUs and gloo")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker reserves and, rounded down to at "
                                   "least 1, its torch threads; below 1, small stages train side by side")

    def bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {}), **self._extra()}


class ClusterConfig(StrictModel):
    """Where a job's work runs: every job config has this section (`cluster:`); a run may move to another
    cluster and go on (it is not part of what the run makes)."""

    max_hosts: int = Field(4, ge=1, description="model hosts at most: a stage needing more models streams them "
                           "through the hosts")
    placement: Literal["PACK", "SPREAD"] = Field("PACK", description="model hosts packed onto as few nodes as "
                                                  "possible, or spread over the nodes")
    hosts: HostResources = HostResources()
    train: TrainResources = TrainResources()
    wait_s: float = Field(900, gt=0, description="how long a stage waits for the resources it asks for (an "
                          "autoscaler starting nodes takes minutes) before the job stops")


def unavailable(what: str, bundle: dict, count: int, wait_s: float) -> ResourcesUnavailableError:
    have = {k: v for k, v in ray.cluster_resources().items() if not k.startswith(("node:", "memory", "object_store"))}
    return ResourcesUnavailableError(
        f"{what}: {count} x {bundle} asked for, not provided within {wait_s:g}s (cluster.wait_s); the cluster has "
        f"{have}. On an autoscaling cluster, a node type of cluster.yaml must offer this (and its max_workers allow "
        "enough nodes); on a fixed one, ask for what it has (the job config's `cluster` section)")


def wait_for(bundle: dict[str, float], count: int, wait_s: float, what: str, strategy: str = "PACK") -> None:
    """Block until the cluster can place `count` x `bundle` at once (starting nodes where it autoscales), then
    release them for the caller to take; ResourcesUnavailableError after `wait_s` seconds."""
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([dict(bundle)] * count, strategy=strategy)
    try:
        if not group.wait(timeout_seconds=wait_s):
            raise unavailable(what, bundle, count, wait_s)
    finally:
        remove_placement_group(group)
