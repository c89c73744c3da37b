"""Number formatting for the report: every helper returns "—" for a missing value.

Run files are written by other stages and may hold ``None``, ``NaN``, strings or
be absent altogether; the report shows a dash rather than crashing or printing
``nan``.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

MISSING = "—"


def as_float(value: Any) -> float | None:
    """``value`` as a finite float, or None (None, NaN, inf, bools and non-numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def fmt_number(value: Any, digits: int = 3) -> str:
    """A plain number with ``digits`` decimals: ``0.123``."""
    number = as_float(value)
    return MISSING if number is None else f"{number:.{digits}f}"


def fmt_percent(value: Any, digits: int = 1) -> str:
    """A fraction in [0, 1] as a percentage: ``0.9234`` -> ``92.3%``."""
    number = as_float(value)
    return MISSING if number is None else f"{100 * number:.{digits}f}%"


def fmt_sci(value: Any) -> str:
    """A value spanning many decades (gradient norms, tolerances): ``3.2e-07``."""
    number = as_float(value)
    if number is None:
        return MISSING
    if 1e-3 <= abs(number) < 1e4 or number == 0:
        return f"{number:.3g}"
    mantissa, exponent = f"{number:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


def fmt_int(value: Any) -> str:
    """An integer with thousands separators: ``12,345``."""
    number = as_float(value)
    return MISSING if number is None else f"{round(number):,}"


def fmt_count(value: Any) -> str:
    """A large count in short form: ``1.23 M``, ``45.6 k``, ``512``."""
    number = as_float(value)
    if number is None:
        return MISSING
    for scale, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(number) >= scale:
            return f"{number / scale:.3g}{suffix}"
    return f"{round(number)}"


def fmt_bytes(value: Any) -> str:
    """A file size: ``4.2 MB`` (decimal units, as file managers show them)."""
    number = as_float(value)
    if number is None:
        return MISSING
    for scale, suffix in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(number) >= scale:
            return f"{number / scale:.1f} {suffix}"
    return f"{round(number)} B"


def fmt_seconds(value: Any) -> str:
    """A duration: ``0.42 s``, ``12.3 s``, ``4 min 05 s``, ``1 h 02 min``."""
    seconds = as_float(value)
    if seconds is None:
        return MISSING
    if seconds < 10:
        return f"{seconds:.2g} s" if seconds < 1 else f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_date(value: Any) -> str:
    """An ISO-8601 time as ``2024-05-01 14:03 UTC+02:00``; other strings as given."""
    if not isinstance(value, str) or not value:
        return MISSING
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    zone = moment.strftime(" UTC%z") if moment.tzinfo else ""
    if zone:
        zone = " UTC" if zone == " UTC+0000" else f"{zone[:-2]}:{zone[-2:]}"
    return moment.strftime("%Y-%m-%d %H:%M") + zone


def fmt_text(value: Any) -> str:
    """Any value as display text; None and empty strings as "—"."""
    if value is None or value == "":
        return MISSING
    if isinstance(value, float) and not math.isfinite(value):
        return MISSING
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt_text(v) for v in value) if value else MISSING
    return str(value)
