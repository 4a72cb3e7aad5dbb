"""Weak-to-strong search on model hosts: CBS (with Best-of-N and sampling as its special cases) and EFT.

    strong host  (w2s.decoding.DecodeRows: rows + KV cache)  -- samples a chunk for every row of a batch
    tuned host   (same, its own rows)                          -- appends the chunk, returns its log-probs
    untuned host (same)                                        -- in parallel with the tuned one

Each step of `w2s.search.chunk_beam_search` is one call per host for every prompt of the batch, and carries the
previous step's selection (the rows each host keeps and copies). Scoring is incremental where the guides share
the strong model's tokenizer (only the new chunk goes through the guides; the rest is in their KV cache), and
otherwise, or with `scoring: full`, re-scores every row's decoded text from the start (the official loop's way).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import ray

from actors.model_host import HostRef
from w2s.search import BeamShape, Chunk, Found, Sampling, chunk_beam_search

Scoring = Literal["incremental", "full"]
ROLES = ("strong", "tuned", "untuned")
ALONE = ("strong",)  # it samples while the guides wait, and they score while it waits: its host takes every CPU
_searches = itertools.count()


@dataclass
class Guides:
    """The strong model's host and its guiding pair's, and what the driver needs to read their tokens."""

    hosts: dict[str, HostRef]  # ROLES -> host
    tokenizer: object  # the strong model's: its tokens are decoded to text with it
    end_of_turn: int  # the token appended to a response that max_new_tokens cut, before it is scored
    shared_tokenizer: bool  # the guides read the strong model's token ids as they are

    def call(self, roles: tuple[str, ...], method: str, session: str, *args, **kwargs) -> list:
        """`method` on the rows of `session` of every role in `roles`, at once; their results in that order
        (each role has its own rows: two roles may share a host)."""
        return ray.get([self.hosts[r].search(method, f"{session}/{r}", *args, **kwargs) for r in roles])


def search_batch(guides: Guides, prompts: list[str], seeds: list[int], shape: BeamShape, sampling: Sampling,
                 scoring: Scoring = "incremental") -> list[Found]:
    """CBS for a batch of prompts (one seed each), every model call batched over all of them."""
    if scoring == "incremental" and not guides.shared_tokenizer:
        raise ValueError("incremental scoring needs guides that share the strong model's tokenizer: use scoring: full")
    session, copies = f"search-{next(_searches)}", shape.w * shape.k
    roles = ROLES if scoring == "incremental" else ROLES[:1]
    guides.call(roles, "open", session, prompts, copies, seeds, sampling.max_new_tokens + 1)
    prompt_rows = [p for p in prompts for _ in range(copies)]

    def propose(parents, n_tokens) -> Chunk:
        [(tokens, finished)] = guides.call(("strong",), "sample", session, parents, n_tokens, sampling.temperature,
                                           sampling.top_k)
        return Chunk(tokens, finished)

    def incremental(parents, chunk: Chunk, rows, complete, previous) -> np.ndarray:
        # a complete row that did not sample its end of turn (cut by max_new_tokens) gets it now
        new = [t + [guides.end_of_turn] if c and not f else t for t, c, f in zip(chunk.tokens, complete, chunk.finished)]
        tuned, untuned = guides.call(ROLES[1:], "append", session, parents, new)
        return previous + tuned - untuned

    def full(parents, chunk: Chunk, rows, complete, previous) -> np.ndarray:
        texts = guides.tokenizer.batch_decode(rows, skip_special_tokens=True)
        tuned, untuned = ray.get([guides.hosts[r].logprobs(prompt_rows, texts) for r in ROLES[1:]])
        # the hosts append the end of turn to every response: it counts only for a complete one
        return np.array([_summed(a, c) - _summed(b, c) for a, b, c in zip(tuned.to_numpy(zero_copy_only=False),
                                                                            untuned.to_numpy(zero_copy_only=False),
                                                                            complete)])

    try:
        return chunk_beam_search(len(prompts), shape, sampling.max_new_tokens, propose,
                                 incremental if scoring == "incremental" else full)
    finally:
        guides.call(roles, "close", session)


def _summed(logps: np.ndarray, complete: bool) -> float:
    return float(np.sum(logps if complete else logps[:-1], dtype=np.float64))


def eft_batch(guides: Guides, prompts: list[str], seeds: list[int], sampling: Sampling, beta: float) -> list[Found]:
    """Emulated fine-tuning: each token sampled from strong logits + beta * (log pi_tuned - log pi_untuned) over the
    whole vocabulary (the guides' log-softmax: their logits' difference up to a constant per row, so the same
    distribution), a token at a time. Same vocabulary only (checked by the caller)."""
    session, room = f"eft-{next(_searches)}", sampling.max_new_tokens + 1
    tuned, untuned = guides.call(ROLES[1:], "open", session, prompts, 1, seeds, room, want_next=True)
    guides.call(ROLES[:1], "open", session, prompts, 1, seeds, room)
    rows: list[list[int]] = [[] for _ in prompts]
    finished = np.zeros(len(prompts), dtype=bool)
    try:
        for _ in range(sampling.max_new_tokens):
            [(tokens, finished)] = guides.call(("strong",), "sample", session, None, 1, sampling.temperature,
                                               sampling.top_k, bias=beta * (tuned - untuned))
            rows = [row + t for row, t in zip(rows, tokens)]
            if finished.all():
                break
            (_, tuned), (_, untuned) = guides.call(ROLES[1:], "append", session, None, tokens, want_next=True)
    finally:
        guides.call(ROLES, "close", session)
    return [Found(row, float("nan"), bool(f), len(row)) for row, f in zip(rows, finished)]
