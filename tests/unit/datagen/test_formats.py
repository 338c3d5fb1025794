"""Reading and normalising: golden canonical output per format and file kind, and line-numbered problems for
malformed input (truncated JSON, BOM, CSV field counts, bad UTF-8, an empty file, a 50 MB line)."""

from __future__ import annotations

import json
import os
import time
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.datagen import formats
from services.datagen.formats import RecordError, detect_format, normalise, read_records, to_example
from services.datagen.validate import Problem, check_example
from tests.unit.datagen.helpers import GOLDEN, write_jsonl

FORMATS = ["alpaca", "chat", "sharegpt", "completion", "preference"]


def canonical(path, fmt="auto"):
    """Examples (and Problems) of a file, as prepare builds them before validation."""
    out = []
    for line, rec in read_records(path):
        if isinstance(rec, Problem):
            out.append(rec)
            continue
        fmt = detect_format(rec) if fmt == "auto" else fmt
        out.append(to_example(normalise(fmt, rec), fmt, path.name, line, None))
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_golden(fmt):
    got = canonical(GOLDEN / f"{fmt}.jsonl")
    expected_path = GOLDEN / f"{fmt}.expected.jsonl"
    if os.environ.get("UPDATE_GOLDEN"):
        expected_path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in got), encoding="utf-8")
    expected = [json.loads(line) for line in expected_path.read_text(encoding="utf-8").splitlines()]
    assert got == expected
    assert all(e["source"]["format"] == fmt for e in got)


def test_the_same_conversation_in_every_format_is_the_same_example():
    by_fmt = {fmt: canonical(GOLDEN / f"{fmt}.jsonl") for fmt in FORMATS}
    alpaca, chat, sharegpt = by_fmt["alpaca"], by_fmt["chat"], by_fmt["sharegpt"]
    for i in (0, 1):
        assert alpaca[i]["messages"] == chat[i]["messages"] == sharegpt[i]["messages"]
        assert alpaca[i]["id"] == chat[i]["id"] == sharegpt[i]["id"]
    # the completion format has no system prompt, so it matches from the user turn on
    assert by_fmt["completion"][0]["messages"] == chat[0]["messages"][1:]
    assert by_fmt["completion"][1]["id"] == chat[1]["id"]
    # tool use: ShareGPT's function_call/observation become the same turns (ids are generated, and not hashed)
    assert chat[2]["id"] == sharegpt[2]["id"] and chat[2]["tools"] == sharegpt[2]["tools"]
    assert [m["role"] for m in sharegpt[2]["messages"]] == ["user", "assistant", "tool", "assistant"]
    call = sharegpt[2]["messages"][1]["tool_calls"][0]
    assert call["function"] == chat[2]["messages"][1]["tool_calls"][0]["function"]
    assert sharegpt[2]["messages"][2]["tool_call_id"] == call["id"]
    pref = by_fmt["preference"]
    assert pref[0]["messages"] == [{"role": "user", "content": "Name a prime number between 10 and 20."}]
    assert pref[1]["messages"] == chat[1]["messages"][:0] + [{"role": "system", "content": "You are a concise assistant."},
                                                            chat[1]["messages"][0]]
    assert pref[1]["preference"]["rejected"] == [{"role": "assistant", "content": "Good morning"}]


def test_csv_json_array_and_parquet_read_like_jsonl(tmp_path):
    rows = [json.loads(line) for line in (GOLDEN / "chat.jsonl").read_text().splitlines()]
    expected = canonical(GOLDEN / "chat.jsonl")
    (tmp_path / "chat.json").write_text(json.dumps(rows, indent=2))
    with open(tmp_path / "chat.csv", "w", newline="", encoding="utf-8") as f:
        import csv

        w = csv.writer(f)
        w.writerow(["messages", "tools"])
        for r in rows:  # JSON cells, as spreadsheets export them
            w.writerow([json.dumps(r["messages"]), json.dumps(r["tools"]) if "tools" in r else ""])
    pq.write_table(pa.Table.from_pylist([{"messages": json.dumps(r["messages"]), "tools": json.dumps(r.get("tools"))}
                                         for r in rows]), tmp_path / "chat.parquet")
    for name, first_line in (("chat.json", 1), ("chat.csv", 2), ("chat.parquet", 1)):
        got = canonical(tmp_path / name)
        assert [e["source"]["line"] for e in got] == [first_line + i for i in range(3)], name
        for g, e in zip(got, expected):
            assert (g["id"], g["messages"], g["tools"]) == (e["id"], e["messages"], e["tools"]), name


