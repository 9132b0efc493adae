"""The trajectory shard format: round trip, atomic writes, and validation errors that name the
file and the field, locally and on S3."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cllm.data import (
    ROW_FIELDS,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    TRAJECTORY_SCHEMA,
    TrajectoryFormatError,
    TrajectoryRow,
    read_prompt_ids,
    read_trajectories,
    rows_to_table,
    summarize_shards,
    table_rows,
    write_shard,
)
from cllm.storage import storage_options


def row(prompt_id: str = "p", block_index: int = 0, **changes) -> TrajectoryRow:
    base = TrajectoryRow(prompt_id=prompt_id, block_index=block_index, prompt_length=2, prefix_ids=[1, 2, 3],
                         states=[[4, 9, 9], [4, 5, 9], [4, 5, 6]], eos=False, label_ids=[5, 6, 2],
                         model="tiny", n_token=3, fixed_length=3, iterations=3)
    return dataclasses.replace(base, **changes)


def test_the_row_and_the_arrow_schema_name_the_same_fields():
    assert tuple(TRAJECTORY_SCHEMA.names) == ROW_FIELDS
    rows = [row("a", 0), row("a", 1, label_ids=None, fixed_length=2, eos=True)]
    assert table_rows(rows_to_table(rows)) == rows
    assert rows[0].prompt_ids == [1, 2] and rows[0].fixed_point == [4, 5, 6]


def test_round_trip_with_version(tmp_path):
    table = rows_to_table([row("a", 0), row("a", 1, label_ids=None, fixed_length=2, eos=True)])
    path = write_shard(table, str(tmp_path / "out" / "shard-0.parquet"))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["shard-0.parquet"]  # no temporary left
    assert pq.read_schema(path).metadata[SCHEMA_VERSION_KEY] == SCHEMA_VERSION.encode()
    back = read_trajectories(str(tmp_path / "out"))
    assert back.schema.equals(TRAJECTORY_SCHEMA, check_metadata=False)
    assert back.to_pylist() == table.to_pylist()
    assert read_prompt_ids(str(tmp_path / "out")) == {"a"}
    assert read_prompt_ids(str(tmp_path / "nothing")) == set()


def test_hidden_and_partial_files_are_not_data(tmp_path):
    write_shard(rows_to_table([row("a")]), str(tmp_path / "good.parquet"))
    (tmp_path / ".good.parquet.123.tmp").write_bytes(b"PAR1 half written")
    (tmp_path / "_staging").mkdir()
    (tmp_path / "_staging" / "x.parquet").write_bytes(b"junk")
    assert read_trajectories(str(tmp_path)).num_rows == 1


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.drop_columns(["states"]), "missing field 'states'"),
    (lambda t: t.set_column(t.schema.get_field_index("eos"), "eos", pa.array(["no"])),
     "field 'eos' has type string, expected bool"),
    (lambda t: t.set_column(t.schema.get_field_index("states"), "states",
                            pa.array([[[1, 2]]], pa.list_(pa.list_(pa.int32())))),
     "field 'states' in row 0 has a state whose length is not n_token=3"),
    (lambda t: t.set_column(t.schema.get_field_index("model"), "model", pa.array([None], pa.string())),
     "field 'model' has 1 nulls"),
    (lambda t: t.set_column(t.schema.get_field_index("prompt_length"), "prompt_length", pa.array([4], pa.int32())),
     "field 'prompt_length' is 4 in row 0, expected 1..3"),
])
def test_bad_shard_names_file_and_field(tmp_path, damage, message):
    write_shard(rows_to_table([row("a")]), str(tmp_path / "a.parquet"))
    table = damage(rows_to_table([row("b")]))
    pq.write_table(table.replace_schema_metadata(TRAJECTORY_SCHEMA.metadata), tmp_path / "b.parquet")
    with pytest.raises(TrajectoryFormatError) as error:
        read_trajectories(str(tmp_path))
    assert str(error.value) == f"{tmp_path / 'b.parquet'}: {message}"


def test_version_and_garbage_errors(tmp_path):
    plain = rows_to_table([row()]).replace_schema_metadata({})
    pq.write_table(plain, tmp_path / "old.parquet")
    with pytest.raises(TrajectoryFormatError, match=r"old.parquet: not a trajectory shard"):
        read_trajectories(str(tmp_path / "old.parquet"))
    pq.write_table(plain.replace_schema_metadata({SCHEMA_VERSION_KEY: b"0"}), tmp_path / "old.parquet")
    with pytest.raises(TrajectoryFormatError, match=r"old.parquet: schema version 0, this reader expects"):
        read_trajectories(str(tmp_path / "old.parquet"))
    version_1 = plain.drop_columns(["prompt_length"]).replace_schema_metadata({SCHEMA_VERSION_KEY: b"1"})
    pq.write_table(version_1, tmp_path / "old.parquet")
    with pytest.raises(TrajectoryFormatError, match=r"schema version 1, .* stores prompt_length\); collect"):
        read_trajectories(str(tmp_path / "old.parquet"))
    with pytest.raises(TrajectoryFormatError, match=r"schema version 1"):
        summarize_shards(str(tmp_path / "old.parquet"))
    (tmp_path / "old.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(TrajectoryFormatError, match=r"old.parquet: not a readable Parquet file"):
        read_trajectories(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no trajectory shards"):
        read_trajectories(str(tmp_path / "empty"))


def test_s3_round_trip(s3_server):
    uri = s3_server.uri("data-test/shard.parquet")
    from cllm.storage import resolve

    filesystem, path = resolve(uri, storage_options(s3_server.endpoint_url))
    write_shard(rows_to_table([row("s")]), path, filesystem=filesystem)
    assert [p.rsplit("/", 1)[1] for p in filesystem.ls(f"{s3_server.bucket}/data-test")] == ["shard.parquet"]
    back = read_trajectories(s3_server.uri("data-test"), storage_options=storage_options(s3_server.endpoint_url))
    assert back.column("prompt_id").to_pylist() == ["s"]


def test_commit_moves_staged_shards_once(tmp_path):
    from cllm.data import commit_staged, new_staging_dir
    from cllm.storage import STAGING_DIR

    output = str(tmp_path / "out")
    staging = new_staging_dir(output)
    assert staging.startswith(f"{output}/{STAGING_DIR}/")
    write_shard(rows_to_table([row("a", 0), row("a", 1)]), f"{staging}/x.parquet")
    assert read_prompt_ids(output) == set()  # staged shards are invisible
    committed = commit_staged(staging, output)
    assert committed.num_rows == 2 and read_prompt_ids(output) == {"a"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.parquet"]  # staging area cleared

    staging = new_staging_dir(output)
    write_shard(rows_to_table([row("b", 0)]), f"{staging}/y.parquet")
    write_shard(rows_to_table([row("b", 0)]), f"{staging}/z.parquet")
    with pytest.raises(TrajectoryFormatError, match="duplicate"):
        commit_staged(staging, output)
    staging = new_staging_dir(output)
    write_shard(rows_to_table([row("a", 0)]), f"{staging}/w.parquet")
    with pytest.raises(TrajectoryFormatError, match="1 prompts are already in"):
        commit_staged(staging, output, existing_ids={"a"})
    assert read_trajectories(output).num_rows == 2  # failed commits changed nothing
    assert commit_staged(new_staging_dir(output), output).num_rows == 0


def test_check_writable(tmp_path, s3_server):
    from cllm.storage import StorageError, check_writable

    check_writable(str(tmp_path / "new" / "dir"))
    check_writable(s3_server.uri("ok"), storage_options(s3_server.endpoint_url))
    with pytest.raises(StorageError, match="output bucket 'missing' does not exist"):
        check_writable("s3://missing/x", storage_options(s3_server.endpoint_url))
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="cannot write to output"):
        check_writable(str(tmp_path / "file" / "sub"))


def test_summary_reads_footers_only_and_falls_back_to_rows_without_statistics(tmp_path):
    rows = [row("a", 0, prefix_ids=[1, 2, 77]), row("b", 0, label_ids=None), row("c", 0, label_ids=[])]
    write_shard(rows_to_table(rows[:2]), str(tmp_path / "s" / "one.parquet"))
    table = rows_to_table(rows[2:])
    pq.write_table(table, tmp_path / "s" / "two.parquet", write_statistics=False)
    summary = summarize_shards(str(tmp_path / "s"))
    assert summary.rows == 3 and summary.n_token_range == (3, 3)
    assert summary.max_token_id == 77 and summary.rows_without_labels == 2
    assert [path.rsplit("/", 1)[1] for path in summary.shards] == ["one.parquet", "two.parquet"]
    write_shard(rows_to_table([row("d", 0, n_token=2, states=[[1, 2]], fixed_length=2)]),
                str(tmp_path / "s" / "three.parquet"))
    assert summarize_shards(str(tmp_path / "s")).n_token_range == (2, 3)
    with pytest.raises(FileNotFoundError):
        summarize_shards(str(tmp_path / "none"))
