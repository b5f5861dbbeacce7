"""``hub show``, ``list``, ``uninstall``: read registries and the cache; they never import torch."""
from __future__ import annotations

import click

from .. import constants
from ..hub import operations
from ..hub.catalogue import format_params
from .options import json_option
from .output import emit_json, table

#: How many class names `hub show` prints before "... (--labels lists all)".
SHOWN_LABELS = 5


@click.command()
@click.argument("name")
@click.option("--labels", "all_labels", is_flag=True, help="List every class name, one a line with its index.")
@json_option
def show(name: str, all_labels: bool, as_json: bool) -> None:
    """Describe a module: task, size, licence, preprocessing, feature taps, class names, weights."""
    info = operations.show(name).to_dict()
    if as_json:
        return emit_json(info)
    if all_labels:
        click.echo("\n".join(f"{i}\t{label}" for i, label in enumerate(info["label_names"])))
        return
    pre, feats = info["preprocessing"], info["features"]
    licence = info["license"] if info["licence_terms"] == "permissive" else \
        f"{info['license']}  ({info['licence_terms'].upper()}: check its terms before use)"
    names = info["label_names"]
    more = "; ... (--labels lists all)" if len(names) > SHOWN_LABELS else ""
    labels = (f"{info['labels']}: {'; '.join(names[:SHOWN_LABELS])}{more}" if names  # labels hold commas
              else f"{info['labels']} class names" if info["labels"]
              else "none: a feature extractor (hub run refuses it; use Module.context() or fine-tune it)")
    lines = [f"{info['name']} {info['version']}  ({info['task']})", f"  {info['summary']}",
             f"  architecture  timm:{info['architecture']}, {format_params(info['params'])} parameters,"
             f" {info['num_classes']} outputs",
             f"  licence       {licence}", f"  labels        {labels}", f"  tags          {', '.join(info['tags'])}",
             f"  input         {pre['input_size'][1]}x{pre['input_size'][2]}, {pre['interpolation']}, crop {pre['crop_pct']},"
             f" mean {pre['mean']}, std {pre['std']}",
             f"  features      pooled {feats['pooled']['channels']} channels, stride {feats['pooled']['stride']}"]
    for tap, spec in feats["taps"].items():
        lines.append(f"    {tap:<12}{spec['module']}: {spec['channels']} channels, stride {spec['stride']}")
    lines += [f"  download      {w}" for w in info["weights"]]  # the files fetched; "weights" below is their provenance
    lines += [f"  {k:<13} {v}" for k, v in info["source"].items()]
    installed = f"{info['installed']} (from {info['installed_from']})" if info["installed"] else "no"
    lines.append(f"  installed     {installed}")
    click.echo("\n".join(lines))


@click.command()
@click.argument("names", nargs=-1, required=True)
def uninstall(names: tuple[str, ...]) -> None:
    """Remove installed modules (NAME removes every version, NAME==VERSION one)."""
    for name in names:
        removed = operations.uninstall(name)
        click.echo(f"uninstalled {name.partition('==')[0]} {', '.join(removed)}")


@click.command(name="list")
@json_option
def list_(as_json: bool) -> None:
    """List installed modules."""
    modules = operations.list_modules()
    if as_json:
        return emit_json([{"name": m.name, "version": m.version, "path": str(m.path), **m.record} for m in modules])
    if not modules:
        click.echo("no module installed (try `hub install efficientnet_lite0`)")
        return
    rows = [(m.name, m.version, f"{m.record.get('weights_size', 0) / 2**20:.1f} MiB", _source(m.record.get("source", "")))
            for m in modules]
    click.echo(table(rows, ("NAME", "VERSION", "WEIGHTS", "SOURCE")))


def _source(recorded: str) -> str:
    """Where weights came from; a module folder's own file (an exported module) has no better name than that."""
    return "local module folder or archive" if recorded == constants.WEIGHTS_FILENAME else recorded
