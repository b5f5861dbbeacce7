"""What a training run shows and leaves behind: the progress bar, TensorBoard scalars,
``metrics.json`` (summary and history), ``curves.png`` and ``report.html`` (all of it on one page).
Only rank 0 writes (see distributed)."""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterable

from tqdm.auto import tqdm

from .. import constants
from ..hub.fs import atomic_write_bytes, atomic_write_json, atomic_write_text
from . import distributed as dist
from .diagnosis import Diagnosis

#: Where training reports its progress as plain lines (``hub finetune`` shows them when stderr is not a terminal).
_log = logging.getLogger("hubkit.finetune")


def progress_bar(iterable: Iterable | None, desc: str, *, enabled: bool, total: int | None = None, initial: int = 0):
    """A tqdm bar, hidden when disabled (``RunConfig.progress``, ``HUBKIT_DISABLE_PROGRESS``), on ranks other
    than 0, and where stderr is not a terminal (a pipe or a log file: the run logs plain lines to ``_log``)."""
    disable = constants.HUBKIT_DISABLE_PROGRESS or not enabled or not dist.is_main() or not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, initial=initial, disable=disable, leave=False, dynamic_ncols=True)


class _NoWriter:
    """What ranks other than 0 log to: nothing."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class TrainingLog:
    """The scalars of a run, logged to TensorBoard (``<checkpoint_dir>/tensorboard``) and the progress bar."""

    def __init__(self, directory: Path, *, total_steps: int, initial_step: int, show_progress: bool):
        self.writer = _summary_writer(directory)
        self.total_steps = total_steps
        self.bar = progress_bar(None, "finetune", enabled=show_progress, total=total_steps, initial=initial_step)

    def step_done(self) -> None:
        self.bar.update(1)

    def train(self, step: int, record: dict, penalty: float | None) -> None:
        """One log interval's mean training loss and accuracy, and the learning rate (and L2-SP penalty)."""
        for name in ("loss", "acc", "lr"):
            self.writer.add_scalar(f"train/{name}", record[name], step)
        if penalty is not None:
            self.writer.add_scalar("train/l2_sp", penalty, step)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}")
        _log.info("step %d/%d (epoch %d): train loss %.4f, acc %.4f", step, self.total_steps, record["epoch"] + 1,
                  record["loss"], record["acc"])

    def evaluation(self, split: str, step: int, result: dict, metrics: Iterable[str]) -> None:
        for name in ("loss", *metrics):
            self.writer.add_scalar(f"{split}/{name}", result[name], step)
        _log.info("step %d/%d: %s %s", step, self.total_steps, split,
                  ", ".join(f"{name} {result[name]:.4f}" for name in ("loss", *metrics)))

    def close(self) -> None:
        self.bar.close()
        self.writer.close()


def _summary_writer(directory: Path):
    if not dist.is_main():
        return _NoWriter()
    from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (TensorBoard is heavy: only training runs load it)

    return SummaryWriter(log_dir=str(Path(directory) / "tensorboard"))


def write_reports(directory: Path, history: dict, summary: dict, diagnosis: Diagnosis | None = None) -> None:
    """metrics.json (summary + history), curves.png (train vs validation loss and accuracy), the diagnosis's
    figures (top_losses.png, gradcam.png) and report.html; rank 0 only, once, at the end of the run: only
    then are the final scores known, and the page costs nothing while training."""
    if not dist.is_main():
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if diagnosis is not None:
        summary = {**summary, "diagnosis": diagnosis.summary}
    data = json.loads(json.dumps({**summary, "history": history}, default=str))  # JSON types only, as read back
    atomic_write_json(directory / "metrics.json", data)
    curves = _curves_png(history)
    atomic_write_bytes(directory / "curves.png", curves)
    figures = diagnosis.figures if diagnosis is not None else {}
    for name, png in figures.items():
        atomic_write_bytes(directory / name, png)
    atomic_write_text(directory / REPORT_FILE, report_html(data, curves, directory, figures))


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib  # noqa: PLC0415 (matplotlib is heavy: loaded only to draw the curves)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (after choosing the Agg backend)

    return plt


