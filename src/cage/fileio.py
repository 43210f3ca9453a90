"""Reading a file a user or a workflow names, without ever hanging on it.

A FIFO nobody writes to blocks a plain ``open()`` forever, and a device can block a read:
both would stall the gate. ``read_no_wait`` opens without waiting, reads a pipe that has a
writer (``<(...)``) to its end, and refuses sockets and devices.
"""

from __future__ import annotations

import errno
import os
import stat


class NotRegularFile(OSError):
    """The path names a socket or a device, not a file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(errno.EINVAL, "not a regular file (a socket or device)", os.fspath(path))


def read_no_wait(path: str | os.PathLike[str], limit: int) -> bytes:
    """Up to ``limit`` bytes of ``path``; a FIFO with no writer reads empty instead of hanging.

    Raises OSError as ``open()`` does (FileNotFoundError, PermissionError…),
    IsADirectoryError for a directory and NotRegularFile for a socket or device.
    """
    # O_NONBLOCK keeps open() from waiting for a writer; reads are blocking again after.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as handle:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", os.fspath(path))
        if stat.S_ISFIFO(mode):
            os.set_blocking(fd, True)
        elif not stat.S_ISREG(mode):
            raise NotRegularFile(path)
        return handle.read(limit)
