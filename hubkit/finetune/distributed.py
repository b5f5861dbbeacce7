"""Data-parallel fine-tuning under ``torchrun``: one process per GPU (or per CPU slot), one node or several.

``torchrun --nproc_per_node N -m hubkit.cli finetune ...`` starts N copies of the same program.
Each reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (:mod:`hubkit.constants`) and joins the
process group through torch's ``env://`` rendezvous (NCCL on CUDA, gloo on the CPU). Outside
torchrun every helper here is the single-process identity, so the training loop reads the same
either way and a one-process run is computed exactly as before.

How the work is divided (docs/distributed.md has the launch commands):

* ``RunConfig.batch_size`` is the *global* batch. Every step, each rank takes its slice
  (``batch[rank::world]``) of the same global batch, so the data order stays a function of
  (seed, epoch), the position in an epoch counts global batches, and exact resume holds.
* The loss is the global batch mean (the local sum over the global count, averaged by DDP), so
  the gradient is the one a single process computes on the whole batch.
* Local rank 0 of each node installs the module and builds the feature cache first; the other
  ranks wait at a barrier, then read what it wrote (:func:`main_process_first`).
* Only rank 0 writes checkpoints, TensorBoard, metrics.json, curves.png and exports. Rank 0
  reads checkpoints and broadcasts them (:func:`run_on_main`), so every rank resumes from the
  same state and the other nodes need no copy of the checkpoint directory.
* Evaluation is sharded: each rank runs its slice of the split and the logits are gathered, so
  every rank computes the same metrics, equal to one process's.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
from typing import Any, Callable, Sequence

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import constants
from ..errors import HubkitError

#: Label of a padding sample (a rank whose slice of a short last batch is empty): no loss, no gradient.
IGNORE_INDEX = -100

_initialized_here = False


def active() -> bool:
    """True inside a process group of more than one process."""
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def rank() -> int:
    return torch_dist.get_rank() if active() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if active() else 1


def local_rank() -> int:
    return constants.DIST_LOCAL_RANK if active() else 0


def is_main() -> bool:
    """True on global rank 0 (the process that writes checkpoints, logs and exports)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when this process is one of several started by torchrun (WORLD_SIZE > 1)."""
    return constants.DIST_WORLD_SIZE > 1


def setup(device: str | torch.device | None = None) -> bool:
    """Join the process group torchrun describes (once); ``False`` for a single process.

    ``device`` is the device training will use (``None``/``"auto"``: CUDA when present): CUDA
    selects NCCL and this process's GPU (``cuda:LOCAL_RANK``), anything else gloo. A process
    group the caller initialised already is used as it is.
    """
    global _initialized_here
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_world_size() > 1
    if not launched_by_torchrun():
        return False
    if not torch_dist.is_available():
        raise HubkitError("torchrun started several processes but this PyTorch has no torch.distributed",
                          hint="install a PyTorch build with distributed support, or run one process")
    kind = torch.device(device).type if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        torch.cuda.set_device(constants.DIST_LOCAL_RANK)
    torch_dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo", init_method="env://",
                            timeout=datetime.timedelta(seconds=constants.HUBKIT_DIST_TIMEOUT))
    _initialized_here = True
    atexit.register(cleanup)
    return True


def cleanup() -> None:
    """Leave the process group if :func:`setup` joined it (safe to call twice)."""
    global _initialized_here
    if _initialized_here and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    _initialized_here = False


def finish() -> None:
    """End a successful job: wait for every rank (rank 0 may still be writing), then leave the group.

    Without it, a rank that finishes early exits while the others still use the group, and
    tearing gloo down at interpreter exit can abort that rank (``terminate called without an
    active exception``), after which torchrun stops rank 0 mid-write. Not for error paths: a
    failed rank exits, and torchrun stops the rest.
    """
    barrier()
    cleanup()


def device_for(device: torch.device) -> torch.device:
    """This rank's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if active() and device.type == "cuda":
        return torch.device("cuda", local_rank())
    return device


def barrier() -> None:
    if active():
        if torch_dist.get_backend() == "nccl":
            torch_dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            torch_dist.barrier()


@contextlib.contextmanager
def main_process_first(local: bool = True):
    """Run the block on (local) rank 0 first, then on the other ranks.

    For work whose result the others can read instead of redoing: installing a module,
    building a feature cache. With ``local`` each node's local rank 0 goes first, which is
    right for node-local caches and still correct on a shared one (installs take a file lock,
    cache entries are written atomically).
    """
    first = (local_rank() if local else rank()) == 0
    if not first:
        barrier()
    try:
        yield
    finally:
        if first:
            barrier()


