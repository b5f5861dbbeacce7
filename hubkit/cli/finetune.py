"""``hub finetune``: fine-tune a module on a dataset folder (a thin layer over hubkit.finetune)."""
from __future__ import annotations

import json
import logging
import sys

import click

from .options import device_option, json_option, split_column_option, split_names
from .output import backbone_table, table

#: The keys of hubkit.finetune.STRATEGIES, spelled out so that `hub finetune --help` does not import torch.
STRATEGY_NAMES = ("frozen", "freeze_k", "finetune", "scratch", "ulmfit", "lpft")
HEAD_NAMES = ("fc", "gap_linear", "svm", "logistic")
SCHEDULE_NAMES = ("constant", "cosine", "onecycle", "slanted_triangular")
AUGMENT_NAMES = ("light", "strong")
#: Not a strategy but a search over them (hubkit.finetune.auto_finetune).
AUTO = "auto"


@click.command()
@click.argument("module")
@click.option("--dataset", required=True, type=click.Path(exists=True),
              help="Class-per-folder images, a folder with train_list.txt + label_list.txt, or a CSV file.")
@split_column_option
@click.option("--strategy", "strategy_name", type=click.Choice((*STRATEGY_NAMES, AUTO)), default="frozen", show_default=True,
              help="auto: try linear probes, then LP-FT, on the validation split within --time-budget; keep the best.")
@click.option("--time-budget", default=None, help="auto: the time to spend, like 15m, 900s or 1.5h (default 15m).")
@click.option("--backbones", default=None, help="auto: more modules to consider, comma-separated; all are ranked by a "
                                                "linear probe first and the candidates train on the best.")
@click.option("--find-lr", is_flag=True, help="Sweep the learning rate briefly, save the loss curve, print a suggested "
                                              "--lr, and stop (no training).")
@click.option("--head", type=click.Choice(HEAD_NAMES), default=None,
              help="The classifier head (default: fc; lpft: the logistic probe it starts from).")
