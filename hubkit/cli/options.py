"""Options that several commands share, written once.

The choices here are the library's own (``DEVICES``, ``PRECISIONS``, the CSV split column), spelled out as literals
where importing the library would pull in torch; ``tests/test_cli.py`` checks they agree.
"""
from __future__ import annotations

import click

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")

device_option = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                             help="Where the model runs.")
precision_option = click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                                help="Numeric precision of inference (auto: bf16 where the CPU has it natively).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
runtime_option = click.option("--runtime", type=click.Choice(RUNTIMES), default="auto", show_default=True,
                              help="What runs the model (auto: a compiled runtime on the CPU, torch on CUDA).")
split_column_option = click.option(
    "--split-column", "--split_column", "split_column", default="split", show_default=True,
    help="CSV datasets: the column that says each row's split, used when present ('' splits by ratio instead).")


def split_names(text: str | None) -> list[str]:
    """The module names of a comma-separated option (``--backbones a, b``), blanks dropped."""
    return [name.strip() for name in (text or "").split(",") if name.strip()]
