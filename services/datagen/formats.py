"""Dataset files in, canonical chat examples out.

Readers stream (line, record) pairs from JSONL, JSON-array, CSV and Parquet files, yielding a Problem in place of
a record that cannot be read and going on with the next one. Normalisers turn a record of one of the five formats
(alpaca, chat, sharegpt, completion, preference) into canonical messages, raising RecordError with the field path.

The canonical example (one JSON object per line of a prepared dataset):

    {"id": "<16 hex>", "messages": [{"role", "content", "tool_calls", "tool_call_id", "name"}], "tools": [...] | null,
     "label": str | null, "preference": {"chosen": [...], "rejected": [...]} | null,
     "source": {"format", "file", "line"}}

Message keys that are absent or None are left out.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.datagen.dedup import content_id, normalised_text
from services.datagen.validate import Problem, error, json_problem, warning

FILE_KINDS = ("jsonl", "json", "csv", "parquet")
RECORD_FORMATS = ("alpaca", "chat", "sharegpt", "completion", "preference")
ROLES = ("system", "user", "assistant", "tool")
MAX_LINE_BYTES = 8 * 1024 * 1024
BOM = codecs.BOM_UTF8
CHUNK = 1024 * 1024
EXPECTED = {
    "alpaca": "instruction and output (or response); optional input, system",
    "chat": "messages (a list of {role, content}); optional tools",
    "sharegpt": "conversations (a list of {from, value}); optional system, tools",
    "completion": "prompt and completion",
    "preference": "chosen and rejected (strings or message lists); prompt unless both are conversations",
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool"}


class RecordError(ValueError):
    """A record that does not normalise: `field` is its path in the record (`messages[2].role`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.message = field, message


# ---------------------------------------------------------------------------------------------------- reading
def file_kind(path: Path, hint: str = "auto") -> str:
    """jsonl | json (an array) | csv | parquet: the hint when given, else the suffix, else the first bytes."""
    if hint != "auto":
        if hint not in FILE_KINDS:
            raise ValueError(f"file kind {hint!r} is not one of auto, {', '.join(FILE_KINDS)}")
        return hint
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".parquet", ".pq"):
        return "csv" if suffix == ".csv" else "parquet"
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    first = head.removeprefix(BOM).lstrip()[:1]
    return "json" if first == b"[" else "jsonl"


def _is_blank(path: Path) -> bool:
    with open(path, "rb") as f:
        chunk = f.read(CHUNK).removeprefix(BOM)
        while chunk:
            if chunk.strip():
                return False
            chunk = f.read(CHUNK)
    return True


def _bom(f, name: str) -> Iterator[Problem]:
    """Skip a UTF-8 byte-order mark at the start of `f` (opened binary), warning about it on line 1."""
    if f.read(3) == BOM:
        yield warning(name, 1, "", "the file starts with a UTF-8 byte-order mark (BOM); it was ignored")
    else:
        f.seek(0)


def read_records(path: Path, fmt_hint: str = "auto", max_line_bytes: int = MAX_LINE_BYTES
                 ) -> Iterator[tuple[int, dict | Problem]]:
    """Stream (line, record) pairs. An ERROR Problem stands in for a record that cannot be read (its line is the
    record's); WARNINGs (a BOM) and line-0 errors (an empty or unreadable file) are about the file itself.
    `fmt_hint` is the file kind (auto | jsonl | json | csv | parquet), not the record format."""
    path = Path(path)
    name = path.name
    if _is_blank(path):
        yield 0, error(name, 0, "", "the file is empty")
        return
    kind = file_kind(path, fmt_hint)
    reader = {"jsonl": _jsonl, "json": _json_array, "csv": _csv, "parquet": _parquet}[kind]
    yield from reader(path, name, max_line_bytes)


def _jsonl(path: Path, name: str, max_line_bytes: int) -> Iterator[tuple[int, dict | Problem]]:
    with open(path, "rb") as f:
        for p in _bom(f, name):
            yield 1, p
        offset, line = f.tell(), 0
        while raw := f.readline(max_line_bytes + 1):
            line += 1
            start, offset = offset, offset + len(raw)
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                size = len(raw)
                while chunk := f.readline(CHUNK):  # skip the rest of the line, keeping nothing
                    size += len(chunk)
                    if chunk.endswith(b"\n"):
                        size -= 1
                        break
                offset = start + size + 1
                yield line, error(name, line, "", f"the line is {size:,} bytes, longer than max_line_bytes "
                                  f"({max_line_bytes:,}); skipped without parsing")
                continue
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line, error(name, line, "", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                                  f"of the line, file offset {start + e.start})")
                continue
            yield line, _object(name, line, text.rstrip("\r\n"))


