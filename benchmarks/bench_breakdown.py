"""Where batch-inference time goes on this machine: the model alone in each precision and memory
format, the first call of a batch shape, and the per-image preprocessing steps.

    python benchmarks/bench_breakdown.py [--batch-size 32] [--quick] [--json]

Not a comparison with a target: it explains the others. Model figures use a random batch
(no decoding), so they are the ceiling of any end-to-end path; preprocessing figures are
per image on one thread, with the per-image tensor steps also timed under the default
intra-op thread count (what a per-image ``transform`` in the main thread pays).
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import EXAMPLES, MODULE, Report, default_device, machine, parser, prepared_home, run_script, scratch_dir, synchronize  # noqa: E402


def main(argv=None) -> Report:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    bs = args.batch_size

    import torch
    from PIL import Image

    from hubkit import Module
    from hubkit.hub.cache import Cache
    from hubkit.models.device import cpu_has_native_bf16
    from hubkit.models.optimize import fold_batchnorm

    device = default_device()
    module = Module(name=MODULE, cache=Cache(prepared_home(args.home)), device=device, precision="fp32")
    report = Report("breakdown", f"where the time goes: {MODULE}, batch {bs}, {device}",
                    ["what", "ms", "img/s", "note"], machine=machine(device))
    x = torch.randn(bs, 3, 224, 224, device=device)
    reduced = torch.bfloat16 if device == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    tuned = f"model channels_last + {str(reduced)[6:]} autocast"
    variants = {"model fp32, contiguous": (False, None, False), "model fp32, channels_last": (True, None, False),
                tuned: (True, reduced, False), f"{tuned} + BatchNorm folded (hubkit)": (True, reduced, True)}
    models = {}
    for name, (cl, dtype, fold) in variants.items():
        model = module.create_model().to(device)
        if fold:
            fold_batchnorm(model, x[:1])
        inp = x
        if cl:
            model, inp = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        ctx = (lambda d=dtype: torch.autocast(device, dtype=d)) if dtype else contextlib.nullcontext
        start = time.perf_counter()
        with torch.inference_mode(), ctx():
            model(inp)
        synchronize(device)
        first = time.perf_counter() - start
        models[name] = (model, inp, ctx)
        report.rows.append([f"{name}: first call (kernels, weight reorders)", first * 1000, None, ""])
    best = {name: float("inf") for name in models}
    for _ in range(rounds):
        for name, (model, inp, ctx) in models.items():
            with torch.inference_mode(), ctx():
                start = time.perf_counter()
                model(inp)
                synchronize(device)
                best[name] = min(best[name], time.perf_counter() - start)
    for name, seconds in best.items():
        report.rows.append([f"{name}: steady batch", seconds * 1000, bs / seconds, "random batch, no decoding"])
    model, inp, ctx = models[tuned]
    threads = torch.get_num_threads()
    if device == "cpu" and threads > 1:  # other processes on the cores make every intra-op barrier wait
        per_threads = {1: float("inf"), threads: float("inf")}
        with torch.inference_mode(), ctx():
            for _ in range(rounds):
                for n in per_threads:
                    torch.set_num_threads(n)
                    start = time.perf_counter()
                    model(inp)
                    per_threads[n] = min(per_threads[n], time.perf_counter() - start)
        torch.set_num_threads(threads)
        for n, seconds in per_threads.items():
            report.rows.append([f"same model, steady batch, {n} intra-op thread{'s' if n > 1 else ''}", seconds * 1000,
                                bs / seconds, "1 thread wins when other processes share the cores"])
    odd = inp[: max(1, bs // 2 - 1)]
    with torch.inference_mode(), ctx():
        start = time.perf_counter()
        model(odd)
        synchronize(device)
        report.rows.append([f"same model, first call of a new batch size ({len(odd)})", (time.perf_counter() - start) * 1000,
                            None, "a last partial batch pays this"])

    from hubkit.data.images import load_image

    photo = EXAMPLES / "coffee.jpg"
    steps = list(module.transform.transforms)
    image = load_image(photo)
    per_image: dict[str, float] = {"decode JPEG (PIL)": float("inf")}
    for _ in range(rounds * 4):
        start = time.perf_counter()
        load_image(photo)
        per_image["decode JPEG (PIL)"] = min(per_image["decode JPEG (PIL)"], time.perf_counter() - start)
    for n_threads in sorted({1, threads}):
        torch.set_num_threads(n_threads)
        value = image
        for step in steps:
            key = f"{type(step).__name__} ({n_threads} intra-op thread{'s' if n_threads > 1 else ''})"
            if n_threads != 1 and isinstance(step(value), Image.Image):
                value = step(value)
                continue  # PIL steps do not use torch threads
            best_s = float("inf")
            for _ in range(rounds * 4):
                start = time.perf_counter()
                out = step(value)
                best_s = min(best_s, time.perf_counter() - start)
            per_image[key] = best_s
            value = out
    torch.set_num_threads(threads)
    for name, seconds in per_image.items():
        report.rows.append([f"per image: {name}", seconds * 1000, 1 / seconds, photo.name])

    big = scratch_dir("hubkit-bench-breakdown-") / "coffee_x8.jpg"  # 15 MP (an upscale: smoother than a camera photo)
    image.resize((image.width * 8, image.height * 8), Image.BICUBIC).save(big, quality=90)
    resize = steps[0]
    for name, draft in (("whole", None), ("at reduced scale (hubkit)", module._draft_size)):
        best_s = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            resize(load_image(big, draft_size=draft))
            best_s = min(best_s, time.perf_counter() - start)
        report.rows.append([f"per image: decode {name} + resize, {image.width * 8}x{image.height * 8} JPEG", best_s * 1000,
                            1 / best_s, "large photos are decode-bound without reduced-scale decoding"])
    report.notes += [f"{rounds} rounds, best reported; CPU native bf16: {cpu_has_native_bf16()}",
                     "end to end, decoding and resizing share the cores with the model: img/s <= 1 / (model + preprocessing "
                     "core-seconds per image / cores)"]
    return report


if __name__ == "__main__":
    run_script(main)
