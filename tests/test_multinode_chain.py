"""The multi-node path: collect -> train -> load the exported model, each stage a separate
`ray job submit --runtime-env cluster/runtime_env.yaml` on a real 2-node local Ray cluster, with every
artifact on S3 (moto on loopback), exactly as docs/cluster.md runs it on a real cluster.

No stage reads a local path that another stage wrote: each stage reads only s3:// URIs written by
the stage before it and writes only s3:// URIs, and the final load runs on *every* node of the
cluster from S3 alone. The inputs are the user's: a prompts file uploaded to S3, and a tiny random
base model in a local directory (`--model` takes a hub id or a local directory; the base model is
also put on S3, for the load stage's check that training changed the weights).

Run directly, this file is the last stage's job: `python tests/test_multinode_chain.py load
s3://.../hf --s3-endpoint URL` downloads the model from S3 on each node and decodes with it.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNTIME_ENV = "cluster/runtime_env.yaml"
N_TOKEN = 4


def build_tiny_model(directory: Path) -> None:
    """A tiny random Llama and a byte-level BPE tokenizer, saved as a Hugging Face model dir."""
    from cllm.hf import tiny_model
    from cllm.toy.teacher import ToyConfig, train_tokenizer

    tokenizer = train_tokenizer(ToyConfig(domain="math", vocab_size=300, tokenizer_corpus_docs=200))
    model = tiny_model("llama", vocab_size=len(tokenizer), seed=0)
    for config in (model.config, model.generation_config):
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def submit(ray_cluster, *args: str, timeout: float = 900):
    """`ray job submit --runtime-env cluster/runtime_env.yaml -- <args>`, as docs/cluster.md does."""
    import subprocess

    ray_cli = str(Path(sys.executable).with_name("ray"))  # the venv's, as the ray_cluster fixture uses
    command = [ray_cli, "job", "submit", "--address", ray_cluster.dashboard_url, "--runtime-env", RUNTIME_ENV,
               "--", *args]
    return subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def check(result, stage: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{stage} job failed:\n{output[-6000:]}"
    print(f"[chain] {stage} job succeeded", flush=True)  # progress, visible with -s
    return output


@pytest.mark.slow
def test_collect_train_load_across_two_nodes_through_s3_only(ray_cluster, s3_server, tmp_path):
    import ray  # noqa: F401  (fail early if the environment lacks it)

    fs = s3_server.filesystem()
    run = f"chain-{uuid.uuid4().hex[:8]}"
    base_uri = s3_server.uri(f"{run}/inputs/base-model")
    prompts_uri = s3_server.uri(f"{run}/inputs/prompts.jsonl")
    trajectories_uri = s3_server.uri(f"{run}/trajectories")
    output_uri = s3_server.uri(f"{run}/cllm")
    endpoint = ["--s3-endpoint", s3_server.endpoint_url]

    # The user's inputs: the prompts on S3; the base model in a local directory (pipelines take a hub
    # id or a local directory for --model), also put on S3 for the load stage's comparison.
    local_model = tmp_path / "base-model"
    build_tiny_model(local_model)
    fs.put(str(local_model) + "/", base_uri, recursive=True)
    assert fs.exists(f"{base_uri}/config.json")
    prompts = [{"prompt": f"Q: what is {a} plus {a + 3}?\nA:", "answer": f" {2 * a + 3}"} for a in range(8)]
    with fs.open(prompts_uri, "w") as handle:
        handle.write("".join(json.dumps(p) + "\n" for p in prompts))

    # Stage 1: collect, on the cluster, from S3 to S3.
    check(submit(
        ray_cluster, "python", "pipelines/collect.py", "--model", str(local_model), "--prompts", prompts_uri,
        "--format", "jsonl", "--output", trajectories_uri, "--n-token", str(N_TOKEN), "--max-new-tokens", "8",
        "--batch-size", "4", "--workers", "2", "--gpus-per-worker", "0", "--limit", "8", "--seed", "0",
        "--min-loop-tokens", "0",  # a random model loops; keep its outputs
        *endpoint,
    ), "collect")

    from cllm.data import read_trajectories
    from cllm.storage import storage_options

    table = read_trajectories(trajectories_uri, storage_options(s3_server.endpoint_url))
    assert table.num_rows >= len(prompts), "collect wrote fewer rows than prompts"
    assert len(set(table.column("prompt_id").to_pylist())) == len(prompts)
    assert all(len(states[-1]) == N_TOKEN for states in table.column("states").to_pylist())

    # Stage 2: train, on the cluster, reading the shards from S3 and exporting the model to S3.
    check(submit(
        ray_cluster, "python", "pipelines/train.py", "--model", str(local_model), "--trajectories", trajectories_uri,
        "--output", output_uri, "--workers", "2", "--use-gpu", "no", "--max-steps", "2", "--batch-size", "2",
        "--lr", "1e-2", "--seed", "0", *endpoint,
    ), "train")
    exported = f"{output_uri}/hf"
    assert fs.exists(f"{exported}/config.json"), f"train exported no model to {exported}: {fs.find(output_uri)}"
    assert any(name.endswith(".safetensors") for name in fs.find(exported))

    # Stage 3: load the exported model on every node, from S3 alone, and decode with it.
    output = check(submit(
        ray_cluster, "python", "tests/test_multinode_chain.py", "load", exported, "--base", base_uri, *endpoint,
    ), "load")
    report = json.loads(output[output.index("LOADED ") + len("LOADED "):].splitlines()[0])
    assert len({node["node"] for node in report["nodes"]}) == 2, f"the model was not loaded on both nodes: {report}"
    for node in report["nodes"]:
        assert node["jacobi_equals_ar"], node
        assert 1 <= len(node["new_tokens"][0]) <= 8
        assert node["vocab_size"] == report["nodes"][0]["vocab_size"]
        # The trained weights, not the base model's: training moved them.
        assert node["weights_digest"] != node["base_digest"], "the exported model equals the base model"


# -- the load stage, run on the cluster as a Ray job ------------------------------------------------


def _load_on_node(uri: str, base_uri: str | None, endpoint: str | None) -> dict:
    import hashlib
    import tempfile

    import ray
    import s3fs
    import torch

    from cllm import ar_generate, jacobi_generate, load_model

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint} if endpoint else {})

    def fetch(source: str) -> tuple[torch.nn.Module, object]:
        local = Path(tempfile.mkdtemp(prefix="cllm-load-"))  # fresh: nothing another stage wrote
        fs.get(source.rstrip("/") + "/", str(local), recursive=True)
        return load_model(str(local), device="cpu")

    def digest(model: torch.nn.Module) -> str:
        sha = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            sha.update(name.encode())
            sha.update(tensor.float().numpy().tobytes())
        return sha.hexdigest()

    model, tokenizer = fetch(uri)
    prompt = torch.tensor([tokenizer("Q: what is 2 plus 5?\nA:")["input_ids"]])
    ar = ar_generate(model, prompt, max_new_tokens=8)
    jacobi = jacobi_generate(model, prompt, n_token=N_TOKEN, max_new_tokens=8)
    base_digest = digest(fetch(base_uri)[0]) if base_uri else None
    return {
        "node": ray.get_runtime_context().get_node_id(),
        "vocab_size": model.config.vocab_size,
        "jacobi_equals_ar": jacobi.new_tokens == ar.new_tokens,
        "new_tokens": jacobi.new_tokens,
        "weights_digest": digest(model),
        "base_digest": base_digest,
    }


def _load_main(argv: list[str]) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    parser = argparse.ArgumentParser()
    parser.add_argument("uri")
    parser.add_argument("--base", help="the base model's URI, to check that training changed the weights")
    parser.add_argument("--s3-endpoint")
    args = parser.parse_args(argv)

    ray.init()
    load = ray.remote(num_cpus=1)(_load_on_node)
    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    results = ray.get([
        load.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
            args.uri, args.base, args.s3_endpoint
        )
        for node in nodes
    ])
    print("LOADED " + json.dumps({"nodes": results}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        sys.path.insert(0, str(REPO))
        _load_main(sys.argv[2:])
    else:
        sys.exit("usage: python tests/test_multinode_chain.py load s3://.../hf [--s3-endpoint URL]")
