"""Where a run directory lives: a local (or shared POSIX) directory, or an fsspec URL (s3://bucket/prefix, gs://,
memory://, ...). The file contracts (vaegen/shardformat.py) read and write a run only through this interface, so
the same writer and reader serve both; a plain path never imports fsspec.

Endpoints and credentials come from fsspec's usual configuration (AWS_* environment variables, ~/.aws,
FSSPEC_* options), never from a command line.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import stat
from pathlib import Path
from typing import BinaryIO

from vaegen.errors import VaegenError
from vaegen.provenance import fsync_dir, json_text, write_json_atomic


class LocalRunDir:
    """A run in a local (or shared POSIX) directory: files are written under a temporary name, fsynced and
    renamed, so a reader never sees half a file and a crash never loses a renamed one."""

    is_local = True

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    def url(self, name: str) -> str:
        """What a reader (webdataset, `open`) opens for file `name` of the run."""
        return str(self.path / name)

    def refresh(self) -> None:
        """Nothing is cached: `names` and `size` ask the filesystem every time."""

    def names(self) -> list[str]:
        """Every entry of the run directory ([] when there is none)."""
        return [p.name for p in self.path.iterdir()] if self.path.is_dir() else []

    def size(self, name: str) -> int | None:
        """The size of file `name`, None when it is missing (or not a regular file)."""
        try:
            st = os.stat(self.path / name)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def read_bytes(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def read_many(self, names: list[str]) -> dict[str, bytes]:
        """The files of `names` that can be read, by name."""
        found = {}
        for name in names:
            with contextlib.suppress(OSError):
                found[name] = self.read_bytes(name)
        return found

    def open(self, name: str) -> BinaryIO:
        return open(self.path / name, "rb")

    def write_json(self, name: str, obj) -> None:
        write_json_atomic(self.path / name, obj)

    def remove(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def makedirs(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def new_file(self, temp: str) -> BinaryIO:
        """Where a file's bytes go while it is written: `temp`, renamed by `publish`."""
        return open(self.path / temp, "wb")

    def publish(self, temp: str, name: str, file: BinaryIO) -> None:
        """Make the written file durable under its final name: fsync, rename, fsync the directory."""
        file.flush()
        os.fsync(file.fileno())
        file.close()
        os.replace(self.path / temp, self.path / name)
        fsync_dir(self.path)

    def discard(self, temp: str, file: BinaryIO) -> None:
        file.close()
        (self.path / temp).unlink(missing_ok=True)


