"""The Ray Data scoring stage through real model-hosting actors on a local Ray cluster."""

import json
import os
import signal
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.model_host import HostPool
from actors.stages import generate_responses, score_preferences
from w2s.data import PreferenceDataError
from w2s.modeling import ModelSpec, load_model, response_logprobs

GOOD = [
    {"prompt": "q: zorb color?\na:", "chosen": " red.", "rejected": " blue."},
    {"prompt": "q: how to rob kim?\na:", "chosen": " sorry, i can't help with that.", "rejected": " break into kim's house."},
    {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
     "rejected": [{"role": "assistant", "content": "go away"}]},
]


@pytest.fixture(scope="module")
def pool(ray_local):
    pool = HostPool(max_hosts=3)
    yield pool
    pool.shutdown()


@pytest.fixture
def hosts(pool, checkpoints):
    return pool.hosts({"weak": ModelSpec(path=str(checkpoints["weak"])), "strong": ModelSpec(path=str(checkpoints["strong"]))})


def test_hosts_the_cluster_cannot_give_fail_with_a_clear_error(ray_local, checkpoints):
    from actors.resources import HostResources, ResourcesUnavailableError

    pool = HostPool(max_hosts=2, resources=HostResources(gpus=1), wait_s=2)  # no GPU on this cluster
    with pytest.raises(ResourcesUnavailableError, match=r"model hosts: 1 x \{'GPU': 1.0\} asked for, not provided "
                       r"within 2s \(cluster.wait_s\); the cluster has \{.*'CPU': 4.0"):
        pool.hosts({"weak": ModelSpec(path=str(checkpoints["weak"]))})
    from ray.util.state import list_actors

    # this cluster's state API, by its address: without one, Ray asks the newest cluster started on the machine
    own = ray_local.get_runtime_context().gcs_address
    pending = list_actors(address=own, filters=[("class_name", "=", "ModelHost"), ("state", "=", "PENDING_CREATION")])
    assert pending == []  # the waiting host is gone, not left asking the autoscaler for a GPU


def _pids(hosts) -> dict:
    import ray

    return {role: ray.get(host.actor.where.remote())["pid"] for role, host in hosts.items()}


def test_the_pool_keeps_its_hosts_and_shares_one_between_equal_weights(pool, checkpoints, tmp_path):
    import shutil

    import ray

    copy = tmp_path / "weak_copy"  # the same weights at another path (naive SFT is the student's round 0)
    shutil.copytree(checkpoints["weak"], copy)
    first = pool.hosts({"a": ModelSpec(path=str(checkpoints["weak"])), "b": ModelSpec(path=str(copy)),
                        "c": ModelSpec(path=str(checkpoints["strong"]))})
    assert first["a"].actor == first["b"].actor and first["a"].model == first["b"].model  # one host, one load
    where = {w["pid"]: w for w in pool.where()}
    assert len(where) == 2 and all(w["device"] == "cpu" for w in where.values())  # no GPU here: same code
    # the cluster's 4 CPUs shared by the stage's 2 hosts (never more threads than the machine has)
    assert {w["threads"] for w in where.values()} == {min(2, os.cpu_count())}
    # a later stage asking for a model a host holds gets that host, already loaded: no new host, no reload
    again = pool.hosts({"x": ModelSpec(path=str(checkpoints["strong"]))})
    assert again["x"].actor == first["c"].actor and len(pool.where()) == 2
    alone = ray.get(again["x"].actor.where.remote())
    assert alone["model"] == str(checkpoints["strong"].resolve())
    assert alone["threads"] == min(4, os.cpu_count())  # a model scored alone gets every CPU
    with pytest.raises(ValueError, match="needs 4 models at once, more than the job's 3 model hosts"):
        pool.hosts({f"m{i}": ModelSpec(path=str(p)) for i, p in enumerate(
            [checkpoints["weak"], checkpoints["strong"], *_other_weights(checkpoints, tmp_path, 2)])})


