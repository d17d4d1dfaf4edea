"""Faults of the machine, not of the code: a full disk, a store that refuses writes. A stage that
meets one ends with one line that names the cause and the place (errors.ResourceError), is not
retried (the same attempt fails the same way) and is continued with `--resume` after the fix,
instead of ending in a traceback that blames whatever call happened to write.

The cause is found along the exception's chain, by errno where the OSError survives and by the
text its wrappers keep where it does not: torch.save reports a full disk as `RuntimeError: ... file
write failed`, safetensors as `IoError(Os { code: 28, kind: StorageFull ...`, MLflow's sqlite
store a read-only file as `attempt to write a readonly database`.
"""

from __future__ import annotations

import contextlib
import errno
import re
import shutil
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse

from kubetune.errors import ResourceError, ServiceError, UserError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXT = re.compile(r"No space left on device|StorageFull|Disk quota exceeded|code: 28\b|file write failed")
STORE_REFUSED = re.compile(r"readonly database|[Rr]ead-only file system|unable to open database file|disk I/O error")
SERVER_GONE = re.compile(r"Max retries exceeded|Connection refused|Failed to establish a new connection")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _free(path: Optional[str]) -> str:
    for place in ([Path(path), *Path(path).parents] if path else []):
        with contextlib.suppress(OSError):
            usage = shutil.disk_usage(place)
            return f"{usage.free / 1e6:,.1f} MB free of {usage.total / 1e6:,.0f} MB"
    return "free space unknown"


def resource_error(exc: BaseException, work_dir: Optional[str], tracking_uri: str, resume: str) -> Optional[UserError]:
    """The ResourceError a fault deserves, or None when exc is not one. work_dir: where the stage
    writes when the failing path is not known; resume: how to continue the run after the fix."""
    for cause in _chain(exc):
        if isinstance(cause, UserError):
            return None  # already says what to do
        text = str(cause)
        if isinstance(cause, OSError) and cause.errno in DISK_FULL or DISK_FULL_TEXT.search(text):
            # copyfile's error names the source first, then the file it could not write
            path = getattr(cause, "filename2", None) or getattr(cause, "filename", None) or work_dir
            return ResourceError("disk space", str(path), f"no space left on the device that holds it ({_free(path)}); "
                                 f"free space there (or give the run another place), then {resume}; "
                                 "only complete checkpoints are ever resumed from")
        if isinstance(cause, OSError) and cause.errno == errno.EROFS:
            return ResourceError("disk", str(cause.filename or work_dir), f"the file system is read-only; make it "
                                 f"writable, then {resume}")
        refused = STORE_REFUSED.search(text)
        if refused and tracking_uri.startswith("sqlite:"):
            return ResourceError("tracking.mlflow_uri", tracking_uri, f"the tracking store refused a write "
                                 f"({refused.group(0)}); until it is writable again the run cannot be marked "
                                 f"FAILED there and shows RUNNING; make the file and its folder writable, then "
                                 f"{resume}")
        host = urlparse(tracking_uri).hostname or ""
        if SERVER_GONE.search(text) and tracking_uri.startswith("http") and host and host in text:
            return ServiceError("tracking.mlflow_uri", tracking_uri, "MLflow stopped answering during the stage (its "
                                "client retried for about a minute); start it again, then " + resume)
    return None


@contextlib.contextmanager
def as_resource_errors(work_dir: Optional[str], tracking_uri: str, run_id: str) -> Iterator[None]:
    """Inside a stage: a fault of the machine leaves as a ResourceError (one line, no retry)."""
    resume = (f"continue the run with `kubetune run --resume {run_id}` (on a cluster: resume_run_id={run_id})"
              if run_id else "run again")
    try:
        yield
    except Exception as exc:
        fault = resource_error(exc, work_dir, tracking_uri, resume)
        if fault is None:
            raise
        raise fault from exc
