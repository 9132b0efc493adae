"""pipelines/train.py: input checks, distributed ZeRO-2/ZeRO-3 runs on a real local Ray cluster
(resume after an injected worker failure, `ray job submit`, S3 input, HF export), and the effect
of consistency training on a tiny model's Jacobi TPF."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import PAD, save_word_model, trajectory_rows

from cllm import jacobi_generate, tiny_model
from cllm.collate import collate_packed
from cllm.data import rows_to_table, write_shard
from cllm.losses import LossConfig, compute_losses
from cllm.trajectory import CollectConfig
from cllm.trajectory import trajectory_rows as collect_rows
from cllm_pipelines import train
from cllm_pipelines.common import FAULT_MARKER_ENV, CommonSettings

REPO_ROOT = Path(__file__).resolve().parents[1]

COMMON = CommonSettings(model="m", workers=1, wait_for_resources_s=0.0, s3_endpoint=None, seed=0)
VOCAB = 64
N_TOKEN = 4
PROMPTS = [[3, 17, 22, 9, 41], [5, 5, 30, 12], [60, 2, 14, 33, 7, 8], [11, 48, 25], [40, 41, 42, 43, 44, 45, 46]]


def trajectory_table(model_directory: Path) -> pa.Table:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_directory).eval()
    return rows_to_table(trajectory_rows(model, PROMPTS, n_token=N_TOKEN, max_new_tokens=12))


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    """(model directory, shard directory): the tiny model and its own trajectories, repeated so
    that 2 workers get several batches, in 2 shards."""
    root = tmp_path_factory.mktemp("train-inputs")
    model_directory = save_word_model(root / "model")
    table = trajectory_table(model_directory)
    shards = root / "trajectories"
    for index in range(2):
        write_shard(pa.concat_tables([table] * 3), str(shards / f"part-{index}.parquet"))
    return model_directory, shards


# -- input checks (fast: they stop before Ray starts) -------------------------------------------


def run_checks(capsys, *args: str) -> str:
    assert train.main(list(args)) == 2
    return capsys.readouterr().err


def test_input_checks_stop_before_any_worker(tiny_run_inputs, tmp_path, capsys):
    model, shards = tiny_run_inputs
    base = ["--model", str(model), "--output", str(tmp_path / "out")]

    assert "no trajectory shards" in run_checks(capsys, *base, "--trajectories", str(tmp_path / "missing"))

    empty = tmp_path / "empty"
    write_shard(rows_to_table([]), str(empty / "part-0.parquet"))
    assert "hold no rows" in run_checks(capsys, *base, "--trajectories", str(empty))

    broken = tmp_path / "broken"
    broken.mkdir()
    table = pq.read_table(next(shards.glob("*.parquet")))
    pq.write_table(table.drop_columns(["states"]), broken / "part-0.parquet")
    message = run_checks(capsys, *base, "--trajectories", str(broken))
    assert "part-0.parquet" in message and "states" in message

    small_model = save_word_model(tmp_path / "small-model", vocab_size=32)
    message = run_checks(capsys, "--model", str(small_model), "--output", str(tmp_path / "o"),
                         "--trajectories", str(shards))
    assert "vocabulary has 32 ids" in message

    bad_config = tmp_path / "zero.json"
    bad_config.write_text("{not json")
    message = run_checks(capsys, *base, "--trajectories", str(shards), "--deepspeed", str(bad_config))
    assert "cannot read DeepSpeed config" in message
    message = run_checks(capsys, *base, "--trajectories", str(shards), "--deepspeed", str(tmp_path / "none.json"))
    assert "cannot read DeepSpeed config" in message

    assert "--warmup-fraction" in run_checks(capsys, *base, "--trajectories", str(shards), "--warmup-fraction", "1")
    assert "--length-group" in run_checks(capsys, *base, "--trajectories", str(shards), "--length-group", "0")
    assert ">= 2, got 1" in run_checks(capsys, *base, "--trajectories", str(shards), "--packed-states", "1")
    for flags in (["--no-packed"], ["--loss", "local"], ["--objective", "jacobi-forcing"]):
        message = run_checks(capsys, *base, "--trajectories", str(shards), "--packed-states", "3", *flags)
        assert "global consistency loss" in message


def test_jacobi_forcing_flags_are_checked_before_any_worker(tiny_run_inputs, tmp_path, capsys):
    model, shards = tiny_run_inputs
    base = ["--model", str(model), "--output", str(tmp_path / "out"), "--trajectories", str(shards),
            "--objective", "jacobi-forcing"]
    assert "drop --no-packed" in run_checks(capsys, *base, "--no-packed")
    assert "drop --loss local" in run_checks(capsys, *base, "--loss", "local")
    assert "window" in run_checks(capsys, *base, "--noise-window", "0")
    assert "max_noise" in run_checks(capsys, *base, "--min-noise", "0.8", "--max-noise", "0.5")


def test_a_response_record_holds_every_block_of_its_prompt():
    """What Ray Data's groupby hands Jacobi Forcing: one record per prompt, its blocks in order,
    typed as in the shards; a prompt with a missing block is refused by name."""
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    table = rows_to_table(trajectory_rows(model, PROMPTS[:1], n_token=N_TOKEN, max_new_tokens=12))
    record = train.response_record(table.take([2, 0, 1]))
    assert record.num_rows == 1 and record.schema.field("blocks").type.value_type.num_fields == table.num_columns
    assert [row.block_index for row in train.response_rows(record.to_pylist()[0])] == [0, 1, 2]
    with pytest.raises(ValueError, match="p0"):
        train.response_record(table.take([0, 2]))


def test_a_model_at_an_s3_uri_passes_the_input_checks(tiny_run_inputs, s3_server, tmp_path, capsys, monkeypatch):
    """Train reads the model reference the way collect, evaluate and serve do (cllm.hf): an s3://
    model directory is fine, and its facts (here the vocabulary) are the checked ones."""
    model, shards = tiny_run_inputs
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    filesystem = s3_server.filesystem()
    filesystem.put(str(model).rstrip("/") + "/", f"{s3_server.bucket}/models/tiny", recursive=True)
    small = save_word_model(tmp_path / "small", vocab_size=32)
    filesystem.put(str(small).rstrip("/") + "/", f"{s3_server.bucket}/models/small", recursive=True)
    message = run_checks(capsys, "--model", s3_server.uri("models/small"), "--trajectories", str(shards),
                         "--output", str(tmp_path / "o"))
    assert "vocabulary has 32 ids" in message
    facts = train.model_facts(s3_server.uri("models/tiny"))
    assert facts.vocab_size == VOCAB and facts.pad_id == 0


def test_workers_build_deepspeed_ops_with_the_interpreters_ninja(monkeypatch):
    """The same ninja as `make deepspeed-ops`, whatever PATH a worker inherited: another version
    would rebuild the cached comm op (about a minute)."""
    bin_directory = os.path.dirname(sys.executable)
    if not os.path.isfile(os.path.join(bin_directory, "ninja")):
        pytest.skip("this interpreter has no ninja of its own")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    train.use_the_interpreters_ninja()
    train.use_the_interpreters_ninja()
    assert os.environ["PATH"] == f"{bin_directory}:/usr/bin:/bin"
    assert shutil.which("ninja") == os.path.join(bin_directory, "ninja")


def test_shipped_deepspeed_configs_are_zero_2_and_3():
    for stage in (2, 3):
        config = train.read_deepspeed_config(str(REPO_ROOT / f"cluster/deepspeed/zero{stage}.json"))
        assert config["zero_optimization"]["stage"] == stage
    settings = train.engine_config(
        train.TrainSettings(
            common=COMMON, trajectories="t", output="o", deepspeed_config={"zero_optimization": {"stage": 2}},
            loss=LossConfig(), packed=True, epochs=1, max_steps=None, lr=1e-3, lr_schedule="cosine",
            warmup_fraction=0.0, total_steps=10, batch_size=3, grad_accum=2, checkpoint_every=1,
        ),
        world_size=2, use_gpu=False,
    )
    assert settings["train_batch_size"] == 12 and settings["bf16"] == {"enabled": False}


def schedule_rates(schedule: str, total_steps: int, warmup_fraction: float) -> list[float]:
    """The learning rate of every optimizer step under pipelines/train.py's scheduler."""
    settings = train.TrainSettings(
        common=COMMON, trajectories="t", output="o", deepspeed_config={}, loss=LossConfig(), packed=True, epochs=1,
        max_steps=None, lr=1e-3, lr_schedule=schedule, warmup_fraction=warmup_fraction, total_steps=total_steps,
        batch_size=1, grad_accum=1, checkpoint_every=1,
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=settings.lr)
    scheduler = train.lr_scheduler(optimizer, settings)
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_cosine_schedule_warms_up_then_decays_towards_zero():
    rates = schedule_rates("cosine", total_steps=100, warmup_fraction=0.1)
    peak = rates.index(max(rates))
    assert 8 <= peak <= 10 and max(rates) == pytest.approx(1e-3, rel=0.02)
    assert all(a < b for a, b in zip(rates[:peak], rates[1 : peak + 1]))  # warming up
    assert all(a > b for a, b in zip(rates[peak:], rates[peak + 1 :]))  # then decaying
    assert 0 < rates[-1] < 1e-5
    assert schedule_rates("constant", total_steps=5, warmup_fraction=0.1) == [1e-3] * 5