@click.option("--hidden", default="256", show_default=True, help="Hidden layer sizes of the fc head, comma-separated ('' for none).")
@click.option("--dropout", default=0.2, show_default=True, type=click.FloatRange(0, 0.99))
@click.option("--epochs", "--num_epoch", "epochs", default=10, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", "--batch_size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--lr", "--learning_rate", "lr", default=1e-3, show_default=True, type=click.FloatRange(0, min_open=True))
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
@device_option
@click.option("--workers", default=None, type=click.IntRange(0), help="DataLoader workers (default: automatic).")
@click.option("--skip-bad-files", is_flag=True, help="Drop unreadable images instead of stopping.")
@click.option("--tta", is_flag=True, help="Average each image with its mirror image when that helps on the validation "
                                         "split (test-time augmentation; recorded in the export).")
@click.option("--export", "export_dir", default=None, help="Export the best model as a module folder here.")
@json_option
def finetune(module, dataset, split_column, strategy_name, time_budget, backbones, find_lr, head, hidden, dropout, epochs, batch_size, lr, weight_decay, grad_clip,
             schedule, freeze_k, freeze_until, backbone_lr_mult, cut_at, weights, l2_sp, input_size, augment,
             checkpoint_dir, fresh, eval_interval, save_interval, log_interval, max_steps, seed, device, workers, skip_bad_files,
             tta, export_dir, as_json):
    """Fine-tune MODULE on a dataset; resumes when --checkpoint_dir holds a checkpoint of the same run."""
    # imported when the command runs, so that `hub finetune --help` stays torch-free (see STRATEGY_NAMES)
    from ..data.datasets import open_dataset  # noqa: PLC0415
    from ..finetune import FCHead, ImageClassifierTask, RunConfig, auto_finetune, make_strategy  # noqa: PLC0415
    from ..finetune import distributed as dist  # noqa: PLC0415
    from ..inference.module import Module  # noqa: PLC0415

    try:
        hidden_sizes = tuple(int(h) for h in hidden.split(",") if h.strip())
    except ValueError:
        raise click.BadParameter(f"{hidden!r} is not a comma-separated list of integers", param_hint="--hidden") from None
    if head is None and strategy_name != "lpft":
        head = "fc"  # every strategy's default head but LP-FT's (its logistic probe)
    head_obj = FCHead(hidden_sizes, dropout) if head == "fc" else head
    config = RunConfig(num_epoch=epochs, batch_size=batch_size, learning_rate=lr, log_interval=log_interval,
                       eval_interval=eval_interval, save_ckpt_interval=save_interval, checkpoint_dir=checkpoint_dir,
                       use_cuda={"auto": None, "cpu": False, "cuda": True}[device], seed=seed,
                       weight_decay=weight_decay, grad_clip=grad_clip, input_size=input_size, max_steps=max_steps,
                       augment=augment, num_workers=workers, fresh=fresh, skip_bad_files=skip_bad_files)
    for value, hint, what in ((time_budget, "--time-budget", "a time budget"), (backbones, "--backbones", "backbones")):
        if value is not None and strategy_name != AUTO:
            raise click.BadParameter(f"only --strategy auto takes {what}", param_hint=hint)
    if tta and (strategy_name == AUTO or find_lr):
        raise click.BadParameter("test-time augmentation is chosen after a training run of one strategy",
                                 param_hint="--tta")
    if strategy_name == AUTO:
        _setup_logging()
        data = open_dataset(dataset, split_column=split_column or None)
        others = [Module(name=name, device=device) for name in split_names(backbones)]
        result = auto_finetune(Module(name=module, device=device), data, time_budget=time_budget or "15m", config=config,
                               backbones=others)
        _report_auto(result, export_dir, as_json)
        return
    strategy = make_strategy(strategy_name, head_obj, freeze_k=freeze_k, freeze_until=freeze_until,
                             backbone_lr_mult=backbone_lr_mult, cut_at=cut_at, weights=weights, l2_sp=l2_sp,
                             schedule=schedule)
    _setup_logging()
    data = open_dataset(dataset, split_column=split_column or None)
    if tta and not data.samples("validate"):
        raise click.UsageError("--tta keeps test-time augmentation only when it helps on the validation split, "
                               "and this data set has none")
    dist.setup(config.device)  # under torchrun: join the process group (docs/distributed.md)
    with dist.main_process_first():  # rank 0 installs the module; the other ranks wait, then find it installed
        hub_module = Module(name=module, device=device)
    task = ImageClassifierTask(hub_module, data, config=config, strategy=strategy)
    if find_lr:
        sweep = task.find_lr()
        click.echo(f"suggested learning rate: --lr {sweep.suggested:.2g} (loss curve: {sweep.plot}; "
                   f"{len(sweep.losses)} steps from {sweep.learning_rates[0]:.0e} to {sweep.learning_rates[-1]:.1e})")
        return
    result = task.finetune_and_eval()
    if dist.is_main():  # rank 0 chooses test-time augmentation, exports and reports
        tta_choice = task.choose_tta() if tta else None
        tta_test = task.evaluate("test") if task.tta and task.splits.samples["test"] else None
        _report(task, result, export_dir, as_json, tta_choice, tta_test)
    dist.finish()  # every rank leaves together, once rank 0 has written everything


def _setup_logging() -> None:
    if not sys.stderr.isatty():  # no progress bars there (they would fill a log with \r): plain lines instead
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("hubkit").addHandler(handler)
        logging.getLogger("hubkit").setLevel(logging.INFO)


def _report_auto(result, export_dir: str | None, as_json: bool) -> None:
    """The leaderboard, the final choice and its one test score."""
    exported = str(result.task.export(export_dir)) if export_dir else None
    rows = [{"strategy": c.name, "status": c.status, "validate_acc": c.validate_acc, "seconds": round(c.seconds, 1),
             "note": c.note} for c in result.leaderboard]
    if as_json:
        click.echo(json.dumps({"backbones": [b.to_dict() for b in result.backbones], "module": result.task.module.manifest.ref,
                               "leaderboard": rows, "best": result.best, "final": result.final_note,
                               "test_metrics": _without_per_class(result.test_metrics), "budget_s": result.budget_seconds,
                               "seconds": result.seconds, "checkpoint_dir": str(result.checkpoint_dir),
                               "exported": exported}, indent=2))
        return
    if result.backbones:
        click.echo(backbone_table(result.backbones))
        click.echo(f"training on {result.task.module.manifest.ref}\n")
    click.echo(table([(r["strategy"], "-" if r["validate_acc"] is None else f"{r['validate_acc']:.4f}",
                       f"{r['seconds']:.0f} s", r["status"], r["note"]) for r in rows],
                     ("strategy", "validate acc", "time", "status", "note")))
    click.echo(f"best: {result.best} ({result.final_note}); {result.seconds:.0f} s of a {result.budget_seconds:.0f} s "
               f"budget; candidates in {result.checkpoint_dir}")
    if result.test_metrics:
        click.echo(f"test: {_scores(result.test_metrics)}")
    if exported:
        click.echo(f"exported to {exported} (install it with: hub install {exported})")


def _report(task, result, export_dir: str | None, as_json: bool, tta_choice: dict | None = None,
            tta_test: dict | None = None) -> None:
    exported = str(task.export(export_dir)) if export_dir else None
    if as_json:
        click.echo(json.dumps({"metric": result.metric, "best_score": result.best_score, "best_step": result.best_step,
                               "steps": result.steps, "epochs": result.epochs, "resumed_from_step": result.resumed_from_step,
                               "checkpoint_dir": str(result.checkpoint_dir), "exported": exported, "fit": result.fit, "probe": result.probe,
                               "metrics": _without_per_class(result.metrics),
                               "test_metrics": _without_per_class(result.test_metrics), "tta": tta_choice,
                               "tta_test_metrics": _without_per_class(tta_test) if tta_test else None}, indent=2))
        return
    if result.resumed_from_step is not None:
        click.echo(f"resumed from step {result.resumed_from_step}")
    if result.fit is not None:  # a closed-form head: its own CV score, never an accuracy on what it was fitted on
        f = result.fit
        click.echo(f"fitted {f['head']} head (C={f['C']:g}, {f['cv_folds']}-fold CV acc {f['cv_acc']:.4f}) on "
                   f"{'+'.join(f['fitted_on'])} ({f['images']} images); checkpoints in {result.checkpoint_dir}")
    else:
        if result.probe:
            p = result.probe
            on_validate = f", validate acc {p['validate_acc']:.4f}" if "validate_acc" in p else ""
            click.echo(f"started from a {p['head']} probe fitted on train (C={p['C']:g}, {p['cv_folds']}-fold CV acc "
                       f"{p['cv_acc']:.4f}{on_validate})")
        click.echo(f"trained {_count(result.steps, 'step')} ({_count(result.epochs, 'epoch')} completed); "
                   f"checkpoints in {result.checkpoint_dir}")
        if result.metrics:
            best = "-" if result.best_score is None else f"{result.best_score:.4f}"
            click.echo(f"best {result.metric} {best} at step {result.best_step} on {_scores(result.metrics)}")
    if result.test_metrics:
        click.echo(f"test: {_scores(result.test_metrics)}")
    elif result.fit is not None:
        click.echo("no test split: the CV accuracy above is the only estimate")
    if tta_choice:
        kept = "kept" if tta_choice["chosen"] else "not kept"
        click.echo(f"test-time augmentation (each image and its mirror image): {tta_choice['split']} acc "
                   f"{tta_choice['plain_acc']:.4f} -> {tta_choice['flip_acc']:.4f}, {kept}")
    if tta_test:
        click.echo(f"test with it: {_scores(tta_test)}")
    if exported:
        click.echo(f"exported to {exported} (install it with: hub install {exported})")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _scores(m: dict) -> str:
    return (f"{m['split']} ({m['images']} images): acc {m['acc']:.4f}, precision {m['precision']:.4f}, "
            f"recall {m['recall']:.4f}, f1 {m['f1']:.4f}")


def _without_per_class(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "per_class"}
