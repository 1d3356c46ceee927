"""Scale-out on torch.distributed: under ``torchrun`` every rank holds a replica, takes a share of the work
(gradient batches, SVDs, candidates), and the results are gathered so that every rank — and rank 0, which
alone writes files — ends with exactly what one process would have computed.

Exactness: shares are interleaved by index, results are gathered as Python objects and re-assembled in the
single-process order; per-batch gradients are summed in batch order, which is the order in which one process
accumulates them into ``.grad``. Ties therefore resolve identically and the plan and report are the same.

A rank that raises ends its process; torchrun then stops the others, and every collective has a timeout
(``C2I_DIST_TIMEOUT`` seconds, default 600), so no rank waits forever.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def active() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group torchrun set up (gloo on CPU, nccl when each rank has a GPU)."""
    if not active() or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=float(os.environ.get("C2I_DIST_TIMEOUT", "600")))
    dist.init_process_group(backend=backend, timeout=timeout)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if os.environ.get("C2I_TEST_FAIL_RANK") == str(dist.get_rank()):   # for the failure test only
        raise RuntimeError(f"rank {dist.get_rank()} failed on purpose (C2I_TEST_FAIL_RANK)")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def mine(n: int) -> list[int]:
    """The indices 0..n-1 this rank handles (interleaved, so costs that grow with the index spread out)."""
    return list(range(rank(), n, size()))


def gather(local: dict) -> dict:
    """Union of every rank's {index: value} dicts, on every rank."""
    if size() == 1:
        return local
    parts: list = [None] * size()
    dist.all_gather_object(parts, local)
    out: dict = {}
    for p in parts:
        out.update(p)
    return out


def barrier() -> None:
    if size() > 1:
        dist.barrier()
