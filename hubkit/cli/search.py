"""``hub search``: ranks the registries' and the catalogue's entries; it reads neither the cache nor the
network and never imports torch (the registry alone, not the cache operations: the command users run most)."""
from __future__ import annotations

import click

from ..hub import registry
from ..hub.catalogue import format_params, licence_terms, parse_params
from ..hub.manifest import TASKS
from .options import json_option
from .output import emit_json, table


def _params_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    try:
        return None if value is None else parse_params(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _licence_cell(licence: str) -> str:
    terms = licence_terms(licence)
    return licence if terms == "permissive" else f"{licence} ({terms})"


@click.command()
@click.argument("keyword", required=False)
@click.option("--task", type=click.Choice(TASKS), help="Only modules of this task.")
@click.option("--tag", "tags", multiple=True, help="Only modules with this tag (repeat: all of them).")
@click.option("--license", "licence", help="Licence ids or terms, comma-separated: apache-2.0, permissive, "
              "non-commercial, custom, unknown.")
@click.option("--max-params", callback=_params_option, help="Largest parameter count: 25000000, 30M, 1.5B.")
@click.option("--input-size", type=click.IntRange(1), help="Only modules evaluated at this resolution (pixels).")
@click.option("--headless/--classifier", default=None, help="Only feature extractors / only classifiers.")
@click.option("--limit", default=30, show_default=True, type=click.IntRange(0), help="Rows to print; 0 prints all.")
@json_option
def search(keyword: str | None, task: str | None, tags: tuple[str, ...], licence: str | None, max_params: int | None,
           input_size: int | None, headless: bool | None, limit: int, as_json: bool) -> None:
    """Find modules by name, tag or summary (KEYWORD: words, or a regex), best match first.

    Built-in modules come first, then the catalogue of every pretrained timm weight on the Hub.
    """
    filters = registry.SearchFilters(task, tags, licence, max_params, input_size, headless)
    entries = registry.search(keyword, filters=filters)
    shown = entries[:limit] if limit else entries
    if as_json:
        return emit_json([{"name": e.name, "version": e.version, "task": e.task, "summary": e.summary,
                           "license": e.license, "licence_terms": e.licence_terms, "params": e.params,
                           "input_size": e.input_size, "headless": e.headless, "aliases": list(e.aliases)}
                          for e in shown])
    if not entries:
        click.echo(f"no module matches '{keyword}' with these filters" if keyword else "no module matches these filters")
        return
    rows = [(e.name, e.version, format_params(e.params), e.input_size or "?", "features" if e.headless else "classifier",
             _licence_cell(e.license)) for e in shown]
    click.echo(table(rows, ("NAME", "VERSION", "PARAMS", "SIZE", "HEAD", "LICENCE")))
    if len(shown) < len(entries):
        click.echo(f"... {len(entries) - len(shown)} more of {len(entries)} (--limit 0 shows all)")
