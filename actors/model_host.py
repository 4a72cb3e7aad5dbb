"""Model-hosting actors, started once per job and shared by its stages.

A `ModelHost` holds one model at a time and answers batched calls: log-probs and generation from a causal
LM, one score per row from a reward (or cost) model (`task: sequence_classification`) or a likelihood classifier. Every
call names the model it is for (path, dtype, and a fingerprint of the weights): a host that holds
another one loads it in place first. So a host restarted by Ray after a crash, which comes back
empty, loads what the retried call asks for, and the stage goes on with the same numbers.

`HostPool` is the one place that decides what runs where: a bounded number of hosts, started on
first use and kept for the whole job; a stage asks for `{role: model}` and gets a host per distinct
model, reusing a host that already holds it (roles whose weights are the same share one host).
Each host asks for what the job's `cluster.hosts` says (GPUs, a GPU type, custom resources); on CPUs hosts
reserve no CPU (they compute only while the job's training workers wait for them) and share the node's CPUs as
torch threads among the hosts a stage uses (one model scored alone gets them all: 2x faster on 2 cores for a 10M
model, the same numbers bit for bit).
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass
from pathlib import Path

import ray

from actors.resources import HostResources, unavailable
from w2s.modeling import ModelSpec, check_model_path, weights_fingerprint

# On CPUs a scoring stage's hosts take turns, each with every CPU, when its largest model has this much weight:
# sharing the cores, the small models finished first and the large one went on at one thread. Measured on 2 cores,
# together against in turns (README, Speed): WSPO's three hosts with today's 0.8 MB strong model 1.7 s against
# 2.7 s; with the benchmark's 43 MB one 43.1 / 34.6 s against 27.7 / 28.9; the real track's SmolLM2 (514 MB) and
# its 13 MB weak base 50.2 / 41.2 s against 28.0 / 28.3. The crossover between 0.8 and 43 MB was not measured.
TURNS_MIN_WEIGHT_BYTES = 16 * 2**20


@ray.remote(max_restarts=3, max_task_retries=3)
class ModelHost:
    """One model at a time (a causal LM, or a reward model), loaded when a call names another one."""

    def __init__(self, threads: int):
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(threads)  # until a call names its stage's threads
        self.model = self.tokenizer = self.held = None
        self.searches: dict[str, object] = {}  # search rows in progress (w2s.decoding.DecodeRows), by session

    def _threaded(self, model: dict) -> dict:
        """Run with the stage's `threads` that a call names (every call does: a host restarted mid-stage computes
        as it did, since the thread count can change a forward's last bits); the model without them."""
        import torch

        threads = model.get("threads")
        if threads and self.device == "cpu":  # at most the machine's CPUs: a cluster may say it has more
            torch.set_num_threads(min(threads, os.cpu_count() or 1))
        return {k: v for k, v in model.items() if k != "threads"}

    def _use(self, model: dict) -> None:
        from w2s.modeling import load_model, model_positions

        model = self._threaded(model)
        if model != self.held:
            self.model = self.tokenizer = self.held = None
            self.searches = {}  # their KV caches belong to the model that goes
            gc.collect()
            spec = ModelSpec(**{k: v for k, v in model.items() if k != "fingerprint"})
            self.model, self.tokenizer = load_model(spec, self.device)
            # rows come checked against the job's max_length (at most this); a longer one is an error, never cut
            self.positions = model_positions(spec.path) or self.tokenizer.model_max_length
            self.held = model

    def load(self, model: dict) -> dict:
        self._use(model)
        return self.where()

    def logprobs(self, model: dict, prompts: list[str], responses: list[str]):
        """Per-token log-probs of each response (EOS included), as an Arrow list<float32> array."""
        import pyarrow as pa

        from w2s.modeling import response_logprobs

        self._use(model)
        # forward passes of at most DEFAULT_TOKENS_PER_CALL padded tokens: bounds the logits' memory
        rows = response_logprobs(self.model, self.tokenizer, prompts, responses, self.positions)
        return pa.array(rows, pa.list_(pa.float32()))

    def rewards(self, model: dict, prompts: list[str], responses: list[str]):
        """One score per prompt + response from a reward model (task sequence_classification) or a likelihood
        classifier (task likelihood_classification: its logit), as an Arrow float32 array; tokenized with its own
        tokenizer (pair_ids)."""
        import pyarrow as pa

        from w2s.modeling import likelihood_rewards, read_likelihood_head, sequence_rewards

        self._use(model)
        if model.get("task") == "likelihood_classification":
            head = read_likelihood_head(model["path"])
            scores = likelihood_rewards(self.model, self.tokenizer, prompts, responses, self.positions, head)
        else:
            scores = sequence_rewards(self.model, self.tokenizer, prompts, responses, self.positions)
        return pa.array(scores, pa.float32())

    def generate(self, model: dict, prompts: list[str], max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> list[str]:
        from w2s.modeling import generate

        self._use(model)
        return generate(self.model, self.tokenizer, prompts, max_new_tokens, do_sample, temperature, top_k, seed,
                        self.positions)

    # ---- search (actors.search): rows that grow chunk by chunk, kept here with their KV cache between calls ----
    def search_open(self, model: dict, session: str, prompts: list[str], copies: int, seeds: list[int], room: int,
                    want_next: bool = False):
        """`copies` rows per prompt, for `room` new tokens at most; with `want_next`, every row's next-token
        log-probs (numpy [rows, vocab])."""
        from w2s.decoding import DecodeRows

        self._use(model)
        self.searches[session] = DecodeRows(self.model, self.tokenizer, prompts, copies, seeds, room, self.positions)
        return self.searches[session].next_logprobs().cpu().numpy() if want_next else None

    def search_sample(self, model: dict, session: str, parents, n_tokens: int, temperature: float, top_k: int,
                      bias=None) -> tuple[list[list[int]], object]:
        """Rows reordered by `parents`, then up to `n_tokens` sampled for each: (new tokens, finished per row)."""
        import torch

        rows = self._search(model, session)
        rows.select(parents)
        new = rows.sample(n_tokens, temperature, top_k, None if bias is None else torch.as_tensor(bias))
        return new, rows.finished.cpu().numpy()

    def search_append(self, model: dict, session: str, parents, tokens: list[list[int]], want_next: bool = False):
        """Rows reordered by `parents`, then `tokens` added: the summed log-prob of each row's new tokens (and,
        with `want_next`, the next-token log-probs)."""
        rows = self._search(model, session)
        rows.select(parents)
        sums = rows.append(tokens)
        return (sums, rows.next_logprobs().cpu().numpy()) if want_next else sums

    def search_close(self, session: str) -> None:
        self.searches.pop(session, None)

    def _search(self, model: dict, session: str):
        if self._threaded(model) != self.held or session not in self.searches:
            raise RuntimeError(f"search session {session} is not on this host (it restarted, or loaded another "
                               "model): the search batch must start again")
        return self.searches[session]

    def where(self) -> dict:
        import torch

        return {"model": self.held["path"] if self.held else None, "device": self.device,
                "dtype": self.held["dtype"] if self.held else None, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "threads": torch.get_num_threads()}


@dataclass(frozen=True)
class HostRef:
    """A stage's handle on one model: the host that holds it and the model every call names."""

    actor: object  # ray.actor.ActorHandle
    model: dict  # ModelSpec fields + the weights' fingerprint + the stage's torch threads on CPUs
    alone: bool = False  # on CPUs, given all the node's CPUs: it computes while the stage's other hosts wait

    def logprobs(self, prompts: list[str], responses: list[str]):
        return self.actor.logprobs.remote(self.model, prompts, responses)

    def generate(self, prompts: list[str], **generation):
        return self.actor.generate.remote(self.model, prompts, **generation)

    def rewards(self, prompts: list[str], responses: list[str]):
        return self.actor.rewards.remote(self.model, prompts, responses)

    def search(self, call: str, session: str, *args, **kwargs):
        """One of the host's `search_<call>` methods (open, sample, append, close) on this model's rows of
        `session` (a search names one session per role: two roles may share a host)."""
        if call == "close":
            return self.actor.search_close.remote(session)
        return getattr(self.actor, f"search_{call}").remote(self.model, session, *args, **kwargs)


class HostPool:
    """At most `max_hosts` model hosts for a whole job, each holding the model a stage last asked it for.

    placement: "PACK" lets Ray place hosts where it likes; "SPREAD" spreads them over the nodes.
    """

    def __init__(self, max_hosts: int = 8, placement: str = "PACK", resources: HostResources = HostResources(),
                 wait_s: float = 900):
        self.max_hosts, self.placement, self.resources, self.wait_s = max_hosts, placement, resources, wait_s
        self._actors: list = []
        self._held: dict[int, dict] = {}  # actor index -> the model it holds (or last loaded)

    def hosts(self, models: dict[str, ModelSpec], alone: tuple[str, ...] = (), turns: bool = False
              ) -> dict[str, HostRef]:
        """A host for every role of `models`, each loaded with its model; roles with the same weights share
        one host, and a model a host already holds stays where it is (no reload). On CPUs the node's CPUs are
        shared as torch threads among the hosts; a role in `alone` computes only while the others wait (a
        search's strong model samples, then its guides score), so its host gets all of them.

        `turns`: the stage can have its hosts take turns (a scoring stage: actors.stages.score_preferences).
        On CPUs they do when its largest model has TURNS_MIN_WEIGHT_BYTES of weights or more: every role is
        then `alone`."""
        wanted = {role: self._described(spec) for role, spec in models.items()}
        if turns and not self.resources.gpus and max(map(_weight_bytes, wanted.values())) >= TURNS_MIN_WEIGHT_BYTES:
            alone = tuple(wanted)
        canonical: dict[tuple, dict] = {}  # one description per distinct model: the one a host holds, if any
        for model in wanted.values():
            held = next((h for h in self._held.values() if _key(h) == _key(model)), None)
            canonical.setdefault(_key(model), held or model)
        if len(canonical) > self.max_hosts:
            raise ValueError(f"a stage needs {len(canonical)} models at once, more than the job's {self.max_hosts} "
                             "model hosts: raise max_hosts")
        placed = {key: i for i, h in self._held.items() for key in canonical if _key(h) == key}
        running = len(self._actors)
        for key, model in canonical.items():
            if key not in placed:
                free = [i for i in range(len(self._actors)) if i not in placed.values()]
                placed[key] = free[0] if free else self._start()
                self._held[placed[key]] = model
        self._wait_placed(range(running, len(self._actors)))  # the hosts started just now
        # load everything at once (hosts work in parallel); a model that cannot load fails here
        # the node's CPUs shared among this stage's hosts that compute at once, named in every call (HostRef)
        sharing = {_key(model) for role, model in wanted.items() if role not in alone}
        shared, solo = self._threads(max(1, len(sharing))), self._threads(1)
        named = {key: {**model, "threads": shared if key in sharing else solo} for key, model in canonical.items()}
        ray.get([self._actors[placed[key]].load.remote(model) for key, model in named.items()])
        on_cpus = not self.resources.gpus
        return {role: HostRef(self._actors[placed[_key(m)]], named[_key(m)], on_cpus and _key(m) not in sharing)
                for role, m in wanted.items()}

    def identity(self, spec: ModelSpec) -> tuple:
        """What makes two specs one model for a host: their weights (by content) and how they are loaded."""
        return _key(self._described(spec))

    def _described(self, spec: ModelSpec) -> dict:
        """The model as hosts are told it: absolute path (their working directory differs) and fingerprint."""
        path = check_model_path(spec.path).resolve()
        return {**spec.model_dump(), "path": str(path), "fingerprint": weights_fingerprint(path)}

    @staticmethod
    def _threads(hosts: int) -> int:
        """Torch threads for each of `hosts` hosts working at once: a node's CPUs shared among them."""
        nodes = max(1, len([n for n in ray.nodes() if n["Alive"]]))
        return max(1, math.floor(ray.cluster_resources().get("CPU", 1) / nodes / hosts))

    def _start(self) -> int:
        """A new host asking for `resources` (its placement is awaited by _wait_placed; each stage then sets its
        threads)."""
        threads = self._threads(self.max_hosts)
        bundle = self.resources.bundle()
        actor = ModelHost.options(num_cpus=0, num_gpus=bundle.pop("GPU", 0), resources=bundle,
                                  scheduling_strategy="SPREAD" if self.placement == "SPREAD" else "DEFAULT"
                                  ).remote(threads)
        self._actors.append(actor)
        return len(self._actors) - 1

    def _wait_placed(self, started: range) -> None:
        """New hosts placed and running (an autoscaler may start nodes for them first), or a clear error."""
        if not started:
            return
        calls = [self._actors[i].where.remote() for i in started]
        _, pending = ray.wait(calls, num_returns=len(calls), timeout=self.wait_s)
        if pending:
            self.shutdown()
            raise unavailable("model hosts", self.resources.bundle(), len(pending), self.wait_s)

    def where(self, refs: dict[str, HostRef] | None = None) -> list[dict]:
        """Where each host runs and what it holds (only those of `refs`, when given)."""
        actors = list({id(r.actor): r.actor for r in refs.values()}.values()) if refs else self._actors
        return ray.get([a.where.remote() for a in actors])

    def shutdown(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._actors, self._held = [], {}


def _weight_bytes(model: dict) -> int:
    return sum(f.stat().st_size for f in Path(model["path"]).glob("*.safetensors"))


def _key(model: dict) -> tuple:
    """What makes two models the same for a host: their weights and how they are loaded (a folder loaded as a
    reward model is another model than the same folder loaded as a causal LM)."""
    return (model["fingerprint"], model["dtype"], model["trust_remote_code"], model.get("task", "causal_lm"))