def _object(name: str, line: int, text: str) -> dict | Problem:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return error(name, line, "", json_problem(e))
    except RecursionError:
        return error(name, line, "", "not valid JSON (nested too deeply)")
    if not isinstance(obj, dict):
        return error(name, line, "", f"expected a JSON object (one record per line), not {_kind(obj)}")
    return obj


def _json_array(path: Path, name: str, max_line_bytes: int) -> Iterator[tuple[int, dict | Problem]]:
    """A JSON array streamed with the stdlib: decode UTF-8 incrementally, raw_decode one element at a time from a
    buffer that only ever holds the unread rest of the current chunk (and at most max_line_bytes of one element).
    An element that is not valid JSON ends the reading: an array cannot be resynchronised after it."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        for p in _bom(f, name):
            yield 1, p
        buf, pos, eof, nread, lines_before = "", 0, False, f.tell(), 0

        def more(size: int) -> str | None:
            """Read more text into buf; returns a problem message for bad UTF-8."""
            nonlocal buf, pos, eof, nread, lines_before
            lines_before += buf.count("\n", 0, pos)
            buf, pos = buf[pos:], 0
            data = f.read(size)
            pending = len(utf8.getstate()[0])
            eof = not data
            try:
                buf += utf8.decode(data, final=eof)
            except UnicodeDecodeError as e:
                return f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} at file offset {nread - pending + e.start})"
            nread += len(data)
            return None

        def skip_ws() -> str | None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or eof:
                    return None
                if bad := more(CHUNK):
                    return bad

        def where(at: int) -> str:
            line = lines_before + buf.count("\n", 0, at) + 1
            return f"file line {line}, column {at - buf.rfind(chr(10), 0, at)}"

        index = 0
        if bad := more(CHUNK) or skip_ws():
            yield 0, error(name, 0, "", bad)
            return
        if buf[pos:pos + 1] != "[":
            yield 0, error(name, 0, "", "a .json file must hold one array of records ([{...}, {...}])")
            return
        pos += 1
        while True:
            if bad := skip_ws():
                yield index + 1, error(name, index + 1, "", bad)
                return
            if pos >= len(buf):
                yield 0, error(name, 0, "", f"the array is not closed: the file ends after element {index}")
                return
            if buf[pos] == "]":
                pos += 1
                if (bad := skip_ws()) or pos < len(buf):
                    yield 0, error(name, 0, "", bad or f"data after the array's closing ] ({where(pos)})")
                return
            if index > 0:
                if buf[pos] != ",":
                    yield 0, error(name, 0, "", f"expected , or ] after element {index} ({where(pos)})")
                    return
                pos += 1
                if bad := skip_ws():
                    yield index + 1, error(name, index + 1, "", bad)
                    return
            index += 1
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:
                        break
                    e = None
                except json.JSONDecodeError as err:
                    e = err
                except RecursionError:
                    yield index, error(name, index, "", "not valid JSON (nested too deeply); the rest of the array "
                                       "cannot be read")
                    return
                if len(buf) - pos > max_line_bytes:
                    yield index, error(name, index, "", f"element {index} is longer than max_line_bytes "
                                       f"({max_line_bytes:,}); the rest of the array cannot be read")
                    return
                if e is not None and eof:
                    at = "" if e.msg.endswith(" at") else " at"
                    yield index, error(name, index, "", f"not valid JSON ({e.msg}{at} {where(e.pos)}); the rest of "
                                       "the array cannot be read")
                    return
                if bad := more(max(CHUNK, len(buf) - pos)):  # doubling: a big element is re-parsed O(log) times
                    yield index, error(name, index, "", bad)
                    return
            pos = end
            yield index, obj if isinstance(obj, dict) else error(name, index, "", f"expected a JSON object, not "
                                                                  f"{_kind(obj)}")


def _csv(path: Path, name: str, max_line_bytes: int) -> Iterator[tuple[int, dict | Problem]]:
    """Header row required; `line` is the data row's number counting the header as 1. Cells stay strings: the
    normalisers parse JSON cells (messages, conversations, tools, message-list prompt/chosen/rejected)."""
    import io

    csv.field_size_limit(max(csv.field_size_limit(), max_line_bytes))
    with open(path, "rb") as raw:
        for p in _bom(raw, name):
            yield 1, p
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(text)
        try:
            header = [h.strip() for h in next(reader)]
        except (csv.Error, StopIteration) as e:
            yield 0, error(name, 1, "", f"cannot read the CSV header: {e}")
            return
        dupes = sorted({h for h in header if header.count(h) > 1})
        if not all(header) or dupes:
            yield 0, error(name, 1, "", "the header needs a unique, non-empty name per column" +
                           (f" ({', '.join(dupes)} repeats)" if dupes else ""))
            return
        row = 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                row += 1
                yield row, error(name, row, "", f"not valid CSV ({e})")
                continue
            row += 1
            if not cells:
                continue
            if len(cells) != len(header):
                yield row, error(name, row, "", f"the row has {len(cells)} field{'s' if len(cells) != 1 else ''}, "
                                 f"the header has {len(header)} ({', '.join(header)})")
                continue
            bad = [(h, c) for h, c in zip(header, cells) if any("\udc80" <= ch <= "\udcff" for ch in c)]
            if bad:
                h, c = bad[0]
                at = next(i for i, ch in enumerate(c) if "\udc80" <= ch <= "\udcff")
                yield row, error(name, row, h, f"not valid UTF-8 (byte 0x{ord(c[at]) - 0xdc00:02x} at character "
                                 f"{at + 1} of the cell)")
                continue
            yield row, dict(zip(header, cells))


def _parquet(path: Path, name: str, max_line_bytes: int) -> Iterator[tuple[int, dict | Problem]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        yield 0, error(name, 0, "", f"not a readable Parquet file ({e})")
        return
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                yield row, rec
    except (pa.ArrowException, OSError) as e:
        yield row + 1, error(name, row + 1, "", f"cannot read the Parquet file from this row on ({e})")


# ---------------------------------------------------------------------------------------------------- formats
def detect_format(record: dict) -> str:
    """The record format a record's keys say, or RecordError naming what each format expects."""
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "completion"
    raise RecordError("", f"cannot tell the format from the fields {_keys(record)}; expected one of: "
                      + "; ".join(f"{k}: {v}" for k, v in EXPECTED.items()))