def test_parquet_with_nested_columns(tmp_path):
    rows = [{"instruction": "Say hi.", "input": None, "output": "Hi!"}, {"instruction": "Count.", "input": "1 2",
                                                                         "output": "3"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    msgs = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    pq.write_table(pa.Table.from_pylist(msgs), tmp_path / "m.parquet")  # a list<struct> column
    assert [e["messages"][0]["content"] for e in canonical(tmp_path / "a.parquet")] == ["Say hi.", "Count.\n\n1 2"]
    assert canonical(tmp_path / "m.parquet")[0]["messages"] == msgs[0]["messages"]


def test_json_array_streams_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "CHUNK", 7)  # every element spans many reads
    rows = [{"instruction": f"q{i} ünïcode ✓", "output": "x" * (i * 13 % 50)} for i in range(40)]
    (tmp_path / "a.json").write_text(json.dumps(rows, ensure_ascii=False))
    got = list(read_records(tmp_path / "a.json"))
    assert got == [(i + 1, r) for i, r in enumerate(rows)]


def test_json_array_errors(tmp_path):
    (tmp_path / "a.json").write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}, {}]')
    got = list(read_records(tmp_path / "a.json"))
    assert [line for line, _ in got] == [1, 2]
    assert str(got[1][1]) == ("a.json:2: not valid JSON (Expecting ',' delimiter at file line 2, column 21); the rest of "
                        "the array cannot be read")
    (tmp_path / "b.json").write_text('[{"a": 1}, 3')
    got = list(read_records(tmp_path / "b.json"))
    assert [line for line, _ in got] == [1, 2, 0]
    (_, ok), (_, p), (_, end) = got
    assert ok == {"a": 1} and p.message == "expected a JSON object, not a number" and "not closed" in end.message


def test_truncated_json_on_line_7(tmp_path):
    lines = [json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) for i in range(10)]
    lines[6] = lines[6][:25]
    got = list(read_records(write_jsonl(tmp_path / "train.jsonl", lines, raw=True)))
    problems = [(line, p) for line, p in got if isinstance(p, Problem)]
    assert [(line, p.severity) for line, p in problems] == [(7, "error")]
    assert str(problems[0][1]) == "train.jsonl:7: not valid JSON (Unterminated string starting at column 17)"
    assert len(got) == 10  # reading goes on after the bad line


def test_json_errors_name_the_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"instruction": "a", "output" "b"}', "[1, 2]", "", "  "], raw=True)
    got = list(read_records(path))
    assert [line for line, _ in got] == [1, 2]
    (_, a), (_, b) = got
    assert str(a) == "d.jsonl:1: not valid JSON (Expecting ':' delimiter at column 31)"
    assert str(b) == "d.jsonl:2: expected a JSON object (one record per line), not a list"


def test_bom_is_stripped_and_reported(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "a", "completion": "b"}).encode() + b"\n")
    got = list(read_records(path))
    assert [line for line, _ in got] == [1, 1]
    (_, warn), (_, rec) = got
    assert warn.severity == "warning" and warn.line == 1 and "byte-order mark" in warn.message
    assert rec == {"prompt": "a", "completion": "b"}
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfprompt,completion\na,b\n")
    got = list(read_records(csv_path))
    assert [line for line, _ in got] == [1, 2]
    (_, warn), (_, rec) = got
    assert warn.severity == "warning" and rec == {"prompt": "a", "completion": "b"}


