"""The trajectory shard format: the row (`TrajectoryRow`), its pyarrow schema, atomic shard
writes, and validating reads.

A shard is a Parquet file holding one row per (prompt, block). Its file metadata carries the
schema version. Shards live directly in one directory, local or `s3://`; names starting with `_`
or `.` (temporary files, staging directories) are never read as data, so a writer that crashes
before its final rename leaves nothing a reader would take for a shard.

A single writer uses `write_shard` (temporary name, then rename). A distributed writer stages its
shards under `<output>/_staging/<run>/` and publishes them with `commit_staged`, which validates
them and checks that each (prompt_id, block_index) is new before moving them into place.
"""

from __future__ import annotations

import dataclasses
import posixpath
import uuid
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cllm.storage import STAGING_DIR, display_path, resolve

SCHEMA_VERSION = "2"  # 2: prompt_length is stored
SCHEMA_VERSION_KEY = b"cllm.trajectory_schema_version"


@dataclass(frozen=True)
class TrajectoryRow:
    """One block of one prompt's Jacobi decoding, as collected and as trained on."""

    prompt_id: str
    block_index: int
    prompt_length: int  # the prompt's tokens at the start of prefix_ids
    prefix_ids: list[int]  # prompt + the fixed points of earlier blocks
    states: list[list[int]]  # n_token ids each: the initial guess first, the fixed point last
    eos: bool  # EOS reached in this block
    label_ids: list[int] | None  # the ground-truth answer (EOS included), when the data has one
    model: str
    n_token: int
    fixed_length: int  # valid leading positions of the fixed point (a row's last block stops early)
    iterations: int | None = None  # model forwards the block took, if known

    @property
    def prompt_ids(self) -> list[int]:
        return list(self.prefix_ids[: self.prompt_length])

    @property
    def fixed_point(self) -> list[int]:
        return list(self.states[-1])

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> TrajectoryRow:
        """A row from a mapping of its fields (an Arrow row as a dict); other keys are ignored."""
        return cls(**{name: row[name] for name in ROW_FIELDS if name in row})


ROW_FIELDS = tuple(field.name for field in dataclasses.fields(TrajectoryRow))

_IDS = pa.list_(pa.int32())
TRAJECTORY_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("block_index", pa.int32(), nullable=False),
        pa.field("prompt_length", pa.int32(), nullable=False),
        pa.field("prefix_ids", _IDS, nullable=False),  # prompt + fixed points of earlier blocks
        pa.field("states", pa.list_(_IDS), nullable=False),  # initial guess first, fixed point last
        pa.field("eos", pa.bool_(), nullable=False),
        pa.field("label_ids", _IDS, nullable=True),  # ground-truth answer, when the data has one
        pa.field("model", pa.string(), nullable=False),
        pa.field("n_token", pa.int32(), nullable=False),
        # Valid leading positions of the fixed point: n_token except in a row's last block, which
        # stops at EOS or the token budget and is padded after.
        pa.field("fixed_length", pa.int32(), nullable=False),
        pa.field("iterations", pa.int32(), nullable=True),  # model forwards the block took, if known
    ],
    metadata={SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode()},
)
SHARD_SUFFIX = ".parquet"


class TrajectoryFormatError(ValueError):
    """A shard does not follow TRAJECTORY_SCHEMA; the message names the file and the field."""


def is_data_file(path: str) -> bool:
    name = posixpath.basename(path)
    return name.endswith(SHARD_SUFFIX) and not name.startswith(("_", "."))


