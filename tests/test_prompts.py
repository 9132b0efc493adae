"""Prompt sources: every dataset format parsed from small fixtures with bad rows, templates,
labels, stable ids, strict mode, Parquet, globs, S3 and the toy sources."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import char_tokenizer

from cllm import prompts as prompts_module
from cllm.execution import check_completion
from cllm.hf import encode_chat
from cllm.prompts import BadPromptRowError, detect_format, load_prompts
from cllm.toy import ToyPrompt
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
    assert records == []
    assert [(b.row, b.reason) for b in bad] == [
        (1, "'conversations' ends with a human turn (no reply to learn)"),
        (2, "roles out of order: turn 1 is assistant, expected user"),
        (3, "missing field 'conversations' (a non-empty list of turns)"),
        (4, "missing field 'conversations' (a non-empty list of turns)"),
    ]

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
    assert detect_format({"task_id": "t", "prompt": "p", "test": "t", "entry_point": "f"}) == "humaneval"
    assert detect_format({"task_id": 1, "text": "t", "code": "c", "test_list": []}) == "mbpp"
    unknown = write_jsonl(tmp_path / "odd.jsonl", [{"title": "x"}])
    with pytest.raises(ValueError, match=r"odd.jsonl: cannot detect the prompt format .*'title'"):
        load_prompts(str(unknown), tokenizer)
    with pytest.raises(ValueError, match="unknown prompt format 'csv'"):
        load_prompts(str(unknown), tokenizer, format="csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.jsonl"), tokenizer)


def test_strict_makes_bad_rows_fatal(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, "oops"])
    with pytest.raises(BadPromptRowError, match=r"p.jsonl:2: not JSON"):
        load_prompts(str(path), tokenizer, strict=True)


def test_chat_template_is_used_when_present(tmp_path):
    template = "{% for m in messages %}<bos>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    tokenizer = char_tokenizer(chat_template=template)
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "2+2?", "answer": "4"}])
    (record,), _ = load_prompts(str(path), tokenizer)
    assert record.prompt == "<bos>[user] 2+2?\n[assistant] "
    assert record.prompt_ids == ids(tokenizer, record.prompt, special=False)
    assert record.prompt_ids.count(tokenizer.bos_token_id) == 1


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_sharegpt_conversation_is_rendered_whole_up_to_its_last_reply(tmp_path):
    """Every turn before the last model turn, system message included, goes through the template
    with its generation prompt (`cllm.hf.encode_chat`, as serve renders a chat request); the last
    model turn is the label."""
    tokenizer = char_tokenizer(chat_template=CHATML)
    turns = [("system", "Be brief."), ("human", "2+2?"), ("gpt", "4"), ("human", "and 3+3?"), ("gpt", "6")]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": [{"from": who, "value": text}
                                                                    for who, text in turns]}])
    (record,), bad = load_prompts(str(path), tokenizer)
    messages = (("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"), ("user", "and 3+3?"))
    assert bad == [] and (record.prompt, record.prompt_ids) == encode_chat(tokenizer, messages)
    assert record.prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert record.prompt.endswith("<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n")
    assert record.answer == "6" and record.label_ids == ids(tokenizer, "6", special=False) + [tokenizer.eos_token_id]
    # OpenAI-style role names read the same.
    openai_style = write_jsonl(tmp_path / "roles.jsonl", [{"conversations": [
        {"role": role, "content": text} for role, text in [*messages, ("assistant", "6")]]}])
    assert load_prompts(str(openai_style), tokenizer)[0][0].prompt_ids == record.prompt_ids
    # Without a chat template: Vicuna's rendering (the paper's), one exchange per `</s>`.
    plain, _ = load_prompts(str(path), char_tokenizer())
    assert plain[0].prompt == "Be brief. USER: 2+2? ASSISTANT: 4<eos>USER: and 3+3? ASSISTANT:"


def test_bad_sharegpt_conversations_are_reported_with_file_and_row(tmp_path):
    tokenizer = char_tokenizer(chat_template=CHATML)

    def conversation(*turns: tuple[str, str]) -> dict:
        return {"conversations": [{"from": who, "value": text} for who, text in turns]}

    path = write_jsonl(tmp_path / "chat.jsonl", [
        conversation(("human", "hi"), ("gpt", "hello")),
        conversation(("system", "s"), ("human", "hi"), ("gpt", "hello"), ("human", "bye")),
        conversation(("human", "hi"), ("human", "again"), ("gpt", "hello")),
        conversation(("human", "hi"), ("system", "s"), ("gpt", "hello")),
        conversation(("human", "hi"), ("narrator", "meanwhile"), ("gpt", "hello")),
        conversation(("human", "hi"), ("gpt", "")),
        conversation(("system", "only a system message")),
    ])
    records, bad = load_prompts(str(path), tokenizer)
    assert [r.row for r in records] == [1]
    assert [str(b) for b in bad] == [
        f"{path}:2: 'conversations' ends with a human turn (no reply to learn)",
        f"{path}:3: roles out of order: turn 2 is user, expected assistant",
        f"{path}:4: roles out of order: turn 2 is system, expected assistant",
        f"{path}:5: turn 2 has an unknown speaker 'narrator'",
        f"{path}:6: turn 2: field 'value' is empty",
        f"{path}:7: 'conversations' has no human turn",
    ]
    with pytest.raises(BadPromptRowError, match=r"chat.jsonl:2: 'conversations' ends with a human turn"):
        load_prompts(str(path), tokenizer, strict=True)


def test_toy_chat_prompts_are_their_conversations_rendered_through_the_teachers_template(tmp_path):
    """A toy-chat prompt and the same conversation read from a ShareGPT file give the same ids
    (collect, train and evaluate read either): the prompt is the template's rendering."""
    from cllm.toy.chat import sharegpt_record
    from cllm.toy.teacher import ToyConfig, train_tokenizer

    tokenizer = train_tokenizer(ToyConfig(domain="chat", vocab_size=300, tokenizer_corpus_docs=200))
    toy, bad = load_prompts("toy-chat:heldout", tokenizer, limit=20)
    path = write_jsonl(tmp_path / "toy-chat.jsonl", [sharegpt_record(p.messages, p.answer)
                                                    for p in toy_prompts("heldout", "chat", limit=20)])
    from_file, file_bad = load_prompts(str(path), tokenizer)
    assert bad == file_bad == [] and len(toy) == len(from_file) == 20
    assert [r.prompt_ids for r in toy] == [r.prompt_ids for r in from_file]
    assert [r.label_ids for r in toy] == [r.label_ids for r in from_file]
    assert [r.prompt for r in toy] == [r.prompt for r in from_file]
    assert toy[0].label_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id


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


