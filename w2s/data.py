"""Reading and validating preference datasets (prompt / chosen / rejected).

Two steps, so that the check can also run per batch (e.g. inside a Ray Data map):

1. `read_raw(path)` turns a file into one row per record: `source`, `row` (0-based record index), `raw` (JSON
   text). Only a file that cannot be used at all raises `PreferenceDataError`.
2. `check_batch(table)` parses, normalises and validates each record; a malformed record becomes a row with
   `error_field` and `error` set. Nothing is dropped: `split_checked` separates the good rows from the bad ones,
   and `format_rejections` writes the bad ones up for a person.

Accepted records (TRL conventions):

* standard: `{"prompt": str, "chosen": str, "rejected": str}`; the texts are used verbatim.
* conversational: `{"chosen": [messages], "rejected": [messages]}`, messages being `{"role": str, "content": str}`.
  With a `"prompt": [messages]` field, chosen and rejected must each be one assistant message. Without one, both
  lists must end in an assistant message and agree on everything before it, which becomes the prompt.
  Rendering: with a tokenizer that has a chat template, the prompt is
  `apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)` and a response is the assistant's
  content; a prompt message whose content holds special-token text (`<|im_end|>`) is set aside, since the
  rendered prompt's special tokens are read as control tokens. Otherwise each prompt message is written
  `"{role}: {content}\\n"`, the prompt ends in `"assistant:"`
  and a response is `" " + content`, so prompt + response reads `"user: hi\\nassistant: hello"`.

Extra fields are ignored. In every form, a text that is empty or only whitespace is an error, and so is
a rejected response equal to the chosen one.

Prompt files (what models are evaluated on, `check_prompts`) hold a `prompt` field: a string, used verbatim,
or a list of chat messages that does not end with the assistant's, rendered for each model as above
(`render_prompt`). A preference file is a prompt file too: its other fields are ignored.
"""

from __future__ import annotations

import datetime
import decimal
import itertools
import json
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

RAW_SCHEMA = pa.schema([("source", pa.string()), ("row", pa.int64()), ("raw", pa.string())])
OUTPUT_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row", pa.int64()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("error_field", pa.string()),
        ("error", pa.string()),
    ]
)
REJECTED_SCHEMA = pa.schema([(name, OUTPUT_SCHEMA.field(name).type) for name in ("source", "row", "error_field", "error")])
ROW = "<row>"  # error_field for a record that is not a JSON object at all
TEXT_FIELDS = ("prompt", "chosen", "rejected")


class PreferenceDataError(ValueError):
    """The whole file cannot be used; the message names the path and why."""


