"""Data-parallel work across the processes ``torchrun`` or ``accelerate launch`` start.

Both launchers name each process in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``); one process is rank 0 of 1. A stage's work is cut into the batches
one process would make, and rank r takes every N-th of them (``share``), so a batch holds the same
images on any process count: an image depends only on its own seed, and a score or a feature only on
its batch. The ranks hand what they computed to rank 0 as safetensors bytes through the launcher's
store (``gather``: no pickles), and rank 0 alone aggregates and writes the run folder. The image
store (``cache_dir``) must be one folder for every rank (a shared file system across nodes).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Sequence, TypeVar

import torch

from bench.errors import BenchError

T = TypeVar("T")


class RankError(BenchError):
    """A rank lost the others (one was killed, or stopped on an error of its own)."""

    exit_code = 7


@dataclass
class Ranks:
    """This process's place among the launched ones; ``size == 1`` outside a launcher. The ranks meet
    through the launcher's key-value store (``torch.distributed.rendezvous``), never through a process
    group: transformers writes a model's files only on rank 0 of an initialized group, and every rank
    may build an embedded model or scorer of its own."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    store: object = None  # torch.distributed.Store, shared by the ranks
    meetings: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T], batch_size: int) -> list[T]:
        """This rank's items: ``items`` cut into batches of ``batch_size`` in order, every ``size``-th
        batch from the ``rank``-th, concatenated (cut again into ``batch_size`` they are those batches)."""
        batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
        return [item for batch in batches[self.rank :: self.size] for item in batch]

    def barrier(self) -> None:
        """Wait for every rank; a rank that died ends the wait with one line (finished work is kept)."""
        if self.size > 1:
            self.meetings += 1
            key = f"bench/meeting-{self.meetings}"
            with self._lost():
                if self.store.add(key, 1) == self.size:
                    self.store.set(key + "/all", "1")
                self.store.wait([key + "/all"], timedelta(hours=WAIT_HOURS))

    def gather(self, name: str, tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]] | None:
        """Each rank's ``tensors``, in rank order, on rank 0 (None on the others), through the store as
        safetensors bytes (no pickles)."""
        if self.size == 1:
            return [tensors]
        key = f"bench/{name}-{self.meetings}"
        self._post(key, {self.rank: tensors})
        self.barrier()
        if not self.main:
            return None
        parts = self._read(key, range(self.size))
        self._remove(key, range(self.size))
        return parts

    def map_batches(self, count: int, compute: Callable[[int], dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """``compute(i)`` for every batch i < ``count``, each computed on rank i mod N and every result
        on every rank (through the store, as ``gather``): the ranks share work whose whole result each
        of them needs (an online method's round)."""
        if self.size == 1:
            return [compute(i) for i in range(count)]
        key, mine = f"bench/batches-{self.meetings}", range(self.rank, count, self.size)
        self._post(key, {i: compute(i) for i in mine})
        self.barrier()
        out = self._read(key, range(count))
        self.barrier()  # every rank has read every batch
        self._remove(key, mine)
        return out

    def _post(self, key: str, parts: dict[int, dict[str, torch.Tensor]]) -> None:
        from safetensors.torch import save

        for i, tensors in parts.items():
            blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
            with self._lost():
                self.store.set(f"{key}/{i}", blob)

    def _read(self, key: str, indices) -> list[dict[str, torch.Tensor]]:
        from safetensors.torch import load

        with self._lost():
            return [load(self.store.get(f"{key}/{i}")) for i in indices]

    def _remove(self, key: str, indices) -> None:
        with self._lost():
            for i in indices:
                self.store.delete_key(f"{key}/{i}")

    @contextmanager
    def _lost(self):
        try:
            yield
        except (RuntimeError, OSError) as err:  # the store's errors: a peer or its server went away, or the wait timed out
            raise RankError(
                f"rank {self.rank} of {self.size} lost the other ranks ({str(err).splitlines()[0][:120]}): "
                "what was finished is kept; run the same command again to resume"
            ) from None


_CURRENT: Ranks | None = None
WAIT_HOURS = 6  # how long a rank waits for the others (rank 0 alone computes a real set's FID statistics)


def launched() -> bool:
    """Whether a launcher started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Ranks:
    """This process's ranks, meeting the others through the launcher's store on first use. Outside a
    launcher: rank 0 of 1, and nothing is started."""
    global _CURRENT
    if _CURRENT is None:
        if launched():
            import torch.distributed as dist

            store, rank, size = next(dist.rendezvous("env://"))
            _CURRENT = Ranks(rank, size, int(os.environ.get("LOCAL_RANK", "0")), store)
        else:
            _CURRENT = Ranks()
    return _CURRENT


def process_rank() -> int:
    """This process's rank as the launcher set it (0 outside one), without meeting the others."""
    return int(os.environ.get("RANK", "0"))


def join_process_group(device_type: str) -> None:
    """Join the launcher's process group, where collectives need one (training sums its gradients
    with an all-reduce): gloo on CPU, nccl on CUDA. Joined only once every model is built: transformers
    writes a model's files only on rank 0 of an initialized group."""
    import torch.distributed as dist

    if launched() and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(hours=WAIT_HOURS))
