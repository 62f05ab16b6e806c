"""What produced a file: code version, config, command line, input hashes; and atomic JSON writes.

Every output directory of every stage gets a small JSON built from these helpers, so a result can be traced
back to its inputs and a later stage can refuse inputs that do not match.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from vaegen import __version__


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit (and '-dirty') when running from a checkout."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (a crash after rename must not lose the new name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file under a temporary name, fsync, then rename: readers never see a half-written file,
    and a failed write (a full disk) leaves the previous version and no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def json_text(obj) -> str:
    """A JSON file's text, as every vaegen JSON file is written (locally or to object storage)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """JSON through `write_text_atomic`."""
    write_text_atomic(path, json_text(obj))


def append_jsonl(path: str | os.PathLike, obj) -> None:
    """Append one JSON line, all or nothing: a failed write (a full disk, a signal) is cut off again, so the
    file never ends in half a line that a resumed run or a report would choke on."""
    line = (json.dumps(obj, default=_json_default) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike) -> list:
    """Every line of a JSON-lines file written by `append_jsonl` ([] when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_json(path: str | os.PathLike):
    with open(path) as f:
        return json.load(f)


def _json_default(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def run_record(config=None, **extra) -> dict:
    """The provenance block every output directory carries."""
    record = {
        "code_version": code_version(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if config is not None:
        record["config"] = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    record.update(extra)
    return record


def refuse_changed_settings(previous: dict, current: dict, may_change=(), defaults: dict | None = None,
                            where: str = "the output directory",
                            hint: str = "use the original settings or another output directory") -> None:
    """The one rule for continuing an output directory (a DM run, a VAE run, a study): every setting it was made
    with must be the same, except those in `may_change`. A setting the directory never recorded (added to the code
    since) counts as its value in `defaults` (what the older code did), and is not compared without one.
    Raises a one-line VaegenError naming each changed setting."""
    from vaegen.errors import VaegenError

    defaults = defaults or {}
    changed = {}
    for key, value in current.items():
        if key in may_change or (key not in previous and key not in defaults):
            continue
        before = previous.get(key, defaults.get(key))
        if _comparable(before) != _comparable(value):
            changed[key] = f"{key}: {before!r} -> {value!r}"
    if changed:
        keys = sorted(changed)
        raise VaegenError(f"{where} was made with different settings ({', '.join(keys)}): "
                          f"{'; '.join(changed[k] for k in keys)}; {hint}")


def _comparable(value):
    """JSON's view of a value (tuples and lists alike, dataclasses as dicts)."""
    return json.loads(json.dumps(value, sort_keys=True, default=_json_default))
