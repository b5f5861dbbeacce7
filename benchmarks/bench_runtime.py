"""The model alone on each runtime: torch fp32 eager, hubkit's torch path, OpenVINO and ONNX Runtime.

    python benchmarks/bench_runtime.py [--batch-size 32] [--rounds 5] [--quick] [--json]

A random float32 batch (no decoding) through the efficientnet_lite0 classifier with its real weights,
each path timed round-robin in one run (the best call of each is reported). The compiled runtimes run
the artefact ``Module(runtime=...)`` makes and keeps in the snapshot (converted before the timings).
OpenVINO's bf16 hint is measured only where the CPU computes bf16 natively. This is what
docs/performance.md chooses the default runtime from.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import MODULE, Report, interleaved, machine, parser, prepared_home, run_script  # noqa: E402

from hubkit import Module  # noqa: E402
from hubkit.hub.cache import Cache  # noqa: E402
from hubkit.hub.machine import cpu_has_native_bf16  # noqa: E402
from hubkit.inference.compiled import CompiledModel  # noqa: E402


def main(argv=None) -> Report:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)

    cache = Cache(prepared_home(args.home))
    batch = np.random.default_rng(0).standard_normal((args.batch_size, 3, 224, 224), dtype=np.float32)
    plain = Module(name=MODULE, cache=cache, device="cpu", runtime="torch", precision="fp32").create_model()
    auto_torch = Module(name=MODULE, cache=cache, device="cpu", runtime="torch")
    x = torch.from_numpy(batch)
    jobs = {"torch fp32 eager (timm model as built)": lambda: plain(x),
            f"torch, hubkit auto path ({auto_torch.precision}, folded, channels_last)":
                lambda: auto_torch.forward_probabilities(x)}
    precisions = [("openvino", "fp32"), ("onnxruntime", "fp32")] + ([("openvino", "bf16")] if cpu_has_native_bf16() else [])
    load_s = {}
    for runtime, precision in precisions:
        module = Module(name=MODULE, cache=cache, device="cpu", runtime=runtime, precision=precision)
        module.load()  # converts at first use: outside the timings
        files, _ = cache.artefact(module.installed, runtime)
        start = time.perf_counter()
        model = CompiledModel(runtime, files, precision)
        load_s[runtime, precision] = time.perf_counter() - start
        jobs[f"{runtime} {precision}"] = lambda m=model: m.probabilities(batch)
    with torch.inference_mode():
        for job in jobs.values():  # first calls: kernels, weight reorders
            job()
        times = interleaved(jobs, rounds)
    best = {name: args.batch_size / min(ts) for name, ts in times.items()}
    eager, auto = list(best)[:2]
    report = Report("runtime", f"the model alone: {MODULE}, random batch of {args.batch_size}, 224 px, CPU",
                    ["path", "img/s (best)", "vs torch fp32 eager", "vs hubkit torch auto", "load s"], machine=machine("cpu"))
    for (name, value), extra in zip(best.items(), [None, None, *load_s.values()]):
        report.rows.append([name, value, value / best[eager], value / best[auto], extra])
    fastest = max(list(best)[2:], key=best.get)
    report.notes += [f"{rounds} interleaved rounds; fastest compiled runtime: {fastest}",
                     f"CPU native bf16: {cpu_has_native_bf16()} (OpenVINO bf16 is measured only where it is native)",
                     "load s: reading the stored artefact and compiling it for this CPU (what a cold `hub run` pays)"]
    return report


if __name__ == "__main__":
    run_script(main)
