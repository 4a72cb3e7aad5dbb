"""The one trainer of the project: Ray Train workers running DeepSpeed ZeRO-3.

Every training stage goes through `train()`: language-model pretraining (`lm`), supervised
fine-tuning on responses (`sft`), DPO (`dpo`: sigmoid, IPO or hinge, with an optional SFT term) and
WSPO (`wspo`: regression of the policy's per-token log-ratio onto the weak models' one). Full
fine-tuning or LoRA (peft). The same code runs with the gloo backend on CPUs and NCCL on GPUs.

Data is a Parquet file every worker can read (a shared filesystem on a cluster):
  lm:  text
  sft: prompt, response
  dpo: prompt, chosen, rejected, <reference>_chosen_logps, <reference>_rejected_logps (per-token lists from the
       scoring stage: the frozen reference is scored once, so only the policy is resident here)
  wspo: prompt, response, weak_aligned_logps, weak_base_logps, <reference>_logps (per-token lists; with
       LoRA the reference is the policy with its adapter disabled, computed here, and not needed)

Checkpoints go through Ray Train (DeepSpeed shards + optimizer + step). Running `train()` again
with the same `run_dir` and name resumes from the last checkpoint, whether the previous driver was
killed or a worker died (Ray Train restarts workers up to `max_failures` times by itself).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from w2s.config import StrictModel


class LoraSettings(StrictModel):
    """LoRA adapters (peft) instead of full fine-tuning; the saved model has the adapter merged in."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="None: peft's default for the architecture")


class TrainConfig(StrictModel):
    mode: Literal["lm", "sft", "dpo", "wspo"] = "dpo"
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    beta: float = Field(0.1, gt=0)
    sft_weight: float = Field(0.0, ge=0, description="weight of an NLL term on chosen responses (dpo mode)")
    gamma: float = Field(0.1, gt=0, description="WSPO: strong log-ratio is pulled to weak log-ratio / gamma")
    lora: LoraSettings | None = None
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    epochs: float = Field(1.0, gt=0, description="passes over the data (fractions allowed)")
    batch_size: int = Field(8, ge=1, description="micro-batch per worker")
    grad_clip: float = Field(1.0, gt=0)
    num_workers: int = Field(2, ge=1)
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has them")
    zero_stage: int = Field(3, ge=0, le=3)
    dtype: Literal["float32", "bfloat16"] | None = Field(None, description="None: bfloat16 on GPU, float32 on CPU")
    checkpoint_every: int = Field(100, ge=1, description="steps between Ray Train checkpoints")
    log_every: int = Field(20, ge=1)
    max_failures: int = Field(1, ge=0, description="worker failures Ray Train recovers from within one run")
    seed: int = 0

    @model_validator(mode="after")
    def _dpo_only_fields(self):
        if self.mode != "dpo" and self.sft_weight:
            raise ValueError("sft_weight applies to mode 'dpo' only")
        return self


def _rows(path: str, config: TrainConfig, reference: str = "ref") -> list[dict]:
    """Training rows; the `<reference>_*logps` columns are renamed `ref_*logps`."""
    import pyarrow.parquet as pq

    references = {"dpo": {f"{reference}_chosen_logps": "ref_chosen_logps", f"{reference}_rejected_logps": "ref_rejected_logps"},
                  "wspo": {} if config.lora else {f"{reference}_logps": "ref_logps"}}.get(config.mode, {})
    needed = {"lm": ["text"], "sft": ["prompt", "response"], "dpo": ["prompt", "chosen", "rejected"],
              "wspo": ["prompt", "response", "weak_aligned_logps", "weak_base_logps"]}[config.mode] + list(references)
    table = pq.read_table(path)
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: mode {config.mode!r} needs columns {needed}; missing {missing}")
    if table.num_rows == 0:
        raise ValueError(f"{path}: no rows to train on")
    return table.select(needed).rename_columns([references.get(c, c) for c in needed]).to_pylist()


