"""toy-sql: a Spider-like text-to-SQL task. Each prompt is a generated relational schema (2-4
tables of one theme, typed columns, foreign keys; `cllm.toy.sql_schema`) as text, an English
question, then "SQL:"; the answer is the gold query. Answers are scored by execution: the
schema's database (rows generated from a hash of the schema text, so the prompt alone rebuilds
it) is built in Python's `sqlite3`, both queries run, and their result sets are compared. The
split is a hash of the question text, so no held-out question is ever seen in training; held-out
prompts ask distinct questions, 500 of the split's 700 or so.
"""

from __future__ import annotations

import random
import re
import sqlite3
from collections import Counter
from collections.abc import Sequence
from functools import partial

from cllm.toy import TOY_VERSIONS, GeneratedTask
from cllm.toy.sql_schema import (
    Column,
    SchemaTable,
    build_database,
    column_values,
    random_schema,
    render_schema,
    schema_rows,
)

PROMPT_HEADER = "Translate the question into SQL.\nSchema:\n"
_SOURCE = f"cllm.toy sql generator v{TOY_VERSIONS['sql']}"
_MAX_SQLITE_STEPS = 200_000  # VM steps before a generated query is interrupted (a runaway join)


# -- questions ---------------------------------------------------------------------------------


def _quote(value) -> str:
    return f"'{value}'" if isinstance(value, str) else str(value)


# The teacher's stream draws the families that hold most distinct questions more often: filtered
# selections and joins name a number, so they make up most held-out questions (which are distinct)
# but few of a uniform stream (docs/results.md#toy-sql). Indexed by family, as in `_question`.
TRAIN_FAMILY_WEIGHTS = (4, 1, 1, 1, 1, 1, 1, 3)


def _question(rng: random.Random, tables: Sequence[SchemaTable], schema_text: str,
              family_weights: Sequence[float] | None = None) -> tuple[str, str]:
    """One (question, gold SQL) over the schema, from one of eight families: filtered selection,
    lookup, COUNT, AVG/MAX/MIN/SUM, ORDER BY (+ LIMIT), GROUP BY, and a JOIN of a child table with
    its parent. Families are equally likely unless `family_weights` says otherwise."""

    def values(table: SchemaTable, column: Column) -> list:
        # the rows only when a question names a value: they are most of a draw's cost
        return column_values(table, schema_rows(schema_text), column)

    while True:
        table = rng.choice(tables)
        # randrange when unweighted: the splits' draws, and so the held-out questions, stay as they were
        family = rng.randrange(8) if family_weights is None else rng.choices(range(8), family_weights)[0]
        label, noun, name = table.columns[0], table.spec.noun, table.name
        ints, texts = table.ints, table.texts[1:]  # texts besides the label
        if family == 0 and ints:  # filtered selection
            column = rng.choice(ints)
            value = rng.choice(values(table, column))
            word, op = rng.choice((("greater than", ">"), ("less than", "<"), ("equal to", "=")))
            return (f"List the {label.noun} of {noun} with {column.noun} {word} {value}.",
                    f"SELECT {label.name} FROM {name} WHERE {column.name} {op} {value}")
        if family == 1 and ints:  # lookup by a text value
            column, key = rng.choice(ints), rng.choice(table.texts)
            value = rng.choice(values(table, key))
            return (f"What is the {column.noun} of the {table.spec.singular} whose {key.noun} is {value}?",
                    f"SELECT {column.name} FROM {name} WHERE {key.name} = {_quote(value)}")
        if family == 2:  # COUNT, with or without a filter
            if rng.random() < 0.3:
                return f"How many {noun} are there?", f"SELECT COUNT(*) FROM {name}"
            key = rng.choice(table.texts)
            value = rng.choice(values(table, key))
            return (f"How many {noun} have {key.noun} {value}?",
                    f"SELECT COUNT(*) FROM {name} WHERE {key.name} = {_quote(value)}")
        if family == 3 and ints:  # aggregates
            column = rng.choice(ints)
            word, function = rng.choice((("average", "AVG"), ("maximum", "MAX"), ("minimum", "MIN"),
                                         ("total", "SUM")))
            if texts and rng.random() < 0.4:
                key = rng.choice(texts)
                value = rng.choice(values(table, key))
                return (f"What is the {word} {column.noun} of {noun} whose {key.noun} is {value}?",
                        f"SELECT {function}({column.name}) FROM {name} WHERE {key.name} = {_quote(value)}")
            return (f"What is the {word} {column.noun} of all {noun}?",
                    f"SELECT {function}({column.name}) FROM {name}")
        if family == 4 and ints:  # ORDER BY, with LIMIT
            column = rng.choice(ints)
            word, direction = rng.choice((("highest", "DESC"), ("lowest", "ASC")))
            count = rng.randint(1, 5)
            return (f"Show the {label.noun} of the {count} {noun} with the {word} {column.noun}.",
                    f"SELECT {label.name} FROM {name} ORDER BY {column.name} {direction} LIMIT {count}")
        if family == 5 and ints:  # ORDER BY, all rows
            column = rng.choice(ints)
            word, direction = rng.choice((("ascending", "ASC"), ("descending", "DESC")))
            return (f"List the {label.noun} of all {noun} sorted by {column.noun} in {word} order.",
                    f"SELECT {label.name} FROM {name} ORDER BY {column.name} {direction}")
        if family == 6 and texts:  # GROUP BY
            key = rng.choice(texts)
            if ints and rng.random() < 0.5:
                column = rng.choice(ints)
                return (f"What is the average {column.noun} of {noun} for each {key.noun}?",
                        f"SELECT {key.name}, AVG({column.name}) FROM {name} GROUP BY {key.name}")
            return (f"For each {key.noun}, how many {noun} are there?",
                    f"SELECT {key.name}, COUNT(*) FROM {name} GROUP BY {key.name}")
        if family == 7 and table.spec.parent is not None:  # JOIN a child with its parent
            parent = next(t for t in tables if t.name == table.parent_name)
            parent_label = parent.columns[0]
            join = (f"FROM {parent.name} AS T1 JOIN {name} AS T2 ON T1.id = T2.{table.spec.foreign_key}")
            if ints and rng.random() < 0.6:
                column = rng.choice(ints)
                value = rng.choice(values(table, column))
                return (f"List the {parent_label.noun} of {parent.spec.noun} that have {noun} with "
                        f"{column.noun} greater than {value}.",
                        f"SELECT T1.{parent_label.name} {join} WHERE T2.{column.name} > {value}")
            return (f"Show the {label.noun} of each {table.spec.singular} and the {parent_label.noun} "
                    f"of its {parent.spec.singular}.",
                    f"SELECT T2.{label.name}, T1.{parent_label.name} {join}")


