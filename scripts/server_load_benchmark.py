"""Load benchmark for `kinetoscope serve`: while videos generate, N clients poll video status and M
clients create videos, all through OpenAI's own (async) client. Reports p50/p99 latency of the
status requests, which must stay fast while the CPU is busy generating, and checks that every
job completed.

    .venv/bin/python scripts/server_load_benchmark.py                       # the shipped model
    .venv/bin/python scripts/server_load_benchmark.py --weights DIR --size 64x64 --seconds 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

import openai

from kinetoscope.cli import main as kinetoscope

warnings.filterwarnings("ignore", category=DeprecationWarning)  # OpenAI's client marks its Videos API deprecated


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="generator folder (default: the shipped model)")
    parser.add_argument("--pollers", type=int, default=50)
    parser.add_argument("--creators", type=int, default=10)
    parser.add_argument("--videos-per-creator", type=int, default=2)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--seconds", default="2")
    parser.add_argument("--steps", type=int, help="sampling steps per video (default: the model's own)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--poll-interval", type=float, default=0.25, help="seconds between one poller's requests")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args, data: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "kinetoscope", "serve", "--port", str(port), "--data", str(data),
               "--workers", str(args.workers), "--log-level", "warning",
               "--rate-limit", "1000000", "--max-concurrent", "1000", "--quota", "1000000"]
    if args.steps is not None:
        command += ["--steps", str(args.steps)]
    if args.weights:
        command += ["--weights", args.weights]
    server = subprocess.Popen(command)
    for _ in range(600):
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return server
        if server.poll() is not None:
            sys.exit("the server did not start")
        time.sleep(0.2)
    server.terminate()
    sys.exit("the server did not start in two minutes")


def create_key(data: Path, name: str) -> str:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        kinetoscope(["keys", "create", "--name", name, "--data", str(data)])
    return output.getvalue().splitlines()[-1]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run_load(args, base_url: str, keys: list[str]) -> dict:
    clients = [openai.AsyncOpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=60) for key in keys]
    videos: list[list[str]] = [[] for _ in keys]  # per creator, the ids made so far
    status_latencies: list[float] = []
    create_latencies: list[float] = []
    errors: list[str] = []
    creators_done = asyncio.Event()

    async def creator(index: int):
        client = clients[index]
        for number in range(args.videos_per_creator):
            start = time.perf_counter()
            try:
                video = await client.videos.create(prompt=f"a red circle moves to the right, clip {number}",
                                                   size=args.size, seconds=args.seconds)
            except openai.APIError as error:
                errors.append(f"create: {error}")
                continue
            create_latencies.append(time.perf_counter() - start)
            videos[index].append(video.id)

    async def poller(index: int):
        creator_index = index % len(clients)
        client = clients[creator_index]
        while not creators_done.is_set():
            if videos[creator_index]:
                start = time.perf_counter()
                try:
                    await client.videos.retrieve(random.choice(videos[creator_index]))
                    status_latencies.append(time.perf_counter() - start)
                except openai.APIError as error:
                    errors.append(f"retrieve: {error}")
            await asyncio.sleep(args.poll_interval)

    async def all_finished() -> list:
        finals = []
        for client, ids in zip(clients, videos):
            for video_id in ids:
                while (video := await client.videos.retrieve(video_id)).status in ("queued", "in_progress"):
                    await asyncio.sleep(0.5)
                finals.append(video)
        return finals

    started = time.perf_counter()
    pollers = [asyncio.create_task(poller(index)) for index in range(args.pollers)]
    await asyncio.gather(*(creator(index) for index in range(len(clients))))
    finals = await all_finished()
    creators_done.set()
    await asyncio.gather(*pollers)
    return {"wall": time.perf_counter() - started, "status": status_latencies, "create": create_latencies,
            "finals": finals, "errors": errors}


def latencies(seconds: list[float], with_max: bool = False) -> str:
    """How many, p50 and p99 (and the slowest); a run whose jobs finished before any poll has none."""
    if not seconds:
        return "0"
    ms = lambda value: f"{value * 1000:.1f} ms"  # noqa: E731
    text = f"{len(seconds)}, p50 {ms(statistics.median(seconds))}, p99 {ms(percentile(seconds, 0.99))}"
    return text + (f", max {ms(max(seconds))}" if with_max else "")


def report(args, result: dict) -> bool:
    status, create, finals = result["status"], result["create"], result["finals"]
    expected = args.creators * args.videos_per_creator
    completed = sum(video.status == "completed" for video in finals)
    steps = args.steps or "the model's own"
    print(f"{args.pollers} polling clients, {args.creators} creating clients, {expected} videos "
          f"({args.size}, {args.seconds} s, {steps} steps, {args.workers} worker(s)) in {result['wall']:.1f} s")
    print(f"status requests: {latencies(status, with_max=True)}")
    print(f"create requests: {latencies(create)}")
    print(f"jobs completed: {completed}/{expected}; failed: {sum(v.status == 'failed' for v in finals)}; "
          f"request errors: {len(result['errors'])}")
    for error in result["errors"][:5]:
        print("  " + error)
    return completed == expected and not result["errors"]


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="kinetoscope-bench-") as folder:
        data, port = Path(folder), free_port()
        keys = [create_key(data, f"creator-{index}") for index in range(args.creators)]
        server = start_server(args, data, port)
        try:
            result = asyncio.run(run_load(args, f"http://127.0.0.1:{port}/v1", keys))
        finally:
            server.terminate()
            server.wait(30)
    return 0 if report(args, result) else 1


if __name__ == "__main__":
    sys.exit(main())