class _Bad(Exception):
    """One record is malformed: `field` names where, the message says why."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field = field


# ---------------------------------------------------------------- reading


def read_raw(path: str | Path) -> pa.Table:
    """Read a whole preference dataset into RAW_SCHEMA rows, one per record (iter_raw, all at once)."""
    return pa.concat_tables(iter_raw(path))


def iter_raw(path: str | Path, batch_rows: int = 8192) -> Iterator[pa.Table]:
    """A preference dataset as RAW_SCHEMA rows, one per record, `batch_rows` records at a time: the file is
    read as it is consumed (only a `.json` file holding one JSON list is read whole).

    Formats: `.jsonl` / `.json` (JSON Lines, or a `.json` holding one JSON list of records), `.parquet`, and a
    directory written by `datasets.Dataset.save_to_disk`. In JSON Lines, blank lines are skipped and not counted,
    so `row` is the index among the non-blank lines; a line that is not valid JSON is kept verbatim, and a
    line that is not UTF-8 is kept as None: check_batch sets either aside with its reason. A file that cannot
    be used raises PreferenceDataError (one with no records too, once it is read to its end).
    """
    source, path = str(path), Path(path)
    if not path.exists():
        raise PreferenceDataError(f"{source}: no such file or directory")
    if path.is_dir():
        records = _read_saved_dataset(path, source)
    elif path.suffix in (".jsonl", ".json"):
        records = _read_json(path, source)
    elif path.suffix == ".parquet":
        records = _read_parquet(path, source)
    else:
        raise PreferenceDataError(
            f"{source}: unknown format {path.suffix!r}; expected .jsonl, .json, .parquet or a saved datasets directory"
        )
    row = 0
    while raws := list(itertools.islice(records, batch_rows)):
        yield pa.table({"source": [source] * len(raws), "row": list(range(row, row + len(raws))), "raw": raws},
                       schema=RAW_SCHEMA)
        row += len(raws)
    if row == 0:
        raise PreferenceDataError(f"{source}: no records")


def _read_json(path: Path, source: str) -> Iterator[str | None]:
    """JSON records as text; in JSON Lines, a line that is not UTF-8 is None (set aside by check_batch)."""
    try:
        file = open(path, "rb")
    except OSError as err:
        raise PreferenceDataError(f"{source}: cannot read ({err})") from err
    with file:
        start = file.read(4096).removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM is dropped
        if path.suffix == ".json" and start.lstrip().startswith(b"["):
            data = start + file.read()
            try:
                yield from (_dumps(record) for record in json.loads(data.decode("utf-8")))
                return
            except UnicodeDecodeError as err:
                raise PreferenceDataError(f"{source}: not UTF-8 text ({err})") from err
            except ValueError as err:
                raise PreferenceDataError(f"{source}: not a valid JSON list: {err}") from err
        # lines split on "\n" only (binary lines): str.splitlines would also split at U+2028 etc., which JSON
        # strings may hold unescaped
        for line in _lines(start, file):
            if line.strip():
                yield _utf8_or_none(line.rstrip(b"\r"))


def _lines(start: bytes, file) -> Iterator[bytes]:
    """The lines (without "\\n") of `start` followed by the rest of `file`."""
    pending = start
    for chunk in iter(lambda: file.read(1 << 20), b""):
        *whole, pending = (pending + chunk).split(b"\n")
        yield from whole
    yield from pending.split(b"\n")


def _utf8_or_none(line: bytes) -> str | None:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_parquet(path: Path, source: str) -> Iterator[str]:
    try:
        for batch in pq.ParquetFile(path).iter_batches():
            yield from (_dumps(record) for record in batch.to_pylist())
    except (pa.ArrowException, OSError, ValueError) as err:
        raise PreferenceDataError(f"{source}: cannot read as parquet ({err})") from err


def _read_saved_dataset(path: Path, source: str) -> Iterator[str]:
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise PreferenceDataError(
            f"{source}: holds several splits ({', '.join(splits)}); point at one, e.g. {path / splits[0]}"
            if splits
            else f"{source}: a DatasetDict directory without any readable split"
        )
    if not ((path / "state.json").is_file() or (path / "dataset_info.json").is_file()):
        raise PreferenceDataError(
            f"{source}: a directory, but not one saved by datasets' save_to_disk (no state.json / dataset_info.json)"
        )
    return _saved_dataset_records(path, source)


def _saved_dataset_records(path: Path, source: str) -> Iterator[str]:
    import datasets  # here rather than at the top: it is slow to import and only this format needs it

    try:
        dataset = datasets.load_from_disk(str(path))  # memory-mapped: batches are read as they are used
        for batch in dataset.with_format("arrow").iter(1024):
            yield from (_dumps(record) for record in batch.to_pylist())
    except Exception as err:  # datasets raises many kinds; any of them means this directory is unusable
        raise PreferenceDataError(f"{source}: cannot load saved dataset ({type(err).__name__}: {err})") from err


def _dumps(record: Any) -> str:
    return json.dumps(record, ensure_ascii=False, default=_jsonable)


def _jsonable(value: Any) -> Any:
    """Python equivalent of a value json cannot write (numpy / arrow scalars, dates, bytes, ...)."""
    if hasattr(value, "as_py"):  # arrow scalar
        return value.as_py()
    if hasattr(value, "tolist"):  # numpy scalar or array
        return value.tolist()
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


# ---------------------------------------------------------------- checking


def check_batch(batch: pa.Table, tokenizer=None, max_length: int | None = None) -> pa.Table:
    """Normalise and validate RAW_SCHEMA rows into OUTPUT_SCHEMA rows, one out per row in.

    A good row has `error_field == error == ""`. A bad row has empty texts, `error_field` naming the field
    (`"chosen"`, `"chosen[1].content"`, `"<row>"` for a record that is not a JSON object) and `error` saying why.
    With `tokenizer` and `max_length`, a pair whose `prompt + response` takes more than `max_length` tokens,
    counting one for EOS, is an error on that response field (tokenized as scoring and training do:
    w2s.modeling.pair_ids).
    """
    if max_length is not None and tokenizer is None:
        raise ValueError("max_length needs a tokenizer to count tokens")
    out = {name: [] for name in OUTPUT_SCHEMA.names}
    for source, row, raw in zip(*(batch.column(name).to_pylist() for name in RAW_SCHEMA.names)):
        try:
            texts, error_field, error = _normalise(raw, tokenizer), "", ""
        except _Bad as bad:
            texts, error_field, error = ("", "", ""), bad.field, str(bad)
        for name, value in zip(OUTPUT_SCHEMA.names, (source, row, *texts, error_field, error)):
            out[name].append(value)
    if tokenizer is not None and max_length is not None:
        _mark_too_long(out, tokenizer, max_length)
    return pa.table(out, schema=OUTPUT_SCHEMA)


def _mark_too_long(out: dict[str, list], tokenizer, max_length: int) -> None:
    from w2s.modeling import pair_ids  # the tokenization scoring and training use

    for field in ("chosen", "rejected"):
        good = [i for i, error in enumerate(out["error"]) if not error]  # so a row keeps its first error
        if not good:
            return
        ids = pair_ids(tokenizer, [out["prompt"][i] for i in good], [out[field][i] for i in good])
        for i, (prompt_ids, response_ids) in zip(good, ids):
            length = len(prompt_ids) + len(response_ids)  # EOS included
            if length > max_length:
                out["prompt"][i] = out["chosen"][i] = out["rejected"][i] = ""
                out["error_field"][i] = field
                out["error"][i] = (f"too long: {length} tokens > max_length {max_length}" if len(prompt_ids) < max_length
                                   else f"too long: the prompt alone takes {len(prompt_ids)} tokens, max_length "
                                        f"{max_length} leaves no room for the response")


def _record(raw: str | None) -> dict:
    """One raw record as a JSON object, or raise _Bad."""
    if raw is None:
        raise _Bad(ROW, "not UTF-8 text")
    try:
        record = json.loads(raw)
    except (TypeError, ValueError) as err:
        raise _Bad(ROW, f"not valid JSON: {err}") from None
    if not isinstance(record, dict):
        raise _Bad(ROW, f"expected a JSON object, got {_kind(record)}")
    return record


def _normalise(raw: str | None, tokenizer) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) text of one raw record, or raise _Bad."""
    record = _record(raw)
    if any(isinstance(record.get(field), list) for field in TEXT_FIELDS):
        texts = _conversational(record, tokenizer)
    else:
        texts = tuple(_field(record, field, str, "a string") for field in TEXT_FIELDS)
    for field, text in zip(TEXT_FIELDS, texts):
        if not text.strip():
            raise _Bad(field, "empty text")
    if texts[1] == texts[2]:
        raise _Bad("rejected", "equal to chosen: the pair prefers nothing")
    return texts


