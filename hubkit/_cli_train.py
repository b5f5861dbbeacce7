"""``hub finetune``: fine-tune a module on a dataset folder (a thin layer over hubkit.finetune)."""
from __future__ import annotations

import json

import click

#: The keys of hubkit.finetune.STRATEGIES, spelled out so that `hub finetune --help` does not import torch.
STRATEGY_NAMES = ("frozen", "freeze_k", "finetune", "scratch", "ulmfit")
HEAD_NAMES = ("fc", "gap_linear", "svm")
SCHEDULE_NAMES = ("constant", "cosine", "onecycle", "slanted_triangular")
AUGMENT_NAMES = ("light", "strong")


@click.command()
@click.argument("module")
@click.option("--dataset", required=True, type=click.Path(exists=True),
              help="Class-per-folder images, a folder with train_list.txt + label_list.txt, or a CSV file.")
@click.option("--strategy", "strategy_name", type=click.Choice(STRATEGY_NAMES), default="frozen", show_default=True)
@click.option("--head", type=click.Choice(HEAD_NAMES), default="fc", show_default=True)
@click.option("--hidden", default="256", show_default=True, help="Hidden layer sizes of the fc head, comma-separated ('' for none).")
@click.option("--dropout", default=0.2, show_default=True, type=click.FloatRange(0, 0.99))
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", "--batch_size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--weight-decay", default=0.0, show_default=True, type=click.FloatRange(0))
@click.option("--grad-clip", default=None, type=click.FloatRange(0, min_open=True))
@click.option("--schedule", type=click.Choice(SCHEDULE_NAMES), default=None, help="Learning-rate schedule (strategy default).")
@click.option("--freeze-k", default=None, type=click.IntRange(0), help="freeze_k: how many blocks to freeze (default 3).")
@click.option("--freeze-until", default=None, help="freeze_k: freeze up to this block or feature tap.")
@click.option("--backbone-lr-mult", default=None, type=click.FloatRange(0, 1, min_open=True),
              help="finetune: the backbone's learning rate as a fraction of the head's (default 0.1).")
@click.option("--cut-at", default=None, help="Use the backbone only up to this feature tap or layer.")
@click.option("--weights", default=None, type=click.Path(exists=True, dir_okay=False), help="Custom weights loaded by name.")
@click.option("--l2-sp", default=0.0, show_default=True, type=click.FloatRange(0), help="L2-SP strength (towards pretrained).")
@click.option("--input-size", default=None, type=click.IntRange(8), help="Train at this resolution instead of the module's.")
@click.option("--augment", type=click.Choice(AUGMENT_NAMES), default=None,
              help="Augment training images: light = random resized crop + flip, strong = + colour jitter.")
@click.option("--checkpoint_dir", "--checkpoint-dir", default="ckpt", show_default=True)
@click.option("--fresh", is_flag=True, help="Start over even if checkpoint_dir holds a checkpoint.")
@click.option("--eval-interval", default=50, show_default=True, type=click.IntRange(1))
@click.option("--save-interval", default=100, show_default=True, type=click.IntRange(1))
@click.option("--log-interval", default=10, show_default=True, type=click.IntRange(1))
@click.option("--max-steps", default=None, type=click.IntRange(0), help="Stop after this many steps (resume later).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", default=None, type=click.IntRange(0), help="DataLoader workers (default: automatic).")
@click.option("--skip-bad-files", is_flag=True, help="Drop unreadable images instead of stopping.")
@click.option("--export", "export_dir", default=None, help="Export the best model as a module folder here.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def finetune(module, dataset, strategy_name, head, hidden, dropout, epochs, batch_size, lr, weight_decay, grad_clip,
             schedule, freeze_k, freeze_until, backbone_lr_mult, cut_at, weights, l2_sp, input_size, augment,
             checkpoint_dir, fresh, eval_interval, save_interval, log_interval, max_steps, seed, device, workers, skip_bad_files,
             export_dir, as_json):
    """Fine-tune MODULE on a dataset; resumes when --checkpoint_dir holds a checkpoint of the same run."""
    from .datasets import open_dataset
    from .finetune import FCHead, ImageClassifierTask, RunConfig, make_strategy
    from .finetune import distributed as dist
    from .module import Module

    try:
        hidden_sizes = tuple(int(h) for h in hidden.split(",") if h.strip())
    except ValueError:
        raise click.BadParameter(f"{hidden!r} is not a comma-separated list of integers", param_hint="--hidden") from None
    head_obj = FCHead(hidden_sizes, dropout) if head == "fc" else head
    config = RunConfig(num_epoch=epochs, batch_size=batch_size, learning_rate=lr, log_interval=log_interval,
                       eval_interval=eval_interval, save_ckpt_interval=save_interval, checkpoint_dir=checkpoint_dir,
                       use_cuda={"auto": None, "cpu": False, "cuda": True}[device], seed=seed,
                       weight_decay=weight_decay, grad_clip=grad_clip, input_size=input_size, max_steps=max_steps,
                       augment=augment, num_workers=workers, fresh=fresh, skip_bad_files=skip_bad_files)
    strategy = make_strategy(strategy_name, head_obj, freeze_k=freeze_k, freeze_until=freeze_until,
                             backbone_lr_mult=backbone_lr_mult, cut_at=cut_at, weights=weights, l2_sp=l2_sp,
                             schedule=schedule)
    data = open_dataset(dataset)
    dist.setup(config.device)  # under torchrun: join the process group (docs/distributed.md)
    with dist.main_process_first():  # rank 0 installs the module; the other ranks wait, then find it installed
        hub_module = Module(name=module, device=device)
    task = ImageClassifierTask(hub_module, data, config=config, strategy=strategy)
    result = task.finetune_and_eval()
    if dist.is_main():  # rank 0 exports and reports
        _report(task, result, export_dir, as_json)
    dist.finish()  # every rank leaves together, once rank 0 has written everything


def _report(task, result, export_dir: str | None, as_json: bool) -> None:
    exported = str(task.export(export_dir)) if export_dir else None
    if as_json:
        click.echo(json.dumps({"metric": result.metric, "best_score": result.best_score, "best_step": result.best_step,
                               "steps": result.steps, "epochs": result.epochs, "resumed_from_step": result.resumed_from_step,
                               "checkpoint_dir": str(result.checkpoint_dir), "exported": exported,
                               "metrics": {k: v for k, v in result.metrics.items() if k != "per_class"}}, indent=2))
        return
    if result.resumed_from_step is not None:
        click.echo(f"resumed from step {result.resumed_from_step}")
    click.echo(f"trained {result.steps} steps ({result.epochs} epochs completed); checkpoints in {result.checkpoint_dir}")
    if result.metrics:
        m = result.metrics
        best = "-" if result.best_score is None else f"{result.best_score:.4f}"
        click.echo(f"best {result.metric} {best} at step {result.best_step} on {m['split']} "
                   f"({m['images']} images): acc {m['acc']:.4f}, precision {m['precision']:.4f}, "
                   f"recall {m['recall']:.4f}, f1 {m['f1']:.4f}")
    if exported:
        click.echo(f"exported to {exported} (install it with: hub install {exported})")
