"""Cells and columns of what a served model is asked: the text training read from the same values."""

from __future__ import annotations

import json
import math
from typing import Any


def text(value: Any) -> str:
    """A cell as text; a missing cell (None, NaN from JSON null) is empty; a number or boolean is the
    text JSON writes for it (42, 0.5, true), as training read it (kubetune.sources.text_of)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, (bool, float)):
        return json.dumps(value)
    return str(value)


def column(model_input, name: str) -> list:
    """A DataFrame's column, or a plain list of strings as it is."""
    return list(model_input[name]) if hasattr(model_input, "columns") else list(model_input)
