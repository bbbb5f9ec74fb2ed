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

Reading one runs no code from the folder, as ``torch.load(weights_only=True)`` for a single file: torch's
reader unpickles the ``.metadata`` index and the non-tensor values with the full unpickler, so every
stream is first read by a restricted one (the index: the checkpoint format's own classes, torch's sizes,
dtypes and layouts, paths; a value: ``weights_only=True``), and a stream it refuses stops the load with a
:class:`~fastssl.train.errors.CheckpointError` before the full unpickler sees it.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tempfile
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import CheckpointError

__all__ = ["checkpoint_keys", "consolidate", "is_sharded_checkpoint", "load_sharded", "rank_key", "read_values",
           "save_sharded"]

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


# ----------------------------------------------------------------------------- reading without running code

class _IndexUnpickler(pickle.Unpickler):
    """The ``.metadata`` index's unpickler, for a check only: the classes torch's format writes, nothing else."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")

    def find_class(self, module: str, name: str):
        allowed = (module in self._MODULES
                   or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                                           (torch.dtype, torch.layout,
                                                                            torch.memory_format))))
                   or (module == "torch.serialization" and name == "_get_layout")
                   or (module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath",
                                                        "PureWindowsPath"))
                   or (module == "collections" and name == "OrderedDict"))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's index")
        return super().find_class(module, name)


def _checked(load):
    """``load()`` with what a restricted check refused said as a CheckpointError."""
    try:
        return load()
    except (pickle.UnpicklingError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "weights_only" not in str(e).lower():
            raise
        raise CheckpointError(f"the sharded checkpoint holds something other than tensors and plain values, "
                              f"which is not loaded (it could run code): {e}") from e


def _check_index(path: Path) -> None:
    """The folder's ``.metadata`` read by the restricted unpickler (torch's loader reports a failure there
    only as a sentence of its own)."""
    with open(path / _METADATA, "rb") as f:
        _checked(lambda: _IndexUnpickler(f).load())


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            rank = kwargs.get("rank")
            name = _METADATA if rank is None else f"__{rank}{_METADATA}"
            with open(Path(os.fspath(self.path)) / name, "rb") as f:
                _checked(lambda: _IndexUnpickler(f).load())
            return super().read_metadata(*args, **kwargs)

    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is not a sharded checkpoint (no {_METADATA} in it)")
    _check_index(path)
    return Reader(os.fspath(path))


def _checked_planner(base: type) -> type:
    class Planner(base):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            _checked(lambda: torch.load(value, map_location="cpu", weights_only=True))
            value.seek(0)  # the same bytes, known to hold plain values only
            super().load_bytes(read_item, value)

    return Planner


def _unwrapped(load):
    """``load()``; a refusal of :func:`_checked` inside torch's loader (which wraps whatever a rank raised
    in its own exception) raised as itself."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return load()
    except CheckpointException as e:
        ours = [exc for exc, _ in e.failures.values() if isinstance(exc, CheckpointError)]
        if ours:
            raise ours[0] from None
        raise


def checkpoint_keys(path: str | os.PathLike) -> set[str]:
    """The top-level keys of the sharded checkpoint ``path`` (its index only)."""
    metadata = _reader(Path(path)).read_metadata()
    return {key.split(".")[0] for key in metadata.state_dict_metadata} | set(metadata.state_dict_metadata)


def read_values(path: str | os.PathLike, keys: set[str] | None = None) -> dict[str, Any]:
    """The entries ``keys`` (default: all) of the sharded checkpoint ``path`` read in full by this process
    alone (no collective, also inside a process group): what :func:`consolidate` writes."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    with _one_process_is_meant():
        _unwrapped(lambda: _load_state_dict(state, storage_reader=_reader(Path(path)),
                                            planner=_checked_planner(_EmptyStateDictLoadPlanner)(keys=keys),
                                            no_dist=True))
    return state


# ----------------------------------------------------------------------------- writing, loading, consolidating

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
    from torch.distributed.checkpoint import DefaultLoadPlanner

    with _one_process_is_meant():
        _unwrapped(lambda: dcp.load(state, checkpoint_id=path, storage_reader=_reader(path),
                                    planner=_checked_planner(DefaultLoadPlanner)(), no_dist=not _distributed()))
    return state


def consolidate(path: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """The sharded checkpoint ``path`` as one file ``out`` of full tensors (written through a temporary file
    and a rename; an existing ``out`` only with ``overwrite``). One process, no process group."""
    path, out = Path(path), Path(out)
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is not a sharded checkpoint (no {_METADATA} in it)")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists: not replaced")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        torch.save(read_values(path), tmp)
        torch.load(tmp, map_location="cpu", weights_only=True)  # readable as every checkpoint is: no code
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
