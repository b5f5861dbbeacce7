"""``hub lock``, ``hub pack``, ``hub unpack``: move pinned modules to machines without network."""
from __future__ import annotations

import click

from .. import fleet
from ..hub.manifest import format_ref


@click.command()
@click.argument("names", nargs=-1)
@click.option("-o", "--output", "--output-path", "output", default=fleet.LOCK_FILENAME, show_default=True, help="Where to write the lockfile.")
def lock(names: tuple[str, ...], output: str) -> None:
    """Pin installed modules (all, or NAMES) in a lockfile: versions, sources, sha256 of every file."""
    data = fleet.lock(names, output=output)
    click.echo(f"locked {len(data['modules'])} module(s) in {output}: "
               + ", ".join(format_ref(m["name"], m["version"]) for m in data["modules"]))


@click.command()
@click.argument("names", nargs=-1)
@click.option("--lock", "lock_path", type=click.Path(dir_okay=False), help="Pack exactly what this lockfile pins.")
@click.option("-o", "--output", "--output-path", "output", required=True, help="The bundle to write (.tar, or .tar.gz to compress).")
def pack(names: tuple[str, ...], lock_path: str | None, output: str) -> None:
    """Bundle installed modules (all, NAMES, or those of --lock) and their lockfile into one archive."""
    path = fleet.pack(names, output=output, lock_path=lock_path)
    click.echo(f"packed {len(fleet.read_bundle_lock(path))} module(s) into {path} ({path.stat().st_size / 2**20:.1f} MiB)")


@click.command()
@click.argument("bundle", type=click.Path(dir_okay=False))
@click.option("--lock", "lock_path", type=click.Path(dir_okay=False),
              help="Verify against this trusted lockfile instead of the bundle's own.")
@click.option("--force", is_flag=True, help="Replace installed versions that differ from the bundle.")
def unpack(bundle: str, lock_path: str | None, force: bool) -> None:
    """Install every module of a bundle without network, after verifying each file's sha256."""
    for module in fleet.unpack(bundle, lock_path=lock_path, force=force):
        click.echo(f"installed {module.ref} in {module.path}")
