"""Why the model errs, on the split a run scores last (test, else validate): the class pairs it
confuses most (read from the confusion matrix), the images it got most wrong (highest loss) as a
grid, and Grad-CAM heat maps of those images: where in the image the evidence for the wrong
class lies. Computed once, on rank 0, at the end of a run; :mod:`.reporting` writes the figures
and shows them on report.html.

Grad-CAM is captum's (``LayerGradCam``, then ``LayerAttribution.interpolate`` to the input size),
for the class the model predicted, at the deepest feature tap whose map still has some
resolution at the run's input size (:func:`gradcam_layer`).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from ..data.datasets import ImageSamples
from ..hub.manifest import FeatureSpec
from ..models.classifier import ClassifierModel
from . import distributed as dist

if TYPE_CHECKING:  # the task calls this module
    from .task import ImageClassifierTask

#: Images in the top-losses grid and its heat maps: enough to see a pattern, few enough that the
#: Grad-CAM pass (one forward and backward of this batch) and the drawing stay a few seconds on a CPU.
MAX_IMAGES = 16
#: Off-diagonal cells of the confusion matrix listed as the most-confused pairs.
MAX_PAIRS = 5
#: Grad-CAM's map at the chosen layer is at least this many cells on its short side: at a small
#: input the last tap is 1x1 (32 px at stride 32), which would paint the whole image one colour.
MIN_CAM_SIDE = 4
#: Grid layout: columns; one tile's width and image height, the caption's height above it, the margin
#: beside the image, in pixels; the caption's font size and the heat map's opacity over the image.
COLUMNS, TILE, CAPTION, MARGIN = 4, 160, 30, 4
FONT_SIZE, HEAT_ALPHA = 11, 0.45
TOP_LOSSES_FILE, GRADCAM_FILE = "top_losses.png", "gradcam.png"


@dataclass
class Diagnosis:
    """What :func:`diagnose` found: a JSON summary (metrics.json's ``diagnosis``) and the figures as PNGs by file name."""

    summary: dict
    figures: dict[str, bytes] = field(default_factory=dict)


def confused_pairs(matrix: Sequence[Sequence[int]], labels: Sequence[str], limit: int = MAX_PAIRS) -> list[dict]:
    """The largest off-diagonal cells of a confusion matrix (rows true, columns predicted), largest first:
    true and predicted class, count, and the count's share of the true class's images."""
    counts = np.asarray(matrix, dtype=np.int64)
    off = counts.copy()
    np.fill_diagonal(off, 0)
    cells = [(int(off[t, p]), t, p) for t, p in zip(*np.nonzero(off))]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))  # ties in a fixed order: the report is reproducible
    return [{"true": labels[t], "predicted": labels[p], "count": count, "share": count / int(counts[t].sum())}
            for count, t, p in cells[:limit]]


