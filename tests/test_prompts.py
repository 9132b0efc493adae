"""Prompt sources: every dataset format parsed from small fixtures with bad rows, templates,
labels, stable ids, strict mode, Parquet, globs, S3 and the toy sources."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import char_tokenizer

from cllm.prompts import BadRowError, detect_format, load_prompts
from cllm.toy.tasks import toy_prompts


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def test_gsm8k_with_bad_rows(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "What is 2+3?", "answer": "2+3=5. #### 5"},
        {"answer": "no question"},                      # row 2: missing field
        "{not json",                                     # row 3
        {"question": "", "answer": "x"},                 # row 4: empty
        {"question": 17, "answer": "x"},                 # row 5: not text
        {"question": "Q" * 300, "answer": "long"},       # row 6: over the maximum length
        {"question": "What is 1+1?", "answer": "2"},
    ])
    records, bad = load_prompts(str(path), tokenizer, max_prompt_tokens=120)
    assert [r.row for r in records] == [1, 7]
    first = records[0]
    assert first.prompt == "Question: What is 2+3?\nAnswer: Let's think step by step.\n"
    assert first.prompt_ids == ids(tokenizer, first.prompt)
    assert first.prompt_ids[0] == tokenizer.bos_token_id
    assert first.label_ids == ids(tokenizer, "2+3=5. #### 5", special=False) + [tokenizer.eos_token_id]
    assert first.answer == "2+3=5. #### 5" and first.source == str(path)
    assert [(b.row, b.source) for b in bad] == [(2, str(path)), (3, str(path)), (4, str(path)),
                                                (5, str(path)), (6, str(path))]
    reasons = [b.reason for b in bad]
    assert reasons[0] == "missing field 'question'"
    assert reasons[1].startswith("not JSON")
    assert reasons[2] == "field 'question' is empty"
    assert reasons[3] == "field 'question' is not text (got int)"
    assert reasons[4].startswith("prompt has ") and reasons[4].endswith("over the maximum 120")
    assert str(bad[0]) == f"{path}:2: missing field 'question'"


def test_spider_code_sharegpt_generic(tmp_path, tokenizer):
    spider = tmp_path / "spider.json"  # Spider ships a JSON array
    spider.write_text(json.dumps([
        {"question": "How many singers?", "query": "SELECT count(*) FROM singer", "schema": "singer(id, name)"},
        {"query": "SELECT 1"},
    ]))
    records, bad = load_prompts(str(spider), tokenizer)
    assert len(records) == 1 and "singer(id, name)" in records[0].prompt
    assert "How many singers?" in records[0].prompt and records[0].prompt.endswith("SQL: ")
    assert records[0].answer == "SELECT count(*) FROM singer"
    assert [(b.row, b.reason) for b in bad] == [(2, "missing field 'question'")]

    code = write_jsonl(tmp_path / "csn.jsonl", [
        {"func_documentation_string": "Add two numbers.", "func_code_string": "def add(a, b):\n    return a + b"},
        {"docstring": "Negate.", "code": "def neg(a):\n    return -a"},
        {"docstring": ["not", "text"], "code": "x"},
    ])
    records, bad = load_prompts(str(code), tokenizer, format="code-search-net")
    assert [r.prompt for r in records] == [
        "Please generate code based on the following doc:\nAdd two numbers.\n",
        "Please generate code based on the following doc:\nNegate.\n",
    ]
    assert records[1].answer == "def neg(a):\n    return -a"
    assert [(b.row, b.reason) for b in bad] == [(3, "field 'docstring' is not text (got list)")]

    sharegpt = write_jsonl(tmp_path / "chat.jsonl", [
        {"conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "Hi there"},
                           {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "more"}]},
        {"conversations": [{"from": "gpt", "value": "only a reply"}]},
        {"conversations": []},
        {"id": 4},
    ])
    records, bad = load_prompts(str(sharegpt), tokenizer, format="sharegpt")
    assert len(records) == 1 and records[0].prompt.endswith("USER: Hi there ASSISTANT:")
    assert records[0].answer == "Hello!"
    assert [b.row for b in bad] == [2, 3, 4]
    assert bad[0].reason == "'conversations' has no human turn"

    generic = write_jsonl(tmp_path / "generic.jsonl", [{"prompt": "raw text"}, {"text": "x"}])
    records, bad = load_prompts(str(generic), tokenizer, format="jsonl")
    assert records[0].prompt == "raw text" and records[0].label_ids is None and records[0].answer is None
    assert [(b.row, b.reason) for b in bad] == [(2, "missing field 'prompt'")]


def test_auto_detection_and_unknown_fields(tmp_path, tokenizer):
    assert detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"question": "q", "query": "s"}) == "spider"
    assert detect_format({"question": "q", "answer": "a"}) == "gsm8k"
    assert detect_format({"docstring": "d"}) == "code-search-net"
    assert detect_format({"prompt": "p"}) == "generic"
    unknown = write_jsonl(tmp_path / "odd.jsonl", [{"title": "x"}])
    with pytest.raises(ValueError, match=r"odd.jsonl: cannot detect the prompt format .*'title'"):
        load_prompts(str(unknown), tokenizer)
    with pytest.raises(ValueError, match="unknown prompt format 'csv'"):
        load_prompts(str(unknown), tokenizer, format="csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.jsonl"), tokenizer)


def test_strict_makes_bad_rows_fatal(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, "oops"])
    with pytest.raises(BadRowError, match=r"p.jsonl:2: not JSON"):
        load_prompts(str(path), tokenizer, strict=True)


def test_chat_template_is_used_when_present(tmp_path):
    template = "{% for m in messages %}<bos>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    tokenizer = char_tokenizer(chat_template=template)
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "2+2?", "answer": "4"}])
    (record,), _ = load_prompts(str(path), tokenizer)
    assert record.prompt == "<bos>[user] 2+2?\n[assistant] "
    assert record.prompt_ids == ids(tokenizer, record.prompt, special=False)
    assert record.prompt_ids.count(tokenizer.bos_token_id) == 1


def test_ids_are_stable_and_parquet_glob_limit(tmp_path, tokenizer):
    directory = tmp_path / "data"
    directory.mkdir()
    write_jsonl(directory / "a.jsonl", [{"prompt": f"p{i}"} for i in range(3)])
    pq.write_table(pa.Table.from_pylist([{"prompt": f"q{i}", "answer": "x"} for i in range(3)]),
                   directory / "b.parquet")
    (directory / "_ignored.jsonl").write_text("garbage\n")
    records, bad = load_prompts(str(directory / "*"), tokenizer)
    assert [r.prompt for r in records] == ["p0", "p1", "p2", "q0", "q1", "q2"] and bad == []
    assert len({r.prompt_id for r in records}) == 6
    again, _ = load_prompts(str(directory), tokenizer)  # same files, spelled as a directory
    assert [r.prompt_id for r in again] == [r.prompt_id for r in records]
    moved = tmp_path / "elsewhere"
    (directory).rename(moved)  # ids depend on file names and rows, not on where the files are
    assert [r.prompt_id for r in load_prompts(str(moved), tokenizer)[0]] == [r.prompt_id for r in records]
    limited, _ = load_prompts(str(moved), tokenizer, limit=4)
    assert len(limited) == 4


def test_reads_from_s3(s3_server, tokenizer):
    filesystem = s3_server.filesystem()
    with filesystem.open(f"{s3_server.bucket}/prompts/p.jsonl", "w") as handle:
        handle.write(json.dumps({"prompt": "from s3"}) + "\nnot json\n")
    options = {"client_kwargs": {"endpoint_url": s3_server.endpoint_url}}
    records, bad = load_prompts(s3_server.uri("prompts/*.jsonl"), tokenizer, storage_options=options)
    assert [r.prompt for r in records] == ["from s3"]
    assert [str(b) for b in bad] == [f"s3://{s3_server.bucket}/prompts/p.jsonl:2: not JSON (Expecting value)"]


def test_toy_sources(tokenizer):
    records, bad = load_prompts("toy-math:heldout", tokenizer, limit=3)
    expected = toy_prompts("heldout", "math", limit=3)
    assert bad == [] and [r.prompt_id for r in records] == [p.prompt_id for p in expected]
    assert records[0].prompt_ids == ids(tokenizer, expected[0].prompt)
    assert records[0].label_ids[-1] == tokenizer.eos_token_id
    assert load_prompts("toy:train", tokenizer, limit=2)[0][0].source == "toy:train"


def test_duplicate_prompts_are_skipped_as_bad_rows(tokenizer):
    """Toy code has a few functions with the same docstring: the same prompt, hence the same id."""
    expected = toy_prompts("heldout", "code")
    records, bad = load_prompts("toy-code:heldout", tokenizer)
    duplicates = [b for b in bad if "duplicate of row" in b.reason]
    assert duplicates and len(records) + len(duplicates) == len(expected)
    assert len({r.prompt_id for r in records}) == len(records)
    with pytest.raises(BadRowError, match="duplicate of row"):
        load_prompts("toy-code:heldout", tokenizer, strict=True)
