"""One cron dialect for `kubetune schedule` and the retrain CronJob: the standard 5 fields.

Kubernetes reads a CronJob's schedule with robfig/cron v3's standard parser (minute hour
day-of-month month day-of-week, or a descriptor such as @daily); KFP's recurring runs read 6 fields,
seconds first (robfig/cron v1, kfp.Client.create_recurring_run's docstring). People write the first
kind, so kubetune takes it everywhere, checks every field here, before anything is sent, and hands
KFP the same schedule with the seconds fixed at 0.
"""

from __future__ import annotations

import re

from kubetune.errors import ConfigError

MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
WEEKDAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]

#: (name, lowest, highest, names for the values from `lowest` on) of each field, in order.
FIELDS = [
    ("minute", 0, 59, []),
    ("hour", 0, 23, []),
    ("day-of-month", 1, 31, []),
    ("month", 1, 12, MONTHS),
    ("day-of-week", 0, 6, WEEKDAYS),
]

#: The descriptors both parsers know, as the 5 fields robfig/cron defines them to mean.
DESCRIPTORS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}

EXAMPLE = "e.g. '0 3 * * *' for 03:00 every day, '30 2 * * mon-fri', or @daily"


def check_cron(cron: str) -> str:
    """The schedule, whitespace normalised, once every field is valid; a descriptor stays as given."""
    cron = " ".join(cron.split())
    if cron.lower() in DESCRIPTORS:
        return cron.lower()
    if cron.startswith("@"):
        raise ConfigError("--cron", cron, f"the descriptors are {', '.join(sorted(DESCRIPTORS))}; or give 5 fields, "
                                          f"{EXAMPLE}")
    fields = cron.split(" ") if cron else []
    if len(fields) == 6:
        suggestion = " ".join(fields[1:])
        raise ConfigError("--cron", cron, "give the standard 5 fields (minute hour day-of-month month day-of-week), "
                                          f"as a Kubernetes CronJob reads them: drop the seconds field, "
                                          f"'{suggestion}' (kubetune tells KFP second 0)")
    if len(fields) != 5:
        raise ConfigError("--cron", cron, f"give 5 fields (minute hour day-of-month month day-of-week), {EXAMPLE}")
    for text, (name, low, high, names) in zip(fields, FIELDS):
        for item in text.split(","):
            problem = _check_item(item, low, high, names)
            if problem:
                raise ConfigError("--cron", cron, f"{name} {text!r}: {problem}; {EXAMPLE}")
    return cron


def kfp_cron(cron: str) -> str:
    """A schedule that passed check_cron in KFP's 6-field form: second 0, then the same 5 fields."""
    return "0 " + DESCRIPTORS.get(cron, cron)


def _check_item(item: str, low: int, high: int, names: list[str]) -> str:
    """What is wrong with one comma-separated part of a field ('' when nothing): `*`, `?`, N, a name,
    N-M, and any of those with /STEP."""
    span, slash, step = item.partition("/")
    if slash and not (step.isdigit() and int(step) > 0):
        return f"the step after / must be a whole number above 0, not {step!r}"
    if span in ("*", "?"):
        return ""
    start, dash, end = span.partition("-")
    values = []
    for part in ([start, end] if dash else [start]):
        value = _value(part, names)
        if value is None:
            named = f", or a name ({names[0]}-{names[-1]})" if names else ""
            return f"{part!r} is not a number{named}"
        if not low <= value <= high:
            sunday = "; Sunday is 0 (or sun)" if names is WEEKDAYS and value == 7 else ""
            return f"{value} is outside {low}-{high}{sunday}"
        values.append(value)
    if dash and values[0] > values[1]:
        return f"the range {span} runs backwards; write it low-high"
    return ""


def _value(part: str, names: list[str]) -> int | None:
    if re.fullmatch(r"\d+", part):
        return int(part)
    if part.lower() in names:
        return names.index(part.lower()) + (1 if names is MONTHS else 0)
    return None
