"""toy-sql's schemas and databases: the themes' tables and typed columns, random 2-4 table
schemas with a foreign key, their text form (and its parser), and the SQLite database of a
schema, whose rows are a function of the schema text alone, so that a prompt rebuilds it."""

from __future__ import annotations

import random
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from cllm.toy import stable_hash

# -- themes: the tables a schema is drawn from -------------------------------------------------


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "int" or "text"
    pool: tuple[str, ...] = ()  # text values
    low: int = 0  # int range
    high: int = 0

    @property
    def noun(self) -> str:
        return self.name.replace("_", " ")

    @property
    def sql_type(self) -> str:
        return "INTEGER" if self.kind == "int" else "TEXT"


@dataclass(frozen=True)
class Table:
    """A table of a theme: its possible names (one is chosen per schema; the question always
    says `noun`), its label column (what "list the ..." questions return) and other columns."""

    names: tuple[str, ...]
    noun: str
    singular: str
    label: Column
    columns: tuple[Column, ...]
    parent: str | None = None  # noun of the table its foreign key points to

    @property
    def foreign_key(self) -> str | None:
        return None if self.parent is None else f"{_SINGULAR_OF_NOUN[self.parent]}_id"


def _text(name: str, *pool: str) -> Column:
    return Column(name, "text", pool=pool)


def _int(name: str, low: int, high: int) -> Column:
    return Column(name, "int", low=low, high=high)


_PEOPLE = ("Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Jack", "Emma", "Leo", "Zoe", "Max", "Ava", "Noah", "Ella")
_CITIES = ("Paris", "Tokyo", "Boston", "Cairo", "Lima", "Oslo", "Rome", "Delhi", "Seoul")
_COUNTRIES = ("France", "Japan", "Brazil", "Canada", "Egypt", "Peru", "Norway", "Italy", "Chile")
_SUBJECTS = ("math", "art", "music", "history", "biology", "physics", "chemistry")

THEMES: dict[str, tuple[Table, ...]] = {
    "school": (
        Table(("students", "student", "pupils"), "students", "student", _text("name", *_PEOPLE),
              (_int("age", 16, 30), _text("city", *_CITIES))),
        Table(("exams", "exam", "tests"), "exams", "exam", _text("subject", *_SUBJECTS),
              (_int("score", 40, 100), _int("year", 2015, 2024)), parent="students"),
        Table(("teachers", "teacher", "staff"), "teachers", "teacher", _text("name", *_PEOPLE),
              (_text("subject", *_SUBJECTS), _int("salary", 30, 90), _int("age", 25, 65))),
        Table(("courses", "course", "classes"), "courses", "course",
              _text("title", "Algebra", "Poetry", "Chess", "Drawing", "Coding", "Botany", "Dance"),
              (_int("credits", 1, 6), _text("department", "science", "arts", "sports", "language"))),
    ),
    "shop": (
        Table(("customers", "customer", "clients"), "customers", "customer", _text("name", *_PEOPLE),
              (_int("age", 18, 70), _text("city", *_CITIES))),
        Table(("orders", "purchases", "bookings"), "orders", "order",
              _text("item", "lamp", "chair", "desk", "clock", "vase", "rug", "mirror"),
              (_int("quantity", 1, 20), _int("price", 5, 99)), parent="customers"),
        Table(("products", "product", "goods"), "products", "product",
              _text("name", "kettle", "toaster", "blender", "fan", "heater", "radio", "camera"),
              (_text("category", "kitchen", "garden", "office", "toys"), _int("price", 5, 99), _int("stock", 0, 50))),
        Table(("stores", "store", "shops"), "stores", "store",
              _text("name", "Northgate", "Riverside", "Hilltop", "Lakeview", "Oldtown", "Parkway"),
              (_text("city", *_CITIES), _int("staff", 2, 40))),
    ),
    "music": (
        Table(("singers", "singer", "artists"), "singers", "singer", _text("name", *_PEOPLE),
              (_int("age", 18, 60), _text("country", *_COUNTRIES))),
        Table(("albums", "album", "records"), "albums", "album",
              _text("title", "Sunrise", "Echoes", "Gravity", "Velvet", "Horizon", "Mirage", "Ember"),
              (_int("year", 1990, 2024), _int("sales", 1, 99)), parent="singers"),
        Table(("concerts", "concert", "shows"), "concerts", "concert", _text("city", *_CITIES),
              (_int("year", 2000, 2024), _int("attendance", 100, 999)), parent="singers"),
        Table(("venues", "venue", "halls"), "venues", "venue",
              _text("name", "Apollo", "Forum", "Arena", "Palace", "Dome", "Pavilion"),
              (_text("city", *_CITIES), _int("capacity", 100, 999))),
    ),
    "library": (
        Table(("authors", "author", "writers"), "authors", "author", _text("name", *_PEOPLE),
              (_int("age", 25, 90), _text("country", *_COUNTRIES))),
        Table(("books", "book", "novels"), "books", "book",
              _text("title", "Dune", "Emma", "Ulysses", "Beloved", "Matilda", "Rebecca", "Heidi"),
              (_text("genre", "mystery", "fantasy", "romance", "horror", "history"), _int("pages", 50, 900)),
              parent="authors"),
        Table(("awards", "award", "prizes"), "awards", "award",
              _text("prize", "Gold", "Silver", "Bronze", "Laurel", "Star"), (_int("year", 1990, 2024),),
              parent="authors"),
        Table(("members", "member", "readers"), "members", "member", _text("name", *_PEOPLE),
              (_int("age", 10, 80), _text("city", *_CITIES))),
    ),
}
_SINGULAR_OF_NOUN = {table.noun: table.singular for tables in THEMES.values() for table in tables}
_TABLE_OF_NAME = {name: table for tables in THEMES.values() for table in tables for name in table.names}


