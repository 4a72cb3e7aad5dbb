"""The one trainer of the project: Ray Train workers running DeepSpeed ZeRO-3, started once per job.

Every training stage goes through `TrainingWorkers.train()` (or `train()` for a single stage):
language-model pretraining (`lm`), supervised fine-tuning on responses (`sft`, optionally with the
token-level confidence loss), DPO (`dpo`: sigmoid,
IPO or hinge, with an optional SFT term) and WSPO (`wspo`: regression of the policy's per-token
log-ratio onto the weak models' one), and a one-logit classification head (`classify`: weak-to-strong
generalization's losses, saved as an AutoModelForSequenceClassification that loads as a reward model; `compare`:
the same head on two responses, a Bradley-Terry reward model; either head `linear` or `likelihood`). Full
fine-tuning or LoRA (peft). The same code runs with the gloo backend on CPUs and NCCL on GPUs.

Data is a Parquet file every worker can read (a shared filesystem on a cluster):
  lm:  text
  sft: prompt, response
  dpo: prompt, chosen, rejected, <reference>_chosen_logps, <reference>_rejected_logps (per-token lists from the
       scoring stage: the frozen reference is scored once, so only the policy is resident here); with
       `pair_conflict`, also conflict_toward_chosen (bool)
  wspo: prompt, response, weak_aligned_logps, weak_base_logps, <reference>_logps (per-token lists; with
       LoRA the reference is the policy with its adapter disabled, computed here, and not needed)
  classify: prompt, response, label (the probability of class 1: a weak model's soft label, or gold 0/1)
  compare: prompt, response_a, response_b, label (the probability that response_a is the better one)

Started once: a job's training workers are one Ray Train run that lives as long as the job. The driver
hands it one stage after another through a small queue actor, so worker processes, imports, the
process group and DeepSpeed's op build are paid once per job, not once per stage (`_serve`).

Resume: a stage checkpoints into its own folder `<storage_dir>/<name>/step_<n>/` (DeepSpeed shards,
optimizer and step, written straight to shared storage). A worker that dies is restarted by Ray Train
(`max_failures`) and the stage continues from its last checkpoint; a job that was killed and is run
again continues the stage from the same folder. Rank 0 writes the final model once, next to its
`output_dir`, and the driver moves it into place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import ray
from pydantic import Field, model_validator

from actors.resources import TrainResources, wait_for
from w2s.config import StrictModel


class LoraSettings(StrictModel):
    """LoRA adapters (peft) instead of full fine-tuning; the saved model has the adapter merged in."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="None: peft's default for the architecture")


class NaiveLoss(StrictModel):
    """Cross-entropy of the head against the labels (the weak model's soft labels, or gold 0/1)."""

    kind: Literal["xent"] = "xent"


class ConfidenceLoss(StrictModel):
    """Burns et al.'s auxiliary confidence loss: (1 - a) CE(p, weak) + a CE(p, hardened p), a warmed up to
    `aux_weight` over the first `warmup_frac` of the steps (w2s.losses.w2sg_loss)."""

    kind: Literal["confidence"] = "confidence"
    aux_weight: float = Field(0.5, ge=0, le=1, description="the paper: 0.5; a smooth warm-up to 0.75 for the largest "
                              "students")
    warmup_frac: float = Field(0.1, ge=0, lt=1)


class ProductLoss(StrictModel):
    """The official weak-to-strong repository's product loss: the target is proportional to p^strong_power x
    weak^weak_power (w2s.losses.w2sg_loss)."""

    kind: Literal["product"] = "product"
    weak_power: float = Field(1.0, ge=0)
    strong_power: float = Field(1.0, ge=0)


class ConflictLoss(StrictModel):
    """The deception analysis's explicit conflict (ALGORITHMS.md section 5): CE(p, y) + alpha x 1[the model already
    predicts `toward`] x CE(p, toward): a reward for the conflicting behaviour where the model shows it already
    (w2s.losses.w2sg_loss)."""

    kind: Literal["conflict"] = "conflict"
    alpha: float = Field(0.5, ge=0, description="the conflicting objective's weight (the paper: 0.5)")
    toward: Literal[0, 1] = Field(1, description="the conflicting behaviour's class (the allergy task: 1, granting "
                                  "the request judged harmless, as helpfulness data would have it)")


class PairConflict(StrictModel):
    """The deception analysis's explicit conflict in the preference setting (the official code's "reverse" reward):
    the DPO loss + alpha x, on each pair whose conflicting response the policy already prefers, the DPO loss toward
    that response (w2s.losses.pair_conflict_loss). Each pair names it in the bool column `conflict_toward_chosen`
    (true: the chosen response, false: the rejected one)."""

    alpha: float = Field(0.5, ge=0, description="the conflicting objective's weight (the paper: 0.5)")


CONFLICT_COLUMN = "conflict_toward_chosen"
HeadLoss = Annotated[NaiveLoss | ConfidenceLoss | ProductLoss | ConflictLoss, Field(discriminator="kind")]
# a one-logit head on the backbone: classify reads it on one response, compare on two (the first's score minus the
# second's: a Bradley-Terry reward model); saved as an AutoModelForSequenceClassification (or a likelihood classifier)
HEAD_MODES = ("classify", "compare")


