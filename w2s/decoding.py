"""Chunk proposals and incremental scoring for search (layer 2: torch and transformers, no Ray).

`DecodeRows` holds a batch of growing rows of one causal LM with its KV cache: each prompt copied into a
block of rows, then, chunk after chunk, rows reordered (a beam search keeps some and copies them), tokens
sampled (the strong model) or appended and scored (the guides). Each call computes only the new tokens;
the prefix is in the cache. All rows share one time axis: a row that has ended gets padding, masked out of
attention, and the position ids count real tokens only, so a row's numbers are those of the row alone.

Sampling is that of `transformers` `generate` (float32 logits, temperature, then top-k, softmax,
`torch.multinomial`), with one random generator per prompt, seeded by the caller: the block of a prompt
samples what `generate` gives for that many copies of the prompt after `torch.manual_seed(seed)`, whatever
other prompts share the batch.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import StaticCache

from w2s.modeling import TooLongError, encode_prompts, end_of_turn_id, selective_log_softmax


class DecodeRows:
    """`copies` rows per prompt (prompt-major), left-padded, with the model's KV cache."""

    @torch.no_grad()
    def __init__(self, model, tokenizer, prompts: list[str], copies: int, seeds: list[int], room: int,
                 positions: int):
        ids = encode_prompts(tokenizer, prompts)
        longest = max(map(len, ids))
        if longest + room > positions:
            raise TooLongError(f"a prompt of {longest} tokens + {room} new tokens > the model's {positions} "
                               "positions; lower max_new_tokens")
        self.model, self.copies = model, copies
        self.pad, self.device = tokenizer.pad_token_id, next(model.parameters()).device
        self.end_ids = sorted({end_of_turn_id(tokenizer), tokenizer.eos_token_id})
        self.ends = torch.tensor(self.end_ids, device=self.device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        # every row is a copy of its prompt from the start: one time axis, one preallocated cache (a growing
        # cache copies itself at every token: measured, the larger part of a chunk's time)
        padded = [[self.pad] * (longest - len(row)) + row for row in ids for _ in range(copies)]
        mask = [[0] * (longest - len(row)) + [1] * len(row) for row in ids for _ in range(copies)]
        ids_t, mask_t = torch.tensor(padded, device=self.device), torch.tensor(mask, device=self.device)
        self.mask = torch.empty(len(padded), 0, dtype=torch.long, device=self.device)
        self.cache = StaticCache(config=model.config, max_cache_len=longest + room)
        self.next_logits = self._forward(ids_t, mask_t, last_only=True)[:, -1]
        self.finished = torch.zeros(len(padded), dtype=torch.bool, device=self.device)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Append `ids` (with their `mask`) to every row; float32 logits of the new positions (`last_only`: of the
        last one: a prompt's [rows, tokens, vocabulary] logits are gigabytes on a 49k vocabulary)."""
        past = self.mask.shape[1]
        self.mask = torch.cat([self.mask, mask], dim=1)
        positions = (self.mask.cumsum(1) - 1).clamp(min=0)[:, past:]
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, past_key_values=self.cache,
                         cache_position=torch.arange(past, self.mask.shape[1], device=self.device), use_cache=True,
                         logits_to_keep=1 if last_only else 0)
        return out.logits.float()

    def select(self, parents: np.ndarray | None) -> None:
        """Keep the rows `parents` names, in that order (a row named twice is copied)."""
        if parents is None:
            return
        index = torch.tensor(np.asarray(parents), device=self.device)
        self.cache.reorder_cache(index)
        self.mask, self.next_logits, self.finished = self.mask[index], self.next_logits[index], self.finished[index]

    @torch.no_grad()
    def sample(self, n_tokens: int, temperature: float, top_k: int,
               bias: torch.Tensor | None = None) -> list[list[int]]:
        """Up to `n_tokens` new tokens for every unfinished row (a row stops after its end of turn); `bias`: added
        to the float32 logits of the first step's (EFT's guidance, one token at a time)."""
        new = []
        for step in range(n_tokens):
            if self.finished.all():
                break
            logits = self.next_logits + (bias.to(self.device) if bias is not None and step == 0 else 0)
            logits = logits / temperature
            if top_k and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            blocks = probs.split(self.copies)
            token = torch.cat([torch.multinomial(b, 1, generator=g) for b, g in zip(blocks, self.generators)])[:, 0]
            live = ~self.finished
            token = torch.where(live, token, torch.full_like(token, self.pad))
            new.append((token, live))
            self.finished = self.finished | torch.isin(token, self.ends) & live
            self.next_logits = self._forward(token[:, None], live[:, None].long(), last_only=True)[:, -1]
        return _rows(new, len(self.finished))

    @torch.no_grad()
    def append(self, tokens: list[list[int]]) -> np.ndarray:
        """Add each row's `tokens` (rows of other lengths are padded); the summed log-prob of each row's new tokens."""
        width = max(map(len, tokens), default=0)
        if width == 0:
            return np.zeros(len(tokens))
        ids = torch.tensor([t + [self.pad] * (width - len(t)) for t in tokens], device=self.device)
        real = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tokens], device=self.device)
        logits = self._forward(ids, real)
        before = torch.cat([self.next_logits[:, None], logits[:, :-1]], dim=1)  # what predicts each new token
        logp = selective_log_softmax(before, ids) * real
        # the next prediction of a row is at its last real token (a row that ended has no next one)
        last = (real.sum(1) - 1).clamp(min=0)
        has_new = real.sum(1) > 0
        self.next_logits = torch.where(has_new[:, None], logits[torch.arange(len(tokens)), last], self.next_logits)
        self.finished |= torch.tensor([bool(t) and t[-1] in self.end_ids for t in tokens], device=self.device)
        return logp.sum(1).double().cpu().numpy()

    def next_logprobs(self) -> torch.Tensor:
        """log p(next token) of every row over the whole vocabulary, float32."""
        return torch.log_softmax(self.next_logits, dim=-1)


def _rows(steps: list[tuple[torch.Tensor, torch.Tensor]], n_rows: int) -> list[list[int]]:
    """Per-step (token, sampled) pairs -> each row's list of sampled tokens."""
    if not steps:
        return [[] for _ in range(n_rows)]
    tokens = torch.stack([t for t, _ in steps], 1).cpu().tolist()
    live = torch.stack([m for _, m in steps], 1).cpu().tolist()
    return [[t for t, m in zip(row, keep) if m] for row, keep in zip(tokens, live)]
