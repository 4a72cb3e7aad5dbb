"""Model-hosting actors and the group that places them.

Each model (weak aligned, weak base, strong...) lives in its own `ModelHost` actor. `ModelGroup`
reserves one placement-group bundle per model, a whole GPU each when the cluster has GPUs, so
what runs where is decided in one place. On a CPU-only machine the bundles hold a share of the
CPUs instead; the code path is the same.
"""

from __future__ import annotations

import math

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from w2s.modeling import ModelSpec, check_model_path


# A host killed mid-stage (a node lost, OOM) is restarted by Ray, which reloads its model, and the
# calls it had not answered are sent again: the stage goes on with the same numbers.
@ray.remote(max_restarts=3, max_task_retries=3)
class ModelHost:
    """One causal LM, loaded once, answering batched log-prob and generation calls."""

    def __init__(self, role: str, spec: dict):
        import torch

        from w2s.modeling import load_model, model_positions

        self.role = role
        self.spec = ModelSpec(**spec)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer = load_model(self.spec, self.device)
        # rows come checked against the job's max_length (at most this); a longer one is an error, never cut
        self.positions = model_positions(self.spec.path) or self.tokenizer.model_max_length

    def logprobs(self, prompts: list[str], responses: list[str]) -> list[list[float]]:
        from w2s.modeling import response_logprobs

        return response_logprobs(self.model, self.tokenizer, prompts, responses, self.positions)

    def generate(self, prompts: list[str], max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> list[str]:
        from w2s.modeling import generate

        return generate(self.model, self.tokenizer, prompts, max_new_tokens, do_sample, temperature, top_k, seed,
                        self.positions)

    def where(self) -> dict:
        import os

        return {"role": self.role, "node_id": ray.get_runtime_context().get_node_id(), "device": self.device,
                "pid": os.getpid()}


class ModelGroup:
    """A placement group with one bundle per model and a `ModelHost` in each.

    gpus_per_model: None = 1 when the cluster has GPUs, else 0.
    cpus_per_model: None = 1 on GPUs; on CPUs an equal share of all but one CPU, so that the Ray
    Data tasks that feed the hosts always have a CPU to run on.
    """

    def __init__(self, specs: dict[str, ModelSpec], gpus_per_model: float | None = None,
                 cpus_per_model: float | None = None, strategy: str = "PACK"):
        # Fail before reserving anything; actors get absolute paths (their working directory differs).
        specs = {role: spec.model_copy(update={"path": str(check_model_path(spec.path).resolve())})
                 for role, spec in specs.items()}
        resources = ray.cluster_resources()
        gpus = gpus_per_model if gpus_per_model is not None else (1 if resources.get("GPU", 0) >= 1 else 0)
        if cpus_per_model is None:
            # rounded down: rounding 1/6 up to 0.17 would leave 0.98 CPU free, and Ray Data would wait forever
            cpus_per_model = 1 if gpus else max(0.05, math.floor(100 * (resources.get("CPU", 1) - 1) / len(specs)) / 100)
        bundle = {"CPU": cpus_per_model, **({"GPU": gpus} if gpus else {})}
        self.placement = placement_group([dict(bundle) for _ in specs], strategy=strategy)
        self.hosts = {}
        try:
            ray.get(self.placement.ready(), timeout=600)
            self.hosts = {
                role: ModelHost.options(
                    num_cpus=cpus_per_model, num_gpus=gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=i),
                ).remote(role, spec.model_dump())
                for i, (role, spec) in enumerate(specs.items())
            }
            ray.get([h.where.remote() for h in self.hosts.values()])  # surface load errors here
        except BaseException:  # a host that cannot start must not keep the cluster's resources reserved
            self.shutdown()
            raise

    def where(self) -> list[dict]:
        return ray.get([h.where.remote() for h in self.hosts.values()])

    def shutdown(self) -> None:
        for host in self.hosts.values():
            ray.kill(host)
        remove_placement_group(self.placement)

    def __enter__(self) -> "ModelGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
