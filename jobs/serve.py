"""Serve the strong model with weak-to-strong guided decoding (CBS) over an OpenAI-compatible HTTP API.

    python -m jobs.serve [--config configs/serve.yaml] [--set search.w=2 ...]   (until Ctrl-C)
    serve run configs/serve.yaml                                                 (Ray Serve's own CLI, same file)
    ray job submit --working-dir . -- python -m jobs.serve --config configs/serve.yaml

The config is a Ray Serve config file: `http_options` (loopback by default) and one application whose `args` are
actors.serve.ServeConfig; `--set` overrides those args. Relative model paths are read from where this runs.
"""

from __future__ import annotations

import time

from jobs.common import connect_ray, main, parse_args
from w2s.config import ConfigError, apply_overrides, read_yaml, validated


def load_serve_file(path: str, overrides: list[str] | None = None):
    """(http_options, ServeConfig) of a Serve config file, its application's args checked (errors name the file)."""
    from actors.serve import ServeConfig

    data = read_yaml(path)
    apps = data.get("applications")
    if not isinstance(apps, list) or len(apps) != 1 or not isinstance(apps[0], dict):
        raise ConfigError(f"{path}: applications: expected one application (the guided strong model)")
    args = apply_overrides(dict(apps[0].get("args") or {}), overrides)
    http = {"host": "127.0.0.1", "port": 8000, **(data.get("http_options") or {})}
    return http, validated(ServeConfig, args, f"{path}: applications.0.args")


def serve_job() -> None:
    from ray import serve

    from actors.serve import build_app

    args = parse_args(__doc__, "configs/serve.yaml")
    http, config = load_serve_file(args.config, args.overrides)
    app = build_app(config.model_dump())  # a missing model or a mismatched tokenizer stops here, before Ray starts
    connect_ray()
    serve.start(http_options=http)
    serve.run(app, name="w2s-cbs", route_prefix="/")
    print(f"[serve] {config.model_name}: http://{http['host']}:{http['port']}/v1 (OpenAI-compatible; GET /healthz); "
          "Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main(serve_job)
