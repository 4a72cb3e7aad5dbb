"""Model hosting without Ray: load a causal LM from a local path, per-token log-probs, generation.

Used alike by the Ray actors (layer 3) and by the training workers. Log-probs are taken on
response tokens only and the log-softmax is computed in float32 even when the model runs in bf16.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pydantic import Field

from w2s.config import StrictModel


class ModelLoadError(ValueError):
    """A model or tokenizer path that cannot be used; raised before any expensive work starts."""


class ModelSpec(StrictModel):
    """Where a model lives and how to load it."""

    path: str
    dtype: str = "float32"  # float32 on CPU (bf16 matmuls are hundreds of times slower there); bfloat16 on GPUs
    trust_remote_code: bool = False


class GPTSize(StrictModel):
    """A GPT-2 architecture built from config (the embedded world's models; no pretrained weights)."""

    n_layer: int = Field(ge=1)
    n_embd: int = Field(ge=8)
    n_head: int = Field(ge=1)
    n_positions: int = Field(96, ge=16)


def init_gpt2(size: GPTSize, tokenizer, out: str | Path, seed: int = 0) -> Path:
    """Save a freshly initialised GPT-2 and its tokenizer as a local checkpoint (safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=size.n_positions, n_embd=size.n_embd,
                        n_layer=size.n_layer, n_head=size.n_head, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return Path(out)


def check_model_path(path: str | Path) -> Path:
    """Fail fast, naming the path, when a checkpoint folder is missing a config or tokenizer."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} does not exist or is not a folder")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model path {path} has no config.json: not a transformers checkpoint")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise ModelLoadError(f"model path {path} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return path


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(check_model_path(path)), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelSpec, device: str | torch.device = "cpu"):
    """Load a causal LM and its tokenizer from a local folder (transformers Auto classes, safetensors)."""
    from transformers import AutoModelForCausalLM

    check_model_path(spec.path)
    tokenizer = load_tokenizer(spec.path, spec.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        spec.path, dtype=getattr(torch, spec.dtype), trust_remote_code=spec.trust_remote_code, use_safetensors=True
    )
    model.to(device).eval()
    return model, tokenizer


POSITION_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx")  # what config.json calls the context size


def model_positions(path: str | Path) -> int | None:
    """How many token positions the checkpoint at `path` can take (None when its config does not say)."""
    config = json.loads((check_model_path(path) / "config.json").read_text())
    return next((int(config[f]) for f in POSITION_FIELDS if isinstance(config.get(f), int)), None)


def resolve_max_length(max_length: int | None, positions: dict[str, int | None]) -> int:
    """The one `max_length` of a job: as asked, or the fewest positions of its models when None.
    `positions` maps each model (a path or a name) to what it can take; a `max_length` above any
    of them is refused here, before any work starts."""
    known = {name: n for name, n in positions.items() if n is not None}
    if max_length is None:
        if not known:
            raise ModelLoadError("max_length: none of the models says how many positions it takes "
                                 f"({', '.join(positions)}); set max_length")
        return min(known.values())
    too_small = {name: n for name, n in known.items() if n < max_length}
    if too_small:
        name, n = min(too_small.items(), key=lambda item: item[1])
        raise ModelLoadError(f"max_length {max_length} is more than {name} can take ({n} positions); "
                             f"set max_length to at most {n}, or leave it out to use the models' positions")
    return max_length


def weights_fingerprint(path: str | Path) -> str:
    """A hash of a checkpoint's files (weights, config, tokenizer): a model retrained in place gets a new
    one, so nothing keyed on it is reused stale. Reads every byte: about a second per GB."""
    from w2s.runs import content_hash, file_hash

    path = check_model_path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return content_hash([[str(f.relative_to(path)), file_hash(f)] for f in files])