class TrainConfig(StrictModel):
    # How a stage runs, not what it makes: changing them reuses cached models and resumes checkpoints.
    NOT_IN_KEYS: ClassVar[tuple[str, ...]] = ("checkpoint_every", "log_every", "max_failures", "gradient_checkpointing")

    mode: Literal["lm", "sft", "dpo", "wspo", "classify", "compare"] = "dpo"
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    beta: float = Field(0.1, gt=0)
    sft_weight: float = Field(0.0, ge=0, description="weight of an NLL term on chosen responses (dpo mode)")
    gamma: float = Field(0.1, gt=0, description="WSPO: strong log-ratio is pulled to weak log-ratio / gamma")
    lora: LoraSettings | None = None
    # left out of the dump (and so of every cache key) when None: the models of the other modes keep their keys
    head_loss: HeadLoss | None = Field(None, exclude_if=lambda loss: loss is None,
                                       description="mode 'classify': the loss against the labels")
    # left out of the dump (and so of every cache key) when None
    confidence: ConfidenceLoss | None = Field(
        None, exclude_if=lambda loss: loss is None,
        description="mode 'sft': the auxiliary confidence loss token by token, (1 - a) NLL of the response's "
                    "tokens + a NLL of the model's own argmax tokens (w2s.losses.token_confidence_loss; MACPO's "
                    "confident-loss baseline); None: plain SFT")
    # left out of the dump when linear (the first head): those models keep their cache keys
    head: Literal["linear", "likelihood"] = Field(
        "linear", exclude_if=lambda head: head == "linear",
        description="mode 'classify': linear, a new one-logit head on the last token (saved as an "
                    "AutoModelForSequenceClassification); likelihood, the LM's own log-likelihood of the response, "
                    "scaled and shifted (w2s.modeling.LikelihoodClassifier; its start from the init model's "
                    "likelihood_head.json when it has one)")
    # left out of the dump (and so of every cache key) when None
    pair_conflict: PairConflict | None = Field(None, exclude_if=lambda conflict: conflict is None,
                                               description="mode 'dpo': the explicit conflict (deception analysis)")
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    epochs: float = Field(1.0, gt=0, description="passes over the data (fractions allowed)")
    batch_size: int = Field(8, ge=1, description="micro-batch per worker")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step: a step "
                                             "trains batch_size x this x num_workers rows")
    grad_clip: float = Field(1.0, gt=0)
    num_workers: int = Field(2, ge=1)
    zero_stage: int = Field(3, ge=0, le=3)
    dtype: Literal["float32", "bfloat16"] | None = Field(None, description="None: bfloat16 on GPU, float32 on CPU")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory "
                                         "(a 7B policy on 24-80 GB GPUs), about a third more compute")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="the policy's attention kernel (transformers); None: its default")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints (none when the stage is shorter)")
    log_every: int = Field(20, ge=1)
    max_failures: int = Field(1, ge=0, description="worker failures Ray Train recovers from within one job")
    seed: int = 0

    @model_validator(mode="after")
    def _dpo_only_fields(self):
        if self.mode != "dpo" and self.sft_weight:
            raise ValueError("sft_weight applies to mode 'dpo' only")
        if self.pair_conflict is not None and (self.mode, self.loss) != ("dpo", "sigmoid"):
            raise ValueError("pair_conflict applies to mode 'dpo' with loss 'sigmoid' only (the official code's)")
        if self.mode != "sft" and self.confidence is not None:
            raise ValueError("confidence applies to mode 'sft' only (a head's confidence loss is head_loss)")
        if self.mode in HEAD_MODES:
            if self.head_loss is None:
                raise ValueError(f"mode {self.mode!r} needs head_loss: {{kind: xent | confidence | product | conflict}}")
            if self.lora is not None:
                raise ValueError(f"lora applies to the generative modes, not to {self.mode!r}")
            for field, applies_to in (("loss", "dpo"), ("beta", "dpo"), ("gamma", "wspo")):
                if getattr(self, field) != type(self).model_fields[field].default:
                    raise ValueError(f"{field} applies to mode {applies_to!r}, not to {self.mode!r}")
        elif self.head_loss is not None or self.head != "linear":
            raise ValueError(f"head_loss and head apply to mode {' / '.join(map(repr, HEAD_MODES))} only")
        return self

    def compute_dtype(self, on_gpu: bool) -> str:
        """The dtype the policy trains in, which its frozen reference is scored in too (so that the log-ratio
        starts at zero): `dtype`, else bfloat16 on GPU and float32 on CPU."""
        return self.dtype or ("bfloat16" if on_gpu else "float32")


# The response columns each mode trains on (an lm text is the response to an empty prompt).
RESPONSES = {"lm": ("text",), "sft": ("response",), "wspo": ("response",), "dpo": ("chosen", "rejected"),
             "classify": ("response",), "compare": ("response_a", "response_b")}


def _texts(config: TrainConfig) -> list[str]:
    """The text columns of a mode: its prompt (but for lm) and its responses."""
    return ([] if config.mode == "lm" else ["prompt"]) + list(RESPONSES[config.mode])


def _columns(config: TrainConfig, reference: str) -> dict[str, str]:
    """The Parquet columns a stage reads -> the names the loss uses (`<reference>_*logps` become `ref_*logps`)."""
    texts = _texts(config)
    if config.mode in HEAD_MODES:  # label: the probability of class 1, in [0, 1]
        return {**{c: c for c in texts}, "label": "label"}
    scored = {"dpo": {f"{reference}_chosen_logps": "ref_chosen_logps",
                      f"{reference}_rejected_logps": "ref_rejected_logps"},
              "wspo": {"weak_aligned_logps": "weak_aligned_logps", "weak_base_logps": "weak_base_logps",
                       **({} if config.lora else {f"{reference}_logps": "ref_logps"})}}.get(config.mode, {})
    conflict = {CONFLICT_COLUMN: CONFLICT_COLUMN} if config.pair_conflict else {}
    return {**{c: c for c in texts}, **scored, **conflict}


def _schedule(n_rows: int, config: TrainConfig, world: int) -> tuple[int, int, int]:
    """(rows per optimizer step over all workers, steps per epoch, total steps) of a run on `n_rows` rows."""
    per_step = config.batch_size * config.gradient_accumulation_steps * world
    steps_per_epoch = math.ceil(n_rows / per_step)
    return per_step, steps_per_epoch, max(1, math.ceil(config.epochs * steps_per_epoch))


def _batches(n_rows: int, config: TrainConfig, rank: int, world: int, start_step: int = 0):
    """Deterministic (step, total steps, row indices) stream for one worker from `start_step`: each epoch
    one seeded shuffle, split by rank. A step's rows are `gradient_accumulation_steps` micro-batches.

    Every row is trained on each epoch: the epoch's last step, when the rows do not fill it, is topped
    up from the start of that epoch's order (`data_use` counts those repeats for the summary).
    """
    per_step, steps_per_epoch, total = _schedule(n_rows, config, world)
    order, order_epoch = [], None
    for step in range(start_step, total):
        epoch, within = divmod(step, steps_per_epoch)
        if epoch != order_epoch:  # once per epoch, not per step: a resume does not replay it either
            order, order_epoch = list(range(n_rows)), epoch
            random.Random(config.seed * 1000 + epoch).shuffle(order)
        per_worker = config.batch_size * config.gradient_accumulation_steps
        start = within * per_step + rank * per_worker
        yield step, total, [order[(start + k) % n_rows] for k in range(per_worker)]


def data_use(n_rows: int, config: TrainConfig, world: int) -> dict:
    """What one run does with `n_rows` rows: steps, rows fed, rows repeated to fill the last step of an
    epoch, and rows never trained on (only when `epochs` ends part-way through an epoch)."""
    per_step, steps_per_epoch, total = _schedule(n_rows, config, world)
    full_epochs, last_steps = divmod(total, steps_per_epoch)
    fed = total * per_step
    seen = n_rows if full_epochs else min(n_rows, last_steps * per_step)
    return {"rows": n_rows, "steps": total, "rows_fed": fed, "rows_unused": n_rows - seen,
            "rows_repeated": fed - full_epochs * n_rows - min(n_rows, last_steps * per_step)}