def test_csv_with_a_missing_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\nSay hi,,Hi\n"Add, please",1 2\nCount,"1,2",3\nToo,many,fields,here\n')
    got = list(read_records(path))
    assert [(line, type(r).__name__) for line, r in got] == [(2, "dict"), (3, "Problem"), (4, "dict"),
                                                             (5, "Problem")]
    assert str(got[1][1]) == "d.csv:3: the row has 2 fields, the header has 3 (instruction, input, output)"
    assert got[3][1].message.startswith("the row has 4 fields")
    assert got[2][1] == {"instruction": "Count", "input": "1,2", "output": "3"}


def test_csv_without_the_formats_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,input\nSay hi,\n")
    [(line, rec)] = list(read_records(path))
    assert line == 2
    with pytest.raises(RecordError, match="expected instruction and output"):
        normalise("alpaca", rec)


def test_not_utf8_names_the_byte(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    got = list(read_records(path))
    assert [line for line, _ in got] == [1, 2]
    p = got[1][1]
    assert str(p) == "d.jsonl:2: not valid UTF-8 (byte 0xe9 at byte 16 of the line, file offset 50)"


@pytest.mark.parametrize("content", [b"", b"  \n\n\t \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    [(line, p)] = list(read_records(path))
    assert line == 0 and p.severity == "error" and str(p) == "empty.jsonl: the file is empty"


def test_a_50mb_line_is_skipped_without_parsing(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(json.dumps({"prompt": "a", "completion": "b"}).encode() + b"\n")
        f.write(b'{"prompt": "' + b"x" * (50 * 1024 * 1024) + b'", "completion": "b"}\n')
        f.write(json.dumps({"prompt": "c", "completion": "d"}).encode() + b"\n")
    tracemalloc.start()
    t0 = time.monotonic()
    got = list(read_records(path))
    seconds = time.monotonic() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [line for line, _ in got] == [1, 2, 3]
    assert got[2][1] == {"prompt": "c", "completion": "d"}
    p = got[1][1]
    assert p.severity == "error" and p.line == 2
    assert p.message == (f"the line is {50 * 1024 * 1024 + 33:,} bytes, longer than max_line_bytes "
                         f"({formats.MAX_LINE_BYTES:,}); skipped without parsing")
    assert peak < 3 * formats.MAX_LINE_BYTES and seconds < 5, (peak, seconds)


def test_detect_format():
    assert detect_format({"instruction": "a", "output": "b"}) == "alpaca"
    assert detect_format({"messages": []}) == "chat"
    assert detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"prompt": "a", "completion": "b"}) == "completion"
    assert detect_format({"prompt": "a", "chosen": "b", "rejected": "c"}) == "preference"
    with pytest.raises(RecordError, match="cannot tell the format from the fields text, label"):
        detect_format({"text": "a", "label": 1})


@pytest.mark.parametrize("fmt,record,field,message", [
    ("chat", {"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role",
     "must be one of system, user, assistant, tool, not 'bot'"),
    ("chat", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "must be a string, not a number"),
    ("chat", {"messages": '[{"role": "user", "content": "a"}'}, "messages",
     "must be a list of messages; got a string that is not valid JSON (Expecting ',' delimiter at column 34)"),
    ("chat", {"messages": [{"role": "user", "content": "a", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]},
     "messages[0].tool_calls", "only assistant turns make tool calls, not user"),
    ("chat", {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]},
     "messages[0].tool_calls[0].function.arguments", "is missing"),
    ("sharegpt", {"conversations": [{"from": "robot", "value": "x"}]}, "conversations[0].from",
     "must be one of human, user, gpt, assistant, chatgpt, system, function_call, observation, tool, not 'robot'"),
    ("sharegpt", {"conversations": [{"from": "function_call", "value": "{name: f}"}]}, "conversations[0].value",
     'a function_call\'s value must be JSON {"name", "arguments"} (or a list of them); not valid JSON '
     "(Expecting property name enclosed in double quotes at column 2)"),
    ("alpaca", {"instruction": ["a"], "output": "b"}, "instruction", "must be a string, not a list"),
    ("alpaca", {"messages": []}, "", "does not fit the file's format alpaca: expected instruction and output "
     "(or response); optional input, system; got messages"),
    ("preference", {"chosen": "a", "rejected": "b"}, "prompt",
     "is missing (and chosen and rejected share no prompt turns)"),
    ("preference", {"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "chosen[0].role",
     "chosen holds the assistant's reply, not a user turn"),
])
def test_normalise_errors_name_the_field(fmt, record, field, message):
    with pytest.raises(RecordError) as e:
        normalise(fmt, record)
    assert (e.value.field, e.value.message) == (field, message)


def checked(record, fmt="chat"):
    n = normalise(fmt, record)
    return [str(p) for p in check_example(to_example(n, fmt, "train.jsonl", 7, None), n.paths, n.names)]


def test_assistant_first():
    assert checked({"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Yo"},
                                 {"role": "assistant", "content": "Hey"}]}) == [
        "train.jsonl:7: messages[0].role: a conversation starts with system or user, not assistant"]
    # ShareGPT problems name ShareGPT's fields
    assert checked({"conversations": [{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "Yo"},
                                      {"from": "gpt", "value": "Hey"}]}, "sharegpt") == [
        "train.jsonl:7: conversations[0].from: a conversation starts with system or user, not assistant"]


def test_invalid_tool_call_json():
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "tool_calls": [{"id": "a", "type": "function",
                                                  "function": {"name": "w", "arguments": '{"city": "Paris" "u": 1}'}},
                                                 {"id": "b", "function": {"name": "w", "arguments": "[1]"}}]},
            {"role": "tool", "tool_call_id": "a", "content": "18"}, {"role": "tool", "tool_call_id": "c", "content": "x"},
            {"role": "assistant", "content": "18 C"}]
    assert checked({"messages": msgs}) == [
        "train.jsonl:7: messages[1].tool_calls[0].function.arguments: not valid JSON (Expecting ',' delimiter at "
        "column 18)",
        "train.jsonl:7: messages[1].tool_calls[1].function.arguments: must be a JSON object, not list",
        "train.jsonl:7: messages[3].tool_call_id: 'c' matches no tool call of the assistant turn before it (a, b)"]


