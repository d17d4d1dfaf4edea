"""Object storage: an S3 bucket prefix or a local folder, behind the same small `Store` interface.

Keys are '/'-separated and relative to the store's root (the S3 prefix or the local folder). A key
prefix means a folder: `list("ckpt")` lists `ckpt/a` but not `ckpt2/a`.

S3 endpoint and credentials follow boto3's own lookup (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/...); an explicit `endpoint_url` wins.
boto3 uses path-style addressing for a custom endpoint, which MinIO/SeaweedFS/moto need.

A call to S3 that fails for a reason that passes (the endpoint unreachable, a 5xx, throttling) is
retried with exponential backoff (1, 2, 4 ... 15 s apart) for up to `retry_seconds`
(storage.retry_seconds), each retry logged; a refusal (no bucket, access denied) is not retried.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar
from urllib.parse import unquote, urlparse

from kubetune import paths
from kubetune.errors import ConfigError, DataError, ServiceError

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
#: S3 error codes that say "try again" rather than "no".
TRANSIENT_CODES = frozenset({"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError",
                             "ServiceUnavailable", "Throttling", "ThrottlingException"})
MAX_RETRY_DELAY = 15.0
T = TypeVar("T")


def _join(*parts: str) -> str:
    """Join key parts with '/', dropping empty parts and stray slashes."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _folder(key_prefix: str) -> str:
    """'a/b' -> 'a/b/'; '' -> '' (the whole store)."""
    key_prefix = key_prefix.strip("/")
    return key_prefix + "/" if key_prefix else ""


class Store(ABC):
    """Files under one root, addressed by '/'-separated keys."""

    def __init__(self, field: str, value: str):
        self.field = field  # the config field the store came from, named in errors
        self.value = value  # the URI as the user wrote it

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """The full URI (s3://...) or absolute path of a key."""

    @abstractmethod
    def check(self) -> None:
        """Raise ServiceError unless the store can be reached and written."""

    @abstractmethod
    def upload_file(self, path: str | Path, key: str) -> None: ...

    @abstractmethod
    def download_file(self, key: str, path: str | Path) -> Path: ...

    @abstractmethod
    def list(self, key_prefix: str = "") -> list[str]:
        """Sorted keys (relative to the store root) of all files under key_prefix."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether a file (not a folder) is stored under exactly this key."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def delete_prefix(self, key_prefix: str) -> int:
        """Delete every file under key_prefix; returns how many."""

    def upload_dir(self, local_dir: str | Path, key_prefix: str, last: Optional[str] = None,
                   without: Optional[str] = None) -> int:
        """Copy every file under local_dir to key_prefix/<relative path>; returns how many. Files named
        `last` go after all others (a marker whose presence says the folder is complete); files named
        `without` stay behind."""
        local_dir = Path(local_dir)
        files = sorted((p for p in local_dir.rglob("*") if p.is_file() and p.name != without),
                       key=lambda p: (p.name == last, p))
        for path in files:
            self.upload_file(path, _join(key_prefix, path.relative_to(local_dir).as_posix()))
        log.info("uploaded %d files from %s to %s", len(files), local_dir, self.uri(key_prefix))
        return len(files)

    def download_dir(self, key_prefix: str, local_dir: str | Path) -> int:
        """Copy every file under key_prefix to local_dir/<relative key>; returns how many."""
        local_dir = Path(local_dir)
        folder = _folder(key_prefix)
        keys = self.list(key_prefix)
        for key in keys:
            self.download_file(key, local_dir / key[len(folder):])
        log.info("downloaded %d files from %s to %s", len(keys), self.uri(key_prefix), local_dir)
        return len(keys)


class LocalStore(Store):
    """A folder on the local disk (or a mounted volume)."""

    def __init__(self, root: str | Path, field: str = "storage.uri", value: Optional[str] = None):
        super().__init__(field, value if value is not None else str(root))
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / key.strip("/") if key.strip("/") else self.root

    def uri(self, key: str = "") -> str:
        return str(self._path(key))

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".kubetune-check-"):
                pass
        except OSError as exc:
            raise ServiceError(self.field, self.value,
                               f"the folder {self.root} is not writable ({exc.strerror or exc}); "
                               "fix its permissions or point it at another folder or an s3:// URI") from None

    def _written(self, key: str, write: Callable[[Path], None]) -> None:
        """Writes a key as S3 does, whole or not at all: to a temporary name beside it, then renamed.
        A full disk or a kill leaves no half-written file under the key (a checkpoint's marker that
        exists is complete), and a run reading a cached key never sees another run's write half done."""
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f".{dest.name}.{os.getpid()}-{os.urandom(3).hex()}.partial")
        try:
            write(partial)
            os.replace(partial, dest)
        finally:
            partial.unlink(missing_ok=True)

    def upload_file(self, path: str | Path, key: str) -> None:
        self._written(key, lambda partial: shutil.copyfile(path, partial))

    def download_file(self, key: str, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), path)
        return path

    def list(self, key_prefix: str = "") -> list[str]:
        base = self._path(key_prefix)
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.endswith(".partial"))

    def exists(self, key: str) -> bool:
        return bool(key.strip("/")) and self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        self._written(key, lambda partial: partial.write_bytes(data))

    def delete_prefix(self, key_prefix: str) -> int:
        keys = self.list(key_prefix)
        for key in keys:
            self._path(key).unlink()
        base = self._path(key_prefix)
        if key_prefix.strip("/") and base.is_dir():
            shutil.rmtree(base)  # empty folders left behind
        return len(keys)


