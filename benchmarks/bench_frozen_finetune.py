"""Frozen-backbone fine-tuning for 10 epochs: hubkit's FeatureExtractionStrategy (backbone
features computed once and cached, the head trained on them) against a hand-written loop that
runs the frozen backbone every epoch, with the test accuracy of both.

    python benchmarks/bench_frozen_finetune.py [--train-per-class 30] [--quick] [--json]

Both train the same head (hubkit's default "fc" head) with AdamW, the same learning rate,
batch size, epochs, preprocessing and precision, keep the epoch with the best validation
accuracy and report its test accuracy. "One feature pass" is the backbone run once over
every image either path touches (train, validation, test). Target: hubkit's 10 epochs take
<= 1.3x one feature pass, at an accuracy equal to the hand-written loop's (within 2 points); with
the feature pass on the compiled runtime (the default on a CPU) >= 1.5x faster than on torch
(``runtime="torch"``, measured in the same run), at equal test accuracy.
"""
from __future__ import annotations

import contextlib
import copy
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MODULE,
    Report,
    Target,
    default_device,
    finetune_dataset,
    image_loader,
    machine,
    parser,
    prepared_home,
    run_script,
    scratch_dir,
    synchronize,
)


def timm_backbone(module, device: str, channels_last: bool):
    """The plain timm way: the architecture with the module's weights, classifier removed, frozen."""
    import timm
    import torch

    model = timm.create_model(module.manifest.architecture, pretrained=False, num_classes=module.manifest.num_classes,
                              **module.manifest.architecture_kwargs)
    model.load_state_dict(module.state_dict())
    model.reset_classifier(0)
    model = model.eval().requires_grad_(False).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def autocast_for(device: str, precision: str):
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def backbone_features(backbone, loader, device: str, precision: str):
    import torch

    feats, labels = [], []
    with torch.no_grad(), autocast_for(device, precision):
        for x, y in loader:
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            feats.append(backbone(x).float())
            labels.append(y.to(device))
    synchronize(device)
    return torch.cat(feats), torch.cat(labels)


