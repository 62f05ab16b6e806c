"""Write and read back TOTAL MB in OBJECT MB objects under an S3 prefix and in a local directory; MB/s of each.

    eval "$(scripts/local-services.sh env s3)"
    .venv/bin/python scripts/s3_throughput.py s3://vaegen/throughput --total-mb 100 --object-mb 1

S3 through s3fs (endpoint and credentials from the environment), one object after another and all at once (s3fs's
concurrent `pipe` / `cat`); local disk with and without an fsync per file. Reads come from the page cache on both
sides (the local S3 server stores plain files), so they measure the protocol's cost, not the disk's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import fsspec


def timed(label: str, total_bytes: int, work) -> None:
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    print(f"{label:<34} {total_bytes / seconds / 2**20:8.1f} MB/s  ({seconds:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefix", help="s3://bucket/prefix (emptied first)")
    parser.add_argument("--total-mb", type=int, default=100)
    parser.add_argument("--object-mb", type=float, default=1.0)
    args = parser.parse_args()
    size = int(args.object_mb * 2**20)
    count = int(args.total_mb * 2**20 // size)
    blobs = [os.urandom(size) for _ in range(count)]
    total = size * count
    fs = fsspec.filesystem("s3")
    prefix = args.prefix.rstrip("/")
    keys = [f"{prefix}/object-{i:06d}" for i in range(count)]
    print(f"{count} objects of {size / 2**20:g} MB")

    def clear():
        if fs.exists(prefix):
            fs.rm(prefix, recursive=True)

    def s3_write_each():
        for key, blob in zip(keys, blobs):
            with fs.open(key, "wb") as f:
                f.write(blob)

    def s3_read_each():
        for key in keys:
            with fs.open(key, "rb") as f:
                f.read()

    clear()
    timed("s3 write, one object at a time", total, s3_write_each)
    timed("s3 read, one object at a time", total, s3_read_each)
    clear()
    timed("s3 write, concurrent (fs.pipe)", total, lambda: fs.pipe(dict(zip(keys, blobs))))
    timed("s3 read, concurrent (fs.cat)", total, lambda: fs.cat(keys))
    clear()

    with tempfile.TemporaryDirectory(dir=os.environ.get("LOCAL_DIR")) as local:
        paths = [os.path.join(local, f"object-{i:06d}") for i in range(count)]

        def local_write(sync: bool):
            for path, blob in zip(paths, blobs):
                with open(path, "wb") as f:
                    f.write(blob)
                    if sync:
                        f.flush()
                        os.fsync(f.fileno())

        def local_read():
            for path in paths:
                with open(path, "rb") as f:
                    f.read()

        timed("local write", total, lambda: local_write(False))
        timed("local write + fsync per file", total, lambda: local_write(True))
        timed("local read", total, local_read)


if __name__ == "__main__":
    main()
