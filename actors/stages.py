"""Ray Data stages that stream rows through the model-hosting actors.

- `score_preferences`: a preference file -> validated pairs -> per-token log-probs of chosen and
  rejected under every host, as Parquet; malformed rows are set aside (Parquet too) and counted.
- `generate_responses`: prompts -> one response per host, as Parquet.
- `score_by_host`: rows that each name their host (e.g. a MACPO agent's own pairs) -> per-token
  log-probs of the given response columns under that row's host.

Every host is called on a batch at once, so models on different GPUs work in parallel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from w2s.data import PreferenceDataError, check_batch, format_rejections, read_raw, split_checked

# Ray Data tasks here only move text and wait on the hosts: a small CPU share keeps them
# schedulable next to model actors on a 2-core machine.
STAGE_CPUS = 0.25


class _CheckRows:
    def __init__(self, tokenizer_path: str | None, max_length: int | None):
        from w2s.modeling import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
        self.max_length = max_length if tokenizer_path else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        return check_batch(batch, self.tokenizer, self.max_length)


class _ScoreWithHosts:
    def __init__(self, hosts: dict, responses: tuple[str, ...]):
        self.hosts, self.responses = hosts, responses

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = batch.column("prompt").to_pylist()
        texts = [text for side in self.responses for text in batch.column(side).to_pylist()]
        n = len(prompts)
        # one call per host with every response column stacked, so all hosts work at once
        futures = {role: h.logprobs.remote(prompts * len(self.responses), texts) for role, h in self.hosts.items()}
        for role, future in futures.items():
            logps = ray.get(future)
            for i, side in enumerate(self.responses):
                batch = batch.append_column(f"{role}_{side}_logps", pa.array(logps[i * n:(i + 1) * n], pa.list_(pa.float32())))
        return batch


class _ScoreWithRowHost:
    def __init__(self, hosts: dict, host_column: str, responses: tuple[str, ...], prefix: str):
        self.hosts, self.host_column, self.responses, self.prefix = hosts, host_column, responses, prefix

    def __call__(self, batch: pa.Table) -> pa.Table:
        roles = batch.column(self.host_column).to_pylist()
        prompts = batch.column("prompt").to_pylist()
        columns = {side: batch.column(side).to_pylist() for side in self.responses}
        futures = {}
        for role in dict.fromkeys(roles):  # one call per host, all hosts at once
            rows = [i for i, r in enumerate(roles) if r == role]
            texts = [columns[side][i] for side in self.responses for i in rows]
            futures[role] = (rows, self.hosts[role].logprobs.remote([prompts[i] for i in rows] * len(self.responses), texts))
        out = {side: [None] * len(roles) for side in self.responses}
        for role, (rows, future) in futures.items():
            logps = ray.get(future)
            for k, side in enumerate(self.responses):
                for j, i in enumerate(rows):
                    out[side][i] = logps[k * len(rows) + j]
        for side in self.responses:
            batch = batch.append_column(f"{self.prefix}{side}_logps", pa.array(out[side], pa.list_(pa.float32())))
        return batch


class _GenerateWithHosts:
    def __init__(self, hosts: dict, generation: dict):
        self.hosts, self.generation = hosts, generation

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = batch.column("prompt").to_pylist()
        futures = {role: h.generate.remote(prompts, **self.generation) for role, h in self.hosts.items()}
        for role, future in futures.items():
            batch = batch.append_column(f"{role}_response", pa.array(ray.get(future), pa.string()))
        return batch


@dataclass
class ScoreResult:
    scored_path: Path
    rejected_path: Path
    n_scored: int
    n_rejected: int
    report: str  # human summary of the set-aside rows


def _dataset(table: pa.Table, batch_size: int):
    """A dataset of about one block per batch, cut here. `from_blocks` reads block metadata in this
    process; `from_arrow` and a repartition would each run a task that needs a whole free CPU."""
    step = max(batch_size, -(-table.num_rows // 64))
    return ray.data.from_blocks([table.slice(i, step) for i in range(0, max(table.num_rows, 1), step)])


def score_preferences(data_path: str | Path, hosts: dict, output_dir: str | Path, tokenizer_path: str | None = None,
                      max_length: int | None = None, batch_size: int = 32,
                      responses: tuple[str, ...] = ("chosen", "rejected")) -> ScoreResult:
    """Validate a preference dataset and attach per-token log-probs from every host.

    Writes `<output_dir>/scored.parquet` (source, row, prompt, chosen, rejected, and
    `<role>_<side>_logps` for every side in `responses`) and `<output_dir>/rejected_rows.parquet`
    (source, row, error_field, error). A file that cannot be read at all raises
    `PreferenceDataError` before any model is called.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    raw = read_raw(data_path)
    checked = (_dataset(raw, batch_size)
               .map_batches(_CheckRows, fn_constructor_kwargs={"tokenizer_path": tokenizer_path, "max_length": max_length},
                            batch_format="pyarrow", concurrency=1, num_cpus=STAGE_CPUS))
    # The checked rows are only text: split them here, then stream the good ones through the models.
    good, bad_table = split_checked(_to_table(checked))
    scored_table = _to_table(_dataset(good, batch_size).map_batches(
        _ScoreWithHosts, fn_constructor_kwargs={"hosts": hosts, "responses": tuple(responses)}, batch_size=batch_size,
        batch_format="pyarrow", concurrency=1, num_cpus=STAGE_CPUS)) if good.num_rows else pa.table({})
    bad_table = bad_table.sort_by("row")
    pq.write_table(bad_table, output_dir / "rejected_rows.parquet")
    if scored_table.num_rows == 0:
        raise PreferenceDataError(f"{data_path}: no usable rows; {format_rejections(bad_table)}")
    scored_table = scored_table.sort_by("row")
    pq.write_table(scored_table, output_dir / "scored.parquet")
    return ScoreResult(output_dir / "scored.parquet", output_dir / "rejected_rows.parquet",
                       scored_table.num_rows, bad_table.num_rows, format_rejections(bad_table))


