"""Errors a user can fix. The CLI prints their message on one line and exits non-zero, no traceback."""

from __future__ import annotations

import re
from typing import Any


class UserError(Exception):
    """Bad input: the message names the field, shows the value and says what to do."""

    exit_code = 2

    def __init__(self, field: str, value: Any, fix: str):
        self.field = field
        self.value = value
        self.fix = fix
        super().__init__(f"{field} = {value!r}: {fix}")


class ConfigError(UserError):
    """A config value is missing, unknown, of the wrong type or impossible."""


class DataError(UserError):
    """The data does not exist or does not match what the config says about it."""


class ModelError(UserError):
    """The model cannot be found, quantized or adapted as configured."""


class ServiceError(UserError):
    """MLflow or the object store does not answer or refuses the request."""


class StageFailed(Exception):
    """A pipeline stage failed where it ran (a subprocess or a container). Exit code 2 when its last
    error line is one of the errors above (shown as the user error it is), 1 otherwise (shown with
    the exception line and where the stage's full log is)."""

    def __init__(self, stage: str, where: str, exit_code: int, error: str, log: str = ""):
        self.stage, self.where, self.error, self.log = stage, where, error, log
        user_error = re.match(r"kubetune\.errors\.\w+: (.*)$", error)
        self.exit_code = 2 if user_error else 1
        if user_error:
            message = f"{user_error.group(1)} (in stage {stage})"
        else:
            message = f"stage {stage} failed in {where} (exit {exit_code}): {error}"
            if log:
                message += f"; its full log: {log}"
        super().__init__(message)
