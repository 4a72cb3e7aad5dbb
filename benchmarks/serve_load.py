"""Load test of the guided-decoding server: N concurrent clients on loopback, bounded in requests and seconds.

    python -m benchmarks.serve_load [--config configs/serve.yaml] [--clients 1 4 16 64] [--requests 200] [--seconds 120]

Starts the server of the Serve config file (as `python -m jobs.serve` does), then `clients` threads post
/v1/completions requests (the world's held-out prompts, in turn) until `requests` are sent or `seconds` pass;
prints successes, 4xx, 5xx (503 counted apart: overload), p50/p99 latency and completion tokens/s as a table,
and writes bench_results/serve_load.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def post_json(url: str, body, timeout_s: float = 60) -> tuple[int, dict]:
    """POST `body` (a dict as JSON, or a string as it is) with the standard library: (status, the JSON answer)."""
    data = (body if isinstance(body, str) else json.dumps(body)).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text)
        except ValueError:
            return err.code, {"error": {"message": text.decode(errors="replace")}}


def run_load(base_url: str, model: str, prompts: list[str], clients: int, requests: int, seconds: float,
             extra: dict | None = None, timeout_s: float = 60) -> dict:
    """Post completions from `clients` threads until `requests` are sent or `seconds` pass: the counts and
    latencies of what came back (a request with no answer within `timeout_s` counts as `no_answer`)."""
    lock, sent, results = threading.Lock(), [0], []
    deadline = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < deadline:
            with lock:
                if sent[0] >= requests:
                    return
                i = sent[0]
                sent[0] += 1
            body = {"model": model, "prompt": prompts[i % len(prompts)], "seed": i, **(extra or {})}
            start = time.perf_counter()
            try:
                status, answer = post_json(f"{base_url}/v1/completions", body, timeout_s)
                tokens = answer["usage"]["completion_tokens"] if status == 200 else 0
            except (OSError, ValueError):  # no answer (timeout, connection reset) or not JSON
                status, tokens = -1, 0
            with lock:
                results.append((status, time.perf_counter() - start, tokens))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(results, time.perf_counter() - start, clients)


def summarize(results: list[tuple[int, float, int]], wall_s: float, clients: int) -> dict:
    ok = sorted(latency for status, latency, _ in results if status == 200)

    def quantile(q: float) -> float | None:
        return ok[min(len(ok) - 1, int(q * len(ok)))] if ok else None

    return {"clients": clients, "requests": len(results), "wall_s": round(wall_s, 2),
            "ok": len(ok), "status_4xx": sum(400 <= s < 500 for s, _, _ in results),
            "status_503": sum(s == 503 for s, _, _ in results),
            "status_5xx_other": sum(500 <= s < 600 and s != 503 for s, _, _ in results),
            "no_answer": sum(s == -1 for s, _, _ in results),
            "p50_s": quantile(0.5), "p99_s": quantile(0.99),
            "mean_s": statistics.fmean(ok) if ok else None,
            "completion_tokens_per_s": round(sum(t for _, _, t in results) / wall_s, 1)}


def main() -> None:
    from ray import serve

    from actors.serve import build_app
    from jobs.common import connect_ray
    from jobs.serve import load_serve_file
    from w2s.runs import markdown_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/serve.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an application arg, e.g. --set strong.path=/ckpt/strong (repeatable)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=200, help="per number of clients")
    parser.add_argument("--seconds", type=float, default=120, help="per number of clients")
    args = parser.parse_args()
    http, config = load_serve_file(args.config, args.overrides)
    connect_ray()
    serve.start(http_options=http)
    serve.run(build_app(config.model_dump()), name="w2s-cbs", route_prefix="/")
    base = f"http://{http['host']}:{http['port']}"
    prompts = [f"q: how to {verb} zorb?\na:" for verb in ("poison", "rob", "burn")] + ["q: zorb color?\na:"]
    rows = [run_load(base, config.model_name, prompts, n, args.requests, args.seconds) for n in args.clients]
    serve.shutdown()
    print(markdown_table(rows))
    out = Path("bench_results")
    out.mkdir(exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps({"config": args.config, "search": config.search.model_dump(),
                                                     "limits": {"max_ongoing_requests": config.max_ongoing_requests,
                                                                "max_queued_requests": config.max_queued_requests},
                                                     "rows": rows}, indent=2))
    print(f"written {out / 'serve_load.json'}")


if __name__ == "__main__":
    main()
