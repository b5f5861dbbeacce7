"""Run every benchmark, each in its own process, and print their tables (or one JSON document).

    python benchmarks/run_all.py [--quick] [--json] [--only predict,cold_start,...]

Figures taken while other work shares the CPU are noisy: measure on a quiet machine. Every
benchmark compares hubkit with the plain PyTorch/timm way of doing the same job in the same
run, so the ratios hold up better than the absolute figures.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import Report, machine, prepared_home  # noqa: E402

BENCHMARKS = {
    "breakdown": "bench_breakdown.py",
    "predict": "bench_predict.py",
    "cold_start": "bench_cold_start.py",
    "cli_registry": "bench_cli_registry.py",
    "search": "bench_search.py",
    "frozen_finetune": "bench_frozen_finetune.py",
    "full_finetune": "bench_full_finetune.py",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON document with every report")
    p.add_argument("--quick", action="store_true", help="small sizes: checks that everything runs")
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    p.add_argument("--home", default=None, help="a HUBKIT_HOME to use (default: a temporary one, shared by all)")
    args = p.parse_args(argv)
    chosen = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)}")
    home = prepared_home(args.home)
    reports, failures = [], {}
    for name in chosen:
        started = time.perf_counter()
        cmd = [sys.executable, str(HERE / BENCHMARKS[name]), "--json", "--home", str(home)] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            failures[name] = proc.stderr[-3000:]
            print(f"{name}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        report = Report.from_dict(json.loads(proc.stdout))
        reports.append(report)
        if not args.json:
            print(report.render(), f"\n  ({time.perf_counter() - started:.0f} s)\n", flush=True)
    targets = [t for r in reports for t in r.targets]
    if args.json:
        print(json.dumps({"machine": machine(), "reports": [r.to_dict() for r in reports], "failures": failures}, indent=2))
    else:
        print(f"targets: {sum(t.passed for t in targets)} of {len(targets)} met; {len(failures)} benchmark(s) failed to run")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
