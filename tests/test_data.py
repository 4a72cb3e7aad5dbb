"""Tests for w2s.data: every file format, both record forms, and malformed input set aside with its reason."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from w2s.data import (
    OUTPUT_SCHEMA,
    RAW_SCHEMA,
    PreferenceDataError,
    check_batch,
    format_rejections,
    load_pairs,
    read_raw,
    split_checked,
)

RECORDS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "id": 7},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
]
CONVERSATION = {
    "chosen": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ],
    "rejected": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "go away"},
    ],
}


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def char_tokenizer(chat_template=None):
    """One token per printable ASCII character, no special tokens added: token counts are string lengths."""
    vocab = {"[UNK]": 0, "[EOS]": 1, **{chr(c): c - 30 for c in range(32, 127)}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]", eos_token="[EOS]")
    tokenizer.chat_template = chat_template
    return tokenizer


def pairs(good):
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in good.to_pylist()]


EXPECTED = [(r["prompt"], r["chosen"], r["rejected"]) for r in RECORDS]


# ---------------------------------------------------------------- formats


def test_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    raw = read_raw(path)
    assert raw.schema == RAW_SCHEMA
    assert raw.column("source").to_pylist() == [str(path)] * 2
    assert raw.column("row").to_pylist() == [0, 1]
    good, bad = load_pairs(path)
    assert pairs(good) == EXPECTED and bad.num_rows == 0
    assert good.column_names == ["source", "row", "prompt", "chosen", "rejected"]


def test_jsonl_blank_lines_are_skipped_and_not_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(RECORDS[0]) + "\n   \n\n" + json.dumps(RECORDS[1]) + "\r\n\n")
    raw = read_raw(path)
    assert raw.column("row").to_pylist() == [0, 1]
    assert pairs(load_pairs(path)[0]) == EXPECTED


def test_json_list_and_json_lines_in_a_json_file(tmp_path):
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(RECORDS, indent=2))
    as_lines = write_jsonl(tmp_path / "lines.json", RECORDS)
    for path in (as_list, as_lines):
        good, bad = load_pairs(path)
        assert pairs(good) == EXPECTED and bad.num_rows == 0


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), path)
    good, bad = load_pairs(path)
    assert pairs(good) == EXPECTED and bad.num_rows == 0
    assert json.loads(read_raw(path).column("raw")[0].as_py())["id"] == 7


def test_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "saved"
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(path))
    good, bad = load_pairs(path)
    assert pairs(good) == EXPECTED and bad.num_rows == 0
    assert good.column("source").to_pylist() == [str(path)] * 2


def test_saved_dataset_dict_needs_a_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "dd"
    split = datasets.Dataset.from_list(RECORDS)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(path))
    with pytest.raises(PreferenceDataError, match="several splits") as err:
        read_raw(path)
    assert str(path) in str(err.value) and "test, train" in str(err.value)
    assert pairs(load_pairs(path / "train")[0]) == EXPECTED


# ---------------------------------------------------------------- whole-file errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(PreferenceDataError, match="no such file") as err:
        read_raw(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(PreferenceDataError, match="no records") as err:
        read_raw(path)
    assert str(path) in str(err.value)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(PreferenceDataError, match="cannot read as parquet") as err:
        read_raw(path)
    assert str(path) in str(err.value)


def test_unknown_extension_and_plain_directory(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,chosen,rejected\n")
    with pytest.raises(PreferenceDataError, match="unknown format '.csv'"):
        read_raw(csv)
    with pytest.raises(PreferenceDataError, match="not one saved by datasets"):
        read_raw(tmp_path)


def test_broken_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"prompt": "a",')
    with pytest.raises(PreferenceDataError, match="not a valid JSON list") as err:
        read_raw(path)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------- malformed rows


def test_mixed_jsonl_sets_bad_rows_aside_with_reasons(tmp_path):
    good_row = {"prompt": "Say hi.", "chosen": "hi", "rejected": "no"}
    lines = [
        good_row,  # 0
        {"prompt": "Say hi.", "rejected": "no"},  # 1 missing field
        good_row,  # 2
        {"prompt": "Say hi.", "chosen": 5, "rejected": "no"},  # 3 wrong type
        {"prompt": "Say hi.", "chosen": "hi", "rejected": "  \n"},  # 4 empty text
        '{"prompt": "Say hi.", "chosen": ',  # 5 not JSON
        {"prompt": "Say hi.", "chosen": "hi", "rejected": "x" * 30},  # 6 over-length: 7 + 30 + 1 EOS = 38
        '["a", "list"]',  # 7 not an object
        good_row,  # 8
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    checked = check_batch(read_raw(path), tokenizer=char_tokenizer(), max_length=20)
    assert checked.schema == OUTPUT_SCHEMA and checked.num_rows == len(lines)
    good, bad = split_checked(checked)

    assert good.column("row").to_pylist() == [0, 2, 8]
    assert pairs(good) == [("Say hi.", "hi", "no")] * 3
    assert good.num_rows + bad.num_rows == len(lines)
    reasons = [(r["row"], r["error_field"], r["error"]) for r in bad.to_pylist()]
    assert reasons[:3] == [
        (1, "chosen", "missing field"),
        (3, "chosen", "expected a string, got int"),
        (4, "rejected", "empty text"),
    ]
    row, field, error = reasons[3]
    assert (row, field) == (5, "<row>") and error.startswith("not valid JSON: ")
    assert reasons[4:] == [
        (6, "rejected", "too long: 38 tokens > max_length 20"),
        (7, "<row>", "expected a JSON object, got list"),
    ]
    # bad rows carry no text
    assert checked.filter(pc.not_equal(checked["error"], "")).column("chosen").to_pylist() == [""] * 6

    report = format_rejections(bad, limit=2)
    assert report == (
        f"6 malformed rows set aside:\n"
        f"  {path} row 1 field 'chosen': missing field\n"
        f"  {path} row 3 field 'chosen': expected a string, got int\n"
        f"  ... and 4 more"
    )


def test_a_bad_byte_sets_aside_its_line_and_equal_responses_are_set_aside(tmp_path):
    path = tmp_path / "bytes.jsonl"
    good = json.dumps({"prompt": "Say hi.", "chosen": "hi", "rejected": "no"}).encode()
    same = json.dumps({"prompt": "Say hi.", "chosen": "hi", "rejected": "hi"}).encode()
    path.write_bytes(b"\n".join([good, b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', same, good]) + b"\n")
    good_rows, bad = load_pairs(path)
    assert good_rows.column("row").to_pylist() == [0, 3]  # the rest of the file is still read
    assert [(r["row"], r["error_field"], r["error"]) for r in bad.to_pylist()] == [
        (1, "<row>", "not UTF-8 text"), (2, "rejected", "equal to chosen: the pair prefers nothing")]


def test_length_limit_counts_eos_and_checks_chosen_first(tmp_path):
    tokenizer = char_tokenizer()
    record = {"prompt": "abc", "chosen": "de", "rejected": "fg"}  # 5 tokens + EOS = 6
    path = write_jsonl(tmp_path / "d.jsonl", [record, {**record, "chosen": "defg"}])
    good, bad = load_pairs(path, tokenizer, max_length=6)
    assert good.column("row").to_pylist() == [0]
    assert bad.to_pylist() == [
        {"source": str(path), "row": 1, "error_field": "chosen", "error": "too long: 8 tokens > max_length 6"}
    ]
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_pairs(path, max_length=6)


def test_the_length_check_counts_what_training_and_scoring_tokenize(tmp_path):
    """A tokenizer that adds a BOS of its own: the check counts prompt and response apart and without
    special tokens, as tokenize_pairs does, so a row it keeps fits and a row it sets aside would not."""
    from tokenizers import processors

    from w2s.modeling import TooLongError, tokenize_pairs

    tokenizer = char_tokenizer()
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="[EOS] $A", special_tokens=[("[EOS]", 1)])
    fits = {"prompt": "abc", "chosen": "de", "rejected": "fg"}  # 3 + 2 + EOS = 6: exactly max_length
    over = {**fits, "chosen": "def"}  # 7
    good, bad = load_pairs(write_jsonl(tmp_path / "d.jsonl", [fits, over]), tokenizer, max_length=6)
    assert good.column("row").to_pylist() == [0]
    assert bad.column("error").to_pylist() == ["too long: 7 tokens > max_length 6"]
    assert tokenize_pairs(tokenizer, ["abc"], ["de"], max_length=6).input_ids.shape == (1, 6)
    with pytest.raises(TooLongError, match="7 tokens > max_length 6"):  # never cut to fit
        tokenize_pairs(tokenizer, ["abc"], ["def"], max_length=6)


def test_a_prompt_that_leaves_no_room_says_so(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "abcdef", "chosen": "g", "rejected": "h"}])
    _, bad = load_pairs(path, char_tokenizer(), max_length=6)
    assert bad.column("error").to_pylist() == [
        "too long: the prompt alone takes 6 tokens, max_length 6 leaves no room for the response"]


def test_special_token_text_in_a_field_is_text(tmp_path):
    """`[EOS]` written in a response is five characters, not an end of sequence (nor `<|im_end|>` etc.)."""
    from w2s.modeling import tokenize_pairs

    tokenizer = char_tokenizer()
    batch = tokenize_pairs(tokenizer, ["q: "], ["a[EOS]b"], max_length=32)
    ids = batch.input_ids[0].tolist()
    assert ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 3 + 7 + 1
    _, bad = load_pairs(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q: ", "chosen": "a[EOS]b", "rejected": "c"}]),
                        tokenizer, max_length=10)
    assert bad.column("error").to_pylist() == ["too long: 11 tokens > max_length 10"]


def test_format_rejections_small_cases(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "c"}])
    _, bad = load_pairs(path)
    assert format_rejections(bad) == f"1 malformed row set aside:\n  {path} row 0 field 'rejected': missing field"
    assert format_rejections(bad.slice(0, 0)) == "no malformed rows"


def test_check_batch_on_empty_batch():
    assert check_batch(RAW_SCHEMA.empty_table()).num_rows == 0


# ---------------------------------------------------------------- conversational form


def test_conversational_implicit_prompt_plain_rendering(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [CONVERSATION])
    good, bad = load_pairs(path)
    assert bad.num_rows == 0
    assert pairs(good) == [("system: Be brief.\nuser: hi\nassistant:", " hello", " go away")]


def test_conversational_explicit_prompt_with_chat_template(tmp_path):
    template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    record = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "bye"}],
    }
    path = write_jsonl(tmp_path / "c.jsonl", [record, CONVERSATION])
    good, bad = load_pairs(path, tokenizer=char_tokenizer(template))
    assert bad.num_rows == 0
    assert pairs(good) == [
        ("<user>hi\n<assistant>", "hello", "bye"),
        ("<system>Be brief.\n<user>hi\n<assistant>", "hello", "go away"),
    ]


def conversation_with(**changes):
    record = json.loads(json.dumps(CONVERSATION))
    for key, value in changes.items():
        if value is None:
            del record[key]
        else:
            record[key] = value
    return record


def test_conversational_errors_name_the_field(tmp_path):
    user = {"role": "user", "content": "hi"}
    reply = {"role": "assistant", "content": "ok"}
    cases = [
        (conversation_with(chosen=[user, "oops", reply]), "chosen[1]", "expected a message object, got string"),
        (conversation_with(chosen=[user, {"role": "assistant", "content": 3}]), "chosen[1].content",
         "expected a string, got int"),
        (conversation_with(rejected=[user, {"content": "ok"}]), "rejected[1].role", "missing field"),
        (conversation_with(rejected=None), "rejected", "missing field"),
        (conversation_with(rejected="text"), "rejected", "expected a list of messages, got string"),
        (conversation_with(chosen=[]), "chosen", "no messages"),
        (conversation_with(chosen=[reply, user]), "chosen[1].role", "the last message must be from the assistant"),
        (conversation_with(chosen=[user, reply], rejected=[{"role": "user", "content": "yo"}, reply]),
         "rejected[0]", "differs from 'chosen' before the final assistant reply"),
        (conversation_with(chosen=[reply], rejected=[reply]), "prompt", "empty text"),
        (conversation_with(prompt=[user], rejected=[reply, reply]), "chosen",
         "after an explicit prompt, expected exactly one assistant message"),
        (conversation_with(prompt=[user], chosen=[reply], rejected=[{"role": "assistant", "content": " "}]),
         "rejected", "empty text"),
    ]
    path = write_jsonl(tmp_path / "c.jsonl", [record for record, _, _ in cases])
    good, bad = load_pairs(path)
    assert good.num_rows == 0
    assert [(r["row"], r["error_field"], r["error"]) for r in bad.to_pylist()] == [
        (i, field, error) for i, (_, field, error) in enumerate(cases)
    ]