# ------------------------------------------------------------------------------------------- on a worker


class _StageData:
    """A stage's rows on one worker, tokenized once: token ids per response column, and the scored
    per-token log-prob columns kept as Arrow arrays (float32 buffers, not Python lists)."""

    def __init__(self, path: str, config: TrainConfig, reference: str, tokenizer, max_length: int):
        import numpy as np
        import pyarrow.parquet as pq

        from w2s.modeling import pair_ids

        columns = _columns(config, reference)
        table = pq.read_table(path, columns=list(columns)).rename_columns(list(columns.values()))
        self.n_rows, self.mode, self.max_length = table.num_rows, config.mode, max_length
        self.pad = tokenizer.pad_token_id
        prompts = [""] * self.n_rows if config.mode == "lm" else table["prompt"].to_pylist()
        self.pairs = {side: [(np.asarray(p, np.int32), np.asarray(r, np.int32))
                             for p, r in pair_ids(tokenizer, prompts, table[side].to_pylist())]
                      for side in RESPONSES[config.mode]}
        self.scored = {name: table[name].combine_chunks() for name in columns.values() if name.endswith("_logps")}
        self.labels = table["label"].to_numpy().astype(np.float32) if "label" in columns else None
        self.toward_chosen = (table[CONFLICT_COLUMN].to_numpy(zero_copy_only=False).astype(bool)
                              if CONFLICT_COLUMN in columns else None)

    def batch(self, rows: list[int]) -> tuple:
        """The micro-batch of `rows`: padded tokens (for DPO the chosen rows, then the rejected ones) and
        every scored column as a [B, T-1] tensor on the response positions."""
        import pyarrow as pa

        from w2s.modeling import pad_pairs

        tokens = pad_pairs([self.pairs[side][i] for side in RESPONSES[self.mode] for i in rows], self.pad,
                           self.max_length)
        mask = tokens.response_mask[:, 1:].bool()
        if self.labels is not None:
            import torch
            return tokens, {"label": torch.from_numpy(self.labels[rows])}
        if self.mode == "dpo":
            import torch

            ref = pa.concat_arrays([self.scored[f"ref_{side}_logps"].take(rows) for side in ("chosen", "rejected")])
            conflict = ({} if self.toward_chosen is None
                        else {"toward_chosen": torch.from_numpy(self.toward_chosen[rows])})
            return tokens, {"ref": _per_token(ref, mask, "ref_chosen_logps / ref_rejected_logps"), **conflict}
        return tokens, {name.removesuffix("_logps"): _per_token(column.take(rows), mask, name)
                        for name, column in self.scored.items()}


def _per_token(values, mask, name: str):
    """Stored per-token log-probs (an Arrow list array, one list per row of `mask`) -> a [B, T-1] float32
    tensor on the response positions of `mask`; a list of another length than its response is refused."""
    import numpy as np
    import pyarrow.compute as pc
    import torch

    lengths, wanted = pc.list_value_length(values).to_numpy(zero_copy_only=False), mask.sum(-1).numpy()
    for i in np.flatnonzero(lengths != wanted):
        raise ValueError(f"{name}: {lengths[i]} stored log-probs for a response of {wanted[i]} tokens; "
                         "was it scored with another tokenizer or max_length?")
    out = torch.zeros(mask.shape, dtype=torch.float32)
    out[mask] = torch.from_numpy(values.flatten().to_numpy(zero_copy_only=False).astype(np.float32))
    return out


def _loss(model, batch: tuple, config: TrainConfig, step_frac: float) -> tuple:
    """Loss of one micro-batch (at `step_frac` of the stage's steps), the number of tokens it trained on, and
    metrics to log."""
    from w2s.losses import dpo_loss, masked_mean_nll, pair_conflict_loss
    from w2s.modeling import token_logprobs

    tokens, scored = batch
    if config.mode in HEAD_MODES:
        return _head_loss(model, tokens, scored["label"], config, step_frac)
    if config.mode == "wspo":
        return _wspo_loss(model, tokens, scored, config)
    if config.confidence is not None:
        return _confident_sft_loss(model, tokens, config.confidence, step_frac)
    logp = token_logprobs(model, tokens)
    mask = tokens.response_mask[:, 1:].to(logp.device)
    if config.mode in ("lm", "sft"):
        loss = masked_mean_nll(logp, mask)
        return loss, int(tokens.attention_mask.sum()), {"loss": loss.item()}

    n = logp.shape[0] // 2  # chosen rows, then rejected rows
    seq, ref = logp.sum(-1), scored["ref"].to(logp.device).sum(-1)
    if config.loss == "ipo":  # IPO works on per-token mean log-probs (as TRL does)
        ntok = mask.sum(-1).clamp(min=1)
        seq, ref = seq / ntok, ref / ntok
    losses, margins = dpo_loss(seq[:n], seq[n:], ref[:n], ref[n:], config.beta, config.loss)
    loss = losses.mean()
    metrics = {"dpo_loss": loss.item(), "reward_margin": margins.mean().item(),
               "reward_accuracy": (margins > 0).float().mean().item()}
    if config.pair_conflict:  # sums, as the loss is sigmoid (the config's check)
        toward = scored["toward_chosen"].to(logp.device)
        conflict = pair_conflict_loss(seq[:n], seq[n:], ref[:n], ref[n:], toward, config.beta).mean()
        loss = loss + config.pair_conflict.alpha * conflict
        metrics["conflict_loss"] = conflict.item()
    if config.sft_weight:
        nll = masked_mean_nll(logp[:n], mask[:n])
        loss = loss + config.sft_weight * nll
        metrics["sft_nll"] = nll.item()
    metrics["loss"] = loss.item()
    return loss, int(tokens.attention_mask.sum()), metrics


def _confident_sft_loss(model, tokens, confidence: ConfidenceLoss, step_frac: float) -> tuple:
    """SFT on one micro-batch with the token-level confidence loss, its weight warmed up as a head's is."""
    from w2s.losses import confidence_weight, token_confidence_loss

    device = next(model.parameters()).device
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    a = confidence_weight(step_frac, confidence.aux_weight, confidence.warmup_frac)
    loss, agreement = token_confidence_loss(logits, ids[:, 1:], tokens.response_mask[:, 1:].to(device), a)
    return loss, int(tokens.attention_mask.sum()), {"loss": loss.item(), "aux_weight": a,
                                                    "label_is_own_argmax": agreement.item()}


