"""What a person watching a run sees: logging set-up for entry points, library noise filtered, progress.

Library modules only log (logging.getLogger(__name__)); the entry points call setup() (the CLI) or
setup_stage() (each stage) once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path

from kubetune.errors import redacted

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Set by `kubetune run`: 1 shows progress bars, 0 plain log lines (pods, --no-progress).
PROGRESS_ENV = "KUBETUNE_PROGRESS"
#: Set by `kubetune run` for the stage processes it starts on this machine.
LOCAL_RUN_ENV = "KUBETUNE_LOCAL_RUN"


class _DropNoise(logging.Filter):
    # On the CPU bitsandbytes logs the fp16 cast on every forward, and that an optional 4-bit kernel
    # package is missing; neither says anything actionable and they drown the training log.
    NOISE = ("inputs will be cast from", "Failed to load CPU gemm_4bit_forward")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.NOISE)


def quiet_bitsandbytes() -> None:
    for name in ("bitsandbytes", "bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")


def _masked(make_record):
    """A log record factory whose records have the credentials of any URI masked (errors.redacted),
    in the message and in the traceback, before any handler formats them."""
    def make(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format call: logging reports it when a handler formats the record
            return record
        if redacted(message) != message:
            record.msg, record.args = redacted(message), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redacted(logging.Formatter().formatException(record.exc_info))
        return record
    make.masks = True
    return make


def setup() -> None:
    """Log lines with time and source (the command line). Every log record of the process has URI
    credentials masked: a record factory, not a handler's filter, because `kubetune run` adds and
    swaps handlers (the run log, kfp's task lines) and a record reaches each of them."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if not getattr(logging.getLogRecordFactory(), "masks", False):
        logging.setLogRecordFactory(_masked(logging.getLogRecordFactory()))


#: Starts each stage's closing line, whatever log format the process has (kfp's executor sets its
#: own): `kubetune run` shows the text after it beside the stage's time.
_SUMMARY_MARK = "stage result: "


def summary(text: str) -> None:
    """The one figure of a stage that matters (rows, tokens, trainable share, loss, headline scores)."""
    logging.getLogger("kubetune.summary").info("%s%s", _SUMMARY_MARK, text)


class OursAndProblems(logging.Filter):
    """The console of a quiet `kubetune run`: kubetune's own lines, and other libraries' warnings
    and errors; their INFO lines (MLflow's schema set-up, kfp.local's task dumps) go to the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        if any(noise in record.getMessage() for noise in _DropNoise.NOISE):
            return False
        return record.levelno >= logging.WARNING or record.name.startswith("kubetune")


class WithoutTracebacks(logging.Formatter):
    """The quiet console's format around a handler's own: a record that carries an exception shows
    the first line of its message only. MLflow logs a traceback for every store error before it
    raises it again, and kubetune reports that error itself in one line; the run's log keeps it all.
    The record is copied, not changed: other handlers (the run log) format the same one."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info or record.exc_text or record.stack_info):
            return self.inner.format(record)
        lines = record.getMessage().strip().splitlines()
        shown = logging.makeLogRecord({**record.__dict__, "msg": lines[0] if lines else "", "args": (),
                                       "exc_info": None, "exc_text": None, "stack_info": None})
        return self.inner.format(shown)


class StageLines:
    """What a quiet `kubetune run` shows of its stage processes: one line as each stage starts and
    one as it ends (its seconds and its summary line), the progress bar in place on a terminal, and
    log lines at WARNING or above. Everything a stage writes still goes to its log file; --verbose
    shows it all (the executor input dumps, the Trainer's loss dicts, library messages)."""

    # A stage's traceback stays in its log: `kubetune run` ends with its error line and the log's path.
    SHOWN = re.compile(r" (WARNING|ERROR|CRITICAL) ")
    BAR = re.compile(r"\d+%\|.*(it/s|s/it)")  # tqdm's bars of loops (training, scoring), not of file writes

    def __init__(self, out=None, progress: bool = True):
        self.out = out or sys.stdout
        self.bars = progress and self.out.isatty()
        self.summaries: dict[str, str] = {}
        self.bar_open = False

    def _close_bar(self) -> None:
        if self.bar_open:
            self.out.write("\n")
            self.bar_open = False

    def started(self, task: str) -> None:
        self._close_bar()
        self.out.write(f"> {task}\n")
        self.out.flush()

    def line(self, task: str, text: str) -> None:
        if _SUMMARY_MARK in text:
            self.summaries[task] = text.split(_SUMMARY_MARK, 1)[1].strip()
        elif self.BAR.search(text):
            if self.bars:
                self.out.write("\r  " + text.rstrip("\n").split("\r")[-1].strip()[:110].ljust(110))
                self.out.flush()
                self.bar_open = True
        elif self.SHOWN.search(text) and not any(noise in text for noise in _DropNoise.NOISE):
            self._close_bar()
            self.out.write("  " + text.strip() + "\n")

    def finished(self, task: str, seconds: float, ok: bool) -> None:
        self._close_bar()
        self.out.write(f"{'=' if ok else 'x'} {task:<14}{seconds:6.1f} s  {self.summaries.get(task, '' if ok else 'failed')}\n")
        self.out.flush()


def die_with_parent() -> None:
    """This process gets SIGKILL when its parent dies (Linux). `kubetune run` sets it for each
    stage's shell, and each stage for itself (the shell's child), so no stage trains on, unseen,
    after the `kubetune run` that started it is gone; `kubetune run --resume` continues the run."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took hold
        os._exit(137)


class _OutputOrDie:
    """A stage's stdout/stderr under `kubetune run`: when the pipe to `kubetune run` breaks, the run
    is gone, so the stage ends as die_with_parent would end it, instead of failing on the broken pipe
    (which would mark the MLflow run FAILED before the parent's death reached this process)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._or_die(self._stream.write, text)

    def flush(self) -> None:
        self._or_die(self._stream.flush)

    @staticmethod
    def _or_die(call, *args):
        try:
            return call(*args)
        except BrokenPipeError:
            os.kill(os.getpid(), signal.SIGKILL)
            raise  # not reached: SIGKILL cannot be caught

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def setup_stage() -> None:
    """setup(), and in a stage's process: bitsandbytes' noise filtered, no weight-loading bars
    (the training bar stays); under `kubetune run`, the stage dies with it."""
    if os.environ.get(LOCAL_RUN_ENV) == "1":
        die_with_parent()
        sys.stdout, sys.stderr = _OutputOrDie(sys.stdout), _OutputOrDie(sys.stderr)
    setup()
    quiet_bitsandbytes()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def stage_started() -> float:
    """When this stage started, on time.monotonic()'s clock. In a KFP task's process (kfp's launcher
    sets _KFP_RUNTIME) the process exists for its stage, so the stage starts with the process and
    interpreter start-up and imports count; elsewhere (a stage function called in a test) it starts now."""
    now = time.monotonic()
    if os.environ.get("_KFP_RUNTIME") != "true":
        return now
    try:  # /proc/self/stat field 22: the process's start, in clock ticks after boot
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return now
    return now - max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def progress() -> bool:
    return os.environ.get(PROGRESS_ENV, "1") == "1"
