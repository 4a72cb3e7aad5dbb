"""Run folders and the content-hash cache.

A run writes `runs/<run-name>/`: config.yaml (resolved), metrics.json, examples/*.parquet,
checkpoints/ (links to the models it used or made), report.md (tables) and plots/*.png.

The resume model, the same for every job: a run folder belongs to one config. The same command
again continues it (finished stages are reused, a killed training stage resumes from its last Ray
Train checkpoint); another config in the same folder is refused unless the job is told to start
the folder afresh (`--overwrite`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel
from tabulate import tabulate


class RunExistsError(RuntimeError):
    """A run folder that holds a run of another config."""


def content_hash(*parts) -> str:
    """A short stable hash of JSON-able parts (configs, parent hashes, code versions). A config's fields named
    in its class's `NOT_IN_KEYS` are left out: they change how a stage runs, not what it makes."""
    blob = json.dumps([_keyed(p) for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _keyed(value, dumped=None):
    """`value` as JSON, configs (at any depth) without their NOT_IN_KEYS fields; `dumped`: its JSON form."""
    if isinstance(value, BaseModel):
        dumped, skip = value.model_dump(mode="json"), getattr(type(value), "NOT_IN_KEYS", ())
        return {name: _keyed(getattr(value, name), dumped[name]) for name in dumped if name not in skip}
    if isinstance(value, (list, tuple)) and dumped is not None:
        return [_keyed(v, d) for v, d in zip(value, dumped)]
    if isinstance(value, dict) and dumped is not None:
        return {k: _keyed(value[k], dumped[k]) for k in dumped}
    return value if dumped is None else dumped


def file_hash(path: str | Path) -> str:
    """A short hash of a file's bytes (data a stage was trained on)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()[:16]


class Cache:
    """Folders keyed by content hash; a folder counts only once its `.complete` marker is written,
    so a stage killed half-way is built again, never half-used."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()  # handed to Ray workers, whose working directory differs
        self.seconds: dict[str, float] = {}  # how long each stage built by this object took

    def path(self, stage: str, key: str) -> Path:
        return self.root / (f"{stage}-{key}" if key else stage)

    def build(self, stage: str, key: str, build: Callable[[Path], None], log: Callable[[str], None] = print) -> Path:
        """The folder of (stage, key), made by `build(folder)` first unless it is complete.

        Jobs that share the cache build a folder one at a time: the second waits on a file lock,
        then finds the folder complete and reuses it.
        """
        path = self.path(stage, key)
        if self.ready(stage, key):
            log(f"{stage}: cached ({path})")
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"{stage}: another job is building it; waiting ({path})")
                fcntl.flock(lock, fcntl.LOCK_EX)
            if self.ready(stage, key):
                log(f"{stage}: built by another job ({path})")
                return path
            log(f"{stage}: building ({path})")
            start = time.perf_counter()
            path.mkdir(parents=True, exist_ok=True)
            build(path)
            self.mark_ready(stage, key)
        self.seconds[stage] = round(time.perf_counter() - start, 1)
        log(f"{stage}: done in {self.seconds[stage]:.0f}s")
        return path

    def ready(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / ".complete").is_file()

    def mark_ready(self, stage: str, key: str) -> None:
        (self.path(stage, key) / ".complete").write_text("")


class RunDir:
    def __init__(self, runs_dir: str | Path, name: str, fresh: bool = False):
        """`fresh`: empty the folder first (a job's --overwrite)."""
        self.path = Path(runs_dir) / name
        if fresh and self.path.is_dir():
            shutil.rmtree(self.path)
        for sub in ("examples", "checkpoints", "plots"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    def claim(self, config: BaseModel, name: str = "config.yaml") -> None:
        """Record `config` as this run's (`name`: config.yaml, or another config the run depends on).
        The same config again continues the run; another one is refused with RunExistsError. Its `cluster`
        section (where the work runs, not what it makes) may differ: a run can move to another cluster."""
        def what(dumped: dict) -> dict:
            return {k: v for k, v in dumped.items() if k != "cluster"}

        file, wanted = self.path / name, config.model_dump(mode="json")
        if file.is_file() and what(yaml.safe_load(file.read_text())) != what(wanted):
            raise RunExistsError(f"{self.path} holds a run of another config ({file} differs): pick another "
                                 "run_name, or add --overwrite to start this folder afresh")
        file.write_text(yaml.safe_dump(wanted, sort_keys=False))

    def metrics(self) -> dict:
        file = self.path / "metrics.json"
        return json.loads(file.read_text()) if file.is_file() else {}

    def update_metrics(self, update: dict) -> dict:
        """Deep-merge `update` into metrics.json (other jobs' sections are kept)."""
        def merge(base: dict, new: dict) -> dict:
            for key, value in new.items():
                base[key] = merge(base.get(key, {}), value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
            return base
        metrics = merge(self.metrics(), update)
        self.write_metrics(metrics)
        return metrics

    def write_metrics(self, metrics: dict) -> None:
        """Replace metrics.json whole, atomically: a reader never sees half a file."""
        tmp = self.path / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2))
        os.replace(tmp, self.path / "metrics.json")

    def write_examples(self, name: str, table: pa.Table) -> Path:
        path = self.path / "examples" / f"{name}.parquet"
        pq.write_table(table, path)
        return path

    def link(self, name: str, target: str | Path) -> None:
        """A link in the run folder to something cached elsewhere (a model, the world's data)."""
        link = self.path / name
        if link.is_symlink():
            link.unlink()
        elif link.exists():  # a real file or folder: not ours to replace
            raise FileExistsError(f"{link} exists and is not a link this run made: move it, or pick another run_name")
        os.symlink(Path(target).resolve(), link)

    def keep(self, name: str, source: str | Path) -> None:
        """A copy in the run folder of a model trained from the user's own checkpoints: it outlives the
        cache (`make clean`). Replaces this run's earlier link or copy of the same name."""
        path = self.path / name
        if path.is_symlink():
            path.unlink()
        staging = path.with_name(path.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)

    def write_report(self, title: str, sections: list[str]) -> Path:
        path = self.path / "report.md"
        path.write_text(f"# {title}\n\n" + "\n\n".join(sections) + "\n")
        return path


def markdown_cell(text) -> str:
    """`text` on one line of a Markdown table: a newline or a `|` would end its row or cell."""
    return str(text).strip().replace("\n", "\\n").replace("|", "\\|")


def markdown_table(rows: list[dict], floatfmt: str | list[str] = ".3f") -> str:
    """A GitHub table of `rows` (`floatfmt`: one format, or one per column)."""
    return tabulate(rows, headers="keys", tablefmt="github", floatfmt=floatfmt)