def test_duplicate_prompts_are_skipped_as_bad_rows(tokenizer, monkeypatch):
    """Two toy prompts with the same text would share an id (the toy generators yield distinct
    prompts, so the corpus is faked here)."""
    same = ToyPrompt("toy-code-1", "def f():\n", "    return 1\n", "code", "heldout")
    other = ToyPrompt("toy-code-2", "def g():\n", "    return 2\n", "code", "heldout")
    monkeypatch.setattr(prompts_module, "toy_prompts", lambda split, domain, limit=None: [same, other, same])
    records, bad = load_prompts("toy-code:heldout", tokenizer)
    assert [r.prompt_id for r in records] == ["toy-code-1", "toy-code-2"]
    assert [(b.row, b.reason) for b in bad] == [(3, "duplicate of row 1 (same prompt id toy-code-1)")]
    with pytest.raises(BadPromptRowError, match="duplicate of row"):
        load_prompts("toy-code:heldout", tokenizer, strict=True)


def test_toy_code_prompts_carry_their_tests(tokenizer):
    records, bad = load_prompts("toy-code:heldout", tokenizer, limit=5)
    expected = toy_prompts("heldout", "code", limit=5)
    assert bad == [] and [r.prompt for r in records] == [p.prompt for p in expected]
    for record, toy in zip(records, expected):
        assert record.problem.test == toy.test and record.problem.entry_point == toy.entry_point
        assert record.answer == toy.answer and check_completion(record.problem, record.answer).passed