def same_tokenization(tokenizer_a, tokenizer_b, probes: list[str]) -> bool:
    """True when both tokenizers give the same ids for every probe text (and the same EOS)."""
    if tokenizer_a.eos_token_id != tokenizer_b.eos_token_id:
        return False
    return all(tokenizer_a(t)["input_ids"] == tokenizer_b(t)["input_ids"] for t in probes)


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of plain texts, the one tokenization of the project (the length check, scoring, training,
    generation): no special tokens added, and none read out of the text, so a user's `<eos>` or
    `<|im_end|>` is text, not an end of sequence."""
    return tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]


class TooLongError(ValueError):
    """A row longer than max_length reached scoring or training: rows are checked (w2s.data) first."""


@dataclass
class TokenizedBatch:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T]
    response_mask: torch.Tensor  # [B, T] 1 where the token is a response token (EOS included)


def pair_ids(tokenizer, prompts: list[str], responses: list[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) of each pair: tokenized apart, so the response mask is exact and
    every model that shares the tokenizer sees the same token positions."""
    eos = tokenizer.eos_token_id
    return [(p, r + [eos]) for p, r in zip(encode(tokenizer, prompts), encode(tokenizer, responses), strict=True)]


def tokenize_pairs(tokenizer, prompts: list[str], responses: list[str], max_length: int) -> TokenizedBatch:
    """Prompt + response + EOS, right-padded, with a mask over the response tokens. Never cuts a row:
    one longer than `max_length` raises TooLongError."""
    return pad_pairs(pair_ids(tokenizer, prompts, responses), tokenizer.pad_token_id, max_length)


def pad_pairs(pairs, pad_id: int, max_length: int) -> TokenizedBatch:
    """(prompt ids, response ids + EOS) pairs -> one right-padded batch with its response mask; the
    training workers tokenize their data once and pad each step's rows here."""
    rows, masks = [], []
    for i, (p, r) in enumerate(pairs):
        if len(p) + len(r) > max_length:
            raise TooLongError(f"row {i} of the batch: prompt + response + EOS take {len(p) + len(r)} tokens > "
                               f"max_length {max_length}; check rows (w2s.data.check_batch) before scoring them")
        rows.append(list(p) + list(r))
        masks.append([0] * len(p) + [1] * len(r))
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    response = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    return TokenizedBatch(input_ids, attention, response)


def token_logprobs(model, batch: TokenizedBatch) -> torch.Tensor:
    """log p(token_t | tokens_<t) for every position t >= 1, zero where not a response token.

    Returns [B, T-1] aligned with batch.input_ids[:, 1:] and batch.response_mask[:, 1:].
    Differentiable: the trainers call it on the policy.
    """
    device = next(model.parameters()).device
    ids, attn = batch.input_ids.to(device), batch.attention_mask.to(device)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return logp * batch.response_mask[:, 1:].to(device)


@torch.no_grad()
def response_logprobs(model, tokenizer, prompts: list[str], responses: list[str], max_length: int) -> list:
    """Per-token log-probs of each response (EOS included), one float32 numpy array per response."""
    batch = tokenize_pairs(tokenizer, prompts, responses, max_length)
    logp = token_logprobs(model, batch).cpu()
    mask = batch.response_mask[:, 1:].bool()
    return [row[m].numpy() for row, m in zip(logp, mask)]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, seed: int = 0, max_length: int | None = None) -> list[str]:
    """Generate a response for each prompt (greedy by default), decoded without special tokens.
    `max_length`: the positions the model takes; a prompt with no room for `max_new_tokens` is refused."""
    torch.manual_seed(seed)
    ids = encode(tokenizer, prompts)
    longest = max(map(len, ids))
    if max_length is not None and longest + max_new_tokens > max_length:
        raise TooLongError(f"a prompt of {longest} tokens + max_new_tokens {max_new_tokens} > the model's "
                           f"{max_length} positions; lower max_new_tokens")
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models generate after the last real token
    enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    tokenizer.padding_side = side
    device = next(model.parameters()).device
    kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    if do_sample:
        kwargs.update(temperature=temperature, top_k=top_k or None)
    out = model.generate(**{k: v.to(device) for k, v in enc.items()}, **kwargs)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
