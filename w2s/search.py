"""Weak-to-strong search (ALGORITHMS.md section 2): chunk-level beam search (CBS), without Ray or torch.

The strong model proposes text a chunk at a time; a small tuned/untuned pair scores every candidate by the
sum, over its response tokens, of log pi_tuned - log pi_untuned. For each prompt:

    W*K copies of the prompt
    repeat:  sample a chunk of L tokens for every row (the strong model; finished rows stay as they are)
             score every row (the guides); keep the top W; give each K children (copies)
    until every row has finished or max_new_tokens are reached; return the best of the final pool.

As in the official code, a kept candidate that has finished is copied K times like any other (it stays in the
pool, and its copies do not grow), and at the end every candidate is scored as a complete response: the end of
turn is appended to those that max_new_tokens cut. W=1, K=N, L=None (no chunking) is Best-of-N; W=K=1, L=None
is plain sampling. `chunk_beam_search` runs the loop for many prompts at once over two callables, so that each
step is one batched call of the strong model and one of each guide, for every prompt in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
from pydantic import Field, model_validator

from w2s.config import StrictModel


class Sampling(StrictModel):
    """How the strong model samples (the paper's defaults: top-k 50, temperature 0.7)."""

    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.7, gt=0)
    top_k: int = Field(50, ge=0, description="0: the whole vocabulary")


class BeamShape(StrictModel):
    """W candidates kept, K children each, chunks of L tokens (None: one chunk of max_new_tokens)."""

    w: int = Field(4, ge=1, description="beam width: candidates kept after each chunk")
    k: int = Field(4, ge=1, description="successors sampled from each kept candidate")
    l: int | None = Field(5, ge=1, description="chunk length in strong-model tokens; None: no chunking")

    @model_validator(mode="after")
    def _check(self):
        if self.w * self.k > 1024:
            raise ValueError(f"w * k = {self.w * self.k} rows per prompt: at most 1024")
        return self

    @classmethod
    def best_of_n(cls, n: int) -> "BeamShape":
        return cls(w=1, k=n, l=None)

    @classmethod
    def sampling(cls) -> "BeamShape":
        return cls(w=1, k=1, l=None)


@dataclass
class Chunk:
    """What the strong model added to every row in one step (rows in prompt-major order)."""

    tokens: list[list[int]]  # the new tokens of each row (empty for a row that had finished)
    finished: np.ndarray  # bool per row: the row has ended (its end of turn sampled, in this chunk or before)


class Propose(Protocol):
    def __call__(self, parents: np.ndarray | None, n_tokens: int) -> Chunk:
        """Reorder the rows by `parents` (None: as they are), then sample up to `n_tokens` for each unfinished one."""


class Score(Protocol):
    def __call__(self, parents: np.ndarray | None, chunk: Chunk, rows: list[list[int]], complete: np.ndarray,
                 previous: np.ndarray) -> np.ndarray:
        """Each row's summed log-ratio after `chunk` (rows reordered by `parents` first). `rows`: every row's
        response tokens so far; `complete`: rows to score as whole responses (end of turn included, appended where
        it was not sampled); `previous`: the score of each row's parent (for scorers that only add the chunk)."""


@dataclass
class Found:
    """The best response of one prompt, its score and what finding it cost."""

    tokens: list[int]
    score: float
    finished: bool  # False: max_new_tokens cut it
    strong_tokens: int  # strong-model tokens sampled for this prompt, over every row and chunk


def select_parents(scores: np.ndarray, n_prompts: int, w: int, k: int) -> np.ndarray:
    """For each prompt's block of W*K rows, the indices of its W best rows, the whole list repeated K times
    (row j of the block gets parent number j mod W): the next step's rows. Ties go to the lower index."""
    n = w * k
    parents = []
    for p in range(n_prompts):
        block = scores[p * n:(p + 1) * n]
        best = np.argsort(-block, kind="stable")[:w] + p * n
        parents.append(np.tile(best, k))
    return np.concatenate(parents)


def chunk_beam_search(n_prompts: int, shape: BeamShape, max_new_tokens: int, propose: Propose,
                      score: Score, progress: Callable[[int], None] | None = None) -> list[Found]:
    """CBS for `n_prompts` prompts at once, W*K rows each (prompt-major); see the module docstring."""
    n = shape.w * shape.k
    chunk_length = shape.l or max_new_tokens
    rows: list[list[int]] = [[] for _ in range(n_prompts * n)]
    finished = np.zeros(n_prompts * n, dtype=bool)
    scores = np.zeros(n_prompts * n)
    sampled = np.zeros(n_prompts, dtype=np.int64)
    parents, generated = None, 0
    while True:
        step = min(chunk_length, max_new_tokens - generated)
        chunk = propose(parents, step)
        if parents is not None:
            rows, scores = [rows[i] for i in parents], scores[parents]
        rows = [row + new for row, new in zip(rows, chunk.tokens)]
        sampled += np.array([len(t) for t in chunk.tokens]).reshape(n_prompts, n).sum(axis=1)
        finished, generated = chunk.finished.copy(), generated + step
        last = bool(finished.all()) or generated >= max_new_tokens
        scores = score(parents, chunk, rows, finished | last, scores)
        if progress:
            progress(generated)
        if last:
            break
        parents = select_parents(scores, n_prompts, shape.w, shape.k)
    found = []
    for p in range(n_prompts):
        best = p * n + int(np.argsort(-scores[p * n:(p + 1) * n], kind="stable")[0])
        found.append(Found(rows[best], float(scores[best]), bool(finished[best]), int(sampled[p])))
    return found