HUMANEVAL_ROW = {
    "task_id": "Demo/0", "entry_point": "double",
    "prompt": 'def double(x: int) -> int:\n    """Twice x.\n    >>> double(2)\n    4\n    """\n',
    "canonical_solution": "    return 2 * x\n",
    "test": "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(0) == 0\n",
}
MBPP_ROW = {
    "task_id": 11, "text": "Write a function to add the offset to a number.",
    "code": "def add_offset(a):\r\n  return a + OFFSET", "test_setup_code": "OFFSET = 3",
    "test_list": ["assert add_offset(1) == 4", "assert add_offset(-3) == 0"],
}


@pytest.mark.parametrize("gzipped", [False, True])
def test_humaneval_and_mbpp_files(tmp_path, tokenizer, gzipped):
    def write(name: str, rows: list) -> Path:
        text = "\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n"
        path = tmp_path / (name + (".jsonl.gz" if gzipped else ".jsonl"))
        path.write_bytes(gzip.compress(text.encode()) if gzipped else text.encode())
        return path

    humaneval = write("humaneval", [HUMANEVAL_ROW, {**HUMANEVAL_ROW, "test": ""}, "{oops"])
    records, bad = load_prompts(str(humaneval), tokenizer)
    assert [r.row for r in records] == [1]
    record = records[0]
    assert record.prompt == HUMANEVAL_ROW["prompt"]  # as is: the model continues the code
    assert record.problem.task_id == "Demo/0" and record.problem.entry_point == "double"
    assert record.answer == "    return 2 * x\n"
    assert check_completion(record.problem, record.answer).passed
    assert not check_completion(record.problem, "    return x\n").passed
    assert [str(b) for b in bad] == [f"{humaneval}:2: field 'test' is empty", f"{humaneval}:3: not JSON (Expecting "
                                     "property name enclosed in double quotes)"]

    mbpp = write("mbpp", [MBPP_ROW, {**MBPP_ROW, "test_list": "assert x"}, {**MBPP_ROW, "code": "x = ("}])
    records, bad = load_prompts(str(mbpp), tokenizer)
    record = records[0]
    assert record.problem.entry_point == "add_offset" and record.problem.task_id == "11"
    assert record.prompt == ('"""\nWrite a function to add the offset to a number.\nassert add_offset(1) == 4\n"""\n')
    assert check_completion(record.problem, "def add_offset(a):\n    return a + OFFSET\n").passed
    # a whole program: imports and helpers stay, the model's own asserts are cut
    helper = ("import math\ndef shift(a):\n    return a + OFFSET\n"
              "def add_offset(a):\n    return shift(a)\nassert False\n")
    assert check_completion(record.problem, helper).passed
    assert not check_completion(record.problem, "def add_offset(a):\n    return a\n").passed
    assert [(b.row, b.reason) for b in bad] == [
        (2, "field 'test_list' is not a non-empty list of assert statements"),
        (3, "field 'code' is not valid Python ('(' was never closed)"),
    ]
    both, _ = load_prompts(str(tmp_path), tokenizer)  # a directory: gzipped files are found too
    assert len(both) == 2


def test_code_benchmarks_never_take_a_chat_template(tmp_path):
    chat = char_tokenizer()
    chat.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    path = write_jsonl(tmp_path / "he.jsonl", [HUMANEVAL_ROW])
    records, _ = load_prompts(str(path), chat)
    assert records[0].prompt == HUMANEVAL_ROW["prompt"]


def test_humaneval_from_s3(s3_server, tokenizer):
    filesystem = s3_server.filesystem()
    with filesystem.open(f"{s3_server.bucket}/code/HumanEval.jsonl.gz", "wb") as handle:
        handle.write(gzip.compress((json.dumps(HUMANEVAL_ROW) + "\n").encode()))
    options = {"client_kwargs": {"endpoint_url": s3_server.endpoint_url}}
    records, bad = load_prompts(s3_server.uri("code/HumanEval.jsonl.gz"), tokenizer, storage_options=options)
    assert bad == [] and records[0].problem.entry_point == "double"
    assert records[0].source == f"s3://{s3_server.bucket}/code/HumanEval.jsonl.gz"
