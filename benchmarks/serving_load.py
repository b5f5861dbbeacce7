"""Load test of ``hub serving`` on loopback: throughput and latency with and without micro-batching.

For each mode it starts ``hub serving start`` as a subprocess on a free 127.0.0.1 port, fires
``--requests`` predictions of the real photos examples/chelsea.jpg and examples/coffee.jpg
(alternating) from ``--concurrency`` client threads, and reports requests per second, latency
percentiles, the batch sizes the server ran, and whether every request came back 200 with the
right top-1 (cat 281/282/285, espresso 967). It stops by itself: after the request count, or
after ``--max-seconds`` per mode, whichever comes first.

With ``--runtimes torch,auto`` each mode runs once per server runtime (``hub serving start --runtime``),
side by side, and the throughput of each runtime is reported against the first one's. ``--rounds N``
repeats every (mode, runtime) N times, interleaved, and reports the best of each (background load on a
shared machine hits all alike). "cpu ms/req" is the server process's user + system CPU time per request:
unlike req/s it does not depend on how much of a shared machine the server gets.

    python benchmarks/serving_load.py --requests 200 --concurrency 16 [--runtimes torch,auto] [--json out.json]
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


def run_mode(batching: bool, runtime: str, args) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "hubkit.cli", "serving", "start", "-m", MODULE, "-p", str(port),
               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--precision", args.precision,
               "--runtime", runtime]
    if not batching:
        command.append("--no-batching")
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "HUBKIT_DISABLE_PROGRESS": "1"})
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", timeout=600, process=server)
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

        cpu_start, wall_start = cpu_seconds(server.pid), time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(one, range(args.requests)))
        wall, server_cpu = time.perf_counter() - wall_start, cpu_seconds(server.pid) - cpu_start
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
    return {"mode": "batching" if batching else "no batching", "runtime": runtime, "precision": args.precision, "requests": args.requests, "sent": len(sent),
            "ok": len(sent) - len(failures), "lost": args.requests - (len(sent) - len(failures)),
            "failures": failures[:5], "concurrency": args.concurrency, "wall_s": round(wall, 3),
            "throughput_rps": round(len(sent) / wall, 2),
            "server_cpu_ms_per_request": round(1000 * server_cpu / max(1, len(sent)), 1),
            "latency_ms": {f"p{q}": round(1000 * percentile(latencies, q), 1) for q in (50, 90, 99)} if latencies else {},
            "latency_mean_ms": round(1000 * statistics.fmean(latencies), 1) if latencies else None,
            "server_batches": batch_stats}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    parser.add_argument("--runtimes", default="auto", help="comma-separated server runtimes: torch, auto, openvino, "
                                                               "onnxruntime (each mode runs on each, side by side)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every (mode, runtime): the one "
                                                                 "with the best throughput is reported")
    parser.add_argument("--json", dest="json_path", help="also write the results as JSON here")
    args = parser.parse_args()
    runtimes = args.runtimes.split(",")
    cases = [(mode, runtime) for mode in args.modes.split(",") for runtime in runtimes]
    rounds = [[run_mode(mode == "batching", runtime, args) for mode, runtime in cases] for _ in range(args.rounds)]
    results = []
    for i in range(len(cases)):
        best = max((each[i] for each in rounds), key=lambda r: r["throughput_rps"])
        results.append({**best, "rounds_rps": [each[i]["throughput_rps"] for each in rounds]})
    print(f"{'mode':<12} {'runtime':<12} {'sent':>5} {'ok':>5} {'lost':>5} {'req/s':>7} {'vs ' + runtimes[0]:>10} "
          f"{'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'mean batch':>10} {'largest':>7} {'cpu ms/req':>10}")
    first = {r["mode"]: r["throughput_rps"] for r in results if r["runtime"] == runtimes[0]}
    for r in results:
        lat, b = r["latency_ms"], r["server_batches"]
        ratio = f"{r['throughput_rps'] / first[r['mode']]:.2f}x" if first[r["mode"]] else "-"
        print(f"{r['mode']:<12} {r['runtime']:<12} {r['sent']:>5} {r['ok']:>5} {r['lost']:>5} {r['throughput_rps']:>7} "
              f"{ratio:>10} {lat.get('p50', '-'):>8} {lat.get('p90', '-'):>8} {lat.get('p99', '-'):>8} "
              f"{b['mean_batch']:>10} {b['largest_batch']:>7} {r['server_cpu_ms_per_request']:>10}")
        if len(r["rounds_rps"]) > 1:
            print(f"  req/s in each round: {', '.join(map(str, r['rounds_rps']))}")
        for failure in r["failures"]:
            print(f"  failed: {failure}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["lost"] == 0 for each in rounds for r in each) else 1


if __name__ == "__main__":
    sys.exit(main())
