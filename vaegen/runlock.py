"""One writer per output directory: an exclusive lock that names its holder.

Every command that writes a run directory (a store, a DM, a shard run, a VAE run, its eval/, a study) holds

    <parent>/.<name>.lock        {"host", "pid", "command", "since"}

for as long as it writes. The lock is an flock(2) on that file, so the kernel releases it when the holder dies
(a crashed or killed writer never leaves a lock behind); the JSON inside only names the holder for the error
message. A second writer exits 2 with one line naming the holder, before it touches anything. The lock file
sits next to the directory, not inside it, so it never shows up among a run's files.

The ranks of one multi-process launch are one writer: only the main process takes the lock (the others wait
at the launch's first barrier, and die with it if the lock is refused).

A run on object storage (an fsspec URL) has no flock: `remote_run_lock` holds the flock of a local file named after
the URL and a lock object next to the run that names its holder and is renewed while held.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import click

from vaegen.errors import VaegenError
from vaegen.rundir import RemoteRunDir


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


def _describe(info: dict | None) -> str:
    if not info or not {"command", "pid", "host", "since"} <= info.keys():
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


# --- a run on object storage (vaegen.rundir.RemoteRunDir), which has no flock -----------------------------

LOCK_RENEW_S = 60     # the holder of a remote run's lock object rewrites it this often ...
LOCK_EXPIRES_S = 600  # ... so one not renewed for this long was left by a writer that died on another machine


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class RemoteLockObject:
    """`<parent>/.<name>.lock` next to a remote run (like `vaegen.runlock`'s lock file next to a directory):
    JSON naming its holder (host, pid, command, since), rewritten every LOCK_RENEW_S ("renewed")."""

    def __init__(self, run: RemoteRunDir):
        parent, _, name = run.root.rpartition("/")
        if not parent.strip("/"):
            raise VaegenError(f"--out {run}: give the run a prefix inside the bucket (like {run}/shards/NAME), "
                              "not the bucket itself")
        self.run, self.key = run, f"{parent}/.{name}.lock"
        self.url = f"{str(run).rpartition('/')[0]}/.{name}.lock"
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                   "since": _utc_now().isoformat(timespec="seconds"), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def holder(self) -> dict | None:
        """Who the lock object names (None: there is none; {}: unreadable)."""
        with self.run.storage_errors("reading its lock object"):
            try:
                data = self.run.fs.cat_file(self.key)
            except FileNotFoundError:
                return None
        try:
            holder = json.loads(data)
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def _write(self, create: bool) -> bool:
        """Write our name (`create`: only if there is no lock object, where the store can refuse; S3 does with
        If-None-Match). False when refused."""
        data = json.dumps({**self.me, "renewed": _utc_now().isoformat(timespec="seconds")}).encode()
        with self.run.storage_errors("writing its lock object", missing_ok=False):
            try:
                self.run.fs.pipe_file(self.key, data, mode="create" if create else "overwrite")
            except FileExistsError:
                return False
        return True

    def is_stale(self, holder: dict) -> bool:
        """Whether the holder is gone: it ran on this machine (whose local lock we hold now) or stopped renewing."""
        if holder.get("host") == self.me["host"]:
            return True
        try:
            renewed = datetime.datetime.fromisoformat(holder["renewed"])
        except (KeyError, TypeError, ValueError):
            return True  # not written by a vaegen writer
        return (_utc_now() - renewed).total_seconds() > LOCK_EXPIRES_S

    def refusal(self, holder: dict | None) -> VaegenError:
        return VaegenError(f"{self.run} is being written by {_describe(holder)}; wait for it to finish or stop it "
                           f"(a lock not renewed for {LOCK_EXPIRES_S} s is taken over; if that process is gone, "
                           f"delete {self.url})")

    def acquire(self) -> None:
        holder = self.holder()
        if holder is not None and not self.is_stale(holder):
            raise self.refusal(holder)
        if holder is not None:
            click.echo(f"{self.url}: taking over the lock of {_describe(holder)}, which is gone", err=True)
        if not self._write(create=holder is None):
            raise self.refusal(self.holder())
        # Read back: of two writers that found no lock at the same moment on a store without conditional
        # writes, the one whose name is not there gives way.
        holder = self.holder()
        if (holder or {}).get("token") != self.me["token"]:
            raise self.refusal(holder)
        self._renewer = threading.Thread(target=self._renew, name="remote-lock-renewer", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(LOCK_RENEW_S):
            with contextlib.suppress(VaegenError):  # a storage hiccup: the next renewal tries again
                if (self.holder() or {}).get("token") != self.me["token"]:
                    click.echo(f"warning: {self.url} was taken over by {_describe(self.holder())} (this writer "
                               f"stopped renewing it for {LOCK_EXPIRES_S} s); two writers may now write {self.run}",
                               err=True)
                    return
                self._write(create=False)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            if (self.holder() or {}).get("token") == self.me["token"]:
                with self.run.storage_errors("deleting its lock object"), contextlib.suppress(FileNotFoundError):
                    self.run.fs.rm_file(self.key)
        except VaegenError as e:
            click.echo(f"warning: {e} (the next writer on this machine takes it over)", err=True)


def local_lock_dir(run: RemoteRunDir) -> Path:
    """This machine's stand-in directory for a remote run, whose `vaegen.runlock` lock file the writer holds."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "vaegen" / "remote-runs" / hashlib.sha256(str(run).encode()).hexdigest()[:32]


@contextlib.contextmanager
def remote_run_lock(run: RemoteRunDir, main_process: bool = True):
    """One writer per run on object storage, which has no flock (what `vaegen.runlock` gives a directory):

    this machine: the flock of a local file named after the URL (`local_lock_dir`, under ~/.cache/vaegen), which
        the kernel releases when its holder dies;
    any machine: a lock object next to the run (`RemoteLockObject`), renewed every LOCK_RENEW_S while held and
        deleted at the end. A writer refuses, naming the holder, while it names a live one. Its holder is gone
        when it ran on this machine (we hold this machine's flock) or has not renewed it for LOCK_EXPIRES_S (a
        writer killed on another machine); then the lock is taken over. Made with a conditional write where the
        store supports one (S3: If-None-Match) and read back after writing, so of two writers starting at once
        one gives way.
    """
    if not main_process:
        yield
        return
    lock = RemoteLockObject(run)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(run_lock(local_lock_dir(run)))
        except VaegenError:  # another writer of this URL on this machine
            raise lock.refusal(lock.holder()) from None
        lock.acquire()
        stack.callback(lock.release)
        yield
