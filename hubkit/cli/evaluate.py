"""``hub evaluate RUN_DIR``: score a fine-tuning run's best model on a split, without exporting it."""
from __future__ import annotations

import click

from .options import device_option, json_option, split_column_option
from .output import emit_json, table


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--split", default="test", show_default=True, type=click.Choice(("train", "validate", "test")))
@click.option("--dataset", default=None, help="The data to score (default: the dataset the run was trained on).")
@split_column_option
@device_option
@json_option
def evaluate(run_dir: str, split: str, dataset: str | None, split_column: str, device: str, as_json: bool) -> None:
    """Score the best model of a `hub finetune` run (its --checkpoint_dir) on a split of its data."""
    from ..data.datasets import open_dataset  # noqa: PLC0415 - torch only when the command runs
    from ..finetune import ImageClassifierTask  # noqa: PLC0415

    data = open_dataset(dataset, split_column=split_column or None) if dataset else None
    task = ImageClassifierTask.from_run(run_dir, data, device=device)
    metrics = task.evaluate(split)
    if as_json:
        emit_json({"run": run_dir, "module": task.module.manifest.ref, **metrics})
        return
    click.echo(f"{task.module.manifest.ref}, {split} split ({metrics['images']} images): acc {metrics['acc']:.4f}, "
               f"precision {metrics['precision']:.4f}, recall {metrics['recall']:.4f}, f1 {metrics['f1']:.4f}, "
               f"loss {metrics['loss']:.4f}")
    rows = [(name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", m["support"])
            for name, m in metrics["per_class"].items()]
    click.echo(table(rows, ("class", "precision", "recall", "f1", "images")))