def _batches(rows: list[dict], config: TrainConfig, rank: int, world: int):
    """Deterministic (step, batch) stream for one worker: each epoch a seeded shuffle, split by rank.

    Every row is trained on each epoch: the epoch's last step, when the rows do not fill it, is topped
    up from the start of that epoch's order (`data_use` counts those repeats for the summary).
    """
    per_step, steps_per_epoch, total = _schedule(len(rows), config, world)
    for step in range(total):
        epoch, within = divmod(step, steps_per_epoch)
        order = list(range(len(rows)))
        random.Random(config.seed * 1000 + epoch).shuffle(order)
        start = within * per_step + rank * config.batch_size
        yield step, total, [rows[order[(start + k) % len(order)]] for k in range(config.batch_size)]


def _schedule(n_rows: int, config: TrainConfig, world: int) -> tuple[int, int, int]:
    """(rows per step over all workers, steps per epoch, total steps) of a run on `n_rows` rows."""
    per_step = config.batch_size * world
    steps_per_epoch = math.ceil(n_rows / per_step)
    return per_step, steps_per_epoch, max(1, math.ceil(config.epochs * steps_per_epoch))


def data_use(n_rows: int, config: TrainConfig, world: int) -> dict:
    """What one run does with `n_rows` rows: steps, rows fed, rows repeated to fill the last step of an
    epoch, and rows never trained on (only when `epochs` ends part-way through an epoch)."""
    per_step, steps_per_epoch, total = _schedule(n_rows, config, world)
    full_epochs, last_steps = divmod(total, steps_per_epoch)
    fed = total * per_step
    seen = n_rows if full_epochs else min(n_rows, last_steps * per_step)
    return {"rows": n_rows, "steps": total, "rows_fed": fed, "rows_unused": n_rows - seen,
            "rows_repeated": fed - full_epochs * n_rows - min(n_rows, last_steps * per_step)}


def _loss(model, tokenizer, batch: list[dict], config: TrainConfig, max_length: int) -> tuple:
    """Loss of one micro-batch, the number of tokens it trained on, and metrics to log."""
    from w2s.losses import dpo_loss, masked_mean_nll
    from w2s.modeling import token_logprobs, tokenize_pairs

    if config.mode in ("lm", "sft"):  # lm: a text is the response to an empty prompt
        prompts = [""] * len(batch) if config.mode == "lm" else [r["prompt"] for r in batch]
        tb = tokenize_pairs(tokenizer, prompts, [r["text" if config.mode == "lm" else "response"] for r in batch],
                            max_length)
        logp = token_logprobs(model, tb)
        loss = masked_mean_nll(logp, tb.response_mask[:, 1:].to(logp.device))
        return loss, int(tb.attention_mask.sum()), {"loss": loss.item()}
    if config.mode == "wspo":
        return _wspo_loss(model, tokenizer, batch, config, max_length)

    prompts = [r["prompt"] for r in batch] * 2
    responses = [r["chosen"] for r in batch] + [r["rejected"] for r in batch]
    tb = tokenize_pairs(tokenizer, prompts, responses, max_length)
    logp = token_logprobs(model, tb)
    mask = tb.response_mask[:, 1:].to(logp.device)
    n = len(batch)
    seq = logp.sum(-1)
    # per token, so a reference scored with another tokenizer is refused, not summed
    ref = _per_token([r["ref_chosen_logps"] for r in batch] + [r["ref_rejected_logps"] for r in batch],
                     mask.bool(), "ref_chosen_logps / ref_rejected_logps").sum(-1)
    if config.loss == "ipo":  # IPO works on per-token mean log-probs (as TRL does)
        ntok = mask.sum(-1).clamp(min=1)
        seq, ref = seq / ntok, ref / ntok
    losses, margins = dpo_loss(seq[:n], seq[n:], ref[:n], ref[n:], config.beta, config.loss)
    loss = losses.mean()
    metrics = {"dpo_loss": loss.item(), "reward_margin": margins.mean().item(),
               "reward_accuracy": (margins > 0).float().mean().item()}
    if config.sft_weight:
        nll = masked_mean_nll(logp[:n], mask[:n])
        loss = loss + config.sft_weight * nll
        metrics["sft_nll"] = nll.item()
    metrics["loss"] = loss.item()
    return loss, int(tb.attention_mask.sum()), metrics


def _per_token(values: list[list[float]], mask, name: str):
    """Stored per-token lists -> a [B, T-1] tensor on the response positions of `mask`."""
    import torch

    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for i, (row, row_mask) in enumerate(zip(values, mask)):
        if len(row) != int(row_mask.sum()):
            raise ValueError(f"{name}: {len(row)} stored log-probs for a response of {int(row_mask.sum())} tokens; "
                             "was it scored with another tokenizer or max_length?")
        out[i, row_mask] = torch.tensor(row, dtype=torch.float32, device=mask.device)
    return out


