"""One writer per output directory: an exclusive lock that names its holder.

Every command that writes a run directory (a store, a DM, a shard run, a VAE run, its eval/, a study) holds

    <parent>/.<name>.lock        {"host", "pid", "command", "since"}

for as long as it writes. The lock is an flock(2) on that file, so the kernel releases it when the holder dies
(a crashed or killed writer never leaves a lock behind); the JSON inside only names the holder for the error
message. A second writer exits 2 with one line naming the holder, before it touches anything. The lock file
sits next to the directory, not inside it, so it never shows up among a run's files.

The ranks of one multi-process launch are one writer: only the main process takes the lock (the others wait
at the launch's first barrier, and die with it if the lock is refused).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from vaegen.errors import VaegenError


def lock_path(directory: str | os.PathLike) -> Path:
    directory = Path(directory).absolute()
    return directory.parent / f".{directory.name}.lock"


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _check_holder_alive(path: Path, directory) -> None:
    """Without flock, the JSON is the lock: refuse while its process lives (same host) or may live (another)."""
    holder = _read_holder(path)
    if not holder or holder.get("pid") == os.getpid():
        return
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except (ProcessLookupError, ValueError, KeyError):
            return  # a stale lock of a dead process: take it over
        except PermissionError:
            pass
    raise VaegenError(f"{directory} is being written by {_describe(holder)}; wait for it to finish or stop it "
                      f"(if that process is gone, delete {path})")


def _describe(info: dict) -> str:
    if not {"command", "pid", "host", "since"} <= info.keys():
        return "another process"
    return f"{info['command']} (pid {info['pid']} on {info['host']}, since {info['since']})"


def _wait_for_holder(path: Path, seconds: float = 2.0) -> dict:
    """The holder's name: it writes it right after taking the lock, so a reader that came in between waits a
    moment for it rather than naming nobody."""
    deadline = time.monotonic() + seconds
    while not (holder := _read_holder(path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return holder


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike, main_process: bool = True):
    """Hold the lock of `directory` for the duration of the block (a no-op on non-main ranks)."""
    if not main_process:
        yield
        return
    path = lock_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a filesystem without flock
                _check_holder_alive(path, directory)
                break
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise VaegenError(f"{directory} is being written by {_describe(_wait_for_holder(path))}; wait for it to "
                              "finish or stop it (a dead holder releases the lock by itself)") from None
        # The previous holder may have unlinked the file between our open and our flock: then we locked an
        # orphaned inode and must try again on the current file.
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    info = {"host": socket.gethostname(), "pid": os.getpid(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    try:
        yield
    except BaseException as e:
        if getattr(e, "vaegen_directory", None) is None:
            e.vaegen_directory = Path(directory)  # which output a failure (e.g. a full disk) happened in
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding it: a waiter re-checks the inode (see above)
        os.close(fd)
