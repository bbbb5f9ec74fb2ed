"""A run folder and who may write it: one run at a time, the leftovers of a killed one, the log rewound.

``train.lock`` names the process training in the folder (pid, host, the process's start time); a second
run in the same folder is refused while that process lives. After a ``kill -9`` the lock stays behind and
the next run recognises it as stale: on the same host its process is gone, or its pid now names another
process (another start time); on another host (a shared file system) it was not refreshed for
``STALE_AFTER_S`` seconds (the holder touches it every ``HEARTBEAT_S``). Once the lock is held, the
temporary files of a checkpoint write that was killed (``.checkpoint.pth.*.tmp``) are removed.

On resume, :func:`rewind_log` moves the rows ``log.jsonl`` got after the checkpoint (the stopped run went
on past it) to ``log.superseded.jsonl``, so that a step or an epoch is logged once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import ConfigError, RunError, UserError
from .log import json_row, write_atomically
from .runtime import raise_on_every_rank

__all__ = ["HEARTBEAT_S", "LOCK_NAME", "STALE_AFTER_S", "RunLock", "remove_leftovers", "rewind_log", "run_folder"]

LOCK_NAME = "train.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
# Temporary files of this trainer's atomic writes (tempfile.mkstemp's ".<name>.<random>.tmp").
LEFTOVER = re.compile(r"^\.(checkpoint\d*\.pth|config\.json|log\.jsonl|train\.lock)\.[A-Za-z0-9_]+\.tmp$")


def _stat(pid: int) -> list[str]:
    """The fields of Linux's /proc/<pid>/stat after the command name (state, ..., start time at 19); [] where
    there is none."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks after boot), None where it cannot be read."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return _stat(pid)[:1] != ["Z"]  # a zombie (killed, not yet reaped) holds nothing


class RunLock:
    """``acquire()`` the folder's lock or raise :class:`RunError`; ``release()`` it (if still ours)."""

    def __init__(self, out: Path):
        self.path = out / LOCK_NAME
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _record(self) -> dict:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "start": _start_time(pid), "token": self.token,
                "since": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}

    def stale(self, record: dict, mtime: float) -> str | None:
        """Why a lock is stale (its holder is gone), None while its holder may be running."""
        pid = record.get("pid")
        if record.get("host") == socket.gethostname() and isinstance(pid, int):
            if not _alive(pid):
                return f"its process {pid} is gone"
            start = _start_time(pid)
            if record.get("start") and start is not None and start != record["start"]:
                return f"pid {pid} now names another process"
            return None
        age = time.time() - mtime
        return f"it was not refreshed for {age:.0f} s" if age > STALE_AFTER_S else None

    def acquire(self) -> list[str]:
        """Take the lock (replacing a stale one); returns what was done, to say."""
        notes: list[str] = []
        for _ in range(3):
            if self._create():
                self._beat = threading.Thread(target=self._heartbeat, name="fastssl-lock", daemon=True)
                self._beat.start()
                return notes
            try:
                text, mtime = self.path.read_text(), self.path.stat().st_mtime
            except FileNotFoundError:  # released meanwhile: try again
                continue
            try:
                record = json.loads(text)
                why = self.stale(record, mtime) if isinstance(record, dict) else "it is not a lock of fastssl-train"
            except ValueError:
                record, why = {}, "it is not a lock of fastssl-train"
            if why is None:
                raise RunError(f"{self.path.parent} is in use by another run: pid {record.get('pid')} on "
                               f"{record.get('host')} since {record.get('since')} ({' '.join(record.get('argv', []))})"
                               f". Wait for it to end, or give another --output-dir; if no such run exists, delete "
                               f"{self.path}")
            self.path.unlink(missing_ok=True)
            notes.append(f"removed the stale lock {self.path} of an earlier run: {why}")
        raise RunError(f"could not take the lock {self.path}: other runs are starting in {self.path.parent}")

    def _create(self) -> bool:
        """Create the lock file, complete, if there is none (False if there is one)."""
        fd, tmp = tempfile.mkstemp(prefix=f".{LOCK_NAME}.", suffix=".tmp", dir=self.path.parent)
        text = json.dumps(self._record())
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            try:
                os.link(tmp, self.path)  # atomic: the lock appears with its content, or not at all
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: exclusive create, then write
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as f:
                    f.write(text)
            return True
        finally:
            os.unlink(tmp)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
            with contextlib.suppress(OSError, ValueError):
                if json.loads(self.path.read_text()).get("token") == self.token:
                    self.path.unlink()


def remove_leftovers(out: Path) -> list[str]:
    """Remove the temporary files of writes that were killed (only this trainer's names)."""
    found = [p for p in out.iterdir() if LEFTOVER.match(p.name) and p.is_file()]
    if not found:
        return []
    size = sum(p.stat().st_size for p in found)
    for p in found:
        p.unlink(missing_ok=True)
    return [f"removed {len(found)} temporary file(s) ({size / 2**20:.1f} MiB) left by an interrupted write: "
            + ", ".join(p.name for p in found)]


@contextlib.contextmanager
def run_folder(out: Path, main: bool) -> Iterator[list[str]]:
    """``with run_folder(out, main) as notes:`` rank 0 creates ``out``, takes its lock and removes leftovers;
    every rank learns if that failed (a collective). Yields what was done, to say."""
    lock = RunLock(out) if main else None
    notes: list[str] = []
    error: UserError | None = None
    created = not out.exists()
    if lock is not None:
        try:
            if not created and not out.is_dir():
                raise ConfigError(f"--output-dir {out} is not a folder")
            try:
                out.mkdir(parents=True, exist_ok=True)
                notes = lock.acquire()
                notes += remove_leftovers(out)
            except OSError as e:  # permissions, a full or read-only disk
                lock.release()
                raise RunError(f"--output-dir {out}: {e.strerror or e}") from e
        except UserError as e:
            error = e
    raise_on_every_rank(error)
    try:
        yield notes
    finally:
        if lock is not None:
            lock.release()
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # a run that failed before writing anything leaves no folder behind


# ----------------------------------------------------------------------------- the log on resume

def _before(row: dict, steps_done: int, epochs_done: int) -> bool:
    """Whether a log row describes the run up to the checkpoint (``steps_done`` iterations, ``epochs_done``
    complete epochs)."""
    if "event" in row:
        return row.get("at_step", 0) <= steps_done
    if "epoch_loss" in row:
        return row.get("epoch", 0) < epochs_done
    if "step" in row:
        return row["step"] < steps_done
    if any(k.startswith(("knn_", "snn_")) for k in row):
        return row.get("epoch", 0) <= epochs_done
    return True


def rewind_log(out: Path, steps_done: int, epochs_done: int) -> str | None:
    """Move the rows of ``out/log.jsonl`` past a checkpoint (and any line that is not a JSON object: a
    write cut by a kill) to ``log.superseded.jsonl``; returns what was done, to say."""
    path = out / "log.jsonl"
    if not path.is_file():
        return None
    keep, drop, rewrite = [], [], False
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            drop.append(line)
        elif _before(row, steps_done, epochs_done):
            keep.append(json_row(row))
            rewrite |= keep[-1] != line  # a NaN of an older version: rewritten strict
        else:
            drop.append(line)
    if not drop and not rewrite:
        return None
    if drop:
        with open(out / "log.superseded.jsonl", "a") as f:
            f.write("".join(line + "\n" for line in drop))
    write_atomically(path, "".join(line + "\n" for line in keep))
    if not drop:
        return None
    return (f"log.jsonl: {len(drop)} row(s) written after the checkpoint by the run that stopped moved to "
            "log.superseded.jsonl")
