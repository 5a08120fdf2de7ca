"""Bounded load test of ``retclip serve`` on loopback.

Starts a server (toy backbone, regions proposer) on a free 127.0.0.1 port in a subprocess, runs
``--clients`` concurrent clients for ``--seconds`` (each alternating POST /segment and, every
``--rescore-every``-th request, POST /rescore), requires zero errors, and appends p50/p95 latency,
throughput and the server's peak RSS (VmHWM) to ``bench/RESULTS.md``.

    OMP_NUM_THREADS=1 python bench/load_test.py --clients 4 --seconds 20
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from retclip.toyworld.world import generate_scenes

RESULTS = Path(__file__).with_name("RESULTS.md")


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rescore-every", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=1, help="server --concurrency")
    parser.add_argument("--batch", type=int, default=4, help="server --batch")
    parser.add_argument("--size", type=int, default=96, help="image side (toy scenes, tiled)")
    args = parser.parse_args()
    if not (1 <= args.clients <= 64 and 0 < args.seconds <= 600):
        parser.error("--clients must lie in 1..64 and --seconds in (0, 600]")

    scenes = generate_scenes("val", 8, seed=11)
    reps = -(-args.size // 96)
    images = [_png(np.tile(s.image, (reps, reps, 1))[: args.size, : args.size]) for s in scenes]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = tempfile.mkdtemp(prefix="retclip-load-")
    server_args = ["--port", str(port), "--data-dir", data_dir, "--queue", "256"]
    server_args += ["--concurrency", str(args.concurrency), "--batch", str(args.batch)]
    code = "import sys; from retclip.cli.serve import serve; serve(sys.argv[1:])"
    server = subprocess.Popen(
        [sys.executable, "-c", code, *server_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)

        latencies: dict[str, list[float]] = {"segment": [], "rescore": []}
        errors: list[str] = []
        lock = threading.Lock()
        stop = time.monotonic() + args.seconds

        def client(index: int) -> None:
            with httpx.Client(base_url=url, timeout=120) as http:
                n, result_id = 0, None
                while time.monotonic() < stop:
                    n += 1
                    start = time.perf_counter()
                    if result_id is not None and n % args.rescore_every == 0:
                        kind = "rescore"
                        gamma = (n % 11) / 10
                        response = http.post(
                            "/rescore",
                            json={"result_id": result_id, "gamma": gamma, "images": "none"},
                        )
                    else:
                        kind = "segment"
                        files = {"image": ("s.png", images[(index + n) % len(images)])}
                        response = http.post(
                            "/segment",
                            files=files,
                            data={"classes": "circle, square, star, stripes, dots, checks"},
                        )
                    elapsed = time.perf_counter() - start
                    with lock:
                        if response.status_code != 200:
                            errors.append(f"{kind} {response.status_code} {response.text[:200]}")
                            continue
                        latencies[kind].append(elapsed)
                    if kind == "segment":
                        result_id = response.json()["result_id"]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.monotonic() - began
        health = httpx.get(f"{url}/health", timeout=10).json()
        peak = _peak_rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)

    def pct(values: list[float], q: float) -> str:
        if not values:
            return "-"
        if len(values) == 1:
            return f"{values[0] * 1000:.0f}"
        return f"{statistics.quantiles(values, n=100)[q - 1] * 1000:.0f}"

    total = sum(len(v) for v in latencies.values())
    command = "OMP_NUM_THREADS={} python bench/load_test.py {}".format(
        os.environ.get("OMP_NUM_THREADS", "(unset)"), shlex.join(sys.argv[1:])
    )
    row = (
        f"| {time.strftime('%Y-%m-%d')} | {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores | {os.environ.get('OMP_NUM_THREADS', '(unset)')} | "
        f"{args.clients} | {args.seconds:g} | {args.size}² | {len(latencies['segment'])} | "
        f"{pct(latencies['segment'], 50)} / {pct(latencies['segment'], 95)} | "
        f"{len(latencies['rescore'])} | "
        f"{pct(latencies['rescore'], 50)} / {pct(latencies['rescore'], 95)} | "
        f"{total / wall:.1f} | {len(errors)} | {peak:.0f} | "
        f"{health['counters'].get('backbone_passes', 0)} | `{command}` |"
    )
    if not RESULTS.exists():
        RESULTS.write_text(
            "# `retclip serve` load tests (bench/load_test.py)\n\n"
            "Loopback only; server: toy backbone, regions proposer, one model batch at a time "
            "unless the command says otherwise. Latencies in ms (p50 / p95), RSS = the server's "
            "peak resident memory (VmHWM).\n\n"
            "| date | machine | OMP threads | clients | seconds | image | segments | "
            "segment p50/p95 | rescores | rescore p50/p95 | req/s | errors | peak RSS MiB | "
            "backbone passes | command |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        )
    with RESULTS.open("a") as handle:
        handle.write(row + "\n")
    print(row)
    for error in errors[:10]:
        print("error:", error, file=sys.stderr)
    return 1 if errors or not latencies["segment"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
