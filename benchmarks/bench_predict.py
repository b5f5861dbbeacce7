"""Batch inference over a folder of photos: ``Module.predict`` and ``hub run DIR`` against a
hand-written timm loop, in plain fp32 and tuned (channels_last + bf16/fp16 autocast), and against
``Module.predict`` on the torch runtime (the auto path before the compiled runtimes).

    python benchmarks/bench_predict.py [--images 256] [--batch-size 32] [--quick] [--json]

Every path classifies the same photos with the same weights and preprocessing; models are
built and warmed up (one batch) outside the timings, then the paths run round-robin and the
best round of each is reported. Targets: Module.predict (auto) >= 1.6x ``runtime="torch"`` (auto
precision), >= 0.9x the best hand-written tuned loop and >= 4x the plain fp32 loop; top-1 equal to
the plain fp32 loop's on >= 98.5% of the photos (top-5 overlap reported).
"""
from __future__ import annotations

import contextlib
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MODULE,
    Report,
    Target,
    default_device,
    hub_argv,
    hub_env,
    interleaved,
    machine,
    parser,
    photo_folder,
    prepared_home,
    run_process,
    run_script,
    scratch_dir,
    synchronize,
    tuned_precision,
)


def timm_model(module, device: str, channels_last: bool):
    """The plain timm way: create the architecture, load the state dict, eval()."""
    import timm
    import torch

    model = timm.create_model(module.manifest.architecture, pretrained=False, num_classes=module.manifest.num_classes,
                              **module.manifest.architecture_kwargs)
    model.load_state_dict(module.state_dict())
    model = model.eval().to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def timm_transform(model):
    import timm.data

    return timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))


def timm_loop(paths, model, transform, batch_size: int, device: str, precision: str):
    """What people write: open, transform, stack, forward, softmax, top-5 (no DataLoader)."""
    import torch
    from PIL import Image

    tuned = precision != "fp32"
    top5 = []
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[start:start + batch_size]]).to(device)
        top5 += forward_top5(model, batch, device, precision, tuned)
    return top5