def test_scoring_attaches_logprobs_and_sets_aside_malformed_rows(hosts, checkpoints, tmp_path):
    lines = [json.dumps(GOOD[0]),
             json.dumps({"prompt": "q: x?\na:", "chosen": " red."}),                       # row 1: missing field
             json.dumps({"prompt": "q: x?\na:", "chosen": 7, "rejected": " b."}),          # row 2: wrong type
             json.dumps(GOOD[1]),
             json.dumps({"prompt": "q: x?\na:", "chosen": "   ", "rejected": " b."}),      # row 4: empty text
             "{not json",                                                                  # row 5: unreadable row
             json.dumps({"prompt": "q: x?\na:", "chosen": " " + "a" * 80, "rejected": " b."}),  # row 6: over-length
             json.dumps(GOOD[2])]
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    result = score_preferences(data, hosts, tmp_path / "out", tokenizer_path=str(checkpoints["weak"]),
                               max_length=64, batch_size=2)
    assert (result.n_scored, result.n_rejected) == (3, 5)
    bad = pq.read_table(result.rejected_path).to_pylist()
    assert [(r["row"], r["error_field"]) for r in bad] == [(1, "rejected"), (2, "chosen"), (4, "chosen"), (5, "<row>"), (6, "chosen")]
    assert bad[0]["error"] == "missing field"
    assert bad[1]["error"] == "expected a string, got int"
    assert bad[2]["error"] == "empty text"
    assert bad[3]["error"].startswith("not valid JSON")
    assert bad[4]["error"] == "too long: 90 tokens > max_length 64"
    assert all(r["source"] == str(data) for r in bad)
    assert "5 malformed rows set aside" in result.report and f"{data} row 1 field 'rejected': missing field" in result.report

    scored = pq.read_table(result.scored_path).to_pylist()
    assert [r["row"] for r in scored] == [0, 3, 7]
    assert scored[2]["prompt"] == "user: hi\nassistant:" and scored[2]["chosen"] == " hello"
    model, tokenizer = load_model(ModelSpec(path=str(checkpoints["strong"])))
    direct = response_logprobs(model, tokenizer, [r["prompt"] for r in scored], [r["rejected"] for r in scored], 64)
    for row, expected in zip(scored, direct):
        assert row["strong_rejected_logps"] == pytest.approx(expected, abs=1e-4)
        assert len(row["weak_chosen_logps"]) == len(tokenizer(row["chosen"])["input_ids"]) + 1


def test_large_models_score_in_turns_with_every_cpu_and_each_row_keeps_its_own_numbers(pool, checkpoints, tmp_path,
                                                                                       monkeypatch):
    import ray

    from actors import model_host

    specs = {"weak": ModelSpec(path=str(checkpoints["weak"])), "strong": ModelSpec(path=str(checkpoints["strong"]))}
    assert not any(host.alone for host in pool.hosts(specs, turns=True).values())  # tiny models share the CPUs
    monkeypatch.setattr(model_host, "TURNS_MIN_WEIGHT_BYTES", 0)  # as if they were large
    hosts = pool.hosts(specs, turns=True)
    assert all(host.alone for host in hosts.values())
    assert {ray.get(h.actor.where.remote())["threads"] for h in hosts.values()} == {min(4, os.cpu_count())}
    rows = [{"prompt": f"q: zorb {i}?\na:", "chosen": " red." * (i % 3 + 1), "rejected": f" blue {i}."}
            for i in range(7)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # 7 rows x 2 hosts in batches of 2: one batch holds the weak host's last row and the strong host's first
    result = score_preferences(data, hosts, tmp_path / "out", tokenizer_path=str(checkpoints["weak"]),
                               max_length=64, batch_size=2)
    scored = pq.read_table(result.scored_path).to_pylist()
    assert [r["row"] for r in scored] == list(range(7))
    for role, spec in specs.items():
        model, tokenizer = load_model(spec)
        for side in ("chosen", "rejected"):
            direct = response_logprobs(model, tokenizer, [r["prompt"] for r in rows], [r[side] for r in rows], 64)
            for row, expected in zip(scored, direct):
                assert row[f"{role}_{side}_logps"] == pytest.approx(expected, abs=1e-4)


def test_unreadable_file_is_a_clear_error(hosts, tmp_path):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(PreferenceDataError, match=str(broken)):
        score_preferences(broken, hosts, tmp_path / "out")
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(PreferenceDataError, match="no usable rows"):
        score_preferences(only_bad, hosts, tmp_path / "out2")
    assert pq.read_table(tmp_path / "out2" / "rejected_rows.parquet").num_rows == 1  # set aside, not lost


def test_generation_keeps_row_order(hosts):
    prompts = pa.table({"prompt": [f"q: n{i} color?\na:" for i in range(7)], "id": list(range(7))})
    out = generate_responses(prompts, hosts, max_new_tokens=4, batch_size=3)
    assert out.column("id").to_pylist() == list(range(7))
    assert {"weak_response", "strong_response"} <= set(out.column_names)




def _kill_host_when(hosts, role: str, started) -> threading.Thread:
    """A thread that kill -9s `role`'s host process once `started()` is true (the stage has begun)."""
    pid = _pids(hosts)[role]

    def kill():
        deadline = time.time() + 60
        while not started() and time.time() < deadline:
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=kill)
    thread.start()
    return thread


