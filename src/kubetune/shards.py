"""The files of a data source, listed once and read as byte streams: a file, a folder, an s3:// object
or an s3:// prefix of many shards.

Why streams: a source may be 1,000 shards or one 10 GB file; nothing here holds more than a read
buffer of it. An S3 shard is read straight from the response body, never downloaded whole first;
only a Parquet shard, which needs seeking, is spooled to a temporary file, one at a time.

Every shard is pinned when the source is listed (size and modification time of a local file, the
ETag of an S3 object) and checked again as it is read: a shard that disappears or changes while a run
reads it stops the run (ShardChanged) instead of leaving it with a silently shorter data set.

The content hash is sha256 over every shard's file name and raw bytes in listing order (the bytes as
stored, gzip or not), computed as the bytes stream past, so a source is read once, not twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator, Optional

from kubetune.errors import DataError
from kubetune.storage import S3Store, open_object_store

SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt", ".parquet")
READ_CHUNK = 1 << 20


def format_suffix(name: str) -> str:
    """The format suffix, ignoring a compression suffix: data.jsonl.gz is .jsonl."""
    return PurePosixPath(re.sub(r"\.gz$", "", name, flags=re.IGNORECASE)).suffix.lower()


class ShardChanged(DataError):
    """A listed shard disappeared or changed while the run read it."""


@dataclass(frozen=True)
class Shard:
    """One file of a source. shown: how messages name it (a path or an s3:// URI); name: its file
    name (hashed with its bytes); version: what pins it (size and mtime, or the ETag)."""

    shown: str
    name: str
    version: str
    local: Optional[Path] = None
    store: Optional[S3Store] = None
    key: str = ""

    @property
    def suffix(self) -> str:
        return format_suffix(self.name)

    def changed(self, how: str) -> ShardChanged:
        return ShardChanged("data.path", self.shown, f"this file {how} while the run read it (it was listed when "
                            "the run started); rerun once the data is no longer being written, so a run never "
                            "trains on a partly read data set")

    @contextlib.contextmanager
    def open(self, digest: Optional["hashlib._Hash"] = None) -> Iterator[BinaryIO]:
        """The raw bytes as a buffered stream; with digest, every byte read (and any left unread when
        the block ends) is added to it, after the file name."""
        if digest is not None:
            digest.update(self.name.encode())
        if self.local is not None:
            try:
                raw = self.local.open("rb")
            except FileNotFoundError:
                raise self.changed("disappeared") from None
            if _local_version(self.local) != self.version:
                raw.close()
                raise self.changed("changed")
        else:
            raw = self.store.open_object(self.key, self.version, on_changed=self.changed)
        stream = io.BufferedReader(_Hashing(raw, digest), buffer_size=READ_CHUNK)
        try:
            yield stream
            while stream.read(READ_CHUNK):  # the hash covers the whole file, read or not
                pass
        finally:
            stream.close()
        if self.local is not None:
            try:
                now = _local_version(self.local)
            except FileNotFoundError:
                raise self.changed("disappeared") from None
            if now != self.version:
                raise self.changed("changed")

    @contextlib.contextmanager
    def seekable(self, digest: Optional["hashlib._Hash"] = None) -> Iterator[Path]:
        """A local path to the whole file (Parquet needs to seek): the file itself, or an S3 object
        spooled to a temporary file that is removed after the block."""
        if self.local is not None:
            with self.open(digest) as stream:
                while stream.read(READ_CHUNK):
                    pass
            yield self.local
            return
        with tempfile.TemporaryDirectory(prefix="kubetune-shard-") as folder:
            path = Path(folder) / self.name
            with self.open(digest) as stream, path.open("wb") as out:
                shutil.copyfileobj(stream, out, READ_CHUNK)
            yield path


class _Hashing(io.RawIOBase):
    """A raw stream that adds what passes through it to a sha256."""

    def __init__(self, raw, digest):
        self.raw, self.digest = raw, digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        if self.digest is not None:
            self.digest.update(data)
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.raw.close()
        super().close()


def _local_version(path: Path) -> str:
    info = os.stat(path)  # not `stat`: that is the module SPECIAL_FILES reads modes with
    return f"{info.st_size}:{info.st_mtime_ns}"


#: What a path that is neither a regular file nor a folder is, by its stat mode.
SPECIAL_FILES = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                 (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _refuse_special(path: Path, field: str) -> None:
    """DataError for a path that is not a regular file (checked before it is opened: opening a named
    pipe waits for a writer, so the run would hang with no output). A dangling link is left to the
    caller's "no such file"."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    what = next((name for test, name in SPECIAL_FILES if test(mode)), "not a regular file")
    raise DataError(field, str(path), f"this is {what}, not a file or folder: data is read from regular files "
                    "only (reading a pipe would wait for a writer); write the data to a file and give its path")


def _sort_key(relative: str) -> tuple[str, ...]:
    return PurePosixPath(relative).parts  # as sorting Paths does: part by part


def list_shards(path_or_uri: str, endpoint_url: Optional[str] = None, field: str = "data.path") -> list[Shard]:
    """The source's data files in a fixed order (part by part of their relative paths). DataError
    naming `field` when there is nothing to read."""
    if path_or_uri.startswith("s3://"):
        return _s3_shards(path_or_uri, endpoint_url, field)
    path = Path(path_or_uri).expanduser()
    if path.is_dir():
        named = [p for p in path.rglob("*") if format_suffix(p.name) in SUFFIXES]
        for p in named:
            _refuse_special(p, field)
        files = sorted((p for p in named if p.is_file()), key=lambda p: p.relative_to(path).parts)
        if not files:
            raise DataError(field, str(path), f"the directory holds no {'/'.join(SUFFIXES)} files")
        return [Shard(str(p), p.name, _local_version(p), local=p) for p in files]
    if not path.exists():
        raise DataError(field, str(path), "no such file or directory; check the path (relative paths "
                        "are read from the directory you run kubetune in)")
    _refuse_special(path, field)
    if format_suffix(path.name) not in SUFFIXES:
        raise DataError(field, str(path), f"unsupported file type; use one of {', '.join(SUFFIXES)} "
                        "(each may end in .gz)")
    return [Shard(str(path), path.name, _local_version(path), local=path)]


def _s3_shards(uri: str, endpoint_url: Optional[str], field: str) -> list[Shard]:
    store, key = open_object_store(uri, endpoint_url, field)
    if key and not uri.endswith("/"):
        etag = store.object_version(key)
        if etag is not None:  # one object
            name = key.rsplit("/", 1)[-1]
            if format_suffix(name) not in SUFFIXES:
                raise DataError(field, uri, f"unsupported file type; use one of {', '.join(SUFFIXES)} "
                                "(each may end in .gz)")
            return [Shard(uri, name, etag, store=store, key=key)]
    listed = [(relative, etag) for relative, etag in store.versions(key)
              if format_suffix(relative.rsplit("/", 1)[-1]) in SUFFIXES]
    if not listed:
        store.check()  # a missing bucket or dead endpoint says so, rather than "no files"
        raise DataError(field, uri, f"no {'/'.join(SUFFIXES)} file or folder with such files exists there; "
                        "check the path")
    listed.sort(key=lambda item: _sort_key(item[0]))
    prefix = key.strip("/")
    return [Shard(store.uri(f"{prefix}/{relative}" if prefix else relative), relative.rsplit("/", 1)[-1], etag,
                  store=store, key=f"{prefix}/{relative}" if prefix else relative) for relative, etag in listed]


def sibling(shards: list[Shard], shard: Shard, name: str) -> Optional[Shard]:
    """The file called `name` beside `shard`: in the listing, or next to a local file."""
    if shard.local is not None:
        path = shard.local.with_name(name)
        return Shard(str(path), name, _local_version(path), local=path) if path.is_file() else None
    folder = shard.key.rsplit("/", 1)[0] + "/" if "/" in shard.key else ""
    return next((s for s in shards if s.key == folder + name), None)
