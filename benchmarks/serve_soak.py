"""Soak test of the server with replicas killed under load: does any request get lost?

Starts `serve run` on a config derived from serve/config.yaml (CPU, `--replicas` decoder
replicas), drives it for `--duration-s` with `--clients` closed-loop clients (streamed and not,
greedy and seeded-sampled, some disconnecting mid-reply), and SIGKILLs one decoder replica every
`--kill-every-s`, as a reclaimed node or an out-of-memory kill would. Then it replays a sample of
the greedy requests one at a time, with nothing killed, and compares the texts. It reports:

- requests sent, completed, abandoned by their client on purpose, and lost (anything else: an
  error status, an error event, a stream without its end);
- greedy replies that differ from the same request sent alone;
- p50/p99 latency of the requests that ended in each kill window;
- the resident memory of each decoder replica (when warm and at its end) and of the ingress;
- the resumptions the ingress counted (`/metrics`).

    python benchmarks/serve_soak.py                      # the toy math teacher, 10 min
    python benchmarks/serve_soak.py --model tiny --duration-s 120 --kill-every-s 30   # quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from helpers import free_port, processes_named, save_tiny_checkpoint  # noqa: E402  (tests/helpers.py)

from cllm.toy import parse_toy_name  # noqa: E402
from cllm.toy.tasks import toy_prompts  # noqa: E402

APP = "soak"


@dataclass
class Outcome:
    kind: str  # "completed", "abandoned" or "lost"
    ended_s: float  # since the soak started
    latency_s: float
    stream: bool
    greedy: bool
    prompt: str
    max_tokens: int
    text: str = ""
    why: str = ""


@dataclass
class Replica:
    pid: int
    first_seen: float  # monotonic
    warm_rss_mb: float | None = None
    last_rss_mb: float | None = None
    killed: bool = False


@dataclass
class Soak:
    outcomes: list[Outcome] = field(default_factory=list)
    replicas: dict[int, Replica] = field(default_factory=dict)
    ingress_rss_mb: list[float] = field(default_factory=list)
    kills: int = 0


def rss_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


def serve_config(model: str, port: int, replicas: int) -> dict:
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["name"] = APP
    app["args"].update(model=model, served_model_name="soak", num_gpus=0)
    for deployment in app["deployments"]:
        if deployment["name"] == "Decoder":
            deployment["autoscaling_config"].update(min_replicas=replicas, max_replicas=replicas)
            deployment["ray_actor_options"].update(num_cpus=0.5, num_gpus=0)
    return config


async def one_request(client: httpx.AsyncClient, prompt: str, rng: random.Random, started: float,
                      args) -> Outcome:
    stream, greedy = rng.random() < 0.5, rng.random() < 0.7
    max_tokens = rng.randint(16, args.max_tokens)
    body = {"model": "soak", "prompt": prompt, "max_tokens": max_tokens, "stream": stream}
    if not greedy:
        body.update(temperature=0.8, seed=rng.randrange(2**31))
    leave_after = rng.uniform(0.05, 1.0) if rng.random() < args.disconnect_share else None
    sent = time.monotonic()

    def outcome(kind: str, text: str = "", why: str = "") -> Outcome:
        now = time.monotonic()
        return Outcome(kind, now - started, now - sent, stream, greedy, prompt, max_tokens, text, why)

    try:
        async with asyncio.timeout(leave_after):  # None: stays to the end
            if not stream:
                reply = await client.post("/v1/completions", json=body)
                if reply.status_code != 200:
                    return outcome("lost", why=f"status {reply.status_code}: {reply.text[:200]}")
                return outcome("completed", reply.json()["choices"][0]["text"])
            text, finished, done = "", False, False
            async with client.stream("POST", "/v1/completions", json=body) as reply:
                if reply.status_code != 200:
                    return outcome("lost", why=f"status {reply.status_code}")
                async for line in reply.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line.removeprefix("data: "))
                        if "error" in chunk:
                            return outcome("lost", why=f"error event: {chunk['error']['message']}")
                        text += chunk["choices"][0]["text"]
                        finished = finished or chunk["choices"][0]["finish_reason"] is not None
            if not (finished and done):
                return outcome("lost", why="the stream ended without its finish_reason and [DONE]")
            return outcome("completed", text)
    except TimeoutError:
        return outcome("abandoned")
    except httpx.HTTPError as error:
        return outcome("lost", why=f"{type(error).__name__}: {error}")


async def clients(url: str, prompts: list[str], soak: Soak, started: float, args) -> None:
    deadline = started + args.duration_s

    async def client_loop(index: int) -> None:
        rng = random.Random(args.seed * 1000 + index)
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            while time.monotonic() < deadline:
                soak.outcomes.append(await one_request(client, rng.choice(prompts), rng, started, args))

    await asyncio.gather(*(client_loop(index) for index in range(args.clients)))


async def killer(soak: Soak, started: float, args) -> None:
    """Every `kill_every_s`, SIGKILL the oldest decoder replica; meanwhile sample memory."""
    next_kill = started + args.kill_every_s
    while time.monotonic() < started + args.duration_s:
        await asyncio.sleep(2)
        for pid in processes_named(f"ServeReplica:{APP}:Decoder"):
            replica = soak.replicas.setdefault(pid, Replica(pid, time.monotonic()))
            rss = rss_mb(pid)
            if rss is not None:
                replica.last_rss_mb = rss
                if replica.warm_rss_mb is None and time.monotonic() > replica.first_seen + args.warmup_s:
                    replica.warm_rss_mb = rss  # once it has loaded the model and served for a while
        for pid in processes_named(f"ServeReplica:{APP}:OpenAIIngress"):
            if (rss := rss_mb(pid)) is not None:
                soak.ingress_rss_mb.append(rss)
        if time.monotonic() >= next_kill and time.monotonic() < started + args.duration_s - 10:
            alive = [replica for replica in soak.replicas.values() if not replica.killed and rss_mb(replica.pid)]
            if alive:
                victim = min(alive, key=lambda replica: replica.pid)
                os.kill(victim.pid, signal.SIGKILL)
                victim.killed, soak.kills = True, soak.kills + 1
                print(f"[{time.monotonic() - started:6.0f} s] killed decoder replica pid {victim.pid}", flush=True)
            next_kill += args.kill_every_s


async def progress(soak: Soak, started: float, args) -> None:
    while time.monotonic() < started + args.duration_s:
        await asyncio.sleep(30)
        kinds = [outcome.kind for outcome in soak.outcomes]
        print(f"[{time.monotonic() - started:6.0f} s] completed {kinds.count('completed')}, abandoned "
              f"{kinds.count('abandoned')}, lost {kinds.count('lost')}", flush=True)


def alone(url: str, outcomes: list[Outcome], sample: int, seed: int) -> tuple[int, int]:
    """Greedy completed replies checked against the same request sent alone: (checked, differ)."""
    greedy = [outcome for outcome in outcomes if outcome.kind == "completed" and outcome.greedy]
    random.Random(seed).shuffle(greedy)
    differ = 0
    with httpx.Client(base_url=url, timeout=300) as client:
        for outcome in greedy[:sample]:
            body = {"model": "soak", "prompt": outcome.prompt, "max_tokens": outcome.max_tokens}
            text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
            differ += text != outcome.text
    return min(sample, len(greedy)), differ


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def report(soak: Soak, checked: int, differ: int, resumptions: float, args) -> dict:
    kinds = [outcome.kind for outcome in soak.outcomes]
    print(f"\nrequests sent {len(kinds)}: completed {kinds.count('completed')}, abandoned by their client "
          f"{kinds.count('abandoned')}, lost {kinds.count('lost')} (goal 0)")
    for outcome in [outcome for outcome in soak.outcomes if outcome.kind == "lost"][:5]:
        print(f"  lost: {outcome.why}")
    print(f"replicas killed {soak.kills}; resumptions counted by the ingress {resumptions:.0f}")
    print(f"greedy replies that differ from the request sent alone: {differ} of {checked} checked (goal 0)")
    print("\n| window | completed | p50 latency | p99 latency |\n|---|---:|---:|---:|")
    windows = []
    for start in range(0, int(args.duration_s), int(args.kill_every_s)):
        ended = [outcome.latency_s for outcome in soak.outcomes
                 if outcome.kind == "completed" and start <= outcome.ended_s < start + args.kill_every_s]
        windows.append({"from_s": start, "completed": len(ended), "p50_s": percentile(ended, 0.5),
                        "p99_s": percentile(ended, 0.99)})
        print(f"| {start}-{start + int(args.kill_every_s)} s | {len(ended)} | {percentile(ended, 0.5):.2f} s | "
              f"{percentile(ended, 0.99):.2f} s |")
    print("\n| process | RSS warm | RSS at end | growth |\n|---|---:|---:|---:|")
    for replica in soak.replicas.values():
        if replica.warm_rss_mb and replica.last_rss_mb:
            growth = replica.last_rss_mb / replica.warm_rss_mb - 1
            state = "killed" if replica.killed else "alive at the end"
            print(f"| decoder {replica.pid} ({state}) | {replica.warm_rss_mb:.0f} MB | {replica.last_rss_mb:.0f} MB | "
                  f"{growth:+.1%} |")
    warm_samples = soak.ingress_rss_mb[len(soak.ingress_rss_mb) // 5 :] or soak.ingress_rss_mb
    if warm_samples:
        print(f"| ingress | {warm_samples[0]:.0f} MB | {warm_samples[-1]:.0f} MB | "
              f"{warm_samples[-1] / warm_samples[0] - 1:+.1%} |")
    return {
        "sent": len(kinds), "completed": kinds.count("completed"), "abandoned": kinds.count("abandoned"),
        "lost": kinds.count("lost"), "kills": soak.kills, "resumptions": resumptions,
        "greedy_checked": checked, "greedy_differ": differ, "windows": windows,
        "replicas": [asdict(replica) for replica in soak.replicas.values()],
        "ingress_rss_mb": [warm_samples[0], warm_samples[-1]] if warm_samples else None,
    }


def wait_until_ready(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"serve run exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit(f"the server was not ready within {timeout_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy", help="toy (the math teacher), tiny (a random model) or a path")
    parser.add_argument("--duration-s", type=float, default=600)
    parser.add_argument("--kill-every-s", type=float, default=120)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--disconnect-share", type=float, default=0.1, help="requests whose client leaves early")
    parser.add_argument("--warmup-s", type=float, default=30, help="a replica's memory counts from then on")
    parser.add_argument("--verify", type=int, default=200, help="greedy replies replayed alone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the figures as JSON here")
    args = parser.parse_args()

    workdir = tempfile.TemporaryDirectory()
    model = args.model
    if model == "tiny":
        model = str(Path(workdir.name) / "tiny")
        save_tiny_checkpoint(model, with_eos=False)
        prompts = [" ".join(f"t{random.Random(i).randrange(3, 128)}" for _ in range(6)) for i in range(200)]
    else:  # the toy domain's held-out prompts (math's for a model of your own)
        toy = parse_toy_name(model)
        prompts = [example.prompt for example in toy_prompts("heldout", toy.domain if toy else "math", limit=200)]
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    config = Path(workdir.name) / "serve.yaml"
    config.write_text(yaml.safe_dump(serve_config(model, port, args.replicas)))
    serve = str(Path(sys.executable).with_name("serve"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # a private local Ray, never a cluster running here
    log = open(Path(workdir.name) / "serve.log", "w")  # noqa: SIM115 - open for the server's lifetime
    server = subprocess.Popen([serve, "run", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    try:
        wait_until_ready(url.rstrip("/"), server, timeout_s=600)
        print(f"serving {args.model} on {url} with {args.replicas} decoder replicas; {args.clients} clients for "
              f"{args.duration_s:.0f} s, a replica killed every {args.kill_every_s:.0f} s", flush=True)
        soak, started = Soak(), time.monotonic()

        async def run() -> None:
            await asyncio.gather(clients(url, prompts, soak, started, args), killer(soak, started, args),
                                 progress(soak, started, args))

        asyncio.run(run())
        checked, differ = alone(url, soak.outcomes, args.verify, args.seed)
        metrics = httpx.get(f"{url}metrics", timeout=30).text
        resumptions = float(re.search(r"^cllm_resumptions_total (\S+)$", metrics, re.MULTILINE).group(1))
        figures = report(soak, checked, differ, resumptions, args)
        if args.output:
            Path(args.output).write_text(json.dumps(figures, indent=2))
    finally:
        os.killpg(server.pid, signal.SIGINT)  # serve run shuts the applications and its Ray down
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


if __name__ == "__main__":
    main()
