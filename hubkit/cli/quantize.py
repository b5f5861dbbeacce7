"""``hub quantize``: an int8 variant of a module for OpenVINO, calibrated on the user's photos."""
from __future__ import annotations

from pathlib import Path

import click

from ..hub.manifest import parse_ref


@click.command()
@click.argument("name")
@click.option("--calibration", required=True, type=click.Path(exists=True),
              help="Your photos (a folder, searched recursively): int8 ranges are measured on them.")
@click.option("--eval", "evaluation", default=None, type=click.Path(exists=True, file_okay=False),
              help="Labelled photos (one subfolder per class, named after the module's labels): accuracy before/after.")
@click.option("--output", default=None, help="Folder to write the variant module to (default: ./NAME-int8).")
@click.option("--name", "variant", default=None, help="The variant's module name (default: NAME-int8).")
@click.option("--no-install", is_flag=True, help="Only write the folder; do not install it into the cache.")
def quantize(name: str, calibration: str, evaluation: str | None, output: str | None, variant: str | None,
             no_install: bool) -> None:
    """Quantize NAME[==VERSION] (or a module folder) to int8 with NNCF and install it as NAME-int8."""
    from ..inference.module import Module  # noqa: PLC0415 - the conversion needs torch; `hub --help` must not
    from ..inference.quantize import quantize as quantize_module  # noqa: PLC0415 - imports the runtime
    from ..installer import install  # noqa: PLC0415 - with the library above

    if Path(name).is_dir():
        module = Module(directory=name, device="cpu", runtime="openvino", precision="fp32")
    else:
        module = Module(*parse_ref(name), device="cpu", runtime="openvino", precision="fp32")
    target = output or f"{variant or module.name + '-int8'}"
    report = quantize_module(module, calibration, target, evaluation=evaluation, name=variant)
    for line in report.lines():
        click.echo(line)
    click.echo(f"wrote {report.name} to {report.folder}")
    if not no_install:
        installed = install(str(report.folder), force=True, cache=module.cache, progress=False)
        click.echo(f"installed {installed.ref}: hub run {installed.name} --input_path PHOTO")
