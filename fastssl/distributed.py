"""The few ``torch.distributed`` helpers the losses need; each is a no-op single-process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


@torch.no_grad()
def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` in place over all ranks (every rank must pass the same shape)."""
    if is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor.div_(dist.get_world_size())
    return tensor
