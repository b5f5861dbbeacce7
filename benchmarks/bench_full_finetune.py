"""Full fine-tuning throughput: hubkit's FullFineTune strategy against a hand-written timm
training loop at the same precision, in training images per second.

    python benchmarks/bench_full_finetune.py [--steps 20] [--batch-size 32] [--quick] [--json]

Both train every layer of the module (backbone at 0.1x the head's learning rate, AdamW) with
the same head, data, preprocessing, batch size, DataLoader workers and precision (channels_last
+ bf16 autocast where the CPU has native bf16, fp16/bf16 on a GPU) for the same number of
steps; hubkit's figure includes the checkpoint it writes. Target: hubkit >= 0.9x the
hand-written loop.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MODULE,
    Report,
    Target,
    default_device,
    finetune_dataset,
    image_loader,
    interleaved,
    machine,
    parser,
    prepared_home,
    run_script,
    scratch_dir,
    synchronize,
)
from bench_frozen_finetune import autocast_for  # noqa: E402


def hand_written_training(module, root: Path, transform, args, device: str, precision: str) -> None:
    """The plain timm way: create_model, load weights, new head, AdamW, autocast, N steps."""
    import timm
    import torch
    from torch import nn

    from hubkit.finetune import FCHead

    torch.manual_seed(0)
    backbone = timm.create_model(module.manifest.architecture, pretrained=False,
                                 num_classes=module.manifest.num_classes, **module.manifest.architecture_kwargs)
    backbone.load_state_dict(module.state_dict())
    backbone.reset_classifier(0)
    num_classes = len([p for p in (root / "train").iterdir() if p.is_dir()])
    head = FCHead().build(backbone.num_features, num_classes)
    model = nn.Sequential(backbone, head).to(device).train()
    channels_last = precision != "fp32" or device == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW([{"params": backbone.parameters(), "lr": args.learning_rate * 0.1},
                                   {"params": head.parameters(), "lr": args.learning_rate}])
    loss_fn = nn.CrossEntropyLoss()
    steps = 0
    while steps < args.steps:
        for x, y in image_loader(root / "train", transform, args.batch_size, shuffle=True, workers=args.workers,
                                 seed=steps):
            x = x.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_for(device, precision):
                loss = loss_fn(model(x).float(), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if steps == args.steps:
                break
    synchronize(device)


def main(argv=None) -> Report:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="training steps of each path (default 20, --quick 2)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32, --quick 8")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers of both paths (default: hubkit's choice)")
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 20)
    args.batch_size = args.batch_size or (8 if args.quick else 32)
    rounds = args.rounds or (1 if args.quick else 3)  # one round of ~1 min is at the mercy of background load

    import hubkit as hub
    from hubkit.data.transforms import build_transform
    from hubkit.hub.cache import Cache

    device = default_device()
    home = prepared_home(args.home)
    work = scratch_dir("hubkit-bench-full-")
    per_class = -(-args.steps * args.batch_size // 10)  # one epoch covers every step on 10 classes
    root, origin = finetune_dataset(per_class, 0, work)
    for split in ("validation", "test"):
        shutil.rmtree(root / split, ignore_errors=True)  # a train-only run: no evaluation in the timing
    module = hub.Module(name=MODULE, cache=Cache(home), device=device)
    precision = module.precision
    transform = build_transform(module.manifest.preprocessing)
    data = hub.datasets.ImageFolder(root)

    def hubkit_training() -> None:
        config = hub.RunConfig(num_epoch=1000, max_steps=args.steps, batch_size=args.batch_size,
                               learning_rate=args.learning_rate, checkpoint_dir=tempfile.mkdtemp(dir=work), seed=0,
                               progress=False, eval_interval=10**6, save_ckpt_interval=10**6, num_workers=args.workers)
        hub.ImageClassifierTask(module, data, config=config, strategy=hub.FullFineTune(head="fc")).finetune_and_eval()

    if args.workers is None:  # the hand-written loop uses what hubkit picks for this data set
        probe = hub.ImageClassifierTask(module, data, config=hub.RunConfig(checkpoint_dir=str(work / "probe"),
                                                                          progress=False),
                                        strategy=hub.FullFineTune(head="fc"))
        args.workers = probe._num_workers("train")
    jobs = {f"hand-written timm loop ({precision}{', channels_last' if precision != 'fp32' else ''})":
            lambda: hand_written_training(module, root, transform, args, device, precision),
            f"hubkit FullFineTune (precision=auto -> {precision})": hubkit_training}
    times = interleaved(jobs, rounds)
    images = args.steps * args.batch_size
    hand, hubk = (min(t) for t in times.values())
    report = Report("full_finetune", f"full fine-tuning: {args.steps} steps of {args.batch_size}, {MODULE}, {device}",
                    ["path", "seconds (best)", "train img/s", "vs hand-written"], machine=machine(device))
    for name, t in times.items():
        report.rows.append([name, min(t), images / min(t), hand / min(t)])
    report.targets.append(Target("hubkit full fine-tuning throughput vs hand-written", hand / hubk, ">=", 0.9))
    report.notes += [f"data: {origin}; DataLoader workers: {args.workers}; {rounds} round(s)",
                     "both include building the model and their first (slower) steps; hubkit also its checkpoint"]
    return report


if __name__ == "__main__":
    run_script(main)
