"""Cold start: ``hub run NAME --input_path one.jpg`` as a fresh process against the floor any
tool pays, ``python -c "import torch, timm"`` plus building the model and one forward.

    python benchmarks/bench_cold_start.py [--rounds 5] [--quick] [--json]

Wall time and peak resident memory (the child's own ``ru_maxrss``) of each command, run
round-robin; the best wall time and the smallest peak of each are reported. Targets: hub run
(auto: the compiled runtime, whose artefact is made before the timings) <= 0.25x the floor's wall
time and <= 0.3x its peak memory, and ``--runtime torch`` <= 1.5x / 1.2x. All run on the CPU (a
GPU's start-up would swamp the comparison).
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    EXAMPLES,
    MODULE,
    Report,
    Target,
    hub_argv,
    hub_env,
    interleaved_processes,
    machine,
    parser,
    prepared_home,
    run_process,
    run_script,
)

from hubkit import Module  # noqa: E402
from hubkit.constants import COMPILED_RUNTIMES  # noqa: E402
from hubkit.hub.cache import Cache  # noqa: E402

FLOOR = ("import torch, timm; model = timm.create_model('{arch}').eval(); "
         "torch.set_grad_enabled(False); print(model(torch.randn(1, 3, 224, 224)).argmax().item())")


def main(argv=None) -> Report:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--image", default=str(EXAMPLES / "chelsea.jpg"))
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)

    home = prepared_home(args.home)
    arch = Cache(home).get(MODULE).manifest.architecture
    env = hub_env(home)
    for runtime in COMPILED_RUNTIMES:  # make the artefacts now: conversion is once per install, not a cold start
        Module(name=MODULE, cache=Cache(home), device="cpu", runtime=runtime, precision="fp32").load()
    commands = {
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "python -c 'import torch, timm'": [sys.executable, "-c", "import torch, timm"],
        "floor: import torch, timm + create_model + 1 forward": [sys.executable, "-c", FLOOR.format(arch=arch)],
        "hub run NAME --input_path IMG (auto)": hub_argv("run", MODULE, "--input_path", args.image, "--device", "cpu"),
        **{f"hub run ... --runtime {runtime}": hub_argv("run", MODULE, "--input_path", args.image, "--device", "cpu",
                                                        "--runtime", runtime) for runtime in ("onnxruntime", "torch")},
    }
    run_process(commands["floor: import torch, timm + create_model + 1 forward"])  # warm the page cache
    runs = interleaved_processes(commands, rounds, env)
    wall = {name: min(r.wall_s for r in rs) for name, rs in runs.items()}
    rss = {name: min(r.max_rss_mib for r in rs) for name, rs in runs.items()}
    floor = "floor: import torch, timm + create_model + 1 forward"
    report = Report("cold_start", f"cold start: one photo, {MODULE}, fresh process each time",
                    ["command", "wall s (best)", "wall s (median)", "peak RSS MiB", "wall vs floor", "RSS vs floor"],
                    machine=machine("cpu"))
    for name, rs in runs.items():
        report.rows.append([name, wall[name], statistics.median(r.wall_s for r in rs), rss[name], wall[name] / wall[floor],
                            rss[name] / rss[floor]])
    hub, on_torch = "hub run NAME --input_path IMG (auto)", "hub run ... --runtime torch"
    report.targets += [Target("hub run (auto) cold wall time vs floor", wall[hub] / wall[floor], "<=", 0.25),
                       Target("hub run (auto) peak memory vs floor", rss[hub] / rss[floor], "<=", 0.3),
                       Target("hub run --runtime torch cold wall time vs floor", wall[on_torch] / wall[floor], "<=", 1.5),
                       Target("hub run --runtime torch peak memory vs floor", rss[on_torch] / rss[floor], "<=", 1.2)]
    report.notes.append(f"{rounds} interleaved rounds; the module is installed beforehand (no download in the timings)")
    return report


if __name__ == "__main__":
    run_script(main)
