"""Data-parallel meta-training: a meta-batch split across the ranks of a ``torch.distributed`` job.

Every rank draws the same meta-batch description from the run's generator (so the generator
advances identically everywhere and the tasks of a step depend on the seed alone), builds and
adapts only its own contiguous share of the tasks with the same vmapped code, and weights its
share of the loss by ``share / meta_batch``. The gradients are then SUM-all-reduced, which gives
every rank the gradient of the mean over the whole meta-batch, exactly (up to the order of
floating-point sums), uneven shares included. The second-order terms stay inside each rank's
own backward pass, so the meta-gradient is as exact as a single process's. Every rank then
takes the same optimizer step. :func:`fmaml.training.train.meta_gradient` sends the gradients, the
loss and score shares and the ranks' NaN flags in one all-reduce per step.

Nothing here runs without a process group: a single process never calls a collective.

A loop of your own does the same (after ``torch.distributed.init_process_group``)::

    ranks = fmaml.training.distributed.current()
    start, stop = ranks.share(num_tasks)                 # this rank's tasks of the meta-batch
    loss = fmaml.meta_loss(loss_fn, params, my_tasks, fmaml.InnerLoop(0.4))  # tasks start:stop
    (loss * (stop - start) / num_tasks).backward()
    ranks.all_reduce_gradients(params.values())          # the whole meta-batch's gradient
    optimizer.step()                                     # the same step on every rank

Launch with ``torchrun --nproc_per_node=N cli.py train ...``; the command line calls
:func:`init_from_env`. The backend is NCCL for CUDA tensors and Gloo for CPU tensors
(``"cpu:gloo,cuda:nccl"`` where CUDA is available, else ``"gloo"``).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fmaml.errors import FmamlError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""The variables ``torchrun`` sets for every worker; all of them mean "launched by torchrun"."""


class RankFailure(FmamlError, RuntimeError):
    """A rank lost contact with the others (one died or was stopped) or was told to stop."""


def task_range(num_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``(start, stop)`` of ``num_items`` items.

    The first ``num_items % world_size`` ranks get one item more than the others, so the
    shares differ by at most one and cover ``0 .. num_items`` in rank order.

    Raises:
        ValueError: ``rank`` outside ``0 .. world_size - 1``.

    Example:
        >>> [task_range(5, r, 2) for r in range(2)]
        [(0, 3), (3, 5)]
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"task_range(): need 0 <= rank < world_size, got rank={rank}, world_size={world_size}."
        )
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@dataclass(frozen=True)
class Ranks:
    """This process's place in an initialised ``torch.distributed`` job, and its collectives.

    Every collective turns a communication failure into :class:`RankFailure`.

    Attributes:
        rank: this process's rank, ``0 .. world_size - 1``; rank 0 logs and writes checkpoints.
        world_size: the number of processes.
    """

    rank: int
    world_size: int

    def share(self, num_items: int) -> tuple[int, int]:
        """This rank's ``(start, stop)`` of ``num_items`` (see :func:`task_range`)."""
        return task_range(num_items, self.rank, self.world_size)

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        _collective(torch.distributed.all_reduce, tensor)
        return tensor

    def all_reduce_gradients(self, leaves: Iterable[Tensor]) -> None:
        """Sum the ``.grad`` of every leaf over the ranks, in place (:meth:`all_reduce_many`).

        Leaves without a gradient are skipped: every rank runs the same code, so the same leaves
        lack one everywhere.
        """
        self.all_reduce_many([leaf.grad for leaf in leaves if leaf.grad is not None])

    def all_reduce_many(self, tensors: Iterable[Tensor]) -> None:
        """Sum each tensor over the ranks, in place, with one all-reduce per dtype and device.

        Every rank must pass tensors of the same shapes, dtypes and devices, in the same order.
        """
        by_kind: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for tensor in tensors:
            by_kind.setdefault((tensor.dtype, tensor.device), []).append(tensor)
        for group in by_kind.values():
            flat = self.all_reduce(torch.cat([t.reshape(-1) for t in group]))
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; tensors arrive on the CPU as sent)."""
        box = [obj if self.rank == 0 else None]
        _collective(torch.distributed.broadcast_object_list, box, src=0)
        return box[0]

    def gather_rows(self, local: Tensor, start: int, num_rows: int) -> Tensor:
        """Every rank's rows ``start : start + len(local)`` joined into one ``[num_rows, ...]``.

        The rows are summed into a float64 zero buffer (adding zeros is exact), so the result
        is bit-for-bit the rows each rank computed, on every rank.
        """
        rows = torch.zeros(num_rows, *local.shape[1:], dtype=torch.float64, device=local.device)
        rows[start : start + local.shape[0]] = local.to(torch.float64)
        return self.all_reduce(rows)

    def check_same(self, items: Mapping[str, int], device: torch.device | str = "cpu") -> None:
        """Raise on every rank unless every rank holds the same ``items`` (e.g. fingerprints).

        Raises:
            RuntimeError: naming the items the ranks disagree on.
        """
        names = list(items)
        values = torch.tensor([float(items[k]) for k in names], dtype=torch.float64, device=device)
        extremes = self.all_reduce_max(torch.cat([values, -values]))
        highest, lowest = extremes[: len(names)], -extremes[len(names) :]
        differ = [k for k, hi, lo in zip(names, highest, lowest, strict=True) if hi != lo]
        if differ:
            raise RuntimeError(
                f"rank {self.rank} of {self.world_size}: the ranks disagree on {differ}. Every "
                "rank must start from the same settings, parameters and task generator: launch "
                "every rank with the same arguments (torchrun does), on devices of one kind."
            )

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        """The element-wise maximum of ``tensor`` over the ranks, in place; returns it."""
        _collective(torch.distributed.all_reduce, tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor


def _collective(function, *args, **kwargs) -> None:
    try:
        function(*args, **kwargs)
    except RuntimeError as error:  # torch's DistBackendError, Gloo's "Connection closed by peer"
        raise RankFailure(f"lost contact with another rank ({_reason(error)})") from error


def _reason(error: Exception) -> str:
    """The gist of a backend error: its first sentence, without the source location."""
    text = str(error).strip() or repr(error)
    text = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0])
    return text.split(". This is typically")[0][:200]


def current() -> Ranks | None:
    """The initialised ``torch.distributed`` job this process belongs to, else ``None``."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size())


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a worker started by ``torchrun`` (all of :data:`TORCHRUN_ENV`)."""
    env = os.environ if env is None else env
    return all(name in env for name in TORCHRUN_ENV)


def restart_count(env: Mapping[str, str] | None = None) -> int:
    """How many times torchrun has restarted this job's workers (``--max-restarts``)."""
    env = os.environ if env is None else env
    return int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def backend() -> str:
    """``"cpu:gloo,cuda:nccl"`` where CUDA and NCCL are available, else ``"gloo"``.

    Collectives then run on NCCL for tensors on a GPU and on Gloo for tensors on the CPU.
    """
    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init_from_env() -> Ranks | None:
    """Join the job torchrun started this process in; ``None`` when not launched by torchrun.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. With
    CUDA, the rank's GPU is ``cuda:LOCAL_RANK`` (so ``--device cuda`` means "my GPU").

    Raises:
        RuntimeError: torch.distributed is not available in this build of torch.
    """
    if not launched_by_torchrun():
        return None
    if not torch.distributed.is_available():
        raise RuntimeError(
            "this torch has no torch.distributed; run without torchrun, or install a torch "
            "build with distributed support."
        )
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        store = _attempt_store()
        if store is None:
            torch.distributed.init_process_group(backend=backend())
        else:
            torch.distributed.init_process_group(
                backend=backend(),
                store=store,
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
            )
    return current()