def test_schedule_spans_the_steps_the_run_will_take():
    def settings(*flags: str) -> train.TrainSettings:
        return train.train_settings(train.parse_args(["--workers", "2", "--batch-size", "4", "--epochs", "3", *flags]))

    assert train.total_steps(100, settings("--grad-accum", "2")) == 3 * (100 // 16)
    assert train.total_steps(100, settings("--max-steps", "5")) == 5


# -- distributed runs on the local 2-node cluster (slow) -------------------------------------------


def step_losses(log: str) -> dict[int, float]:
    """step -> training loss (consistency + w·AR), from the job log's per-step lines."""
    return {int(step): float(loss) for step, loss in re.findall(r"step (\d+)/\d+ epoch \d+ loss ([\d.]+) ", log)}


def check_export(hf_directory: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (hf_directory / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(hf_directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_directory)
    prompt = tokenizer("w3 w17 w22", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 9)


@pytest.mark.slow
def test_zero2_resumes_after_a_worker_failure(ray_cluster, tiny_run_inputs, tmp_path):
    model, shards = tiny_run_inputs
    output, marker = tmp_path / "cllm", tmp_path / "failed-once"
    args = ["python", "pipelines/train.py", "--model", str(model), "--trajectories", str(shards),
            "--output", str(output), "--workers", "2", "--deepspeed", "cluster/deepspeed/zero2.json",
            "--batch-size", "4", "--epochs", "10", "--lr", "3e-3", "--checkpoint-every", "3", "--verbose"]
    run = ray_cluster.submit(*args, "--max-steps", "8", job_env={FAULT_MARKER_ENV: str(marker)})
    log = run.stdout + run.stderr
    print(log)
    assert run.returncode == 0, log[-4000:]
    assert marker.exists() and "injected worker failure" in log
    assert "resuming from the checkpoint at step 3" in log
    after_restart = log[log.index("resuming from the checkpoint at step 3"):]
    steps_after = [int(step) for step in re.findall(r"step (\d+)/8 ", after_restart)]
    assert steps_after[0] == 4 and steps_after[-1] == 8  # went on from the checkpoint, not from step 1
    losses = step_losses(log)
    assert losses[8] < losses[1]
    summary = json.loads(log[log.rindex('{"steps"'):].splitlines()[0])
    assert summary["steps"] == 8
    check_export(output / "hf")

    # Rerunning with the same --output resumes from the last checkpoint (step 8), without --verbose:
    # one progress line and a summary instead of a line per step.
    rerun = ray_cluster.submit(*args[:-1], "--max-steps", "10")
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log[-4000:]
    assert "resuming from the checkpoint at step 8" in log
    assert not step_losses(log)
    assert "train: 100% 10/10 steps" in log and "train: finished step 10 of 10: loss" in log, log[-3000:]
    assert json.loads(log[log.rindex('{"steps"'):].splitlines()[0])["steps"] == 10
    check_export(output / "hf")


@pytest.mark.slow
def test_zero3_job_submit_from_s3_exports_a_model(ray_cluster, s3_server, tiny_run_inputs, tmp_path):
    model, shards = tiny_run_inputs
    filesystem = s3_server.filesystem()
    for shard in sorted(shards.glob("*.parquet")):
        write_shard(pq.read_table(shard), f"{s3_server.bucket}/train-trajectories/{shard.name}", filesystem=filesystem)
    output = tmp_path / "cllm3"
    args = [
        "python", "pipelines/train.py", "--model", str(model),
        "--trajectories", s3_server.uri("train-trajectories"), "--s3-endpoint", s3_server.endpoint_url,
        "--output", str(output), "--workers", "2", "--deepspeed", "cluster/deepspeed/zero3.json",
        "--batch-size", "4", "--lr", "3e-3", "--checkpoint-every", "4", "--loss", "local", "--no-packed",
        "--gradient-checkpointing", "--verbose",
    ]
    run = ray_cluster.submit(*args, "--max-steps", "6", "--epochs", "10")
    print(run.stdout + run.stderr)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    losses = step_losses(log)
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1]
    check_export(output / "hf")



# -- the effect: consistency training raises Jacobi TPF (in process, no Ray) -------------------------


def batched_tpf(model, prompts: list[list[int]], n_token: int, max_new_tokens: int) -> float:
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    output = jacobi_generate(model, input_ids, attention_mask, n_token=n_token, max_new_tokens=max_new_tokens,
                             pad_token_id=PAD, generator=torch.Generator().manual_seed(12345))
    return output.stats.total.tokens_per_forward


@pytest.mark.slow
def test_consistency_training_raises_jacobi_tpf():
    """Trained on its own trajectories from a few random initial guesses per prompt, the model
    reaches the fixed point in fewer iterations from guesses it has never seen."""
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    prompts = PROMPTS[:4]
    before = batched_tpf(model, prompts, n_token=8, max_new_tokens=32)
    batch = [{"prompt_id": f"p{index}", "prompt_ids": prompt} for index, prompt in enumerate(prompts)]
    rows = [row for seed in range(4) for row in collect_rows(
        model, batch, "tiny", CollectConfig(n_token=8, max_new_tokens=32, min_loop_tokens=0, seed=seed)).rows]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(80):
        start = (step * 8) % len(rows)
        output = compute_losses(model, collate_packed(rows[start : start + 8], PAD), LossConfig(ar_weight=1.0))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    model.eval()
    after = batched_tpf(model, prompts, n_token=8, max_new_tokens=32)
    print(f"Jacobi TPF on the training prompts: before {before:.2f}, after {after:.2f}")
    assert before < 1.2
    assert after > 1.25 * before  # measured: 1.04 -> 1.39 (1.34x) after 80 steps; 1.56x after 320
