"""Ray Data stages that stream rows through the job's model hosts.

- `score_preferences`: a preference file -> validated pairs -> per-token log-probs of chosen and
  rejected under every host, as Parquet; malformed rows are set aside (Parquet too) and counted.
- `generate_responses`: prompts -> one response per host, as Parquet.
- `score_by_host`: rows that each name their host (e.g. a MACPO agent's own pairs) -> per-token
  log-probs of the given response columns under that row's host.
- `reward_responses`: prompt + response rows -> one score per row from every reward-model host.

Each batch calls every host it needs at once, so models on different GPUs work in parallel, and a few
batches are in flight at a time, so a host always has the next call queued. On CPUs, a scoring stage whose
hosts HostPool made `alone` (large models) has them take turns instead, one host's rows after another's, each
with every CPU. The Ray Data tasks only move text and wait on the hosts: they reserve no CPU (the job's
training workers may hold them all), and Ray reuses their worker processes from one stage to the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from w2s.data import REJECTED_SCHEMA, PreferenceDataError, check_batch, format_rejections, iter_raw, split_checked

IN_FLIGHT = 4  # batches handed to the hosts at once
CHUNK_ROWS = 8192  # records read, checked and scored at a time by score_preferences


def _score_batch(batch: pa.Table, hosts: dict, responses: tuple[str, ...]) -> pa.Table:
    """Every host scores every response column of the batch (one call per host, all hosts at once)."""
    prompts = batch.column("prompt").to_pylist()
    texts = [text for side in responses for text in batch.column(side).to_pylist()]
    n = len(prompts)
    futures = {role: host.logprobs(prompts * len(responses), texts) for role, host in hosts.items()}
    for role, future in futures.items():
        logps = ray.get(future)
        for i, side in enumerate(responses):
            batch = batch.append_column(f"{role}_{side}_logps", logps.slice(i * n, n))
    return batch


def _score_in_turns(table: pa.Table, hosts: dict, responses: tuple[str, ...], batch_size: int) -> pa.Table:
    """`_score_batch` over `table`, the hosts one after the other in one Ray Data pass: every row once per host,
    a host's rows in a row, so that one host computes at a time with all the node's CPUs (HostPool.hosts'
    `alone`; measured in actors.model_host, TURNS_MIN_WEIGHT_BYTES)."""
    n, roles = table.num_rows, list(hosts)
    by_role = pa.concat_tables([table.append_column("_role", pa.array([role] * n, pa.string())) for role in roles])
    scored = _through_hosts(by_role, _score_rows_by_role, {"hosts": hosts, "responses": responses}, batch_size)
    for k, role in enumerate(roles):  # _through_hosts keeps the row order: role k's rows are the k-th n
        mine = scored.slice(k * n, n)
        for side in responses:
            table = table.append_column(f"{role}_{side}_logps", mine[f"{role}_{side}_logps"])
    return table


def _score_rows_by_role(batch: pa.Table, hosts: dict, responses: tuple[str, ...]) -> pa.Table:
    """Each row scored by the host of the role its `_role` names (a batch may hold the end of one role's rows
    and the start of the next's)."""
    parts = [_score_batch(batch.filter(pc.equal(batch["_role"], role)), {role: hosts[role]}, responses)
             for role in pc.unique(batch["_role"]).to_pylist()]
    return pa.concat_tables(parts, promote_options="default")


def _score_batch_by_host(batch: pa.Table, hosts: dict, host_column: str, responses: tuple[str, ...],
                         prefix: str) -> pa.Table:
    """Each row's response columns scored by the host its `host_column` names (one call per host)."""
    roles = batch.column(host_column).to_pylist()
    prompts = batch.column("prompt").to_pylist()
    columns = {side: batch.column(side).to_pylist() for side in responses}
    futures = {}
    for role in dict.fromkeys(roles):
        rows = [i for i, r in enumerate(roles) if r == role]
        texts = [columns[side][i] for side in responses for i in rows]
        futures[role] = (rows, hosts[role].logprobs([prompts[i] for i in rows] * len(responses), texts))
    out = {side: [None] * len(roles) for side in responses}
    for role, (rows, future) in futures.items():
        logps = ray.get(future).to_pylist()
        for k, side in enumerate(responses):
            for j, i in enumerate(rows):
                out[side][i] = logps[k * len(rows) + j]
    for side in responses:
        batch = batch.append_column(f"{prefix}{side}_logps", pa.array(out[side], pa.list_(pa.float32())))
    return batch


def _generate_batch(batch: pa.Table, hosts: dict, generation: dict) -> pa.Table:
    prompts = batch.column("prompt").to_pylist()
    futures = {role: host.generate(prompts, **generation) for role, host in hosts.items()}
    for role, future in futures.items():
        batch = batch.append_column(f"{role}_response", pa.array(ray.get(future), pa.string()))
    return batch


def _reward_batch(batch: pa.Table, hosts: dict) -> pa.Table:
    prompts, responses = batch.column("prompt").to_pylist(), batch.column("response").to_pylist()
    futures = {role: host.rewards(prompts, responses) for role, host in hosts.items()}
    for role, future in futures.items():
        batch = batch.append_column(f"{role}_reward", ray.get(future))
    return batch


def _through_hosts(table: pa.Table, fn, fn_kwargs: dict, batch_size: int) -> pa.Table:
    """`fn` over `table` in batches (Ray Data tasks that call the hosts; one batch, from here), in row order."""
    # One batch (or none: the columns `fn` adds) is called from here: nothing to stream, and a Ray Data job
    # costs seconds to start (its first in a job: about 8 s on 2 CPUs) for what the hosts do in milliseconds.
    if table.num_rows <= batch_size:
        return fn(table, **fn_kwargs)
    indexed = table.append_column("_order", pa.array(range(table.num_rows), pa.int64()))
    step = max(batch_size, -(-table.num_rows // 64))  # about one block per batch, cut here
    blocks = [indexed.slice(i, step) for i in range(0, indexed.num_rows, step)]
    # `from_blocks` reads block metadata in this process: no task that would need a free CPU
    ds = ray.data.from_blocks(blocks).map_batches(fn, fn_kwargs=fn_kwargs, batch_size=batch_size,
                                                  batch_format="pyarrow", num_cpus=0,
                                                  compute=ray.data.TaskPoolStrategy(size=min(IN_FLIGHT, len(blocks))))
    results = [b for b in ray.get(ds.to_arrow_refs()) if b.num_rows]
    return pa.concat_tables(results, promote_options="default").sort_by("_order").drop_columns(["_order"])


@dataclass
class ScoreResult:
    scored_path: Path
    rejected_path: Path
    n_scored: int
    n_rejected: int
    report: str  # human summary of the set-aside rows


def score_preferences(data_path: str | Path, hosts: dict, output_dir: str | Path, tokenizer_path: str | None = None,
                      max_length: int | None = None, batch_size: int = 32,
                      responses: tuple[str, ...] = ("chosen", "rejected")) -> ScoreResult:
    """Validate a preference dataset and attach per-token log-probs from every host.

    Writes `<output_dir>/scored.parquet` (source, row, prompt, chosen, rejected, and
    `<role>_<side>_logps` for every side in `responses`) and `<output_dir>/rejected_rows.parquet`
    (source, row, error_field, error). A file that cannot be read at all raises
    `PreferenceDataError` before any model is called.

    Hosts that each have all the node's CPUs (`alone`: HostPool.hosts with `turns`, for large models on CPUs)
    score one after the other; otherwise all at once.

    The file is read, checked and scored CHUNK_ROWS records at a time, and each chunk's rows are
    written out before the next is read: memory holds one chunk, whatever the size of the file.
    """
    from w2s.modeling import load_tokenizer

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # The check is text work: done here, where the tokenizer is, chunk by chunk, before its rows are scored.
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
    scored_path, rejected_path = output_dir / "scored.parquet", output_dir / "rejected_rows.parquet"
    turns = len(hosts) > 1 and all(host.alone for host in hosts.values())  # hosts given every CPU take turns
    with _ParquetOut(scored_path) as scored, _ParquetOut(rejected_path, REJECTED_SCHEMA) as rejected:
        for raw in iter_raw(data_path, CHUNK_ROWS):
            good, bad = split_checked(check_batch(raw, tokenizer, max_length if tokenizer else None))
            rejected.write(bad)
            if good.num_rows:
                scored.write(_score_in_turns(good, hosts, tuple(responses), batch_size) if turns else
                             _through_hosts(good, _score_batch, {"hosts": hosts, "responses": tuple(responses)},
                                            batch_size))
    bad_table = pq.read_table(rejected_path)
    if scored.rows == 0:
        scored_path.unlink(missing_ok=True)
        raise PreferenceDataError(f"{data_path}: no usable rows; {format_rejections(bad_table)}")
    return ScoreResult(scored_path, rejected_path, scored.rows, rejected.rows, format_rejections(bad_table))


class _ParquetOut:
    """A Parquet file written one table at a time (the schema of the first, or `schema`)."""

    def __init__(self, path: Path, schema: pa.Schema | None = None):
        self.path, self.schema, self.writer, self.rows = path, schema, None, 0

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, self.schema or table.schema)
        self.writer.write_table(table.cast(self.writer.schema))
        self.rows += table.num_rows

    def __enter__(self) -> "_ParquetOut":
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is None and self.schema is not None:  # an empty file with its columns
            pq.write_table(self.schema.empty_table(), self.path)
        elif self.writer is not None:
            self.writer.close()


def generate_responses(prompts: pa.Table, hosts: dict, max_new_tokens: int, batch_size: int = 64,
                       do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> pa.Table:
    """One response per prompt row and host, as a `<role>_response` column; row order is kept."""
    generation = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, seed=seed)
    return _through_hosts(prompts, _generate_batch, {"hosts": hosts, "generation": generation}, batch_size)


def score_by_host(table: pa.Table, hosts: dict, host_column: str, responses: tuple[str, ...],
                  prefix: str = "", batch_size: int = 64) -> pa.Table:
    """Per-token log-probs of each row's `responses` columns under the host named in its
    `host_column`, as `<prefix><response>_logps` columns; row order is kept."""
    unknown = set(table.column(host_column).to_pylist()) - set(hosts)
    if unknown:
        raise ValueError(f"{host_column}: no host for {sorted(unknown)}; hosts are {sorted(hosts)}")
    return _through_hosts(table, _score_batch_by_host, {"hosts": hosts, "host_column": host_column,
                                                        "responses": tuple(responses), "prefix": prefix}, batch_size)


def score_responses(table: pa.Table, hosts: dict, batch_size: int = 64) -> pa.Table:
    """`table` (`prompt`, `response`) with a `<role>_response_logps` column (per-token log-probs) per host of a
    causal LM; row order is kept."""
    return _through_hosts(table, _score_batch, {"hosts": hosts, "responses": ("response",)}, batch_size)


def reward_responses(table: pa.Table, hosts: dict, batch_size: int = 32) -> pa.Table:
    """`table` (`prompt`, `response`) with a `<role>_reward` float32 column per reward-model host (HostRef of a
    `task: sequence_classification` or `likelihood_classification` model); row order is kept."""
    return _through_hosts(table, _reward_batch, {"hosts": hosts}, batch_size)