def _conversational(record: dict, tokenizer) -> tuple[str, str, str]:
    chosen = _messages(record, "chosen")
    rejected = _messages(record, "rejected")
    if "prompt" in record:
        prompt, prompt_field = _messages(record, "prompt"), "prompt"
        for field, messages in (("chosen", chosen), ("rejected", rejected)):
            if len(messages) != 1 or messages[0]["role"] != "assistant":
                raise _Bad(field, "after an explicit prompt, expected exactly one assistant message")
    else:
        for field, messages in (("chosen", chosen), ("rejected", rejected)):
            if messages[-1]["role"] != "assistant":
                raise _Bad(f"{field}[{len(messages) - 1}].role", "the last message must be from the assistant")
        if chosen[:-1] != rejected[:-1]:
            i = next((i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)))
            raise _Bad(f"rejected[{i}]", "differs from 'chosen' before the final assistant reply")
        prompt, prompt_field = chosen[:-1], "chosen"
    if not any(m["content"].strip() for m in prompt):
        raise _Bad("prompt", "empty text")
    _no_control_text(prompt, prompt_field, tokenizer)
    return (_render_prompt(prompt, tokenizer), *(_render_reply(m[-1], tokenizer) for m in (chosen, rejected)))


def _no_control_text(messages: list[dict], field: str, tokenizer) -> None:
    """A chat template's control tokens are read as special tokens in the rendered prompt, so a message whose
    content writes one (`<|im_end|>`) would end its turn early: such a row is set aside, never rendered."""
    from w2s.modeling import control_tokens

    if not getattr(tokenizer, "chat_template", None):
        return
    controls = [t for t in control_tokens(tokenizer) if t]
    for i, message in enumerate(messages):
        content = message["content"]
        found = [t for t in controls if t in content]
        if found:
            first = min(found, key=content.index)  # the one a reader sees first
            raise _Bad(f"{field}[{i}].content", f"holds the special-token text {first!r}, which the chat template "
                                                "would read as a control token")


