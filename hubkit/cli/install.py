"""``hub install`` and ``hub download``: fetch, verify and convert modules into the cache."""
from __future__ import annotations

import click

from .. import fleet
from ..hub import operations
from ..hub.cache import Cache
from ..hub.manifest import parse_ref
from ..installer import download as download_archive
from ..installer import install as install_target


@click.command()
@click.argument("targets", nargs=-1)
@click.option("--force", is_flag=True, help="Reinstall even when installed (repairs a damaged install).")
@click.option("--from-pack", "bundle", type=click.Path(dir_okay=False), help="Install every module of a `hub pack` bundle.")
@click.option("--upgrade", "-U", is_flag=True, help="Install the registries' newest version of each NAME.")
def install(targets: tuple[str, ...], force: bool, bundle: str | None, upgrade: bool) -> None:
    """Install modules: NAME[==VERSION], a module folder, or a .tar.gz/.zip archive.

    NAME alone keeps an installed version (and says when a newer one exists); --upgrade installs the newest.
    """
    if not targets and not bundle:
        raise click.UsageError("give modules to install, or --from-pack BUNDLE")
    if bundle:
        for module in fleet.unpack(bundle, force=force):
            click.echo(f"installed {module.ref} in {module.path}")
    for target in targets:
        module = install_target(operations.upgrade_target(target) if upgrade else target, force=force)
        newer = operations.newer_version(module.name, module.version)
        click.echo(f"installed {module.ref} in {module.path}"
                   + (f" ({newer} is available: hub install --upgrade {module.name})" if newer else ""))


@click.command()
@click.argument("name")
@click.option("-o", "--output_path", "--output-path", default=".", show_default=True, help="Folder (or .tar.gz path) to write to.")
def download(name: str, output_path: str) -> None:
    """Download a module as an installable archive (NAME[==VERSION]); it is installed in the cache too."""
    archive = download_archive(name, output_path)
    module = Cache().get(*parse_ref(name))  # the archive is packed from the installed copy
    click.echo(f"saved {archive}")
    click.echo(f"{module.ref} is also installed in the cache ({module.path}); `hub uninstall {module.name}` removes it")