def _wspo_loss(model, tokenizer, batch: list[dict], config: TrainConfig, max_length: int) -> tuple:
    """WSPO on one micro-batch: only the policy runs here; the weak streams (and, without LoRA,
    the strong reference) were scored once by the Ray Data stage."""
    import torch

    from w2s.losses import wspo_loss
    from w2s.modeling import token_logprobs, tokenize_pairs

    tb = tokenize_pairs(tokenizer, [r["prompt"] for r in batch], [r["response"] for r in batch], max_length)
    logp = token_logprobs(model, tb)
    mask = tb.response_mask[:, 1:].bool().to(logp.device)
    if config.lora:  # the reference is the policy with its adapter disabled
        module = getattr(model, "module", model)  # the DeepSpeed engine wraps the peft model
        with torch.no_grad(), module.disable_adapter():
            ref = token_logprobs(module, tb)
    else:
        ref = _per_token([r["ref_logps"] for r in batch], mask, "ref_logps")
    weak_aligned = _per_token([r["weak_aligned_logps"] for r in batch], mask, "weak_aligned_logps")
    weak_base = _per_token([r["weak_base_logps"] for r in batch], mask, "weak_base_logps")
    loss = wspo_loss(logp, ref, weak_aligned, weak_base, mask, config.gamma).mean()
    ntok = mask.sum().clamp(min=1)
    strong_ratio, weak_ratio = (logp.detach() - ref) * mask, (weak_aligned - weak_base) * mask
    # amplification: least-squares slope of the strong per-token log-ratio on the weak one (1/gamma at the optimum)
    slope = (strong_ratio * weak_ratio).sum() / (weak_ratio * weak_ratio).sum().clamp(min=1e-12)
    return loss, int(tb.attention_mask.sum()), {"loss": loss.item(), "strong_log_ratio": (strong_ratio.sum() / ntok).item(),
                                                 "weak_log_ratio": (weak_ratio.sum() / ntok).item(),
                                                 "amplification": slope.item()}