def _messages(record: dict, field: str) -> list[dict]:
    messages = _field(record, field, list, "a list of messages")
    if not messages:
        raise _Bad(field, "no messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _Bad(f"{field}[{i}]", f"expected a message object, got {_kind(message)}")
        for key in ("role", "content"):
            _field(message, key, str, "a string", where=f"{field}[{i}].{key}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]  # drops extra keys before comparing


def _field(record: dict, key: str, kind: type, expected: str, where: str | None = None) -> Any:
    if key not in record:
        raise _Bad(where or key, "missing field")
    if not isinstance(record[key], kind):
        raise _Bad(where or key, f"expected {expected}, got {_kind(record[key])}")
    return record[key]


def _render_prompt(messages: list[dict], tokenizer) -> str:
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # templates raise their own errors, e.g. on roles out of order
            raise _Bad("prompt", f"chat template failed: {err}") from None
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _render_reply(message: dict, tokenizer) -> str:
    return message["content"] if getattr(tokenizer, "chat_template", None) else " " + message["content"]


def _kind(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------- prompts

PROMPT_SCHEMA = pa.schema([("source", pa.string()), ("row", pa.int64()), ("prompt", pa.string()), ("chat", pa.bool_()),
                           ("error_field", pa.string()), ("error", pa.string())])


def check_prompts(batch: pa.Table, tokenizers: dict[str, Any], limits: dict[str, int] | None = None) -> pa.Table:
    """RAW_SCHEMA rows of a prompt file -> PROMPT_SCHEMA rows, one out per row in: `prompt` is the plain text,
    or the chat messages as JSON (`chat` true; `render_prompt` gives the text a model reads).

    `tokenizers`: {name: tokenizer} of every model that will read the prompts: a chat prompt that one of them
    cannot render, or whose content writes one of its control tokens, is set aside. `limits`: {name: most
    prompt tokens} (e.g. its positions minus the tokens it must add): a longer prompt is set aside, the reason
    naming the model. A bad row has empty `prompt`, and `error_field` / `error` set, as in check_batch.
    """
    from w2s.modeling import encode_prompts  # the tokenization generation and scoring use

    out = {name: [] for name in PROMPT_SCHEMA.names}
    for source, row, raw in zip(*(batch.column(name).to_pylist() for name in RAW_SCHEMA.names)):
        try:
            prompt, chat = _prompt_field(raw)
            texts = {name: _rendered(prompt, chat, tokenizer) for name, tokenizer in tokenizers.items()}
            for name, limit in (limits or {}).items():
                n = len(encode_prompts(tokenizers[name], [texts[name]])[0])
                if n > limit:
                    raise _Bad("prompt", f"too long for {name}: {n} tokens, more than the {limit} that leave it "
                                         "room for the response")
            values = (json.dumps(prompt, ensure_ascii=False) if chat else prompt, chat, "", "")
        except _Bad as bad:
            values = ("", False, bad.field, str(bad))
        for name, value in zip(PROMPT_SCHEMA.names, (source, row, *values)):
            out[name].append(value)
    return pa.table(out, schema=PROMPT_SCHEMA)


def _prompt_field(raw: str | None) -> tuple[str | list[dict], bool]:
    """(the record's prompt: its text, or its messages; whether it is chat) or raise _Bad."""
    record = _record(raw)
    if isinstance(record.get("prompt"), list):
        messages = _messages(record, "prompt")
        if messages[-1]["role"] == "assistant":
            raise _Bad(f"prompt[{len(messages) - 1}].role", "the last message is the assistant's: a prompt ends "
                                                            "before the turn the models answer")
        if not any(m["content"].strip() for m in messages):
            raise _Bad("prompt", "empty text")
        return messages, True
    prompt = _field(record, "prompt", str, "a string or a list of messages")
    if not prompt.strip():
        raise _Bad("prompt", "empty text")
    return prompt, False


def _rendered(prompt: str | list[dict], chat: bool, tokenizer) -> str:
    if not chat:
        return prompt
    _no_control_text(prompt, "prompt", tokenizer)
    return _render_prompt(prompt, tokenizer)


def render_prompt(prompt: str, chat: bool, tokenizer) -> str:
    """The text a model with `tokenizer` reads for a checked prompt (check_prompts): a plain prompt verbatim,
    chat messages rendered by its chat template (or as `role: content` lines without one)."""
    return render_chat(json.loads(prompt), tokenizer) if chat else prompt


def render_chat(messages: list[dict], tokenizer) -> str:
    """Chat messages as the prompt a model with `tokenizer` answers (the rendering of chat-format rows)."""
    try:
        return _render_prompt(messages, tokenizer)
    except _Bad as bad:
        raise PreferenceDataError(str(bad)) from None


def conversation_text(prompt: str, chat: bool) -> str:
    """A checked prompt as plain text for a judge to read: the user's message alone when it is the whole
    prompt, else the conversation as `role: content` lines (system messages included)."""
    if not chat:
        return prompt
    messages = json.loads(prompt)
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def render_reply(text: str, tokenizer) -> str:
    """An assistant reply as it follows a rendered chat prompt: its content after a chat template, `" " + content`
    after a plain `assistant:` line (the convention of chat-format preference rows)."""
    return _render_reply({"content": text.strip()}, tokenizer)


def load_prompts(path: str | Path, tokenizers: dict[str, Any], limits: dict[str, int] | None = None
                 ) -> tuple[pa.Table, pa.Table]:
    """(good prompts: source, row, prompt, chat; bad rows: source, row, error_field, error) of a prompt file."""
    checked = pa.concat_tables(check_prompts(raw, tokenizers, limits) for raw in iter_raw(path))
    ok = pc.equal(checked["error"], "")
    return (checked.filter(ok).select(["source", "row", "prompt", "chat"]),
            checked.filter(pc.invert(ok)).select(REJECTED_SCHEMA.names))


# ---------------------------------------------------------------- results


def split_checked(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(good rows: source, row, prompt, chosen, rejected; bad rows: source, row, error_field, error)."""
    ok = pc.equal(table["error"], "")
    good = table.filter(ok).select(["source", "row", *TEXT_FIELDS])
    bad = table.filter(pc.invert(ok)).select(REJECTED_SCHEMA.names)
    return good, bad


def load_pairs(path: str | Path, tokenizer=None, max_length: int | None = None) -> tuple[pa.Table, pa.Table]:
    """read_raw + check_batch + split_checked in one process, for code that does not use Ray."""
    return split_checked(check_batch(read_raw(path), tokenizer, max_length))


def format_rejections(bad: pa.Table, limit: int = 10) -> str:
    """Human summary of bad rows: a count, then the first `limit` as `source row N field 'f': reason`."""
    if bad.num_rows == 0:
        return "no malformed rows"
    noun = "row" if bad.num_rows == 1 else "rows"
    lines = [f"{bad.num_rows} malformed {noun} set aside:"]
    for r in bad.slice(0, limit).to_pylist():
        lines.append(f"  {r['source']} row {r['row']} field {r['error_field']!r}: {r['error']}")
    if bad.num_rows > limit:
        lines.append(f"  ... and {bad.num_rows - limit} more")
    return "\n".join(lines)
