"""Dynamic micro-batching: concurrent single-image requests for one module run as one forward.

A :class:`MicroBatcher` takes up to ``max_batch`` requests, or whatever arrived within
``max_wait_ms`` of the first, and runs them in a worker thread so that the event loop keeps
accepting requests while the model computes.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import ConfigError
from .limits import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_MS

if TYPE_CHECKING:  # pragma: no cover
    from ..inference.module import Module


@dataclass
class BatchStats:
    """What a batcher has run: how many requests, in how many forwards, of which sizes."""

    requests: int = 0
    batches: int = 0
    failed_batches: int = 0
    batch_sizes: Counter = field(default_factory=Counter)

    def record(self, size: int) -> None:
        self.requests += size
        self.batches += 1
        self.batch_sizes[size] += 1

    def to_dict(self) -> dict:
        return {"requests": self.requests, "batches": self.batches, "failed_batches": self.failed_batches,
                "largest_batch": max(self.batch_sizes, default=0),
                "mean_batch": round(self.requests / self.batches, 3) if self.batches else 0.0,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


class MicroBatcher:
    """Gathers single-image requests for one module into batched forwards.

    ``submit`` queues one preprocessed image and waits for its probability row. A worker
    task (started on first use, in the running event loop) takes the first waiting request,
    waits up to ``max_wait_ms`` for more (at most ``max_batch`` in all), runs
    ``module.forward_probabilities`` on the stacked batch in a dedicated thread and hands
    every caller its row. ``max_batch=1`` turns batching off.
    """

    def __init__(self, module: "Module", *, max_batch: int = DEFAULT_MAX_BATCH, max_wait_ms: float = DEFAULT_MAX_WAIT_MS):
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, not {max_batch}")
        if max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be 0 or more, not {max_wait_ms}")
        self.module = module
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._pending: list[tuple["torch.Tensor", asyncio.Future]] = []
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"forward-{module.name}")

    async def submit(self, image: "torch.Tensor") -> tuple["torch.Tensor", int]:
        """The class probabilities of one preprocessed image, and the size of the batch it ran in."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():  # first use, or a new event loop
            self._pending = [(image, fut) for image, fut in self._pending if fut.get_loop() is loop]
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._run(), name=f"batcher-{self.module.name}")
        future = loop.create_future()
        self._pending.append((image, future))
        self._arrived.set()
        return await future

    async def _gather(self) -> list[tuple["torch.Tensor", asyncio.Future]]:
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(self._pending) < self.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        taken, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
        return [(image, fut) for image, fut in taken if not fut.done()]  # a cancelled caller is gone

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._gather()
            if not items:
                continue
            try:
                # stacked in numpy: a torch op starts torch's OpenMP team, whose spinning threads then
                # take the cores from a compiled runtime's own threads (and from decoding)
                batch = torch.from_numpy(np.stack([image.numpy() for image, _ in items]))
                probs = await loop.run_in_executor(self._executor, self.module.forward_probabilities, batch)
            except Exception as exc:  # a failed forward fails its requests, never the worker
                self.stats.failed_batches += 1
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.stats.record(len(items))
            for row, (_, fut) in enumerate(items):
                if not fut.done():
                    fut.set_result((probs[row], len(items)))

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False)
