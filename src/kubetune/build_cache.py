"""What an earlier run built from the same inputs, kept in storage and reused (tokenize's output):
the copy counts once its marker is written, last, so a copy cut short is never reused."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

from kubetune.errors import ServiceError
from kubetune.storage import Store

log = logging.getLogger(__name__)


def reuse_or_build(store: Store, kind: str, key: str, out_dir: Path, build: Callable[[Path], None]) -> bool:
    """Fills out_dir with what an earlier run built for the same key (cache/<kind>/<key>/ in the
    store) and returns True; else builds it, keeps a copy for later runs and returns False. The copy
    counts once its marker (cache/<kind>/<key>.complete, written last) exists, so a copy cut short
    is never reused. A store that cannot be read or written costs time, not the run."""
    prefix, marker = f"cache/{kind}/{key}", f"cache/{kind}/{key}.complete"
    out_dir = Path(out_dir)
    try:
        if store.exists(marker):
            store.download_dir(prefix, out_dir)
            log.info("%s: reused what an earlier run built from the same inputs (%s)", kind, store.uri(prefix))
            return True
    except (ServiceError, OSError) as exc:
        log.warning("%s: the kept copy could not be read (%s); building it again", kind, exc)
        shutil.rmtree(out_dir, ignore_errors=True)
    build(out_dir)
    try:
        store.upload_dir(out_dir, prefix)
        store.write_bytes(marker, b"")
    except (ServiceError, OSError) as exc:
        log.warning("%s: could not keep a copy for later runs (%s)", kind, exc)
    return False