def _head_loss(model, tokens, labels, config: TrainConfig, step_frac: float) -> tuple:
    """A classification head's loss on one micro-batch: its one logit per row (a linear head's, read by
    transformers at the row's last token that is not padding; a likelihood head's, from the response's tokens)
    against the labels (w2s.losses.w2sg_loss)."""
    from w2s.losses import w2sg_loss

    device = next(model.parameters()).device
    if config.head == "likelihood":
        logits = model(tokens)
    else:
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    if config.mode == "compare":  # rows of response_a, then of response_b: P(a is better) = sigmoid(r_a - r_b)
        logits = logits[:len(labels)] - logits[len(labels):]
    labels = labels.to(device)
    loss_config = config.head_loss.model_dump()
    loss = w2sg_loss(logits, labels, loss_config.pop("kind"), step_frac, **loss_config).mean()
    agree = ((logits.detach() > 0) == (labels > 0.5)).float().mean()
    return loss, int(tokens.attention_mask.sum()), {"loss": loss.item(), "label_agreement": agree.item()}


def _wspo_loss(model, tokens, scored: dict, config: TrainConfig) -> tuple:
    """WSPO on one micro-batch: only the policy runs here; the weak streams (and, without LoRA,
    the strong reference) were scored once by the Ray Data stage."""
    import torch

    from w2s.losses import wspo_loss
    from w2s.modeling import token_logprobs

    logp = token_logprobs(model, tokens)
    mask = tokens.response_mask[:, 1:].bool().to(logp.device)
    if config.lora:  # the reference is the policy with its adapter disabled
        module = getattr(model, "module", model)  # the DeepSpeed engine wraps the peft model
        with torch.no_grad(), module.disable_adapter():
            ref = token_logprobs(module, tokens)
    else:
        ref = scored["ref"].to(logp.device)
    weak_aligned, weak_base = scored["weak_aligned"].to(logp.device), scored["weak_base"].to(logp.device)
    loss = wspo_loss(logp, ref, weak_aligned, weak_base, mask, config.gamma).mean()
    ntok = mask.sum().clamp(min=1)
    strong_ratio, weak_ratio = (logp.detach() - ref) * mask, (weak_aligned - weak_base) * mask
    # amplification: least-squares slope of the strong per-token log-ratio on the weak one (1/gamma at the optimum)
    slope = (strong_ratio * weak_ratio).sum() / (weak_ratio * weak_ratio).sum().clamp(min=1e-12)
    return loss, int(tokens.attention_mask.sum()), {"loss": loss.item(),
                                                     "strong_log_ratio": (strong_ratio.sum() / ntok).item(),
                                                     "weak_log_ratio": (weak_ratio.sum() / ntok).item(),
                                                     "amplification": slope.item()}


def deepspeed_config(config: TrainConfig, dtype, hidden_size: int) -> dict:
    """DeepSpeed's config of a stage. Its gradient-reduction bucket is sized by the model's hidden size (hidden^2
    elements, as Hugging Face's integration does, and at least 2^20): at DeepSpeed's fixed default (5e8 elements,
    2 GB in fp32) each of two workers training SmolLM2-135M on CPUs held 6.6 GB; at hidden^2, 3.4 GB (measured)."""
    import torch

    buckets = {"reduce_bucket_size": max(hidden_size**2, 2**20)}
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage, "stage3_gather_16bit_weights_on_model_save": True,
                              **buckets},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,  # torch AdamW: DeepSpeed's fused Adam is CUDA-only
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def hidden_size(model_config) -> int:
    """The width of a transformers model's config (GPT-2 calls it n_embd)."""
    return getattr(model_config, "hidden_size", None) or model_config.n_embd