def deepspeed_engine(model, config: TrainConfig, total_steps: int, dtype):
    """Wrap `model` in a DeepSpeed engine (ZeRO stage of `config`) with AdamW on its trainable
    parameters and a linear warm-up + cosine schedule. Returns (engine, scheduler)."""
    import deepspeed
    import torch

    warmup = int(config.warmup_ratio * total_steps)

    def schedule(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    trainable = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters only
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ds_config = {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,  # torch AdamW: DeepSpeed's fused Adam is CUDA-only
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, scheduler


def _report_finished(checkpoint, rank: int) -> bool:
    """True, after reporting it again, when the checkpoint to resume from is a run's final one: the job was
    stopped after training had ended and before train() took the model out of it."""
    import ray.train

    if checkpoint is None:
        return False
    with checkpoint.as_directory() as ckpt:
        if not os.path.isfile(os.path.join(ckpt, "train_summary.json")):
            return False
        with open(os.path.join(ckpt, "train_summary.json")) as f:
            summary = json.load(f)
        if rank == 0:
            print(f"[train] resumed from step {summary['steps']}: training had ended", flush=True)
        ray.train.report({"step": summary["steps"], "done": True, **summary["last"]},
                         checkpoint=ray.train.Checkpoint.from_directory(ckpt) if rank == 0 else None)
    return True


def _train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM

    from w2s.modeling import load_tokenizer

    config = TrainConfig(**loop_config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if _report_finished(ray.train.get_checkpoint(), rank):
        return
    torch.manual_seed(config.seed)
    on_gpu = torch.cuda.is_available() and bool(loop_config["use_gpu"])
    if not on_gpu:  # gradients' reductions split by thread count: the same config, the same threads, on any machine
        torch.set_num_threads(loop_config["cpu_threads"])
    dtype = torch.bfloat16 if (config.dtype or ("bfloat16" if on_gpu else "float32")) == "bfloat16" else torch.float32

    tokenizer = load_tokenizer(loop_config["init_model"])
    model = AutoModelForCausalLM.from_pretrained(loop_config["init_model"], dtype=torch.float32, use_safetensors=True)
    model.config.use_cache = False
    if config.lora:
        model = _add_lora(model, config.lora)
    rows = _rows(loop_config["data"], config, loop_config["reference"])
    total_steps = data_use(len(rows), config, world)["steps"]
    engine, scheduler = deepspeed_engine(model, config, total_steps, dtype)

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt:
            _, client_state = engine.load_checkpoint(os.path.join(ckpt, "deepspeed"))
            start_step = client_state["step"] + 1
        if rank == 0:
            print(f"[train] resumed from step {start_step}", flush=True)

    writer = None
    if rank == 0 and loop_config.get("tensorboard_dir"):
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(loop_config["tensorboard_dir"])

    engine.train()
    tokens, t0, last = 0, time.perf_counter(), {}
    for step, total, batch in _batches(rows, config, rank, world):
        if step < start_step:
            continue
        loss, ntok, metrics = _loss(engine, tokenizer, batch, config, loop_config["max_length"])
        engine.backward(loss)
        engine.step()
        tokens += ntok
        last = metrics
        final = step == total - 1
        if step % config.log_every == 0 or final:
            elapsed = time.perf_counter() - t0
            metrics = {**metrics, "step": step, "total_steps": total, "lr": scheduler.get_last_lr()[0],
                       "tokens_per_s_per_worker": tokens / max(elapsed, 1e-9)}
            if rank == 0:
                print(f"[train {loop_config['name']}] step {step + 1}/{total} loss {metrics['loss']:.4f} "
                      f"{metrics['tokens_per_s_per_worker'] * world:.0f} tok/s", flush=True)
                if writer:
                    for key, value in metrics.items():
                        writer.add_scalar(key, value, step)
        if (step + 1) % config.checkpoint_every == 0 and not final:
            with tempfile.TemporaryDirectory() as tmp:
                engine.save_checkpoint(os.path.join(tmp, "deepspeed"), client_state={"step": step})
                ray.train.report({"step": step, **last}, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    nodes = [None] * world  # where each worker ran (recorded in the summary)
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    # Final model: gathered from the ZeRO-3 shards into one safetensors checkpoint by rank 0.
    state = engine._zero3_consolidated_16bit_state_dict() if config.zero_stage == 3 else engine.module.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            final_dir = os.path.join(tmp, "model")
            if config.lora:
                _save_merged_lora(loop_config["init_model"], config.lora, state, final_dir)
            else:
                engine.module.save_pretrained(final_dir, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(final_dir)
            with open(os.path.join(tmp, "train_summary.json"), "w") as f:
                json.dump({"steps": total_steps, "tokens_per_worker": tokens, "seconds": time.perf_counter() - t0,
                           "world_size": world, "worker_nodes": nodes, "torch_threads": torch.get_num_threads(),
                           "last": last}, f)
        ray.train.report({"step": total_steps, "done": True, **last},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
    if writer:
        writer.close()


def _add_lora(model, lora: LoraSettings):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=lora.target_modules, task_type="CAUSAL_LM"))


def _save_merged_lora(init_model: str, lora: LoraSettings, state: dict, out: str) -> None:
    """Save the base model with the trained adapter merged in (a plain HF checkpoint every stage can
    load), and the adapter alone in `<out>/lora_adapter`."""
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(init_model, dtype=torch.float32, use_safetensors=True)
    peft_model = _add_lora(base, lora)
    peft_model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    peft_model.save_pretrained(os.path.join(out, "lora_adapter"), safe_serialization=True)
    peft_model.merge_and_unload().save_pretrained(out, safe_serialization=True)


TRAINED_MARKER = ".trained_by_w2s"  # in every folder train() writes: the only kind it will replace
FINGERPRINT = ".w2s_fingerprint"  # in a stage's Ray Train folder: what its checkpoints were trained on


class CheckpointMismatchError(ValueError):
    """Ray Train checkpoints left by a run of another config, model or data under the same name."""


def _claim_checkpoints(folder: Path, fingerprint: str) -> None:
    """Resume only from checkpoints of the same config, initial weights and data; refuse others."""
    mark = folder / FINGERPRINT
    if mark.is_file() and mark.read_text() != fingerprint:
        raise CheckpointMismatchError(f"{folder} holds Ray Train checkpoints of another config, initial model or data; "
                                      "resuming from them would mix two runs: remove the folder, or use another name")
    folder.mkdir(parents=True, exist_ok=True)
    mark.write_text(fingerprint)


def _check_lengths(rows: list[dict], tokenizer, mode: str, max_length: int, data: Path) -> None:
    """Refuse, before any worker starts, a row longer than `max_length` (it would be cut, or crash a worker)."""
    from w2s.modeling import TooLongError, pair_ids

    fields = {"lm": [("", "text")], "sft": [("prompt", "response")], "wspo": [("prompt", "response")],
              "dpo": [("prompt", "chosen"), ("prompt", "rejected")]}[mode]
    for prompt, field in fields:
        ids = pair_ids(tokenizer, [r[prompt] if prompt else "" for r in rows], [r[field] for r in rows])
        for i, (p, r) in enumerate(ids):
            if len(p) + len(r) > max_length:
                raise TooLongError(f"{data}: row {i} field {field!r}: {len(p) + len(r)} tokens with its prompt and "
                                   f"EOS > max_length {max_length}; set such rows aside before training")


def train(config: TrainConfig, init_model: str | Path, data: str | Path, output_dir: str | Path,
          name: str, storage_dir: str | Path, max_length: int, tensorboard_dir: str | Path | None = None,
          reference: str = "ref", cpus_per_worker: float = 1.0) -> dict:
    """Train `init_model` on `data` and write the resulting HF checkpoint to `output_dir`.

    `storage_dir`/`name` is where Ray Train keeps checkpoints: calling again with the same pair
    resumes from the last checkpoint. `reference` names the scored log-prob columns of the frozen
    reference: `<reference>_chosen_logps` and `<reference>_rejected_logps` for DPO, `<reference>_logps`
    for WSPO. `max_length` is the job's one length limit: a longer row is refused here, never cut
    (w2s.modeling.resolve_max_length checks it against the model). `cpus_per_worker` is what each
    worker reserves on a CPU cluster (below 1, several small stages can train at once) and, rounded
    down to at least 1, its torch threads. Returns the train
    summary (steps, tokens, seconds, threads, and `data`: rows fed, repeated and unused, see data_use).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from w2s.modeling import load_tokenizer, weights_fingerprint
    from w2s.runs import content_hash, file_hash

    # Workers run in their own working directory: hand them absolute paths.
    init_model, data, output_dir = (Path(p).resolve() for p in (init_model, data, output_dir))
    if output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / TRAINED_MARKER).is_file():
        raise ValueError(f"output folder {output_dir} exists and was not written by train(): pick another, "
                         "or remove it yourself")
    tokenizer = load_tokenizer(init_model)  # a missing model, column or over-long row fails before any worker starts
    rows = _rows(str(data), config, reference)
    _check_lengths(rows, tokenizer, config.mode, max_length, data)
    _claim_checkpoints(Path(storage_dir).resolve() / name, content_hash(
        config, weights_fingerprint(init_model), file_hash(data), max_length, reference))
    use_gpu = config.use_gpu if config.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"train": config.model_dump(), "init_model": str(init_model), "data": str(data),
                           "name": name, "use_gpu": use_gpu, "reference": reference, "max_length": max_length,
                           "cpu_threads": max(1, int(cpus_per_worker)),
                           "tensorboard_dir": str(tensorboard_dir) if tensorboard_dir else None},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(Path(storage_dir).resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=config.max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training stage {name!r} failed") from result.error
    staging = output_dir.with_name(output_dir.name + ".partial")  # ours: a copy cut short is never the result
    with result.checkpoint.as_directory() as ckpt:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(Path(ckpt) / "model", staging)
        (staging / TRAINED_MARKER).write_text(name)
        summary = json.loads((Path(ckpt) / "train_summary.json").read_text())
    summary["data"] = use = data_use(len(rows), config, config.num_workers)
    if use["rows_repeated"] or use["rows_unused"]:
        print(f"[train {name}] {use['rows']} rows in {use['steps']} steps: {use['rows_repeated']} repeated to fill "
              f"an epoch's last step, {use['rows_unused']} unused (epochs {config.epochs:g})", flush=True)
    if output_dir.exists():  # empty, or a model this function wrote before (checked above)
        shutil.rmtree(output_dir)
    staging.rename(output_dir)
    return summary
