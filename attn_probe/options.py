"""Checks of user options shared by every entry point: one message for one kind of mistake.

The lowest layer of the package: it imports nothing from it, and every public function that
takes a count or a threshold checks it here, so the same mistake reads the same everywhere.
"""

from __future__ import annotations

from typing import Any


def check_tau(tau: Any) -> float:
    """``tau`` as a float in (0, 1], or ``ValueError``."""
    try:
        value = float(tau)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"tau must be a number in (0, 1], got {tau!r}") from None
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    return value


#: Why attention over fewer than two tokens is refused where figures are computed.
ONE_TOKEN = "a 1x1 attention matrix has rank 1 whatever the model does"


def check_count(name: str, value: Any, *, optional: bool = False, minimum: int = 1,
                why: str = "") -> Any:
    """``value`` when it is an int of at least ``minimum`` (or None, when ``optional``), else
    ``ValueError`` naming the option (and saying ``why``, when given)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(
            f"{name} must be {what}{' or None' if optional else ''}, got {value!r}"
            + (f": {why}" if why else "")
        )
    return value
