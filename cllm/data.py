"""The trajectory shard format: a pyarrow schema, atomic shard writes, and validating reads.

A shard is a Parquet file holding one row per (prompt, block). Its file metadata carries the
schema version. Shards live directly in one directory, local or `s3://`; names starting with `_`
or `.` (temporary files, staging directories) are never read as data, so a writer that crashes
before its final rename leaves nothing a reader would take for a shard.

A single writer uses `write_shard` (temporary name, then rename). A distributed writer stages its
shards under `<output>/_staging/<run>/` and publishes them with `commit_staged`, which validates
them and checks that each (prompt_id, block_index) is new before moving them into place.
"""

from __future__ import annotations

import posixpath
import uuid
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_VERSION = "1"
SCHEMA_VERSION_KEY = b"cllm.trajectory_schema_version"

_IDS = pa.list_(pa.int32())
TRAJECTORY_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("block_index", pa.int32(), nullable=False),
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
STAGING_DIR = "_staging"  # under an output: writers stage shards here, readers never look


class TrajectoryFormatError(ValueError):
    """A shard does not follow TRAJECTORY_SCHEMA; the message names the file and the field."""


class StorageError(OSError):
    """An output location that cannot be written (missing bucket, unreachable store, ...)."""


# -- filesystems ---------------------------------------------------------------------------------


def storage_options(s3_endpoint: str | None = None) -> dict[str, Any]:
    """fsspec options for an S3-compatible endpoint (MinIO, moto, ...); empty for AWS or local.
    Short connect timeouts and few retries, so an unreachable endpoint fails in seconds."""
    if not s3_endpoint:
        return {}
    return {
        "client_kwargs": {"endpoint_url": s3_endpoint},
        "config_kwargs": {"connect_timeout": 5, "retries": {"max_attempts": 2}},
    }


def resolve(path_or_uri: str, options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as `s3://bucket/prefix`."""
    filesystem, path = fsspec.core.url_to_fs(path_or_uri, **(options or {}))
    return filesystem, path


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


def rows_to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """A table in TRAJECTORY_SCHEMA from row dicts holding its columns (extra keys are ignored)."""
    rows = list(rows)
    columns = {field.name: [row.get(field.name) for row in rows] for field in TRAJECTORY_SCHEMA}
    return pa.Table.from_pydict(columns, schema=TRAJECTORY_SCHEMA)


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


def check_writable(path_or_uri: str, options: dict[str, Any] | None = None) -> None:
    """Raise StorageError unless a file can be created under `path_or_uri`: a missing bucket and
    an unreachable store are told apart in the message."""
    filesystem, path = resolve(path_or_uri, options)
    probe = f"{path.rstrip('/')}/{STAGING_DIR}/probe-{uuid.uuid4().hex}"
    try:
        if "s3" in filesystem.protocol:
            bucket = path.split("/", 1)[0]
            try:
                filesystem.ls(bucket)  # unlike exists(), this tells a missing bucket from no connection
            except FileNotFoundError:
                raise StorageError(f"output bucket {bucket!r} does not exist (output {path_or_uri})") from None
        filesystem.makedirs(posixpath.dirname(probe), exist_ok=True)
        filesystem.pipe(probe, b"")
        filesystem.rm(probe)
    except StorageError:
        raise
    except Exception as error:  # botocore and OS errors differ by store; all mean "cannot write"
        raise StorageError(f"cannot write to output {path_or_uri}: {type(error).__name__}: {error}") from error


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
            raise TrajectoryFormatError(f"{staging}: {len(repeated)} prompts are already in {output}; nothing committed")
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
    if check_version:
        version = (table.schema.metadata or {}).get(SCHEMA_VERSION_KEY)
        if version is None:
            raise TrajectoryFormatError(
                f"{source}: not a trajectory shard (no {SCHEMA_VERSION_KEY.decode()} metadata)"
            )
        if version.decode() != SCHEMA_VERSION:
            raise TrajectoryFormatError(
                f"{source}: schema version {version.decode()}, this reader expects {SCHEMA_VERSION}"
            )
    for field in TRAJECTORY_SCHEMA:
        if field.name not in table.column_names:
            raise TrajectoryFormatError(f"{source}: missing field {field.name!r}")
        column = table.column(field.name)
        if not _castable(column.type, field.type):
            raise TrajectoryFormatError(
                f"{source}: field {field.name!r} has type {column.type}, expected {field.type}"
            )
        if not field.nullable and column.null_count:
            raise TrajectoryFormatError(f"{source}: field {field.name!r} has {column.null_count} nulls")
    _validate_states(table, source)


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
    """Every state of a row has n_token ids, there is at least one, and fixed_length fits."""
    n_tokens = table.column("n_token").to_pylist()
    fixed_lengths = table.column("fixed_length").to_pylist()
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
    source = _display(filesystem, path)
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
    tables = [conform(read_shard(filesystem, shard), _display(filesystem, shard)) for shard in shards]
    table = pa.concat_tables(tables)
    return table.select(columns) if columns else table


def read_prompt_ids(path_or_uri: str, storage_options: dict[str, Any] | None = None) -> set[str]:
    """The prompt ids already written under an output directory; empty when there is none."""
    filesystem, path = resolve(path_or_uri, storage_options)
    ids: set[str] = set()
    for shard in list_shards(filesystem, path):
        ids.update(read_shard(filesystem, shard, columns=["prompt_id"]).column("prompt_id").to_pylist())
    return ids


def _display(filesystem: fsspec.AbstractFileSystem, path: str) -> str:
    return filesystem.unstrip_protocol(path) if "file" not in _protocols(filesystem) else path


def _protocols(filesystem: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = filesystem.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
