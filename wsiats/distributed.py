"""torchrun support: process-group set-up and the few collectives wsiats needs.

`torchrun --nproc-per-node N -m wsiats train ...` sets RANK, WORLD_SIZE and LOCAL_RANK; wsiats
then joins a process group (NCCL on CUDA, gloo on CPU), shards the work and lets rank 0 write.
Without those variables everything here is a no-op for a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from wsiats.errors import ConfigError, WsiatsError
from wsiats.runtime import select_device


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env() -> DistContext:
    """This process's place among torchrun's, from WORLD_SIZE, RANK and LOCAL_RANK (checked; nothing joined)."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext()
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} is set but {', '.join(missing)} is not; {_TORCHRUN}")
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world or local < 0:
        raise ConfigError(f"RANK={rank} and LOCAL_RANK={local} do not fit WORLD_SIZE={world}; {_TORCHRUN}")
    return DistContext(rank, world, local)


_TORCHRUN = "torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (unset WORLD_SIZE to run one process)"


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not an integer; {_TORCHRUN}") from None


def setup(device_name: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the torchrun process group when launched by torchrun; pick this rank's device."""
    ctx = read_env()
    if not ctx.enabled:
        return ctx, select_device(device_name)
    device = select_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        except (RuntimeError, ValueError) as exc:  # a bad MASTER_ADDR or MASTER_PORT, a rendezvous that failed
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise WsiatsError(f"cannot join the torchrun process group ({type(exc).__name__}: {first})") from None
    return ctx, device


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_sum(ctx: DistContext, values: list[float]) -> list[float]:
    """Sum a few numbers across ranks (float64 on the CPU, through the object collective)."""
    if not ctx.enabled:
        return values
    gathered = gather(ctx, values)
    return [float(sum(v[i] for v in gathered)) for i in range(len(values))]


def gather(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def shard(ctx: DistContext, n: int) -> list[int]:
    """This rank's indices of range(n), round robin (ranks may get one fewer)."""
    return list(range(ctx.rank, n, ctx.world_size))
