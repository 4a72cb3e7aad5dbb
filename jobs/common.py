"""What every entry point shares: arguments, config loading, connecting to Ray."""

from __future__ import annotations

import argparse
import os
import sys

from w2s.config import ConfigError, load_config


def parse_args(description: str, default_config: str, resumable: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set align.lr=1e-4 (repeatable)")
    if resumable:
        parser.add_argument("--resume", action="store_true",
                            help="continue the run in runs/<run_name>, skipping its finished stages")
    return parser.parse_args()


def load(cls, args: argparse.Namespace):
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as err:
        sys.exit(f"error: {err}")


def connect_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (`ray job submit` sets it; `RAY_ADDRESS=auto` joins a
    local `ray start`), or start a fresh local instance with its dashboard off.
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # progress lines are printed once, not twice
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=True)
