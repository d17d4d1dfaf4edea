"""`kubetune services up|status|down`: a local MLflow server (UI + REST API) in the background.

It serves a sqlite store and the artifact folder beside it (kubetune.tracking.artifact_root), as
embedded (serverless) tracking wrote them: the state folder's by default, or the store a config
names (`--config`, `--store`), so the link `kubetune run` prints opens that run. The pid file, the
URL, the store served and the server's log live in <state>/services/.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from kubetune import paths
from kubetune.errors import ServiceError
from kubetune.tracking import artifact_root, embedded_artifact_root, embedded_uri, local_path  # what it serves

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0  # /health answers after ~9 s on these machines
STOP_GRACE_S = 5.0
WORKERS = 1  # uvicorn workers: each holds ~250 MB; one serves a local user (requests run in a thread pool)


def _services_dir() -> Path:
    path = paths.state_dir() / "services"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pid_file() -> Path:
    return _services_dir() / "mlflow.pid"


def _url_file() -> Path:
    return _services_dir() / "mlflow.url"


def _log_file() -> Path:
    return _services_dir() / "mlflow.log"


def _store_file() -> Path:
    return _services_dir() / "mlflow.store"


def _served() -> str:
    return _store_file().read_text().strip() if _store_file().is_file() else embedded_uri()


def check_store(store: str) -> Path:
    """A store the local server can serve: a sqlite file that exists. Returns its artifact folder."""
    database = local_path(store) if store.startswith("sqlite:///") else None
    if database is None:
        fix = ("it is a server already: open it in a browser" if store.startswith(("http://", "https://")) else
               "give the sqlite:/// URI that tracking.mlflow_uri names")
        raise ServiceError("--store", store, fix)
    if not database.is_file():
        raise ServiceError("--store", store, "no such database; give the store a run logged to (its MLflow line "
                                             "names it), or leave --store out for the state folder's")
    return artifact_root(store)


def _read_pid() -> Optional[int]:
    try:
        return int(_pid_file().read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Whether pid runs (not a zombie) and, where /proc tells, is an MLflow server, not a reused pid."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False  # our own child that just exited: now reaped
    except ChildProcessError:
        pass  # not our child (the usual case: started by an earlier `services up`)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process took the pid
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
            return b"mlflow" in (proc / "cmdline").read_bytes()
        except (OSError, IndexError):
            return False
    return True


_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via HTTP(S)_PROXY


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with _LOCAL.open(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is fine
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _log_tail(lines: int = 15) -> str:
    try:
        return "\n".join(_log_file().read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _clear_state() -> None:
    for path in (_pid_file(), _url_file(), _store_file()):
        path.unlink(missing_ok=True)


def services_status() -> dict[str, Any]:
    """pid, alive, healthy, url and log path of the local MLflow server (pid None when none is recorded)."""
    pid = _read_pid()
    url = _url_file().read_text().strip() if _url_file().is_file() else None
    alive = pid is not None and _alive(pid)
    served = _served() if alive else embedded_uri()
    return {
        "pid": pid,
        "alive": alive,
        "healthy": bool(alive and url and _healthy(url)),
        "url": url,
        "log": str(_log_file()),
        "backend_store_uri": served,
        "artifact_root": str(artifact_root(served) if served != embedded_uri() else embedded_artifact_root()),
    }


def _wait_healthy(pid: int, url: str, timeout: float, process: Optional[subprocess.Popen] = None) -> None:
    """Until url/health answers. Whether the server still lives is asked of `process` when this
    process started it: _alive's /proc check looks for "mlflow" in the command line, which a child
    does not show until its exec is done, so on a loaded machine a server that had just been forked
    was taken for dead and reported without the reason its log gives."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _healthy(url):
            return
        if (process.poll() is not None) if process is not None else not _alive(pid):
            _clear_state()
            raise ServiceError("services.mlflow", url,
                               f"the MLflow server exited while starting; its log ({_log_file()}) ends with:\n"
                               f"{_log_tail()}")
        time.sleep(0.3)
    services_down()
    raise ServiceError("services.mlflow", url,
                       f"the MLflow server did not answer {url}/health within {timeout:.0f} s and was stopped; "
                       f"its log ({_log_file()}) ends with:\n{_log_tail()}")


def services_up(port: int = 5000, host: str = "127.0.0.1", store: Optional[str] = None) -> str:
    """Start the local MLflow server on store (default: the state folder's), or find it running;
    returns its URL once /health answers. A server already running on another store is named."""
    store = store or embedded_uri()
    artifacts = check_store(store) if store != embedded_uri() else embedded_artifact_root()
    status = services_status()
    if status["alive"] and _served() != store:
        raise ServiceError("--store", store, f"the MLflow server at {status['url']} serves {_served()}; stop it "
                                             "with kubetune services down, then start it on this store")
    if status["alive"]:
        url = status["url"]
        if not status["healthy"]:  # another `up` may still be starting it
            _wait_healthy(status["pid"], url, START_TIMEOUT_S)
        if not url.endswith(f":{port}"):
            log.warning("the MLflow server already runs at %s; not starting another on port %d", url, port)
        return url
    _clear_state()  # stale pid file of a server that died

    if not _port_free(host, port):
        raise ServiceError("--port", port, f"port {port} on {host} is already in use by another program; "
                                           "stop it or pass another port, e.g. --port 5001")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", host, "--port", str(port), "--workers", str(WORKERS),
        "--backend-store-uri", store,
        # New experiments get a file path that embedded tracking can write too; the same folder
        # backs the server's artifact proxy (mlflow-artifacts:/ URIs).
        "--default-artifact-root", artifacts.as_uri(),
        "--artifacts-destination", artifacts.as_uri(),
    ]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(_log_file(), "ab") as log_out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_out, stderr=subprocess.STDOUT,
                                   cwd=_services_dir(), env=env, start_new_session=True)
    _pid_file().write_text(f"{process.pid}\n")
    _url_file().write_text(f"{url}\n")
    _store_file().write_text(f"{store}\n")
    log.info("starting the MLflow server at %s (pid %d, log %s)", url, process.pid, _log_file())
    _wait_healthy(process.pid, url, START_TIMEOUT_S, process)
    log.info("the MLflow server answers at %s", url)
    return url


def services_down() -> bool:
    """Stop the local MLflow server and its workers; True when one was running."""
    pid = _read_pid()
    if pid is None or not _alive(pid):
        _clear_state()
        return False
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        log.warning("the MLflow server (pid %d) ignored SIGTERM; killing it", pid)
    _signal_group(pid, signal.SIGKILL)  # also any worker left behind by a stopped leader
    _clear_state()
    log.info("stopped the MLflow server (pid %d)", pid)
    return True


def _signal_group(pid: int, sig: int) -> None:
    """Signal the server's process group (it leads one: started with start_new_session)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
