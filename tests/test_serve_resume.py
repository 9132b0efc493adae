"""Decoder replicas that die or drain under load, on a real local Ray with Serve and real HTTP.

Each test kills replica processes with SIGKILL (as a reclaimed node or an out-of-memory kill
would) while requests run, and checks what the client sees: the whole reply, equal to greedy AR
for greedy requests, with the resumptions counted on `/metrics`; or, when no replica can take
the request over, a 503 (or an error event in the stream) within the time bound.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from helpers import Reference, free_port, processes_named, save_tiny_checkpoint

pytestmark = pytest.mark.slow

MAX_TOKENS = 1200  # a few seconds of decoding on this CPU: long enough to be cut mid-way
PROMPT = "t5 t17 t42"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray import serve

    torch.set_num_threads(1)
    path = str(tmp_path_factory.mktemp("tiny-model"))
    save_tiny_checkpoint(path, with_eos=False)  # every reply runs to max_tokens
    port = free_port()
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, object_store_memory=100 * 1024 * 1024, include_dashboard=False,
             _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield {"url": f"http://127.0.0.1:{port}", "model": path, "reference": Reference(path)}
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(name: str, model: str, **settings):
    from ray import serve

    from cllm_serve.app import BuilderArgs, build_app

    args = BuilderArgs(model=model, served_model_name="tiny", n_token=4, num_cpus=0.5, ingress_num_cpus=0.25,
                       **settings)
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")


def decoder_pids(app: str) -> list[int]:
    return processes_named(f"ServeReplica:{app}:Decoder")


def resumptions(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    return float(re.search(r"^cllm_resumptions_total (\S+)$", metrics, re.MULTILINE).group(1))


def body(**fields) -> dict:
    return {"model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS, **fields}


class Stream:
    """A streamed completion read on a thread: its text, events and whether it has started."""

    def __init__(self, url: str, **fields):
        self.started = threading.Event()
        self.text, self.errors, self.finish_reasons, self.usage, self.done = "", [], [], None, False
        self.ended_at = 0.0
        self._thread = threading.Thread(target=self._read, args=(url, body(stream=True, **fields)))
        self._thread.start()

    def _read(self, url: str, payload: dict) -> None:
        payload["stream_options"] = {"include_usage": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=payload, timeout=180) as response:
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    self.done = True
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    self.errors.append(chunk["error"])
                    continue
                for choice in chunk["choices"]:
                    self.text += choice["text"]
                    if choice["finish_reason"]:
                        self.finish_reasons.append(choice["finish_reason"])
                if chunk.get("usage"):
                    self.usage = chunk["usage"]
                if len(self.text) > 200:
                    self.started.set()
        self.ended_at = time.monotonic()
        self.started.set()

    def join(self) -> None:
        self._thread.join(timeout=240)
        assert not self._thread.is_alive()


def wait_for_replicas(app: str, count: int, timeout_s: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = decoder_pids(app)
        if len(pids) == count:
            return pids
        time.sleep(0.5)
    raise AssertionError(f"{app}: {len(decoder_pids(app))} decoder replicas, not {count}")


def test_killing_every_replica_mid_reply_loses_no_request(cluster):
    """Two replicas, four requests (streamed and not, greedy and seeded-sampled), both replicas
    killed mid-way: every client gets its whole reply; greedy ones equal greedy AR exactly."""
    url = f"{cluster['url']}/resume"
    deploy("resume", cluster["model"], min_replicas=2, max_replicas=2, max_ongoing_requests=2, resume_timeout_s=90)
    pids = wait_for_replicas("resume", 2)
    reference = cluster["reference"]
    expected = reference.text(PROMPT, MAX_TOKENS)
    before = resumptions(url)
    with ThreadPoolExecutor(2) as pool:
        greedy_reply = pool.submit(httpx.post, f"{url}/v1/completions", json=body(), timeout=180)
        sampled_reply = pool.submit(httpx.post, f"{url}/v1/completions", json=body(temperature=0.8, seed=7),
                                    timeout=180)
        greedy_stream, sampled_stream = Stream(url), Stream(url, temperature=0.8, seed=11)
        assert greedy_stream.started.wait(60) and sampled_stream.started.wait(60)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        greedy_stream.join()
        sampled_stream.join()
        replies = [greedy_reply.result(), sampled_reply.result()]
    for reply in replies:
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == MAX_TOKENS
    assert replies[0].json()["choices"][0]["text"] == expected
    for stream in (greedy_stream, sampled_stream):
        assert stream.done and not stream.errors and stream.finish_reasons == ["length"]
        assert stream.usage["completion_tokens"] == MAX_TOKENS
    assert greedy_stream.text == expected  # not a token repeated or missing across the seam
    assert resumptions(url) - before == 4  # every request was cut, and resumed once


def test_when_no_replica_can_take_over_the_client_hears_so_in_time(cluster, tmp_path):
    """The only replica dies and its replacements cannot load the model: a stream ends with an
    error event in OpenAI's shape, a non-streamed request gets 503, both within the bound."""
    model = str(tmp_path / "model")
    shutil.copytree(cluster["model"], model)
    url = f"{cluster['url']}/doomed"
    deploy("doomed", model, min_replicas=1, max_replicas=1, max_ongoing_requests=4, resume_timeout_s=5)
    (pid,) = wait_for_replicas("doomed", 1)
    shutil.rmtree(model)  # replacements fail to start
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(httpx.post, f"{url}/v1/completions", json=body(max_tokens=3000), timeout=120)
        stream = Stream(url, max_tokens=3000)
        assert stream.started.wait(60)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        stream.join()
        refused = reply.result()
        waited = time.monotonic() - killed
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "replica_failed"
    assert stream.done and [error["code"] for error in stream.errors] == ["replica_failed"]
    assert not stream.finish_reasons
    assert waited < 5 + 20  # the bound, plus the time to notice the death on 2 busy cores
    from ray import serve

    serve.delete("doomed")


def test_scaling_down_drains_the_streams_of_the_replica_that_stops(cluster):
    """A replica count change while streams run: the stopping replica finishes its streams within
    graceful_shutdown_timeout_s, so nothing needed resuming."""
    url = f"{cluster['url']}/drain"
    settings = dict(max_ongoing_requests=1, graceful_shutdown_timeout_s=120)
    deploy("drain", cluster["model"], min_replicas=2, max_replicas=2, **settings)
    wait_for_replicas("drain", 2)
    before = resumptions(url)
    # One a replica (each takes one request at a time), long enough to outlast the scale-down.
    streams = [Stream(url, max_tokens=3 * MAX_TOKENS), Stream(url, max_tokens=3 * MAX_TOKENS)]
    assert all(stream.started.wait(60) for stream in streams)
    changed_at = time.monotonic()
    deploy("drain", cluster["model"], min_replicas=1, max_replicas=1, **settings)  # returns once drained
    for stream in streams:
        stream.join()
        assert stream.ended_at > changed_at + 1  # it ran on while its replica was told to stop
    expected = cluster["reference"].text(PROMPT, 3 * MAX_TOKENS)
    assert [stream.text for stream in streams] == [expected, expected]
    assert all(stream.finish_reasons == ["length"] and not stream.errors for stream in streams)
    assert resumptions(url) == before  # drained, not killed and resumed
    wait_for_replicas("drain", 1)
