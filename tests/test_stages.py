"""The Ray Data scoring stage through real model-hosting actors on a local Ray cluster."""

import json
import os
import signal
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.model_host import ModelGroup
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
def group(ray_local, checkpoints):
    specs = {"weak": ModelSpec(path=str(checkpoints["weak"])), "strong": ModelSpec(path=str(checkpoints["strong"]))}
    with ModelGroup(specs) as g:
        yield g


def test_group_places_each_model_in_its_own_actor(group):
    where = group.where()
    assert sorted(w["role"] for w in where) == ["strong", "weak"]
    assert all(w["device"] == "cpu" for w in where)  # no GPU here: same code, num_gpus=0


def test_scoring_attaches_logprobs_and_sets_aside_malformed_rows(group, checkpoints, tmp_path):
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
    result = score_preferences(data, group.hosts, tmp_path / "out", tokenizer_path=str(checkpoints["weak"]),
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


def test_unreadable_file_is_a_clear_error(group, tmp_path):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(PreferenceDataError, match=str(broken)):
        score_preferences(broken, group.hosts, tmp_path / "out")
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(PreferenceDataError, match="no usable rows"):
        score_preferences(only_bad, group.hosts, tmp_path / "out2")
    assert pq.read_table(tmp_path / "out2" / "rejected_rows.parquet").num_rows == 1  # set aside, not lost


def test_generation_keeps_row_order(group):
    prompts = pa.table({"prompt": [f"q: n{i} color?\na:" for i in range(7)], "id": list(range(7))})
    out = generate_responses(prompts, group.hosts, max_new_tokens=4, batch_size=3)
    assert out.column("id").to_pylist() == list(range(7))
    assert {"weak_response", "strong_response"} <= set(out.column_names)




def _kill_host_when(group, role: str, started) -> threading.Thread:
    """A thread that kill -9s `role`'s host process once `started()` is true (the stage has begun)."""
    pid = next(w["pid"] for w in group.where() if w["role"] == role)

    def kill():
        deadline = time.time() + 60
        while not started() and time.time() < deadline:
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=kill)
    thread.start()
    return thread


def test_a_host_killed_during_scoring_or_generation_restarts_and_the_numbers_are_the_same(group, checkpoints,
                                                                                          tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({**GOOD[i % 2], "prompt": f"q: n{i} color?\na:"}) + "\n" for i in range(120)))
    prompts = pa.table({"prompt": [f"q: n{i} color?\na:" for i in range(60)]})
    kwargs = dict(tokenizer_path=str(checkpoints["weak"]), max_length=96, batch_size=4)
    calm = pq.read_table(score_preferences(data, group.hosts, tmp_path / "calm", **kwargs).scored_path)
    calm_text = generate_responses(prompts, group.hosts, max_new_tokens=6, batch_size=4)
    before = {w["role"]: w["pid"] for w in group.where()}

    killer = _kill_host_when(group, "strong", lambda: (tmp_path / "killed").exists())  # made as the stage starts
    killed = pq.read_table(score_preferences(data, group.hosts, tmp_path / "killed", **kwargs).scored_path)
    killer.join()
    assert killed.equals(calm)
    restarted = {w["role"]: w["pid"] for w in group.where()}
    assert restarted["strong"] != before["strong"] and restarted["weak"] == before["weak"]

    generating = threading.Event()
    killer = _kill_host_when(group, "weak", generating.is_set)
    generating.set()
    assert generate_responses(prompts, group.hosts, max_new_tokens=6, batch_size=4).equals(calm_text)
    killer.join()
    assert {w["role"]: w["pid"] for w in group.where()}["weak"] != before["weak"]


def test_a_host_that_cannot_start_gives_back_its_placement_group(ray_local, checkpoints, tmp_path):
    import shutil

    from ray.util import placement_group_table

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["weak"], broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    before = {pg_id for pg_id, pg in placement_group_table().items() if pg["state"] != "REMOVED"}
    with pytest.raises(Exception, match="model.safetensors|safetensors|header"):
        ModelGroup({"weak": ModelSpec(path=str(checkpoints["weak"])), "broken": ModelSpec(path=str(broken))})
    after = {pg_id for pg_id, pg in placement_group_table().items() if pg["state"] != "REMOVED"}
    assert after == before  # nothing of the failed group is left reserved
