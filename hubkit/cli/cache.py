"""``hub cache``: inspect and clean the local cache (HUBKIT_HOME). Never imports torch."""
from __future__ import annotations

import sys

import click

from ..errors import ConfigError, HubkitError
from ..hub import operations
from ..hub.cache import Cache
from .options import json_option
from .output import emit_json, table


@click.group()
def cache() -> None:
    """Inspect and clean the local cache (HUBKIT_HOME)."""


@cache.command("dir")
def cache_dir() -> None:
    """Print the cache folder."""
    click.echo(Cache().root)


@cache.command("verify")
@click.option("--quick", is_flag=True, help="Check sizes and timestamps only, not full sha256 hashes.")
def cache_verify(quick: bool) -> None:
    """Re-hash every file of every installed module against its install record."""
    results = operations.verify_cache(full=not quick)
    for r in results:
        click.echo(f"{'ok ' if r.ok else 'BAD'}  {r.ref}" + (f"  {r.problem}" if r.problem else ""))
    bad = [r for r in results if not r.ok]
    if bad:
        raise HubkitError(f"{len(bad)} of {len(results)} cache entries are damaged",
                          hint=f"reinstall: hub install --force {' '.join(r.ref for r in bad if '==' in r.ref)}"
                          if any("==" in r.ref for r in bad) else "remove the stray files named above")
    click.echo(f"{len(results)} modules verified")


@cache.command("clear")
@click.option("--downloads", is_flag=True, help="Only delete downloaded source files, keep installed modules.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def cache_clear(downloads: bool, yes: bool) -> None:
    """Delete downloaded files (--downloads) or the whole cache."""
    what = "downloaded files" if downloads else f"the whole cache at {Cache().root}"
    if not yes:
        if not sys.stdin.isatty():  # no one to answer the question: say how to go on instead of "Aborted!"
            raise HubkitError(f"not deleting {what} without confirmation (no terminal to ask on)",
                              hint="pass --yes to confirm")
        if not click.confirm(f"delete {what}?", default=False):
            raise click.Abort()
    freed = operations.clear_cache(downloads_only=downloads)
    click.echo(f"freed {freed / 2**20:.1f} MiB")


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


@cache.command("size")
@json_option
def cache_size(as_json: bool) -> None:
    """Disk used by each installed module, the downloads and the feature cache."""
    items = operations.cache_items()
    if as_json:
        return emit_json([{"kind": i.kind, "name": i.name, "path": str(i.path), "bytes": i.size,
                           "last_used": i.last_used} for i in items])
    modules = [(i.name, _mib(i.size)) for i in items if i.kind == "module"]
    downloads, features = ([i for i in items if i.kind == kind] for kind in ("download", "features"))
    rows = [*[(f"module {name}", size) for name, size in modules],
            (f"downloads ({len(downloads)} files)", _mib(sum(i.size for i in downloads))),
            (f"feature cache ({len(features)} entries)", _mib(sum(i.size for i in features))),
            ("total", _mib(sum(i.size for i in items)))]
    click.echo(table(rows, ("WHAT", "SIZE")))


def _parse_with(parse):
    """A click callback that parses an option's text with a library parser (bad text: usage error)."""
    def callback(ctx: click.Context, param: click.Parameter, value: str | None):
        try:
            return None if value is None else parse(value)
        except ConfigError as exc:
            raise click.BadParameter(str(exc)) from None
    return callback


@cache.command("prune")
@click.option("--older-than", callback=_parse_with(operations.parse_duration), metavar="AGE",
              help="Delete downloads and feature cache entries unused for AGE (e.g. 30d, 12h, 2w).")
@click.option("--max-size", callback=_parse_with(operations.parse_size), metavar="SIZE",
              help="Then delete the least recently used ones until the cache fits in SIZE (e.g. 5G, 500M).")
def cache_prune(older_than: float | None, max_size: int | None) -> None:
    """Free space: delete what can be downloaded or computed again; installed modules are kept."""
    result = operations.prune_cache(older_than=older_than, max_size=max_size)
    click.echo(f"removed {len(result.removed)} items, freed {_mib(result.freed)}; the cache holds {_mib(result.size_after)}")
    if max_size is not None and result.size_after > max_size:
        click.echo("installed modules alone exceed --max-size: `hub uninstall` the ones you no longer need", err=True)