def _attempt_store(env: Mapping[str, str] | None = None):
    """The agent's store scoped to this restart, where torchrun would hand out a stale one.

    torchrun's c10d rendezvous (``--standalone`` included) keeps one store for the whole job and
    ``init_process_group`` adds no per-restart prefix, so after an elastic restart a worker can
    read the previous attempt's Gloo/NCCL addresses and fail to connect (pytorch/pytorch#135712;
    seen here with torch 2.14: "Gloo connectFullMesh failed ... Connection refused"). With one
    agent (``GROUP_WORLD_SIZE=1``) every worker has the same ``TORCHELASTIC_RESTART_COUNT``, so
    the keys are scoped by it. With several machines the counts can differ between agents
    (pytorch/pytorch#108158): there ``None`` is returned, and ``--max-restarts`` needs
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's environment.
    """
    env = os.environ if env is None else env
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or env.get("GROUP_WORLD_SIZE") != "1":
        return None
    from torch.distributed.constants import default_pg_timeout

    agent = torch.distributed.TCPStore(
        env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=default_pg_timeout
    )
    return torch.distributed.PrefixStore(f"fmaml/attempt-{restart_count(env)}", agent)


def shutdown() -> None:
    """Leave the job (``destroy_process_group``) if this process joined one.

    Every rank waits at a barrier first: a rank that tears its Gloo group down while another
    is still tearing down (or finishing its last collective) could make that one abort with
    "terminate called without an active exception" (seen in 3 of 5 runs of the torchrun
    ``test`` command's test).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def fingerprint(value: Any) -> int:
    """A 52-bit hash of tensors, dicts and lists of them, or of ``repr`` of anything else.

    52 bits: it is exact as a float64, so ranks can compare it with one all-reduce.
    """
    digest = hashlib.blake2b(digest_size=8)
    _feed(digest, value)
    return int.from_bytes(digest.digest(), "little") >> 12


def _feed(digest, value: Any) -> None:
    if isinstance(value, Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{tensor.dtype}{tuple(value.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            digest.update(repr(key).encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            _feed(digest, item)
    else:
        digest.update(repr(value).encode())
