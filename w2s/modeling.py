"""Model hosting without Ray: load a causal LM from a local path, per-token log-probs, generation.

Used alike by the Ray actors (layer 3) and by the training workers. Log-probs are taken on
response tokens only and the log-softmax is computed in float32 even when the model runs in bf16.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
    # left out of dumps when it is the default, so that configs and run folders written before judges existed
    # (every model then a causal LM) read the same
    task: Literal["causal_lm", "sequence_classification", "likelihood_classification"] = Field(
        "causal_lm", exclude_if=lambda task: task == "causal_lm",
        description="causal_lm: a model that generates and is scored per token; sequence_classification: a reward "
                    "(or cost) model, one number per prompt + response (set by the judge's role); "
                    "likelihood_classification: a causal LM read as a classifier (LikelihoodClassifier)")


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


class LlamaSize(StrictModel):
    """A small Llama built from config on a given tokenizer (the real-model track's weak models share SmolLM2's)."""

    n_layer: int = Field(ge=1)
    hidden_size: int = Field(ge=8)
    n_head: int = Field(ge=1)
    intermediate_size: int = Field(ge=8)
    n_positions: int = Field(256, ge=16)


def init_llama(size: LlamaSize, tokenizer, out: str | Path, seed: int = 0) -> Path:
    """Save a freshly initialised Llama (tied embeddings) and `tokenizer` (its chat template too) as a checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=size.hidden_size, num_hidden_layers=size.n_layer,
                         num_attention_heads=size.n_head, num_key_value_heads=size.n_head,
                         intermediate_size=size.intermediate_size, max_position_embeddings=size.n_positions,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
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
    """Load a causal LM (or, for `task: sequence_classification`, a reward model) and its tokenizer from a local
    folder (transformers Auto classes, safetensors)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    check_model_task(spec.path, spec.task)
    tokenizer = load_tokenizer(spec.path, spec.trust_remote_code)
    auto = AutoModelForSequenceClassification if spec.task == "sequence_classification" else AutoModelForCausalLM
    model = auto.from_pretrained(
        spec.path, dtype=getattr(torch, spec.dtype), trust_remote_code=spec.trust_remote_code, use_safetensors=True
    )
    model.to(device).eval()
    return model, tokenizer


def check_model_task(path: str | Path, task: str) -> Path:
    """Fail fast, naming the folder and what its config.json says, when a checkpoint is not what its role needs:
    a reward (or cost) model must be a `...ForSequenceClassification` with one label and a `pad_token_id` (a
    batch is padded with it, and the score is read at the last token that is not padding, as a forward of the
    row alone does); a model that generates must not be a sequence classifier; a likelihood classifier is a
    causal LM with its LIKELIHOOD_HEAD file."""
    path = check_model_path(path)
    config = json.loads((path / "config.json").read_text())
    architectures = config.get("architectures") or []
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    if task == "likelihood_classification" and not (path / LIKELIHOOD_HEAD).is_file():
        raise ModelLoadError(f"likelihood classifier {path}: no {LIKELIHOOD_HEAD} (its scale and bias) beside the "
                             "causal LM")
    if task in ("causal_lm", "likelihood_classification"):
        if classifier:
            raise ModelLoadError(f"model path {path} holds a sequence classifier ({', '.join(architectures)}), "
                                 "not a model that generates: give it as a judge (reward or cost)")
        return path
    if not classifier:
        raise ModelLoadError(f"reward model {path}: expected an AutoModelForSequenceClassification checkpoint "
                             f"with num_labels 1, found architectures {architectures or 'not given'}")
    labels = len(config["id2label"]) if isinstance(config.get("id2label"), dict) else config.get("num_labels", 2)
    if labels != 1:
        raise ModelLoadError(f"reward model {path}: expected num_labels 1 (one score per response), found "
                             f"num_labels {labels}")
    if config.get("pad_token_id") is None:
        raise ModelLoadError(f"reward model {path}: config.json has no pad_token_id; a batch of rows is padded "
                             "with it and the score read at the last token that is not padding: set it (e.g. to "
                             "the tokenizer's pad token id)")
    return path


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


_FINGERPRINTS: dict[tuple, str] = {}  # (folder, its files' names, sizes and modification times) -> fingerprint


def weights_fingerprint(path: str | Path) -> str:
    """A hash of a checkpoint's files (weights, config, tokenizer): a model retrained in place gets a new
    one, so nothing keyed on it is reused stale. Reads every byte (about a second per GB), once per version of
    the files in a process: a job names the same model at many stages."""
    from w2s.runs import content_hash, file_hash

    path = check_model_path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    stamp = (str(path), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if stamp not in _FINGERPRINTS:
        _FINGERPRINTS[stamp] = content_hash([[str(f.relative_to(path)), file_hash(f)] for f in files])
    return _FINGERPRINTS[stamp]


# Texts whose token ids every model must agree on before anything is scored.
TOKENIZER_PROBES = ["Hello, world! 123", "q: zorb color?\na: red.", "  leading spaces and\nnew lines\t."]


class TokenizerMismatchError(ValueError):
    """Models that do not give the same token ids for the same text cannot be compared per token."""


def check_same_tokenizer(models: dict[str, ModelSpec]) -> None:
    """Compare the tokenizers in this process, before any model is loaded."""
    tokenizers = {role: load_tokenizer(spec.path, spec.trust_remote_code) for role, spec in models.items()}
    (first, reference), *others = tokenizers.items()
    for role, tokenizer in others:
        for text in TOKENIZER_PROBES:
            if not same_tokenization(reference, tokenizer, [text]):
                raise TokenizerMismatchError(f"models {first!r} and {role!r} tokenize {text!r} differently; "
                                             "per-token scores need one shared tokenizer")


def same_tokenization(tokenizer_a, tokenizer_b, probes: list[str]) -> bool:
    """True when both tokenizers give the same ids for every probe text (and the same EOS)."""
    if tokenizer_a.eos_token_id != tokenizer_b.eos_token_id:
        return False
    return all(tokenizer_a(t)["input_ids"] == tokenizer_b(t)["input_ids"] for t in probes)


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of plain texts (responses, corpus documents): no special tokens added, and none read out
    of the text, so a user's `<eos>` or `<|im_end|>` in a response is text, not an end of turn."""
    return tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of prompts, the one prompt tokenization of the project (the length check, scoring,
    training, generation). A prompt rendered by a chat template carries the template's control tokens
    (`<|im_start|>`): they are read as the special tokens they are (the data check sets aside chat
    messages whose content holds special-token text). Without a chat template a prompt is plain text,
    read like a response. A tokenizer that puts BOS before every text (Llama-style) gets it here, once,
    where the prompt does not start with it already."""
    bos = bos_prefix(tokenizer)
    plain = not getattr(tokenizer, "chat_template", None)
    ids = tokenizer(list(prompts), add_special_tokens=False, split_special_tokens=plain)["input_ids"]
    return [bos + row if bos and row[:1] != bos else row for row in ids]


def bos_prefix(tokenizer) -> list[int]:
    """[BOS] when the tokenizer's own default encoding starts a text with it, else []."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def end_of_turn_id(tokenizer) -> int:
    """The token that ends a response: the one a chat template writes after an assistant turn
    (`<|im_end|>`), or EOS for a tokenizer without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer.eos_token_id
    mark = "w2s-end-of-turn-probe"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "a"},
                                              {"role": "assistant", "content": mark}], tokenize=False)
    after = tokenizer(rendered[rendered.rindex(mark) + len(mark):], add_special_tokens=False)["input_ids"]
    return after[0] if after and after[0] in control_tokens(tokenizer).values() else tokenizer.eos_token_id


def control_tokens(tokenizer) -> dict[str, int]:
    """The special tokens a prompt's text is read for (text -> id): EOS, BOS, a chat template's turn markers."""
    added = {t.content: i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    return {**added, **dict(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids))}


class TooLongError(ValueError):
    """A row longer than max_length reached scoring or training: rows are checked (w2s.data) first."""


@dataclass
class TokenizedBatch:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T]
    response_mask: torch.Tensor  # [B, T] 1 where the token is a response token (end of turn included)


def pair_ids(tokenizer, prompts: list[str], responses: list[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + end of turn) of each pair: tokenized apart, so the response mask is
    exact and every model that shares the tokenizer sees the same token positions."""
    end = end_of_turn_id(tokenizer)
    return [(p, r + [end]) for p, r in zip(encode_prompts(tokenizer, prompts), encode(tokenizer, responses),
                                           strict=True)]


