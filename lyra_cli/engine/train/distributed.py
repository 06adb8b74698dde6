"""Data-parallel training across processes started by `torchrun` or `accelerate launch`.

Each process (rank) holds the whole model and trains on its own records; after every optimizer step's
backward passes the trainable gradients are averaged over the ranks (`all_reduce`), so every rank takes
the same optimizer step and the weights stay identical without ever being broadcast. With R ranks and
gradient accumulation A, one step covers R·A consecutive records of the shared order, rank r taking
positions r, r + R, r + 2R, ...: the same records, and (up to summation order) the same gradient, as one
process accumulating R·A records. Only LoRA / projector / generator gradients travel, a few MB per step.

The launchers' environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) is all we read;
NCCL is used between GPUs, gloo on CPU. Rank 0 alone writes logs, checkpoints and the result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lyra_cli.errors import RuntimeSetupError


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job (rank 0 of 1 when not launched by a distributed launcher)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as exc:
            raise RuntimeSetupError(f"the launcher's RANK/WORLD_SIZE are not numbers ({exc})",
                                    "start lyra with `torchrun` or `accelerate launch`") from exc  # fmt: skip
        return cls(rank=rank, world_size=world, local_rank=local)

    def start(self, device_type: str) -> None:
        """Join the process group (NCCL on CUDA, gloo elsewhere); on CUDA, pin this rank's GPU first."""
        if not self.enabled or dist.is_initialized():
            return
        if device_type == "cuda":
            torch.cuda.set_device(self.local_rank)  # later `cuda` tensors land on this rank's GPU
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")

    def stop(self, *, clean: bool = True) -> None:
        """Leave the process group: after a barrier when the run ended normally; at once after an error,
        since the other ranks then wait in a collective this rank never joins (the launcher ends them when
        this process exits)."""
        if self.enabled and dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over the ranks (a missing gradient counts as zeros)."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # one collective for all of them (hundreds of LoRA tensors): flatten, reduce, copy back
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(self.world_size)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def sum_floats(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum of `values` over the ranks (for logging totals)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's `value` on rank 0 (None elsewhere); a collective: every rank must call it."""
        if not self.enabled:
            return [value]
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()
