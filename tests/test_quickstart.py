"""A user's own Ray cluster: the README's quick start, extracted from the README and run as
written on a `ray start --head --num-cpus 2` cluster; requests the cluster cannot hold fail at
once with the shortfall named (the check itself: test_raytools.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import free_port, save_word_model, stop_ray_processes, trajectory_rows, wait_for_job_agent

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
SERVE = str(Path(sys.executable).with_name("serve"))
# Far above the normal few minutes: a stage that waits forever (as training once did on a
# cluster whose CPUs all went to its workers) fails the test instead of hanging it.
QUICKSTART_BOUND_S = 1500


def readme_quick_start() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Your own Ray cluster: a quick start"):]
    return re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory) -> Path:
    """A cache holding a small but trained toy-math teacher (seconds to build), which `--model
    toy` then finds instead of building the real one (minutes)."""
    from cllm.toy.teacher import ToyConfig, load_toy

    root = tmp_path_factory.mktemp("cllm-cache")
    config = ToyConfig(domain="math", vocab_size=300, tokenizer_corpus_docs=300, hidden_size=64,
                       intermediate_size=128, num_layers=2, num_heads=2, train_tokens=400_000,
                       learning_rate=1e-2, eval_prompts=8, processes=1, threads=1)
    load_toy("math", config, cache_dir=root)
    return root


def clean_environment(**overrides: str) -> dict[str, str]:
    """This process's environment without the Ray settings earlier tests may have left in it."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    return {**environment, "RAY_USAGE_STATS_ENABLED": "0", **overrides}


@pytest.mark.slow
def test_the_readme_quick_start_runs_as_written(toy_cache, tmp_path):
    from cllm import jacobi_generate, load_model

    script = tmp_path / "quickstart.sh"
    script.write_text("set -euo pipefail\n" + readme_quick_start())
    out = tmp_path / "out"
    environment = clean_environment(CLLM_CACHE=str(toy_cache), OUT=str(out))
    started = time.monotonic()
    try:
        result = subprocess.run(["bash", str(script)], cwd=REPO, env=environment, capture_output=True, text=True,
                                timeout=QUICKSTART_BOUND_S)
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=environment)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    print(f"quick start: {time.monotonic() - started:.0f} s")

    assert "prompts written:" in log and "== collect summary ==" in log
    assert "train: finished step 20 of 20: loss" in log  # --workers 2 on 2 CPUs trained to the end
    assert re.search(r"\| cllm \| jacobi \| 16 \|", log)  # the evaluation table
    reply = json.loads(next(line for line in result.stdout.splitlines() if line.startswith('{"id"')))
    assert reply["model"] == "cllm" and reply["usage"]["completion_tokens"] > 0
    # No stuck progress bar: no line repeats in the job logs (a bar stuck at 0 rows printed one a second).
    progress = [line for line in log.splitlines() if "row/s" in line or "Running Dataset" in line]
    assert not progress, progress[:3]

    model, tokenizer = load_model(str(out / "cllm" / "hf"), device="cpu")
    prompt = tokenizer("Question: Tom has 3 apples. How many apples does Tom have?\nAnswer:", return_tensors="pt")
    output = jacobi_generate(model, prompt.input_ids, n_token=8, max_new_tokens=16, eos_token_id=tokenizer.eos_token_id)
    assert len(output.new_tokens[0]) > 0


@pytest.fixture
def two_cpu_cluster(tmp_path):
    """A `ray start --head --num-cpus 2` cluster, as the quick start makes; RAY_ADDRESS names it."""
    port, dashboard_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="cllm-ray-", dir="/tmp")
    venv_path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # as an activated venv
    environment = clean_environment(RAY_AUTH_MODE="disabled", PATH=venv_path)
    subprocess.run([RAY, "start", "--head", "--num-cpus", "2", "--port", str(port), "--node-ip-address", "127.0.0.1",
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
                    "--dashboard-agent-listen-port", str(free_port()),
                    "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats", "--temp-dir", temp_dir],
                   check=True, capture_output=True, env=environment)
    try:
        wait_for_job_agent(f"http://127.0.0.1:{dashboard_port}", environment)
        yield {**environment, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        stop_ray_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(environment: dict, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([RAY, "job", "submit", "--working-dir", ".", "--", *args], cwd=REPO,
                            env=environment, capture_output=True, text=True, timeout=600)
    return result, time.monotonic() - started


@pytest.mark.slow
def test_requests_the_cluster_cannot_hold_fail_at_once(two_cpu_cluster, tmp_path):
    from cllm import tiny_model
    from cllm.data import rows_to_table, write_shard

    model_dir = tmp_path / "model"
    save_word_model(model_dir)
    model = tiny_model("llama", vocab_size=64, seed=0)
    rows = trajectory_rows(model, [[3, 17, 22, 9], [5, 5, 30, 12], [60, 2, 14]], n_token=4, max_new_tokens=8)
    write_shard(rows_to_table(rows * 4), str(tmp_path / "trajectories" / "part-0.parquet"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1}"}) + "\n" for i in range(3, 9)))

    train, seconds = submit(two_cpu_cluster, "python", "pipelines/train.py", "--model", str(model_dir),
                            "--trajectories", str(tmp_path / "trajectories"), "--output", str(tmp_path / "cllm"),
                            "--workers", "3", "--batch-size", "1")
    assert train.returncode != 0 and seconds < 120
    assert "error: --workers 3 needs 3 CPUs; the cluster has 2" in train.stdout + train.stderr

    collect, seconds = submit(two_cpu_cluster, "python", "pipelines/collect.py", "--model", str(model_dir),
                              "--prompts", str(prompts), "--output", str(tmp_path / "t"), "--workers", "3")
    assert collect.returncode != 0 and seconds < 120
    assert "error: --workers 3 needs 3 CPUs; the cluster has 2" in collect.stdout + collect.stderr

    started = time.monotonic()
    serve = subprocess.run([SERVE, "run", "--non-blocking", "serve.app:build_app", f"model={model_dir}", "num_gpus=0",
                            "min_replicas=3", "max_replicas=3"], cwd=REPO, env=two_cpu_cluster,
                           capture_output=True, text=True, timeout=300)
    assert serve.returncode != 0 and time.monotonic() - started < 120
    assert "min_replicas 3 needs 3 CPUs; the cluster has 2" in serve.stdout + serve.stderr

