"""Small helpers for values that came from the wire or from disk: nothing in them is
trusted until checked, and a client's string never reaches a log line unescaped."""

from __future__ import annotations

import math
import re
from typing import Any

MAX_TEXT = 2000  # a reason, a name or a label a client may send


def say(value: Any, limit: int = 100) -> str:
    """A client's string, safe for a log line: escaped and cut."""
    text = str(value) if isinstance(value, str) else type(value).__name__
    cut = text[:limit]
    return ascii(cut)[1:-1] + ("..." if len(text) > limit else "")


def number_in(value: Any, lo: float, hi: float, integer: bool = False) -> bool:
    """`value` is a real number (not a bool) in [lo, hi], and an integer when asked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if integer and not (isinstance(value, int) or float(value).is_integer()):
        return False
    return math.isfinite(value) and lo <= value <= hi


def error_summary(reason: Any) -> str:
    """A client's error reply in one safe line: its first `SomeError: message` line (Flower
    sends whole tracebacks), escaped and cut."""
    text = reason if isinstance(reason, str) else ""
    for line in text[:100_000].splitlines():
        match = re.match(r"\s*([\w.]*(?:Error|Exception)): (\S.*)$", line)
        if match:
            return say(f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}", 200)
    lines = [line for line in text[-2000:].splitlines() if line.strip()]
    return say(lines[-1].strip() if lines else "no reason given", 200)