def fits(fmt: str, record: dict) -> bool:
    return {"alpaca": lambda r: "instruction" in r and ("output" in r or "response" in r),
            "chat": lambda r: "messages" in r, "sharegpt": lambda r: "conversations" in r,
            "completion": lambda r: "prompt" in r and "completion" in r,
            "preference": lambda r: "chosen" in r and "rejected" in r}[fmt](record)


@dataclass
class Normalised:
    """Canonical turns plus the source path of each turn, for problems in the source's own terms."""

    messages: list[dict]
    tools: list[dict] | None = None
    preference: dict[str, list[dict]] | None = None
    paths: dict[str, list[str]] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # the source's names for role and content


def normalise(fmt: str, record: dict) -> Normalised:
    if fmt not in NORMALISERS:
        raise ValueError(f"record format {fmt!r} is not one of {', '.join(RECORD_FORMATS)}")
    if not fits(fmt, record):
        raise RecordError("", f"does not fit the file's format {fmt}: expected {EXPECTED[fmt]}; got {_keys(record)}")
    return NORMALISERS[fmt](record)


def to_example(n: Normalised, fmt: str, file: str, line: int, label: str | None, text: str | None = None
               ) -> dict[str, Any]:
    """The canonical example; `text` is its normalised text when the caller has it already."""
    text = normalised_text(n.messages, n.preference) if text is None else text
    return {"id": content_id(text), "messages": n.messages, "tools": n.tools,
            "label": label, "preference": n.preference, "source": {"format": fmt, "file": file, "line": line}}


def label_of(record: dict, stratify_field: str) -> str | None:
    """The stratify field's value as a string; RecordError when it is missing or not a scalar."""
    if not stratify_field:
        return None
    value = record.get(stratify_field)
    if value is None or value == "":
        raise RecordError(stratify_field, "is missing (the split is stratified on it)")
    if isinstance(value, (dict, list)):
        raise RecordError(stratify_field, f"must be a string, number or boolean to stratify on, not {_kind(value)}")
    return value if isinstance(value, str) else json.dumps(value)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _keys(record: dict) -> str:
    keys = list(record)
    return ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "") if keys else "no fields"


def _text(record: dict, key: str, *, optional: bool = False) -> str | None:
    value = record.get(key)
    if value is None and optional:
        return None
    if value is None:
        raise RecordError(key, "is missing")
    if not isinstance(value, str):
        raise RecordError(key, f"must be a string, not {_kind(value)}")
    return value