def figure_png(fig) -> bytes:
    """A finished figure as PNG bytes (the figure is closed)."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    pyplot().close(fig)
    return buffer.getvalue()


def _curves_png(history: dict[str, Any]) -> bytes:
    """Loss and accuracy against the step, training and validation, as a PNG."""
    fig, (ax_loss, ax_acc) = pyplot().subplots(1, 2, figsize=(10, 4))
    for name, rows in (("train", history.get("train", [])), ("train, epoch mean", history.get("train_epoch", [])),
                       ("validation", history.get("eval", []))):
        if rows:
            steps = [r["step"] for r in rows]
            marker = "." if len(rows) < 30 else None
            ax_loss.plot(steps, [r["loss"] for r in rows], marker=marker, label=name)
            if "acc" in rows[0]:
                ax_acc.plot(steps, [r["acc"] for r in rows], marker=marker, label=name)
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    return figure_png(fig)


# --- report.html -----------------------------------------------------------------------------------
REPORT_FILE = "report.html"
#: Classes beyond which the confusion matrix is left out of report.html (it stays in metrics.json): a heat
#: map of N x N cells is unreadable, and megabytes of HTML, long before N reaches ImageNet's 1,000.
MAX_REPORT_CLASSES = 100
#: Items of a list setting (the labels) shown before "... (N in all)".
MAX_LISTED = 20
#: The page loads nothing and runs nothing: no network, no script (what a hostile class name could inject).
_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.where { color: #666; overflow-wrap: anywhere; } table { border-collapse: collapse; margin: 0.5em 0; }
th, td { padding: 0.25em 0.6em; border: 1px solid #ddd; text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; overflow-wrap: anywhere; max-width: 40em; }
img { max-width: 100%; } .note { color: #666; }
"""
_SCORES = ("acc", "precision", "recall", "f1", "loss")
_WHITE = "; color: #fff"  # on the darker half of the heat map


def report_html(summary: dict, curves_png: bytes, directory: Path, figures: dict[str, bytes]) -> str:
    """The run on one self-contained page: scores, learning curves (embedded PNG), confusion matrix as a
    heat map, per-class report, why the model errs (``summary["diagnosis"]``, its ``figures`` embedded) and
    configuration. Every text from the run (class names, paths, settings) is escaped, and a content security
    policy forbids any script or fetch."""
    metrics = summary.get("metrics") or {}
    module = (summary.get("configuration") or {}).get("module", "")
    parts = [f"<h1>Fine-tuning report{': ' + _e(module) if module else ''}</h1>",
             f'<p class="where">{_e(directory)}</p>',
             '<h2>Scores</h2>', _scores_table(summary, metrics),
             '<h2>Learning curves</h2>',
             _figure("curves", curves_png, "training and validation loss and accuracy against the step")]
    if metrics.get("per_class"):
        names = list(metrics["per_class"])
        parts += [f'<h2>Confusion matrix ({_e(metrics.get("split", ""))})</h2>', _confusion_table(names, metrics),
                  "<h2>Per-class report</h2>", _per_class_table(metrics["per_class"])]
    if summary.get("diagnosis"):
        parts += _diagnosis_section(summary["diagnosis"], figures)
    run = {k: v for k, v in summary.items() if k not in ("metrics", "configuration", "history", "diagnosis")}
    parts += ["<h2>Run</h2>", _settings_table(run)]
    if summary.get("configuration"):
        parts += ["<h2>Configuration</h2>", _settings_table(summary["configuration"])]
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_POLICY}">'
            f"<title>hubkit report {_e(module)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else _e(value)


def _scores_table(summary: dict, metrics: dict) -> str:
    best = summary.get("best_score")
    line = (f'<p id="best">best {_e(summary.get("metric", ""))} <b>{_number(best)}</b> at step '
            f'{_e(summary.get("best_step"))}</p>' if best is not None else "")
    if not metrics:
        return line + '<p class="note">no split was evaluated</p>'
    head = "".join(f"<th>{name}</th>" for name in ("split", "images", *_SCORES))
    cells = "".join(f'<td data-score="{name}">{_number(metrics.get(name, ""))}</td>' for name in _SCORES)
    return (f'{line}<table id="scores"><tr>{head}</tr><tr><td class="text">{_e(metrics.get("split", ""))}</td>'
            f'<td>{_e(metrics.get("images", ""))}</td>{cells}</tr></table>')


