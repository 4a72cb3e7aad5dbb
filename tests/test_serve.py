"""The guided-decoding server on a real Ray Serve instance on loopback: the `openai` client unchanged, bad requests
answered 4xx, concurrent requests batched (and answered as if alone), overload answered 503."""

import socket

import pytest


@pytest.fixture(scope="module")
def server(ray_local, tiny_guide_models):
    """The tiny world's strong base guided by its weak pair, served on a free loopback port; its base URL."""
    from ray import serve

    from actors.serve import build_app

    models, prompts = tiny_guide_models
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {**{role: spec.model_dump() for role, spec in models.items()}, "model_name": "tiny-cbs",
            "search": {"w": 2, "k": 2, "l": 4}, "sampling": {"max_new_tokens": 16},
            "limits": {"max_prompt_tokens": 40, "max_tokens": 24, "max_rows": 8},
            "max_ongoing_requests": 4, "max_queued_requests": 4, "max_batch_size": 4, "batch_wait_timeout_s": 0.2}
    serve.run(build_app(args), name="w2s-cbs", route_prefix="/")
    yield f"http://127.0.0.1:{port}", prompts
    serve.shutdown()


def test_the_openai_client_works_unchanged(server):
    import json
    import urllib.request

    from openai import OpenAI

    base, prompts = server
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny-cbs"]
    done = client.completions.create(model="tiny-cbs", prompt=prompts[0], max_tokens=12, seed=3,
                                     extra_body={"w": 2, "k": 2, "l": 3})
    assert done.object == "text_completion" and isinstance(done.choices[0].text, str)
    assert 0 < done.usage.completion_tokens <= 12 and done.choices[0].finish_reason in ("stop", "length")
    again = client.completions.create(model="tiny-cbs", prompt=prompts[0], max_tokens=12, seed=3,
                                      extra_body={"w": 2, "k": 2, "l": 3})
    assert again.choices[0].text == done.choices[0].text  # same seed, same answer
    chat = client.chat.completions.create(model="tiny-cbs", messages=[{"role": "user", "content": prompts[1]}],
                                          max_tokens=12)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    with urllib.request.urlopen(f"{base}/healthz", timeout=30) as health:
        assert json.loads(health.read()) == {"status": "ok"}


@pytest.mark.parametrize("body, status, says", [
    ("{not json", 400, "not valid JSON"),
    ({"model": "tiny-cbs", "prompt": "q: a?\na:", "max_tokens": "five"}, 400, "max_tokens"),
    ({"model": "tiny-cbs", "prompt": "q: a?\na:", "w": 4, "k": 4}, 400, "w * k = 16 is over"),
    ({"model": "tiny-cbs", "prompt": "q: a?\na:", "max_tokens": 100}, 400, "max_tokens 100 is over"),
    ({"model": "tiny-cbs", "prompt": "q" * 200}, 400, "200 tokens, over"),
    ({"model": "tiny-cbs", "prompt": "q: a?\na:", "stream": True}, 400, "stream"),
    ({"model": "tiny-cbs", "prompt": "q: a?\na:", "w": 0}, 400, "w: Input should be greater than or equal to 1"),
    ({"prompt": "q: a?\na:"}, 400, "model"),
])
def test_bad_requests_get_a_4xx_that_says_why(server, body, status, says):
    from benchmarks.serve_load import post_json

    base, _ = server
    code, answer = post_json(f"{base}/v1/completions", body, timeout_s=30)
    assert code == status and says in answer["error"]["message"], answer


def test_concurrent_requests_are_answered_as_if_alone_and_overload_gets_503(server):
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.serve_load import post_json, run_load

    base, prompts = server

    def ask(i: int) -> str:
        body = {"model": "tiny-cbs", "prompt": prompts[i], "max_tokens": 10, "seed": 100 + i}
        return post_json(f"{base}/v1/completions", body)[1]["choices"][0]["text"]

    alone = [ask(i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:  # one search batch (max_batch_size 4): each row keeps its own seed
        together = list(pool.map(ask, range(4)))
    assert together == alone
    # no more clients than the replica works on at once: every request answered
    calm = run_load(base, "tiny-cbs", prompts[:4], clients=4, requests=8, seconds=120, extra={"max_tokens": 8})
    assert calm["ok"] == 8 and calm["status_503"] == 0 and calm["p99_s"] is not None, str(calm)
    # 32 clients at once on a replica that takes 4 (and queues 4): Serve sheds the rest with 503, nothing else fails
    burst = run_load(base, "tiny-cbs", prompts[:4], clients=32, requests=64, seconds=120, extra={"max_tokens": 8})
    assert burst["status_503"] > 0 and burst["ok"] > 0
    assert burst["status_5xx_other"] == 0 and burst["no_answer"] == 0 and burst["status_4xx"] == 0


def test_a_zero_in_a_request_is_its_value_not_the_default(checkpoints):
    """temperature 0 is OpenAI's greedy decoding (top-k 1), never the server's default temperature; max_tokens 0 is
    refused, never replaced by the default."""
    from actors.serve import RequestError, ServeConfig, read_request
    from w2s.modeling import ModelSpec
    from w2s.world import build_tokenizer

    models = {role: ModelSpec(path=str(checkpoints["strong" if role == "strong" else "weak"]))
              for role in ("strong", "tuned", "untuned")}
    config = ServeConfig(**models, sampling={"temperature": 0.7, "top_k": 50})
    body = {"model": "w2s-cbs", "prompt": "q: a?\na:", "temperature": 0, "seed": 0}
    greedy = read_request(body, config, build_tokenizer(), chat=False)
    assert (greedy.temperature, greedy.top_k, greedy.seed) == (1.0, 1, 0)
    assert read_request({**body, "temperature": 0.3}, config, build_tokenizer(), chat=False).top_k == 50
    with pytest.raises(RequestError, match="max_tokens"):
        read_request({**body, "max_tokens": 0}, config, build_tokenizer(), chat=False)
