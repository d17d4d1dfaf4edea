"""Errors a user can fix. The CLI prints their message on one line and exits non-zero, no traceback."""

from __future__ import annotations

import re
from typing import Any

#: The most of a value an error message shows, and the most of the whole message (each in characters).
VALUE_SHOWN, MESSAGE_SHOWN = 300, 1500  # a long path still shows whole; a 28 MB value does not

# scheme://userinfo@ up to the netloc's last @ (a raw password may hold one); the netloc ends at / ? #,
# whitespace or a quote, so a URI inside a repr, a JSON list or a sentence is found too. One slash is
# enough: a URI taken for a path (pathlib) loses one, https:/user:password@host.
_USERINFO = re.compile(r"""(\b[A-Za-z][A-Za-z0-9+.-]*:/+)([^\s/?#'"<>]*)@""")


def redacted(text: str) -> str:
    """text with the credentials of every URI in it masked: scheme://user:***@host, scheme://***@host
    (a token alone). Messages, log records and the run's MLflow params and tags go through it."""
    def mask(found: re.Match) -> str:
        user, colon, _ = found.group(2).partition(":")
        return f"{found.group(1)}{user + ':' if colon else ''}***@"
    return _USERINFO.sub(mask, text)


def bounded(text: str, limit: int = MESSAGE_SHOWN, end: int = 0) -> str:
    """text, or its first `limit - end` characters, how long it is and its last `end` characters (a
    message's end says what to do): no error line runs to megabytes."""
    if len(text) <= limit:
        return text
    return f"{text[:limit - end]}… ({len(text):,} characters)" + (f" …{text[-end:]}" if end else "")


def shown(value: Any) -> str:
    """A value as an error message shows it: its repr, credentials masked, cut to VALUE_SHOWN."""
    text = repr(value)
    if len(text) > VALUE_SHOWN + 1000:  # masked before the cut (which can split a URI before its @), on a window
        return f"{redacted(text[:VALUE_SHOWN + 1000])[:VALUE_SHOWN]}… ({len(text):,} characters)"
    return bounded(redacted(text), VALUE_SHOWN)


class UserError(Exception):
    """Bad input: the message names the field, shows the value (credentials masked, cut when long)
    and says what to do; the message is at most MESSAGE_SHOWN characters and how long it was."""

    exit_code = 2

    def __init__(self, field: str, value: Any, fix: str):
        self.field = field
        self.value = value
        self.fix = fix
        super().__init__(bounded(redacted(f"{field} = {shown(value)}: {fix}"), end=MESSAGE_SHOWN // 3))


class ConfigError(UserError):
    """A config value is missing, unknown, of the wrong type or impossible."""


class DataError(UserError):
    """The data does not exist or does not match what the config says about it."""


class ModelError(UserError):
    """The model cannot be found, quantized or adapted as configured."""


class ServiceError(UserError):
    """MLflow or the object store does not answer or refuses the request."""


class ResourceError(UserError):
    """The machine ran out of something the run needs (disk space) or refuses a write (a read-only
    store): the same attempt would fail the same way, so no stage retries it; after the fix,
    `kubetune run --resume` continues the run."""


class Interrupted(Exception):
    """`kubetune run` was interrupted (Ctrl-C, SIGTERM) after its stage was stopped: run_id is its
    MLflow run (marked KILLED), empty before preflight opened one; problem: why it could not be marked."""

    exit_code = 130

    def __init__(self, run_id: str, stage: str, problem: str):
        self.run_id, self.stage, self.problem = run_id, stage, problem
        if problem:
            message = f"interrupted; {problem}"
        elif run_id:
            message = (f"interrupted in stage {stage}; MLflow run {run_id} marked KILLED; continue it with "
                       f"`kubetune run --resume {run_id}` and the same --config/--set")
        else:
            message = "interrupted before any stage started; nothing was recorded"
        super().__init__(message)


class StageFailed(Exception):
    """A pipeline stage failed where it ran (a subprocess or a container). Exit code 2 when its last
    error line is one of the errors above (shown as the user error it is), 1 otherwise (shown with
    the exception line and where the stage's full log is)."""

    def __init__(self, stage: str, where: str, exit_code: int, error: str, log: str = ""):
        self.stage, self.where, self.error, self.log = stage, where, error, log
        user_error = re.match(r"kubetune\.errors\.(\w+): (.*)$", error)
        self.exit_code = 2 if user_error else 1
        # Bad input and a full disk fail the same way again; a service may come back.
        self.deterministic = bool(user_error) and user_error.group(1) != "ServiceError"
        if user_error:
            message = f"{bounded(redacted(user_error.group(2)), end=MESSAGE_SHOWN // 3)} (in stage {stage})"
        else:  # the error line cut, not the log's path after it
            message = f"stage {stage} failed in {where} (exit {exit_code}): {bounded(redacted(error), end=MESSAGE_SHOWN // 3)}"
            if log:
                message += f"; its full log: {log}"
        super().__init__(redacted(message))