def generate_responses(prompts: pa.Table, hosts: dict, max_new_tokens: int, batch_size: int = 64,
                       do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> pa.Table:
    """One response per prompt row and host, as a `<role>_response` column; row order is kept."""
    generation = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, seed=seed)
    indexed = prompts.append_column("_order", pa.array(range(prompts.num_rows), pa.int64()))
    ds = (_dataset(indexed, batch_size)
          .map_batches(_GenerateWithHosts, fn_constructor_kwargs={"hosts": hosts, "generation": generation},
                       batch_size=batch_size, batch_format="pyarrow", concurrency=1, num_cpus=STAGE_CPUS))
    return _to_table(ds).sort_by("_order").drop_columns(["_order"])


def score_by_host(table: pa.Table, hosts: dict, host_column: str, responses: tuple[str, ...],
                  prefix: str = "", batch_size: int = 64) -> pa.Table:
    """Per-token log-probs of each row's `responses` columns under the host named in its
    `host_column`, as `<prefix><response>_logps` columns; row order is kept."""
    unknown = set(table.column(host_column).to_pylist()) - set(hosts)
    if unknown:
        raise ValueError(f"{host_column}: no host for {sorted(unknown)}; hosts are {sorted(hosts)}")
    indexed = table.append_column("_order", pa.array(range(table.num_rows), pa.int64()))
    ds = _dataset(indexed, batch_size).map_batches(
        _ScoreWithRowHost, fn_constructor_kwargs={"hosts": hosts, "host_column": host_column,
                                                  "responses": tuple(responses), "prefix": prefix},
        batch_size=batch_size, batch_format="pyarrow", concurrency=1, num_cpus=STAGE_CPUS)
    return _to_table(ds).sort_by("_order").drop_columns(["_order"])


def _to_table(ds) -> pa.Table:
    blocks = [b for b in ray.get(ds.to_arrow_refs()) if b.num_rows]
    return pa.concat_tables(blocks, promote_options="default") if blocks else pa.table({})
