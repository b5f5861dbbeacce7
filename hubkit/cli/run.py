"""``hub run``: predict the classes of images with a module."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import constants
from ..data.images import expand_inputs
from ..hub.machine import nvidia_driver_present
from ..inference.compiled import open_compiled
from ..inference.predict import Shard, write_jsonl
from .options import device_option, json_option, precision_option, runtime_option
from .output import report_predictions


@click.command()
@click.argument("name")
@click.option("--input_path", "--input-path", required=True, help="An image file or a folder of images.")
@click.option("--top_k", "--top-k", default=5, show_default=True, type=click.IntRange(1, 1000))
@click.option("--batch_size", "--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096))
@click.option("--recursive", "-r", is_flag=True, help="Also predict the images in subfolders (e.g. class folders).")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Stream the predictions as JSON lines into this file (a progress bar and a summary on stderr).")
@device_option
@precision_option
@runtime_option
@json_option
def run(name: str, input_path: str, top_k: int, batch_size: int, recursive: bool, output: str | None, device: str,
        precision: str, runtime: str, as_json: bool) -> None:
    """Predict the classes of an image or a folder of images (installs NAME if needed)."""
    inputs = image_inputs(input_path, recursive)
    shard = Shard.from_environment(output or "-")
    if shard.world > 1:
        if output is None:
            raise click.UsageError("under torchrun, give --output: each rank predicts its share of the files and "
                                   "rank 0 merges them into that file")
        if device == "auto" and nvidia_driver_present():
            device = f"cuda:{constants.DIST_LOCAL_RANK}"  # one GPU per process on each node
    module = open_compiled(name, device=device, runtime=runtime, precision=precision)
    if module is None:
        from ..inference.module import Module  # noqa: PLC0415 - torch is imported only when no compiled artefact is ready

        module = Module(name=name, device=device, precision=precision, runtime=runtime)
    if shard.world > 1:
        _stream_shard(module, inputs, shard, top_k, batch_size)
        return
    if output is not None:
        _stream(module, inputs, output, top_k, batch_size)
        return
    predictions = module.predict(inputs, top_k=top_k, batch_size=batch_size, errors="collect")
    report_predictions(predictions, as_json, {"module": module.manifest.ref, "device": str(module.device),
                                              "precision": module.precision})


def image_inputs(input_path: str, recursive: bool) -> list:
    """The images ``--input_path`` names; a UsageError for a folder with nothing to predict."""
    inputs = expand_inputs(input_path, recursive=recursive)
    if not inputs:
        folders = sorted(p.name + "/" for p in Path(input_path).iterdir() if p.is_dir() and not p.name.startswith("."))
        raise click.UsageError(f"{input_path} holds no files, only folders ({', '.join(folders[:3])}"
                               f"{', ...' if len(folders) > 3 else ''}): pass --recursive to predict the images in them"
                               if folders else f"{input_path} is an empty folder")
    return inputs


def _stream_shard(module, inputs: list, shard: Shard, top_k: int, batch_size: int) -> None:
    """Under torchrun: this rank's share of the inputs into its part file; rank 0 then merges every
    rank's part into ``--output`` in input order and prints the summary for all."""
    shard.done(shard.rank).unlink(missing_ok=True)  # a record of an earlier run must not count for this one
    predicted, failed = _stream(module, shard.inputs(inputs), str(shard.part(shard.rank)), top_k, batch_size,
                                summary=False)
    shard.finish(predicted, len(failed), len(inputs))
    if shard.rank != 0:
        return
    predicted, failed_count = shard.merge(len(inputs))
    click.echo(f"{predicted} of {len(inputs)} inputs predicted by {shard.world} ranks, {failed_count} could not be "
               f"read; wrote {shard.output}", err=True)
    if failed_count:
        sys.exit(1)


def _stream(module, inputs: list, output: str, top_k: int, batch_size: int, *, summary: bool = True):
    """``--output``: JSON lines written batch by batch, unreadable files said on stderr as they come;
    without ``summary``, returns (predicted, failed) instead of saying them and exiting."""
    from tqdm.auto import tqdm  # noqa: PLC0415 - only a streaming run shows a progress bar

    def report(batch) -> None:
        bar.update(len(batch))
        for p in batch:
            if p.error:
                bar.write(f"error: {p.error}", file=sys.stderr)

    with tqdm(total=len(inputs), unit="img", disable=constants.HUBKIT_DISABLE_PROGRESS or not sys.stderr.isatty(),
              dynamic_ncols=True) as bar:
        batches = module.iter_predict(inputs, top_k=top_k, batch_size=batch_size, errors="collect")
        predicted, failed = write_jsonl(batches, output, on_batch=report)
    if not summary:
        return predicted, failed
    click.echo(f"{predicted} of {len(inputs)} inputs predicted, {len(failed)} could not be read; wrote {output}", err=True)
    if failed:
        sys.exit(1)
