"""Sharding a scan across processes started by ``torchrun``: every rank scans its share of the batches
and writes its part; rank 0 merges the parts after a barrier. Without torchrun's environment (WORLD_SIZE
unset or 1) everything is a single process and no process group is created."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # this module created the process group, so it destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> Context:
    """Join torchrun's process group when there is one (gloo on CPU, NCCL on CUDA) and pick this rank's
    device: ``"auto"`` is this rank's GPU (LOCAL_RANK) when CUDA is available, else the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
    owns = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return Context(rank=rank, world=world, device=dev, owns_group=owns)


def barrier(ctx: Context) -> None:
    if ctx.world > 1:
        dist.barrier()


def all_reduce_sum(ctx: Context, t: Tensor) -> None:
    """Sum ``t`` over ranks in place (moved through this rank's device: NCCL needs CUDA tensors)."""
    if ctx.world > 1:
        moved = t.to(ctx.device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        t.copy_(moved.cpu() if t.device.type == "cpu" else moved)


def teardown(ctx: Context) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def part_path(out_dir: Path, model_index: int, rank: int) -> Path:
    return Path(out_dir) / "parts" / f"model{model_index}-rank{rank}.pt"


def write_part(ctx: Context, out_dir: Path, model_index: int, part: dict) -> None:
    path = part_path(out_dir, model_index, ctx.rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(part, path)


def read_parts(ctx: Context, out_dir: Path, model_index: int) -> list[dict]:
    """Every rank's part (rank 0 only, after a barrier); the files are removed once read."""
    parts = []
    for rank in range(ctx.world):
        path = part_path(out_dir, model_index, rank)
        parts.append(torch.load(path, weights_only=False))
        path.unlink()
    parts_dir = Path(out_dir) / "parts"
    if parts_dir.exists() and not any(parts_dir.iterdir()):
        parts_dir.rmdir()
    return parts