def _json_list(value: Any, path: str, what: str) -> list:
    """A list, or a string holding a JSON list (CSV cells, Parquet string columns, stringified tools)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RecordError(path, f"must be {what}; got a string that is {json_problem(e)}") from None
    if not isinstance(value, list):
        raise RecordError(path, f"must be {what}, not {_kind(value)}")
    return value


def _maybe_messages(value: Any) -> Any:
    """A preference prompt/chosen/rejected string holding a JSON list of messages (a CSV cell) becomes the list."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(parsed, list) and all(isinstance(m, dict) and "role" in m for m in parsed):
            return parsed
    return value


def _content(value: Any, path: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts: text only
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RecordError(f"{path}[{i}]", "only text content parts ({\"type\": \"text\", \"text\": ...}) "
                                  "are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise RecordError(path, f"must be a string, not {_kind(value)}")


def _arguments(value: Any, path: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    raise RecordError(path, "is missing" if value is None else f"must be a JSON string or object, not {_kind(value)}")


def _tool_call(call: Any, path: str) -> dict:
    if not isinstance(call, dict):
        raise RecordError(path, f"must be an object {{id, type, function: {{name, arguments}}}}, not {_kind(call)}")
    fn = call.get("function", call if "name" in call else None)  # also the flat {name, arguments}
    if not isinstance(fn, dict):
        raise RecordError(f"{path}.function", "is missing" if fn is None else f"must be an object, not {_kind(fn)}")
    if call.get("type", "function") not in ("function", None):
        raise RecordError(f"{path}.type", f"only function tool calls are supported, not {call['type']!r}")
    name = fn.get("name")
    if not isinstance(name, str):
        raise RecordError(f"{path}.function.name", "is missing" if name is None else "must be a string")
    out: dict[str, Any] = {}
    if call.get("id") is not None:
        if not isinstance(call["id"], str):
            raise RecordError(f"{path}.id", f"must be a string, not {_kind(call['id'])}")
        out["id"] = call["id"]
    out["type"] = "function"
    out["function"] = {"name": name, "arguments": _arguments(fn.get("arguments"), f"{path}.function.arguments")}
    return out


def _message(m: Any, path: str) -> dict:
    if not isinstance(m, dict):
        raise RecordError(path, f"must be an object with role and content, not {_kind(m)}")
    role = m.get("role")
    if role not in ROLES:
        raise RecordError(f"{path}.role", "is missing" if role is None else
                          f"must be one of {', '.join(ROLES)}, not {role!r}")
    out: dict[str, Any] = {"role": role}
    content = _content(m.get("content"), f"{path}.content")
    if content is not None:
        out["content"] = content
    calls = m.get("tool_calls")
    if calls is None and m.get("function_call") is not None:  # the legacy OpenAI single call
        calls = [{"type": "function", "function": m["function_call"]}]
    if calls:
        if role != "assistant":
            raise RecordError(f"{path}.tool_calls", f"only assistant turns make tool calls, not {role}")
        calls = _json_list(calls, f"{path}.tool_calls", "a list of tool calls")
        out["tool_calls"] = [_tool_call(c, f"{path}.tool_calls[{i}]") for i, c in enumerate(calls)]
    for key in ("tool_call_id", "name"):
        if m.get(key) is not None:
            if not isinstance(m[key], str):
                raise RecordError(f"{path}.{key}", f"must be a string, not {_kind(m[key])}")
            out[key] = m[key]
    return out


def _messages(value: Any, path: str) -> tuple[list[dict], list[str]]:
    items = _json_list(value, path, "a list of messages")
    paths = [f"{path}[{i}]" for i in range(len(items))]
    return [_message(m, p) for m, p in zip(items, paths)], paths


def _tools(value: Any, path: str = "tools") -> list[dict] | None:
    if isinstance(value, str) and value.strip() in ("", "null", "[]"):  # empty CSV cells, stringified nothing
        return None
    if value is None or value == []:
        return None
    tools = []
    for i, t in enumerate(_json_list(value, path, "a list of tool schemas")):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RecordError(f"{path}[{i}]", "a tool schema is {\"type\": \"function\", \"function\": {\"name\", "
                              "\"description\", \"parameters\"}}")
        tools.append({"type": t.get("type", "function") if fn is not t else "function", "function": fn})
    return tools


def _alpaca(r: dict) -> Normalised:
    instruction = _text(r, "instruction")
    out_key = "output" if "output" in r else "response"
    output = _text(r, out_key)
    extra = _text(r, "input", optional=True)
    system = _text(r, "system", optional=True)
    msgs, paths = [], []
    if system:
        msgs.append({"role": "system", "content": system})
        paths.append("system")
    msgs.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction})
    paths.append("instruction")
    msgs.append({"role": "assistant", "content": output})
    paths.append(out_key)
    return Normalised(msgs, paths={"messages": paths})


def _chat(r: dict) -> Normalised:
    msgs, paths = _messages(r.get("messages"), "messages")
    return Normalised(msgs, _tools(r.get("tools")), paths={"messages": paths})


def _sharegpt(r: dict) -> Normalised:
    turns = _json_list(r.get("conversations"), "conversations", "a list of {from, value} turns")
    msgs, paths = [], []
    system = _text(r, "system", optional=True)
    if system:
        msgs.append({"role": "system", "content": system})
        paths.append("system")
    last_calls: list[str] = []
    for i, t in enumerate(turns):
        path = f"conversations[{i}]"
        if not isinstance(t, dict):
            raise RecordError(path, f"must be an object with from and value, not {_kind(t)}")
        who = t.get("from")
        if not isinstance(who, str) or who not in SHAREGPT_ROLES:
            raise RecordError(f"{path}.from", "is missing" if who is None else
                              f"must be one of {', '.join(SHAREGPT_ROLES)}, not {who!r}")
        value = t.get("value")
        if not isinstance(value, str):
            raise RecordError(f"{path}.value", "is missing" if value is None else f"must be a string, not {_kind(value)}")
        if who == "function_call":
            try:
                calls = json.loads(value)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}.value", "a function_call's value must be JSON {\"name\", \"arguments\"} "
                                  f"(or a list of them); {json_problem(e)}") from None
            calls = calls if isinstance(calls, list) else [calls]
            tool_calls = [_tool_call({"id": f"call_{i}_{k}", "type": "function", "function": c}
                                     if isinstance(c, dict) else c, f"{path}.value[{k}]") for k, c in enumerate(calls)]
            last_calls = [c["id"] for c in tool_calls]
            msgs.append({"role": "assistant", "tool_calls": tool_calls})
        elif who in ("observation", "tool"):
            msg = {"role": "tool", "content": value}
            if len(last_calls) == 1:
                msg["tool_call_id"] = last_calls[0]
            msgs.append(msg)
        else:
            msgs.append({"role": SHAREGPT_ROLES[who], "content": value})
            last_calls = []
        paths.append(path)
    return Normalised(msgs, _tools(r.get("tools")), paths={"messages": paths},
                      names={"role": "from", "content": "value"})