def tokenize_pairs(tokenizer, prompts: list[str], responses: list[str], max_length: int) -> TokenizedBatch:
    """Prompt + response + end of turn, right-padded, with a mask over the response tokens. Never cuts a row:
    one longer than `max_length` raises TooLongError."""
    return pad_pairs(pair_ids(tokenizer, prompts, responses), tokenizer.pad_token_id, max_length)


def pad_pairs(pairs, pad_id: int, max_length: int) -> TokenizedBatch:
    """(prompt ids, response ids + end of turn) pairs -> one right-padded batch with its response mask; the
    training workers tokenize their data once and pad each step's rows here."""
    rows, masks = [], []
    for i, (p, r) in enumerate(pairs):
        if len(p) + len(r) > max_length:
            raise TooLongError(f"row {i} of the batch: prompt + response + end of turn take {len(p) + len(r)} "
                               f"tokens > max_length {max_length}; check rows (w2s.data.check_batch) before "
                               "scoring them")
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
    response = batch.response_mask[:, 1:].to(device)
    if not _keeps_logits_by_mask(model):
        logp = selective_log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1], ids[:, 1:])
        return logp * response
    # Logits only where a response token is predicted (position t predicts token t + 1): the output layer is
    # most of a small model's cost on a large vocabulary, and prompts are most of the tokens.
    wanted = response.bool()
    keep = torch.nn.functional.pad(wanted, (0, 1))
    logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits  # [response tokens, V]
    picked = selective_log_softmax(logits.unsqueeze(1), ids[:, 1:][wanted].unsqueeze(1)).squeeze(1)
    return torch.zeros(wanted.shape, dtype=picked.dtype, device=device).masked_scatter(wanted, picked)


