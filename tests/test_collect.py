"""pipelines/collect.py: fail-fast errors in process; end to end on a real 2-node Ray cluster
with `ray job submit`, writing to a real S3-compatible server, with an injected actor crash and
a resumed second run, both checked row by row against greedy AR decoding."""

from __future__ import annotations

import json
import time

import pytest
import torch
from helpers import char_tokenizer, free_port

from cllm import ar_generate, tiny_model
from cllm.data import read_trajectories, table_rows
from cllm.prompts import load_prompts
from cllm.storage import storage_options
from cllm_pipelines.common import FAULT_MARKER_ENV

N_TOKEN, MAX_NEW_TOKENS = 4, 14


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> dict:
    """A tiny Llama saved with a char tokenizer, and a generic JSONL with 3 bad rows."""
    root = tmp_path_factory.mktemp("collect")
    tokenizer = char_tokenizer()
    tokenizer.model_max_length = 64 + MAX_NEW_TOKENS  # prompts over 64 tokens are over budget
    model = tiny_model("llama", vocab_size=128, seed=5)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows: list = [{"prompt": f"Q{i}: add {i} and {3 * i}.", "answer": str(4 * i)} for i in range(30)]
    rows[4] = {"answer": "no prompt"}
    rows[9] = {"prompt": "x" * 100}
    lines = [json.dumps(row) for row in rows] + ["{oops"]
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return {"root": root, "model": str(root / "model"), "prompts": str(root / "prompts.jsonl"),
            "tokenizer": tokenizer, "network": model}


def run_collect(argv: list[str]) -> int:
    from cllm_pipelines import collect

    return collect.main(argv)


# -- fail fast (no Ray started) ------------------------------------------------------------------


def test_missing_input_fails_fast(workload, tmp_path, capsys):
    code = run_collect(["--model", workload["model"], "--prompts", str(tmp_path / "none.jsonl"),
                        "--output", str(tmp_path / "out"), "--max-new-tokens", str(MAX_NEW_TOKENS)])
    assert code == 2
    assert f"error: prompt source '{tmp_path / 'none.jsonl'}' does not exist" in capsys.readouterr().err


def test_unknown_format_fails_fast(workload, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_collect(["--model", workload["model"], "--format", "csv", "--output", str(tmp_path)])
    assert exit_.value.code == 2
    assert "argument --format: invalid choice: 'csv'" in capsys.readouterr().err


def test_undetectable_format_fails_fast(workload, tmp_path, capsys):
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"title": "no known field"}\n')
    code = run_collect(["--model", workload["model"], "--prompts", str(odd), "--output", str(tmp_path / "o"),
                        "--max-new-tokens", str(MAX_NEW_TOKENS)])
    assert code == 2 and "cannot detect the prompt format" in capsys.readouterr().err


def test_unreachable_bucket_fails_fast(workload, s3_server, capsys):
    base = ["--model", workload["model"], "--prompts", workload["prompts"]]
    code = run_collect([*base, "--output", "s3://no-such-bucket/x", "--s3-endpoint", s3_server.endpoint_url])
    assert code == 2 and "error: output bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    dead = f"http://127.0.0.1:{free_port()}"
    code = run_collect([*base, "--output", s3_server.uri("x"), "--s3-endpoint", dead])
    assert code == 2 and "error: cannot write to output s3://cllm-test/x" in capsys.readouterr().err


def test_generator_udf_writes_one_shard_per_batch_and_reports_each_prompt(workload, tmp_path):
    import pyarrow as pa

    from cllm.trajectory import CollectConfig
    from cllm_pipelines.collect import TrajectoryCollector, shard_name

    records, _ = load_prompts(workload["prompts"], workload["tokenizer"], limit=3)
    batch = pa.Table.from_pylist([{"prompt_id": r.prompt_id, "prompt_ids": r.prompt_ids, "label_ids": r.label_ids}
                                  for r in records])
    ids = [r.prompt_id for r in records]
    keep_all = TrajectoryCollector(workload["model"], CollectConfig(n_token=N_TOKEN, max_new_tokens=8),
                                   str(tmp_path / "all"), {})
    summary = keep_all(batch)
    assert summary.column("prompt_id").to_pylist() == ids
    assert summary.column("rejected_reason").null_count == 3
    written = read_trajectories(str(tmp_path / "all" / shard_name(ids)))
    assert written.num_rows == sum(summary.column("blocks").to_pylist())
    assert sum(summary.column("tokens").to_pylist()) == sum(written.column("fixed_length").to_pylist())
    assert keep_all(batch).equals(summary)  # a retried batch rewrites the same shard
    assert [p.name for p in (tmp_path / "all").iterdir()] == [shard_name(ids)]

    strict = TrajectoryCollector(workload["model"], CollectConfig(n_token=N_TOKEN, max_new_tokens=8,
                                                                  min_loop_tokens=2, max_loop_period=8),
                                 str(tmp_path / "strict"), {})
    cleaned = strict(batch).to_pylist()
    rejected = [row for row in cleaned if row["rejected_reason"] is not None]
    assert 0 < len(rejected) < 3  # some, not all, of these outputs repeat a token within 8
    assert all(r["rejected_reason"].startswith("degenerate output") and r["blocks"] == 0 for r in rejected)
    kept = {row["prompt_id"] for row in cleaned} - {row["prompt_id"] for row in rejected}
    strict_rows = table_rows(read_trajectories(str(tmp_path / "strict")))
    assert {r.prompt_id for r in strict_rows} == kept
    assert strict_rows == [r for r in table_rows(written) if r.prompt_id in kept]