def _confusion_table(names: list[str], metrics: dict) -> str:
    """Counts, rows the true class and columns the predicted one, each cell shaded by its share of the row."""
    if len(names) > MAX_REPORT_CLASSES:
        return f'<p class="note">{len(names)} classes: the matrix is in metrics.json (over {MAX_REPORT_CLASSES})</p>'
    rows = []
    for name, counts in zip(names, metrics["confusion_matrix"]):
        total = max(sum(counts), 1)
        cells = "".join(f'<td style="background: rgba(31, 119, 180, {count / total:.3f}){_WHITE if count > total / 2 else ""}">'
                        f"{count}</td>" for count in counts)
        rows.append(f'<tr><th class="text">{_e(name)}</th>{cells}</tr>')
    head = "".join(f'<th class="text">{_e(name)}</th>' for name in names)
    return (f'<table id="confusion"><tr><th class="text">true \\ predicted</th>{head}</tr>' + "".join(rows)
            + "</table>")


def _per_class_table(per_class: dict) -> str:
    rows = "".join(f'<tr><td class="text">{_e(name)}</td>'
                   + "".join(f"<td>{_number(scores.get(k, ''))}</td>" for k in ("precision", "recall", "f1", "support"))
                   + "</tr>" for name, scores in per_class.items())
    return ('<table id="per-class"><tr><th class="text">class</th><th>precision</th><th>recall</th><th>f1</th>'
            f"<th>support</th></tr>{rows}</table>")


def _diagnosis_section(diagnosis: dict, figures: dict[str, bytes]) -> list[str]:
    """The most-confused class pairs, the highest-loss images and their Grad-CAM heat maps (or why there are none)."""
    pairs = diagnosis["confused_pairs"]
    rows = "".join(f'<tr><td class="text">{_e(p["true"])}</td><td class="text">{_e(p["predicted"])}</td>'
                   f'<td>{_e(p["count"])}</td><td>{p["share"]:.1%}</td></tr>' for p in pairs)
    parts = [f'<h2 id="why">Why it errs ({_e(diagnosis["split"])})</h2>', "<h3>Most-confused classes</h3>",
             '<table id="confused"><tr><th class="text">true</th><th class="text">predicted</th><th>images</th>'
             f'<th>share of true</th></tr>{rows}</table>' if pairs else '<p class="note">no image was misclassified</p>',
             "<h3>Highest-loss images</h3>",
             _figure("top-losses", figures[diagnosis["top_losses_file"]], "the highest-loss images, true and predicted class")]
    cam = diagnosis["gradcam"]
    parts.append(f'<h3>Grad-CAM of the predicted class (at {_e(cam["layer"] or "no layer")})</h3>')
    if cam.get("skipped"):
        parts.append(f'<p class="note" id="gradcam-skipped">no heat maps: {_e(cam["skipped"])}</p>')
    else:
        parts.append(_figure("gradcam", figures[cam["file"]], "where the evidence for the predicted class lies"))
    return parts


def _figure(element_id: str, png: bytes, alt: str) -> str:
    return f'<img id="{element_id}" alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _settings_table(settings: dict) -> str:
    """Nested settings as one row per dotted key; a long list shows its first items and its length."""
    rows = []

    def add(key: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                add(f"{key}.{k}" if key else str(k), v)
            return
        if isinstance(value, list) and len(value) > MAX_LISTED:
            value = ", ".join(map(str, value[:MAX_LISTED])) + f", ... ({len(value)} in all)"
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        rows.append(f'<tr><th class="text">{_e(key)}</th><td class="text">{_e(value)}</td></tr>')

    add("", settings)
    return '<table class="settings">' + "".join(rows) + "</table>"
