"""Sharded checkpoints of FSDP2 runs: every rank writes its own shards, nothing is gathered.

A sharded checkpoint is a folder in ``torch.distributed.checkpoint``'s format (a ``.metadata`` file and
the ranks' ``.distcp`` files). :func:`save_sharded` writes it into a temporary sibling folder and renames
that over the previous checkpoint once every rank has written, so a crash mid-write leaves the previous one
intact (as :func:`~fastssl.train.checkpoint.save_checkpoint` does for one file); a folder that is not a
sharded checkpoint is never replaced. :func:`load_sharded` reads one back into a state of the same
structure, each rank its shards, on the same number of processes. :func:`consolidate` turns one into a
single file of full tensors that :func:`~fastssl.train.checkpoint.load_checkpoint` reads (and
``fastssl-train export`` after it), on one process without a process group.

Values that differ per rank (RNG states) go under per-rank keys (:func:`rank_key`): each rank writes and
reads only its own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import CheckpointError

__all__ = ["consolidate", "is_sharded_checkpoint", "load_sharded", "rank_key", "save_sharded"]

_METADATA = ".metadata"  # torch.distributed.checkpoint's index file


def rank_key(name: str, rank: int) -> str:
    """The key of a per-rank value in a sharded checkpoint."""
    return f"{name}.rank{rank}"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / _METADATA).is_file()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextmanager
def _one_process_is_meant():
    """Without a process group one process reads or writes the whole checkpoint, on purpose: torch's warning
    that it assumes so says nothing to a user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _same_on_every_rank(value: str) -> str:
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def save_sharded(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` (DTensors from ``get_state_dict``, plain tensors and Python values) to the folder
    ``path``, atomically; every rank calls it. Returns ``path``."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if path.exists() and not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} exists and is not a sharded checkpoint: it is not replaced")
    tmp = path.parent / _same_on_every_rank(f".{path.name}.{uuid.uuid4().hex}.tmp")
    rank = dist.get_rank() if _distributed() else 0
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
    _barrier()
    try:
        with _one_process_is_meant():
            dcp.save(state, checkpoint_id=tmp, no_dist=not _distributed())
        _barrier()  # every rank's shards are on disk
        if rank == 0:
            old = None
            if path.exists():  # our previous checkpoint: out of the way, then gone once the new one is in place
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
                os.replace(path, old / path.name)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old)
        _barrier()
    finally:
        if rank == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_sharded(state: dict, path: str | os.PathLike) -> dict:
    """Fill ``state`` (the structure :func:`save_sharded` was given, with this run's tensors) in place from
    the folder ``path``; every rank calls it. Returns ``state``."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is not a sharded checkpoint (no {_METADATA} in it)")
    with _one_process_is_meant():
        dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
    return state


def consolidate(path: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """The sharded checkpoint ``path`` as one file ``out`` of full tensors (written through a temporary file
    and a rename; an existing ``out`` only with ``overwrite``). One process, no process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path, out = Path(path), Path(out)
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is not a sharded checkpoint (no {_METADATA} in it)")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists: not replaced")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        dcp_to_torch_save(path, tmp)
        torch.load(tmp, map_location="cpu", weights_only=True)  # readable as every checkpoint is: no code
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