class S3Store(Store):
    """A prefix in an S3 bucket, on AWS or any S3-compatible endpoint."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: Optional[str] = None,
                 field: str = "storage.uri", value: Optional[str] = None, retry_seconds: float = 0.0):
        super().__init__(field, value if value is not None else f"s3://{_join(bucket, prefix)}")
        self.retry_seconds = retry_seconds
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        # Transfers may be large and slow; connecting should not be. The standard retry mode backs
        # off exponentially, so 3 attempts keep a dead endpoint to seconds, not minutes.
        self.client = _s3_client(endpoint_url, connect_timeout=5, read_timeout=120, attempts=3)
        self.endpoint_url = self.client.meta.endpoint_url

    def __repr__(self) -> str:
        return f"S3Store({self.uri()!r}, endpoint_url={self.endpoint_url!r})"

    def _key(self, key: str) -> str:
        return _join(self.prefix, key)

    def uri(self, key: str = "") -> str:
        return f"s3://{_join(self.bucket, self._key(key))}"

    @contextlib.contextmanager
    def _errors(self, key: Optional[str] = None) -> Iterator[None]:
        """Turn boto3's connection, credential and bucket errors into one-line ServiceErrors.

        A missing object under `key` raises FileNotFoundError, as LocalStore does.
        """
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            ClientError,
            ConnectionError as BotoConnectionError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        try:
            try:
                yield
            except S3UploadFailedError as exc:  # boto3 wraps the real failure of an upload
                cause = exc.__cause__ or exc.__context__
                raise cause if isinstance(cause, (ClientError, BotoConnectionError, HTTPClientError)) else exc
        except (NoCredentialsError, PartialCredentialsError):
            raise ServiceError(self.field, self.value,
                               "no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                               "(or AWS_PROFILE)") from None
        except (BotoConnectionError, HTTPClientError) as exc:  # refused, reset, timed out
            error = ServiceError(self.field, self.value,
                                 f"cannot reach the S3 endpoint {self.endpoint_url} ({exc}); start the object "
                                 "store or fix storage.endpoint_url / AWS_ENDPOINT_URL")
            error.transient = True
            raise error from None
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            # HEAD requests have no body, so a missing key and a missing bucket are both a bare 404.
            if key is not None and code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"{self.uri(key)} does not exist") from None
            if code in ("404", "NoSuchBucket"):
                fix = (f"bucket {self.bucket!r} does not exist at {self.endpoint_url}; create it "
                       f"(aws s3 mb s3://{self.bucket}) or fix the bucket name")
            elif code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                fix = (f"access to bucket {self.bucket!r} denied ({code}); check the credentials "
                       "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and the bucket policy")
            else:
                fix = f"the S3 request failed: {code} {error.get('Message', '')}".rstrip()
            failure = ServiceError(self.field, self.value, fix)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            failure.transient = status >= 500 or code in TRANSIENT_CODES
            raise failure from None

    def _call(self, what: str, operation: Callable[[], T], key: Optional[str] = None) -> T:
        """operation() under _errors, retried with backoff while its failure is transient and
        retry_seconds have not run out."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 1.0
        while True:
            try:
                with self._errors(key):
                    return operation()
            except ServiceError as exc:
                if not getattr(exc, "transient", False) or time.monotonic() + delay > deadline:
                    raise
                log.warning("storage: %s failed (%s); retrying in %.0f s (storage.retry_seconds: %.0f s left)",
                            what, exc.fix.split(";")[0], delay, deadline - time.monotonic())
                time.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)

    def check(self) -> None:
        # A client of its own: one attempt, short timeouts, so a dead endpoint fails in seconds.
        client = _s3_client(self.endpoint_url, connect_timeout=3, read_timeout=10, attempts=1)
        with self._errors():
            client.head_bucket(Bucket=self.bucket)

    def upload_file(self, path: str | Path, key: str) -> None:
        self._call(f"upload of {self.uri(key)}", lambda: self.client.upload_file(str(path), self.bucket, self._key(key)))

    def download_file(self, key: str, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._call(f"download of {self.uri(key)}",
                   lambda: self.client.download_file(self.bucket, self._key(key), str(path)), key)
        return path

    def list(self, key_prefix: str = "") -> list[str]:
        folder = _folder(self._key(key_prefix))
        root = _folder(self.prefix)

        def list_keys() -> list[str]:
            keys = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder):
                keys.extend(obj["Key"][len(root):] for obj in page.get("Contents", [])
                            if not obj["Key"].endswith("/"))  # folder markers made by some tools
            return sorted(keys)

        return self._call(f"listing of {self.uri(key_prefix)}", list_keys)

    def exists(self, key: str) -> bool:
        if not key.strip("/"):
            return False
        try:
            self._call(f"lookup of {self.uri(key)}",
                       lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)), key)
        except FileNotFoundError:
            return False
        return True

    def object_version(self, key: str) -> Optional[str]:
        """The ETag of the object stored under exactly this key, or None when there is none."""
        try:
            return self._call(f"lookup of {self.uri(key)}",
                              lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)), key)["ETag"]
        except FileNotFoundError:
            return None

    def versions(self, key_prefix: str = "") -> list[tuple[str, str]]:
        """(key relative to key_prefix, ETag) of every object under key_prefix (a folder)."""
        folder = _folder(self._key(key_prefix))
        pages = lambda: list(self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder))
        return [(obj["Key"][len(folder):], obj["ETag"]) for page in self._call(f"listing of {self.uri(key_prefix)}", pages)
                for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]

    def open_object(self, key: str, version: str, on_changed: Callable[[str], Exception]):
        """The object's body as a stream, only while its ETag is still `version`: a changed object
        (412) or a missing one raises on_changed("changed" / "disappeared")."""
        from botocore.exceptions import ClientError

        def get():
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(key), IfMatch=version)["Body"]
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in ("412", "PreconditionFailed"):
                    raise on_changed("changed") from None
                raise

        try:
            return self._call(f"read of {self.uri(key)}", get, key)
        except FileNotFoundError:
            raise on_changed("disappeared") from None

    def read_bytes(self, key: str) -> bytes:
        return self._call(f"read of {self.uri(key)}",
                          lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read(), key)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call(f"write of {self.uri(key)}",
                   lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data))

    def delete_prefix(self, key_prefix: str) -> int:
        keys = [self._key(k) for k in self.list(key_prefix)]
        for start in range(0, len(keys), 1000):  # the API's batch limit
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            self._call(f"deletion under {self.uri(key_prefix)}",
                       lambda: self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}))
        return len(keys)