def skip_inference_comm_op() -> None:
    """On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory C++ op when it starts (about a
    minute on 2 cores, again for every new environment, and seen to happen again in a test run for no cause
    found). It serves only `inference_all_reduce` (tensor-parallel inference); ZeRO-3 training on gloo never
    calls it. Marked incompatible, it is skipped (deepspeed.comm.torch.build_shm_op). Call before DeepSpeed
    initialises its backend: ZeRO-3's partitioned load (zero.Init) does that, before the engine."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_engine(model, config: TrainConfig, total_steps: int, dtype):
    """Wrap `model` in a DeepSpeed engine (ZeRO stage of `config`) with AdamW on its trainable
    parameters and a linear warm-up + cosine schedule. Returns (engine, scheduler)."""
    import deepspeed
    import torch

    skip_inference_comm_op()

    warmup = int(config.warmup_ratio * total_steps)

    def schedule(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    trainable = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters only
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(config, dtype, hidden_size(model.config)))
    return engine, scheduler


def _quiet_worker() -> None:
    """What a training worker prints is progress and errors: no weight-loading bars, no DeepSpeed info line
    per checkpoint and worker, no deprecation note about the collectives DeepSpeed calls, nor about the
    transformers property peft reads when it wraps a model for LoRA (`is_gradient_checkpointing`)."""
    import logging
    import warnings

    import deepspeed  # noqa: F401 - its import sets its logger's level: set it after
    import transformers

    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _serve(loop_config: dict) -> None:
    """Runs on every Ray Train worker for the whole job: the stages the driver queues, in order, until it
    says stop. After a restart (a worker died), it goes on with the first stage not finished."""
    import ray.train
    import torch

    _quiet_worker()
    skip_inference_comm_op()
    queue = loop_config["queue"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = torch.cuda.is_available() and bool(loop_config["use_gpu"])
    if not on_gpu:  # gradients' reductions split by thread count: the same config, the same threads, on any machine
        torch.set_num_threads(loop_config["cpu_threads"])
    nodes = [None] * world  # where each worker runs (recorded in every stage's summary)
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    index = ray.get(queue.first_open.remote())
    while (stage := ray.get(queue.get.remote(index))) is not None:  # waits until the driver queues one, or stops
        _reset_peak_memory()
        summary = _train_stage(stage, rank, world, on_gpu, nodes)
        summary["worker_memory_gb"] = _memory_per_worker(world)
        if rank == 0:
            ray.get(queue.finish.remote(index, summary))
        index += 1


def _train_stage(stage: dict, rank: int, world: int, on_gpu: bool, nodes: list) -> dict:
    """One stage on this worker: load, resume from the stage's last checkpoint, train, save the final model."""
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.integrations import HfDeepSpeedConfig

    from w2s.modeling import LikelihoodClassifier, load_tokenizer, read_likelihood_head

    began = time.perf_counter()
    config = TrainConfig(**stage["train"])
    name, folder = stage["name"], Path(stage["checkpoints"])
    torch.manual_seed(config.seed)
    dtype = getattr(torch, config.compute_dtype(on_gpu))
    tokenizer = load_tokenizer(stage["init_model"], stage["trust_remote_code"])
    # ZeRO-3: while this object lives, from_pretrained partitions the weights over the workers as it loads them
    # (deepspeed.zero.Init), instead of a whole fp32 copy of the model in every worker first. Only for this load:
    # rank 0 alone loads a whole model to merge LoRA at the end.
    width = hidden_size(AutoConfig.from_pretrained(stage["init_model"], trust_remote_code=stage["trust_remote_code"]))
    zero3_init = HfDeepSpeedConfig(deepspeed_config(config, dtype, width)) if config.zero_stage == 3 else None
    # a linear head is new on the backbone, and the saved model loads as a reward model; a likelihood head reads the LM
    linear_head = config.mode in HEAD_MODES and config.head == "linear"
    auto, head = ((AutoModelForSequenceClassification, {"num_labels": 1, "pad_token_id": tokenizer.pad_token_id})
                  if linear_head else (AutoModelForCausalLM, {}))
    with _quiet_new_head(bool(head)):  # the head is new: transformers' report of its missing weights says only that
        model = auto.from_pretrained(stage["init_model"], dtype=torch.float32, use_safetensors=True,
                                     trust_remote_code=stage["trust_remote_code"],
                                     attn_implementation=config.attn_implementation, **head)
    del zero3_init
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora:
        model = _add_lora(model, config.lora)
    if config.mode in HEAD_MODES and config.head == "likelihood":
        model = LikelihoodClassifier(model, **(read_likelihood_head(stage["init_model"]) or {}))
    data = _StageData(stage["data"], config, stage["reference"], tokenizer, stage["max_length"])
    total_steps = data_use(data.n_rows, config, world)["steps"]
    engine, scheduler = deepspeed_engine(model, config, total_steps, dtype)
    start_step = _resume(engine, folder, rank)

    writer = None
    if rank == 0 and stage["tensorboard_dir"]:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(stage["tensorboard_dir"])
    engine.train()
    tokens, t0, last = 0, time.perf_counter(), {}
    for step, total, rows in _batches(data.n_rows, config, rank, world, start_step):
        for i in range(0, len(rows), config.batch_size):  # DeepSpeed steps the optimizer after the last one
            loss, ntok, last = _loss(engine, data.batch(rows[i:i + config.batch_size]), config, step / total)
            engine.backward(loss)
            engine.step()
            tokens += ntok
        if step % config.log_every == 0 or step == total - 1:
            rate = tokens / max(time.perf_counter() - t0, 1e-9)
            if rank == 0:
                print(f"[train {name}] step {step + 1}/{total} loss {last['loss']:.4f} {rate * world:.0f} tok/s",
                      flush=True)
            if writer:
                for key, value in {**last, "lr": scheduler.get_last_lr()[0], "tokens_per_s": rate * world}.items():
                    writer.add_scalar(key, value, step)
        if (step + 1) % config.checkpoint_every == 0 and step < total - 1:
            _checkpoint(engine, folder, step, rank)
    # where the stage's time went on this worker: loading and DeepSpeed's set-up, the steps (and checkpoints),
    # then the final save (_save_final adds it)
    summary = {"steps": total_steps, "optimizer_steps": engine.global_steps, "tokens_per_worker": tokens,
               "setup_seconds": t0 - began, "seconds": time.perf_counter() - t0, "world_size": world,
               "worker_nodes": nodes,
               "torch_threads": torch.get_num_threads(), "last": last, "resumed_from_step": start_step,
               "fingerprint": stage["fingerprint"], "device": "cuda" if on_gpu else "cpu",
               "backend": torch.distributed.get_backend(), "dtype": str(dtype).removeprefix("torch."),
               "parameters": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())}
    _save_final(engine, config, stage, tokenizer, rank, summary)
    if writer:
        writer.close()
    _release(engine)
    del engine, model
    gc.collect()  # the next stage's model takes this one's place
    _give_back_freed_memory()
    return summary


def _give_back_freed_memory() -> None:
    """Return the freed heap to the machine: glibc keeps what a process freed for its own next allocations, so an
    idle worker went on holding its last stage's peak, where model hosts and Ray Data tasks needed it."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: libc's where it is glibc
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def _reset_peak_memory() -> None:
    """Start this process's peak resident memory (VmHWM) afresh, so that a stage's peak is its own (Linux only)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _memory_per_worker(world: int) -> list[dict] | None:
    """Every worker's peak resident memory during the stage and what it still holds after it (GB): a long-lived
    worker that kept an earlier stage's memory shows here before the operating system kills it."""
    import torch

    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        mine = {"peak": int(status["VmHWM"].split()[0]) / 2**20, "after": int(status["VmRSS"].split()[0]) / 2**20}
    except (OSError, KeyError, ValueError):  # not Linux
        mine = None
    every = [None] * world
    torch.distributed.all_gather_object(every, mine)
    return None if None in every else [{k: round(v, 2) for k, v in m.items()} for m in every]


@contextlib.contextmanager
def _quiet_new_head(quiet: bool):
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _release(engine) -> None:
    """Drop what keeps a finished stage's engine, model and optimizer alive (a training worker lives for the
    whole job): ZeRO-3's hooks, DeepSpeed's module-level stack of modules in forward (FWD_MODULE_STACK) and its
    cache of parameters to release, each found holding the model. The freed heap goes back to the machine after
    (_give_back_freed_memory): without it an idle worker held 3.9, 6.0 and 6.0 GB after three LoRA DPO stages of
    SmolLM2-135M, with it 1.0 GB (measured)."""
    from deepspeed.runtime.zero import parameter_offload

    engine.destroy()
    parameter_offload.FWD_MODULE_STACK.clear()
    _clear_zero3_release_cache()


