"""``hub validate-data`` and ``hub advise``: check a dataset, and get a fine-tuning strategy for it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..data.datasets import DEFAULT_SPLIT_COLUMN, SPLITS, DataReport, ImageFolder, ImageListDataset, open_dataset, printable
from ..finetune.advise import advise as advise_dataset
from ..finetune.advise import rank_backbones
from ..hub.manifest import parse_ref
from ..inference.module import Module
from .options import device_option, json_option, split_column_option, split_names
from .output import backbone_table, table


def _open(directory: str, list_files: bool, split_column: str = DEFAULT_SPLIT_COLUMN):
    if list_files:
        return ImageListDataset(directory)
    return open_dataset(directory, split_column=split_column or None)


def _layout(dataset) -> str:
    return "list files" if isinstance(dataset, ImageListDataset) else (
        "class-per-folder" if isinstance(dataset, ImageFolder) else "csv")


def _counttable(report: DataReport) -> str:
    splits = [s for s in SPLITS if s in report.counts]
    labels = list(next(iter(report.counts.values()), {}))
    rows = [(printable(label), *(report.counts[s][label] for s in splits)) for label in labels]
    rows.append(("total", *(sum(report.counts[s].values()) for s in splits)))
    return table(rows, ("CLASS", *(s.upper() for s in splits)))


@click.command("validate-data")
@click.argument("directory", type=click.Path(exists=True, file_okay=True, dir_okay=True))
@click.option("--list-files", "list_files", is_flag=True,
              help="Read PaddleHub list files (train_list.txt, label_list.txt...) even if auto-detection would not.")
@click.option("--quick", is_flag=True, help="Only check that image files exist; do not decode them.")
@split_column_option
@json_option
def validate_data(directory: str, list_files: bool, quick: bool, split_column: str, as_json: bool) -> None:
    """Check a dataset: every image readable, every label known, no empty class or split.

    DIRECTORY is a list-file dataset when it holds train_list.txt and label_list.txt, a CSV
    dataset when it is a .csv file, else class-per-folder (with or without train/ validation/
    test/ folders). Prints one line per issue (split: where: problem) and the images per split
    and class; exits 1 when there are issues.
    """
    dataset = _open(directory, list_files, split_column)
    report = dataset.validate(check_images=not quick)
    if as_json:
        click.echo(json.dumps({"path": str(Path(directory)), "layout": _layout(dataset), "ok": report.ok,
                               "labels": dataset.label_list, "counts": report.counts,
                               "issues": [{"split": i.split, "origin": i.origin, "problem": i.problem}
                                          for i in report.issues]}, indent=2))
    else:
        for issue in report.issues:
            click.echo(str(issue))
        if report.issues:
            click.echo("")
        click.echo(f"{directory}: {_layout(dataset)}, {dataset.num_classes} classes")
        click.echo(_counttable(report))
        click.echo(f"{len(report.issues)} issue{'s' if len(report.issues) != 1 else ''}" if report.issues else "ok")
    if not report.ok:
        sys.exit(1)


@click.command("advise")
@click.argument("directory", type=click.Path(exists=True, file_okay=True, dir_okay=True))
@click.option("--module", "module_name", default=None, help="The module to fine-tune (installed on demand).")
@click.option("--backbones", default=None,
              help="Comma-separated modules to rank by a cross-validated linear probe of their features, with their "
                   "cost; the advice is then for the best.")
@click.option("--max-per-class", "--max_per_class", "max_per_class", default=20, show_default=True,
              type=click.IntRange(2, 10_000), help="Images per class measured (bounds the time taken).")
@click.option("--list-files", "list_files", is_flag=True, help="Read PaddleHub list files.")
@device_option
@json_option
def advise(directory: str, module_name: str | None, backbones: str | None, max_per_class: int, list_files: bool,
           device: str, as_json: bool) -> None:
    """Recommend a fine-tuning strategy for a dataset, from its size and how well the module's features fit it."""
    names = split_names(backbones)
    if module_name is None and not names:
        raise click.UsageError("give --module NAME, or --backbones A,B,... to rank candidates first")
    if module_name is not None and names:
        raise click.UsageError("give --module or --backbones, not both (the advice is for the best backbone)")
    dataset = _open(directory, list_files)
    ranking = []
    if names:
        ranking = rank_backbones(dataset, [Module(name=n, device=device) for n in names], max_per_class=max_per_class)
        module_name = parse_ref(ranking[0].module)[0]
    advice = advise_dataset(dataset, Module(name=module_name, device=device), max_per_class=max_per_class)
    command = advice.command(module_name, directory)
    if as_json:
        click.echo(json.dumps({"module": module_name, **advice.to_dict(), "command": command,
                               **({"backbones": [r.to_dict() for r in ranking]} if ranking else {})}, indent=2))
        return
    if ranking:
        click.echo(backbone_table(ranking))
        click.echo("")
    kwargs = ", ".join(f"{k}={v!r}" for k, v in advice.kwargs.items())
    click.echo(f"recommended: {advice.strategy}({kwargs})  [{advice.regime}]")
    click.echo(f"run:         {command}")
    click.echo("")
    width = max(len(k) for k in advice.measures)
    for key, value in advice.measures.items():
        click.echo(f"  {key:<{width}}  {value}")
    click.echo("")
    click.echo(click.wrap_text(advice.explanation, width=100))
