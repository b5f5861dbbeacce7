"""The ``hub`` command line: a thin layer over :mod:`hubkit.api` and :class:`hubkit.Module`.

Expected failures (any :class:`HubkitError`) print one line, ``error: ...``, and exit 1;
usage errors exit 2 (click's convention). Commands that only read registries (search,
show, list) never import torch.
"""
from __future__ import annotations

import errno
import json
import sys

import click

from . import api
from .errors import HubkitError


#: Commands defined in their own modules, imported only when invoked (keeps `hub search` fast).
LAZY_COMMANDS = {
    "finetune": "hubkit._cli_train:finetune",
    "validate-data": "hubkit._cli_data:validate_data",
    "advise": "hubkit._cli_data:advise",
    "serving": "hubkit._cli_serving:serving",
    "lock": "hubkit._cli_fleet:lock",
    "pack": "hubkit._cli_fleet:pack",
    "unpack": "hubkit._cli_fleet:unpack",
}


#: Failures of the machine, not of hubkit: said in one line with what to do, like a HubkitError.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free disk space, or move the cache with HUBKIT_HOME",
    errno.EDQUOT: "free space within your quota, or move the cache with HUBKIT_HOME",
    errno.EACCES: "check the permissions of that path (the cache can be moved with HUBKIT_HOME)",
    errno.EPERM: "check the permissions of that path (the cache can be moved with HUBKIT_HOME)",
    errno.EROFS: "the file system is read-only: move the cache with HUBKIT_HOME",
    errno.ENOTDIR: "a path that should be a folder is a file: check HUBKIT_HOME and the paths given",
}


