"""What every entry point shares: arguments, config loading, connecting to Ray, the run's job.log, one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from w2s.config import ConfigError, load_config
from w2s.metrics import over_seeds
from w2s.runs import RunDir, markdown_table


def parse_args(description: str, default_config: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set align.lr=1e-4 (repeatable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start runs/<run_name> afresh (without it, the same config continues the run there "
                             "and another config is refused)")
    return parser.parse_args()


# Lines that say nothing a user acts on: kept in the run's job.log, not shown on screen.
SCREEN_NOISE = (
    "Setting accelerator to CPU",  # DeepSpeed, once per process on a machine without GPUs
    "deepspeed_shm_comm_op built successfully",  # DeepSpeed's CPU op, once per training worker
    "has constructor arguments in the object store and max_restarts",  # a C++ line about Ray Train's own actors
    "PYTHON worker processes have been started on node",  # the raylet counting the job's CPU-less hosts and tasks
)


class _Tee:
    """A text stream that writes everything to a file (the run folder's log) and to the screen all but the
    lines of SCREEN_NOISE, a whole line at a time (a carriage return ends one too: progress bars). Stages that run
    side by side print from several threads, and print() writes a line's text and its end separately: each
    thread's text waits in its own buffer until its line ends, so lines are never cut into or repeated."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file
        self.lock, self.pending = threading.Lock(), threading.local()

    def write(self, text: str) -> int:
        pending = getattr(self.pending, "text", "") + text
        end = max(pending.rfind("\n"), pending.rfind("\r")) + 1
        self.pending.text = pending[end:]
        if end:
            self._emit(pending[:end])
        return len(text)

    def _emit(self, lines: str) -> None:
        shown = [line for line in lines.splitlines(keepends=True) if not any(noise in line for noise in SCREEN_NOISE)]
        with self.lock:
            self.file.write(lines)
            self.stream.write("".join(shown))

    def flush(self) -> None:
        """Text without its line end yet is written as it is (a flush asks for it now)."""
        if getattr(self.pending, "text", ""):
            self._emit(self.pending.text)
            self.pending.text = ""
        with self.lock:
            self.file.flush()
            self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


@contextlib.contextmanager
def keep_log(run: RunDir):
    """Within: everything the job prints (its workers' lines included) also goes to `<run folder>/job.log`,
    and so does the error that ends it."""
    saved = sys.stdout, sys.stderr
    with open(run.path / "job.log", "a", buffering=1) as log:
        sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
        try:
            yield
        except BaseException as err:
            log.write(f"error: {err}\n" if isinstance(err, user_errors()) else f"failed: {type(err).__name__}: {err}\n")
            raise
        finally:
            sys.stdout.flush(), sys.stderr.flush()  # a last line without its end
            sys.stdout, sys.stderr = saved


def user_errors() -> tuple[type[Exception], ...]:
    """The project's own errors: bad config, data, model or run folder. A job reports them as one line."""
    from actors.resources import ResourcesUnavailableError
    from actors.trainer import CheckpointMismatchError
    from w2s.data import PreferenceDataError
    from w2s.modeling import ModelLoadError, TokenizerMismatchError, TooLongError
    from w2s.runs import RunExistsError

    return (ConfigError, PreferenceDataError, ModelLoadError, TooLongError, TokenizerMismatchError, RunExistsError,
            CheckpointMismatchError, ResourcesUnavailableError)


def main(job: Callable[[], Any]) -> None:
    """Run an entry point: a user error is one message on stderr and exit code 2, not a traceback."""
    try:
        job()
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def load(cls, args: argparse.Namespace):
    return load_config(cls, args.config, args.overrides)


# Same config, same numbers on a machine: MKL's conditional numerical reproducibility (MKL_CBWR) makes its
# matmuls repeat bit for bit from run to run, on the fastest code path the CPU has (AUTO). Pinning every CPU to
# the AVX2 paths instead (MKL_CBWR=AVX2, ATEN_CPU_CAPABILITY=avx2, this project's default until 2026-12) did not
# make an AMD EPYC and an Intel Xeon agree, and cost the Xeon (AVX-512) 37% of its matmul speed and 40% of a
# training step (README, "Seeds, and what varies"). Set either variable yourself to choose other kernels: every
# Ray worker of the job gets what the driver has.
CPU_KERNELS = {"MKL_CBWR": "AUTO"}
# What every process of a job gets (the driver, and every Ray worker through the runtime env): the CPU kernels,
# and no progress bars from Hugging Face libraries (one bar per model load and save).
JOB_ENV = {**CPU_KERNELS, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
for _name, _value in JOB_ENV.items():
    os.environ.setdefault(_name, _value)  # on import, before any job imports torch or transformers
PASSED_ENV = (*JOB_ENV, "ATEN_CPU_CAPABILITY")  # to the workers, where the driver has them


def connect_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (`ray job submit` sets it; `RAY_ADDRESS=auto` joins a
    local `ray start`), or start a fresh local instance with its dashboard on loopback (with `num_cpus`
    logical CPUs; None: the machine's). Every worker of the job gets the driver's PASSED_ENV (the CPU kernels)
    and the address of its own cluster's state API (_own_state_api).
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # progress lines are printed once, not twice
    if ray.is_initialized():
        return
    env_vars = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, runtime_env={"env_vars": {**env_vars, **_own_state_api(None)}})
    else:  # the dashboard serves Ray's state API, which Ray Train's controller polls: on loopback only
        port = free_port()
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, log_to_driver=True,
                 runtime_env={"env_vars": {**env_vars, **_own_state_api(port)}})
    _quiet_ray_data()


def _own_state_api(dashboard_port: int | None) -> dict[str, str]:
    """What tells a worker which cluster's state API is its own. Without it, Ray's state API finds "the latest
    cluster started on this machine" (/tmp/ray/ray_current_cluster): once a second local Ray starts (another
    job, a test's cluster), Ray Train's placement-group cleaner asks that one for its controller, finds none,
    and tears down a healthy worker group (measured: every test run did, once a test started its own cluster).
    A local instance: its dashboard (the state API) on the port chosen here; a cluster named by RAY_ADDRESS as
    host:port: that address."""
    if dashboard_port is not None:
        return {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}
    address = os.environ.get("RAY_ADDRESS", "")
    return {"RAY_ADDRESS": address} if address and address != "auto" and "://" not in address else {}


def free_port() -> int:
    """A TCP port free on loopback now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_ray_data() -> None:
    """Ray Data's console says what goes wrong, not how each call is planned and timed (its session log,
    ray-data.log, keeps all), nor that the cluster has no free CPU: the job's stages need none."""
    import logging

    import ray.data  # noqa: F401 - sets up its loggers

    class NoFreeCpuNote(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "does not have any available CPUs" not in record.getMessage()

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
            handler.addFilter(NoFreeCpuNote())


Tables = list[tuple[str, list[dict]]]  # (heading, rows) of a job's result tables


def run_seeds(config, run_one: Callable[..., dict], tables: Callable[[dict], Tables],
              sections: Callable[[dict, dict, dict, Path], list[str]] | None = None, overwrite: bool = False,
              workers=None) -> dict:
    """Run a job once per seed of `config.seeds`, print its tables, and return the metrics.

    One seed: the run folder is runs/<run_name>/, as for any run. Several: seed s runs in
    runs/<run_name>/seed_<s>/ with every `seed` field of its config shifted by s (w2s.config.offset_seeds),
    and runs/<run_name>/ gets metrics.json with each seed's metrics under `seeds` and every number's
    mean, std, median, min and max under `over_seeds`, and a report with the tables as mean ± std
    and the job's own `sections(per_seed, mean, std, plots_folder)` (plots with error bars...).
    The run folder follows w2s.runs' resume model: `overwrite` starts it afresh. `run_one(config, run, seed,
    workers=workers)`: `workers` are a caller's own hosts and training workers to share (None: the job starts
    its own).
    """
    def body(run: RunDir) -> tuple[dict, Tables]:
        if config.seeds == [0]:
            metrics = run_one(config, run, 0, workers=workers)
            return metrics, tables(metrics)
        return _several_seeds(config, run, lambda *a: run_one(*a, workers=workers), tables, sections)

    return run_job(config, body, overwrite)


def run_job(config, body: Callable[[RunDir], tuple[dict, Tables]], overwrite: bool = False) -> dict:
    """The run folder of `config` (claimed before any work: another config's run there is refused), its log,
    Ray, then `body(run)` -> (metrics, tables to print)."""
    start = time.perf_counter()
    run = RunDir(config.runs_dir, config.run_name, fresh=overwrite)
    run.claim(config)
    with keep_log(run):
        connect_ray()
        metrics, shown = body(run)
        print()
        for heading, rows in shown:
            print(f"{heading}\n\n{markdown_table(rows)}\n")
        print(f"run folder: {run.path}  (report.md, metrics.json, job.log)  "
              f"wall time {time.perf_counter() - start:.0f}s")
    return metrics


def _several_seeds(config, run: RunDir, run_one, tables, sections) -> tuple[dict, Tables]:
    """Every seed's run in its own folder; the metrics over seeds and their tables as mean ± std."""
    per_seed = {}
    for seed in config.seeds:
        print(f"\n===== seed {seed} ({config.seeds.index(seed) + 1} of {len(config.seeds)}) =====", flush=True)
        per_seed[str(seed)] = run_one(config, RunDir(run.path, f"seed_{seed}"), seed)
    metrics = {"seeds": per_seed, "over_seeds": over_seeds(list(per_seed.values()))}
    run.write_metrics(metrics)
    mean, std = (_pick(metrics["over_seeds"], stat) for stat in ("mean", "std"))
    shown = [(heading, _mean_pm_std(rows, stds)) for (heading, rows), (_, stds) in zip(tables(mean), tables(std))]
    report = [f"{len(config.seeds)} seeds ({', '.join(map(str, config.seeds))}; every `seed` of the config "
              "shifted by each: another world, other initialisations and data orders). Each cell is the mean "
              "± the standard deviation over seeds; each seed's own run is in `seed_<s>/`."]
    report += [f"{heading}\n\n{markdown_table(rows)}" for heading, rows in shown]
    report += sections(per_seed, mean, std, run.path / "plots") if sections else []
    run.write_report(f"{config.run_name}: {len(config.seeds)} seeds", report)
    return {**metrics, "mean": mean, "std": std}, shown


def _pick(tree, stat: str):
    """`over_seeds` output with each number's summary replaced by one statistic of it."""
    if isinstance(tree, dict) and "n" in tree and "mean" in tree:
        return tree[stat]
    if isinstance(tree, dict):
        return {k: _pick(v, stat) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_pick(v, stat) for v in tree]
    return tree


def _mean_pm_std(rows: list[dict], stds: list[dict]) -> list[dict]:
    def cell(mean, std):
        if isinstance(mean, float) and isinstance(std, float):
            return f"{mean:.3f} ± {std:.3f}"
        return mean  # text, or an integer that no seed changes (w2s.metrics.over_seeds)
    return [{k: cell(v, s.get(k)) for k, v in row.items()} for row, s in zip(rows, stds)]