def list_shards(filesystem: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The shard files of a directory (or the file itself), sorted; [] when nothing is there."""
    # Other processes write shards: a listing cached by this filesystem instance may be stale.
    filesystem.invalidate_cache(path)
    if filesystem.isfile(path):
        return [path]
    if not filesystem.isdir(path):
        return []
    return sorted(p for p in filesystem.ls(path, detail=False) if is_data_file(p))


# -- building and writing ------------------------------------------------------------------------


def rows_to_table(rows: Iterable[TrajectoryRow]) -> pa.Table:
    """A table in TRAJECTORY_SCHEMA."""
    rows = list(rows)
    columns = {name: [getattr(row, name) for row in rows] for name in ROW_FIELDS}
    return pa.Table.from_pydict(columns, schema=TRAJECTORY_SCHEMA)


def table_rows(table: pa.Table) -> list[TrajectoryRow]:
    """The rows of a table in TRAJECTORY_SCHEMA."""
    return [TrajectoryRow.from_mapping(row) for row in table.to_pylist()]


def write_shard(
    table: pa.Table, path_or_uri: str, filesystem: fsspec.AbstractFileSystem | None = None
) -> str:
    """Write `table` as one shard: first under a hidden temporary name beside the target, then
    renamed, so a crash never leaves a partial file under a data name. Returns the final path."""
    if filesystem is None:
        filesystem, path = resolve(path_or_uri)
    else:
        path = path_or_uri
    table = conform(table, source=path)
    directory, name = posixpath.split(path)
    temporary = posixpath.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
    filesystem.makedirs(directory, exist_ok=True)
    with filesystem.open(temporary, "wb") as handle:
        pq.write_table(table, handle)
    filesystem.mv(temporary, path)
    return path


def conform(table: pa.Table, source: str) -> pa.Table:
    """`table` validated and cast to TRAJECTORY_SCHEMA, schema version metadata included."""
    validate_table(table, source, check_version=False)
    columns = [table.column(field.name).cast(field.type) for field in TRAJECTORY_SCHEMA]
    return pa.Table.from_arrays(columns, schema=TRAJECTORY_SCHEMA)


# -- staged output: many writers, one atomic commit ----------------------------------------------


def new_staging_dir(output: str) -> str:
    """A fresh directory under `output` for one run's shards, invisible to readers."""
    return f"{output.rstrip('/')}/{STAGING_DIR}/{uuid.uuid4().hex}"


def commit_staged(
    staging: str, output: str, options: dict[str, Any] | None = None, existing_ids: AbstractSet[str] = frozenset()
) -> pa.Table:
    """Validate the shards staged under `staging`, check that every (prompt_id, block_index) is
    unique and no prompt is already in the output, then move the shards into `output` (each move
    is atomic). Returns the committed rows. Clears the output's staging area either way, including
    leftovers of crashed runs (one writer per output at a time)."""
    filesystem, staging_path = resolve(staging, options)
    _, output_path = resolve(output, options)
    try:
        shards = list_shards(filesystem, staging_path)
        if not shards:
            return TRAJECTORY_SCHEMA.empty_table()
        staged = read_trajectories(staging_path, filesystem=filesystem)
        keys = pc.binary_join_element_wise(
            staged.column("prompt_id"), pc.cast(staged.column("block_index"), pa.string()), "#"
        )
        if len(pc.unique(keys)) != staged.num_rows:
            raise TrajectoryFormatError(f"{staging}: duplicate (prompt_id, block_index) rows; nothing committed")
        repeated = existing_ids & set(staged.column("prompt_id").to_pylist())
        if repeated:
            raise TrajectoryFormatError(
                f"{staging}: {len(repeated)} prompts are already in {output}; nothing committed"
            )
        for shard in shards:
            filesystem.mv(shard, f"{output_path.rstrip('/')}/{posixpath.basename(shard)}")
        return staged
    finally:
        staging_root = f"{output_path.rstrip('/')}/{STAGING_DIR}"
        if filesystem.exists(staging_root):
            filesystem.rm(staging_root, recursive=True)


# -- reading and validating ----------------------------------------------------------------------


def validate_table(table: pa.Table, source: str, check_version: bool = True) -> None:
    """Raise TrajectoryFormatError naming `source` and the field when `table` breaks the schema:
    a missing column, a wrong type, nulls in a required column, or a different schema version."""
    validate_schema(table.schema, source, check_version)
    for field in TRAJECTORY_SCHEMA:
        column = table.column(field.name)
        if not field.nullable and column.null_count:
            raise TrajectoryFormatError(f"{source}: field {field.name!r} has {column.null_count} nulls")
    _validate_states(table, source)


def validate_schema(schema: pa.Schema, source: str, check_version: bool = True) -> None:
    """The checks of `validate_table` that need no rows: version, field names and types."""
    if check_version:
        version = (schema.metadata or {}).get(SCHEMA_VERSION_KEY)
        if version is None:
            raise TrajectoryFormatError(
                f"{source}: not a trajectory shard (no {SCHEMA_VERSION_KEY.decode()} metadata)"
            )
        if version.decode() != SCHEMA_VERSION:
            raise TrajectoryFormatError(
                f"{source}: schema version {version.decode()}, this reader expects {SCHEMA_VERSION} "
                "(version 2 stores prompt_length); collect the trajectories again"
            )
    for field in TRAJECTORY_SCHEMA:
        if field.name not in schema.names:
            raise TrajectoryFormatError(f"{source}: missing field {field.name!r}")
        actual = schema.field(field.name).type
        if not _castable(actual, field.type):
            raise TrajectoryFormatError(f"{source}: field {field.name!r} has type {actual}, expected {field.type}")


def _castable(actual: pa.DataType, expected: pa.DataType) -> bool:
    if actual == expected:
        return True
    # Writers may produce int64 ids or large lists; those cast losslessly enough for token ids.
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if pa.types.is_list(expected):
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and _castable(
            actual.value_type, expected.value_type
        )
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    return False


def _validate_states(table: pa.Table, source: str) -> None:
    """Every state of a row has n_token ids, there is at least one, fixed_length fits, and the
    prompt is a non-empty part of the prefix."""
    n_tokens = table.column("n_token").to_pylist()
    fixed_lengths = table.column("fixed_length").to_pylist()
    prompt_lengths = table.column("prompt_length").to_pylist()
    prefix_lengths = pc.list_value_length(table.column("prefix_ids")).to_pylist()
    for index, (prompt_length, prefix_length) in enumerate(zip(prompt_lengths, prefix_lengths)):
        if not 1 <= prompt_length <= prefix_length:
            raise TrajectoryFormatError(
                f"{source}: field 'prompt_length' is {prompt_length} in row {index}, expected 1..{prefix_length}"
            )
    for index, (states, n, valid) in enumerate(zip(table.column("states").to_pylist(), n_tokens, fixed_lengths)):
        if not states:
            raise TrajectoryFormatError(f"{source}: field 'states' is empty in row {index}")
        if any(state is None or len(state) != n for state in states):
            raise TrajectoryFormatError(
                f"{source}: field 'states' in row {index} has a state whose length is not n_token={n}"
            )
        if not 1 <= valid <= n:
            raise TrajectoryFormatError(
                f"{source}: field 'fixed_length' is {valid} in row {index}, expected 1..{n}"
            )


def read_shard(filesystem: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    """One shard, validated (all of it when `columns` is None, else just the schema version)."""
    source = display_path(filesystem, path)
    try:
        with filesystem.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=columns)
    except (pa.ArrowInvalid, OSError) as error:
        raise TrajectoryFormatError(f"{source}: not a readable Parquet file ({error})") from error
    if columns is None:
        validate_table(table, source)
    return table


def read_trajectories(
    path_or_uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    filesystem: fsspec.AbstractFileSystem | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """All shards under a directory (or one file), local or remote, validated one by one and
    concatenated. Raises FileNotFoundError when there is no shard."""
    if filesystem is None:
        filesystem, path = resolve(path_or_uri, storage_options)
    else:
        path = path_or_uri
    shards = list_shards(filesystem, path)
    if not shards:
        raise FileNotFoundError(f"no trajectory shards ({SHARD_SUFFIX}) under {path_or_uri}")
    tables = [conform(read_shard(filesystem, shard), display_path(filesystem, shard)) for shard in shards]
    table = pa.concat_tables(tables)
    return table.select(columns) if columns else table


def read_prompt_ids(path_or_uri: str, storage_options: dict[str, Any] | None = None) -> set[str]:
    """The prompt ids already written under an output directory; empty when there is none."""
    filesystem, path = resolve(path_or_uri, storage_options)
    ids: set[str] = set()
    for shard in list_shards(filesystem, path):
        ids.update(read_shard(filesystem, shard, columns=["prompt_id"]).column("prompt_id").to_pylist())
    return ids


# -- footers only: what training checks before it starts ----------------------------------------

_STATISTICS_COLUMNS = ["n_token", "prefix_ids", "states", "label_ids"]
_TOKEN_COLUMNS = ("prefix_ids.list.element", "states.list.element.list.element", "label_ids.list.element")


@dataclass
class ShardSummary:
    """What the Parquet footers of a set of shards say, without reading their rows."""

    shards: list[str]  # paths inside the store's filesystem, as `list_shards` gives them
    rows: int = 0
    n_token_range: tuple[int, int] | None = None  # smallest and largest block size
    max_token_id: int = 0
    rows_without_labels: int = 0  # null (or empty) label_ids


def summarize_shards(path_or_uri: str, storage_options: dict[str, Any] | None = None) -> ShardSummary:
    """Schema-check every shard under `path_or_uri` and sum up row counts, block sizes and the
    largest token id from the footers' column statistics (a shard written without statistics
    has those columns read instead). Raises FileNotFoundError when there is no shard."""
    filesystem, path = resolve(path_or_uri, storage_options)
    shards = list_shards(filesystem, path)
    if not shards:
        raise FileNotFoundError(f"no trajectory shards ({SHARD_SUFFIX}) under {path_or_uri}")
    summary = ShardSummary(shards=shards)
    for shard in shards:
        source = display_path(filesystem, shard)
        try:
            with filesystem.open(shard, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                validate_schema(parquet.schema_arrow, source)
                statistics = _column_statistics(parquet.metadata)
                if statistics is None:
                    statistics = _statistics_from_rows(parquet.read(columns=_STATISTICS_COLUMNS))
        except (pa.ArrowInvalid, OSError) as error:
            raise TrajectoryFormatError(f"{source}: not a readable Parquet file ({error})") from error
        rows, low, high, largest, without_labels = statistics
        if rows == 0:
            continue
        summary.rows += rows
        if summary.n_token_range is None:
            summary.n_token_range = (low, high)
        else:
            summary.n_token_range = (min(low, summary.n_token_range[0]), max(high, summary.n_token_range[1]))
        summary.max_token_id = max(summary.max_token_id, largest)
        summary.rows_without_labels += without_labels
    return summary


def _column_statistics(metadata: pq.FileMetaData) -> tuple[int, int, int, int, int] | None:
    """(rows, smallest n_token, largest n_token, largest token id, label-less rows) from the
    footer, or None when a row group lacks the statistics."""
    low, high, largest, without_labels = None, None, 0, 0
    for index in range(metadata.num_row_groups):
        group = metadata.row_group(index)
        if group.num_rows == 0:
            continue
        columns = {group.column(i).path_in_schema: group.column(i).statistics for i in range(group.num_columns)}
        block_sizes = columns.get("n_token")
        if block_sizes is None or not block_sizes.has_min_max:
            return None
        low = block_sizes.min if low is None else min(low, block_sizes.min)
        high = block_sizes.max if high is None else max(high, block_sizes.max)
        for name in _TOKEN_COLUMNS:
            statistics = columns.get(name)
            if statistics is None:
                return None
            if statistics.has_min_max:
                largest = max(largest, statistics.max)
            elif name != "label_ids.list.element" and statistics.num_values:  # values but no max
                return None
        # A null list is one leaf null; so are empty lists and null elements, also unusable.
        labels = columns["label_ids.list.element"]
        if labels.has_null_count:
            without_labels += labels.null_count
    return metadata.num_rows, low or 0, high or 0, largest, without_labels


def _statistics_from_rows(table: pa.Table) -> tuple[int, int, int, int, int]:
    if table.num_rows == 0:
        return 0, 0, 0, 0, 0
    n_tokens = table.column("n_token")
    largest = max(
        pc.max(pc.list_flatten(table.column("prefix_ids"))).as_py() or 0,
        pc.max(pc.list_flatten(pc.list_flatten(table.column("states")))).as_py() or 0,
        pc.max(pc.list_flatten(table.column("label_ids"))).as_py() or 0,
    )
    labels = table.column("label_ids")
    without_labels = labels.null_count + pc.sum(pc.equal(pc.list_value_length(labels), 0)).as_py()
    return table.num_rows, pc.min(n_tokens).as_py(), pc.max(n_tokens).as_py(), largest, without_labels or 0
