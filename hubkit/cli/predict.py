"""``hub predict RUN_DIR``: predict with a fine-tuning run's best model, without exporting it."""
from __future__ import annotations

import click

from .options import device_option, json_option
from .output import report_predictions
from .run import image_inputs


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--input_path", "--input-path", required=True, help="An image file or a folder of images.")
@click.option("--top_k", "--top-k", default=5, show_default=True, type=click.IntRange(1, 1000))
@click.option("--recursive", "-r", is_flag=True, help="Also predict the images in subfolders (e.g. class folders).")
@device_option
@json_option
def predict(run_dir: str, input_path: str, top_k: int, recursive: bool, device: str, as_json: bool) -> None:
    """Predict images with the best model of a `hub finetune` run (its --checkpoint_dir)."""
    from ..finetune import ImageClassifierTask  # noqa: PLC0415 - torch only when the command runs

    inputs = image_inputs(input_path, recursive)
    task = ImageClassifierTask.from_run(run_dir, device=device)
    predictions = task.predict(inputs, top_k=min(top_k, len(task.labels)), errors="collect")
    report_predictions(predictions, as_json, {"run": run_dir, "module": task.module.manifest.ref,
                                              "device": str(task.device)})