class RemoteRunDir:
    """A run under an fsspec URL (object storage: s3://bucket/prefix and the like). An object appears whole, at
    once, when its upload completes, so a shard is built in memory and uploaded in one request straight to its
    final key (`fs.pipe_file`: one PUT, or a multipart upload for a large one); nothing is ever renamed, and an
    upload cut short leaves nothing a reader can see. JSON files are uploaded the same way.

    `names` and `size` answer from one listing taken at `refresh` (and at creation), updated by this object's
    own writes; call `refresh` when another process may have written since. Reads always fetch the object.
    Storage errors other than a missing object become one-line VaegenErrors naming the URL."""

    is_local = False

    def __init__(self, url: str, fs, root: str):
        self.fs, self.root, self._url = fs, root.rstrip("/"), url.rstrip("/")
        self._listing: dict[str, int | None] = {}
        self.refresh()

    def __str__(self) -> str:
        return self._url

    @property
    def name(self) -> str:
        return posixpath.basename(self.root)

    def url(self, name: str) -> str:
        return f"{self._url}/{name}"

    def key(self, name: str) -> str:
        """The filesystem path of `name` (what `self.fs` calls take)."""
        return f"{self.root}/{name}"

    @contextlib.contextmanager
    def storage_errors(self, doing: str, missing_ok: bool = True):
        """Storage errors while `doing` something as one-line VaegenErrors (a FileNotFoundError passes through
        when `missing_ok`: a missing object is an answer, not an error)."""
        try:
            yield
        except FileNotFoundError as e:
            if missing_ok:
                raise
            raise VaegenError(f"{self}: {doing} failed: {_one_line(e)} (does the bucket exist?)") from None
        except PermissionError as e:
            raise VaegenError(f"{self}: {doing} refused: {_one_line(e)}; credentials come from the environment "
                              "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws) or fsspec's "
                              "configuration (FSSPEC_S3_*)") from None
        except VaegenError:
            raise
        except Exception as e:  # noqa: BLE001 - the storage client's own types (botocore, aiohttp, ...)
            raise VaegenError(f"{self}: {doing} failed: {type(e).__name__}: {_one_line(e)}") from None

    def refresh(self) -> None:
        """List the run again (fsspec's cached listing dropped first)."""
        with self.storage_errors("listing"):
            self.fs.invalidate_cache(self.root)
            try:
                entries = self.fs.ls(self.root, detail=True)
            except FileNotFoundError:
                entries = []
        self._listing = {posixpath.basename(e["name"].rstrip("/")): e["size"] if e["type"] == "file" else None
                         for e in entries}

    def names(self) -> list[str]:
        return list(self._listing)

    def size(self, name: str) -> int | None:
        return self._listing.get(name)

    def read_bytes(self, name: str) -> bytes:
        with self.storage_errors(f"reading {name}"):
            return self.fs.cat_file(self.key(name))

    def read_many(self, names: list[str]) -> dict[str, bytes]:
        """The objects of `names` that exist, fetched concurrently where the filesystem can (s3fs does)."""
        if not names:
            return {}
        with self.storage_errors(f"reading {len(names)} objects"):
            found = self.fs.cat([self.key(name) for name in names], on_error="return")
            for data in found.values():
                if isinstance(data, Exception) and not isinstance(data, FileNotFoundError):
                    raise data
        return {posixpath.basename(key): data for key, data in found.items() if not isinstance(data, Exception)}

    def open(self, name: str) -> BinaryIO:
        """The object, downloaded whole (a shard is a few MiB): hashing and parsing it read it once."""
        return io.BytesIO(self.read_bytes(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.storage_errors(f"writing {name}", missing_ok=False):
            self.fs.pipe_file(self.key(name), data)
        self._listing[name] = len(data)

    def write_json(self, name: str, obj) -> None:
        self.write_bytes(name, json_text(obj).encode())

    def remove(self, name: str) -> None:
        with self.storage_errors(f"deleting {name}"), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.key(name))
        self._listing.pop(name, None)

    def makedirs(self) -> None:
        """Nothing to do: object storage has no directories (the first upload makes the prefix)."""

    def new_file(self, temp: str) -> BinaryIO:
        return io.BytesIO()

    def publish(self, temp: str, name: str, file: BinaryIO) -> None:
        self.write_bytes(name, file.getvalue())

    def discard(self, temp: str, file: BinaryIO) -> None:
        file.close()  # nothing was uploaded


RunDir = LocalRunDir | RemoteRunDir


def is_url(location) -> bool:
    """Whether `location` is an fsspec URL (`protocol://...`) rather than a local path."""
    return isinstance(location, str) and "://" in location


def run_dir_at(location: str | os.PathLike | RunDir) -> RunDir:
    """The run at `location`: a local directory, or any fsspec URL (s3://bucket/prefix, gs://..., memory://...)
    whose filesystem is configured the usual fsspec way (environment variables, config files, FSSPEC_* options).
    A file:// URL is a local directory."""
    if isinstance(location, (LocalRunDir, RemoteRunDir)):
        return location
    if not is_url(location):
        return LocalRunDir(location)
    try:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem
    except ImportError:
        raise VaegenError(f"{location}: URLs need fsspec (for s3://: pip install 'vaegen[s3]')") from None
    try:
        fs, root = fsspec.core.url_to_fs(location)
    except (ImportError, ValueError) as e:  # an unknown protocol, or its package (s3fs, gcsfs, ...) missing
        raise VaegenError(f"{location}: {_one_line(e)}") from None
    if isinstance(fs, LocalFileSystem):
        return LocalRunDir(root)
    return RemoteRunDir(location, fs, root)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