class HubGroup(click.Group):
    """Turns library errors into one clear line and a non-zero exit, never a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *(n for n in LAZY_COMMANDS if self._lazy(n))})

    def get_command(self, ctx: click.Context, name: str):
        return super().get_command(ctx, name) or self._lazy(name)

    @staticmethod
    def _lazy(name: str):
        import importlib

        if name not in LAZY_COMMANDS:
            return None
        module, _, attr = LAZY_COMMANDS[name].partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                return None  # that area is not part of this build
            raise

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except HubkitError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)
        except OSError as exc:
            if exc.errno not in _ENVIRONMENT_ERRNOS:
                raise  # anything else is a bug: keep its traceback
            where = f": {exc.filename}" if exc.filename else ""
            click.echo(f"error: {exc.strerror or exc}{where} ({_ENVIRONMENT_ERRNOS[exc.errno]})", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def _table(rows: list[tuple], headers: tuple) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(tuple("-" * w for w in widths)), *map(line, rows)])


def _emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


@click.group(cls=HubGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hubkit")
def cli() -> None:
    """hubkit: pretrained image models and transfer learning for PyTorch."""


@cli.command()
@click.argument("keyword", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def search(keyword: str | None, as_json: bool) -> None:
    """Find modules by name, tag or summary (KEYWORD may be a regex)."""
    entries = api.search(keyword)
    if as_json:
        return _emit_json([{"name": e.name, "version": e.version, "task": e.task, "summary": e.summary} for e in entries])
    if not entries:
        click.echo(f"no module matches '{keyword}'")
        return
    click.echo(_table([(e.name, e.version, e.task, e.summary) for e in entries], ("NAME", "VERSION", "TASK", "SUMMARY")))


@cli.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(name: str, as_json: bool) -> None:
    """Describe a module: task, architecture, preprocessing, feature taps, weights."""
    info = api.describe(api.show(name))
    if as_json:
        return _emit_json(info)
    pre = info["preprocessing"]
    lines = [f"{info['name']} {info['version']}  ({info['task']})", f"  {info['summary']}",
             f"  architecture  timm:{info['architecture']}, {info['num_classes']} classes",
             f"  licence       {info['license']}", f"  tags          {', '.join(info['tags'])}",
             f"  input         {pre['input_size'][1]}x{pre['input_size'][2]}, {pre['interpolation']}, crop {pre['crop_pct']},"
             f" mean {pre['mean']}, std {pre['std']}",
             f"  features      pooled {info['features']['pooled']['channels']} channels, stride {info['features']['pooled']['stride']}"]
    for tap, spec in info["features"]["taps"].items():
        lines.append(f"    {tap:<12}{spec['module']}: {spec['channels']} channels, stride {spec['stride']}")
    lines += [f"  weights       {w}" for w in info["weights"]]
    lines += [f"  {k:<13} {v}" for k, v in info["source"].items()]
    lines.append(f"  installed     {info['installed'] or 'no'}")
    click.echo("\n".join(lines))


@cli.command()
@click.argument("targets", nargs=-1)
@click.option("--force", is_flag=True, help="Reinstall even when installed (repairs a damaged install).")
@click.option("--from-pack", "bundle", type=click.Path(dir_okay=False), help="Install every module of a `hub pack` bundle.")
def install(targets: tuple[str, ...], force: bool, bundle: str | None) -> None:
    """Install modules: NAME[==VERSION], a module folder, or a .tar.gz/.zip archive."""
    if not targets and not bundle:
        raise click.UsageError("give modules to install, or --from-pack BUNDLE")
    if bundle:
        from . import fleet

        for module in fleet.unpack(bundle, force=force):
            click.echo(f"installed {module.ref} in {module.path}")
    for target in targets:
        module = api.install(target, force=force)
        click.echo(f"installed {module.ref} in {module.path}")


@cli.command()
@click.argument("names", nargs=-1, required=True)
def uninstall(names: tuple[str, ...]) -> None:
    """Remove installed modules (NAME removes every version, NAME==VERSION one)."""
    for name in names:
        removed = api.uninstall(name)
        click.echo(f"uninstalled {name.partition('==')[0]} {', '.join(removed)}")


@cli.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(as_json: bool) -> None:
    """List installed modules."""
    modules = api.list_modules()
    if as_json:
        return _emit_json([{"name": m.name, "version": m.version, "path": str(m.path), **m.record} for m in modules])
    if not modules:
        click.echo("no module installed (try `hub install efficientnet_lite0`)")
        return
    rows = [(m.name, m.version, f"{m.record.get('weights_size', 0) / 2**20:.1f} MiB", m.record.get("source", "")) for m in modules]
    click.echo(_table(rows, ("NAME", "VERSION", "WEIGHTS", "SOURCE")))


@cli.command()
@click.argument("name")
@click.option("--output_path", "--output-path", default=".", show_default=True, help="Folder (or .tar.gz path) to write to.")
def download(name: str, output_path: str) -> None:
    """Download a module as an installable archive (NAME[==VERSION])."""
    click.echo(f"saved {api.download(name, output_path)}")


@cli.command()
@click.argument("name")
@click.option("--input_path", "--input-path", required=True, help="An image file or a folder of images.")
@click.option("--top_k", "--top-k", default=5, show_default=True, type=click.IntRange(1, 1000))
@click.option("--batch_size", "--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def run(name: str, input_path: str, top_k: int, batch_size: int, device: str, precision: str, as_json: bool) -> None:
    """Predict the classes of an image or a folder of images (installs NAME if needed)."""
    from .module import Module

    from ._images import expand_inputs

    if not expand_inputs(input_path):
        raise click.UsageError(f"{input_path} is an empty folder")
    module = Module(name=name, device=device, precision=precision)
    predictions = module.predict(input_path, top_k=top_k, batch_size=batch_size, errors="collect")
    failed = [p for p in predictions if p.error]
    if as_json:
        _emit_json({"module": module.manifest.ref, "device": str(module.device), "precision": module.precision,
                    "predictions": [p.to_dict() for p in predictions]})
    else:
        for p in predictions:
            if not p.error:
                click.echo(p.source)
                for c in p.top_k:
                    click.echo(f"  {c.probability:7.2%}  {c.label}  ({c.index})")
    for p in failed:
        click.echo(f"error: {p.error}", err=True)
    if failed:
        if len(failed) < len(predictions):
            click.echo(f"{len(failed)} of {len(predictions)} inputs could not be read; the others were predicted", err=True)
        sys.exit(1)


@cli.group()
def cache() -> None:
    """Inspect and clean the local cache (HUBKIT_HOME)."""


@cache.command("dir")
def cache_dir() -> None:
    """Print the cache folder."""
    from ._cache import Cache

    click.echo(Cache().root)


@cache.command("verify")
@click.option("--quick", is_flag=True, help="Check sizes and timestamps only, not full sha256 hashes.")
def cache_verify(quick: bool) -> None:
    """Re-hash every installed module's weights against its install record."""
    results = api.verify_cache(full=not quick)
    for r in results:
        click.echo(f"{'ok ' if r.ok else 'BAD'}  {r.module.ref}" + (f"  {r.problem}" if r.problem else ""))
    bad = [r for r in results if not r.ok]
    if bad:
        raise HubkitError(f"{len(bad)} of {len(results)} installed modules are damaged",
                          hint=f"reinstall: hub install --force {' '.join(r.module.ref for r in bad)}")
    click.echo(f"{len(results)} modules verified")


@cache.command("clear")
@click.option("--downloads", is_flag=True, help="Only delete downloaded source files, keep installed modules.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def cache_clear(downloads: bool, yes: bool) -> None:
    """Delete downloaded files (--downloads) or the whole cache."""
    from ._cache import Cache

    what = "downloaded files" if downloads else f"the whole cache at {Cache().root}"
    if not yes and not click.confirm(f"delete {what}?", default=False):
        raise click.Abort()
    freed = api.clear_cache(downloads_only=downloads)
    click.echo(f"freed {freed / 2**20:.1f} MiB")


def main() -> None:
    cli(prog_name="hub")


if __name__ == "__main__":
    main()
