"""Durations as people write them in specs: ``500ms``, ``10s``, ``1m30s``, ``2h``, or a number of seconds."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_WHOLE = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+$")

# One week: a longer timeout or backoff is almost certainly a typo (and overflows nothing).
MAX_SECONDS = 7 * 86400.0


def parse_duration(value: str | int | float, maximum: float = MAX_SECONDS) -> float:
    """Return the duration in seconds. Raises ``ValueError`` with a message a user can act on."""
    if isinstance(value, bool):
        raise ValueError("a duration must be a string like '10s' or a number of seconds, not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        if not text or not _WHOLE.match(text):
            raise ValueError(
                f"invalid duration {value!r}: use a number with a unit (ms, s, m, h, d), e.g. '500ms', '1m30s'"
            )
        seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(text))
    else:
        raise ValueError(f"a duration must be a string like '10s' or a number of seconds, not {value!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative ({value!r})")
    if seconds > maximum:
        raise ValueError(f"duration {value!r} is longer than the limit of {format_duration(maximum)}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest readable form: ``0.5`` → ``500ms``, ``90`` → ``1m30s``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    out = []
    rest = seconds
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if rest >= size:
            n = int(rest // size)
            out.append(f"{n}{unit}")
            rest -= n * size
    if rest or not out:
        out.append(f"{rest:g}s")
    return "".join(out)