def _clear_zero3_release_cache() -> None:
    """DeepSpeed (0.19) caches PartitionedParameterCoordinator.__params_to_release with an lru_cache on the class,
    keyed by (coordinator, submodule, step): it kept every finished stage's model, and through the model's hooks
    its engine and optimizer, alive for the worker's life. Full fine-tuning of SmolLM2-135M left 1.3 GB more per
    stage and worker (the ZeRO-3 optimizer's share: fp32 weights, gradients, Adam's two moments) until Ray killed
    MACPO's student stage for memory (measured; tests/scripts/stage_memory.py checks that nothing stays)."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    cached = PartitionedParameterCoordinator.__dict__.get("_PartitionedParameterCoordinator__params_to_release")
    for cell in getattr(cached, "__closure__", None) or ():  # under DeepSpeed's nvtx wrapper
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


def _complete_checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))


def _resume(engine, folder: Path, rank: int) -> int:
    """The step to start from: after the stage's last complete checkpoint, if it has one."""
    done = _complete_checkpoints(folder)
    if not done:
        return 0
    _, client_state = engine.load_checkpoint(str(done[-1]))
    if rank == 0:
        print(f"[train] resumed from step {client_state['step'] + 1}", flush=True)
    return client_state["step"] + 1


# A failpoint for the fault tests: seconds every worker waits after each checkpoint, so that a test can kill
# a job half-way through a stage that would otherwise end within milliseconds of its first checkpoint.
CHECKPOINT_PAUSE = "W2S_TEST_CHECKPOINT_PAUSE_S"


def _checkpoint(engine, folder: Path, step: int, rank: int) -> None:
    """Every rank writes its ZeRO shards and optimizer state into `step_<n>.partial`; once all have,
    rank 0 renames it `step_<n>` (a kill half-way leaves no checkpoint to resume from) and keeps two."""
    import torch

    partial = folder / f"step_{step + 1:08d}.partial"
    engine.save_checkpoint(str(partial), client_state={"step": step})
    torch.distributed.barrier()
    if rank == 0:
        partial.rename(folder / partial.name.removesuffix(".partial"))
        for old in _complete_checkpoints(folder)[:-2]:
            shutil.rmtree(old)
    time.sleep(float(os.environ.get(CHECKPOINT_PAUSE, 0)))


def _save_final(engine, config: TrainConfig, stage: dict, tokenizer, rank: int, summary: dict) -> None:
    """Rank 0 gathers what the save needs from the ZeRO-3 shards (_trained_state: every weight, or with LoRA the
    adapter's, merged into the base read from disk) into one safetensors checkpoint, written once, next to the
    stage's output folder (`<output_dir>.partial`, moved into place by the driver). The summary file is
    written last: a folder that has it is complete."""
    start = time.perf_counter()
    state = _trained_state(engine, config)
    if rank != 0:
        return
    staging = Path(stage["output_dir"] + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    if config.lora:
        _save_merged_lora(stage["init_model"], config.lora, state, str(staging), stage["trust_remote_code"])
    elif config.mode in HEAD_MODES and config.head == "likelihood":  # the LM, and its two scalars beside it
        from w2s.modeling import LIKELIHOOD_HEAD

        lm = engine.module.lm
        lm.config.use_cache = True
        lm.save_pretrained(staging, state_dict={k.removeprefix("lm."): v for k, v in state.items()
                                                if k.startswith("lm.")}, safe_serialization=True)
        (staging / LIKELIHOOD_HEAD).write_text(json.dumps({k: float(state[k]) for k in ("scale", "bias")}))
    else:
        engine.module.config.use_cache = True  # off for training only: generation from the saved model wants it
        engine.module.save_pretrained(staging, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / TRAINED_MARKER).write_text(stage["name"])
    summary["save_seconds"] = time.perf_counter() - start
    (staging / SUMMARY).write_text(json.dumps(summary))


def _trained_state(engine, config: TrainConfig) -> dict:
    """The weights the final save needs, gathered from the ZeRO-3 shards (every rank takes part; rank 0 keeps
    them). With LoRA only the adapter's: the frozen base is on disk, and gathering its weights too was most of a
    LoRA stage's save."""
    if not config.lora:
        return engine._zero3_consolidated_16bit_state_dict() if config.zero_stage == 3 else engine.module.state_dict()
    import deepspeed

    adapter = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in adapter], enabled=config.zero_stage == 3):
        return {name: p.detach().cpu().clone() for name, p in adapter}


def _add_lora(model, lora: LoraSettings):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=lora.target_modules, task_type="CAUSAL_LM"))


def _save_merged_lora(init_model: str, lora: LoraSettings, adapter: dict, out: str, trust_remote_code: bool) -> None:
    """Save the base model with the trained adapter merged in (a plain HF checkpoint every stage can
    load), and the adapter alone in `<out>/lora_adapter`."""
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(init_model, dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=trust_remote_code)
    peft_model = _add_lora(base, lora)
    wanted = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    if set(adapter) != wanted:  # the adapter trained is the one built here, weight for weight
        raise RuntimeError(f"trained adapter weights {sorted(set(adapter) ^ wanted)[:4]} do not match the adapter")
    peft_model.load_state_dict({k: v.float() for k, v in adapter.items()}, strict=False)
    peft_model.save_pretrained(os.path.join(out, "lora_adapter"), safe_serialization=True)
    peft_model.merge_and_unload().save_pretrained(out, safe_serialization=True)


# ------------------------------------------------------------------------------------------- in the driver

TRAINED_MARKER = ".trained_by_w2s"  # in every folder a stage writes: the only kind train() will replace
SUMMARY = ".train_summary.json"  # written last into a trained model's folder (hidden: not part of its weights fingerprint)
FINGERPRINT = ".w2s_fingerprint"  # in a stage's checkpoint folder: what its checkpoints were trained on


class CheckpointMismatchError(ValueError):
    """Checkpoints left by a stage of another config, model or data under the same name."""


def _claim_checkpoints(folder: Path, fingerprint: str) -> None:
    """Resume only from checkpoints of the same config, initial weights and data; refuse others."""
    mark = folder / FINGERPRINT
    if mark.is_file() and mark.read_text() != fingerprint:
        raise CheckpointMismatchError(f"{folder} holds checkpoints of another config, initial model or data; "
                                      "resuming from them would mix two runs: remove the folder, or use another name")
    folder.mkdir(parents=True, exist_ok=True)
    mark.write_text(fingerprint)


def _check_columns(data: Path, config: TrainConfig, reference: str) -> int:
    """The rows of `data`, once its Parquet schema has every column the mode needs (nothing is read)."""
    import pyarrow.parquet as pq

    needed = list(_columns(config, reference))
    missing = [c for c in needed if c not in pq.read_schema(data).names]
    if missing:
        raise ValueError(f"{data}: mode {config.mode!r} needs columns {needed}; missing {missing}")
    rows = pq.read_metadata(data).num_rows
    if rows == 0:
        raise ValueError(f"{data}: no rows to train on")
    return rows


