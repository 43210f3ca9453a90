"""read_no_wait: named files are read without ever hanging on them."""

from __future__ import annotations

import os

import pytest

from cage.fileio import NotRegularFile, read_no_wait


def test_a_regular_file_is_read_up_to_the_limit(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    assert read_no_wait(path, 4) == b"0123"


def test_a_fifo_without_a_writer_reads_empty(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert read_no_wait(fifo, 100) == b""


def test_a_directory_and_a_device_are_refused(tmp_path):
    with pytest.raises(IsADirectoryError):
        read_no_wait(tmp_path, 100)
    with pytest.raises(NotRegularFile, match="not a regular file"):
        read_no_wait("/dev/null", 100)


def test_a_missing_file_raises_as_open_does(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_no_wait(tmp_path / "absent", 100)
