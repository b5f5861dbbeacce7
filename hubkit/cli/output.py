"""How commands print: aligned tables, JSON and predictions."""
from __future__ import annotations

import json
import sys

import click


def table(rows: list[tuple], headers: tuple) -> str:
    """Rows as left-aligned columns under a header and a dashed rule."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(tuple("-" * w for w in widths)), *map(line, rows)])


def emit_json(data) -> None:
    """Print ``data`` as indented JSON on stdout."""
    click.echo(json.dumps(data, indent=2))


def report_predictions(predictions: list, as_json: bool, about: dict) -> None:
    """Print predictions (``about``: what made them, for JSON) and the unreadable inputs; exit 1 when any
    input could not be read, after the others are printed."""
    failed = [p for p in predictions if p.error]
    if as_json:
        emit_json({**about, "predictions": [p.to_dict() for p in predictions]})
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


def backbone_table(ranking: list) -> str:
    """Ranked backbones (``BackboneScore``s, best first) as a table."""
    rows = [(i, r.module, f"{r.probe_accuracy:.4f}", f"{r.probe_C:g}", f"{r.params / 1e6:.1f}M",
             f"{r.images_per_second:.0f}", f"{r.seconds:.1f}") for i, r in enumerate(ranking, 1)]
    return table(rows, ("rank", "backbone", "probe CV acc", "C", "params", "img/s here", "seconds"))