def broadcast_object(obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    holder = [obj]
    torch_dist.broadcast_object_list(holder, src=0)
    return holder[0]


def run_on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` evaluated on rank 0 only; every rank returns its result, or raises its error.

    For reading files that only rank 0 is sure to see (checkpoints): the value travels to the
    others, so they neither race rank 0's writes nor need the same file system. A hubkit error
    on rank 0 is raised on every rank with the same class and message; any other error as a HubkitError.
    """
    if not active():
        return fn()
    outcome = None
    if is_main():
        try:
            outcome = ("ok", fn())
        except Exception as exc:  # any failure must reach the waiting ranks, or they hang until the timeout
            if isinstance(exc, HubkitError):
                outcome = ("error", type(exc), str(exc), exc.message, exc.hint)
            else:
                message = f"rank 0 failed: {type(exc).__name__}: {exc}"
                outcome = ("error", HubkitError, message, message, None)
            broadcast_object(outcome)
            raise
    outcome = broadcast_object(outcome)
    if outcome[0] == "ok":
        return outcome[1]
    _, cls, text, message, hint = outcome
    error = cls.__new__(cls)
    Exception.__init__(error, text)
    error.message, error.hint = message, hint
    raise error


def all_gather_object(obj: Any) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not active():
        return [obj]
    gathered: list = [None] * world_size()
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def gather_cat(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The concatenation of every rank's ``parts`` (CPU tensors), rank 0's first; None when all are empty."""
    local = torch.cat(list(parts)) if parts else None
    pieces = [p for p in all_gather_object(local) if p is not None]
    return torch.cat(pieces) if pieces else None


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all ranks, in place (confusion matrices, metric sums)."""
    if active():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def shard(indices: Sequence[int]) -> list[int]:
    """This rank's share of ``indices`` (every world_size-th, starting at its rank)."""
    return list(indices)[rank()::world_size()]


def gathered_order(n: int) -> list[int]:
    """Which of ``n`` items each row of :func:`gather_cat` holds when every rank ran its :func:`shard` of
    ``range(n)``: rank 0's share, then rank 1's... (the identity for a single process)."""
    return [i for r in range(world_size()) for i in range(n)[r::world_size()]]


def shard_batches(batches: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[bool]]:
    """This rank's slice of each global batch, and whether it is padding.

    A short last batch may leave a rank nothing; it then runs the batch's first sample as
    padding (labelled :data:`IGNORE_INDEX`: no loss, no gradient) so that it still takes part
    in the step's collective operations.
    """
    local, padded = [], []
    for batch in batches:
        part = list(batch)[rank()::world_size()]
        padded.append(not part)
        local.append(part or list(batch)[:1])
    return local, padded


def mask_padding(labels: torch.Tensor, padded: bool) -> torch.Tensor:
    return torch.full_like(torch.as_tensor(labels), IGNORE_INDEX) if padded else labels


def batch_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """``(loss to backpropagate, global batch mean loss, global batch accuracy)``.

    One process: the plain cross-entropy mean. Several: each rank's summed loss over the global
    sample count times the world size, which DDP's gradient averaging turns into the gradient of
    the global batch mean; the reported loss and accuracy are summed over ranks too.
    """
    if not active():
        loss = nn.functional.cross_entropy(logits, labels)
        return loss, float(loss.detach()), float((logits.detach().argmax(1) == labels).float().mean())
    real = labels != IGNORE_INDEX
    loss_sum = nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((logits.detach().argmax(1) == labels) & real).sum()
    totals = torch.stack([loss_sum.detach().double(), correct.double(), real.sum().double()])
    all_reduce_sum(totals)
    total_loss, total_correct, count = totals.tolist()
    return loss_sum * (world_size() / count), total_loss / count, total_correct / count


def sync_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if not active():
        return
    for buffer in module.buffers():
        torch_dist.broadcast(buffer.data, src=0)


def rank_seed(seed: int) -> int:
    """The seed of this rank's random streams (dropout): rank 0 keeps ``seed``, as one process does."""
    return seed + 1_000_003 * rank()


def gather_rng(state: dict) -> list[dict] | None:
    """Every rank's RNG state (for rank 0's checkpoint), or None for one process."""
    return all_gather_object(state) if active() else None


def rng_for_this_rank(saved: dict, per_rank: list[dict] | None) -> dict:
    """The RNG state this rank resumes from: its own when the checkpoint has it, else rank 0's."""
    if per_rank and rank() < len(per_rank):
        return per_rank[rank()]
    return saved


class Replicated:
    """The trainable module as the training loop calls it: wrapped in DistributedDataParallel
    under torchrun, re-wrapped whenever the set of trainable parameters changes (gradual
    unfreezing), the module itself for one process."""

    def __init__(self, module: nn.Module, device: torch.device, *, find_unused_parameters: bool = False):
        self.module, self.device, self.find_unused = module, device, find_unused_parameters
        self._wrapped: nn.Module | None = None
        self._trainable_names: tuple[str, ...] | None = None

    def module_to_call(self) -> nn.Module:
        """The module to run this step: the DDP wrapper (rebuilt when the trainable set changed) or the module."""
        if not active():
            return self.module
        names = tuple(n for n, p in self.module.named_parameters() if p.requires_grad)
        if names != self._trainable_names:
            self._trainable_names = names
            if not names:
                self._wrapped = self.module
            else:
                ids = [self.device.index] if self.device.type == "cuda" else None
                self._wrapped = DistributedDataParallel(self.module, device_ids=ids,
                                                        find_unused_parameters=self.find_unused)
        return self._wrapped


def run_summary(feature_stats: dict) -> dict:
    """What metrics.json records about a distributed run (empty for one process)."""
    if not active():
        return {}
    return {"world_size": world_size(), "backend": torch_dist.get_backend(),
            "feature_stats_per_rank": all_gather_object(dict(feature_stats))}
