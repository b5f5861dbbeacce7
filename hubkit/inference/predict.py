"""Predictions and the one batched prediction loop (decoding in threads while the model runs).

Torch-free: the compiled runtimes (:mod:`hubkit.inference.compiled`) run it without importing torch.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .. import constants
from ..data.images import expand_inputs
from ..errors import ConfigError, HubkitError
from ..hub.fs import atomic_write_json, read_capped


@dataclass(frozen=True)
class ClassScore:
    """One class of a top-k answer."""

    label: str
    index: int
    probability: float

    def to_dict(self) -> dict:
        """The JSON form ``hub run --json`` and the server answer with."""
        return {"label": self.label, "index": self.index, "probability": round(self.probability, 6)}


def top_k_scores(probs: Any, labels: list[str], k: int) -> list[list[ClassScore]]:
    """The ``k`` most probable classes of each row of ``probs`` (N x classes: a numpy array or a CPU
    torch tensor), most probable first."""
    probs = np.asarray(probs, dtype=np.float32)
    indices = np.argsort(-probs, axis=1, kind="stable")[:, :min(k, len(labels))]
    values = np.take_along_axis(probs, indices, axis=1)
    return [[ClassScore(labels[i], i, v) for v, i in zip(row_values, row_indices)]
            for row_values, row_indices in zip(values.tolist(), indices.tolist())]


@dataclass
class Prediction:
    """The top-k classes for one input, or the reason it could not be read."""

    source: str
    top_k: list[ClassScore] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        return {"source": self.source, "error": self.error, "top_k": [c.to_dict() for c in self.top_k]}


def predict_batches(inputs: Any, **loop: Any) -> list[Prediction]:
    """The batched prediction loop shared by ``Module.predict`` and fine-tuned tasks: every
    prediction of :func:`iter_prediction_batches` (same arguments) in one list."""
    return [p for batch in iter_prediction_batches(inputs, **loop) for p in batch]


def iter_prediction_batches(inputs: Any, *, prepare: Callable[[Any], Any], collate: Callable[[list], Any],
                            forward: Callable[[Any], Any], labels: list[str], top_k: int, batch_size: int,
                            errors: str = "raise", on_first_batch: Callable[[], Any] | None = None
                            ) -> Iterator[list[Prediction]]:
    """The predictions of each batch of inputs, in input order, as soon as the batch is done (what
    ``hub run --output`` streams: memory stays flat over any number of files).

    ``prepare`` turns one input into what ``collate`` batches (or returns the HubkitError it
    raised); it runs in threads, the next batch decoding while ``forward`` (a batch to class
    probabilities, a torch tensor or a numpy array) runs the current one. ``on_first_batch`` runs
    while the first batch decodes.
    """
    if errors not in ("raise", "collect"):
        raise ConfigError(f"errors must be 'raise' or 'collect', not {errors!r}")
    if batch_size < 1 or top_k < 1:
        raise ConfigError("batch_size and top_k must be at least 1")
    items = expand_inputs(inputs)
    if not items:
        return
    chunks = [range(start, min(start + batch_size, len(items))) for start in range(0, len(items), batch_size)]
    workers = max(1, min(len(items), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="hubkit-decode") as pool:
        submit = lambda chunk: [pool.submit(prepare, items[i]) for i in chunk]  # noqa: E731
        pending: list[Future] = submit(chunks[0])
        if on_first_batch is not None:
            on_first_batch()
        for n, chunk in enumerate(chunks):
            prepared = [f.result() for f in pending]
            if n + 1 < len(chunks):
                pending = submit(chunks[n + 1])
            results = [Prediction(str(items[i]) if isinstance(items[i], (str, Path)) else f"<{type(items[i]).__name__} #{i}>")
                       for i in chunk]
            kept = []
            for row, value in enumerate(prepared):
                if isinstance(value, HubkitError):
                    if errors == "raise":
                        for f in pending:
                            f.cancel()
                        raise value
                    results[row].error = value.message
                else:
                    kept.append(row)
            if kept:
                probs = forward(collate([prepared[row] for row in kept]))
                for row, scores in zip(kept, top_k_scores(probs, labels, top_k)):
                    results[row].top_k = scores
            yield results


def write_jsonl(batches: Iterable[list[Prediction]], path: str | Path,
                on_batch: Callable[[list[Prediction]], Any] | None = None) -> tuple[int, list[Prediction]]:
    """Write each prediction as one JSON line as its batch comes (flushed per batch, so a killed run
    keeps what was done); returns how many were predicted and the ones that could not be read."""
    predicted, failed = 0, []
    with open(path, "w", encoding="utf-8") as out:
        for batch in batches:
            out.writelines(json.dumps(p.to_dict()) + "\n" for p in batch)
            out.flush()
            failed += [p for p in batch if p.error]
            predicted += sum(1 for p in batch if not p.error)
            if on_batch is not None:
                on_batch(batch)
    return predicted, failed


@dataclass(frozen=True)
class Shard:
    """This process's part of a ``hub run DIR --output`` under ``torchrun``: inputs ``rank::world``,
    predictions written to ``<output>.rank<R>-of-<W>`` and merged into ``output`` by rank 0."""

    rank: int
    world: int
    output: Path
    run_id: str = ""

    @classmethod
    def from_environment(cls, output: str | Path) -> "Shard":
        """The shard torchrun's ``RANK``/``WORLD_SIZE`` give (rank 0 of 1 outside torchrun)."""
        return cls(constants.DIST_RANK, constants.DIST_WORLD_SIZE, Path(output), os.environ.get("TORCHELASTIC_RUN_ID", ""))

    def inputs(self, items: list) -> list:
        return items[self.rank::self.world]

    def part(self, rank: int) -> Path:
        return self.output.with_name(f"{self.output.name}.rank{rank}-of-{self.world}")

    def done(self, rank: int) -> Path:
        return self.output.with_name(f"{self.output.name}.rank{rank}-of-{self.world}.done")

    def finish(self, predicted: int, failed: int, total: int) -> None:
        """Say this rank's part is complete (read by rank 0)."""
        atomic_write_json(self.done(self.rank), {"run_id": self.run_id, "inputs": total, "predicted": predicted,
                                                 "failed": failed})

    def merge(self, total: int, timeout: float = constants.HUBKIT_DIST_TIMEOUT) -> tuple[int, int]:
        """Rank 0: wait for every rank's part, then write ``output`` in input order (the parts'
        lines taken round-robin) and remove the parts; returns (predicted, failed) over all ranks."""
        deadline = time.monotonic() + timeout
        counts = []
        for rank in range(self.world):
            while True:
                record = self._read_done(rank, total)
                if record is not None:
                    counts.append(record)
                    break
                if time.monotonic() > deadline:
                    raise ConfigError(f"rank {rank} did not finish its part of {self.output} within {timeout:.0f} s",
                                      hint="look at that rank's output; HUBKIT_DIST_TIMEOUT sets the wait")
                time.sleep(0.2)
        parts = [open(self.part(rank), encoding="utf-8") for rank in range(self.world)]  # noqa: SIM115 - closed below
        try:
            with open(self.output, "w", encoding="utf-8") as out:
                for lines in itertools.zip_longest(*parts):
                    out.writelines(line for line in lines if line is not None)
        finally:
            for f in parts:
                f.close()
        for rank in range(self.world):
            self.part(rank).unlink()
            self.done(rank).unlink()
        return sum(c["predicted"] for c in counts), sum(c["failed"] for c in counts)

    def _read_done(self, rank: int, total: int) -> dict | None:
        """A rank's completion record when it belongs to this run (same run id and input count)."""
        try:
            record = json.loads(read_capped(self.done(rank), 4096))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("run_id") != self.run_id or record.get("inputs") != total:
            return None  # a stale record of another run: keep waiting for this one's
        if not all(isinstance(record.get(k), int) for k in ("predicted", "failed")):
            return None
        return record


def mirror_averaged(forward: Callable[[Any], Any], mirror: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``forward`` (a batch's class probabilities) averaged with ``forward`` of the batch's mirror image:
    the "flip" test-time augmentation, for numpy and torch batches alike (NCHW: ``mirror`` flips the last axis)."""
    return lambda batch: (forward(batch) + forward(mirror(batch))) / 2
