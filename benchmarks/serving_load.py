"""Load test of ``hub serving`` on loopback: throughput and latency with and without micro-batching.

For each mode it starts ``hub serving start`` as a subprocess on a free 127.0.0.1 port, fires
``--requests`` predictions of the real photos examples/chelsea.jpg and examples/coffee.jpg
(alternating) from ``--concurrency`` client threads, and reports requests per second, latency
percentiles, the batch sizes the server ran, and whether every request came back 200 with the
right top-1 (cat 281/282/285, espresso 967). It stops by itself: after the request count, or
after ``--max-seconds`` per mode, whichever comes first.

    python benchmarks/serving_load.py --requests 200 --concurrency 16 [--json out.json]
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hubkit.serving import free_port, wait_until_ready

REPO = Path(__file__).resolve().parent.parent
PHOTOS = [(REPO / "examples" / "chelsea.jpg", {281, 282, 285}), (REPO / "examples" / "coffee.jpg", {967})]
MODULE = "efficientnet_lite0"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_mode(batching: bool, args) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "hubkit.cli", "serving", "start", "-m", MODULE, "-p", str(port),
               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--precision", args.precision]
    if not batching:
        command.append("--no-batching")
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "HUBKIT_DISABLE_PROGRESS": "1"})
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", timeout=120, process=server)
        bodies = [json.dumps({"image": base64.b64encode(p.read_bytes()).decode(), "top_k": 1}) for p, _ in PHOTOS]
        local = threading.local()
        stop_at = time.monotonic() + args.max_seconds

        def one(i: int):
            if time.monotonic() > stop_at:
                return None  # over the time budget: not sent
            if not hasattr(local, "conn"):
                local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            start = time.perf_counter()
            try:
                local.conn.request("POST", f"/v1/modules/{MODULE}/predict", body=bodies[i % 2],
                                   headers={"Content-Type": "application/json"})
                response = local.conn.getresponse()
                payload = json.loads(response.read())
                status = response.status
            except (OSError, http.client.HTTPException, ValueError) as exc:
                local.__dict__.pop("conn", None)
                return time.perf_counter() - start, False, f"{type(exc).__name__}: {exc}"
            elapsed = time.perf_counter() - start
            ok = status == 200 and payload["top_k"][0]["index"] in PHOTOS[i % 2][1]
            return elapsed, ok, None if ok else f"status {status}: {payload}"

        wall_start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - wall_start
        batch_stats = get_json(f"http://127.0.0.1:{port}/v1/stats")[MODULE]
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    sent = [r for r in results if r is not None]
    latencies = [r[0] for r in sent]
    failures = [r[2] for r in sent if not r[1]]
    return {"mode": "batching" if batching else "no batching", "precision": args.precision, "requests": args.requests, "sent": len(sent),
            "ok": len(sent) - len(failures), "lost": args.requests - (len(sent) - len(failures)),
            "failures": failures[:5], "concurrency": args.concurrency, "wall_s": round(wall, 3),
            "throughput_rps": round(len(sent) / wall, 2),
            "latency_ms": {f"p{q}": round(1000 * percentile(latencies, q), 1) for q in (50, 90, 99)} if latencies else {},
            "latency_mean_ms": round(1000 * statistics.fmean(latencies), 1) if latencies else None,
            "server_batches": batch_stats}


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per mode")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads sending at once")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="the server's precision")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="stop sending after this long per mode")
    parser.add_argument("--modes", default="batching,no-batching", help="comma-separated: batching, no-batching")
    parser.add_argument("--json", dest="json_path", help="also write the results as JSON here")
    args = parser.parse_args()
    results = [run_mode(mode == "batching", args) for mode in args.modes.split(",")]
    print(f"{'mode':<12} {'sent':>5} {'ok':>5} {'lost':>5} {'req/s':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
          f"{'mean batch':>10} {'largest':>7}")
    for r in results:
        lat, b = r["latency_ms"], r["server_batches"]
        print(f"{r['mode']:<12} {r['sent']:>5} {r['ok']:>5} {r['lost']:>5} {r['throughput_rps']:>7} {lat.get('p50', '-'):>8} "
              f"{lat.get('p90', '-'):>8} {lat.get('p99', '-'):>8} {b['mean_batch']:>10} {b['largest_batch']:>7}")
        for failure in r["failures"]:
            print(f"  failed: {failure}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["lost"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