def _completion(r: dict) -> Normalised:
    msgs = [{"role": "user", "content": _text(r, "prompt")}, {"role": "assistant", "content": _text(r, "completion")}]
    return Normalised(msgs, paths={"messages": ["prompt", "completion"]})


def _turns(value: Any, key: str, default_role: str) -> tuple[list[dict], list[str]]:
    value = _maybe_messages(value)
    if isinstance(value, str):
        return [{"role": default_role, "content": value}], [key]
    if value is None:
        raise RecordError(key, "is missing")
    return _messages(value, key)


def _preference(r: dict) -> Normalised:
    chosen, p_chosen = _turns(r.get("chosen"), "chosen", "assistant")
    rejected, p_rejected = _turns(r.get("rejected"), "rejected", "assistant")
    if r.get("prompt") is not None:
        prompt, p_prompt = _turns(r["prompt"], "prompt", "user")
        n = len(prompt)  # chosen/rejected given as whole conversations that repeat the prompt
        if chosen[:n] == prompt and rejected[:n] == prompt and len(chosen) > n and len(rejected) > n:
            chosen, p_chosen, rejected, p_rejected = chosen[n:], p_chosen[n:], rejected[n:], p_rejected[n:]
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        while n > 0 and chosen[n - 1]["role"] == "assistant":  # the prompt ends before the assistant's reply
            n -= 1
        if n == 0:
            raise RecordError("prompt", "is missing (and chosen and rejected share no prompt turns)")
        prompt, p_prompt = chosen[:n], p_chosen[:n]
        chosen, p_chosen, rejected, p_rejected = chosen[n:], p_chosen[n:], rejected[n:], p_rejected[n:]
    for side, turns, paths in (("chosen", chosen, p_chosen), ("rejected", rejected, p_rejected)):
        for m, p in zip(turns, paths):
            if m["role"] != "assistant":
                raise RecordError(f"{p}.role" if p != side else side,
                                  f"{side} holds the assistant's reply, not a {m['role']} turn")
    return Normalised(prompt, _tools(r.get("tools")), {"chosen": chosen, "rejected": rejected},
                      paths={"messages": p_prompt, "chosen": p_chosen, "rejected": p_rejected})


NORMALISERS: dict[str, Callable[[dict], Normalised]] = {
    "alpaca": _alpaca, "chat": _chat, "sharegpt": _sharegpt, "completion": _completion, "preference": _preference}