def _s3_client(endpoint_url: Optional[str], connect_timeout: float, read_timeout: float, attempts: int):
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                    retries={"total_max_attempts": attempts, "mode": "standard"})
    return session.client("s3", endpoint_url=endpoint_url or None,
                          region_name=session.region_name or DEFAULT_REGION, config=config)


def _local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        return Path(unquote(urlparse(uri).path))
    return Path(uri)


def _split_s3(uri: str, field: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise ConfigError(field, uri, "give s3://bucket or s3://bucket/prefix")
    return parsed.netloc, parsed.path.lstrip("/")


def open_store(uri: Optional[str], endpoint_url: Optional[str] = None, *, field: str = "storage.uri",
               retry_seconds: float = 0.0) -> Store:
    """s3://bucket/prefix -> S3Store; a path or file:// URI -> LocalStore; None -> .kubetune/storage.

    `field` is the config key the URI came from; errors name it. retry_seconds: how long an S3 call
    that fails for a passing reason is retried (storage.retry_seconds).
    """
    if uri is None:
        return LocalStore(paths.state_dir() / "storage", field=field, value=None)
    if uri.startswith("s3://"):
        bucket, prefix = _split_s3(uri, field)
        return S3Store(bucket, prefix, endpoint_url=endpoint_url, field=field, value=uri, retry_seconds=retry_seconds)
    if "://" in uri and not uri.startswith("file://"):
        raise ConfigError(field, uri, "use s3://bucket/prefix, a local path or file:///path")
    return LocalStore(paths.below_root(_local_path(uri), field, uri), field=field, value=uri)


def open_object_store(uri: str, endpoint_url: Optional[str] = None, field: str = "uri") -> tuple[S3Store, str]:
    """(a store at the root of the URI's bucket, the URI's key) for an s3:// URI."""
    bucket, key = _split_s3(uri, field)
    return S3Store(bucket, endpoint_url=endpoint_url, field=field, value=uri), key.strip("/")


def download_uri(uri: str, dest: str | Path, endpoint_url: Optional[str] = None, *, field: str = "uri") -> Path:
    """Fetch one object or a whole prefix (s3://, file:// or a local path) into the folder `dest`.

    One object lands at dest/<its file name> and that file's path is returned (so the extension,
    which says the format, is kept); a prefix lands under dest/ with its relative layout and dest is
    returned. Raises DataError naming `field` when nothing exists at the URI.
    """
    dest = Path(dest)
    if uri.startswith("s3://"):
        bucket, key = _split_s3(uri, field)
        store: Store = S3Store(bucket, endpoint_url=endpoint_url, field=field, value=uri)
    else:
        path = _local_path(uri).expanduser().resolve()
        store, key = LocalStore(path.parent, field=field, value=uri), path.name
    key = key.strip("/")
    if key and not uri.endswith("/") and store.exists(key):
        target = store.download_file(key, dest / key.rsplit("/", 1)[-1])
        log.info("downloaded %s to %s", uri, target)
        return target
    count = store.download_dir(key, dest)
    if count == 0:
        if isinstance(store, S3Store):
            store.check()  # a missing bucket or dead endpoint says so, rather than "no files"
        raise DataError(field, uri, "no file or folder with files exists there; check the path")
    return dest