def test_role_order_and_suspicious_text():
    got = checked({"messages": [
        {"role": "system", "content": ""}, {"role": "user", "content": "Hello {{ name }}"},
        {"role": "user", "content": "again"}, {"role": "tool", "content": "x"},
        {"role": "assistant", "content": "again"}, {"role": "assistant", "content": "  "}, {"role": "user",
                                                                                        "content": "<|im_start|>"}]})
    assert got == [
        "train.jsonl:7: messages[0].content: the system prompt is empty",
        "train.jsonl:7: messages[1].content: contains the template marker '{{'; the text should be plain, the chat "
        "template adds the markup",
        "train.jsonl:7: messages[2].role: two user turns in a row",
        "train.jsonl:7: messages[3].role: a tool result must follow an assistant turn that calls a tool",
        "train.jsonl:7: messages[4].content: the assistant reply repeats the user's prompt word for word",
        "train.jsonl:7: messages[5].role: two assistant turns in a row (a tool turn may sit between them)",
        "train.jsonl:7: messages[5].content: the assistant reply is empty",
        "train.jsonl:7: messages[6].content: contains the template marker '<|im_start|>'; the text should be plain, "
        "the chat template adds the markup",
        "train.jsonl:7: messages[6].role: the conversation must end with the assistant's reply, not a user turn"]


def test_alpaca_problems_name_alpaca_fields():
    assert checked({"instruction": "  ", "output": "x"}, "alpaca") == ["train.jsonl:7: instruction: is empty"]