def _keeps_logits_by_mask(model) -> bool:
    """Whether the model (under its DeepSpeed / peft wrappers) computes logits only at the positions of a boolean
    `logits_to_keep` mask: transformers models whose forward slices with `slice_logits_to_keep`."""
    model = getattr(model, "module", model)  # the DeepSpeed engine
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return _class_keeps_logits_by_mask(type(model))


@functools.cache
def _class_keeps_logits_by_mask(model_class: type) -> bool:
    """Once per model class: token_logprobs asks for every micro-batch."""
    import inspect
    import sys

    module = sys.modules.get(model_class.__module__)
    return (hasattr(module, "slice_logits_to_keep")
            and "logits_to_keep" in inspect.signature(model_class.forward).parameters)


LOG_SOFTMAX_CHUNK = 2**25  # float32 logits converted at a time (128 MiB): a few rows of a 150k vocabulary


def selective_log_softmax(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., target] in float32, without the full [B, T, V] float32 log-softmax: a few
    rows at a time (on a 150k vocabulary the full one is gigabytes per batch; this holds one chunk).
    Each chunk takes the same row-wise log-softmax as the whole batch would, so the numbers are those of
    the unchunked computation bit for bit (the target's logit minus logsumexp rounds differently)."""
    rows = max(1, LOG_SOFTMAX_CHUNK // max(1, logits.shape[1] * logits.shape[2]))
    out = [torch.log_softmax(chunk.float(), dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
           for chunk, index in zip(logits.split(rows), targets.split(rows))]
    return torch.cat(out)


LENGTH_SPREAD = 1.25  # a forward pass's longest row at most this times its shortest, once it has MIN_RUN_ROWS rows
MIN_RUN_ROWS = 8


def scoring_runs(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """The rows of one call grouped into forward passes: sorted by length, a pass ends where its padded size
    (rows x longest) would pass `max_tokens`, so that a call of long rows never materialises [rows, T, vocab]
    logits at once, or where a row is over LENGTH_SPREAD times the pass's shortest: rows of like length share a
    pass, so little of it is padding (a batch of the world's pairs in their own order is 37% padding). A row
    longer than the budget goes alone."""
    runs, run = [], []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        n = lengths[i]  # the longest of the pass so far: rows come shortest first
        if run and (n * (len(run) + 1) > max_tokens
                    or (len(run) >= MIN_RUN_ROWS and n > LENGTH_SPREAD * lengths[run[0]])):
            runs.append(run)
            run = []
        run.append(i)
    return runs + [run] if run else runs


DEFAULT_TOKENS_PER_CALL = 16384  # padded tokens per forward pass of a host call


@torch.no_grad()
def response_logprobs(model, tokenizer, prompts: list[str], responses: list[str], max_length: int,
                      max_tokens: int = DEFAULT_TOKENS_PER_CALL) -> list:
    """Per-token log-probs of each response (end of turn included), one float32 numpy array per response;
    forward passes of rows of like length, at most `max_tokens` padded tokens each (scoring_runs)."""
    pairs = pair_ids(tokenizer, prompts, responses)
    out = [None] * len(pairs)
    for run in scoring_runs([len(p) + len(r) for p, r in pairs], max_tokens):
        batch = pad_pairs([pairs[i] for i in run], tokenizer.pad_token_id, max_length)
        logp = token_logprobs(model, batch).cpu()
        for i, row, mask in zip(run, logp, batch.response_mask[:, 1:].bool()):
            out[i] = row[mask].numpy()
    return out


@torch.no_grad()
def sequence_rewards(model, tokenizer, prompts: list[str], responses: list[str], max_length: int,
                     max_tokens: int = DEFAULT_TOKENS_PER_CALL) -> list[float]:
    """One score per prompt + response (end of turn included, tokenized by pair_ids) from a sequence
    classifier with one label, in forward passes of rows of like length (scoring_runs).

    Rows are right-padded with the model's own `config.pad_token_id`: transformers reads the score at the
    rightmost token that is not that id, so a padded row gives the score of the same row alone (its real
    tokens keep their positions, and causal attention never looks at the padding after them). Where the pad
    id is the end of turn too (SmolLM2's tokenizer pads with `<|im_end|>`), that is the last response token,
    as for the row alone."""
    pairs = pair_ids(tokenizer, prompts, responses)
    pad = model.config.pad_token_id
    out = [0.0] * len(pairs)
    device = next(model.parameters()).device
    for run in scoring_runs([len(p) + len(r) for p, r in pairs], max_tokens):
        batch = pad_pairs([pairs[i] for i in run], pad, max_length)
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
        for i, score in zip(run, logits[:, 0].float().cpu().tolist()):
            out[i] = score
    return out


LIKELIHOOD_HEAD = "likelihood_head.json"  # beside a causal LM read as a classifier: {"scale": .., "bias": ..}


class LikelihoodClassifier(torch.nn.Module):
    """A causal LM read as a one-logit classifier of a prompt + response:

        logit = scale x (sum over the response's tokens, end of turn included, of log p(token | before it)) + bias

    What the LM knows is its feature: a response it finds likely (a fact it has memorised) scores high, one that
    surprises it low. A new linear head on the last token of these small models reads nothing of the kind (it
    stays at chance on held-out facts the LM answers right), so weak-to-strong generalization on knowledge needs
    the LM itself as the classifier, as the paper's generative finetuning does. Every weight trains, the LM's and
    the two scalars; the saved model is the LM (any job can load it) and LIKELIHOOD_HEAD."""

    def __init__(self, lm, scale: float = 1.0, bias: float = 0.0):
        super().__init__()
        self.lm = lm
        # one-element vectors, not 0-d scalars: ZeRO-3 partitions every parameter as a flat buffer
        self.scale = torch.nn.Parameter(torch.tensor([float(scale)]))
        self.bias = torch.nn.Parameter(torch.tensor([float(bias)]))

    @property
    def config(self):  # the LM's (what the trainer reads of a model: its sizes)
        return self.lm.config

    def forward(self, batch: TokenizedBatch) -> torch.Tensor:
        return self.scale * token_logprobs(self.lm, batch).sum(-1) + self.bias


def read_likelihood_head(path: str | Path) -> dict[str, float] | None:
    """{scale, bias} of the likelihood classifier at `path`, None when the folder holds none."""
    file = Path(path) / LIKELIHOOD_HEAD
    return {k: float(v) for k, v in json.loads(file.read_text()).items()} if file.is_file() else None


def classifier_task(path: str | Path) -> str:
    """The ModelSpec task of a trained classifier folder: a likelihood classifier, or a sequence classifier."""
    return "likelihood_classification" if (Path(path) / LIKELIHOOD_HEAD).is_file() else "sequence_classification"


def likelihood_rewards(model, tokenizer, prompts: list[str], responses: list[str], max_length: int,
                       head: dict[str, float]) -> list[float]:
    """The logits of a likelihood classifier (LikelihoodClassifier, a causal LM with its `head`) for each row."""
    return [head["scale"] * float(row.sum(dtype="float64")) + head["bias"]
            for row in response_logprobs(model, tokenizer, prompts, responses, max_length)]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, seed: int = 0, max_length: int | None = None) -> list[str]:
    """Generate a response for each prompt (greedy by default) until its end of turn, decoded without
    special tokens. Prompts are left-padded into one batch (a test checks that this equals one prompt at
    a time). `max_length`: the positions the model takes; a prompt with no room for `max_new_tokens` is
    refused, never cut."""
    torch.manual_seed(seed)
    ids = encode_prompts(tokenizer, prompts)
    longest = max(map(len, ids))
    if max_length is not None and longest + max_new_tokens > max_length:
        raise TooLongError(f"a prompt of {longest} tokens + max_new_tokens {max_new_tokens} > the model's "
                           f"{max_length} positions; lower max_new_tokens")
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models generate after the last real token
    enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    tokenizer.padding_side = side
    device = next(model.parameters()).device
    ends = list(dict.fromkeys([end_of_turn_id(tokenizer), tokenizer.eos_token_id]))
    # use_cache: a trained model's config may say otherwise (training turns the cache off)
    kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=ends, use_cache=True)
    if do_sample:
        kwargs.update(temperature=temperature, top_k=top_k or None)
    out = model.generate(**{k: v.to(device) for k, v in enc.items()}, **kwargs)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