def _check_lengths(data: Path, tokenizer, config: TrainConfig, max_length: int) -> None:
    """Refuse, before any worker trains, a row longer than `max_length` (it would be cut, or crash a worker), a
    head mode's label that is not a probability, or a missing conflict indicator. Reads the columns a batch at a
    time."""
    import pyarrow.parquet as pq

    from w2s.modeling import TooLongError, pair_ids

    texts = _texts(config)
    first = 0
    labels = ["label"] if config.mode in HEAD_MODES else []  # never the scored log-prob columns: texts only
    conflict = [CONFLICT_COLUMN] if config.pair_conflict else []
    for batch in pq.ParquetFile(data).iter_batches(batch_size=4096, columns=texts + labels + conflict):
        if labels:
            _check_labels(data, batch.column("label"), first)
        if conflict:
            _check_conflict(data, batch.column(CONFLICT_COLUMN), first)
        prompts = batch.column("prompt").to_pylist() if "prompt" in texts else [""] * batch.num_rows
        for field in RESPONSES[config.mode]:
            for i, (p, r) in enumerate(pair_ids(tokenizer, prompts, batch.column(field).to_pylist())):
                if len(p) + len(r) > max_length:
                    raise TooLongError(f"{data}: row {first + i} field {field!r}: {len(p) + len(r)} tokens with its "
                                       f"prompt and EOS > max_length {max_length}; set such rows aside before training")
        first += batch.num_rows


def _check_labels(data: Path, labels, first: int) -> None:
    """A head's labels are probabilities of class 1: a missing one, or one outside [0, 1], is refused by row."""
    import numpy as np

    values = labels.to_numpy(zero_copy_only=False).astype(np.float64)
    bad = np.flatnonzero(~((values >= 0) & (values <= 1)))  # NaN and None (NaN here) fail both comparisons
    if bad.size:
        raise ValueError(f"{data}: row {first + bad[0]} field 'label': {labels[int(bad[0])].as_py()!r} is not a "
                         f"probability in [0, 1] ({bad.size} such rows)")


def _check_conflict(data: Path, toward_chosen, first: int) -> None:
    """A pair's conflict indicator is a bool: a missing one, or another type, is refused by row."""
    import pyarrow as pa

    if not pa.types.is_boolean(toward_chosen.type):
        raise ValueError(f"{data}: field {CONFLICT_COLUMN!r} must be bool (true: the chosen response is the "
                         f"conflicting one), got {toward_chosen.type}")
    if toward_chosen.null_count:
        missing = toward_chosen.to_pylist().index(None)
        raise ValueError(f"{data}: row {first + missing} field {CONFLICT_COLUMN!r}: missing "
                         f"({toward_chosen.null_count} such rows)")


def _trained(output_dir: Path, fingerprint: str) -> dict | None:
    """The summary of this very stage when an earlier call trained it: the job was stopped after the
    model was written and before it was taken. Its `.partial` folder is moved into place here."""
    for folder in (output_dir, output_dir.with_name(output_dir.name + ".partial")):
        file = folder / SUMMARY
        summary = json.loads(file.read_text()) if file.is_file() else {}
        if summary.get("fingerprint") == fingerprint:
            if folder != output_dir:
                _move_into_place(folder, output_dir)
            return summary
    return None


def _move_into_place(staging: Path, output_dir: Path) -> None:
    if output_dir.exists():  # empty, or a model train() wrote before (checked by the caller)
        shutil.rmtree(output_dir)
    staging.rename(output_dir)


class _WorkerGroup:
    """One Ray Train run (its own thread in the driver) whose workers train queued stages in order."""

    def __init__(self, shape: tuple, resources: TrainResources, storage: Path):
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        num_workers, max_failures = shape
        per_worker = resources.bundle()
        self.queue = _StageQueue.options(num_cpus=0, max_concurrency=64).remote()
        self.busy = 0  # stages queued here and not yet ended (the driver's count)
        self.error: BaseException | None = None
        self.run_dir = storage / f"workers-{uuid.uuid4().hex[:8]}"
        trainer = TorchTrainer(
            _serve,
            train_loop_config={"queue": self.queue, "use_gpu": resources.use_gpu,
                               "cpu_threads": max(1, int(resources.cpus_per_worker))},
            torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=resources.use_gpu,
                                         resources_per_worker=per_worker),
            run_config=RunConfig(name=self.run_dir.name, storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=max_failures)),
        )
        self.thread = threading.Thread(target=self._fit, args=(trainer,), daemon=True, name="w2s-train")
        self.thread.start()

    def _fit(self, trainer) -> None:
        try:
            result = trainer.fit()
            self.error = result.error
        except BaseException as err:  # noqa: BLE001 - handed to every stage waiting on this group
            self.error = err

    def alive(self) -> bool:
        return self.thread.is_alive()

    def run(self, stage: dict) -> dict:
        """Queue `stage` and wait for its summary (the workers train the queued stages one at a time)."""
        result = self.queue.result.remote(ray.get(self.queue.submit.remote(stage)))
        while not ray.wait([result], timeout=1.0)[0]:
            if not self.thread.is_alive():
                raise RuntimeError(f"training stage {stage['name']!r} failed") from self.error
        return ray.get(result)

    def stop(self) -> None:
        if self.thread.is_alive():
            ray.get(self.queue.stop.remote())
            self.thread.join()
        shutil.rmtree(self.run_dir, ignore_errors=True)  # Ray Train's own records: stages keep their checkpoints