# -- end to end on a real cluster ----------------------------------------------------------------


def greedy(workload, prompt_ids: list[int]) -> list[int]:
    return ar_generate(workload["network"], torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW_TOKENS,
                       eos_token_id=workload["tokenizer"].eos_token_id).new_tokens[0]


def check_output(workload, s3_server, prefix: str, limit: int | None) -> list[str]:
    """Validate every row against greedy AR; return the prompt ids in the output."""
    records, _ = load_prompts(workload["prompts"], workload["tokenizer"], limit=limit, max_prompt_tokens=64)
    table = read_trajectories(s3_server.uri(prefix), storage_options=storage_options(s3_server.endpoint_url))
    rows = table.to_pylist()
    keys = [(row["prompt_id"], row["block_index"]) for row in rows]
    assert len(keys) == len(set(keys)), "a (prompt, block) appears twice"
    expected_rows = 0
    for record in records:
        output = greedy(workload, record.prompt_ids)
        blocks = sorted((r for r in rows if r["prompt_id"] == record.prompt_id), key=lambda r: r["block_index"])
        expected_rows += len(blocks)
        assert len(blocks) == len(output) // N_TOKEN + (len(output) % N_TOKEN >= 2), record.prompt_id
        assert [r["block_index"] for r in blocks] == list(range(len(blocks)))
        for r in blocks:
            start = r["block_index"] * N_TOKEN
            assert r["prefix_ids"] == record.prompt_ids + output[:start]
            fixed_point = r["states"][-1]
            assert fixed_point[: r["fixed_length"]] == output[start : start + r["fixed_length"]]
            assert r["fixed_length"] == min(N_TOKEN, len(output) - start)
            assert r["label_ids"] == record.label_ids and r["model"] == workload["model"]
    assert table.num_rows == expected_rows  # and nothing else is in the output
    assert {row["prompt_id"] for row in rows} == {record.prompt_id for record in records}
    return sorted({row["prompt_id"] for row in rows})


def submit(ray_cluster, *args: str, job_env: dict | None = None):
    """`ray job submit`, retried while a freshly started head has no job agent up yet."""
    for _ in range(6):
        result = ray_cluster.submit(*args, job_env=job_env)
        if "No available agent to submit job" not in result.stderr + result.stdout:
            return result
        time.sleep(10)
    return result


@pytest.mark.slow
def test_collect_on_cluster_to_s3_with_crash_then_resume(workload, ray_cluster, s3_server):
    marker = workload["root"] / "actor-died"
    args = ["python", "pipelines/collect.py", "--model", workload["model"], "--prompts", workload["prompts"],
            "--output", s3_server.uri("e2e"), "--s3-endpoint", s3_server.endpoint_url,
            "--n-token", str(N_TOKEN), "--max-new-tokens", str(MAX_NEW_TOKENS),
            "--batch-size", "3", "--workers", "2"]
    first = submit(ray_cluster, *args, "--limit", "18", job_env={FAULT_MARKER_ENV: str(marker)})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert marker.exists(), "the injected actor crash did not happen"
    log = first.stdout
    assert "bad input rows:      2" in log  # within the first 18 accepted: rows 5 and 10
    assert f"{workload['prompts']}:5: missing field 'prompt'" in log
    assert f"{workload['prompts']}:10: prompt has 101 tokens, over the maximum 64" in log
    assert f"prompts written:       18 to {s3_server.uri('e2e')}" in log
    assert len(check_output(workload, s3_server, "e2e", limit=18)) == 18

    second = submit(ray_cluster, *args)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "28 prompts accepted, 3 bad rows, 18 already written, 10 to collect" in second.stdout
    assert "prompts written:       10 to" in second.stdout
    assert f"{workload['prompts']}:31: not JSON" in second.stdout
    assert len(check_output(workload, s3_server, "e2e", limit=None)) == 28


def test_budget_over_the_context_fails_fast(workload, tmp_path, capsys):
    code = run_collect(["--model", workload["model"], "--prompts", workload["prompts"],
                        "--output", str(tmp_path / "o"), "--max-new-tokens", "500"])
    assert code == 2
    assert "--max-new-tokens 500 leaves no room for a prompt in the model's 78-token context" in capsys.readouterr().err