class _Photos:
    """A Dataset over image paths with a timm transform (for the DataLoader variant)."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.open(self.paths[i]).convert("RGB"))


def timm_dataloader_loop(paths, model, transform, batch_size: int, device: str, precision: str, workers: int):
    """The tuned hand-written way: a DataLoader decoding in worker processes."""
    from torch.utils.data import DataLoader

    loader = DataLoader(_Photos(paths, transform), batch_size=batch_size, num_workers=workers,
                        pin_memory=device == "cuda")
    top5 = []
    for batch in loader:
        top5 += forward_top5(model, batch.to(device, non_blocking=True), device, precision, True)
    return top5


def agreement(got: list[list[int]], expected: list[list[int]]) -> float:
    """The share of photos whose top-1 class is the same."""
    return sum(a[0] == b[0] for a, b in zip(got, expected)) / len(expected)


def overlap(got: list[list[int]], expected: list[list[int]]) -> float:
    """The mean share of the top-5 classes two paths have in common."""
    return sum(len(set(a) & set(b)) / len(b) for a, b in zip(got, expected)) / len(expected)


def forward_top5(model, batch, device: str, precision: str, tuned: bool) -> list[list[int]]:
    import torch

    if tuned:
        batch = batch.contiguous(memory_format=torch.channels_last)
    autocast = (torch.autocast(device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "fp32" else contextlib.nullcontext())
    with (torch.inference_mode() if tuned else torch.no_grad()), autocast:
        probs = model(batch).float().softmax(dim=1)
    top = probs.topk(5, dim=1).indices
    synchronize(device)
    return top.tolist()


def main(argv=None) -> Report:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=None, help="photos in the folder (default 256, --quick 48)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the hand-written tuned variant")
    args = p.parse_args(argv)
    count = args.images or (48 if args.quick else 256)
    rounds = args.rounds or (1 if args.quick else 3)
    device = args.device or default_device()
    precision = tuned_precision(device)
    bs = args.batch_size

    from hubkit import Module
    from hubkit.hub.cache import Cache

    home = prepared_home(args.home)
    work = scratch_dir("hubkit-bench-predict-")
    folder, origin = photo_folder(count, work)
    paths = sorted(str(x) for x in folder.iterdir())
    info = machine(device)

    auto = Module(name=MODULE, device=device, precision="auto", cache=Cache(home))
    auto.load()  # converts at first use: once per install, outside the timings
    on_torch = Module(name=MODULE, device=device, precision="auto", runtime="torch", cache=Cache(home))
    fp32 = Module(name=MODULE, device=device, precision="fp32", runtime="torch", cache=Cache(home))
    plain_model = timm_model(auto, device, channels_last=False)
    tuned_model = timm_model(auto, device, channels_last=True)
    transform = timm_transform(plain_model)
    results: dict[str, list[list[int]]] = {}

    def keep(name, fn):
        return lambda: results.__setitem__(name, fn())

    def predicted_top5(module):
        return [[c.index for c in r.top_k] for r in module.predict(folder, batch_size=bs)]

    jobs = {
        "timm loop, fp32 (plain)": keep("plain", lambda: timm_loop(paths, plain_model, transform, bs, device, "fp32")),
        f"timm loop, channels_last+{precision}": keep("tuned", lambda: timm_loop(paths, tuned_model, transform, bs, device,
                                                                                precision)),
        f"timm DataLoader({args.workers} workers), channels_last+{precision}": keep(
            "tuned_loader", lambda: timm_dataloader_loop(paths, tuned_model, transform, bs, device, precision, args.workers)),
        "Module.predict, runtime=torch, precision=fp32": keep("hub_fp32", lambda: predicted_top5(fp32)),
        f"Module.predict, runtime=torch, auto ({on_torch.precision}; the auto path before)": keep(
            "hub_torch", lambda: predicted_top5(on_torch)),
        f"Module.predict, auto ({auto.runtime} {auto.precision})": keep("hub_auto", lambda: predicted_top5(auto)),
    }
    warm = paths[:bs]
    timm_loop(warm, plain_model, transform, bs, device, "fp32")
    timm_loop(warm, tuned_model, transform, bs, device, precision)
    for module in (fp32, on_torch, auto):
        module.predict(warm, batch_size=bs)
    times = interleaved(jobs, rounds)
    best = {name: min(t) for name, t in times.items()}

    cold = run_process(hub_argv("run", MODULE, "--input_path", str(folder), "--batch_size", str(bs), "--device", device,
                                "--json"), env=hub_env(home))
    if cold.returncode != 0:
        raise SystemExit(f"hub run failed ({cold.returncode}): {cold.stderr[-2000:]}")

    plain_s = best["timm loop, fp32 (plain)"]
    keys = {"plain": "timm loop, fp32 (plain)", "tuned": f"timm loop, channels_last+{precision}",
            "tuned_loader": f"timm DataLoader({args.workers} workers), channels_last+{precision}",
            "hub_fp32": "Module.predict, runtime=torch, precision=fp32",
            "hub_torch": f"Module.predict, runtime=torch, auto ({on_torch.precision}; the auto path before)",
            "hub_auto": f"Module.predict, auto ({auto.runtime} {auto.precision})"}
    report = Report("predict", f"batch inference: {count} photos, {MODULE}, batch {bs}, {device}",
                    ["path", "img/s", "s (best)", "s (median)", "vs plain fp32", "top-1 = plain", "top-5 overlap"],
                    machine=info)
    for short, name in keys.items():
        report.rows.append([name, count / best[name], best[name], statistics.median(times[name]), plain_s / best[name],
                            f"{agreement(results[short], results['plain']):.1%}", overlap(results[short], results["plain"])])
    report.rows.append(["hub run DIR (cold process, auto, 1 run)", count / cold.wall_s, cold.wall_s, None,
                        plain_s / cold.wall_s, None, None])
    best_tuned = min(best[keys["tuned"]], best[keys["tuned_loader"]])
    report.targets += [Target("Module.predict auto vs best hand-written tuned loop", best_tuned / best[keys["hub_auto"]],
                              ">=", 0.9),
                       Target("Module.predict auto vs plain fp32 timm loop", plain_s / best[keys["hub_auto"]], ">=", 4.0),
                       Target("Module.predict auto vs runtime=torch (the auto path before)",
                              best[keys["hub_torch"]] / best[keys["hub_auto"]], ">=", 1.6),
                       Target("top-1 of Module.predict auto = plain fp32 loop", 100 * agreement(results["hub_auto"],
                                                                                                 results["plain"]),
                              ">=", 98.5, "%")]
    report.notes += [f"photos: {origin}; {rounds} interleaved rounds after a one-batch warm-up, best reported",
                     "hub run DIR includes process start, imports, model load and first-batch warm-up"]
    return report


if __name__ == "__main__":
    run_script(main)