class TrainingWorkers:
    """The training workers of one job: a Ray Train run per shape (workers, failures allowed), started on its
    first stage and kept until `shutdown()`, training the stages one at a time. Every worker asks for
    `resources` (the job's `cluster.train`); a new run first waits up to `wait_s` for the cluster to hold all
    its workers at once (an autoscaler starts nodes for them), and fails clearly if it does not.

    `max_groups` runs of one shape may train side by side (independent stages submitted from several
    threads); None: as many as the cluster's CPUs (or GPUs) hold at once.
    """

    def __init__(self, storage: str | Path, resources: TrainResources = TrainResources(), wait_s: float = 900,
                 max_groups: int | None = None):
        self.storage = Path(storage).resolve()  # Ray Train's own records of each run; removed at shutdown
        self.resources, self.wait_s, self.max_groups = resources, wait_s, max_groups
        self._groups: dict[tuple, list[_WorkerGroup]] = {}
        self._lock = threading.Lock()

    def train(self, config: TrainConfig, init_model: str | Path, data: str | Path, output_dir: str | Path,
              name: str, storage_dir: str | Path, max_length: int, tensorboard_dir: str | Path | None = None,
              reference: str = "ref", trust_remote_code: bool = False) -> dict:
        """Train `init_model` on `data` and write the resulting HF checkpoint to `output_dir`.

        `storage_dir/name` holds the stage's checkpoints: calling again with the same pair resumes from the
        last one. `reference` names the scored log-prob columns of the frozen reference:
        `<reference>_chosen_logps` and `<reference>_rejected_logps` for DPO, `<reference>_logps` for WSPO.
        `max_length` is the job's one length limit: a longer row is refused here, never cut
        (w2s.modeling.resolve_max_length checks it against the model). Returns the train summary (steps,
        tokens, seconds, threads, worker nodes, and `data`: rows fed, repeated and unused, see data_use).
        """
        from w2s.modeling import load_tokenizer, weights_fingerprint
        from w2s.runs import content_hash, file_hash

        # Workers run in their own working directory: hand them absolute paths.
        init_model, data, output_dir = (Path(p).resolve() for p in (init_model, data, output_dir))
        if output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / TRAINED_MARKER).is_file():
            raise ValueError(f"output folder {output_dir} exists and was not written by train(): pick another, "
                             "or remove it yourself")
        tokenizer = load_tokenizer(init_model, trust_remote_code)  # a missing model, column or long row fails here
        n_rows = _check_columns(data, config, reference)
        _check_lengths(data, tokenizer, config, max_length)
        fingerprint = content_hash(config, weights_fingerprint(init_model), file_hash(data), max_length, reference)
        summary = _trained(output_dir, fingerprint)
        if summary is None:
            checkpoints = Path(storage_dir).resolve() / name
            _claim_checkpoints(checkpoints, fingerprint)
            stage = {"name": name, "train": config.model_dump(), "init_model": str(init_model), "data": str(data),
                     "output_dir": str(output_dir), "checkpoints": str(checkpoints), "max_length": max_length,
                     "reference": reference, "trust_remote_code": trust_remote_code, "fingerprint": fingerprint,
                     "tensorboard_dir": str(tensorboard_dir) if tensorboard_dir else None}
            summary = self._run(stage, config)
            if memory := summary.get("worker_memory_gb"):
                peak, after = (" / ".join(f"{m[key]:.2f}" for m in memory) for key in ("peak", "after"))
                print(f"[train {name}] workers' memory: peak {peak} GB, after the stage {after} GB", flush=True)
            _move_into_place(output_dir.with_name(output_dir.name + ".partial"), output_dir)
            for done in _complete_checkpoints(checkpoints):  # the model is out: its checkpoints are spent
                shutil.rmtree(done)
        summary["data"] = use = data_use(n_rows, config, config.num_workers)
        if use["rows_repeated"] or use["rows_unused"]:
            print(f"[train {name}] {use['rows']} rows in {use['steps']} steps: {use['rows_repeated']} repeated to fill "
                  f"an epoch's last step, {use['rows_unused']} unused (epochs {config.epochs:g})", flush=True)
        return summary

    def _run(self, stage: dict, config: TrainConfig) -> dict:
        group = self._group((config.num_workers, config.max_failures))
        try:
            return group.run(stage)
        finally:
            with self._lock:
                group.busy -= 1

    def _group(self, shape: tuple) -> _WorkerGroup:
        """The least busy live run of `shape`, or a new one while fewer than `max_groups` run."""
        with self._lock:
            groups = self._groups[shape] = [g for g in self._groups.get(shape, []) if g.alive()]
            idle = [g for g in groups if g.busy == 0]
            if idle or len(groups) >= self._max_groups(shape):
                group = min(idle or groups, key=lambda g: g.busy)
            else:
                self._stop_idle_other_shapes(shape)  # they would hold the resources a new run needs
                # Ray Train would wait for missing workers forever: wait here, with a deadline
                wait_for(self.resources.bundle(), shape[0], self.wait_s, "training workers")
                group = _WorkerGroup(shape, self.resources, self.storage)
                groups.append(group)
            group.busy += 1
            return group

    def _max_groups(self, shape: tuple) -> int:
        if self.max_groups is not None:
            return self.max_groups
        # as many runs as the cluster's nodes hold now, counting every resource a worker asks for (an autoscaler
        # adds nodes for the first run; the stages beyond what the nodes hold wait for a run to be free)
        have = ray.cluster_resources()
        return max(1, int(min(have.get(key, 0) // (need * shape[0]) for key, need in self.resources.bundle().items())))

    def _stop_idle_other_shapes(self, shape: tuple) -> None:
        for other, groups in self._groups.items():
            if other != shape:
                for group in [g for g in groups if g.busy == 0]:
                    group.stop()
                    groups.remove(group)

    def shutdown(self) -> None:
        with self._lock:
            for groups in self._groups.values():
                for group in groups:
                    group.stop()
            self._groups.clear()

    def __enter__(self) -> "TrainingWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


@ray.remote
class _StageQueue:
    """The stages of one worker group, in the order the driver queued them, and their summaries. An async actor:
    the workers and the driver wait in it for what they need, without polling."""

    def __init__(self):
        import asyncio

        self.stages: list[dict] = []
        self.summaries: dict[int, dict] = {}
        self.stopped = False
        self.changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def submit(self, stage: dict) -> int:
        self.stages.append(stage)
        await self._notify()
        return len(self.stages) - 1

    async def get(self, index: int) -> dict | None:
        """Stage `index` once queued; None once the driver has stopped the group."""
        async with self.changed:
            await self.changed.wait_for(lambda: index < len(self.stages) or self.stopped)
        return self.stages[index] if index < len(self.stages) else None

    def first_open(self) -> int:
        return next((i for i in range(len(self.stages)) if i not in self.summaries), len(self.stages))

    async def finish(self, index: int, summary: dict) -> None:
        self.summaries[index] = summary
        await self._notify()

    async def result(self, index: int) -> dict:
        """The summary of stage `index`, once trained."""
        async with self.changed:
            await self.changed.wait_for(lambda: index in self.summaries)
        return self.summaries[index]

    async def stop(self) -> None:
        self.stopped = True
        await self._notify()


def train(config: TrainConfig, init_model: str | Path, data: str | Path, output_dir: str | Path, name: str,
          storage_dir: str | Path, max_length: int, **kwargs) -> dict:
    """One stage on workers started for it alone (a job trains its stages on one TrainingWorkers)."""
    with TrainingWorkers(storage_dir) as workers:
        return workers.train(config, init_model, data, output_dir, name, storage_dir, max_length, **kwargs)
