"""``hub search``, ``hub list`` and ``hub show``: wall time of a fresh process, and proof that
none of them imports torch.

    python benchmarks/bench_cli_registry.py [--rounds 5] [--quick] [--json]

Each command runs as the user runs it (a new Python process), round-robin with
``python -c pass`` and ``python -c "import torch"`` for scale; the best wall time is
reported. Target: each command <= 0.5 s.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MODULE,
    Report,
    Target,
    hub_argv,
    hub_env,
    imported_modules,
    interleaved_processes,
    machine,
    parser,
    prepared_home,
    run_script,
)

COMMANDS = {"hub search lite": ("search", "lite"), "hub list": ("list",), f"hub show {MODULE}": ("show", MODULE)}


def main(argv=None) -> Report:
    p = parser(__doc__.split("\n\n")[0])
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    env = hub_env(prepared_home(args.home))
    commands = {"python -c pass": [sys.executable, "-c", "pass"],
                "python -c 'import torch'": [sys.executable, "-c", "import torch"],
                **{name: hub_argv(*a) for name, a in COMMANDS.items()}}
    runs = interleaved_processes(commands, rounds, env)
    report = Report("cli_registry", "registry commands: hub search / list / show, fresh process each time",
                    ["command", "wall s (best)", "wall s (median)", "peak RSS MiB", "imports torch"], machine=machine("cpu"))
    for name, rs in runs.items():
        torch_imported = None
        if name in COMMANDS:
            torch_imported = "torch" in imported_modules(["-m", "hubkit.cli", *COMMANDS[name]], env=env)
        best = min(r.wall_s for r in rs)
        report.rows.append([name, best, statistics.median(r.wall_s for r in rs), min(r.max_rss_mib for r in rs),
                            {None: "", True: "YES", False: "no"}[torch_imported]])
        if name in COMMANDS:
            report.targets.append(Target(f"{name} wall time", best, "<=", 0.5, " s"))
            report.targets.append(Target(f"{name} imports torch (1 = yes)", float(torch_imported), "<=", 0, ""))
    report.notes.append(f"{rounds} interleaved rounds; `import torch` alone shown for scale")
    return report


if __name__ == "__main__":
    run_script(main)