def gradcam_layer(model: ClassifierModel, features: FeatureSpec, input_size: Sequence[int]) -> str | None:
    """The backbone submodule Grad-CAM looks at: the cut layer of a cut backbone (the head sees nothing
    later), else the deepest feature tap with a map of at least :data:`MIN_CAM_SIDE` cells at this input
    size (the finest tap when none has), None when the module declares no taps."""
    if model.cut_at is not None:
        return model.cut_at
    if not features.taps:
        return None
    side = min(input_size[1:])
    fine = [t for t in features.taps if side // t.stride >= MIN_CAM_SIDE]
    return (fine[-1] if fine else min(features.taps, key=lambda t: t.stride)).module


def gradcam(model: nn.Module, layer: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray | None, str | None]:
    """Grad-CAM heat maps of ``images`` for the ``targets`` classes, (N, H, W) in [0, 1] (each image scaled
    to its own maximum), or None and why not: a head autograd cannot go through, or a layer whose output
    is not a map of the image (a transformer's tokens). The model is left in eval mode."""
    from captum.attr import LayerAttribution, LayerGradCam  # noqa: PLC0415 (0.7 s of imports, paid once at the end of a run)

    model.eval()
    with torch.enable_grad():
        try:
            attributions = LayerGradCam(model, layer).attribute(images, target=targets, relu_attributions=True)
        except RuntimeError as exc:  # autograd's: the head is not differentiable back to the layer
            return None, f"the model cannot be back-propagated to the layer: {str(exc).splitlines()[0]}"
    if attributions.ndim != 4:
        return None, f"the layer's output is not a map of the image (shape {tuple(attributions.shape)})"
    heat = LayerAttribution.interpolate(attributions.detach().float(), tuple(images.shape[2:]), interpolate_mode="bilinear")
    heat = heat[:, 0].cpu().numpy()
    peak = heat.reshape(len(heat), -1).max(axis=1)[:, None, None]
    return np.divide(heat, peak, out=np.zeros_like(heat), where=peak > 0), None


def diagnose(task: "ImageClassifierTask", split: str, logits: torch.Tensor, labels: torch.Tensor,
             confusion_matrix: Sequence[Sequence[int]]) -> Diagnosis:
    """The confused pairs, the :data:`MAX_IMAGES` highest-loss images of ``split`` and their Grad-CAM maps,
    from the logits and labels the split's evaluation gathered (rows in :func:`.distributed.gathered_order`)."""
    rows = torch.as_tensor(dist.gathered_order(len(labels))).argsort()  # the split's order, whatever the number of ranks
    logits, labels = logits.float()[rows], labels[rows]
    losses = nn.functional.cross_entropy(logits, labels, reduction="none")
    probabilities = logits.softmax(1)
    worst = torch.argsort(losses, descending=True, stable=True)[:MAX_IMAGES].tolist()  # equal losses in the split's order
    samples = task.splits.samples[split]
    chosen = [samples[row] for row in worst]
    images = ImageSamples(chosen, task.transform)
    pixels = torch.stack([images[i][0] for i in range(len(images))])
    predicted = probabilities[worst].argmax(1)
    top = [{"image": sample.origin, "true": task.labels[int(labels[row])], "predicted": task.labels[int(p)],
            "probability": float(probabilities[row, p]), "loss": float(losses[row])}
           for sample, row, p in zip(chosen, worst, predicted)]
    pre = task.preprocessing
    shown = (pixels * torch.tensor(pre.std)[:, None, None] + torch.tensor(pre.mean)[:, None, None]).clamp(0, 1)
    shown = shown.permute(0, 2, 3, 1).numpy()  # what the model saw, un-normalised
    figures = {TOP_LOSSES_FILE: _grid(shown, top, None)}
    layer = gradcam_layer(task.model, task.features_spec, pre.input_size)
    if layer is None:
        heat, note = None, "the module declares no feature taps to take the heat map at"
    else:
        heat, note = gradcam(task.model, task.model.backbone.get_submodule(layer), task.to_device(pixels),
                             predicted.to(task.device))
    if heat is not None:
        figures[GRADCAM_FILE] = _grid(shown, top, heat)
    cam = {"layer": layer, "file": GRADCAM_FILE if heat is not None else None}
    if note:
        cam["skipped"] = note
    summary = {"split": split, "confused_pairs": confused_pairs(confusion_matrix, task.labels),
               "top_losses": top, "top_losses_file": TOP_LOSSES_FILE, "gradcam": cam}
    return Diagnosis(summary, figures)


def _grid(images: np.ndarray, top: list[dict], heat: np.ndarray | None) -> bytes:
    """The images (N, H, W, 3 in [0, 1]) as a PNG grid, each under its true and predicted class and the predicted
    probability (red when wrong), with its heat map blended over it when ``heat`` is given. Drawn with PIL: a
    matplotlib figure of 16 axes took a second, and the grid needs no axes."""
    import matplotlib  # noqa: PLC0415 (heavy: its colour map and font are needed only at the end of a run)

    columns = min(COLUMNS, len(images))
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * TILE, rows * (CAPTION + TILE)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.truetype(str(Path(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")), FONT_SIZE)
    height, width = images.shape[1:3]
    scale = (TILE - 2 * MARGIN) / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    for i, (image, row) in enumerate(zip(images, top)):
        if heat is not None:
            image = (1 - HEAT_ALPHA) * image + HEAT_ALPHA * matplotlib.colormaps["jet"](heat[i])[..., :3]
        tile = Image.fromarray((image * 255).round().astype(np.uint8))
        tile = tile.resize(size, Image.NEAREST if scale > 1 else Image.LANCZOS)  # small inputs stay crisp pixels
        x, y = (i % columns) * TILE, (i // columns) * (CAPTION + TILE)
        sheet.paste(tile, (x + (TILE - size[0]) // 2, y + CAPTION))
        lines = [_fit(draw, font, "true: ", row["true"], ""),
                 _fit(draw, font, "pred: ", row["predicted"], f" ({row['probability']:.0%})")]
        draw.multiline_text((x + TILE // 2, y + 2), "\n".join(lines), font=font, anchor="ma", align="center",
                            fill="black" if row["true"] == row["predicted"] else "#d62728")
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def _fit(draw: ImageDraw.ImageDraw, font: ImageFont.FreeTypeFont, before: str, name: str, after: str) -> str:
    """``before + name + after``, the name shortened (with an ellipsis) until the line fits a tile."""
    line = before + name + after
    while draw.textlength(line, font=font) > TILE - 2 * MARGIN and name:
        name = name[:-1]
        line = before + name + "…" + after
    return line