# -- schemas and their databases ---------------------------------------------------------------


@dataclass(frozen=True)
class SchemaTable:
    """A table as one schema has it: its chosen name and the columns it kept."""

    name: str
    spec: Table
    columns: tuple[Column, ...]  # the label column first, then the kept others
    parent_name: str = ""  # the chosen name of the parent table, when there is one

    @property
    def ints(self) -> list[Column]:
        return [c for c in self.columns if c.kind == "int"]

    @property
    def texts(self) -> list[Column]:
        return [c for c in self.columns if c.kind == "text"]

    def render(self) -> str:
        parts = ["id"]
        if self.spec.foreign_key is not None:
            parts.append(f"{self.spec.foreign_key} -> {self.parent_name}.id")
        parts += [column.name for column in self.columns]
        return f"- {self.name}({', '.join(parts)})"  # "- ": names start a word, as in the SQL


Rows = dict[str, list[tuple]]  # table name -> rows (id, [foreign key], columns...)


def random_schema(rng: random.Random) -> list[SchemaTable]:
    """2-4 tables of one theme: the theme's first (parent) table, and a random subset of the rest
    (a child is kept only with its parent, which is always there), each with a random name and a
    random subset of its non-label columns."""
    theme = THEMES[rng.choice(sorted(THEMES))]
    others = list(theme[1:])
    chosen = [theme[0], *rng.sample(others, rng.randint(1, len(others)))]
    names: dict[str, str] = {}
    tables = []
    for spec in chosen:
        name = rng.choice(spec.names)
        names[spec.noun] = name
        kept = [column for column in spec.columns if rng.random() < 0.8] or [rng.choice(spec.columns)]
        tables.append(SchemaTable(name, spec, (spec.label, *kept), names.get(spec.parent or "", "")))
    return tables


def render_schema(tables: Sequence[SchemaTable]) -> str:
    return "\n".join(table.render() for table in tables)


_TABLE_LINE = re.compile(r"^- (\w+)\((.*)\)$")


def parse_schema(schema_text: str) -> list[SchemaTable]:
    """The tables of a rendered schema (the inverse of `render_schema`); ValueError if a line is
    not one of ours."""
    tables = []
    for line in schema_text.strip().splitlines():
        match = _TABLE_LINE.match(line.strip())
        if match is None or match.group(1) not in _TABLE_OF_NAME:
            raise ValueError(f"not a toy-sql schema line: {line!r}")
        spec = _TABLE_OF_NAME[match.group(1)]
        by_name = {column.name: column for column in (spec.label, *spec.columns)}
        parts = [part.strip() for part in match.group(2).split(",")]
        parent_name = ""
        columns = []
        for part in parts[1:]:
            if "->" in part:
                parent_name = part.split("->")[1].strip().removesuffix(".id")
            elif part in by_name:
                columns.append(by_name[part])
            else:
                raise ValueError(f"unknown column {part!r} of table {match.group(1)!r}")
        tables.append(SchemaTable(match.group(1), spec, tuple(columns), parent_name))
    return tables


@lru_cache(maxsize=4096)  # schemas repeat across prompts; the rows are a pure function of the text
def schema_rows(schema_text: str) -> Rows:
    """The database's rows, a function of the schema text alone: 5-12 rows per table, text values
    drawn from a few of the column's pool (so values repeat, for GROUP BY and COUNT), foreign keys
    pointing at existing parent rows."""
    tables = parse_schema(schema_text)
    draw = random.Random(stable_hash(schema_text)).random  # int(draw() * k): a fast uniform pick
    sizes = {table.name: 5 + int(draw() * 8) for table in tables}
    rows: Rows = {}
    for table in tables:
        pools = {c.name: c.pool[int(draw() * len(c.pool)):] + c.pool for c in table.texts}
        pools = {name: pool[: 3 + int(draw() * 3)] for name, pool in pools.items()}
        table_rows = []
        for row_id in range(1, sizes[table.name] + 1):
            values: list = [row_id]
            if table.spec.foreign_key is not None:
                values.append(1 + int(draw() * sizes[table.parent_name]))
            for column in table.columns:
                if column.kind == "text":
                    pool = pools[column.name]
                    values.append(pool[int(draw() * len(pool))])
                else:
                    values.append(column.low + int(draw() * (column.high - column.low + 1)))
            table_rows.append(tuple(values))
        rows[table.name] = table_rows
    return rows


def column_values(table: SchemaTable, rows: Rows, column: Column) -> list:
    offset = 1 + (table.spec.foreign_key is not None) + table.columns.index(column)
    return [row[offset] for row in rows[table.name]]


def build_database(schema_text: str) -> sqlite3.Connection:
    """An in-memory SQLite database of the schema with its generated rows, read-only."""
    tables = parse_schema(schema_text)
    rows = schema_rows(schema_text)
    connection = sqlite3.connect(":memory:")
    for table in tables:
        definitions = ["id INTEGER PRIMARY KEY"]
        if table.spec.foreign_key is not None:
            definitions.append(f"{table.spec.foreign_key} INTEGER REFERENCES {table.parent_name}(id)")
        definitions += [f"{column.name} {column.sql_type}" for column in table.columns]
        connection.execute(f"CREATE TABLE {table.name} ({', '.join(definitions)})")
        width = len(definitions)
        connection.executemany(f"INSERT INTO {table.name} VALUES ({', '.join('?' * width)})", rows[table.name])
    connection.commit()
    connection.execute("PRAGMA query_only = ON")
    return connection