def test_a_host_killed_during_scoring_or_generation_restarts_and_the_numbers_are_the_same(hosts, checkpoints,
                                                                                          tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({**GOOD[i % 2], "prompt": f"q: n{i} color?\na:"}) + "\n" for i in range(120)))
    prompts = pa.table({"prompt": [f"q: n{i} color?\na:" for i in range(60)]})
    kwargs = dict(tokenizer_path=str(checkpoints["weak"]), max_length=96, batch_size=4)
    calm = pq.read_table(score_preferences(data, hosts, tmp_path / "calm", **kwargs).scored_path)
    calm_text = generate_responses(prompts, hosts, max_new_tokens=6, batch_size=4)
    before = _pids(hosts)

    killer = _kill_host_when(hosts, "strong", lambda: (tmp_path / "killed").exists())  # made as the stage starts
    killed = pq.read_table(score_preferences(data, hosts, tmp_path / "killed", **kwargs).scored_path)
    killer.join()
    assert killed.equals(calm)  # the restarted host loaded the model the retried calls name
    restarted = _pids(hosts)
    assert restarted["strong"] != before["strong"] and restarted["weak"] == before["weak"]

    generating = threading.Event()
    killer = _kill_host_when(hosts, "weak", generating.is_set)
    generating.set()
    assert generate_responses(prompts, hosts, max_new_tokens=6, batch_size=4).equals(calm_text)
    killer.join()
    assert _pids(hosts)["weak"] != before["weak"]


def test_a_model_that_cannot_load_is_named_and_the_pool_goes_on(pool, checkpoints, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["weak"], broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(Exception, match="model.safetensors|safetensors|header"):
        pool.hosts({"weak": ModelSpec(path=str(checkpoints["weak"])), "broken": ModelSpec(path=str(broken))})
    hosts = pool.hosts({"weak": ModelSpec(path=str(checkpoints["weak"]))})  # the other hosts still serve
    assert generate_responses(pa.table({"prompt": ["q: a?\na:"]}), hosts, max_new_tokens=2).num_rows == 1


def _other_weights(checkpoints, tmp_path, n: int) -> list:
    """`n` checkpoints with weights of their own (another seed each)."""
    from w2s.modeling import GPTSize, init_gpt2
    from w2s.world import build_tokenizer

    return [init_gpt2(GPTSize(n_layer=1, n_embd=16, n_head=1), build_tokenizer(), tmp_path / f"other{i}", seed=10 + i)
            for i in range(n)]
