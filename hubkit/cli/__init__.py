"""The ``hub`` command line: a thin layer over the library, one file per command family.

Expected failures (any :class:`HubkitError`, and a full or read-only disk) print one line,
``error: ...``, and exit 1; usage errors exit 2 (click's convention). Every command is
imported only when it is invoked, so ``hub search``, ``show`` and ``list`` never import torch,
and ``hub --help`` reads the commands' summaries from their source without importing any.
"""
from __future__ import annotations

import ast
import errno
import importlib
import warnings
from pathlib import Path

import click

from ..errors import HubkitError

#: Every command: its name -> "module:attribute" under hubkit.cli, imported on first use.
COMMANDS = {
    "search": "search:search",
    "show": "hub:show",
    "list": "hub:list_",
    "uninstall": "hub:uninstall",
    "install": "install:install",
    "download": "install:download",
    "run": "run:run",
    "export": "export:export",
    "quantize": "quantize:quantize",
    "cache": "cache:cache",
    "validate-data": "data:validate_data",
    "advise": "data:advise",
    "finetune": "finetune:finetune",
    "evaluate": "evaluate:evaluate",
    "predict": "predict:predict",
    "serving": "serving:serving",
    "lock": "fleet:lock",
    "pack": "fleet:pack",
    "unpack": "fleet:unpack",
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
    """Loads commands from :data:`COMMANDS` on demand and turns library errors into one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str):
        if name not in COMMANDS:
            return None
        module, _, attr = COMMANDS[name].partition(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of ``hub --help``: loading the commands to ask them would import torch
        (install, run, finetune, serving), seconds for a page of text."""
        limit = formatter.width - 6 - max(map(len, COMMANDS))
        with formatter.section("Commands"):
            formatter.write_dl([(name, _summary(name, limit)) for name in self.list_commands(ctx)])

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


def _summary(name: str, limit: int) -> str:
    """A command's short help as click makes it from the docstring, read from the command's source file."""
    module, _, attr = COMMANDS[name].partition(":")
    tree = ast.parse((Path(__file__).parent / f"{module}.py").read_text(encoding="utf-8"))
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == attr)
    return click.Command(name, help=ast.get_docstring(function)).get_short_help_str(limit)


def _one_spelling(token: str) -> str:
    """Options and choices match with ``_`` or ``-`` alike (``--input_path`` as PaddleHub writes it, or
    ``--input-path``; ``--strategy freeze-k``): click compares both sides after this."""
    return token.replace("-", "_")


@click.group(cls=HubGroup, context_settings={"help_option_names": ["-h", "--help"], "token_normalize_func": _one_spelling})
@click.version_option(package_name="hubkit")
def cli() -> None:
    """hubkit: pretrained image models and transfer learning for PyTorch."""


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main() -> None:
    """The ``hub`` console script."""
    warnings.formatwarning = _one_line_warning  # `warning: ...`, one line like `error: ...`, no source line
    cli(prog_name="hub")
