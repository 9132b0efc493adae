"""The toy teachers: corpora, splits, tokenizer, a tiny-budget build, its cache and reload."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from itertools import islice, repeat

import pytest
import torch

from cllm import toy
from cllm.execution import CodeProblem, check_completions
from cllm.hf import load_model
from cllm.metrics import IGNORE, repetition_rate
from cllm.toy import chat as toy_chat
from cllm.toy import code as toy_code
from cllm.toy import is_heldout_question, sql_schema, teacher
from cllm.toy import math as toy_math
from cllm.toy import sql as toy_sql
from cllm.toy.tasks import check_answer, exact_match, toy_prompts

# A teacher that builds in seconds: the real pipeline (tokenizer, training, held-out loss, save)
# with a toy-sized model and budget.
TINY = teacher.ToyConfig(
    domain="math", vocab_size=300, tokenizer_corpus_docs=300, hidden_size=32, intermediate_size=64,
    num_layers=2, num_heads=2, max_length=128, train_tokens=16_000, batch_size=8, learning_rate=1e-2,
    eval_prompts=8, processes=1, threads=1,
)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """(cache root, model, tokenizer) of one tiny math teacher, built once for this module."""
    root = tmp_path_factory.mktemp("cllm-cache")
    model, tokenizer = teacher.load_toy("math", TINY, cache_dir=root)
    return root, model, tokenizer


# -- corpora ------------------------------------------------------------------------------------


def test_math_prompts_are_formatted_stable_and_distinct():
    prompts = toy_prompts("heldout", "math", limit=50)
    assert prompts == toy_prompts("heldout", "math", limit=50)
    assert len({p.prompt_id for p in prompts}) == len({p.prompt for p in prompts}) == 50
    for p in prompts:
        assert p.prompt.startswith("Question: ") and p.prompt.endswith("\nAnswer:")
        assert toy_math.final_number(p.answer) is not None
        assert p.domain == "math" and p.split == "heldout"
    assert len(toy_prompts("train", "math")) == toy_math.TASK.train_prompts


def test_math_answers_are_arithmetically_right():
    for p in toy_prompts("train", "math", limit=300):
        for left, op, right, result in _equations(p.answer):
            assert (left + right if op == "+" else left - right) == result, p.answer
        assert toy_math.final_number(p.answer) == result  # the last step's result


def _equations(answer: str) -> list[tuple[int, str, int, int]]:
    import re

    return [(int(a), op, int(b), int(c)) for a, op, b, c in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", answer)]


def test_math_splits_share_no_question():
    train = {p.prompt for p in toy_prompts("train", "math", limit=20_000)}
    heldout = {p.prompt for p in toy_prompts("heldout", "math")}
    assert len(heldout) == toy_math.TASK.heldout_prompts
    assert not train & heldout


def _passes_in_process(prompt: str, body: str, test: str, entry_point: str) -> bool:
    """Run our own generated code here (the sandbox is for a model's): fast enough for hundreds."""
    namespace: dict = {}
    try:
        exec(f"{prompt}{body}\n{test}\ncheck({entry_point})\n", namespace)
    except Exception:
        return False
    return True


def test_code_tasks_have_humaneval_form():
    rng = random.Random(0)
    tasks = [toy_code.draw_task(rng) for _ in range(300)]
    assert {task.family for task in tasks} == set(toy_code.FAMILIES) and len(toy_code.FAMILIES) >= 8
    for task in tasks:
        assert task.prompt.startswith("from typing import ")
        assert re.search(rf"^def {task.entry_point}\(\w+: [\w\[\]]+\) -> [\w\[\], ]+:$", task.prompt, re.M), task.prompt
        assert 1 <= task.prompt.count("    >>> ") <= 2 and task.prompt.endswith('    """\n')
        assert task.test.startswith("def check(candidate):\n")
        assert task.test.count("    assert candidate(") == toy_code.TEST_CASES >= 5
        assert task.canonical_solution.startswith("    ") and task.canonical_solution.count("\n") >= 2
        assert toy_code.specification(task.prompt) == task.specification
        # a string the body copies from the docstring is quoted as there: the same tokens
        for quote, other in (("'", '"'), ('"', "'")):
            for quoted in re.findall(rf"{quote}(\w+|[^\w\s]){quote}", task.specification):
                assert f"{other}{quoted}{other}" not in task.canonical_solution, (quoted, task.canonical_solution)
    # names, parameters and constants vary, so a body is read from the prompt
    assert len({task.entry_point for task in tasks}) > 50
    assert len({task.canonical_solution for task in tasks}) > 250


def test_code_generator_is_deterministic_and_splits_by_specification():
    heldout = toy_prompts("heldout", "code", limit=100)  # a held-out task takes 20 draws: few of them
    assert toy_code.TASK.prompts("heldout", 20, seed=0) == list(heldout[:20])  # drawn again, the same
    train = toy_prompts("train", "code", limit=2000)
    heldout_specs = [toy_code.specification(p.prompt) for p in heldout]
    train_specs = {toy_code.specification(p.prompt) for p in train}
    assert len(set(heldout_specs)) == len(heldout)  # held-out tasks are distinct
    assert not train_specs & set(heldout_specs)  # and never trained on
    assert all(is_heldout_question(spec) for spec in heldout_specs)
    taught = [next(stream) for stream in [toy_code.TASK.training_documents(0)] for _ in range(200)]
    assert not any(is_heldout_question(toy_code.specification(p.prompt)) for p in taught)
    for p in heldout[:20]:
        assert p.domain == "code" and p.split == "heldout" and p.test and p.entry_point
        assert p.answer.startswith("    ")  # the body continues the prompt as is: no space between


def test_the_code_teachers_stream_weights_the_families_that_copy_arithmetic():
    """The teacher trains on more `nested`, `comprehension` and `transform` tasks than the train
    split holds, and on fewer of the small families, which every build learns."""
    stream = toy_code.TASK.training_documents(seed=0)
    taught = [next(stream) for _ in range(600)]
    split = toy_prompts("train", "code", limit=600)
    copying = re.compile(r"Start a total at 0\.|Return (the square of )?each number|with every character")
    small = re.compile(r"Pair the first number|from index \d on|Return a dict")

    def share(pattern: re.Pattern, prompts: list) -> float:
        return sum(bool(pattern.search(p.prompt)) for p in prompts) / len(prompts)

    assert share(copying, taught) > 1.4 * share(copying, split) > 0.4
    assert share(small, taught) < 0.7 * share(small, split)


def test_every_canonical_solution_passes_its_own_test_and_a_wrong_constant_fails():
    prompts = toy_prompts("heldout", "code", limit=100) + toy_prompts("train", "code", limit=2000)[:300]
    assert all(_passes_in_process(p.prompt, p.answer, p.test, p.entry_point) for p in prompts)
    caught = mutated = 0
    for p in prompts:  # the first integer constant of each body, raised by one
        match = re.search(r"(?<![\w.])\d+(?![\w.])", p.answer)
        if match:
            wrong = f"{p.answer[: match.start()]}{int(match.group()) + 1}{p.answer[match.end():]}"
            mutated += 1
            caught += not _passes_in_process(p.prompt, wrong, p.test, p.entry_point)
    assert mutated > 300 and caught / mutated > 0.9
    # in the sandbox too, as the evaluation scores them
    sample = prompts[:12]
    problems = [CodeProblem(p.prompt_id, p.prompt, p.test, p.entry_point) for p in sample]
    assert all(r.passed for r in check_completions(problems, [p.answer for p in sample]))
    broken = [p.answer.replace("return", "return 1 +", 1) for p in sample]
    assert not any(r.passed for r in check_completions(problems, broken))


# -- metrics ------------------------------------------------------------------------------------


def test_check_answer_compares_the_final_number():
    reference = " Tom starts with 3 apples. Tom has 3 + 4 = 7 apples. The answer is 7."
    assert check_answer("math", "Tom has 3 + 4 = 7 apples. The answer is 7.", reference) is True
    assert check_answer("math", "Tom has 3 + 4 = 8 apples. The answer is 8.", reference) is False
    assert check_answer("math", "Tom has 3 + 4 = 7 apples.", reference) is False  # no final line
    assert check_answer(None, "The answer is 17.", reference) is False  # None: the default domain
    assert check_answer("code", "def f(): pass", "def f(): pass") is None


def test_repetition_rate():
    assert repetition_rate(list(range(20))) == 0.0
    assert repetition_rate([1, 2, 3]) == 0.0
    assert repetition_rate([5, 6] * 20) > 0.9
    assert repetition_rate([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 - 4 / 5)


# -- tokenizer ----------------------------------------------------------------------------------


def test_math_tokenizer_splits_digits_and_adds_bos(tiny_build):
    _, _, tokenizer = tiny_build
    text = "Question: Tom has 123 apples.\nAnswer:"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert "1" in tokens and "2" in tokens and "3" in tokens  # one token per digit
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3


# -- build, cache, reload -----------------------------------------------------------------------


def test_build_saves_and_reloads(tiny_build):
    root, model, tokenizer = tiny_build
    directory = teacher.teacher_dir("math", root)
    assert directory == root / f"toy-{toy.TOY_VERSIONS['math']}" / "math"
    for name in ("model.safetensors", "config.json", "tokenizer.json", teacher.BUILD_INFO_FILE):
        assert (directory / name).is_file(), name
    info = teacher.toy_build_info("math", root)
    assert info["config"] == dataclasses.asdict(TINY)
    assert info["training"]["tokens"] >= TINY.train_tokens
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert 0 < info["heldout_answer_loss"] < 10

    reloaded, reloaded_tokenizer = teacher.load_toy("math", cache_dir=root)
    assert _same_weights(_state(model), _state(reloaded))
    prompt = toy_prompts("heldout", "math", limit=1)[0].prompt
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    assert reloaded_tokenizer(prompt)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_second_load_reuses_the_cache(tiny_build, capsys):
    root, _, _ = tiny_build
    weights = teacher.teacher_dir("math", root) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    teacher.load_toy("math", TINY, cache_dir=root)  # same config: reuse
    teacher.load_toy(cache_dir=root)  # no config, default domain (math): reuse whatever is built
    assert weights.stat().st_mtime_ns == before
    assert "building" not in capsys.readouterr().err


def test_load_model_finds_the_toy_teacher_through_cllm_cache(tiny_build, monkeypatch):
    root, model, _ = tiny_build
    monkeypatch.setenv("CLLM_CACHE", str(root))
    for name in ("toy-math", "toy"):
        loaded, tokenizer = load_model(name, device="cpu")
        assert _same_weights(_state(model), _state(loaded))
        assert tokenizer.eos_token_id == model.config.eos_token_id


def test_training_lowers_the_heldout_loss(tiny_build):
    root, model, tokenizer = tiny_build
    untrained = teacher.new_teacher(TINY, tokenizer)
    prompts = toy_prompts("heldout", "math", limit=8)
    trained_loss = teacher.toy_build_info("math", root)["heldout_answer_loss"]
    assert trained_loss == pytest.approx(teacher.heldout_loss(model, tokenizer, prompts, TINY.max_length))
    assert trained_loss < teacher.heldout_loss(untrained, tokenizer, prompts, TINY.max_length) - 0.5


@pytest.mark.slow  # two more tiny builds
def test_same_seed_same_tokenizer_and_weights(tiny_build, tmp_path):
    root, model, tokenizer = tiny_build
    again, again_tokenizer = teacher.load_toy("math", TINY, cache_dir=tmp_path / "again")
    assert again_tokenizer.get_vocab() == tokenizer.get_vocab()
    first = json.loads((teacher.teacher_dir("math", root) / "tokenizer.json").read_text())["model"]
    second = json.loads((teacher.teacher_dir("math", tmp_path / "again") / "tokenizer.json").read_text())["model"]
    assert first["merges"] == second["merges"]
    assert _same_weights(_state(model), _state(again))

    reseeded, _ = teacher.load_toy("math", dataclasses.replace(TINY, seed=1), cache_dir=tmp_path / "again")
    assert not _same_weights(_state(model), _state(reseeded))
    assert teacher.toy_build_info("math", tmp_path / "again")["config"]["seed"] == 1  # rebuilt in place


def test_two_training_processes_build_the_one_process_teacher(tiny_build, tmp_path):
    """Data parallelism changes the speed, not the teacher: each process trains half of every
    batch and the summed gradients are the whole batch's."""
    _, model, _ = tiny_build
    parallel, _ = teacher.load_toy("math", dataclasses.replace(TINY, processes=2), cache_dir=tmp_path)
    info = teacher.toy_build_info("math", tmp_path)
    assert info["config"]["processes"] == 2 and info["training"]["tokens"] >= TINY.train_tokens
    one, two = _state(model), _state(parallel)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="processes"):
        dataclasses.replace(TINY, processes=TINY.batch_size + 1)


def test_unknown_domain_and_split_are_refused():
    with pytest.raises(ValueError, match="domain"):
        toy_prompts("train", "poetry")
    with pytest.raises(ValueError, match="split"):
        toy_prompts("dev", "math")
    with pytest.raises(ValueError, match="domain"):
        teacher.load_toy("code", TINY)


def test_toy_names_are_parsed_in_one_place():
    assert toy.parse_toy_name("toy") == toy.ToyName("math", "train")
    assert toy.parse_toy_name("toy-code:heldout") == toy.ToyName("code", "heldout")
    assert toy.parse_toy_name("toy-math:train") == toy.ToyName("math", "train")
    assert toy.parse_toy_name("toy-sql:heldout") == toy.ToyName("sql", "heldout")
    for other in ("Qwen/Qwen2.5-0.5B", "runs/demo/cllm/hf", "s3://bucket/model", "toys", "toy-poetry"):
        assert toy.parse_toy_name(other) is None
    with pytest.raises(ValueError, match="split"):
        toy.parse_toy_name("toy:dev")


# -- toy sql ------------------------------------------------------------------------------------


def test_sql_prompts_are_spider_style_stable_and_split_by_question():
    train = toy_prompts("train", "sql", limit=1000)
    heldout = toy_prompts("heldout", "sql", limit=100)
    assert heldout == toy_prompts("heldout", "sql", limit=100)  # deterministic
    assert [p.prompt_id for p in train[:50]] == [p.prompt_id for p in toy_prompts("train", "sql", limit=50)]
    questions = {split: {p.prompt.split("\nQuestion: ")[1].removesuffix("\nSQL:") for p in prompts}
                 for split, prompts in (("train", train), ("heldout", heldout))}
    assert not questions["train"] & questions["heldout"]  # no held-out question is ever trained on
    assert all(is_heldout_question(q) for q in questions["heldout"])
    assert len(questions["heldout"]) == 100  # a score counts distinct questions, not schemas of one
    assert len({p.prompt for p in train}) == 1000
    with pytest.raises(ValueError, match="toy-sql:heldout has 500 prompts"):
        toy_prompts("heldout", "sql", limit=501)
    for p in heldout[:50]:
        assert p.prompt.startswith(toy_sql.PROMPT_HEADER) and p.prompt.endswith("\nSQL:")
        assert p.answer.startswith(" SELECT ") and p.domain == "sql" and p.split == "heldout"
        tables = sql_schema.parse_schema(toy_sql.prompt_schema(p.prompt))
        assert 2 <= len(tables) <= 4
        assert sql_schema.render_schema(tables) == toy_sql.prompt_schema(p.prompt)  # the schema text round-trips


def test_sql_covers_every_query_family_and_gold_sql_always_executes():
    prompts = toy_prompts("train", "sql", limit=400) + toy_prompts("heldout", "sql", limit=100)
    empty = 0
    for p in prompts:
        connection = sql_schema.build_database(toy_sql.prompt_schema(p.prompt))
        result = toy_sql.run_query(connection, p.answer)
        assert result is not None, p.answer  # runs on the database the prompt's schema describes
        empty += not result
        assert check_answer("sql", p.answer, p.answer, p.prompt) is True
    assert empty < len(prompts) * 0.05  # values come from the rows, so results are rarely empty
    answers = " ".join(p.answer for p in prompts)
    for clause in ("WHERE", "COUNT(*)", "AVG(", "MAX(", "MIN(", "ORDER BY", "LIMIT", "GROUP BY", " JOIN "):
        assert clause in answers, clause
    # typed columns and a real foreign key in the database
    schema = toy_sql.prompt_schema(next(p.prompt for p in prompts if " JOIN " in p.answer))
    connection = sql_schema.build_database(schema)
    foreign = [row for table in sql_schema.parse_schema(schema)
               for row in connection.execute(f"PRAGMA foreign_key_list({table.name})").fetchall()]
    assert foreign


def test_the_sql_teachers_stream_asks_more_number_questions_and_no_heldout_one():
    """The teacher trains on a mix weighted towards filtered selections (`WHERE col > 220`), the
    family most held-out questions come from, while the train split keeps the generator's mix."""
    stream = toy_sql.TASK.training_documents(seed=0)
    taught = [next(stream) for _ in range(2000)]
    split = toy_prompts("train", "sql", limit=2000)
    filtered = re.compile(r"^ SELECT \w+ FROM \w+ WHERE \w+ [<>=] \d+$")

    def share(prompts: list) -> float:
        return sum(bool(filtered.match(p.answer)) for p in prompts) / len(prompts)

    assert share(taught) > 2 * share(split) > 0.2
    assert not any(is_heldout_question(p.prompt.split("\nQuestion: ")[1].removesuffix("\nSQL:")) for p in taught)
    assert [p.prompt for p in taught[:20]] == [p.prompt for p in islice(toy_sql.TASK.training_documents(0), 20)]


SCHEMA = "- pupils(id, name, age, city)\n- tests(id, student_id -> pupils.id, subject, score)"
PROMPT = toy_sql.sql_prompt(SCHEMA, "How many students are there?")


def test_sql_scorer_runs_the_queries():
    def right(generated: str, reference: str) -> bool:
        return check_answer("sql", generated, reference, PROMPT)

    cities = "SELECT city FROM pupils"
    assert right(" SELECT city FROM pupils", cities)
    assert right("select CITY from PUPILS;", cities)  # SQL is case-insensitive; a ';' is fine
    assert right("SELECT city FROM pupils ORDER BY age", cities)  # row order only counts with ORDER BY
    assert right("SELECT city FROM pupils WHERE id > 0\nand then some text", cities)  # the first line is the query
    assert not right("SELECT DISTINCT city FROM pupils", cities)  # duplicates count
    ordered = "SELECT name FROM pupils ORDER BY age DESC, id"
    assert right("SELECT name FROM pupils ORDER BY age DESC, id", ordered)
    assert not right("SELECT name FROM pupils ORDER BY age ASC, id DESC", ordered)  # same rows, other order
    for broken in ("SELEC city FROM pupils", "SELECT city FROM students", "", "DROP TABLE pupils",
                   "SELECT 1; SELECT 2", "DELETE FROM pupils", "SELECT city FROM pupils WHERE name = 'Tom"):
        assert not right(broken, cities), broken  # wrong, never a crash
    runaway = "SELECT COUNT(*) FROM pupils, tests AS a, tests AS b, tests AS c, tests AS d, tests AS e"
    assert not right(runaway, "SELECT COUNT(*) FROM pupils")  # interrupted, not waited for
    with pytest.raises(ValueError, match="prompt"):
        check_answer("sql", cities, cities)


def test_sql_exact_match_normalizes_whitespace_and_case_outside_literals():
    reference = " SELECT COUNT(*) FROM pupils WHERE city = 'Oslo'"
    assert exact_match("sql", "select  count(*) from pupils where city = 'Oslo';", reference)
    assert not exact_match("sql", "SELECT COUNT(*) FROM pupils WHERE city = 'oslo'", reference)
    assert not exact_match("sql", "SELECT COUNT(id) FROM pupils WHERE city = 'Oslo'", reference)
    assert exact_match("math", "The answer is 7.", "The answer is 7.") is None


def assert_learns_above_chance(config: teacher.ToyConfig, cache_dir) -> tuple:
    """Build the toy teacher of `config` (the real pipeline, toy-sized) and check that its held-out
    answer loss ends 2 nats below both chance and the untrained model's; returns (tokenizer,
    the held-out prompts scored)."""
    import math

    _, tokenizer = teacher.load_toy(config.domain, config, cache_dir=cache_dir)
    prompts = toy_prompts("heldout", config.domain, limit=config.eval_prompts)
    trained = teacher.toy_build_info(config.domain, cache_dir)["heldout_answer_loss"]
    untrained = teacher.heldout_loss(teacher.new_teacher(config, tokenizer), tokenizer, prompts, config.max_length)
    assert trained < math.log(len(tokenizer)) - 2.0
    assert trained < untrained - 2.0
    return tokenizer, prompts


def test_a_tiny_sql_teacher_learns_above_chance(tmp_path):
    """The real build pipeline on toy SQL at a toy size: the held-out answer loss ends far below
    both chance (a uniform guess over the vocabulary) and the untrained model's."""
    config = dataclasses.replace(TINY, domain="sql", train_tokens=24_000, eval_prompts=8)
    tokenizer, prompts = assert_learns_above_chance(config, tmp_path)
    assert tokenizer(prompts[0].prompt)["input_ids"][0] == tokenizer.bos_token_id


def test_a_tiny_code_teacher_learns_above_chance(tmp_path):
    """The real build pipeline on toy code at a toy size: the held-out loss of the bodies ends far
    below both chance and the untrained model's. With loss on the prompt, the specification carries
    loss and the docstring's examples, random inputs, none."""
    config = dataclasses.replace(TINY, domain="code", vocab_size=512, max_length=512, train_tokens=40_000,
                                 eval_prompts=8)
    tokenizer, prompts = assert_learns_above_chance(config, tmp_path)
    example = prompts[0]
    encoded = teacher._encode(tokenizer, example, config.max_length, loss_on_prompt=True)
    _, _, labels = next(teacher._batches(repeat(encoded), 1, tokenizer.pad_token_id))
    labelled = tokenizer.decode(labels[0][labels[0] != IGNORE])
    assert ">>>" in example.prompt and labelled == toy_code.specification(example.prompt) + example.answer + "<eos>"


# -- chat ----------------------------------------------------------------------------------------


def test_chat_conversations_are_rendered_stable_and_split_by_conversation():
    heldout = toy_prompts("heldout", "chat", limit=200)
    train = toy_prompts("train", "chat", limit=2000)
    assert heldout == list(toy_chat.TASK.prompts("heldout", 200, 0))  # same stream every time
    assert len({p.prompt for p in heldout}) == 200
    assert not {p.prompt for p in heldout} & {p.prompt for p in train}
    assert all(toy.is_heldout_question(p.prompt) for p in heldout)
    turns = set()
    for example in heldout:
        roles = [role for role, _ in example.messages]
        assert roles[0] == "system" and roles[-1] == "user"
        assert roles[1:] == ["user", "assistant"] * (len(roles) // 2 - 1) + ["user"]
        turns.add(roles.count("user"))
        assert example.prompt == toy_chat.chat_prompt(example.messages)
        assert example.prompt.endswith(f"{toy_chat.IM_END}\n<|im_start|>assistant\n")
        assert example.answer.endswith(".") and "The answer is " in example.answer
    assert turns == {1, 2, 3}


def test_chat_answers_are_right_and_checked_on_their_final_value():
    """Every sum, difference and running maximum in a reply is right, a count question answers
    the ledger's count of its item, and the check compares the final value only: a number, a
    name, a time, or a list in any order."""
    kinds = set()
    for example in toy_prompts("train", "chat", limit=500):
        for a, op, b, c in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", example.answer):
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c), example.answer
        for a, b, c in re.findall(r"(\d+) or (\d+) gives (\d+)", example.answer):
            assert max(int(a), int(b)) == int(c), example.answer
        value = toy_chat.final_value(example.answer)
        ledger = dict(re.findall(r"([a-z]+) (\d)\b", re.split(r"Your basket has |We have ", example.answer)[-1]))
        if "The biggest:" in example.answer:
            kinds.add("biggest")
            assert value == max(ledger.values(), key=int), example.answer
        if (item := re.search(r"How many ([a-z]+) are", example.messages[-1][1])) and item.group(1) != "items":
            kinds.add("count")
            assert f"You have {item.group(1)} {value}." in example.answer and ledger[item.group(1)] == value
        assert check_answer("chat", example.answer, example.answer)
    assert kinds == {"biggest", "count"}
    reference = "Your basket has cups 2 and pens 3. The items are cups and pens. The answer is cups and pens."
    assert check_answer("chat", "The answer is pens and cups.", reference)
    assert not check_answer("chat", "The answer is cups.", reference)
    assert not check_answer("chat", "The answer is cups, pens and eggs.", reference)
    assert not check_answer("chat", "Your basket has cups 2 and pens 3.", reference)  # no final answer
    assert check_answer("chat", "It is 7. The answer is 7.", "The answer is 7.")
    assert not check_answer("chat", "The answer is 17.", "The answer is 7.")
    assert check_answer("chat", "The answer is 8 pm.", "It is at 8 pm. The answer is 8 pm.")
    assert not check_answer("chat", "The answer is Anna.", "The answer is Ben.")


def test_a_tiny_chat_teacher_learns_above_chance_and_carries_its_chat_template(tmp_path):
    """The real build on toy chat at a toy size. Its tokenizer renders every conversation through
    its own ChatML template to the toy prompt, and `<|im_end|>` ends a turn: the tokenizer's EOS
    and the generation config's, saved where transformers reads them."""
    from cllm.hf import model_facts, render_chat

    config = dataclasses.replace(TINY, domain="chat", max_length=320, train_tokens=100_000)
    tokenizer, prompts = assert_learns_above_chance(config, tmp_path)
    # Its earlier replies carry loss as its answer does: each span is one reply and its <|im_end|>.
    example = max(prompts, key=lambda p: len(p.messages))
    encoded = teacher._encode(tokenizer, example, config.max_length)
    replies = [text + "<|im_end|>" for role, text in example.messages if role == "assistant"]
    assert replies and [tokenizer.decode(encoded.ids[a:b]) for a, b in encoded.prompt_loss_spans] == replies
    assert all(render_chat(tokenizer, p.messages) == p.prompt for p in prompts)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == im_end and tokenizer.bos_token_id is None
    directory = teacher.teacher_dir("chat", tmp_path)
    assert "<|im_start|>" in json.loads((directory / "tokenizer_config.json").read_text())["chat_template"]
    assert json.loads((directory / "generation_config.json").read_text())["eos_token_id"] == im_end
    assert model_facts(str(directory)).eos_ids == {im_end}
