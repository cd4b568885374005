"""The coordinator's recovery queue on disk, so that a coordinator that restarts resumes its
recovery instead of beginning it again from a fresh snapshot.

Every change made to the queue (a reservation, a settled entry, a peer's batch) and every
step of the replay is appended to one file next to the router's state database, as framed
records (length, CRC-32, pickle): read back in order, they rebuild the queue exactly, with
the same serial numbers and each peer's last batch. A record is written before its effect
can leave the process (the commit it queues, the answer to a peer), so a crash loses only
changes nobody acted on. Records are not fsynced: the file must outlive the process, not the
machine, and the boot id in its header makes a recovery after a reboot begin again (the
recovering node's replayed commits were not flushed either, see replay.py).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_HEAD = struct.Struct("!II")  # length, crc32 of the payload
_MAGIC = "pgquorum recovery queue 1"
_READ = 1 << 20


class LogCorrupt(Exception):
    """The file is not a recovery queue this version can read."""


def boot_id() -> str:
    """This boot of the machine ("" where the kernel does not tell)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class QueueLog:
    """An append-only file of records."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def create(cls, path: Path, header: dict[str, Any]) -> QueueLog:
        """A new file at ``path`` (one left there is replaced), starting with ``header``."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        log = cls(path, fd)
        try:
            log.write((_MAGIC, header))
        except OSError:
            log.remove()
            raise
        return log

    @classmethod
    def reopen(cls, path: Path, size: int) -> QueueLog:
        """Append to ``path`` after its first ``size`` bytes (a torn last record is cut)."""
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        os.ftruncate(fd, size)
        os.lseek(fd, size, os.SEEK_SET)
        return cls(path, fd)

    def write(self, record: tuple[Any, ...]) -> None:
        data = pickle.dumps(record, pickle.HIGHEST_PROTOCOL)
        view = memoryview(_HEAD.pack(len(data), zlib.crc32(data)) + data)
        while view:
            view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        """The recovery ended: nothing is left to resume."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def read_header(path: Path) -> dict[str, Any]:
    """The header of the file at ``path`` (OSError, LogCorrupt)."""
    for record, _ in records(path):
        if not (isinstance(record, tuple) and record[:1] == (_MAGIC,)):
            break
        header: dict[str, Any] = record[1]
        return header
    raise LogCorrupt(f"{path} is not a pgquorum recovery queue")


def records(path: Path) -> Iterator[tuple[Any, int]]:
    """Each whole record in order, with the offset just after it (the header first). A
    record cut short or damaged ends the file: the process died writing it."""
    with path.open("rb", buffering=_READ) as f:
        end = 0
        while True:
            head = f.read(_HEAD.size)
            if len(head) < _HEAD.size:
                return
            size, crc = _HEAD.unpack(head)
            data = f.read(size)
            if len(data) < size or zlib.crc32(data) != crc:
                return
            end += _HEAD.size + size
            yield pickle.loads(data), end  # (our own file: mode 0600)
