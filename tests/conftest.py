"""Shared fixtures: a real local 2-node Ray cluster (started with the `ray` CLI, as a user would,
once per test module) and a real S3-compatible server (moto) on loopback (once per session)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import free_port, stop_ray_processes, wait_for_job_agent

REPO_ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.endpoint_url})


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on loopback, with credentials in the environment (inherited by Ray jobs
    started later) and one empty bucket."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="cllm-test")
    yield S3Server(endpoint_url=endpoint, bucket="cllm-test")
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@dataclass
class RayCluster:
    address: str  # GCS address, for ray.init(address=...)
    dashboard_url: str  # for `ray job submit --address ...`

    def submit(self, *args: str, timeout: float = 900, job_env: dict | None = None) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir . -- <args>`, exactly as the README shows; `job_env` goes
        into the job's runtime environment (the job's own processes, not the submitting one)."""
        runtime_env = ["--runtime-env-json", json.dumps({"env_vars": job_env})] if job_env else []
        command = [RAY, "job", "submit", "--address", self.dashboard_url, "--working-dir", ".", *runtime_env,
                   "--", *args]
        return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """A local 2-node Ray cluster started with the `ray start` CLI, as a user would: a head node
    with the job server for `ray job submit`, and a second node, each with 2 logical CPUs and a
    small object store, all on loopback. Its processes inherit the S3 credentials of `s3_server`.

    The nodes keep their files in a directory of their own, and the teardown kills only the
    processes of this cluster (`ray stop` would end every Ray process on the machine)."""
    # Ray turns on token auth once ~/.ray/auth_token exists (any local ray.init writes it), and a
    # second `ray start --address` does not pick the token up; drivers and jobs inherit this too.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # The venv's bin first, so a job's `python` is the project's interpreter, as in an activated venv.
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    port, dashboard_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="cllm-ray-", dir="/tmp")  # short: Ray's socket paths live here
    node = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--temp-dir", temp_dir,
            "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats"]
    # Each node's agent listens on a port of its own: the default (52365) is fixed, and a node that
    # finds it taken (by any other Ray on the machine) runs without a job agent.
    try:
        subprocess.run(
            [RAY, "start", "--head", "--port", str(port), "--include-dashboard", "true",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
             "--dashboard-agent-listen-port", str(free_port()), *node],
            check=True, capture_output=True, env=env,
        )
        address = f"127.0.0.1:{port}"
        subprocess.run([RAY, "start", "--address", address, "--dashboard-agent-listen-port", str(free_port()), *node],
                       check=True, capture_output=True, env=env)
        dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        wait_for_job_agent(dashboard_url, env)
        yield RayCluster(address=address, dashboard_url=dashboard_url)
    finally:
        stop_ray_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
