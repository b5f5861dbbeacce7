"""``hub search`` over the whole catalogue (~1,800 modules): its wall time against the floor of a
fresh Python process, the 9-module registry alone, and the plain way (``timm.list_models``).

    python benchmarks/bench_search.py [--rounds 5] [--quick] [--json]

Every command runs as the user runs it (a new Python process, bytecode already compiled as an
installed package has it), all of them round-robin in one loop so that background load hits each
alike; the median of the rounds is the figure, the best is shown beside it. The commands:
``python -c pass`` (the floor: no fresh process is faster), ``hub search`` over the catalogue,
the same with ``HUBKIT_CATALOGUE=off`` (the built-in registry only, what `hub search` searched
before the catalogue), ``hub --help``, and a search of timm's pretrained tags with timm itself.
It also times the search itself in this process (the catalogue read and parsed from cold, then
ranked), and checks that neither ``hub search`` nor ``hub --help`` imports torch.
Target: ``hub search`` over the catalogue <= 0.3 s (median), no torch.
"""
from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    Report,
    Target,
    hub_argv,
    hub_env,
    imported_modules,
    interleaved,
    interleaved_processes,
    machine,
    parser,
    prepared_home,
    run_script,
)

from hubkit import constants  # noqa: E402
from hubkit.hub import catalogue, registry  # noqa: E402

QUERIES = {"hub search vit": ("search", "vit"),
           "hub search --headless --max-params 30M": ("search", "--headless", "--max-params", "30M")}
FLOOR = "python -c pass"
#: The plain way to find pretrained ViTs without hubkit: timm's own list (it imports torch).
PLAIN = "timm.list_models('*vit*', pretrained=True)"
REGISTRY_ONLY = {"HUBKIT_CATALOGUE": "off"}


def _in_process(catalogue_setting: str | None, keyword: str) -> int:
    """One cold search in this process: the catalogue file read and parsed again, then ranked."""
    constants.HUBKIT_CATALOGUE = catalogue_setting
    catalogue._load.cache_clear()
    catalogue._read_gzip_json.cache_clear()
    return len(registry.search(keyword))


def _commands() -> tuple[dict[str, list[str]], dict[str, dict]]:
    """Every command timed, and the variables some of them run with on top of the benchmark's."""
    commands = {FLOOR: [sys.executable, "-c", "pass"]}
    envs = {}
    for name, args in QUERIES.items():
        commands[f"{name} (catalogue)"] = hub_argv(*args)
    for name, args in QUERIES.items():
        commands[f"{name} (registry only)"] = hub_argv(*args)
        envs[f"{name} (registry only)"] = REGISTRY_ONLY
    commands["hub --help"] = hub_argv("--help")
    commands[PLAIN] = [sys.executable, "-c", f"import timm; {PLAIN}"]
    return commands, envs


def _modules_searched() -> dict[str, int]:
    import timm

    return {"catalogue": len(registry.all_entries()),
            "registry only": len(registry.all_entries(registry.default_registries())),
            PLAIN: len(timm.list_pretrained())}


def main(argv=None) -> Report:
    p = parser(__doc__.split("\n\n")[0])
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    # Measure what an installed hubkit does: with its bytecode cached (an environment that forbids
    # writing .pyc, as some CI images do, would make every run recompile hubkit's sources: +0.1 s).
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    env = hub_env(prepared_home(args.home))
    commands, envs = _commands()
    report = Report("search", "hub search: the catalogue (~1,800 modules) vs the floor, the registry alone and timm, "
                    "fresh process each", ["command", "modules searched", "wall s (median)", "wall s (best)",
                                           "median above floor s", "CPU s (median)", "imports torch"],
                    machine=machine("cpu"))
    interleaved_processes(commands, 1, env, envs)  # untimed: writes the bytecode, warms the page cache
    runs = interleaved_processes(commands, rounds, env, envs)
    sizes = _modules_searched()
    floor = statistics.median(r.wall_s for r in runs[FLOOR])
    medians = {}
    for name, timed in runs.items():
        which = "registry only" if "registry only" in name else "catalogue" if "(catalogue)" in name else name
        torch_imported = None
        if name.startswith("hub "):
            torch_imported = "torch" in imported_modules(commands[name][1:], env={**env, **envs.get(name, {})})
        medians[name] = statistics.median(r.wall_s for r in timed)
        report.rows.append([name, sizes.get(which, ""), medians[name], min(r.wall_s for r in timed),
                            medians[name] - floor, statistics.median(r.cpu_s for r in timed),
                            {None: "", True: "YES", False: "no"}[torch_imported]])
        if name.startswith("hub "):
            report.targets.append(Target(f"{name} imports torch (1 = yes)", float(torch_imported), "<=", 0, ""))
        if name.endswith("(catalogue)"):
            report.targets.append(Target(f"{name} median wall time", medians[name], "<=", 0.3, " s"))
    timings = interleaved({"catalogue": lambda: _in_process(None, "vit"), "registry only": lambda: _in_process("off", "vit")},
                          rounds * 4)
    for which, seconds in timings.items():
        report.rows.append([f"search('vit') in-process, cold ({which})", sizes[which], statistics.median(seconds),
                            min(seconds), "", "", "no"])
    constants.HUBKIT_CATALOGUE = None
    search, alone = medians["hub search vit (catalogue)"], medians["hub search vit (registry only)"]
    report.notes.append(f"hub search vit: {search / medians[PLAIN]:.3f}x the time of {PLAIN} "
                        f"({medians[PLAIN] / search:.0f}x faster); the catalogue costs {search - alone:+.3f} s "
                        f"over the registry alone; {search - floor:.3f} s above a bare `python -c pass`")
    report.notes.append(f"medians of {rounds} interleaved rounds of fresh processes; load average "
                        f"{report.machine['load_average'][0]:.2f} at start, {os.getloadavg()[0]:.2f} at end "
                        f"(on {os.cpu_count()} cores)")
    return report


if __name__ == "__main__":
    run_script(main)
