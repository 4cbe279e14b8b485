"""torch.distributed for stage two: joining the process group torchrun describes, wrapping the
student in DDP, each rank's equal share of an epoch, and a loss summed over ranks."""

from __future__ import annotations

import os

import torch
from torch import nn

from softlabels.errors import SoftlabelsError


def rank_share(order: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's disjoint share of an epoch's order, the same length on every rank (the last
    len % world rows of the epoch are skipped, so all ranks take the same number of steps)."""
    per = len(order) // world
    return order[rank::world][:per] if world > 1 else order


def refuse_zero_steps(steps: int, rows: int, world: int, *, streamed: bool,
                      blocks: int | None = None) -> None:
    """Refuse, before training, a run in which some rank would take no step per epoch (all
    ranks take the fewest any has): it would save the initialisation as a trained model. A
    streamed run deals whole blocks to ranks, so a set of fewer blocks than ranks is one."""
    if steps > 0:
        return
    if streamed and blocks is not None and blocks < world:
        raise SoftlabelsError(
            f"the transfer set has {blocks} block(s) for {world} ranks: a streamed run gives "
            "each rank whole blocks, so some rank would take zero steps and nothing would be "
            f"trained; run on at most {blocks} rank(s), leave out --stream (ranks then share "
            "rows), or make the set with smaller --chunk-rows")
    raise SoftlabelsError(
        f"{rows} selected row(s) give some of the {world} rank(s) zero steps per epoch, so "
        "nothing would be trained; select more rows (--fraction, --classes, --indices) or run "
        "on fewer ranks")


def summed(loss: torch.Tensor) -> float:
    """The loss summed over ranks: NaN/inf when any rank's is."""
    import torch.distributed as dist

    value = loss.detach().clone()
    dist.all_reduce(value)
    return float(value)


def init_distributed(dev: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise SoftlabelsError("--distributed runs under torchrun, e.g. `torchrun "
                                  "--nproc-per-node 2 -m softlabels train --distributed ...`")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def wrap_ddp(net: nn.Module, dev: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)


def finish_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