def sql_prompt(schema_text: str, question: str) -> str:
    """The Spider-style prompt: the schema as text, the question, then "SQL:"."""
    return f"{PROMPT_HEADER}{schema_text}\nQuestion: {question}\nSQL:"


def problem(rng: random.Random, family_weights: Sequence[float] | None = None) -> tuple[str, str, str]:
    """One (schema text, question, gold SQL)."""
    tables = random_schema(rng)
    schema_text = render_schema(tables)
    question, sql = _question(rng, tables, schema_text, family_weights)
    return schema_text, question, sql


def _draw(rng: random.Random, family_weights: Sequence[float] | None = None) -> tuple[str, str, str]:
    schema_text, question, sql = problem(rng, family_weights)
    return question, sql_prompt(schema_text, question), sql


# The split holds about 700 questions: the first 500 take 25 s to draw, the rest minutes.
TASK = GeneratedTask("sql", _draw, _SOURCE, heldout_prompts=500, max_heldout_prompts=500,
                     teacher_draw=partial(_draw, family_weights=TRAIN_FAMILY_WEIGHTS))


# -- scoring -----------------------------------------------------------------------------------

_SCHEMA_IN_PROMPT = re.compile(r"Schema:\n(.*?)\nQuestion:", re.DOTALL)


def prompt_schema(prompt: str) -> str:
    """The schema text of a toy-sql prompt; ValueError if the prompt has none."""
    match = _SCHEMA_IN_PROMPT.search(prompt)
    if match is None:
        raise ValueError("not a toy-sql prompt: no 'Schema:' ... 'Question:' section")
    return match.group(1)


def generated_sql(text: str) -> str:
    """The query in a model's output: its first line, stripped."""
    return text.strip().split("\n", 1)[0].strip()


def run_query(connection: sqlite3.Connection, sql: str) -> list[tuple] | None:
    """The query's rows (floats rounded), or None when it does not run: invalid SQL, several
    statements, a write, or a runaway query interrupted after _MAX_SQLITE_STEPS VM steps."""
    steps = 0

    def budget() -> int:
        nonlocal steps
        steps += 1000
        return int(steps > _MAX_SQLITE_STEPS)

    connection.set_progress_handler(budget, 1000)
    try:
        rows = connection.execute(sql).fetchall()
    except (sqlite3.Error, sqlite3.Warning, ValueError):
        return None
    finally:
        connection.set_progress_handler(None, 0)
    return [tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in rows]


def _is_ordered(sql: str) -> bool:
    return re.search(r"\border\s+by\b", sql, re.IGNORECASE) is not None


def execution_match(generated_text: str, reference_sql: str, prompt: str) -> bool:
    """Whether the generated query returns the same result as the reference on the prompt's
    database: the same rows in the same order when the reference has ORDER BY, else the same
    multiset of rows (order ignored, duplicates counted). A query that fails is wrong."""
    connection = build_database(prompt_schema(prompt))
    try:
        expected = run_query(connection, reference_sql.strip())
        if expected is None:
            raise ValueError(f"the reference query does not run: {reference_sql!r}")
        got = run_query(connection, generated_sql(generated_text))
    finally:
        connection.close()
    if got is None:
        return False
    if _is_ordered(reference_sql):
        return got == expected
    return Counter(got) == Counter(expected)


def normalize_sql(sql: str) -> str:
    """Whitespace collapsed, a trailing ';' dropped, lower case outside string literals."""
    parts = re.split(r"('(?:[^']|'')*')", generated_sql(sql).rstrip(";"))
    return " ".join("".join(p if p.startswith("'") else p.lower() for p in parts).split())


def exact_match(generated_text: str, reference_sql: str) -> bool:
    return normalize_sql(generated_text) == normalize_sql(reference_sql)
