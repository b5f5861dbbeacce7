"""How commands print: aligned tables and JSON."""
from __future__ import annotations

import json

import click


def table(rows: list[tuple], headers: tuple) -> str:
    """Rows as left-aligned columns under a header and a dashed rule."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(tuple("-" * w for w in widths)), *map(line, rows)])


def emit_json(data) -> None:
    """Print ``data`` as indented JSON on stdout."""
    click.echo(json.dumps(data, indent=2))
