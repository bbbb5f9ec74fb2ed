"""FSDP2 in the trainers (``--fsdp``): the networks sharded, their sharded checkpoints written and resumed.

:func:`shard_` applies ``torch.distributed.fsdp.fully_shard`` the way the DINOv3 authors do
(``dinov3/fsdp/ac_compile_parallelize.py``): each transformer block of the backbone, each head, then the
root (what is left: the embeddings, tokens, the last norm), with their mixed-precision policy (parameters
gathered in the autocast dtype, gradients reduced in fp32) and, optionally, activation checkpointing and
``torch.compile`` per block. The student and the teacher are sharded alike, so that
:class:`~fastssl.MomentumTeacher` updates each rank's local shards. Nothing else changes: the losses'
all-reduces (DINO's center, Sinkhorn-Knopp's sums, KoLeo's gathers) are the same as under DDP.

A sharded checkpoint (:mod:`.sharded_checkpoint`) is the folder ``OUTPUT_DIR/checkpoint`` where a DDP run
writes ``checkpoint.pth``: the student's, the teacher's and the optimiser's shards
(``torch.distributed.checkpoint.state_dict.get_state_dict``: keys as in the single-file checkpoint), the
same plain values as the single file (``config``, ``epoch``, ``step``, ... the loss's centers, the grad
scaler) and each rank's RNG states under :func:`~.sharded_checkpoint.rank_key` (``rng.rank<i>``, the bytes
of a ``torch.save``, read back with ``weights_only=True``). :func:`read_plain` reads the plain values (what
:func:`~fastssl.train.resume.plan_start` checks) before any model is built.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import rng_state, set_rng_state
from .errors import CheckpointError
from .sharded_checkpoint import (
    checkpoint_keys,
    is_sharded_checkpoint,
    load_sharded,
    rank_key,
    read_values,
    save_sharded,
)

__all__ = ["SHARDED_NAME", "PLAIN_KEYS", "full_state_dict", "gathered_copy", "one_process_group", "read_plain",
           "restore_sharded", "save_sharded_run", "shard_"]

SHARDED_NAME = "checkpoint"  # OUTPUT_DIR/checkpoint: the folder beside where checkpoint.pth would be

# The checkpoint's values that are neither shards nor per-rank: what resuming checks first.
PLAIN_KEYS = ("config", "epoch", "step", "global_step", "niter", "world_size", "epoch_meter", "fastssl_version")


def shard_(model: nn.Module, amp_dtype: torch.dtype | None, *, compile_blocks: bool = False,
           checkpoint_blocks: bool = False, teacher: bool = False) -> nn.Module:
    """``fully_shard`` each ``model.backbone.blocks[i]``, each head (``dino_head``, ``ibot_head`` or ``head``,
    those present) and ``model``, in place; returns ``model``. Needs a process group (one process: see
    :func:`one_process_group`).

    ``teacher``: a network without backward, whose shards change between forwards (the EMA): its root is
    resharded after each forward too. FSDP2 keeps a root's gathered parameters after the forward for the
    backward, and reuses them at the next forward while it has not been resharded (by a backward): the
    teacher would then run its embeddings and last norm one EMA update late (a resumed run, which gathers
    afresh, differed from the straight one)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype is not None \
        else MixedPrecisionPolicy()
    for block in cast(nn.ModuleList, cast(Any, model).backbone.blocks):
        if checkpoint_blocks:
            # Recomputed in the backward, the RNG state (drop path) restored: the same values as stored ones.
            from torch.utils.checkpoint import checkpoint

            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        if compile_blocks:
            block.compile()
        fully_shard(block, mp_policy=policy)
    for name in ("dino_head", "ibot_head", "head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            fully_shard(head, mp_policy=policy)
    fully_shard(model, mp_policy=policy, reshard_after_forward=True if teacher else None)
    return model


class one_process_group:
    """A process group of this process alone while none exists (FSDP2 needs one; torchrun makes it otherwise),
    left on exit."""

    def __enter__(self):
        self.made = not (dist.is_available() and dist.is_initialized())
        if self.made:
            dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1)
        return self

    def __exit__(self, *exc):
        if self.made and dist.is_initialized():
            dist.destroy_process_group()
        return False


def _rng_bytes(device: torch.device) -> bytes:
    buf = io.BytesIO()
    torch.save(rng_state(device), buf)
    return buf.getvalue()


def _state(models: dict[str, nn.Module], optimizer: torch.optim.Optimizer, plain: dict[str, Any], rank: int,
           rng: bytes) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    student = models["student"]
    state: dict[str, Any] = {name: get_model_state_dict(m) for name, m in models.items()}
    state["optimizer"] = get_optimizer_state_dict(student, optimizer)
    state.update(plain)
    state[rank_key("rng", rank)] = rng
    return state


def save_sharded_run(path: Path, models: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                     plain: dict[str, Any], device: torch.device) -> Path:
    """Write the run's sharded checkpoint folder ``path`` (every rank calls it): ``models`` (``"student"``,
    whose parameters ``optimizer`` steps, and the others, all sharded), the optimiser, ``plain`` (tensors of
    the full size, Python values: the same on every rank) and this rank's RNG states."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return save_sharded(_state(models, optimizer, plain, rank, _rng_bytes(device)), path)


def read_plain(path: Path) -> dict[str, Any]:
    """The plain values of the sharded checkpoint ``path`` (:data:`PLAIN_KEYS`) and ``"rng"``: whether this
    rank's RNG states are in it; read on every rank, no shard."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        keys = checkpoint_keys(path)
        state = read_values(path, set(PLAIN_KEYS))  # by this process alone: no collective
    except Exception as e:
        raise CheckpointError(f"cannot read the sharded checkpoint {path}: {type(e).__name__}: {e}") from e
    state["rng"] = rank_key("rng", rank) in keys  # a sharded checkpoint resumes on as many processes
    return state


def restore_sharded(path: Path, models: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                    plain: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Load the sharded checkpoint ``path`` into ``models``, ``optimizer`` and this rank's RNGs (every rank
    calls it, on the number of processes that wrote it); returns ``plain`` (the structure of the plain
    values to read back, e.g. the loss's state dict) filled."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is not a sharded checkpoint")
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = load_sharded(_state(models, optimizer, plain, rank, b""), path)
    for name, model in models.items():
        set_model_state_dict(model, state[name])
    set_optimizer_state_dict(models["student"], optimizer, state["optimizer"])
    rng = state[rank_key("rng", rank)]
    set_rng_state(torch.load(io.BytesIO(rng), map_location="cpu", weights_only=True), device)
    return {k: state[k] for k in plain}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (gathered) state dict of a sharded ``model`` on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
    return cast(dict[str, torch.Tensor], state)


def gathered_copy(model: nn.Module, build: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    """A plain (unsharded) copy of the sharded ``model`` on every rank (a collective), for evaluation:
    ``build()`` makes the network, under a forked RNG so that the run's random numbers stay as they were."""
    full = full_state_dict(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        plain = build()
    plain.load_state_dict(full)
    return plain.to(device)
