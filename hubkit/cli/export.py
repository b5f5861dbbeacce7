"""``hub export``: a module with its ONNX or OpenVINO artefact, checked against torch on real photos."""
from __future__ import annotations

from pathlib import Path

import click

from ..hub.manifest import parse_ref


@click.command()
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(["onnx", "openvino"]), required=True, help="The artefact to write.")
@click.option("--output", default=None, help="Folder to write (default: ./NAME-FORMAT).")
@click.option("--images", default=None,
              help="A photo or a folder of photos for the parity check (default: the examples shipped with hubkit).")
def export(name: str, fmt: str, output: str | None, images: str | None) -> None:
    """Export NAME[==VERSION] (or a module folder) as ONNX or OpenVINO IR, refused unless it agrees with torch."""
    from ..inference.module import Module  # noqa: PLC0415 - the conversion needs torch; `hub --help` must not

    if Path(name).is_dir():
        module = Module(directory=name, device="cpu", runtime="torch", precision="fp32")
    else:
        module = Module(*parse_ref(name), device="cpu", runtime="torch", precision="fp32")
    folder, checked = module.export(fmt, output or f"{module.name}-{fmt}", images)
    click.echo(checked.describe())
    click.echo(f"exported {module.manifest.ref} as {fmt} to {folder}")