def hand_written_every_epoch(backbone, root: Path, transform, num_classes: int, in_features: int, args, device, precision):
    """Train the head for ``epochs``, running the frozen backbone on every batch of every epoch."""
    import torch
    from torch import nn

    from hubkit.finetune import FCHead

    torch.manual_seed(0)
    head = FCHead().build(in_features, num_classes).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    train = image_loader(root / "train", transform, args.batch_size, shuffle=True, workers=args.workers)
    best_acc, best_head = -1.0, None
    for _ in range(args.epochs):
        head.train()
        for x, y in train:
            with torch.no_grad(), autocast_for(device, precision):
                feats = backbone(x.to(device).contiguous(memory_format=torch.channels_last)).float()
            loss = loss_fn(head(feats), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        head.eval()
        feats, labels = backbone_features(backbone, image_loader(root / "validation", transform, 64), device, precision)
        with torch.no_grad():
            acc = float((head(feats).argmax(1) == labels).float().mean())
        if acc > best_acc:
            best_acc, best_head = acc, copy.deepcopy(head)
    feats, labels = backbone_features(backbone, image_loader(root / "test", transform, 64), device, precision)
    with torch.no_grad():
        return float((best_head(feats).argmax(1) == labels).float().mean())


def main(argv=None) -> Report:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--train-per-class", type=int, default=None, help="train images per class (default 30, --quick 4)")
    p.add_argument("--eval-per-class", type=int, default=None, help="validation and test images per class (default 15)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the hand-written loop")
    p.add_argument("--no-hand-written", action="store_true",
                   help="skip the hand-written loop (the backbone every epoch: by far the longest part); compare "
                        "hubkit's two feature-pass runtimes and one feature pass only")
    args = p.parse_args(argv)
    train_n = args.train_per_class or (4 if args.quick else 30)
    eval_n = args.eval_per_class or (2 if args.quick else 15)

    import torch

    import hubkit as hub
    from hubkit.data.transforms import build_transform
    from hubkit.hub.cache import Cache

    device = default_device()
    home = prepared_home(args.home)
    work = scratch_dir("hubkit-bench-frozen-")
    root, origin = finetune_dataset(train_n, eval_n, work)
    module = hub.Module(name=MODULE, cache=Cache(home), device=device)
    precision = module.precision
    backbone = timm_backbone(module, device, channels_last=True)
    transform = build_transform(module.manifest.preprocessing)
    num_classes = len([p for p in (root / "train").iterdir() if p.is_dir()])
    in_features = module.manifest.features.pooled_channels
    with torch.no_grad(), autocast_for(device, precision):  # warm-up: oneDNN kernels for both paths
        backbone(torch.zeros(args.batch_size, 3, 224, 224).contiguous(memory_format=torch.channels_last))

    start = time.perf_counter()
    for split in ("train", "validation", "test"):
        backbone_features(backbone, image_loader(root / split, transform, max(32, args.batch_size)), device, precision)
    feature_pass = time.perf_counter() - start

    hand_s = hand_acc = None
    if not args.no_hand_written:
        start = time.perf_counter()
        hand_acc = hand_written_every_epoch(backbone, root, transform, num_classes, in_features, args, device, precision)
        hand_s = time.perf_counter() - start

    def hubkit_run(runtime: str, tag: str) -> tuple[float, float]:
        """10 epochs of FeatureExtractionStrategy with the feature pass on ``runtime``, cold feature cache."""
        shutil.rmtree(Cache(home).features_dir, ignore_errors=True)  # hubkit computes its features in the timing
        config = hub.RunConfig(num_epoch=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                               checkpoint_dir=str(work / f"ckpt-{tag}"), seed=0, progress=False)
        task = hub.ImageClassifierTask(hub.Module(name=MODULE, cache=Cache(home), device=device, runtime=runtime),
                                       hub.datasets.ImageFolder(root), config=config,
                                       strategy=hub.FeatureExtractionStrategy(head="fc"))
        start = time.perf_counter()
        task.finetune_and_eval()
        acc = task.evaluate("test")["acc"]
        return time.perf_counter() - start, acc

    # the compiled feature extractor is made once per installed module (like the classifier's artefact): not timed
    start = time.perf_counter()
    probe = hub.ImageClassifierTask(module, hub.datasets.ImageFolder(root),
                                    config=hub.RunConfig(checkpoint_dir=str(work / "probe"), progress=False),
                                    strategy=hub.FeatureExtractionStrategy(head="fc"))
    compiled_runtime = probe.frozen_backbone.runtime
    conversion_s = time.perf_counter() - start
    runs: dict[str, list] = {"auto": [], "torch": []}
    for _ in range(args.rounds or 1):  # interleaved: background load hits both alike
        for runtime in runs:
            runs[runtime].append(hubkit_run(runtime, f"{runtime}-{len(runs[runtime])}"))
    hub_s, hub_acc = min(runs["auto"])
    torch_s, torch_acc = min(runs["torch"])

    images = sum(1 for _ in root.glob("*/*/*"))
    report = Report("frozen_finetune", f"frozen-backbone fine-tuning, {args.epochs} epochs, {MODULE}, {device}, {precision}",
                    ["path", "seconds", "vs one feature pass", "test accuracy"], machine=machine(device))
    report.rows.append([f"one feature pass (backbone over all {images} images, hand-written)", feature_pass, 1.0, None])
    if hand_s is not None:
        report.rows.append([f"hand-written loop: backbone every epoch, {args.epochs} epochs", hand_s,
                            hand_s / feature_pass, hand_acc])
    report.rows += [["hubkit FeatureExtractionStrategy, feature pass on torch (runtime='torch', the path before)",
                     torch_s, torch_s / feature_pass, torch_acc],
                    [f"hubkit FeatureExtractionStrategy, feature pass on {compiled_runtime} (auto), {args.epochs} epochs "
                     "(cold feature cache)", hub_s, hub_s / feature_pass, hub_acc]]
    report.targets.append(Target(f"hubkit {args.epochs} epochs vs one feature pass", hub_s / feature_pass, "<=", 1.3))
    if hand_s is not None:
        report.targets += [Target("hubkit test accuracy minus hand-written (points)", 100 * (hub_acc - hand_acc), ">=",
                                  -2.0, " pt"),
                           Target("speed-up over the hand-written loop", hand_s / hub_s, ">=", 1.0)]
    report.targets += [Target(f"speed-up of the {compiled_runtime} feature pass over hubkit's torch one (10 epochs, end "
                              "to end)", torch_s / hub_s, ">=", 1.5),
                       Target(f"{compiled_runtime} test accuracy minus torch's (points)", 100 * (hub_acc - torch_acc),
                              ">=", -0.5, " pt")]
    report.notes += [f"data: {origin}", f"best of {args.rounds or 1} interleaved rounds per hubkit path",
                     f"making (or, when made before, loading) the {compiled_runtime} feature extractor, once per install, "
                     f"not timed: {conversion_s:.1f} s",
                     "hubkit's time includes checkpoints, metrics.json and curves.png it writes"]
    return report


if __name__ == "__main__":
    run_script(main)
